//! SHA-256 digests as values: 32 bytes, compared as bytes, hex only where they meet text (keys,
//! manifests, messages). A leaf module, so the pipeline, the catalog, the WAL archive and the
//! engines share one parser instead of each comparing hex strings its own way.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;

/// Length of a digest in bytes.
const LEN: usize = 32;
/// Length of a digest in hex digits.
const HEX_LEN: usize = 2 * LEN;
/// How much of a refused value an error quotes: enough to recognise it, never a whole hostile
/// answer or file.
const QUOTED: usize = 80;

/// A SHA-256 digest. Stored in manifests, WAL keys and Qdrant requests as 64 lower-case hex
/// digits, so everything written before this type existed reads unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest([u8; LEN]);

/// Text that is not a SHA-256 digest. It quotes the start of the value; the caller says where the
/// value came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a sha256 digest (64 hex digits)")]
pub struct InvalidDigest(String);

impl Sha256Digest {
    /// The digest of `bytes`, for values hashed in one piece (streams use [`sha2::Sha256`] and
    /// [`Sha256Digest::from`] its result).
    pub fn of(bytes: &[u8]) -> Self {
        Self(sha2::Sha256::digest(bytes).into())
    }

    /// Parses exactly 64 hex digits (either case, as Qdrant may send them); anything else —
    /// shorter, longer, a sign, spaces — is refused.
    pub fn from_hex(text: &str) -> Result<Self, InvalidDigest> {
        let mut bytes = [0u8; LEN];
        if text.len() != HEX_LEN || hex::decode_to_slice(text, &mut bytes).is_err() {
            return Err(InvalidDigest(text.chars().take(QUOTED).collect()));
        }
        Ok(Self(bytes))
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; LEN] {
        &self.0
    }

    /// Formats into a buffer on the stack: a digest printed on a hot path allocates nothing.
    fn with_hex<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        let mut buf = [0u8; HEX_LEN];
        hex::encode_to_slice(self.0, &mut buf).expect("the buffer holds two digits per byte");
        f(std::str::from_utf8(&buf).expect("hex digits are ASCII"))
    }
}

impl From<[u8; LEN]> for Sha256Digest {
    fn from(bytes: [u8; LEN]) -> Self {
        Self(bytes)
    }
}

impl From<sha2::digest::Output<sha2::Sha256>> for Sha256Digest {
    fn from(output: sha2::digest::Output<sha2::Sha256>) -> Self {
        Self(output.into())
    }
}

impl FromStr for Sha256Digest {
    type Err = InvalidDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex(s)
    }
}

impl fmt::LowerHex for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_hex(|hex| f.write_str(hex))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(self, f)
    }
}

/// Hex, like [`Display`](fmt::Display): a digest in a log or assertion reads as it does in a
/// manifest.
impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(self, f)
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.with_hex(|hex| serializer.serialize_str(hex))
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = Sha256Digest;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sha256 digest as 64 hex digits")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Sha256Digest, E> {
                Sha256Digest::from_hex(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sha256("abc"), FIPS 180-2's first example.
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn hex_round_trips_and_prints_lower_case() {
        let d = Sha256Digest::of(b"abc");
        assert_eq!(d.to_string(), ABC);
        assert_eq!(format!("{d:x}"), ABC);
        assert_eq!(format!("{d:?}"), ABC);
        assert_eq!(Sha256Digest::from_hex(ABC).unwrap(), d);
        assert_eq!(ABC.parse::<Sha256Digest>().unwrap(), d);
        assert_eq!(
            Sha256Digest::from_hex(&ABC.to_ascii_uppercase()).unwrap(),
            d,
            "the same bytes whatever the case of the digits"
        );
    }

    #[test]
    fn anything_but_64_hex_digits_is_refused_and_quoted_briefly() {
        let long = "a".repeat(10_000);
        for bad in [
            "",
            &ABC[..63],
            &format!("{ABC}0"),
            &format!(" {}", &ABC[1..]),
            &format!("+{}", &ABC[1..]),
            &format!("{}g", &ABC[..63]),
            &format!("{}é", &ABC[..62]),
            long.as_str(),
        ] {
            let err = Sha256Digest::from_hex(bad).expect_err(bad);
            assert!(err.to_string().contains("64 hex digits"), "{err}");
            assert!(err.to_string().len() < 200, "{err}");
        }
    }

    #[test]
    fn serde_writes_and_reads_the_hex_string() {
        let d = Sha256Digest::of(b"abc");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{ABC}\""));
        assert_eq!(serde_json::from_str::<Sha256Digest>(&json).unwrap(), d);
        let err = serde_json::from_str::<Sha256Digest>("\"abc\"").unwrap_err();
        assert!(err.to_string().contains("not a sha256 digest"), "{err}");
        assert!(serde_json::from_str::<Sha256Digest>("42").is_err());
    }
}
