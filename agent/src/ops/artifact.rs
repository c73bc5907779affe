//! The one way an artifact is written to the store and the one way it is read back.
//!
//! Writing: a [`Source`] produces raw bytes (a tool's stdout, an HTTP download); the pipeline
//! compresses, hashes and uploads them; the source then gives its verdict (did the tool exit
//! cleanly, do the bytes match what the server announced?); only then is the upload completed and
//! the store asked whether it holds exactly the bytes sent. Any failure on the way aborts the
//! upload, so no engine can skip a step.
//!
//! Reading: the pipeline streams the stored object, checked against the manifest, into a
//! consumer's input while the consumer runs; the last bytes reach it only after every check
//! passed, and a failed check cancels the consumer so it never commits. Whichever side failed
//! first is the error reported.

use std::{future::Future, sync::Arc};

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::{
    catalog::{Artifact, BackupId, BackupKeys, Compression, Manifest},
    error::OpError,
    jobs::Reporter,
    pipeline::{self, Counters, PipelineError, Staged, UploadSummary},
    store::{Store, StoreError},
};

/// Raw bytes held back from a restore's consumer until every digest matched: pg_restore cannot
/// reach its COMMIT, nor Qdrant's upload its checksum, without the last bytes, so a mismatch found
/// at the end leaves nothing committed.
pub(crate) const RESTORE_HOLDBACK: usize = 1 << 20;

/// A producer of an artifact's raw bytes that has its own say on whether they are complete.
#[async_trait]
pub(crate) trait Source: Send {
    /// The raw bytes.
    type Reader: AsyncRead + Unpin + Send;
    /// What the source reports once it judged its output complete (versions, WAL positions).
    type Verdict: Send;

    /// The bytes; called once.
    fn reader(&mut self) -> Self::Reader;

    /// Every byte went into the store (not yet visible): is the stream complete and right? An
    /// error discards the artifact.
    async fn verdict(self, summary: &UploadSummary) -> Result<Self::Verdict, OpError>;

    /// The upload failed: stop producing (kill the tool), so nothing runs on for nobody.
    async fn stop(self);
}

/// What an artifact is called inside its backup and what its raw bytes are.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ArtifactName<'a> {
    /// Name inside the backup folder, e.g. `dump.pgdump.zst`.
    pub name: &'a str,
    /// Format of the raw bytes, e.g. `pg_dump/custom`.
    pub format: &'a str,
}

/// Streams `source` into artifact `what` of backup `id` and publishes it once the source's
/// verdict and the store's own account of the object agree with what was sent.
pub(crate) async fn write_artifact<S: Source>(
    ctx: &Context,
    id: &BackupId,
    what: ArtifactName<'_>,
    mut source: S,
    reporter: &Reporter,
) -> Result<(Artifact, S::Verdict), OpError> {
    let store = ctx.catalog.store();
    let key = id.key(what.name);
    // Before the upload exists, so the start-up sweep can always tell whose it is.
    if let Err(e) = ctx.catalog.record_owner(id).await {
        source.stop().await;
        return Err(e.into());
    }
    let upload = match store.start_upload(&key).await {
        Ok(u) => u,
        Err(e) => {
            source.stop().await;
            return Err(e.into());
        }
    };
    let staged =
        match pipeline::upload(source.reader(), upload, &ctx.settings, reporter.counters()).await {
            Ok(staged) => staged,
            Err(e) => {
                source.stop().await;
                return Err(e.into());
            }
        };
    let verdict = match source.verdict(&staged.summary).await {
        Ok(v) => v,
        Err(e) => {
            abort_quietly(staged).await;
            return Err(e);
        }
    };
    let summary = staged.summary.clone();
    commit_verified(store.as_ref(), &key, staged).await?;
    let artifact = Artifact {
        name: what.name.into(),
        format: what.format.into(),
        raw_bytes: summary.digest.raw_bytes,
        stored_bytes: summary.digest.stored_bytes,
        raw_sha256: summary.digest.raw_sha256,
        stored_sha256: summary.digest.stored_sha256,
        compression: Compression {
            algorithm: "zstd".into(),
            level: ctx.settings.compression_level,
            threads: ctx.settings.compression_threads,
        },
        part_size: ctx.settings.part_size as u64,
        max_part_size: summary.max_part_size as u64,
        parts: summary.parts,
        collection: None,
        shard: None,
        database: None,
    };
    Ok((artifact, verdict))
}

/// Publishes a staged artifact and checks that the store holds exactly the bytes sent (the store
/// verified every part's sha256; this catches a server that published something else).
async fn commit_verified(store: &dyn Store, key: &str, staged: Staged) -> Result<(), OpError> {
    let sent = staged.summary.digest.stored_bytes;
    staged.commit().await?;
    match store.head(key).await? {
        Some(meta) if meta.size == sent => Ok(()),
        other => Err(OpError::StoreMismatch {
            key: key.to_string(),
            found: other.map(|m| m.size),
            sent,
        }),
    }
}

/// Aborts an upload nobody will complete; a failure only leaves what the next start-up sweeps.
async fn abort_quietly(staged: Staged) {
    if let Err(e) = staged.abort().await {
        tracing::warn!(error = %e, "aborting an unused upload failed; the agent removes it at its next start");
    }
}

/// Streams artifact `art` of `manifest` into `writer` while `consumer` (the process or request
/// reading the other end) runs, and returns the consumer's result once both sides succeeded.
///
/// The last `holdback` raw bytes reach `writer` only after sizes and digests matched the
/// manifest. `consumer` is given a token that is cancelled when the stored object fails a check
/// or cannot be read: the consumer must then stop without committing anything (kill pg_restore,
/// drop the upload).
pub(crate) async fn read_artifact<W, F, C, T>(
    store: &dyn Store,
    manifest: &Manifest,
    art: &Artifact,
    writer: W,
    holdback: usize,
    counters: Arc<Counters>,
    consumer: F,
) -> Result<T, OpError>
where
    W: AsyncWrite + Unpin + Send,
    F: FnOnce(CancellationToken) -> C,
    C: Future<Output = Result<T, OpError>>,
{
    let cancel = CancellationToken::new();
    let consumer = consumer(cancel.clone());
    let key = manifest.id.key(&art.name);
    let download = async {
        let r = pipeline::download(store, &key, &art.expected(), writer, holdback, counters).await;
        if matches!(&r, Err(e) if !matches!(e, PipelineError::Sink(_))) {
            cancel.cancel();
        }
        r
    };
    match tokio::join!(download, consumer) {
        (Ok(()), consumed) => consumed,
        // The consumer stopped reading: its own error says why.
        (Err(e @ PipelineError::Sink(_)), consumed) => match consumed {
            Err(own) => Err(own),
            Ok(_) => Err(e.into()),
        },
        (Err(e), _) => Err(missing_is_data_loss(manifest, e)),
    }
}

/// Reads and checks every byte of an artifact, delivering nothing.
pub(crate) async fn verify_artifact(
    store: &dyn Store,
    manifest: &Manifest,
    art: &Artifact,
    counters: Arc<Counters>,
) -> Result<(), OpError> {
    read_artifact(
        store,
        manifest,
        art,
        tokio::io::sink(),
        0,
        counters,
        |_| async { Ok(()) },
    )
    .await
}

/// The artifact `name` of a backup, or data loss: its manifest must list it.
pub(crate) fn artifact<'a>(m: &'a Manifest, name: &str) -> Result<&'a Artifact, OpError> {
    m.artifacts
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| OpError::MissingArtifact {
            id: m.id.clone(),
            name: name.to_string(),
            listed: m.artifacts.iter().map(|a| a.name.clone()).collect(),
        })
}

/// A missing artifact object is data loss: its manifest promised it.
fn missing_is_data_loss(m: &Manifest, e: PipelineError) -> OpError {
    match e {
        PipelineError::Store(StoreError::NotFound { key }) => OpError::ObjectMissing {
            id: m.id.clone(),
            key,
        },
        other => other.into(),
    }
}
