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

mod key;
mod open;
mod seal;

pub use key::{Key, KeyError, Keyring};

use std::{fmt, sync::Arc};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    ByteStream, ObjectMeta, PendingUpload, Result, Store, StoreError, TimedObject, Upload,
};
use open::open_stream;
use seal::{SealedUpload, seal_all, seal_header};

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

/// Why an object was refused: it does not authenticate.
fn tampered(key: &str, why: &str) -> StoreError {
    StoreError::Tampered {
        key: key.to_string(),
        reason: why.to_string(),
    }
}

/// The wrap's associated data: the magic, the key's fingerprint and the object's name, which
/// binds a sealed object to the name it was written under.
fn wrap_aad(fingerprint: &[u8], key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(MAGIC.len() + FINGERPRINT + key.len());
    aad.extend_from_slice(MAGIC);
    aad.extend_from_slice(fingerprint);
    aad.extend_from_slice(key.as_bytes());
    aad
}

#[async_trait]
impl Store for Crypt {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn health(&self) -> Option<super::StoreHealth> {
        self.inner.health()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn encryption(&self) -> Encryption {
        match &self.keyring {
            None => Encryption::Off,
            Some(k) => Encryption::On {
                fingerprints: k.fingerprints(),
                accept_unencrypted: self.accept_unencrypted,
                key_files: k.files.clone(),
            },
        }
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
                Ok(Box::new(SealedUpload::new(upload, key, header, enc)))
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

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::store::{MIN_PART_SIZE, local::LocalStore};

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
