//! The way in: a fresh header per object (its data key wrapped by the current key and bound to
//! the object's name) and the body sealed chunk by chunk, whole (`put`) or part by part
//! (multipart uploads).

use aead::{AeadInPlace, Buffer, KeyInit, generic_array::GenericArray, stream::EncryptorBE32};
use aes_gcm::Aes256Gcm;
use async_trait::async_trait;
use bytes::Bytes;
use rand::RngCore;

use zeroize::Zeroizing;

use super::{
    CHUNK, HEADER, Key, LEGACY_HEADER, LEGACY_MAGIC, MAGIC, RepositoryId, STREAM_NONCE, TAG,
    WRAP_NONCE, plaintext_len, sealed_len, tampered, wrap_aad,
};
use crate::store::{
    MIN_PART_SIZE, ObjectMeta, PartReceipt, PartUpload, Result, StoreError, Upload, refused,
};

/// A fresh header for object `key` sealed for `repository` (none: the format before binding,
/// kept for the repository id itself), and the encryptor of its body. The data key is wiped
/// once wrapped; the encryptor wipes its copy when dropped.
pub(super) fn seal_header(
    k: &Key,
    key: &str,
    repository: Option<&RepositoryId>,
) -> Result<(Vec<u8>, EncryptorBE32<Aes256Gcm>)> {
    let mut rng = rand::rng();
    let mut data_key = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(&mut data_key[..]);
    let mut wrap_nonce = [0u8; WRAP_NONCE];
    rng.fill_bytes(&mut wrap_nonce);
    let mut stream_nonce = [0u8; STREAM_NONCE];
    rng.fill_bytes(&mut stream_nonce);

    let mut header = Vec::with_capacity(HEADER);
    match repository {
        Some(id) => {
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&k.fingerprint);
            header.extend_from_slice(&id.0);
        }
        None => {
            header.extend_from_slice(LEGACY_MAGIC);
            header.extend_from_slice(&k.fingerprint);
        }
    }
    header.extend_from_slice(&wrap_nonce);
    let mut wrapped = Zeroizing::new(data_key.to_vec());
    k.cipher
        .encrypt_in_place(
            GenericArray::from_slice(&wrap_nonce),
            &wrap_aad(&k.fingerprint, repository, key),
            &mut *wrapped,
        )
        .map_err(|_| tampered(key, "sealing the data key failed"))?;
    header.extend_from_slice(&wrapped);
    header.extend_from_slice(&stream_nonce);
    debug_assert_eq!(
        header.len(),
        if repository.is_some() {
            HEADER
        } else {
            LEGACY_HEADER
        }
    );
    let body = Aes256Gcm::new(GenericArray::from_slice(&data_key[..]));
    let enc = EncryptorBE32::from_aead(body, GenericArray::from_slice(&stream_nonce));
    Ok((header, enc))
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

/// Seals a whole object in one go, for `repository` (see [`seal_header`]).
pub(super) fn seal_all(
    k: &Key,
    key: &str,
    repository: Option<&RepositoryId>,
    plain: &[u8],
) -> Result<Bytes> {
    let (header, enc) = seal_header(k, key, repository)?;
    let mut out = vec![0u8; sealed_len(plain.len() as u64) as usize];
    out[..header.len()].copy_from_slice(&header);
    let mut enc = Some(enc);
    let end = seal_chunks(&mut enc, &header, plain, true, &mut out, header.len())
        .map_err(|_| tampered(key, "sealing failed"))?;
    out.truncate(end);
    Ok(Bytes::from(out))
}

/// A multipart upload whose parts are sealed on their way in. Parts are sealed in the order they
/// are numbered, so the STREAM counter follows the object's byte order. A part shorter than
/// [`MIN_PART_SIZE`] is the last one (the store's rule), so its final chunk is sealed with it;
/// a last part of full size leaves the final chunk to `complete`, which stores it as one more,
/// small, last part.
pub(super) struct SealedUpload {
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
    /// An upload of object `key` into `inner`, its body sealed by `enc` behind `header`.
    pub(super) fn new(
        inner: Box<dyn Upload>,
        key: &str,
        header: Vec<u8>,
        enc: EncryptorBE32<Aes256Gcm>,
    ) -> Self {
        Self {
            inner,
            key: key.to_string(),
            header,
            header_sent: false,
            enc: Some(enc),
            pending: Vec::new(),
            finished: false,
        }
    }

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
            out[..self.header.len()].copy_from_slice(&self.header);
            self.header_sent = true;
            at = self.header.len();
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
            return refused(StoreError::Request {
                key: self.key.clone(),
                message: "a part after the last one".into(),
                retryable: false,
                remedy: None,
                source: None,
            });
        }
        let last = data.len() < MIN_PART_SIZE;
        match self.seal_part(&data, last) {
            Ok(sealed) => self.inner.put_part(sealed),
            Err(_) => refused(tampered(&self.key, "sealing a part failed")),
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
