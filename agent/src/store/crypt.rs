//! Encryption at rest: every object this agent writes — dumps, base backups, WAL, Qdrant
//! snapshots, manifests and every record beside them — is encrypted and authenticated here, and
//! only here, so no code path can write or read plaintext by forgetting to.
//!
//! Why at the store seam: anyone who can write to the bucket could otherwise forge a backup that
//! passes every check, because the digests sit next to the data. With a key, an object is accepted
//! only if it was sealed with that key *for that very object key*, so a flipped byte, a truncated
//! object, an object swapped in from another backup or another WAL segment, and a manifest with
//! any field edited (or rewritten with digests recomputed to match forged data) all fail
//! authentication before their bytes are handed on.
//!
//! Format of one object (all sizes in bytes):
//!
//! ```text
//! header  "SOMAENC1" | key fingerprint (8) | wrap nonce (12) | wrapped data key (32 + 16) | stream nonce (7)
//! body    chunks of 64 KiB + 16 (tag), the last one shorter (0..64 KiB of data + 16)
//! ```
//!
//! Each object gets a fresh random 256-bit data key (so every backup, and every object in it, has
//! its own), wrapped with AES-256-GCM by the configured key; the wrap's associated data is the
//! magic, the fingerprint and the object key, which binds the object to its name. The body is
//! the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár; `aead::stream::StreamBE32` from
//! RustCrypto) over AES-256-GCM with the data key: every chunk is authenticated on its own, in
//! order, and the last one carries a flag, so a reordered, dropped or truncated chunk fails. The
//! whole header is each chunk's associated data. Memory stays bounded: one chunk at a time on the
//! way back, one part at a time on the way out, nothing staged.
//!
//! Rotation: several keys may be configured; the first encrypts, every one decrypts, picked by
//! the fingerprint in the header. A 96-bit random wrap nonce per object stays safe for far more
//! objects than a store ever holds under one key (2^32).

use std::{fmt, path::Path, sync::Arc};

use aead::{
    AeadInPlace, Buffer, KeyInit,
    generic_array::GenericArray,
    stream::{DecryptorBE32, EncryptorBE32},
};
use aes_gcm::Aes256Gcm;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{
    ByteStream, MIN_PART_SIZE, ObjectMeta, PartReceipt, PartUpload, PendingUpload, Result, Store,
    StoreError, TimedObject, Upload,
};

/// First bytes of every encrypted object.
pub const MAGIC: &[u8; 8] = b"SOMAENC1";
/// Plaintext bytes per STREAM chunk.
pub const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
const FINGERPRINT: usize = 8;
const WRAP_NONCE: usize = 12;
const WRAPPED_KEY: usize = 32 + TAG;
const STREAM_NONCE: usize = 7;
/// Size of the header in front of every encrypted object.
pub const HEADER: usize = MAGIC.len() + FINGERPRINT + WRAP_NONCE + WRAPPED_KEY + STREAM_NONCE;
const SEALED_CHUNK: usize = CHUNK + TAG;

/// The name of the algorithm, as manifests and `status` report it.
pub const ALGORITHM: &str = "aes-256-gcm-stream-be32";

/// A key that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("--encryption-key-file {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold a 32-byte key.
    #[error(
        "--encryption-key-file {}: {why}; a key file holds 32 random bytes, raw or as 64 hex or 44 base64 characters, e.g. `head -c 32 /dev/urandom > key`",
        path.display()
    )]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it (never its contents).
        why: String,
    },
    /// The same key was given twice.
    #[error("--encryption-key-file {}: the same key (fingerprint {fingerprint}) is given twice", path.display())]
    Duplicate {
        /// The second file.
        path: std::path::PathBuf,
        /// The key's fingerprint.
        fingerprint: String,
    },
}

/// One key: its cipher and its fingerprint. Never printed, never serialised; `Debug` shows only
/// the fingerprint.
#[derive(Clone)]
pub struct Key {
    fingerprint: [u8; FINGERPRINT],
    cipher: Aes256Gcm,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.fingerprint())
    }
}

impl Key {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self {
            fingerprint: fingerprint_of(bytes),
            cipher: Aes256Gcm::new(GenericArray::from_slice(bytes)),
        }
    }

    /// Reads a key file: 32 raw bytes, or 64 hex characters, or base64 of 32 bytes (surrounding
    /// white space ignored in the text forms).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let data = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let format = |why: String| KeyError::Format {
            path: path.to_path_buf(),
            why,
        };
        let bytes: [u8; 32] = if data.len() == 32 {
            data.as_slice().try_into().expect("length checked")
        } else {
            let text = std::str::from_utf8(&data)
                .map_err(|_| {
                    format(format!(
                        "{} bytes that are neither 32 raw bytes nor text",
                        data.len()
                    ))
                })?
                .trim();
            let decoded = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
                hex::decode(text).map_err(|e| format(format!("bad hex: {e}")))?
            } else {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|_| {
                        format(format!(
                            "{} characters that are neither 64 hex digits nor base64",
                            text.len()
                        ))
                    })?
            };
            decoded.as_slice().try_into().map_err(|_| {
                format(format!(
                    "the text decodes to {} bytes, not 32",
                    decoded.len()
                ))
            })?
        };
        if bytes.iter().all(|&b| b == bytes[0]) {
            return Err(format("every byte is the same: not a random key".into()));
        }
        Ok(Self::from_bytes(&bytes))
    }

    /// The key's fingerprint: 16 hex characters, safe to print and to record in manifests.
    pub fn fingerprint(&self) -> String {
        hex::encode(self.fingerprint)
    }
}

/// A fingerprint says which key an object needs without saying anything about the key.
fn fingerprint_of(key: &[u8; 32]) -> [u8; FINGERPRINT] {
    let mut h = Sha256::new();
    h.update(b"soma-backup key fingerprint v1\0");
    h.update(key);
    h.finalize()[..FINGERPRINT]
        .try_into()
        .expect("sha256 is longer")
}

/// The keys an agent has: the first encrypts, every one decrypts.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<Key>,
    /// The files the keys came from, in order: what a restore_command passes on to `wal-fetch`.
    files: Vec<std::path::PathBuf>,
}

impl Keyring {
    /// The keys of `--encryption-key-file`, in order; `None` when none is given.
    pub fn from_files(paths: &[std::path::PathBuf]) -> Result<Option<Self>, KeyError> {
        let mut keys: Vec<Key> = Vec::new();
        for path in paths {
            let key = Key::from_file(path)?;
            if keys.iter().any(|k| k.fingerprint == key.fingerprint) {
                return Err(KeyError::Duplicate {
                    path: path.clone(),
                    fingerprint: key.fingerprint(),
                });
            }
            keys.push(key);
        }
        Ok((!keys.is_empty()).then_some(Self {
            keys,
            files: paths.to_vec(),
        }))
    }

    /// A keyring of these keys (the first encrypts), read from no file.
    pub fn new(keys: Vec<Key>) -> Option<Self> {
        (!keys.is_empty()).then_some(Self {
            keys,
            files: Vec::new(),
        })
    }

    /// The key new objects are sealed with.
    pub fn current(&self) -> &Key {
        &self.keys[0]
    }

    /// Every key's fingerprint, the encrypting one first.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(Key::fingerprint).collect()
    }

    fn find(&self, fingerprint: &[u8]) -> Option<&Key> {
        self.keys.iter().find(|k| k.fingerprint == fingerprint)
    }
}

/// What a store does with encryption, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encryption {
    /// Objects are written and read as they are.
    Off,
    /// Objects are encrypted with the first key; `fingerprints` lists all.
    On {
        /// Fingerprints of the keys, the encrypting one first.
        fingerprints: Vec<String>,
        /// Whether unencrypted objects are still read (`--accept-unencrypted`).
        accept_unencrypted: bool,
        /// The key files, for a `wal-fetch` started by PostgreSQL to read the same store.
        key_files: Vec<std::path::PathBuf>,
    },
}

impl fmt::Display for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Encryption::Off => f.write_str("off"),
            Encryption::On {
                fingerprints,
                accept_unencrypted,
                ..
            } => {
                write!(f, "{ALGORITHM}, key {}", fingerprints[0])?;
                if fingerprints.len() > 1 {
                    write!(f, " (also decrypts {})", fingerprints[1..].join(", "))?;
                }
                if *accept_unencrypted {
                    f.write_str("; unencrypted objects accepted")?;
                }
                Ok(())
            }
        }
    }
}

/// The store seen through encryption: wraps every store the agent opens. Without a keyring it
/// writes plaintext and refuses to hand out an encrypted object as if it were plaintext; with
/// one it seals every write and opens every read, refusing plaintext unless told otherwise.
#[derive(Debug, Clone)]
pub struct Crypt {
    inner: Arc<dyn Store>,
    keyring: Option<Arc<Keyring>>,
    accept_unencrypted: bool,
}

impl Crypt {
    /// `inner` through `keyring` (none: plaintext). `accept_unencrypted` lets a keyed agent still
    /// read objects written before encryption was turned on.
    pub fn new(inner: Arc<dyn Store>, keyring: Option<Keyring>, accept_unencrypted: bool) -> Self {
        Self {
            inner,
            keyring: keyring.map(Arc::new),
            accept_unencrypted,
        }
    }

    /// What this store does with encryption.
    pub fn encryption(&self) -> Encryption {
        match &self.keyring {
            None => Encryption::Off,
            Some(k) => Encryption::On {
                fingerprints: k.fingerprints(),
                accept_unencrypted: self.accept_unencrypted,
                key_files: k.files.clone(),
            },
        }
    }

    fn plaintext_size(&self, stored: u64) -> u64 {
        match &self.keyring {
            Some(_) => plaintext_len(stored).unwrap_or(stored),
            None => stored,
        }
    }
}

/// The plaintext size of a well-formed encrypted object of `stored` bytes.
pub fn plaintext_len(stored: u64) -> Option<u64> {
    let body = stored.checked_sub(HEADER as u64)?;
    let full = body / SEALED_CHUNK as u64;
    let last = body % SEALED_CHUNK as u64;
    let last_data = last.checked_sub(TAG as u64)?;
    Some(full * CHUNK as u64 + last_data)
}

/// The stored size of `plain` bytes, encrypted.
pub fn sealed_len(plain: u64) -> u64 {
    HEADER as u64 + plain / CHUNK as u64 * SEALED_CHUNK as u64 + plain % CHUNK as u64 + TAG as u64
}

fn tampered(key: &str, why: &str) -> StoreError {
    StoreError::Tampered {
        key: key.to_string(),
        reason: why.to_string(),
    }
}

/// A fresh header for object `key`, and the encryptor of its body.
fn seal_header(k: &Key, key: &str) -> Result<(Vec<u8>, EncryptorBE32<Aes256Gcm>)> {
    let mut rng = rand::rng();
    let mut data_key = [0u8; 32];
    rng.fill_bytes(&mut data_key);
    let mut wrap_nonce = [0u8; WRAP_NONCE];
    rng.fill_bytes(&mut wrap_nonce);
    let mut stream_nonce = [0u8; STREAM_NONCE];
    rng.fill_bytes(&mut stream_nonce);

    let mut header = Vec::with_capacity(HEADER);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&k.fingerprint);
    header.extend_from_slice(&wrap_nonce);
    let mut wrapped = data_key.to_vec();
    k.cipher
        .encrypt_in_place(
            GenericArray::from_slice(&wrap_nonce),
            &wrap_aad(&k.fingerprint, key),
            &mut wrapped,
        )
        .map_err(|_| tampered(key, "sealing the data key failed"))?;
    header.extend_from_slice(&wrapped);
    header.extend_from_slice(&stream_nonce);
    debug_assert_eq!(header.len(), HEADER);
    let body = Aes256Gcm::new(GenericArray::from_slice(&data_key));
    let enc = EncryptorBE32::from_aead(body, GenericArray::from_slice(&stream_nonce));
    Ok((header, enc))
}

fn wrap_aad(fingerprint: &[u8], key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(MAGIC.len() + FINGERPRINT + key.len());
    aad.extend_from_slice(MAGIC);
    aad.extend_from_slice(fingerprint);
    aad.extend_from_slice(key.as_bytes());
    aad
}

/// Opens a header read from object `key`, returning the decryptor of its body.
fn open_header(keyring: &Keyring, header: &[u8], key: &str) -> Result<DecryptorBE32<Aes256Gcm>> {
    let fp = &header[MAGIC.len()..MAGIC.len() + FINGERPRINT];
    let Some(k) = keyring.find(fp) else {
        return Err(StoreError::WrongKey {
            key: key.to_string(),
            needed: hex::encode(fp),
            have: keyring.fingerprints().join(", "),
        });
    };
    let at = MAGIC.len() + FINGERPRINT;
    let wrap_nonce = &header[at..at + WRAP_NONCE];
    let mut data_key = header[at + WRAP_NONCE..at + WRAP_NONCE + WRAPPED_KEY].to_vec();
    k.cipher
        .decrypt_in_place(
            GenericArray::from_slice(wrap_nonce),
            &wrap_aad(fp, key),
            &mut data_key,
        )
        .map_err(|_| {
            tampered(
                key,
                "its header does not authenticate under the key it names (altered, forged, or moved here from another object)",
            )
        })?;
    let stream_nonce = &header[HEADER - STREAM_NONCE..];
    let body = Aes256Gcm::new(GenericArray::from_slice(&data_key));
    Ok(DecryptorBE32::from_aead(
        body,
        GenericArray::from_slice(stream_nonce),
    ))
}

/// A window of a larger buffer that AEAD in-place operations may grow by a tag.
struct Window<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl AsRef<[u8]> for Window<'_> {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsMut<[u8]> for Window<'_> {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Buffer for Window<'_> {
    fn extend_from_slice(&mut self, other: &[u8]) -> aead::Result<()> {
        let end = self.len + other.len();
        if end > self.buf.len() {
            return Err(aead::Error);
        }
        self.buf[self.len..end].copy_from_slice(other);
        self.len = end;
        Ok(())
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// Sealed bytes in an anonymous mapping of their own, for the same reason as the pipeline's part
/// buffers: part-sized heap blocks stay with glibc's arenas after they are freed.
struct Sealed {
    map: memmap2::MmapMut,
    len: usize,
}

impl AsRef<[u8]> for Sealed {
    fn as_ref(&self) -> &[u8] {
        &self.map[..self.len]
    }
}

/// Seals `plain` into `out` from `at` as full chunks and, when `last`, the final chunk (always
/// shorter than [`CHUNK`], maybe empty), returning where the written bytes end. Without `last`,
/// `plain` must be whole chunks.
fn seal_chunks(
    enc: &mut Option<EncryptorBE32<Aes256Gcm>>,
    header: &[u8],
    plain: &[u8],
    last: bool,
    out: &mut [u8],
    mut at: usize,
) -> aead::Result<usize> {
    let (full, tail) = plain.split_at(plain.len() / CHUNK * CHUNK);
    if !last && !tail.is_empty() {
        return Err(aead::Error);
    }
    for chunk in full.chunks(CHUNK) {
        out[at..at + chunk.len()].copy_from_slice(chunk);
        let mut w = Window {
            buf: &mut out[at..at + chunk.len() + TAG],
            len: chunk.len(),
        };
        enc.as_mut()
            .ok_or(aead::Error)?
            .encrypt_next_in_place(header, &mut w)?;
        at += w.len;
    }
    if last {
        out[at..at + tail.len()].copy_from_slice(tail);
        let mut w = Window {
            buf: &mut out[at..at + tail.len() + TAG],
            len: tail.len(),
        };
        enc.take()
            .ok_or(aead::Error)?
            .encrypt_last_in_place(header, &mut w)?;
        at += w.len;
    }
    Ok(at)
}

/// Seals a whole object in one go.
fn seal_all(k: &Key, key: &str, plain: &[u8]) -> Result<Bytes> {
    let (header, enc) = seal_header(k, key)?;
    let mut out = vec![0u8; sealed_len(plain.len() as u64) as usize];
    out[..HEADER].copy_from_slice(&header);
    let mut enc = Some(enc);
    let end = seal_chunks(&mut enc, &header, plain, true, &mut out, HEADER)
        .map_err(|_| tampered(key, "sealing failed"))?;
    out.truncate(end);
    Ok(Bytes::from(out))
}

#[async_trait]
impl Store for Crypt {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn encryption(&self) -> Encryption {
        Crypt::encryption(self)
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        match &self.keyring {
            None => self.inner.put(key, data).await,
            Some(k) => {
                let sealed = seal_all(k.current(), key, &data)?;
                self.inner.put(key, sealed).await
            }
        }
    }

    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>> {
        let upload = self.inner.start_upload(key).await?;
        match &self.keyring {
            None => Ok(upload),
            Some(k) => {
                let (header, enc) = seal_header(k.current(), key)?;
                Ok(Box::new(SealedUpload {
                    inner: upload,
                    key: key.to_string(),
                    header,
                    header_sent: false,
                    enc: Some(enc),
                    pending: Vec::new(),
                    finished: false,
                }))
            }
        }
    }

    async fn get(&self, key: &str) -> Result<ByteStream> {
        let stream = self.inner.get(key).await?;
        Ok(open_stream(
            stream,
            key.to_string(),
            self.keyring.clone(),
            self.accept_unencrypted,
        ))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        Ok(self.inner.head(key).await?.map(|mut m| {
            m.size = self.plaintext_size(m.size);
            m
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut all = self.inner.list(prefix).await?;
        for m in &mut all {
            m.size = self.plaintext_size(m.size);
        }
        Ok(all)
    }

    async fn list_timed(&self, prefix: &str) -> Result<Vec<TimedObject>> {
        let mut all = self.inner.list_timed(prefix).await?;
        for t in &mut all {
            t.meta.size = self.plaintext_size(t.meta.size);
        }
        Ok(all)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        self.inner.list_uploads(prefix).await
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<()> {
        self.inner.abort_upload(upload).await
    }
}

/// A multipart upload whose parts are sealed on their way in. Parts are sealed in the order they
/// are numbered, so the STREAM counter follows the object's byte order. A part shorter than
/// [`MIN_PART_SIZE`] is the last one (the store's rule), so its final chunk is sealed with it;
/// a last part of full size leaves the final chunk to `complete`, which stores it as one more,
/// small, last part.
struct SealedUpload {
    inner: Box<dyn Upload>,
    key: String,
    header: Vec<u8>,
    header_sent: bool,
    enc: Option<EncryptorBE32<Aes256Gcm>>,
    /// Plaintext not yet sealed: less than one chunk.
    pending: Vec<u8>,
    finished: bool,
}

impl SealedUpload {
    /// Seals what can be sealed of `data` after the pending bytes: whole chunks, and everything
    /// when `last`. The rest (less than a chunk) waits for the next part.
    fn seal_part(&mut self, data: &[u8], last: bool) -> aead::Result<Bytes> {
        let bound = HEADER + self.pending.len() + data.len() + (data.len() / CHUNK + 3) * TAG;
        let mut out = memmap2::MmapOptions::new()
            .len(bound)
            .map_anon()
            .map_err(|_| aead::Error)?;
        let mut at = 0;
        if !self.header_sent {
            out[..HEADER].copy_from_slice(&self.header);
            self.header_sent = true;
            at = HEADER;
        }
        let mut rest = data;
        if !self.pending.is_empty() {
            let n = (CHUNK - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.pending.len() == CHUNK || last {
                let final_here = last && rest.is_empty();
                at = seal_chunks(
                    &mut self.enc,
                    &self.header,
                    &self.pending,
                    final_here,
                    &mut out,
                    at,
                )?;
                self.pending.clear();
            }
        }
        if self.enc.is_some() {
            let whole = if last {
                rest.len()
            } else {
                rest.len() / CHUNK * CHUNK
            };
            if whole > 0 || last {
                at = seal_chunks(
                    &mut self.enc,
                    &self.header,
                    &rest[..whole],
                    last,
                    &mut out,
                    at,
                )?;
            }
            self.pending.extend_from_slice(&rest[whole..]);
        }
        self.finished = last;
        Ok(Bytes::from_owner(Sealed { map: out, len: at }))
    }
}

#[async_trait]
impl Upload for SealedUpload {
    fn put_part(&mut self, data: Bytes) -> PartUpload {
        if self.finished {
            return super::refused(StoreError::Request {
                key: self.key.clone(),
                message: "a part after the last one".into(),
                retryable: false,
            });
        }
        let last = data.len() < MIN_PART_SIZE;
        match self.seal_part(&data, last) {
            Ok(sealed) => self.inner.put_part(sealed),
            Err(_) => super::refused(tampered(&self.key, "sealing a part failed")),
        }
    }

    async fn complete(mut self: Box<Self>, mut parts: Vec<PartReceipt>) -> Result<ObjectMeta> {
        if !self.finished {
            let sealed = self
                .seal_part(&[], true)
                .map_err(|_| tampered(&self.key, "sealing the last chunk failed"))?;
            parts.push(self.inner.put_part(sealed).await?);
        }
        let mut meta = self.inner.complete(parts).await?;
        meta.size = plaintext_len(meta.size).unwrap_or(meta.size);
        Ok(meta)
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        self.inner.abort().await
    }
}

/// State of an object being read back.
struct Opening {
    inner: ByteStream,
    key: String,
    keyring: Option<Arc<Keyring>>,
    accept_unencrypted: bool,
    buf: BytesMut,
    /// Whether the first bytes were read (and, if sealed, the header opened).
    started: bool,
    /// The header: each chunk's associated data.
    aad: Vec<u8>,
    /// The body's decryptor, until the final chunk consumes it.
    dec: Option<DecryptorBE32<Aes256Gcm>>,
    /// Plaintext: pass the rest through as it comes.
    plain: bool,
    eof: bool,
    done: bool,
}

/// The bytes of object `key` as they were before sealing, each chunk released only once it is
/// authenticated; an error ends the stream.
fn open_stream(
    inner: ByteStream,
    key: String,
    keyring: Option<Arc<Keyring>>,
    accept_unencrypted: bool,
) -> ByteStream {
    let state = Opening {
        inner,
        key,
        keyring,
        accept_unencrypted,
        buf: BytesMut::new(),
        started: false,
        aad: Vec::new(),
        dec: None,
        plain: false,
        eof: false,
        done: false,
    };
    Box::pin(futures::stream::try_unfold(state, |mut s| async move {
        loop {
            if s.done {
                return Ok(None);
            }
            if s.plain {
                if !s.buf.is_empty() {
                    let out = s.buf.split().freeze();
                    return Ok(Some((out, s)));
                }
                // A stream that ended must not be polled again (the S3 body stream panics).
                if s.eof {
                    return Ok(None);
                }
                return match s.inner.next().await {
                    Some(chunk) => Ok(Some((chunk?, s))),
                    None => Ok(None),
                };
            }
            // Enough bytes to decide, or the end of the object.
            let need = if s.started { SEALED_CHUNK + 1 } else { HEADER };
            if s.buf.len() < need && !s.eof {
                // At most one sealed chunk plus what one read of the inner stream brought.
                match s.inner.next().await {
                    Some(chunk) => s.buf.extend_from_slice(&chunk?),
                    None => s.eof = true,
                }
                continue;
            }
            if !s.started {
                s.start()?;
                s.started = true;
                continue;
            }
            let Some(dec) = s.dec.as_mut() else {
                return Err(tampered(&s.key, "it goes on after its final chunk"));
            };
            if s.buf.len() > SEALED_CHUNK {
                let mut chunk = s.buf.split_to(SEALED_CHUNK);
                if dec.decrypt_next_in_place(&s.aad, &mut chunk).is_err() {
                    return Err(tampered(
                        &s.key,
                        "a chunk does not authenticate (altered, reordered or cut)",
                    ));
                }
                return Ok(Some((chunk.freeze(), s)));
            }
            // The end: what is left is the final chunk.
            if s.buf.len() < TAG {
                return Err(tampered(
                    &s.key,
                    "it ends before its final chunk (truncated)",
                ));
            }
            let mut chunk = s.buf.split();
            let dec = s.dec.take().expect("checked above");
            if dec.decrypt_last_in_place(&s.aad, &mut chunk).is_err() {
                return Err(tampered(
                    &s.key,
                    "its last chunk does not authenticate (truncated, extended or altered)",
                ));
            }
            s.done = true;
            return Ok(Some((chunk.freeze(), s)));
        }
    }))
}

impl Opening {
    /// Reads the first bytes: an encrypted object's header, or plaintext.
    fn start(&mut self) -> Result<()> {
        let sealed = self.buf.len() >= MAGIC.len() && &self.buf[..MAGIC.len()] == MAGIC;
        match (&self.keyring, sealed) {
            (Some(keyring), true) => {
                if self.buf.len() < HEADER {
                    return Err(tampered(&self.key, "it ends inside its header"));
                }
                let header = self.buf.split_to(HEADER).to_vec();
                self.dec = Some(open_header(keyring, &header, &self.key)?);
                self.aad = header;
                Ok(())
            }
            (None, true) => {
                let fp = self
                    .buf
                    .get(MAGIC.len()..MAGIC.len() + FINGERPRINT)
                    .map(hex::encode)
                    .unwrap_or_else(|| "(unreadable)".into());
                Err(StoreError::WrongKey {
                    key: self.key.clone(),
                    needed: fp,
                    have: "none".into(),
                })
            }
            (Some(_), false) if !self.accept_unencrypted => Err(StoreError::NotEncrypted {
                key: self.key.clone(),
            }),
            _ => {
                self.plain = true;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;

    fn key(n: u8) -> Key {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = n.wrapping_mul(31).wrapping_add(i as u8);
        }
        Key::from_bytes(&b)
    }

    async fn stores(keys: Vec<Key>) -> (tempfile::TempDir, Arc<dyn Store>, Crypt) {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path().into()).await.unwrap());
        let crypt = Crypt::new(raw.clone(), Keyring::new(keys), false);
        (dir, raw, crypt)
    }

    async fn read(store: &dyn Store, key: &str) -> Result<Vec<u8>> {
        let mut s = store.get(key).await?;
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn round_trips_objects_of_every_length_and_seals_them() {
        let (_d, raw, crypt) = stores(vec![key(1)]).await;
        for n in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            let k = format!("a/{n}");
            let plain = data(n);
            crypt.put(&k, Bytes::from(plain.clone())).await.unwrap();
            assert_eq!(read(&crypt, &k).await.unwrap(), plain, "length {n}");
            let stored = read(raw.as_ref(), &k).await.unwrap();
            assert_eq!(stored.len() as u64, sealed_len(n as u64));
            assert_eq!(&stored[..8], MAGIC);
            assert_eq!(plaintext_len(stored.len() as u64), Some(n as u64));
            assert_eq!(crypt.head(&k).await.unwrap().unwrap().size, n as u64);
        }
    }

    #[tokio::test]
    async fn multipart_uploads_round_trip_whatever_the_last_part() {
        let (_d, raw, crypt) = stores(vec![key(1)]).await;
        // Last part short; last part full-size (the final chunk becomes an extra part).
        for sizes in [
            vec![MIN_PART_SIZE, 1000],
            vec![MIN_PART_SIZE, MIN_PART_SIZE],
            vec![0],
        ] {
            let k = format!("m/{}", sizes.len() * 10 + sizes[sizes.len() - 1] % 7);
            let mut up = crypt.start_upload(&k).await.unwrap();
            let mut plain = Vec::new();
            let mut receipts = Vec::new();
            for (i, s) in sizes.iter().enumerate() {
                let part = data(*s + i);
                let part = if *s == 0 {
                    Vec::new()
                } else {
                    part[..*s].to_vec()
                };
                plain.extend_from_slice(&part);
                receipts.push(up.put_part(Bytes::from(part)).await.unwrap());
            }
            let meta = up.complete(receipts).await.unwrap();
            assert_eq!(meta.size, plain.len() as u64);
            assert_eq!(read(&crypt, &k).await.unwrap(), plain);
            assert!(read(raw.as_ref(), &k).await.unwrap().len() > plain.len());
        }
    }

    #[tokio::test]
    async fn refuses_every_tampering_before_handing_out_its_bytes() {
        let (_d, raw, crypt) = stores(vec![key(1)]).await;
        let plain = data(3 * CHUNK + 5);
        crypt.put("x/a", Bytes::from(plain.clone())).await.unwrap();
        crypt.put("x/b", Bytes::from(plain.clone())).await.unwrap();
        let sealed = read(raw.as_ref(), "x/a").await.unwrap();

        let check = |what: &str, bytes: Vec<u8>| {
            let raw = raw.clone();
            let crypt = crypt.clone();
            let what = what.to_string();
            async move {
                raw.put("x/a", Bytes::from(bytes)).await.unwrap();
                let err = read(&crypt, "x/a").await.expect_err(&what);
                // A flipped fingerprint names a key nobody has: refused all the same.
                assert!(
                    matches!(
                        err,
                        StoreError::Tampered { .. } | StoreError::WrongKey { .. }
                    ),
                    "{what}: {err}"
                );
            }
        };
        for at in [
            9,
            HEADER - 1,
            HEADER + 5,
            HEADER + SEALED_CHUNK + 3,
            sealed.len() - 1,
        ] {
            let mut b = sealed.clone();
            b[at] ^= 1;
            check(&format!("flipped byte {at}"), b).await;
        }
        check(
            "truncated at a chunk boundary",
            sealed[..HEADER + SEALED_CHUNK].to_vec(),
        )
        .await;
        check("truncated mid-chunk", sealed[..sealed.len() - 3].to_vec()).await;
        check("truncated in the header", sealed[..20].to_vec()).await;
        let mut extended = sealed.clone();
        extended.extend_from_slice(&sealed[HEADER..HEADER + SEALED_CHUNK]);
        check("a chunk appended", extended).await;
        let mut swapped = sealed.clone();
        let (one, two) = (
            HEADER..HEADER + SEALED_CHUNK,
            HEADER + SEALED_CHUNK..HEADER + 2 * SEALED_CHUNK,
        );
        swapped[one.clone()].copy_from_slice(&sealed[two.clone()]);
        swapped[two].copy_from_slice(&sealed[one]);
        check("two chunks swapped", swapped).await;
        // Another object's bytes, sealed with the same key, moved to this name.
        check(
            "object from another key",
            read(raw.as_ref(), "x/b").await.unwrap(),
        )
        .await;
        // Plaintext planted by someone with write access to the bucket.
        raw.put("x/a", Bytes::from(plain)).await.unwrap();
        let err = read(&crypt, "x/a").await.unwrap_err();
        assert!(matches!(err, StoreError::NotEncrypted { .. }), "{err}");
        assert!(err.to_string().contains("--accept-unencrypted"), "{err}");
    }

    #[tokio::test]
    async fn rotation_reads_old_keys_and_names_a_missing_one() {
        let (_d, raw, old) = stores(vec![key(1)]).await;
        old.put("k", Bytes::from_static(b"hello")).await.unwrap();
        let rotated = Crypt::new(raw.clone(), Keyring::new(vec![key(2), key(1)]), false);
        assert_eq!(read(&rotated, "k").await.unwrap(), b"hello");
        rotated.put("k2", Bytes::from_static(b"new")).await.unwrap();
        let err = read(&old, "k2").await.unwrap_err().to_string();
        assert!(err.contains(&key(2).fingerprint()), "{err}");
        assert!(err.contains("--encryption-key-file"), "{err}");
        let plain = Crypt::new(raw.clone(), None, false);
        let err = read(&plain, "k").await.unwrap_err().to_string();
        assert!(err.contains(&key(1).fingerprint()), "{err}");
        // Plaintext stores keep working without a key, and a keyed agent may read them when told.
        raw.put("p", Bytes::from_static(b"plain")).await.unwrap();
        assert_eq!(read(&plain, "p").await.unwrap(), b"plain");
        let migrating = Crypt::new(raw, Keyring::new(vec![key(1)]), true);
        assert_eq!(read(&migrating, "p").await.unwrap(), b"plain");
    }

    #[test]
    fn reads_key_files_raw_hex_and_base64_and_refuses_the_rest() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let bytes: [u8; 32] = data(32).try_into().unwrap();
        let write = |name: &str, content: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        };
        let fp = Key::from_bytes(&bytes).fingerprint();
        for p in [
            write("raw", &bytes),
            write("hex", format!("{}\n", hex::encode(bytes)).as_bytes()),
            write(
                "b64",
                base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .as_bytes(),
            ),
        ] {
            assert_eq!(Key::from_file(&p).unwrap().fingerprint(), fp);
        }
        for (name, content) in [
            ("short", &b"0123456789"[..]),
            ("zeros", &[0u8; 32][..]),
            ("text", &b"correct horse battery staple"[..]),
        ] {
            let err = Key::from_file(&write(name, content))
                .unwrap_err()
                .to_string();
            assert!(err.contains("32 random bytes"), "{err}");
            assert!(
                !err.contains("horse"),
                "a key file's contents never reach an error: {err}"
            );
        }
        let raw = write("raw2", &bytes);
        let err = Keyring::from_files(&[raw.clone(), raw]).unwrap_err();
        assert!(matches!(err, KeyError::Duplicate { .. }));
    }

    /// An inner stream that panics when polled after its end, as the S3 body stream does.
    fn unfused(data: Vec<u8>, piece: usize) -> ByteStream {
        let pieces: Vec<Bytes> = data
            .chunks(piece.max(1))
            .map(Bytes::copy_from_slice)
            .collect();
        Box::pin(futures::stream::unfold(
            pieces.into_iter(),
            |mut it| async move { it.next().map(|b| (Ok(b), it)) },
        ))
    }

    async fn drain(mut s: ByteStream) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn never_polls_an_ended_inner_stream() {
        let plain = data(3 * CHUNK + 9);
        let sealed = seal_all(&key(1), "k", &plain).unwrap().to_vec();
        let keyring = Some(Arc::new(Keyring::new(vec![key(1)]).unwrap()));
        for piece in [1, 7, 4096, CHUNK + 3, 1 << 20] {
            let out = drain(open_stream(
                unfused(sealed.clone(), piece),
                "k".into(),
                keyring.clone(),
                false,
            ));
            assert_eq!(out.await.unwrap(), plain, "sealed, pieces of {piece}");
            for small in [Vec::new(), b"abc".to_vec(), plain.clone()] {
                let out = drain(open_stream(
                    unfused(small.clone(), piece),
                    "k".into(),
                    None,
                    false,
                ));
                assert_eq!(out.await.unwrap(), small, "plain, pieces of {piece}");
            }
        }
    }

    #[test]
    fn sizes_invert() {
        for n in [0u64, 1, 65535, 65536, 65537, 10 << 20] {
            assert_eq!(plaintext_len(sealed_len(n)), Some(n));
        }
        assert_eq!(plaintext_len(3), None);
    }
}
