//! The way out: the header opened with the key it names, then each chunk released only once it
//! is authenticated; plaintext objects handed on only when no key is configured or
//! `--accept-unencrypted` allows it.

use aead::{AeadInPlace, KeyInit, generic_array::GenericArray, stream::DecryptorBE32};
use aes_gcm::Aes256Gcm;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use zeroize::Zeroizing;

use super::{
    Crypt, FINGERPRINT, Found, HEADER, Keyring, LEGACY_HEADER, LEGACY_MAGIC, MAGIC, RepositoryId,
    SEALED_CHUNK, STREAM_NONCE, TAG, WRAP_NONCE, WRAPPED_KEY, repository::ID_LEN, tampered,
    wrap_aad,
};
use crate::store::{ByteStream, Result, StoreError};

/// Opens a header read from object `key` (either format: `repository` is the id a bound one
/// names), returning the decryptor of its body. The unwrapped data key is wiped once the
/// decryptor holds it.
fn open_header(
    keyring: &Keyring,
    header: &[u8],
    repository: Option<&RepositoryId>,
    key: &str,
) -> Result<DecryptorBE32<Aes256Gcm>> {
    let fp = &header[MAGIC.len()..MAGIC.len() + FINGERPRINT];
    let Some(k) = keyring.find(fp) else {
        return Err(StoreError::WrongKey {
            key: key.to_string(),
            needed: hex::encode(fp),
            have: keyring.fingerprints().join(", "),
        });
    };
    let at = MAGIC.len() + FINGERPRINT + repository.map_or(0, |_| ID_LEN);
    let wrap_nonce = &header[at..at + WRAP_NONCE];
    let mut data_key =
        Zeroizing::new(header[at + WRAP_NONCE..at + WRAP_NONCE + WRAPPED_KEY].to_vec());
    k.cipher
        .decrypt_in_place(
            GenericArray::from_slice(wrap_nonce),
            &wrap_aad(fp, repository, key),
            &mut *data_key,
        )
        .map_err(|_| {
            tampered(
                key,
                "its header does not authenticate under the key it names (altered, forged, or moved here from another object)",
            )
        })?;
    let stream_nonce = &header[header.len() - STREAM_NONCE..];
    let body = Aes256Gcm::new(GenericArray::from_slice(&data_key));
    Ok(DecryptorBE32::from_aead(
        body,
        GenericArray::from_slice(stream_nonce),
    ))
}

/// State of an object being read back.
struct Opening {
    inner: ByteStream,
    key: String,
    /// The keys, and who decides whether what was found may be handed out.
    crypt: Crypt,
    /// Reading the repository id itself.
    root: bool,
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
/// authenticated, and nothing before `crypt` admitted what the object is (bound to this
/// repository, sealed before binding, or plaintext; see [`Crypt::admit`]); an error ends the
/// stream. `root`: the repository id object.
pub(super) fn open_stream(inner: ByteStream, key: String, crypt: Crypt, root: bool) -> ByteStream {
    let state = Opening {
        inner,
        key,
        crypt,
        root,
        buf: BytesMut::new(),
        started: false,
        aad: Vec::new(),
        dec: None,
        plain: false,
        eof: false,
        done: false,
    };
    Box::pin(futures::stream::try_unfold(state, |mut s| async move {
        Ok(s.next_piece().await?.map(|piece| (piece, s)))
    }))
}

impl Opening {
    /// The next piece of plaintext, or `None` at the end of the object.
    async fn next_piece(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.plain {
                return self.next_plain().await;
            }
            // Enough bytes to decide, or the end of the object.
            let need = if self.started {
                SEALED_CHUNK + 1
            } else {
                HEADER
            };
            if self.buf.len() < need && !self.eof {
                // At most one sealed chunk plus what one read of the inner stream brought.
                match self.inner.next().await {
                    Some(chunk) => self.buf.extend_from_slice(&chunk?),
                    None => self.eof = true,
                }
                continue;
            }
            if !self.started {
                let found = self.start()?;
                self.crypt.admit(&self.key, found, self.root).await?;
                self.started = true;
                continue;
            }
            return self.open_chunk().map(Some);
        }
    }

    /// A plaintext object's next bytes: what the header check buffered, then the inner stream's.
    async fn next_plain(&mut self) -> Result<Option<Bytes>> {
        if !self.buf.is_empty() {
            return Ok(Some(self.buf.split().freeze()));
        }
        // A stream that ended must not be polled again (the S3 body stream panics).
        if self.eof {
            return Ok(None);
        }
        match self.inner.next().await {
            Some(chunk) => Ok(Some(chunk?)),
            None => Ok(None),
        }
    }

    /// Opens the next sealed chunk in `buf`: a whole one followed by more bytes, or (at the end
    /// of the object) the final one, which must authenticate as final.
    fn open_chunk(&mut self) -> Result<Bytes> {
        let Some(dec) = self.dec.as_mut() else {
            return Err(tampered(&self.key, "it goes on after its final chunk"));
        };
        if self.buf.len() > SEALED_CHUNK {
            let mut chunk = self.buf.split_to(SEALED_CHUNK);
            if dec.decrypt_next_in_place(&self.aad, &mut chunk).is_err() {
                return Err(tampered(
                    &self.key,
                    "a chunk does not authenticate (altered, reordered or cut)",
                ));
            }
            return Ok(chunk.freeze());
        }
        // The end: what is left is the final chunk.
        if self.buf.len() < TAG {
            return Err(tampered(
                &self.key,
                "it ends before its final chunk (truncated)",
            ));
        }
        let mut chunk = self.buf.split();
        let dec = self.dec.take().expect("checked above");
        if dec.decrypt_last_in_place(&self.aad, &mut chunk).is_err() {
            return Err(tampered(
                &self.key,
                "its last chunk does not authenticate (truncated, extended or altered)",
            ));
        }
        self.done = true;
        Ok(chunk.freeze())
    }

    /// Reads the first bytes: an encrypted object's header (opened), or plaintext.
    fn start(&mut self) -> Result<Found> {
        let magic = self.buf.get(..MAGIC.len());
        let (bound, sealed) = match magic {
            Some(m) if m == MAGIC => (true, true),
            Some(m) if m == LEGACY_MAGIC => (false, true),
            _ => (false, false),
        };
        match (&self.crypt.keyring, sealed) {
            (Some(keyring), true) => {
                let len = if bound { HEADER } else { LEGACY_HEADER };
                if self.buf.len() < len {
                    return Err(tampered(&self.key, "it ends inside its header"));
                }
                let header = self.buf.split_to(len).to_vec();
                let repository = bound.then(|| {
                    let at = MAGIC.len() + FINGERPRINT;
                    let mut id = [0u8; ID_LEN];
                    id.copy_from_slice(&header[at..at + ID_LEN]);
                    RepositoryId(id)
                });
                self.dec = Some(open_header(
                    keyring,
                    &header,
                    repository.as_ref(),
                    &self.key,
                )?);
                self.aad = header;
                Ok(repository.map_or(Found::Legacy, Found::Bound))
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
            (_, false) => {
                self.plain = true;
                Ok(Found::Plain)
            }
        }
    }
}
