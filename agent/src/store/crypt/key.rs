//! The store's encryption keys: reading a key file, its fingerprint, and the keyring
//! (the first key encrypts, every one decrypts).

use std::{fmt, path::Path};

use aead::{KeyInit, generic_array::GenericArray};
use aes_gcm::Aes256Gcm;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::FINGERPRINT;

/// A key that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("key file {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold a 32-byte key.
    #[error(
        "key file {}: {why}; a key file holds 32 random bytes, raw or as 64 hex digits or base64; make one with `openssl rand -base64 32 > key` or `head -c 32 /dev/urandom > key`",
        path.display()
    )]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it (never its contents).
        why: String,
    },
    /// The same key was given twice.
    #[error("key file {}: the same key (fingerprint {fingerprint}) is given twice", path.display())]
    Duplicate {
        /// The second file.
        path: std::path::PathBuf,
        /// The key's fingerprint.
        fingerprint: String,
    },
}

/// One key: its cipher and its fingerprint. Never printed, never serialised; `Debug` shows only
/// the fingerprint. The cipher's round keys and GHASH key are wiped when it is dropped (the
/// `zeroize` features of aes, ghash and polyval).
#[derive(Clone)]
pub struct Key {
    pub(super) fingerprint: [u8; FINGERPRINT],
    pub(super) cipher: Aes256Gcm,
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

    /// Reads a key file: 32 raw bytes (`head -c 32 /dev/urandom`), or text that is 64 hex digits
    /// or base64 of exactly 32 bytes (`openssl rand -base64 32`), surrounding white space ignored.
    ///
    /// A file of nothing but printable characters is text, whatever its length: a 32-character
    /// passphrase (with or without its newline) is not a key, and taking its bytes as one would
    /// give a key of far less than 256 bits that looks fine. Random bytes are all printable with
    /// a probability below 10^-13. Every copy of the key's bytes is wiped when dropped.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let data = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?);
        let format = |why: String| KeyError::Format {
            path: path.to_path_buf(),
            why,
        };
        let is_text = data
            .iter()
            .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace());
        let decoded: Zeroizing<Vec<u8>> = if !is_text {
            if data.len() != 32 {
                return Err(format(format!(
                    "{} bytes that are neither 32 raw bytes nor hex or base64 text",
                    data.len()
                )));
            }
            data.clone()
        } else {
            let text = std::str::from_utf8(&data)
                .map_err(|_| format("text that is not ASCII".into()))?
                .trim();
            if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
                Zeroizing::new(hex::decode(text).map_err(|e| format(format!("bad hex: {e}")))?)
            } else {
                use base64::Engine as _;
                Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(text).map_err(
                    |_| {
                        format(format!(
                            "text of {} characters that is neither 64 hex digits nor base64 (a passphrase is not a key)",
                            text.len()
                        ))
                    },
                )?)
            }
        };
        let bytes: Zeroizing<[u8; 32]> =
            Zeroizing::new(decoded.as_slice().try_into().map_err(|_| {
                format(format!(
                    "the text decodes to {} bytes, not 32",
                    decoded.len()
                ))
            })?);
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
    pub(super) files: Vec<std::path::PathBuf>,
}

impl Keyring {
    /// The keys the agent was given, in order; `None` when none is given.
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

    pub(super) fn find(&self, fingerprint: &[u8]) -> Option<&Key> {
        self.keys.iter().find(|k| k.fingerprint == fingerprint)
    }
}
