//! PostgreSQL log sequence numbers: a position in the WAL, written as PostgreSQL prints it
//! (`16/B374D848`). A leaf module, so the engine, the WAL archive and the operations share one
//! parser instead of importing it from each other.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// A WAL position. Ordered like the WAL; stored in manifests in PostgreSQL's text form, so
/// manifests written before this type existed read unchanged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// Text that is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an LSN; PostgreSQL writes them as two hex numbers, e.g. 16/B374D848")]
pub struct InvalidLsn(pub String);

impl Lsn {
    /// The segment number holding this position, for a cluster whose segments are `seg_size`
    /// bytes; `None` for a segment size of zero (a damaged manifest), never a division by zero.
    pub fn segno(self, seg_size: u64) -> Option<u64> {
        self.0.checked_div(seg_size)
    }
}

impl FromStr for Lsn {
    type Err = InvalidLsn;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidLsn(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let valid =
            |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid(hi) || !valid(lo) {
            return Err(bad());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(l: Lsn) -> Self {
        l.0
    }
}

impl Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_like_postgres() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l, Lsn(0x16_B374_D848));
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(" 0/2000028 ".parse::<Lsn>().unwrap(), Lsn(0x200_0028));
        for bad in [
            "",
            "1",
            "/1",
            "1/",
            "x/1",
            "1/1/1",
            "123456789/0",
            "+1/1",
            "1/-1",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} must be refused");
        }
        assert_eq!(
            Lsn(u64::MAX).to_string().parse::<Lsn>().unwrap(),
            Lsn(u64::MAX)
        );
    }

    #[test]
    fn serde_uses_the_text_form() {
        let json = serde_json::to_string(&Lsn(0x1_0000_0002)).unwrap();
        assert_eq!(json, "\"1/2\"");
        assert_eq!(
            serde_json::from_str::<Lsn>("\"1/2\"").unwrap(),
            Lsn(0x1_0000_0002)
        );
        assert!(serde_json::from_str::<Lsn>("\"nope\"").is_err());
    }

    #[test]
    fn segno_never_divides_by_zero() {
        assert_eq!(Lsn(48).segno(16), Some(3));
        assert_eq!(Lsn(48).segno(0), None);
    }
}
