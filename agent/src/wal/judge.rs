//! Judging an archived object by its content, never by its name: anyone who can write to the
//! bucket can put any key there, so a key says only where to look. An object is genuine when it
//! reads back as what its key says — it authenticates (an encrypted store), decodes to the bytes
//! whose sha256 the key carries, and, for a segment, starts with the long page header of this
//! cluster at the position its name gives. What fails is set aside (logged and reported), never
//! used, and never lets a name alone extend, cut or block the archive.

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use tokio::io::AsyncWrite;

use super::{
    header::{self, LONG_HEADER_LEN, LongPageHeader, ServerWal},
    naming::{Kind, WalFile, WalObject, valid_seg_size},
};
use crate::{
    lsn::Lsn,
    pipeline::{self, Counters, Expected, PipelineError},
    store::{Store, StoreError},
};

/// PostgreSQL's largest WAL segment size (`initdb --wal-segsize=1024`): no WAL file is larger.
pub(super) const MAX_WAL_FILE_BYTES: u64 = 1 << 30;

/// Most objects one listing judges by downloading them: each costs a read of up to a segment, so
/// a bucket filled with planted names costs a bounded amount of work. Past it, names count as
/// they are (a gap they open stays a loud refusal, never a silent early end).
pub(super) const MAX_JUDGED: usize = 64;

/// Most verdicts one archive remembers (a partial is re-shipped every few seconds under a new key).
const MAX_REMEMBERED: usize = 4096;

/// What reading an object back showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It is what its key says.
    Genuine,
    /// It is not; why, for the report.
    Bad(String),
    /// It was deleted since it was listed (the agent deletes partials a newer object supersedes):
    /// nothing to judge and nothing to report.
    Gone,
}

/// Whether a failed read says something about the object's content (so the object is bad)
/// rather than about the store's health (so nothing is known yet): a digest or size mismatch,
/// bytes that do not decode, a failed authentication, a key this agent lacks, or plaintext where
/// encryption is required.
pub(super) fn content_failure(e: &PipelineError) -> bool {
    e.is_data_loss()
        || matches!(
            e,
            PipelineError::Store(
                StoreError::Tampered { .. }
                    | StoreError::WrongKey { .. }
                    | StoreError::NotEncrypted { .. }
            )
        )
}

/// Whether a failed read says the object is no longer there.
pub(super) fn gone(e: &PipelineError) -> bool {
    matches!(e, PipelineError::Store(StoreError::NotFound { .. }))
}

/// Why the first bytes `head` of an object of `size` raw bytes cannot be the WAL its key names,
/// or `None` when they can. A history file has no header: its digest is all there is to check.
/// `seg_size` is the cluster's segment size when the caller knows it (a manifest records it);
/// otherwise the header's own, which must be one PostgreSQL can have.
pub(super) fn header_problem(
    object: &WalObject,
    system_id: Option<u64>,
    seg_size: Option<u64>,
    size: u64,
    head: &[u8],
) -> Option<String> {
    if matches!(object.file, WalFile::History { .. }) {
        return None;
    }
    // pg_receivewal's freshly zero-filled file, shipped before its first page: it claims no WAL
    // (its key's `end` is 0), so it moves nothing and is no impostor.
    if object.kind == Kind::Partial && object.end == 0 && head.iter().all(|&b| b == 0) {
        return None;
    }
    let Some(found) = LongPageHeader::parse(head) else {
        return Some("it is shorter than a WAL page header: it holds no WAL".into());
    };
    let seg_size = seg_size.unwrap_or(u64::from(found.seg_size));
    if !valid_seg_size(seg_size) {
        return Some(format!(
            "its header says {seg_size}-byte segments, which PostgreSQL cannot have"
        ));
    }
    // Nothing about the server's progress is known here: only the cluster and the layout count.
    let server = ServerWal {
        system_id: system_id.unwrap_or(found.system_id),
        timeline: u32::MAX,
        flush: Lsn(u64::MAX),
        seg_size,
    };
    if let Err(e) = header::check(object.file, object.kind, size, head, &server) {
        return Some(e.to_string());
    }
    // The key's `end` is where its WAL ends: a complete segment is valid to its last byte.
    if object.kind == Kind::Seg && object.end != size {
        return Some(format!(
            "its key says {} bytes of WAL, but it holds {size}",
            object.end
        ));
    }
    None
}

/// The first [`LONG_HEADER_LEN`] bytes written to it and how many there were in all; the rest is
/// dropped, so judging a segment holds 40 bytes, not 16 MiB.
#[derive(Debug, Default)]
struct Head {
    bytes: Vec<u8>,
    size: u64,
}

impl AsyncWrite for Head {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let room = LONG_HEADER_LEN.saturating_sub(self.bytes.len());
        let keep = buf.get(..room.min(buf.len())).unwrap_or_default();
        self.bytes.extend_from_slice(keep);
        self.size = self.size.saturating_add(buf.len() as u64);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Verdicts already reached, by key. Keys carry their content's digest, so a verdict stays true
/// for as long as nobody overwrites the object; whatever uses the bytes checks them again.
#[derive(Debug, Clone, Default)]
pub(super) struct Verdicts(Arc<Mutex<HashMap<String, Verdict>>>);

impl Verdicts {
    pub(super) fn get(&self, key: &str) -> Option<Verdict> {
        self.0.lock().ok()?.get(key).cloned()
    }

    pub(super) fn remember(&self, key: &str, verdict: &Verdict) {
        if let Ok(mut map) = self.0.lock() {
            if map.len() >= MAX_REMEMBERED {
                map.clear();
            }
            map.insert(key.to_string(), verdict.clone());
        }
    }
}

/// Reads `object` back in full and judges it (see the module doc). `Err` only for a failure that
/// says nothing about the object (the store is unreachable, say): then nothing is decided.
pub(super) async fn judge(
    store: &dyn Store,
    object: &WalObject,
    system_id: Option<u64>,
    seg_size: Option<u64>,
) -> Result<Verdict, PipelineError> {
    let mut head = Head::default();
    let expected = Expected::raw_only(object.sha256).at_most(MAX_WAL_FILE_BYTES);
    let read = pipeline::download(
        store,
        &object.key,
        &expected,
        &mut head,
        0,
        Arc::new(Counters::default()),
    )
    .await;
    match read {
        Ok(()) => Ok(
            match header_problem(object, system_id, seg_size, head.size, &head.bytes) {
                Some(why) => Verdict::Bad(why),
                None => Verdict::Genuine,
            },
        ),
        Err(e) if content_failure(&e) => Ok(Verdict::Bad(e.to_string())),
        Err(e) if gone(&e) => Ok(Verdict::Gone),
        Err(e) => Err(e),
    }
}
