//! The long page header PostgreSQL writes at the start of every WAL segment, and the check of a
//! spool file against the server the agent streams from: whether that server can have written it.
//!
//! pg_receivewal resumes after the newest file it finds in its directory, whatever wrote it, and
//! the agent ships every file there. A file another cluster left in the spool (same names: every
//! cluster starts at `000000010000000000000001`) would be shipped into this cluster's archive, and
//! one named past the server's WAL makes pg_receivewal ask for a start the server refuses, for
//! ever. The first page's header says which cluster wrote a segment (`xlp_sysid`), where it
//! belongs (`xlp_pageaddr`) and with which segment size; the name and the server's identity say
//! the rest. Everything here reads bytes from a file the agent does not control: it checks before
//! it converts and never panics.

use super::naming::{Kind, WalFile};
use crate::lsn::Lsn;

/// Size of `XLogLongPageHeaderData`, the header of a segment's first page.
pub(crate) const LONG_HEADER_LEN: usize = 40;
/// `xlp_info` flag of a long header.
const XLP_LONG_HEADER: u16 = 0x0002;

/// The long page header at the start of a WAL segment (`XLogLongPageHeaderData`), as PostgreSQL
/// writes it: in its machine's byte order, which is the agent's (a sidecar on the same node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LongPageHeader {
    /// `xlp_magic`: the WAL format version.
    pub magic: u16,
    /// `xlp_info` flags.
    pub info: u16,
    /// `xlp_tli`: timeline of the page's first record.
    pub timeline: u32,
    /// `xlp_pageaddr`: the WAL position of the page.
    pub page_addr: Lsn,
    /// `xlp_rem_len`: bytes of a record continued from the previous page.
    pub rem_len: u32,
    /// `xlp_sysid`: the cluster's system identifier.
    pub system_id: u64,
    /// `xlp_seg_size`: the cluster's WAL segment size.
    pub seg_size: u32,
    /// `xlp_xlog_blcksz`: the WAL page size.
    pub block_size: u32,
}

/// `N` bytes at `at`, or `None` past the end.
fn field<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

impl LongPageHeader {
    /// Reads the header from a segment's first bytes; `None` when there are fewer than
    /// [`LONG_HEADER_LEN`]. Any bytes parse: whether they make sense is [`check`]'s question.
    pub(crate) fn parse(bytes: &[u8]) -> Option<Self> {
        Some(Self {
            magic: u16::from_ne_bytes(field(bytes, 0)?),
            info: u16::from_ne_bytes(field(bytes, 2)?),
            timeline: u32::from_ne_bytes(field(bytes, 4)?),
            page_addr: Lsn(u64::from_ne_bytes(field(bytes, 8)?)),
            rem_len: u32::from_ne_bytes(field(bytes, 16)?),
            // Bytes 20..24 are padding: xlp_sysid is 8-byte aligned.
            system_id: u64::from_ne_bytes(field(bytes, 24)?),
            seg_size: u32::from_ne_bytes(field(bytes, 32)?),
            block_size: u32::from_ne_bytes(field(bytes, 36)?),
        })
    }

    /// Whether `magic` is a WAL page magic of PostgreSQL: each major version has its own
    /// (0xD110 for 15, 0xD118 for 18), all in 0xD000–0xD1FF since 8.3. The exact version is not
    /// checked, since the agent does not know the server's; a file of another version is another
    /// cluster's, which the system identifier tells.
    fn known_magic(&self) -> bool {
        (0xD000..=0xD1FF).contains(&self.magic)
    }
}

/// What the agent knows of the server it streams from, to judge the spool against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerWal {
    /// Its system identifier.
    pub system_id: u64,
    /// Its current timeline.
    pub timeline: u32,
    /// How far it has flushed WAL: it sends nothing past this.
    pub flush: Lsn,
    /// Its WAL segment size.
    pub seg_size: u64,
}

/// Why a spool file cannot be the server's WAL; each says what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Impossible {
    /// The file could not be read.
    #[error("unreadable: {0}")]
    Unreadable(String),
    /// A name PostgreSQL does not give with this segment size, or timeline 0.
    #[error("PostgreSQL does not write a file of this name with {seg_size}-byte segments")]
    BadName {
        /// The server's segment size.
        seg_size: u64,
    },
    /// A complete segment of another size, or a partial one larger than a segment.
    #[error("{size} bytes, but the server's WAL segments are {seg_size} bytes")]
    Size {
        /// The file's size.
        size: u64,
        /// The server's segment size.
        seg_size: u64,
    },
    /// Fewer bytes than a page header, or a header of zeros.
    #[error("no WAL page header at its start ({0}): it holds no WAL")]
    NoHeader(&'static str),
    /// Not a WAL page magic.
    #[error("its first page does not start with a WAL page magic (found {0:#06x})")]
    Magic(u16),
    /// The first page's header is not a long header.
    #[error("its first page header is not a segment's long header (xlp_info {0:#06x})")]
    NotLongHeader(u16),
    /// Another cluster wrote it.
    #[error(
        "written by another PostgreSQL cluster (system identifier {found}; this server's is {server})"
    )]
    OtherCluster {
        /// The header's system identifier.
        found: u64,
        /// The server's.
        server: u64,
    },
    /// The header's segment size is not the server's.
    #[error("its header says {found}-byte segments; the server's are {server} bytes")]
    HeaderSegSize {
        /// The header's segment size.
        found: u32,
        /// The server's.
        server: u64,
    },
    /// A WAL page size PostgreSQL cannot have.
    #[error("its header says {0}-byte WAL pages, which PostgreSQL cannot have")]
    BlockSize(u32),
    /// The header's page address is not where the name puts the segment.
    #[error("its first page is at {found}, but its name puts it at {named}")]
    PageAddr {
        /// The header's page address.
        found: Lsn,
        /// Where the name's segment starts.
        named: Lsn,
    },
    /// The header's timeline is 0 or after the name's.
    #[error("its first page is on timeline {found}, which cannot be in a file of timeline {named}")]
    HeaderTimeline {
        /// The header's timeline.
        found: u32,
        /// The name's timeline.
        named: u32,
    },
    /// A timeline after the server's.
    #[error("timeline {found} is after the server's timeline {server}")]
    TimelineAhead {
        /// The file's timeline.
        found: u32,
        /// The server's.
        server: u32,
    },
    /// WAL past what the server has flushed.
    #[error(
        "it reaches {reach}, ahead of the server's WAL flush position {flush}: pg_receivewal would ask the server for WAL it does not have"
    )]
    Ahead {
        /// Where pg_receivewal would resume after this file.
        reach: Lsn,
        /// The server's flush position.
        flush: Lsn,
    },
    /// A history file for a timeline that has none.
    #[error("timeline {0} has no history file")]
    NoHistory(u32),
}

/// Whether the server can have written the spool file `file` (`kind`: complete, partial or
/// history) of `size` bytes, whose first bytes are `head` (at most [`LONG_HEADER_LEN`] are
/// looked at; fewer for a shorter file). `Err` names the first thing that rules it out.
///
/// For a segment: its size, its first page's long header (PostgreSQL's magic, the server's
/// system identifier and segment size, the page address the name implies, a timeline not after
/// the name's), a timeline not after the server's, and where pg_receivewal would resume after it
/// (the end of a complete segment, the start of a partial one) not ahead of the server's flush
/// position. For a history file: a timeline after 1 and not after the server's.
///
/// A partial segment is judged by its first page alone: pg_receivewal fills a new one with zeros
/// before writing WAL into it from the start, so zeros after the header say nothing, but a header
/// of zeros means nothing was written yet.
pub(crate) fn check(
    file: WalFile,
    kind: Kind,
    size: u64,
    head: &[u8],
    server: &ServerWal,
) -> Result<(), Impossible> {
    let (named_tli, segno) = match file {
        WalFile::History { timeline } => {
            if timeline <= 1 {
                return Err(Impossible::NoHistory(timeline));
            }
            return timeline_not_ahead(timeline, server);
        }
        WalFile::Segment { timeline, .. } => {
            let segno = file.segno(server.seg_size).filter(|_| timeline > 0).ok_or(
                Impossible::BadName {
                    seg_size: server.seg_size,
                },
            )?;
            (timeline, segno)
        }
    };
    let size_fits = match kind {
        Kind::Partial => size <= server.seg_size,
        Kind::Seg | Kind::History => size == server.seg_size,
    };
    if !size_fits {
        return Err(Impossible::Size {
            size,
            seg_size: server.seg_size,
        });
    }
    let header = server_header(head, server)?;
    // A name whose segment starts past u64 fits no header; segno() bounds it already.
    let start = segno.checked_mul(server.seg_size).map(Lsn);
    if start != Some(header.page_addr) {
        return Err(Impossible::PageAddr {
            found: header.page_addr,
            named: start.unwrap_or(Lsn(u64::MAX)),
        });
    }
    // The first segment of a new timeline begins with the old timeline's pages, copied.
    if header.timeline == 0 || header.timeline > named_tli {
        return Err(Impossible::HeaderTimeline {
            found: header.timeline,
            named: named_tli,
        });
    }
    timeline_not_ahead(named_tli, server)?;
    // pg_receivewal resumes at the start of a partial segment, after a complete one; the server
    // refuses a start past its flush position.
    let reach = match kind {
        Kind::Partial => Some(header.page_addr),
        Kind::Seg | Kind::History => header.page_addr.0.checked_add(server.seg_size).map(Lsn),
    };
    match reach {
        Some(reach) if reach <= server.flush => Ok(()),
        // The last segment of the WAL space ends past any position the server can have.
        _ => Err(Impossible::Ahead {
            reach: reach.unwrap_or(Lsn(u64::MAX)),
            flush: server.flush,
        }),
    }
}

/// The long page header at the start of a segment, if it is one this server wrote: written (not
/// zeros), PostgreSQL's, and of the server's cluster, segment size and a block size PostgreSQL
/// can have. What it says about position and timeline is [`check`]'s to judge.
fn server_header(head: &[u8], server: &ServerWal) -> Result<LongPageHeader, Impossible> {
    let head = head.get(..LONG_HEADER_LEN).unwrap_or(head);
    let header = LongPageHeader::parse(head).ok_or(Impossible::NoHeader("shorter than one"))?;
    if head.iter().all(|&b| b == 0) {
        return Err(Impossible::NoHeader("zeros"));
    }
    if !header.known_magic() {
        return Err(Impossible::Magic(header.magic));
    }
    if header.info & XLP_LONG_HEADER == 0 {
        return Err(Impossible::NotLongHeader(header.info));
    }
    if header.system_id != server.system_id {
        return Err(Impossible::OtherCluster {
            found: header.system_id,
            server: server.system_id,
        });
    }
    if u64::from(header.seg_size) != server.seg_size {
        return Err(Impossible::HeaderSegSize {
            found: header.seg_size,
            server: server.seg_size,
        });
    }
    // PostgreSQL's --with-wal-blocksize: a power of two from 1 to 64 kB.
    if !header.block_size.is_power_of_two() || !(1 << 10..=1 << 16).contains(&header.block_size) {
        return Err(Impossible::BlockSize(header.block_size));
    }
    Ok(header)
}

fn timeline_not_ahead(timeline: u32, server: &ServerWal) -> Result<(), Impossible> {
    if timeline > server.timeline {
        return Err(Impossible::TimelineAhead {
            found: timeline,
            server: server.timeline,
        });
    }
    Ok(())
}

/// The long header PostgreSQL 15 writes on the first page of segment `segno` of timeline `tli`
/// of cluster `system_id`, for tests.
#[cfg(test)]
pub(super) fn first_page_header(system_id: u64, tli: u32, segno: u64, seg_size: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(LONG_HEADER_LEN);
    h.extend_from_slice(&0xD110u16.to_ne_bytes());
    // XLP_BKP_REMOVABLE (0x0004) is set on every page PostgreSQL writes since 9.x.
    h.extend_from_slice(&(XLP_LONG_HEADER | 0x0004).to_ne_bytes());
    h.extend_from_slice(&tli.to_ne_bytes());
    h.extend_from_slice(&(segno * seg_size).to_ne_bytes());
    h.extend_from_slice(&0u32.to_ne_bytes());
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&system_id.to_ne_bytes());
    h.extend_from_slice(&u32::try_from(seg_size).unwrap_or(0).to_ne_bytes());
    h.extend_from_slice(&8192u32.to_ne_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;
    const SYSID: u64 = 7_312_345_678_901_234_567;

    fn server() -> ServerWal {
        ServerWal {
            system_id: SYSID,
            timeline: 2,
            flush: Lsn(0x500_0060),
            seg_size: SEG,
        }
    }

    /// The first page header PostgreSQL 15 writes for segment `segno` on timeline `tli`.
    fn header(tli: u32, segno: u64) -> Vec<u8> {
        first_page_header(SYSID, tli, segno, SEG)
    }

    fn seg(name: &str) -> WalFile {
        WalFile::parse(name).unwrap()
    }

    fn patched(at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut h = header(2, 3);
        h[at..at + bytes.len()].copy_from_slice(bytes);
        h
    }

    #[test]
    fn a_header_of_this_server_passes() {
        let h = header(2, 3);
        let parsed = LongPageHeader::parse(&h).unwrap();
        assert_eq!(parsed.system_id, SYSID);
        assert_eq!(parsed.page_addr, Lsn(3 * SEG));
        assert_eq!((parsed.seg_size, parsed.block_size), (SEG as u32, 8192));
        let file = seg("000000020000000000000003");
        assert_eq!(check(file, Kind::Seg, SEG, &h, &server()), Ok(()));
        assert_eq!(check(file, Kind::Partial, SEG, &h, &server()), Ok(()));
        // A partial cut short by an interrupted zero-fill still has its header.
        assert_eq!(check(file, Kind::Partial, 8192, &h, &server()), Ok(()));
        // The first segment of timeline 2 begins with timeline 1's pages.
        assert_eq!(
            check(file, Kind::Seg, SEG, &header(1, 3), &server()),
            Ok(())
        );
        // A lower timeline is history the server may have come from.
        let old = seg("000000010000000000000003");
        assert_eq!(check(old, Kind::Seg, SEG, &header(1, 3), &server()), Ok(()));
        // More bytes than the header are ignored.
        let mut long = h.clone();
        long.extend_from_slice(&[0xFF; 100]);
        assert_eq!(check(file, Kind::Seg, SEG, &long, &server()), Ok(()));
    }

    #[test]
    fn a_wrong_magic_or_short_header_is_refused() {
        let file = seg("000000020000000000000003");
        let s = server();
        assert_eq!(
            check(file, Kind::Seg, SEG, &patched(0, &[0x34, 0x12]), &s),
            Err(Impossible::Magic(u16::from_ne_bytes([0x34, 0x12])))
        );
        assert_eq!(
            check(file, Kind::Seg, SEG, &patched(2, &0u16.to_ne_bytes()), &s),
            Err(Impossible::NotLongHeader(0))
        );
        let h = header(2, 3);
        for n in [0, 1, 24, LONG_HEADER_LEN - 1] {
            assert!(LongPageHeader::parse(&h[..n]).is_none());
            assert_eq!(
                check(file, Kind::Partial, SEG, &h[..n], &s),
                Err(Impossible::NoHeader("shorter than one")),
                "{n} bytes"
            );
        }
        // A partial pg_receivewal filled with zeros but wrote nothing into.
        assert_eq!(
            check(file, Kind::Partial, SEG, &[0; LONG_HEADER_LEN], &s),
            Err(Impossible::NoHeader("zeros"))
        );
    }

    #[test]
    fn a_short_or_oversized_file_is_refused() {
        let file = seg("000000020000000000000003");
        let h = header(2, 3);
        let s = server();
        assert_eq!(
            check(file, Kind::Seg, SEG - 1, &h, &s),
            Err(Impossible::Size {
                size: SEG - 1,
                seg_size: SEG
            })
        );
        assert!(matches!(
            check(file, Kind::Partial, SEG + 1, &h, &s),
            Err(Impossible::Size { .. })
        ));
    }

    #[test]
    fn another_clusters_segment_is_refused() {
        let file = seg("000000020000000000000003");
        let err = check(
            file,
            Kind::Seg,
            SEG,
            &patched(24, &42u64.to_ne_bytes()),
            &server(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            Impossible::OtherCluster {
                found: 42,
                server: SYSID
            }
        );
        assert!(
            err.to_string().contains("another PostgreSQL cluster"),
            "{err}"
        );
    }

    #[test]
    fn a_page_address_that_is_not_the_names_is_refused() {
        // A real segment renamed: its header still says where it was written.
        let file = seg("0000000200000000000000F0");
        assert_eq!(
            check(file, Kind::Seg, SEG, &header(2, 3), &server()),
            Err(Impossible::PageAddr {
                found: Lsn(3 * SEG),
                named: Lsn(0xF0 * SEG)
            })
        );
    }

    #[test]
    fn a_segment_size_that_is_not_the_servers_is_refused() {
        let file = seg("000000020000000000000003");
        assert_eq!(
            check(
                file,
                Kind::Seg,
                SEG,
                &patched(32, &(1u32 << 20).to_ne_bytes()),
                &server()
            ),
            Err(Impossible::HeaderSegSize {
                found: 1 << 20,
                server: SEG
            })
        );
        assert_eq!(
            check(
                file,
                Kind::Seg,
                SEG,
                &patched(36, &1000u32.to_ne_bytes()),
                &server()
            ),
            Err(Impossible::BlockSize(1000))
        );
        // A low part past the segments of one log number is no name of this segment size.
        assert_eq!(
            check(
                seg("000000020000000000000100"),
                Kind::Seg,
                SEG,
                &header(2, 3),
                &server()
            ),
            Err(Impossible::BadName { seg_size: SEG })
        );
    }

    #[test]
    fn timelines_and_positions_past_the_servers_are_refused() {
        let s = server();
        // Timeline 3 while the server is on 2.
        let mut h = header(3, 3);
        assert_eq!(
            check(seg("000000030000000000000003"), Kind::Seg, SEG, &h, &s),
            Err(Impossible::TimelineAhead {
                found: 3,
                server: 2
            })
        );
        assert_eq!(
            check(seg("000000020000000000000003"), Kind::Seg, SEG, &h, &s),
            Err(Impossible::HeaderTimeline { found: 3, named: 2 })
        );
        h[4..8].copy_from_slice(&0u32.to_ne_bytes());
        assert!(matches!(
            check(seg("000000020000000000000003"), Kind::Seg, SEG, &h, &s),
            Err(Impossible::HeaderTimeline { found: 0, .. })
        ));
        // The server flushed to 0/5000060: segment 4 is complete, 5 is being written.
        let at = |segno: u64| {
            (
                header(2, segno),
                seg(&format!("0000000200000000{segno:08X}")),
            )
        };
        let (h4, f4) = at(4);
        assert_eq!(check(f4, Kind::Seg, SEG, &h4, &s), Ok(()));
        let (h5, f5) = at(5);
        assert_eq!(check(f5, Kind::Partial, SEG, &h5, &s), Ok(()));
        assert_eq!(
            check(f5, Kind::Seg, SEG, &h5, &s),
            Err(Impossible::Ahead {
                reach: Lsn(6 * SEG),
                flush: s.flush
            })
        );
        let (h6, f6) = at(6);
        assert!(matches!(
            check(f6, Kind::Partial, SEG, &h6, &s),
            Err(Impossible::Ahead { .. })
        ));
        // History files: only for timelines after 1, and not after the server's.
        let history = |t| WalFile::History { timeline: t };
        assert_eq!(check(history(2), Kind::History, 40, &[], &s), Ok(()));
        assert!(matches!(
            check(history(3), Kind::History, 40, &[], &s),
            Err(Impossible::TimelineAhead { found: 3, .. })
        ));
        assert_eq!(
            check(history(1), Kind::History, 40, &[], &s),
            Err(Impossible::NoHistory(1))
        );
    }

    /// Any bytes, any name: an answer, never a panic (no overflow at the largest numbers).
    #[test]
    fn hostile_bytes_and_names_never_panic() {
        let s = server();
        let names = [
            "000000000000000000000003",
            "FFFFFFFFFFFFFFFF000000FF",
            "FFFFFFFF00000000000000FF",
            "00000002FFFFFFFF000000FF",
        ];
        let mut max = header(2, 3);
        max[8..16].copy_from_slice(&u64::MAX.to_ne_bytes());
        for name in names {
            for head in [&[0xFF; 64][..], &max, &[][..], &[0xD1; 3][..]] {
                for kind in [Kind::Seg, Kind::Partial] {
                    assert!(check(seg(name), kind, SEG, head, &s).is_err(), "{name}");
                }
            }
        }
        let big = ServerWal {
            flush: Lsn(u64::MAX),
            timeline: u32::MAX,
            seg_size: 1 << 30,
            ..s
        };
        let mut h = max;
        h[32..36].copy_from_slice(&(1u32 << 30).to_ne_bytes());
        let last = seg("FFFFFFFFFFFFFFFF00000003");
        h[8..16].copy_from_slice(&(u64::MAX - (1 << 30) + 1).to_ne_bytes());
        h[4..8].copy_from_slice(&1u32.to_ne_bytes());
        // The last segment of the WAL space: its end does not fit in a u64.
        assert!(matches!(
            check(last, Kind::Seg, 1 << 30, &h, &big),
            Err(Impossible::Ahead { .. })
        ));
        assert_eq!(check(last, Kind::Partial, 1 << 30, &h, &big), Ok(()));
    }
}
