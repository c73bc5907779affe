//! How far a base backup can be rolled forward: pure computation over an archive listing and its
//! timeline histories, no I/O ([`super::WalArchive::index`] reads them).
//!
//! Every loop here walks what the archive holds (its objects, the lines of its histories), never a
//! range of numbers read from it: a hostile or damaged key such as segment `FFFFFFFF…` costs one
//! entry, not four billion iterations.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::naming::{Kind, WalFile, WalObject};
use crate::lsn::Lsn;

/// The archive's segments and timeline histories, for computing recoverable windows.
#[derive(Debug, Clone)]
pub struct WalIndex {
    seg_size: u64,
    /// Best object per (timeline, segment number): complete before partial, longest partial.
    segments: BTreeMap<(u32, u64), WalObject>,
    /// Timeline → its history (parent timeline, switch LSN), oldest first.
    histories: BTreeMap<u32, Vec<(u32, u64)>>,
    /// Timeline → the object holding its history file.
    history_objects: BTreeMap<u32, WalObject>,
    /// Objects left out because their content is not what their names say: `key: why`.
    rejected: Vec<String>,
}

/// How far a base backup can be rolled forward with the WAL in the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryWindow {
    /// The timeline recovery ends on (`recovery_target_timeline = latest`).
    pub timeline: u32,
    /// Archive position reached without a gap.
    pub latest_lsn: Lsn,
    /// When the agent captured the last WAL before that position: commits up to about then are
    /// recoverable.
    pub latest_time: Option<DateTime<Utc>>,
    /// Missing stretches after which more WAL exists (unusable without the missing part).
    pub gaps: Vec<String>,
    /// Objects of the archive left out because their content is not what their names say
    /// (`key: why`): they neither extend nor cut the window.
    pub rejected: Vec<String>,
}

/// The timelines recovery follows, as (timeline, first LSN on it) in order.
type Path = Vec<(u32, u64)>;

impl WalIndex {
    /// An index of `objects` (an archive listing) and `histories` (each history file's object
    /// with its parsed lines: parent timeline and switch position, oldest first). Objects whose
    /// numbers do not fit `seg_size` are left out: to recovery they are missing.
    pub fn new(
        seg_size: u64,
        objects: impl IntoIterator<Item = WalObject>,
        histories: impl IntoIterator<Item = (WalObject, Vec<(u32, Lsn)>)>,
    ) -> Self {
        let mut segments: BTreeMap<(u32, u64), WalObject> = BTreeMap::new();
        for o in objects {
            let (Some(segno), Some(_)) = (o.file.segno(seg_size), o.end_lsn(seg_size)) else {
                continue;
            };
            match segments.get(&(o.file.timeline(), segno)) {
                Some(slot) => {
                    let better = match (slot.kind, o.kind) {
                        (Kind::Seg, _) => false,
                        (_, Kind::Seg) => true,
                        _ => o.end > slot.end,
                    };
                    if better {
                        segments.insert((o.file.timeline(), segno), o);
                    }
                }
                None => {
                    segments.insert((o.file.timeline(), segno), o);
                }
            }
        }
        let mut index = WalIndex {
            seg_size,
            segments,
            histories: BTreeMap::new(),
            history_objects: BTreeMap::new(),
            rejected: Vec::new(),
        };
        for (object, lines) in histories {
            let tli = object.file.timeline();
            let lines = lines.into_iter().map(|(t, l)| (t, l.0)).collect();
            index.histories.insert(tli, lines);
            index.history_objects.insert(tli, object);
        }
        index
    }

    /// The same index, naming the objects left out of it (`key: why`).
    pub fn with_rejected(mut self, rejected: Vec<String>) -> Self {
        self.rejected = rejected;
        self
    }

    /// Objects left out because their content is not what their names say (`key: why`).
    pub fn rejected(&self) -> &[String] {
        &self.rejected
    }

    /// The objects whose names alone would move a window's end, which must therefore be judged
    /// by their content: the last of each timeline (it ends the window) and the first after each
    /// hole in one (it makes the hole a gap).
    pub fn suspects(&self) -> Vec<WalObject> {
        let mut out = Vec::new();
        let mut iter = self.segments.iter().peekable();
        let mut previous: Option<(u32, u64)> = None;
        while let Some((&(tli, segno), o)) = iter.next() {
            let after_hole = previous.is_some_and(|(t, s)| t == tli && s.saturating_add(1) < segno);
            let last = iter.peek().is_none_or(|&(&(t, _), _)| t != tli);
            if after_hole || last {
                out.push(o.clone());
            }
            previous = Some((tli, segno));
        }
        out
    }

    /// The timelines recovery follows from `timeline` at `from_lsn`: the newest timeline whose
    /// history passes through `timeline` after `from_lsn`, as (timeline, first LSN) pairs.
    fn path(&self, timeline: u32, from_lsn: u64) -> Path {
        let mut best = vec![(timeline, from_lsn)];
        for (&tli, history) in &self.histories {
            if tli <= best.last().map_or(0, |b| b.0) {
                continue;
            }
            // history: [(parent, switch)] oldest first; the timeline's ancestry is these parents.
            let Some(pos) = history.iter().position(|&(p, _)| p == timeline) else {
                continue;
            };
            if history[pos].1 < from_lsn {
                continue; // branched off before the backup was consistent
            }
            let mut path = vec![(timeline, from_lsn)];
            for (i, &(_, switch)) in history.iter().enumerate().skip(pos) {
                let next = history.get(i + 1).map_or(tli, |h| h.0);
                path.push((next, switch));
            }
            best = path;
        }
        best
    }

    /// The timeline that segment `segno` is replayed from on `path`.
    fn timeline_of(&self, path: &Path, segno: u64) -> u32 {
        path.iter()
            .rev()
            .find(|&&(_, begin)| begin / self.seg_size <= segno)
            .map_or(path.first().map_or(0, |p| p.0), |p| p.0)
    }

    /// The segments on `path` from segment `first` on, in replay order: the only ones recovery
    /// reads (an older timeline that went on after a switch is not part of it, and its later
    /// segments are no gap in the newer one).
    fn on_path(&self, path: &Path, first: u64) -> Vec<(u64, &WalObject)> {
        let mut out: Vec<(u64, &WalObject)> = self
            .segments
            .iter()
            .filter(|&(&(t, s), _)| s >= first && self.timeline_of(path, s) == t)
            .map(|(&(_, s), o)| (s, o))
            .collect();
        // One timeline per segment number on a path: the order is the replay order.
        out.sort_by_key(|&(s, _)| s);
        out
    }

    /// The window of a base backup consistent at `stop` on `timeline`.
    pub fn window(&self, timeline: u32, stop: Lsn) -> RecoveryWindow {
        let stop_lsn = stop.0;
        let path = self.path(timeline, stop_lsn);
        let mut window = RecoveryWindow {
            timeline: path.last().map_or(timeline, |p| p.0),
            latest_lsn: stop,
            latest_time: None,
            gaps: Vec::new(),
            rejected: self.rejected.clone(),
        };
        if self.seg_size == 0 {
            return window;
        }
        let first = stop_lsn / self.seg_size;
        let segments = self.on_path(&path, first);
        let Some(&(max_segno, _)) = segments.last() else {
            return window;
        };
        let mut expected = first;
        let mut contiguous = true;
        for (segno, o) in segments {
            let tli = self.timeline_of(&path, segno);
            if segno > expected {
                contiguous = false;
                window.gaps.push(format!(
                    "{} … {}",
                    WalFile::from_segno(tli, expected, self.seg_size).name(),
                    WalFile::from_segno(tli, segno - 1, self.seg_size).name()
                ));
            }
            if contiguous {
                // WAL the archive holds only up to before the backup's consistent point (a partial
                // of its last segment shipped before it finished) moves nothing: the window never
                // ends before the backup does.
                if let Some(end) = o.end_lsn(self.seg_size)
                    && end > window.latest_lsn
                {
                    window.latest_lsn = end;
                    window.latest_time = Some(o.captured);
                }
                // A partial is the end of what is known of this timeline's segment.
                if o.kind == Kind::Partial
                    && segno < max_segno
                    && self.timeline_of(&path, segno + 1) == tli
                {
                    contiguous = false;
                }
            }
            expected = segno.saturating_add(1);
        }
        window
    }

    /// The WAL objects a restore of a base backup (replay from `start`, consistent at `stop` on
    /// `timeline`) reads to reach the end of its window, in replay order (history files first):
    /// what `verify` re-reads to prove the chain restorable.
    pub fn chain(&self, timeline: u32, start: Lsn, stop: Lsn) -> Vec<WalObject> {
        let path = self.path(timeline, stop.0);
        let mut out: Vec<WalObject> = self
            .history_objects
            .iter()
            .filter(|(t, _)| path.iter().any(|p| p.0 == **t))
            .map(|(_, o)| o.clone())
            .collect();
        if self.seg_size == 0 {
            return out;
        }
        let end = self.window(timeline, stop).latest_lsn.0;
        let last = end.saturating_sub(1) / self.seg_size;
        out.extend(
            self.on_path(&path, start.0 / self.seg_size)
                .into_iter()
                .take_while(|&(s, _)| s <= last)
                .map(|(_, o)| o.clone()),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::digest::Sha256Digest;

    const SEG: u64 = 16 << 20;

    fn obj(tli: u32, segno: u64, kind: Kind, end: u64, ms: i64) -> WalObject {
        let file = WalFile::from_segno(tli, segno, SEG);
        let at = Utc.timestamp_millis_opt(ms).unwrap();
        let key = WalObject::key(
            "wal/1/",
            &file,
            kind,
            end,
            at,
            &Sha256Digest::from([0xaa; 32]),
        );
        WalObject::parse(&key, "wal/1/").unwrap()
    }

    fn history(tli: u32) -> WalObject {
        let file = WalFile::History { timeline: tli };
        let at = Utc.timestamp_millis_opt(1).unwrap();
        let key = WalObject::key(
            "wal/1/",
            &file,
            Kind::History,
            60,
            at,
            &Sha256Digest::from([0xcc; 32]),
        );
        WalObject::parse(&key, "wal/1/").unwrap()
    }

    fn index(objects: Vec<WalObject>, histories: Vec<(u32, Vec<(u32, u64)>)>) -> WalIndex {
        WalIndex::new(
            SEG,
            objects,
            histories.into_iter().map(|(tli, lines)| {
                (
                    history(tli),
                    lines.into_iter().map(|(t, l)| (t, Lsn(l))).collect(),
                )
            }),
        )
    }

    fn segnos(objects: &[WalObject]) -> Vec<u64> {
        objects.iter().filter_map(|o| o.file.segno(SEG)).collect()
    }

    #[test]
    fn window_follows_the_archive_and_reports_gaps() {
        let idx = index(
            vec![
                obj(1, 2, Kind::Seg, SEG, 1000),
                obj(1, 3, Kind::Seg, SEG, 2000),
                obj(1, 4, Kind::Partial, 0x4000, 3000),
            ],
            vec![],
        );
        let w = idx.window(1, Lsn(2 * SEG + 100));
        assert_eq!(w.latest_lsn, Lsn(4 * SEG + 0x4000));
        assert_eq!(w.latest_time.unwrap().timestamp_millis(), 3000);
        assert!(w.gaps.is_empty());

        let gap = index(
            vec![
                obj(1, 2, Kind::Seg, SEG, 1000),
                obj(1, 5, Kind::Seg, SEG, 4000),
            ],
            vec![],
        );
        let w = gap.window(1, Lsn(2 * SEG + 100));
        assert_eq!(w.latest_lsn, Lsn(3 * SEG));
        // The chain a restore reads stops where the window does.
        let chain = gap.chain(1, Lsn(2 * SEG), Lsn(2 * SEG + 100));
        assert_eq!(segnos(&chain), vec![2]);
        let chain = idx.chain(1, Lsn(2 * SEG), Lsn(2 * SEG + 100));
        assert_eq!(segnos(&chain), vec![2, 3, 4]);
        assert_eq!(
            w.gaps,
            vec!["000000010000000000000003 … 000000010000000000000004"]
        );
    }

    #[test]
    fn a_missing_first_segment_is_a_gap_and_a_middle_partial_ends_the_window() {
        let idx = index(
            vec![
                obj(1, 3, Kind::Seg, SEG, 1000),
                obj(1, 4, Kind::Partial, 0x10, 2000),
                obj(1, 5, Kind::Seg, SEG, 3000),
            ],
            vec![],
        );
        let w = idx.window(1, Lsn(2 * SEG + 100));
        assert_eq!(w.latest_lsn, Lsn(2 * SEG + 100));
        assert_eq!(w.latest_time, None);
        assert_eq!(
            w.gaps,
            vec!["000000010000000000000002 … 000000010000000000000002"]
        );
        // From segment 3 on: the partial in the middle is where the known WAL ends.
        let w = idx.window(1, Lsn(3 * SEG));
        assert_eq!(w.latest_lsn, Lsn(4 * SEG + 0x10));
        assert!(w.gaps.is_empty());
        // A window with nothing after the backup ends where the backup does.
        let w = index(vec![], vec![]).window(7, Lsn(SEG));
        assert_eq!((w.timeline, w.latest_lsn), (7, Lsn(SEG)));
    }

    #[test]
    fn hostile_keys_cost_one_entry_not_a_loop_over_their_numbers() {
        // The largest segment number a name can hold: walking the range to it would never end.
        let far = WalObject::parse(
            &format!(
                "wal/1/00000001FFFFFFFF000000FF.seg.ffffff.1.{}.zst",
                "a".repeat(64)
            ),
            "wal/1/",
        )
        .unwrap();
        // And one whose `end` lies past its segment: it has no position, so it is left out.
        let long = WalObject::parse(
            &format!(
                "wal/1/000000010000000000000003.seg.ffffffffff.1.{}.zst",
                "a".repeat(64)
            ),
            "wal/1/",
        )
        .unwrap();
        let idx = index(vec![obj(1, 2, Kind::Seg, SEG, 1000), far, long], vec![]);
        let started = std::time::Instant::now();
        let w = idx.window(1, Lsn(2 * SEG));
        assert_eq!(w.latest_lsn, Lsn(3 * SEG));
        assert_eq!(w.gaps.len(), 1, "{:?}", w.gaps);
        assert_eq!(
            segnos(&idx.chain(1, Lsn(0), Lsn(2 * SEG))),
            vec![2],
            "the chain stops at the gap"
        );
        // A damaged manifest's start position far before the archive costs nothing either.
        assert_eq!(segnos(&idx.chain(1, Lsn(0), Lsn(2 * SEG))).len(), 1);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn window_follows_a_newer_timeline() {
        // Timeline 2 branched from 1 inside segment 4.
        let objects = vec![
            obj(1, 3, Kind::Seg, SEG, 1000),
            obj(1, 4, Kind::Partial, 0x8000, 2000),
            obj(2, 4, Kind::Seg, SEG, 3000),
            obj(2, 5, Kind::Partial, 0x2000, 4000),
        ];
        let histories = vec![(2, vec![(1, 4 * SEG + 0x6000)])];
        let idx = index(objects.clone(), histories.clone());
        let w = idx.window(1, Lsn(3 * SEG + 10));
        assert_eq!(w.timeline, 2);
        assert_eq!(w.latest_lsn, Lsn(5 * SEG + 0x2000));
        assert!(w.gaps.is_empty(), "{:?}", w.gaps);
        // The history file is read first, then timeline 1 up to the switch, then 2.
        let chain = idx.chain(1, Lsn(3 * SEG), Lsn(3 * SEG + 10));
        assert_eq!(chain[0].file, WalFile::History { timeline: 2 });
        assert_eq!(
            chain[1..]
                .iter()
                .map(|o| (o.file.timeline(), o.file.segno(SEG).unwrap()))
                .collect::<Vec<_>>(),
            vec![(1, 3), (2, 4), (2, 5)]
        );
        // Timeline 1 going on after the branch (the old server kept running) is no gap in 2.
        let mut more = objects;
        for segno in 5..9 {
            more.push(obj(1, segno, Kind::Seg, SEG, 5000));
        }
        let idx = index(more, histories);
        let w = idx.window(1, Lsn(3 * SEG + 10));
        assert_eq!(w.timeline, 2);
        assert!(w.gaps.is_empty(), "{:?}", w.gaps);
        assert_eq!(w.latest_lsn, Lsn(5 * SEG + 0x2000));
        // A backup taken after the branch point does not follow timeline 2.
        let w = idx.window(1, Lsn(4 * SEG + 0x7000));
        assert_eq!(w.timeline, 1);
    }

    /// Found by the store_listing fuzz target: a partial of the backup's last segment shipped
    /// before the backup finished (or a forged key with a short `end`) put the window's end before
    /// the backup's consistent point, a window that ends before it starts.
    #[test]
    fn wal_ending_before_the_backup_does_not_end_the_window_before_it() {
        let stop = Lsn(2 * SEG + 0x100);
        for kind in [Kind::Partial, Kind::Seg] {
            let idx = index(vec![obj(1, 2, kind, 0x10, 1000)], vec![]);
            let w = idx.window(1, stop);
            assert_eq!((w.latest_lsn, w.latest_time), (stop, None), "{kind:?}");
        }
        // Later WAL after it still counts once the partial is superseded by the segment.
        let idx = index(
            vec![
                obj(1, 2, Kind::Partial, 0x10, 1000),
                obj(1, 2, Kind::Seg, SEG, 2000),
                obj(1, 3, Kind::Partial, 0x20, 3000),
            ],
            vec![],
        );
        assert_eq!(idx.window(1, stop).latest_lsn, Lsn(3 * SEG + 0x20));
    }

    /// What a name alone would move: the last object of each timeline and the first after each
    /// hole; objects inside an unbroken run are not among them.
    #[test]
    fn suspects_are_the_ends_of_timelines_and_the_first_after_each_hole() {
        let idx = index(
            vec![
                obj(1, 2, Kind::Seg, SEG, 1000),
                obj(1, 3, Kind::Seg, SEG, 1000),
                obj(1, 4, Kind::Seg, SEG, 1000),
                obj(1, 9, Kind::Seg, SEG, 1000),
                obj(1, 10, Kind::Partial, 0x10, 1000),
                obj(2, 4, Kind::Partial, 0x10, 1000),
            ],
            vec![],
        );
        let found: Vec<(u32, u64)> = idx
            .suspects()
            .iter()
            .map(|o| (o.file.timeline(), o.file.segno(SEG).unwrap()))
            .collect();
        assert_eq!(found, vec![(1, 9), (1, 10), (2, 4)]);
        assert!(index(vec![], vec![]).suspects().is_empty());
    }

    #[test]
    fn a_complete_segment_beats_partials_and_the_longest_partial_wins() {
        let idx = index(
            vec![
                obj(1, 2, Kind::Partial, 0x100, 1000),
                obj(1, 2, Kind::Partial, 0x300, 2000),
                obj(1, 2, Kind::Partial, 0x200, 3000),
            ],
            vec![],
        );
        assert_eq!(idx.window(1, Lsn(2 * SEG)).latest_lsn, Lsn(2 * SEG + 0x300));
        let idx = index(
            vec![
                obj(1, 2, Kind::Seg, SEG, 1000),
                obj(1, 2, Kind::Partial, 0x300, 2000),
            ],
            vec![],
        );
        assert_eq!(idx.window(1, Lsn(2 * SEG)).latest_lsn, Lsn(3 * SEG));
    }
}
