//! Names: PostgreSQL's WAL file names and the keys of archived objects. Everything here is parsed
//! from text the agent does not control (keys listed from the store, file names in the spool, the
//! file PostgreSQL asks `wal-fetch` for), so parsing checks before it converts and never slices a
//! string at a byte index it has not proved to be a character boundary.

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

use crate::{digest::Sha256Digest, lsn::Lsn};

/// How much WAL one "log" number of a segment name spans: PostgreSQL splits a segment number into
/// the two halves of the name at every 4 GiB of WAL.
const LOG_SPAN: u64 = 0x1_0000_0000;

/// Whether `seg_size` is a WAL segment size PostgreSQL can have: a power of two from 1 MiB to
/// 1 GiB (`initdb --wal-segsize`). Anything else came from a damaged manifest or server reply.
pub(crate) fn valid_seg_size(seg_size: u64) -> bool {
    seg_size.is_power_of_two() && ((1 << 20)..=(1 << 30)).contains(&seg_size)
}

/// Segments per log number, for a valid segment size.
fn segs_per_log(seg_size: u64) -> Option<u64> {
    valid_seg_size(seg_size).then(|| LOG_SPAN / seg_size)
}

/// Eight hex digits, as in every part of a WAL file name.
fn hex8(s: &str) -> Option<u32> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// A WAL file as PostgreSQL names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WalFile {
    /// A segment: timeline and segment number (in units of the segment size).
    Segment {
        /// Timeline id.
        timeline: u32,
        /// `log * segments_per_log + seg`, as PostgreSQL's XLogSegNo.
        log: u32,
        /// Low part of the name.
        seg: u32,
    },
    /// A timeline history file.
    History {
        /// The timeline it describes.
        timeline: u32,
    },
}

impl WalFile {
    /// Parses `000000010000000000000003` or `00000002.history`; anything else (including names
    /// with non-ASCII characters) is `None`.
    pub fn parse(name: &str) -> Option<Self> {
        if let Some(tli) = name.strip_suffix(".history") {
            return Some(WalFile::History {
                timeline: hex8(tli)?,
            });
        }
        // 24 ASCII hex digits: after this check every byte index below is a character boundary.
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(WalFile::Segment {
            timeline: hex8(name.get(0..8)?)?,
            log: hex8(name.get(8..16)?)?,
            seg: hex8(name.get(16..24)?)?,
        })
    }

    /// PostgreSQL's name for the file.
    pub fn name(&self) -> String {
        match self {
            WalFile::Segment { timeline, log, seg } => format!("{timeline:08X}{log:08X}{seg:08X}"),
            WalFile::History { timeline } => format!("{timeline:08X}.history"),
        }
    }

    /// The segment holding `lsn` on `timeline`.
    pub fn segment_of(timeline: u32, lsn: Lsn, seg_size: u64) -> Self {
        Self::from_segno(timeline, lsn.0 / seg_size.max(1), seg_size)
    }

    /// The segment with number `segno` on `timeline`. A segment size PostgreSQL cannot have (see
    /// [`valid_seg_size`]) gives a meaningless name, never a division by zero.
    pub fn from_segno(timeline: u32, segno: u64, seg_size: u64) -> Self {
        let per_log = LOG_SPAN / seg_size.clamp(1, LOG_SPAN);
        WalFile::Segment {
            timeline,
            log: u32::try_from(segno / per_log).unwrap_or(u32::MAX),
            seg: (segno % per_log) as u32,
        }
    }

    /// Segment number (XLogSegNo) of a segment; `None` for a history file, an invalid segment
    /// size, or a name PostgreSQL would not write with this segment size (its low part past the
    /// segments of one log number).
    pub fn segno(&self, seg_size: u64) -> Option<u64> {
        match self {
            WalFile::Segment { log, seg, .. } => {
                let per_log = segs_per_log(seg_size)?;
                (u64::from(*seg) < per_log).then(|| u64::from(*log) * per_log + u64::from(*seg))
            }
            WalFile::History { .. } => None,
        }
    }

    /// Timeline of the file.
    pub fn timeline(&self) -> u32 {
        match self {
            WalFile::Segment { timeline, .. } | WalFile::History { timeline } => *timeline,
        }
    }
}

/// What an archived object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A complete segment.
    Seg,
    /// The leading part of a segment still being written.
    Partial,
    /// A timeline history file.
    History,
}

impl Kind {
    /// The word in an object's key.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Seg => "seg",
            Kind::Partial => "partial",
            Kind::History => "history",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        match word {
            "seg" => Some(Kind::Seg),
            "partial" => Some(Kind::Partial),
            "history" => Some(Kind::History),
            _ => None,
        }
    }
}

/// One object of the WAL archive, decoded from its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalObject {
    /// Key relative to the store's prefix.
    pub key: String,
    /// The WAL file.
    pub file: WalFile,
    /// Complete, partial or history.
    pub kind: Kind,
    /// Bytes of the file that hold WAL.
    pub end: u64,
    /// When the agent read the file.
    pub captured: DateTime<Utc>,
    /// sha256 of the file's bytes (hex in the key).
    pub sha256: Sha256Digest,
}

impl WalObject {
    /// The key of an object: `<prefix><file>.<kind>.<end hex>.<captured unix ms>.<sha256>.zst`.
    pub fn key(
        prefix: &str,
        file: &WalFile,
        kind: Kind,
        end: u64,
        captured: DateTime<Utc>,
        sha256: &Sha256Digest,
    ) -> String {
        format!(
            "{prefix}{}.{}.{end:08x}.{}.{sha256}.zst",
            file.name(),
            kind.as_str(),
            captured.timestamp_millis(),
        )
    }

    /// Decodes a key listed under `prefix`; `None` for anything that is not exactly the layout
    /// [`key`](Self::key) writes (other objects in the folder are not the archive's).
    pub fn parse(key: &str, prefix: &str) -> Option<Self> {
        let rest = key.strip_prefix(prefix)?.strip_suffix(".zst")?;
        let mut parts = rest.rsplitn(5, '.');
        let sha256 = parts.next()?;
        let captured = parts.next()?;
        let end = parts.next()?;
        let kind = Kind::parse(parts.next()?)?;
        let file = WalFile::parse(parts.next()?)?;
        let hex = |s: &str, max: usize| {
            !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_hexdigit())
        };
        let sha256 = Sha256Digest::from_hex(sha256).ok()?;
        if !hex(end, 16) {
            return None;
        }
        if captured.is_empty()
            || captured.len() > 18
            || !captured.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let captured: i64 = captured.parse().ok()?;
        let kind_fits = matches!(
            (file, kind),
            (WalFile::History { .. }, Kind::History)
                | (WalFile::Segment { .. }, Kind::Seg | Kind::Partial)
        );
        if !kind_fits {
            return None;
        }
        Some(Self {
            key: key.to_string(),
            file,
            kind,
            end: u64::from_str_radix(end, 16).ok()?,
            captured: Utc.timestamp_millis_opt(captured).single()?,
            sha256,
        })
    }

    /// The archive position this object reaches: its segment's start plus its valid bytes.
    /// `None` for a history file, and for a key whose numbers do not fit the segment size (its
    /// `end` past the segment, or a segment number PostgreSQL would not write).
    pub fn end_lsn(&self, seg_size: u64) -> Option<Lsn> {
        if self.end > seg_size {
            return None;
        }
        let start = self.file.segno(seg_size)?.checked_mul(seg_size)?;
        start.checked_add(self.end).map(Lsn)
    }
}

/// Whether `id` is a PostgreSQL system identifier (a 64-bit number in decimal). It names the
/// archive's folder and reaches `restore_command`, and it comes from manifests and requests, so
/// nothing else may pass: no separator, no `..`, no shell word.
pub(crate) fn valid_system_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 20
        && id.bytes().all(|b| b.is_ascii_digit())
        && id.parse::<u64>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_ids_are_decimal_u64s() {
        assert!(valid_system_id("7312345678901234567"));
        for bad in [
            "",
            "../backups",
            "1; rm -rf /",
            "18446744073709551616",
            "12a",
            " 1",
        ] {
            assert!(!valid_system_id(bad), "{bad:?}");
        }
    }

    const SEG: u64 = 16 << 20;

    #[test]
    fn names_and_lsns() {
        let f = WalFile::parse("00000002000000010000003F").unwrap();
        assert_eq!(f.segno(SEG), Some(256 + 63));
        assert_eq!(f.name(), "00000002000000010000003F");
        assert_eq!(
            WalFile::segment_of(2, Lsn((1 << 32) + 63 * SEG + 5), SEG),
            f
        );
        assert_eq!(
            WalFile::parse("00000003.history"),
            Some(WalFile::History { timeline: 3 })
        );
        assert!(WalFile::parse("0000000100000000000000ZZ").is_none());
        assert!(WalFile::parse("000000010000000000000001.partial").is_none());
    }

    #[test]
    fn hostile_names_are_refused_without_panicking() {
        // 24 bytes, but a two-byte character straddles byte 8: slicing there would panic.
        let straddling = "0000000é000000000000003";
        assert_eq!(straddling.len(), 24);
        for name in [
            straddling,
            "ééééééééééééééééééééééé",
            "",
            ".history",
            "é.history",
            "0000000é.history",
            "+0000001.history",
            "+00000010000000000000003",
            "0000000100000000000000030",
        ] {
            assert_eq!(WalFile::parse(name), None, "{name:?}");
        }
        // A low part past the segments of one log number is not a name PostgreSQL writes.
        let f = WalFile::parse("0000000100000000000001FF").unwrap();
        assert_eq!(f.segno(SEG), None);
        assert_eq!(f.segno(1 << 20), Some(0x1FF));
        // The largest name does not overflow.
        let max = WalFile::parse("FFFFFFFFFFFFFFFFFFFFFFFF").unwrap();
        assert_eq!(max.segno(1 << 30), None);
        let max = WalFile::parse("FFFFFFFFFFFFFFFF00000003").unwrap();
        assert_eq!(max.segno(1 << 30), Some(0xFFFF_FFFF * 4 + 3));
    }

    #[test]
    fn segment_sizes_postgres_cannot_have_never_divide_by_zero() {
        for size in [0, 1, 3 << 20, 2 << 30, u64::MAX] {
            assert!(!valid_seg_size(size));
            let f = WalFile::from_segno(1, 5, size);
            assert_eq!(f.segno(size), None);
            let _ = WalFile::segment_of(1, Lsn(u64::MAX), size).name();
        }
        assert!(valid_seg_size(16 << 20));
    }

    fn key(file: &str, kind: &str, end: &str, ms: &str, sha: &str) -> String {
        format!("wal/1/{file}.{kind}.{end}.{ms}.{sha}.zst")
    }

    #[test]
    fn keys_round_trip() {
        let file = WalFile::parse("000000010000000000000003").unwrap();
        let at = Utc.timestamp_millis_opt(1_700_000_000_000).unwrap();
        let sha = Sha256Digest::of(b"segment");
        let k = WalObject::key("wal/1/", &file, Kind::Partial, 0x2000, at, &sha);
        assert!(k.contains(&format!(".{sha}.zst")), "{k}");
        let o = WalObject::parse(&k, "wal/1/").unwrap();
        assert_eq!((o.kind, o.sha256), (Kind::Partial, sha));
        assert_eq!((o.file, o.end, o.captured), (file, 0x2000, at));
        assert_eq!(o.end_lsn(SEG), Some(Lsn(3 * SEG + 0x2000)));
        assert!(WalObject::parse("wal/1/x.seg.0.0.abc.zst", "wal/1/").is_none());
    }

    #[test]
    fn hostile_keys_are_refused_without_panicking() {
        let sha = "b".repeat(64);
        let seg = "000000010000000000000003";
        let good = key(seg, "seg", "1000000", "1", &sha);
        assert!(WalObject::parse(&good, "wal/1/").is_some());
        for bad in [
            key(seg, "seg", "+100", "1", &sha),
            key(seg, "seg", "", "1", &sha),
            key(seg, "seg", "11111111111111111", "1", &sha),
            key(seg, "seg", "100", "-1", &sha),
            key(seg, "seg", "100", "+1", &sha),
            key(seg, "seg", "100", "99999999999999999999", &sha),
            key(seg, "seg", "100", "1", &"é".repeat(32)),
            key(seg, "history", "100", "1", &sha),
            key("00000002.history", "seg", "100", "1", &sha),
            key(seg, "segment", "100", "1", &sha),
            "wal/1/.zst".to_string(),
            "wal/1/é.zst".to_string(),
            "wal/2/x".to_string(),
        ] {
            assert_eq!(WalObject::parse(&bad, "wal/1/"), None, "{bad:?}");
        }
        // An end past the segment, or numbers that would overflow, have no position.
        let long =
            WalObject::parse(&key(seg, "seg", "ffffffffffffffff", "1", &sha), "wal/1/").unwrap();
        assert_eq!(long.end_lsn(SEG), None);
        let last = "FFFFFFFFFFFFFFFF000000FF";
        let max = WalObject::parse(&key(last, "seg", "ffffff", "1", &sha), "wal/1/").unwrap();
        assert_eq!(max.end_lsn(SEG), Some(Lsn(u64::MAX)));
        let over = WalObject::parse(&key(last, "seg", "1000000", "1", &sha), "wal/1/").unwrap();
        assert_eq!(over.end_lsn(SEG), None);
    }
}
