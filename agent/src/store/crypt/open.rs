//! The way out: the header opened with the key it names, then each chunk released only once it
//! is authenticated; plaintext objects handed on only when no key is configured or
//! `--accept-unencrypted` allows it.

use std::sync::Arc;

use aead::{AeadInPlace, KeyInit, generic_array::GenericArray, stream::DecryptorBE32};
use aes_gcm::Aes256Gcm;
use bytes::BytesMut;
use futures::StreamExt;

use super::{
    FINGERPRINT, HEADER, Keyring, MAGIC, SEALED_CHUNK, STREAM_NONCE, TAG, WRAP_NONCE, WRAPPED_KEY,
    tampered, wrap_aad,
};
use crate::store::{ByteStream, Result, StoreError};

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
pub(super) fn open_stream(
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
