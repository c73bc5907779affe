//! The one place backup bytes are transformed: compressed and hashed on the way to the store,
//! hashed, decompressed and checked on the way back.
//!
//! Backup: engine stdout → (sha256 of raw bytes) → zstd where it pays, raw frames where it does
//! not ([`adaptive`]) → (sha256 of stored bytes) → parts → multipart upload. Three stages run concurrently, joined by bounded channels, so a slow store
//! slows the engine instead of filling memory. Part buffers come from a pool of
//! `parts_in_flight + 1` buffers and go back to it when the last reference to their bytes is
//! dropped (after the store has uploaded them), so at most that many parts exist at any time,
//! whether being filled, queued or uploading — and the same buffers are reused for the whole
//! stream, so the allocator never holds freed part-sized blocks on top of them.
//!
//! Restore and verify: store → (sha256 of stored bytes) → zstd decode → (sha256 of raw bytes) →
//! sink, where the last `holdback` bytes are released to the sink only after both digests and sizes
//! match the manifest. A consumer that commits only at end of input (pg_restore
//! `--single-transaction`) therefore never commits a corrupted or truncated backup.

use std::{
    io::{self, Read, Write},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

use crate::digest::Sha256Digest;
use crate::store::{
    MAX_PART_SIZE, MIN_PART_SIZE, ObjectMeta, PartReceipt, Store, StoreError, Upload,
};

/// Size of the raw chunks handed from the reader to the compressor (and from the decoder to the
/// sink). A pipe delivers at most 64 KiB per read; the reader fills a whole chunk from several
/// reads before handing it on, so the compressor thread is woken four times less often.
const READ_CHUNK: usize = 256 * 1024;
/// Raw chunks queued between reader and compressor (and decoder and sink on restore).
const RAW_QUEUE: usize = 4;
/// Parts queued between the compressor and the uploader.
const PART_QUEUE: usize = 1;
/// zstd job size when compressing with worker threads.
const MT_JOB_SIZE: u32 = 1 << 20;
/// Parts uploaded at one size before the part size doubles; see [`part_size_for`].
const PARTS_PER_STEP: u32 = 1000;

/// How the pipeline compresses and splits a stream.
#[derive(Debug, Clone)]
pub struct Settings {
    /// zstd level (1..=22, as `--compression-level` accepts; 3 is zstd's and our default).
    pub compression_level: i32,
    /// zstd worker threads; 0 compresses on the pipeline's own thread.
    pub compression_threads: u32,
    /// Size of the first parts; see [`part_size_for`] for how it grows.
    pub part_size: usize,
    /// Parts the store may upload concurrently; one more is being filled.
    pub parts_in_flight: usize,
}

/// Live byte counters of one operation, read by the progress reporter.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Uncompressed bytes read from the engine (backup) or written to it (restore).
    pub raw: AtomicU64,
    /// Compressed bytes produced for (backup) or read from (restore) the store.
    pub stored: AtomicU64,
}

/// What the pipeline measured over one artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Digest256 {
    /// Uncompressed size.
    pub raw_bytes: u64,
    /// Stored (compressed) size.
    pub stored_bytes: u64,
    /// sha256 of the uncompressed stream.
    pub raw_sha256: Sha256Digest,
    /// sha256 of the stored object.
    pub stored_sha256: Sha256Digest,
}

impl Digest256 {
    /// Every size and digest of this measurement, as what a download must match.
    #[cfg(test)]
    pub(crate) fn expected(&self) -> Expected {
        Expected::all(
            self.raw_sha256,
            self.raw_bytes,
            self.stored_sha256,
            self.stored_bytes,
        )
    }
}

/// What a download must match. The raw digest is always checked; the rest only when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// sha256 of the uncompressed stream.
    pub raw_sha256: Sha256Digest,
    /// Uncompressed size, when known.
    pub raw_bytes: Option<u64>,
    /// Stored size, when known.
    pub stored_bytes: Option<u64>,
    /// sha256 of the stored object, when known.
    pub stored_sha256: Option<Sha256Digest>,
    /// Most uncompressed bytes the object may decode to when its size is not known: the decoder
    /// stops past it instead of filling the disk (a WAL file is never larger than 1 GiB).
    pub raw_at_most: Option<u64>,
}

impl Expected {
    /// These expectations, and no more than `limit` uncompressed bytes.
    pub fn at_most(mut self, limit: u64) -> Self {
        self.raw_at_most = Some(limit);
        self
    }

    /// Expectations for an object whose sizes and both digests are known (a manifest's artifact).
    pub fn all(
        raw_sha256: Sha256Digest,
        raw_bytes: u64,
        stored_sha256: Sha256Digest,
        stored_bytes: u64,
    ) -> Self {
        Self {
            raw_sha256,
            raw_bytes: Some(raw_bytes),
            stored_bytes: Some(stored_bytes),
            stored_sha256: Some(stored_sha256),
            raw_at_most: None,
        }
    }

    /// Expectations for an object known only by the digest of its raw bytes (WAL files are named
    /// by it): the digest covers size and content, so nothing else needs checking.
    pub fn raw_only(raw_sha256: Sha256Digest) -> Self {
        Self {
            raw_sha256,
            raw_bytes: None,
            stored_bytes: None,
            stored_sha256: None,
            raw_at_most: None,
        }
    }
}

/// What was uploaded, beyond the digests.
#[derive(Debug, Clone)]
pub(crate) struct UploadSummary {
    /// Sizes and digests.
    pub digest: Digest256,
    /// Number of parts.
    pub parts: u32,
    /// Largest part size used (the first parts use [`Settings::part_size`]).
    pub max_part_size: usize,
    /// How much of the stream went through zstd and how much was stored raw.
    pub choice: Choice,
}

/// Pipeline errors; each says which side failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading the engine's output failed.
    #[error("reading the engine's output failed: {0}")]
    Source(io::Error),
    /// zstd failed while compressing (never expected; a bug or out of memory).
    #[error("compression failed: {0}")]
    Compress(io::Error),
    /// The consumer (e.g. pg_restore) stopped reading.
    #[error("the restore target stopped reading its input: {0}")]
    Sink(io::Error),
    /// A digest did not match the manifest.
    #[error(
        "checksum mismatch for {key}: the manifest records {what} sha256 {expected}, the store returned data hashing to {actual}; the stored backup is corrupted, nothing was restored from it — use another backup"
    )]
    ChecksumMismatch {
        /// The object.
        key: String,
        /// "stored" or "raw".
        what: &'static str,
        /// Digest in the manifest.
        expected: Sha256Digest,
        /// Digest of what was read.
        actual: Sha256Digest,
    },
    /// A size did not match the manifest (typically a truncated object).
    #[error(
        "checksum mismatch for {key}: the manifest records {expected} {what} bytes, the store returned {actual} (truncated or corrupted); nothing was restored from it — use another backup"
    )]
    SizeMismatch {
        /// The object.
        key: String,
        /// "stored" or "raw".
        what: &'static str,
        /// Size in the manifest.
        expected: u64,
        /// Size read.
        actual: u64,
    },
    /// The stored bytes hash correctly but do not decompress: the backup was written wrongly.
    #[error("{key} cannot be decompressed although its checksum matches: {source}")]
    Decode {
        /// The object.
        key: String,
        /// What zstd said.
        source: io::Error,
    },
}

impl PipelineError {
    /// True when the stored data failed an integrity check.
    pub fn is_data_loss(&self) -> bool {
        matches!(
            self,
            PipelineError::ChecksumMismatch { .. }
                | PipelineError::SizeMismatch { .. }
                | PipelineError::Decode { .. }
        )
    }
}

/// Size of part `index` (0-based) for a stream of unknown length.
///
/// The first [`PARTS_PER_STEP`] parts use `base`, then the size doubles every
/// [`PARTS_PER_STEP`] parts (capped at S3's 5 GiB), so memory stays at `base` per part for every
/// ordinary database while a 5 TiB stream still fits in S3's 10 000 parts: with the 8 MiB default,
/// 10 000 parts hold about 8 TiB.
pub(crate) fn part_size_for(base: usize, index: u32) -> usize {
    let step = (index / PARTS_PER_STEP).min(16);
    base.max(MIN_PART_SIZE)
        .saturating_mul(1usize << step)
        .min(MAX_PART_SIZE)
}

/// A chunk buffer lent by a [`ChunkPool`]; it goes back when the last reference is dropped.
struct PooledChunk {
    data: Vec<u8>,
    home: std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl AsRef<[u8]> for PooledChunk {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for PooledChunk {
    fn drop(&mut self) {
        // A full pool (or none) means the buffer is not needed again: it is freed.
        let _ = self.home.try_send(std::mem::take(&mut self.data));
    }
}

/// Reused [`READ_CHUNK`] buffers for the raw chunks between stages, so a stream costs a few
/// allocations instead of one 256 KiB allocation (mapped, faulted in and unmapped by glibc)
/// per chunk. Bounded: it keeps at most `cap` buffers, and the stages never hold more than
/// their channel plus one each.
struct ChunkPool {
    free: std::sync::mpsc::Receiver<Vec<u8>>,
    home: std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl ChunkPool {
    fn new(cap: usize) -> Self {
        let (home, free) = std::sync::mpsc::sync_channel(cap);
        Self { free, home }
    }

    /// An empty buffer with room for a chunk: a returned one, or a new one.
    fn take(&self) -> Vec<u8> {
        let mut buf = self
            .free
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(READ_CHUNK));
        buf.clear();
        buf
    }

    /// Lends `data` out as `Bytes`; it comes back here when the last reference is dropped.
    fn lend(&self, data: Vec<u8>) -> Bytes {
        Bytes::from_owner(PooledChunk {
            data,
            home: self.home.clone(),
        })
    }
}

mod adaptive;
mod download;
mod upload;

pub(crate) use adaptive::Choice;

pub(crate) use download::download;
pub(crate) use upload::{Staged, upload};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        Store,
        faulty::{Fault, Faulty, Op},
        local::LocalStore,
    };
    use std::time::Duration;

    const MIB: usize = 1024 * 1024;

    fn settings() -> Settings {
        Settings {
            compression_level: 3,
            compression_threads: 0,
            part_size: 5 * MIB,
            parts_in_flight: 2,
        }
    }

    /// 24 MiB that zstd cannot shrink much, so the stream spans several 5 MiB parts.
    fn payload() -> Vec<u8> {
        adaptive::tests::noise(24 * MIB, 0x9e37_79b9_7f4a_7c15)
    }

    /// The object at `key` read back the way restores, verify and drills read it.
    async fn read_back(store: &LocalStore, key: &str, summary: &UploadSummary) -> Vec<u8> {
        let mut out = Vec::new();
        download(
            store,
            key,
            &summary.digest.expected(),
            &mut out,
            MIB,
            Arc::default(),
        )
        .await
        .unwrap();
        out
    }

    async fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().to_path_buf()).await.unwrap();
        (dir, store)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn round_trip_is_byte_exact_across_parts() {
        let (_dir, store) = store().await;
        let data = payload();
        let upload = store.start_upload("a/obj.zst").await.unwrap();
        let staged = super::upload(&data[..], upload, &settings(), Arc::default())
            .await
            .unwrap();
        let summary = staged.summary.clone();
        staged.commit().await.unwrap();
        assert!(
            summary.parts > 1,
            "expected several parts, got {}",
            summary.parts
        );
        assert_eq!(summary.digest.raw_bytes, data.len() as u64);
        assert_eq!(summary.digest.raw_sha256, Sha256Digest::of(&data));
        // Incompressible: stored in raw frames, a few bytes of framing per 256 KiB chunk.
        assert_eq!(summary.choice.compressed_raw, 0, "{:?}", summary.choice);
        assert!(
            summary.digest.stored_bytes - summary.digest.raw_bytes
                <= summary.digest.raw_bytes / 10_000,
            "{} stored for {} raw",
            summary.digest.stored_bytes,
            summary.digest.raw_bytes
        );

        let out = read_back(&store, "a/obj.zst", &summary).await;
        assert!(out == data, "restored bytes differ");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_half_compressible_round_trips_through_the_store_and_the_bounded_decoder() {
        let (_dir, store) = store().await;
        // Incompressible bytes, then a dump-like stretch, then zeros: raw frames and zstd frames
        // in one object, read back the way restores, verify and drills read it.
        let mut data = payload();
        let mut i = 0u64;
        while data.len() < 48 * MIB {
            data.extend_from_slice(format!("{i}\tcustomer {}\tactive\n", i % 613).as_bytes());
            i += 1;
        }
        data.extend(vec![0u8; 8 * MIB]);
        let upload = store.start_upload("a/mixed.zst").await.unwrap();
        let mut settings = settings();
        settings.compression_threads = 1;
        let staged = super::upload(&data[..], upload, &settings, Arc::default())
            .await
            .unwrap();
        let summary = staged.summary.clone();
        staged.commit().await.unwrap();
        assert!(
            summary.choice.stored_raw >= (20 * MIB) as u64
                && summary.choice.compressed_raw >= (24 * MIB) as u64,
            "{:?}",
            summary.choice
        );
        assert!(
            summary.digest.stored_bytes < (24 * MIB + 8 * MIB) as u64,
            "{} stored bytes",
            summary.digest.stored_bytes
        );
        let out = read_back(&store, "a/mixed.zst", &summary).await;
        assert!(out == data, "restored bytes differ");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_store_stops_the_pipeline_and_leaves_nothing() {
        let (_dir, store) = store().await;
        let store: Arc<dyn Store> = Arc::new(store);
        // The third part fails, like a store that goes away mid-backup.
        let faulty =
            Faulty::new(store.clone()).inject(Op::PutPart, 3, Fault::Fail { retryable: true });
        let data = payload();
        let upload = faulty.start_upload("a/obj.zst").await.unwrap();
        let result = tokio::time::timeout(
            Duration::from_secs(60),
            super::upload(&data[..], upload, &settings(), Arc::default()),
        )
        .await
        .expect("the pipeline must stop, not hang, when the store fails");
        let err = result.unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert!(
            store.list("").await.unwrap().is_empty(),
            "no object may appear"
        );
        assert!(
            store.list_uploads("").await.unwrap().is_empty(),
            "the upload must be aborted"
        );
        assert_eq!(faulty.calls(Op::Abort), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abort_that_fails_too_leaves_an_upload_the_sweep_finds_and_no_object() {
        let (_dir, store) = store().await;
        let store: Arc<dyn Store> = Arc::new(store);
        let faulty = Faulty::new(store.clone())
            .inject(Op::PutPart, 2, Fault::Fail { retryable: false })
            .inject(Op::Abort, 1, Fault::Fail { retryable: true });
        let data = payload();
        let upload = faulty.start_upload("a/obj.zst").await.unwrap();
        let err = super::upload(&data[..], upload, &settings(), Arc::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert!(
            store.list("").await.unwrap().is_empty(),
            "no object may appear"
        );
        // What the start-up sweep sees, and can remove.
        let pending = store.list_uploads("").await.unwrap();
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert_eq!(pending[0].key, "a/obj.zst");
        store.abort_upload(&pending[0]).await.unwrap();
        assert!(store.list_uploads("").await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_download_cut_mid_object_fails_and_is_never_taken_for_the_whole() {
        let (dir, store) = store().await;
        let data = payload();
        let (digest, _) = stored(&store, dir.path()).await;
        let expected = digest.expected();
        let store: Arc<dyn Store> = Arc::new(store);
        // Cut at every size from the first byte to just short of the end.
        let stored = store.head("a/obj.zst").await.unwrap().unwrap().size as usize;
        for cut in [0, 1, MIB, stored - 1] {
            let faulty = Faulty::new(store.clone()).inject(Op::Get, 1, Fault::CutAfter(cut));
            let mut out = Vec::new();
            let err = download(
                &faulty,
                "a/obj.zst",
                &expected,
                &mut out,
                MIB,
                Arc::default(),
            )
            .await
            .unwrap_err();
            assert!(
                err.to_string().contains("injected failure"),
                "cut at {cut}: {err}"
            );
            assert!(
                out.len() < data.len(),
                "cut at {cut}: everything was written"
            );
        }
    }

    async fn stored(store: &LocalStore, dir: &std::path::Path) -> (Digest256, std::path::PathBuf) {
        let data = payload();
        let upload = store.start_upload("a/obj.zst").await.unwrap();
        let staged = super::upload(&data[..], upload, &settings(), Arc::default())
            .await
            .unwrap();
        let digest = staged.summary.digest.clone();
        staged.commit().await.unwrap();
        (digest, dir.join("a/obj.zst"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flipped_byte_is_refused_and_the_tail_is_never_released() {
        let (dir, store) = store().await;
        let (digest, path) = stored(&store, dir.path()).await;
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();

        let mut out = Vec::new();
        let err = download(
            &store,
            "a/obj.zst",
            &digest.expected(),
            &mut out,
            MIB,
            Arc::default(),
        )
        .await
        .unwrap_err();
        assert!(err.is_data_loss(), "{err}");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert!(
            (out.len() as u64) + (MIB as u64) <= digest.raw_bytes,
            "the consumer must never see the end of a bad stream ({} of {} bytes released)",
            out.len(),
            digest.raw_bytes
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_truncated_object_is_refused() {
        let (dir, store) = store().await;
        let (digest, path) = stored(&store, dir.path()).await;
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();

        let mut out = Vec::new();
        let err = download(
            &store,
            "a/obj.zst",
            &digest.expected(),
            &mut out,
            MIB,
            Arc::default(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, PipelineError::SizeMismatch { what: "stored", .. }),
            "{err}"
        );
        assert!((out.len() as u64) < digest.raw_bytes);
    }

    #[test]
    fn part_sizes_let_five_tebibytes_fit_in_ten_thousand_parts() {
        // The default (8 MiB) and a larger base alike.
        for base in [8 * 1024 * 1024, 16 * 1024 * 1024] {
            assert_eq!(part_size_for(base, 0), base);
            assert_eq!(part_size_for(base, 999), base);
            assert_eq!(part_size_for(base, 1000), 2 * base);
            let total: u128 = (0..crate::store::MAX_PARTS)
                .map(|i| part_size_for(base, i) as u128)
                .sum();
            assert!(total >= 5u128 << 40, "10 000 parts hold only {total} bytes");
            assert!((0..20_000).all(|i| part_size_for(base, i) <= MAX_PART_SIZE));
        }
        // A part size below S3's minimum is raised to it.
        assert_eq!(part_size_for(1024, 0), MIN_PART_SIZE);
    }
}
