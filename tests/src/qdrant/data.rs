//! A collection's bytes, the double's snapshot archive layout, and fingerprints.
//!
//! Synthetic data is an AES-128-GCM keystream (ring, whose AES core is assembly and so runs at
//! GB/s even in debug builds): 1 MiB block `i` is the encryption of zeros under the key
//! `sha256("soma-qdrant-double/v1" ‖ seed)[..16]` with nonce `i`. It is incompressible, like
//! real float vectors, deterministic, and generated block by block with one fixed buffer.
//!
//! Archive layout (a real tar, GNU headers so sizes above 8 GiB work). A collection snapshot
//! follows the shape of Qdrant's `Collection::create_snapshot` (lib/collection/src/collection/
//! snapshots.rs): the shard directory `0/` first, then `version.info`, `config.json`,
//! `payload_index.json`. A streamed shard snapshot is the content of one shard directory, as
//! `ShardHolder::stream_shard_snapshot` produces. Inside a shard the double stores
//! `shard_config.json`, `segments/segment.json` (vector params and point count) and
//! `segments/data.bin` (the bytes), in that order, so one pass over an archive yields the
//! fingerprint.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Bytes produced per keystream block.
const GEN_BLOCK: usize = 1 << 20;
/// Buffer for copying data between readers and writers.
const COPY_BUF: usize = 256 << 10;
/// JSON members of an archive are read into memory; anything bigger is not ours.
const MAX_JSON: u64 = 1 << 20;
/// Distance every collection of the double uses.
pub(crate) const DISTANCE: &str = "Cosine";

static ZEROS: [u8; GEN_BLOCK] = [0u8; GEN_BLOCK];

/// Vector parameters and size of a collection's single shard: everything the fingerprint
/// covers besides the bytes themselves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SegmentMeta {
    pub vector_size: u64,
    pub distance: String,
    pub points_count: u64,
}

impl SegmentMeta {
    /// What precedes the data in the fingerprint hash; independent of the collection name.
    fn fingerprint_header(&self, data_len: u64) -> String {
        format!(
            "qdrant-double-fingerprint-v1 vectors={}/{} points={} bytes={data_len}\n",
            self.vector_size, self.distance, self.points_count
        )
    }

    /// The collection `config` object, shaped like Qdrant's `CollectionConfig` (OpenAPI schema
    /// `CollectionConfig`), with Qdrant 1.18's defaults for everything the double does not vary.
    pub(crate) fn collection_config(&self) -> Value {
        json!({
            "params": {
                "vectors": {"size": self.vector_size, "distance": self.distance},
                "shard_number": 1,
                "replication_factor": 1,
                "write_consistency_factor": 1,
                "on_disk_payload": true
            },
            "hnsw_config": {
                "m": 16,
                "ef_construct": 100,
                "full_scan_threshold": 10000,
                "max_indexing_threads": 0,
                "on_disk": false
            },
            "optimizer_config": {
                "deleted_threshold": 0.2,
                "vacuum_min_vector_number": 1000,
                "default_segment_number": 0,
                "max_segment_size": null,
                "memmap_threshold": null,
                "indexing_threshold": 10000,
                "flush_interval_sec": 5,
                "max_optimization_threads": null
            },
            "wal_config": {"wal_capacity_mb": 32, "wal_segments_ahead": 0, "wal_retain_closed": 1},
            "quantization_config": null,
            "strict_mode_config": {"enabled": false}
        })
    }
}

/// A file under the double's storage directory holding a recovered collection's bytes; deleted
/// when the last collection or reader referring to it lets go.
#[derive(Debug)]
pub(crate) struct StoredFile {
    pub path: PathBuf,
}

impl Drop for StoredFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where a collection's bytes come from.
#[derive(Clone, Debug)]
pub(crate) enum DataSource {
    /// Generated on the fly from a seed.
    Synthetic { seed: u64, len: u64 },
    /// Recovered from a snapshot into a file on the double's disk.
    Stored { file: Arc<StoredFile>, len: u64 },
}

impl DataSource {
    pub(crate) fn len(&self) -> u64 {
        match self {
            DataSource::Synthetic { len, .. } | DataSource::Stored { len, .. } => *len,
        }
    }

    /// A reader over the whole data, from the start.
    pub(crate) fn open(&self) -> io::Result<Box<dyn Read + Send>> {
        match self {
            DataSource::Synthetic { seed, len } => Ok(Box::new(SyntheticReader::new(*seed, *len))),
            DataSource::Stored { file, len } => Ok(Box::new(StoredReader {
                _keep: file.clone(),
                file: File::open(&file.path)?.take(*len),
            })),
        }
    }
}

struct StoredReader {
    _keep: Arc<StoredFile>,
    file: io::Take<File>,
}

impl Read for StoredReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

/// The keystream described in the module docs, `len` bytes of it.
struct SyntheticReader {
    key: LessSafeKey,
    block: Vec<u8>,
    next_block: u64,
    pos: usize,
    remaining: u64,
}

impl SyntheticReader {
    fn new(seed: u64, len: u64) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"soma-qdrant-double/v1");
        hasher.update(seed.to_le_bytes());
        let digest = hasher.finalize();
        let key = UnboundKey::new(&AES_128_GCM, &digest[..16]).expect("AES-128 key is 16 bytes");
        SyntheticReader {
            key: LessSafeKey::new(key),
            block: vec![0u8; GEN_BLOCK],
            next_block: 0,
            pos: GEN_BLOCK,
            remaining: len,
        }
    }

    fn refill(&mut self) {
        self.block.copy_from_slice(&ZEROS);
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.next_block.to_le_bytes());
        // The tag is not part of the keystream.
        let _tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut self.block,
            )
            .expect("AES-GCM over 1 MiB cannot fail");
        self.next_block += 1;
        self.pos = 0;
    }
}

impl Read for SyntheticReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        if self.pos == GEN_BLOCK {
            self.refill();
        }
        let n = buf
            .len()
            .min(GEN_BLOCK - self.pos)
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// sha256 over the fingerprint header and the data.
pub(crate) fn fingerprint(meta: &SegmentMeta, data: &DataSource) -> io::Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(meta.fingerprint_header(data.len()));
    copy_with(&mut data.open()?, |chunk| {
        hasher.update(chunk);
        Ok(())
    })?;
    Ok(hex::encode(hasher.finalize()))
}

/// Copies `reader` to `sink` chunk by chunk with one fixed buffer; returns the byte count.
fn copy_with(
    reader: &mut dyn Read,
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sink(&buf[..n])?;
        total += n as u64;
    }
}

/// A writer that hashes what passes through it.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// The inner writer and the hex sha256 of everything written.
    pub(crate) fn finish(self) -> (W, String) {
        (self.inner, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    header.set_entry_type(tar::EntryType::Regular);
    header
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, bytes: &[u8]) -> io::Result<()> {
    let mut header = header(bytes.len() as u64);
    tar.append_data(&mut header, path, bytes)
}

/// Appends one shard's files under `prefix` ("" for a shard snapshot, "0/" inside a collection
/// snapshot).
fn append_shard<W: Write>(
    tar: &mut tar::Builder<W>,
    prefix: &str,
    meta: &SegmentMeta,
    data: &DataSource,
) -> io::Result<()> {
    append_bytes(
        tar,
        &format!("{prefix}shard_config.json"),
        br#"{"type":"Local"}"#,
    )?;
    let segment = serde_json::to_vec(meta).map_err(io::Error::other)?;
    append_bytes(tar, &format!("{prefix}segments/segment.json"), &segment)?;
    let mut header = header(data.len());
    tar.append_data(
        &mut header,
        format!("{prefix}segments/data.bin"),
        data.open()?,
    )
}

/// Writes a collection snapshot archive to `out`.
pub(crate) fn write_collection_snapshot<W: Write>(
    out: W,
    meta: &SegmentMeta,
    data: &DataSource,
    version: &str,
) -> io::Result<W> {
    let mut tar = tar::Builder::new(out);
    append_shard(&mut tar, "0/", meta, data)?;
    append_bytes(&mut tar, "version.info", version.as_bytes())?;
    let config = serde_json::to_vec_pretty(&meta.collection_config()).map_err(io::Error::other)?;
    append_bytes(&mut tar, "config.json", &config)?;
    append_bytes(&mut tar, "payload_index.json", br#"{"schema":{}}"#)?;
    tar.into_inner()
}

/// Writes a shard snapshot archive (what the streaming endpoint sends) to `out`.
pub(crate) fn write_shard_snapshot<W: Write>(
    out: W,
    meta: &SegmentMeta,
    data: &DataSource,
) -> io::Result<W> {
    let mut tar = tar::Builder::new(out);
    append_shard(&mut tar, "", meta, data)?;
    tar.into_inner()
}

/// Writes a full storage snapshot: each collection snapshot file under its own name, then
/// `config.json` mapping collections to those names and listing aliases, as
/// `_do_create_full_snapshot` (lib/storage/src/content_manager/snapshots/mod.rs) does.
pub(crate) fn write_full_snapshot<W: Write>(
    out: W,
    collection_snapshots: &[(String, PathBuf)],
    aliases: &BTreeMap<String, String>,
) -> io::Result<W> {
    let mut tar = tar::Builder::new(out);
    let mut mapping = serde_json::Map::new();
    for (collection, path) in collection_snapshots {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::other("snapshot path without a file name"))?;
        let mut file = File::open(path)?;
        let mut header = header(file.metadata()?.len());
        tar.append_data(&mut header, name, &mut file)?;
        mapping.insert(collection.clone(), Value::String(name.to_string()));
    }
    let config = json!({"collections_mapping": mapping, "collections_aliases": aliases});
    let config = serde_json::to_vec_pretty(&config).map_err(io::Error::other)?;
    append_bytes(&mut tar, "config.json", &config)?;
    tar.into_inner()
}

/// Which kind of archive to expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ArchiveKind {
    /// `0/...` plus `config.json`.
    Collection,
    /// The shard's files at the root.
    Shard,
}

/// What one pass over a snapshot archive found.
#[derive(Debug)]
pub(crate) struct Unpacked {
    pub meta: SegmentMeta,
    /// Vector params from `config.json` (collection snapshots only).
    pub config_vectors: Option<Value>,
    pub data_len: u64,
    pub fingerprint: String,
}

/// Reads a snapshot archive in one pass. The data is hashed, and written to `data_out` when
/// given. Fails with `InvalidData` when the archive is not one the double wrote.
pub(crate) fn unpack(
    src: impl Read,
    kind: ArchiveKind,
    mut data_out: Option<&mut dyn Write>,
) -> io::Result<Unpacked> {
    let prefix = match kind {
        ArchiveKind::Collection => "0/",
        ArchiveKind::Shard => "",
    };
    let segment_path = format!("{prefix}segments/segment.json");
    let data_path = format!("{prefix}segments/data.bin");
    let mut archive = tar::Archive::new(src);
    let mut meta: Option<SegmentMeta> = None;
    let mut config_vectors = None;
    let mut data: Option<(u64, String)> = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        if path == segment_path {
            meta = Some(serde_json::from_slice(&read_small(&mut entry)?).map_err(invalid)?);
        } else if path == data_path {
            let meta = meta.as_ref().ok_or_else(|| {
                invalid(format!(
                    "{data_path} comes before {segment_path} in the archive"
                ))
            })?;
            let mut hasher = Sha256::new();
            hasher.update(meta.fingerprint_header(entry.size()));
            let len = copy_with(&mut entry, |chunk| {
                hasher.update(chunk);
                match data_out.as_mut() {
                    Some(out) => out.write_all(chunk),
                    None => Ok(()),
                }
            })?;
            data = Some((len, hex::encode(hasher.finalize())));
        } else if kind == ArchiveKind::Collection && path == "config.json" {
            let config: Value =
                serde_json::from_slice(&read_small(&mut entry)?).map_err(invalid)?;
            config_vectors = Some(config["params"]["vectors"].clone());
        }
    }
    let meta = meta.ok_or_else(|| invalid(format!("no {segment_path} in the archive")))?;
    let (data_len, fingerprint) =
        data.ok_or_else(|| invalid(format!("no {data_path} in the archive")))?;
    if kind == ArchiveKind::Collection && config_vectors.is_none() {
        return Err(invalid("no config.json in the archive"));
    }
    if let Some(out) = data_out {
        out.flush()?;
    }
    Ok(Unpacked {
        meta,
        config_vectors,
        data_len,
        fingerprint,
    })
}

/// Fingerprints of every collection snapshot inside a full storage snapshot.
pub(crate) fn full_snapshot_fingerprints(src: impl Read) -> io::Result<BTreeMap<String, String>> {
    let mut archive = tar::Archive::new(src);
    let mut by_file = BTreeMap::new();
    let mut mapping: Option<BTreeMap<String, String>> = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        if path == "config.json" {
            let config: Value =
                serde_json::from_slice(&read_small(&mut entry)?).map_err(invalid)?;
            let map = config["collections_mapping"]
                .as_object()
                .ok_or_else(|| invalid("config.json has no collections_mapping"))?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            mapping = Some(map);
        } else if path.ends_with(".snapshot") {
            let unpacked = unpack(&mut entry, ArchiveKind::Collection, None)?;
            by_file.insert(path, unpacked.fingerprint);
        }
    }
    let mapping = mapping.ok_or_else(|| invalid("no config.json in the full snapshot"))?;
    mapping
        .into_iter()
        .map(|(collection, file)| {
            let fingerprint = by_file
                .get(&file)
                .cloned()
                .ok_or_else(|| invalid(format!("{file} is mapped but not in the archive")))?;
            Ok((collection, fingerprint))
        })
        .collect()
}

fn read_small(entry: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    entry.take(MAX_JSON + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_JSON {
        return Err(invalid("JSON member larger than 1 MiB"));
    }
    Ok(out)
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Writes the data of an archive into a new file at `path`, returning what was unpacked; the
/// file is removed again on failure.
pub(crate) fn unpack_to_file(src: &Path, kind: ArchiveKind, path: &Path) -> io::Result<Unpacked> {
    let result = (|| {
        let mut out = BufWriter::with_capacity(COPY_BUF, File::create(path)?);
        let unpacked = unpack(
            io::BufReader::with_capacity(COPY_BUF, File::open(src)?),
            kind,
            Some(&mut out),
        )?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(unpacked)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_data_is_deterministic_and_seeded() {
        let read = |seed, len| {
            let mut out = Vec::new();
            DataSource::Synthetic { seed, len }
                .open()
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            out
        };
        let a = read(1, 3 * GEN_BLOCK as u64 + 17);
        assert_eq!(a.len(), 3 * GEN_BLOCK + 17);
        assert_eq!(a, read(1, 3 * GEN_BLOCK as u64 + 17));
        assert_ne!(a[..64], read(2, 64)[..]);
        assert_ne!(a[..64], a[GEN_BLOCK..GEN_BLOCK + 64]);
    }
}
