//! Validation data for restore drills read from the dump itself: pg_dump's custom format carries
//! each table's `COPY` text in its own data blocks, so counting and hashing those rows as the
//! archive streams to the store costs no second scan of the database.
//!
//! The archive's header and table of contents are parsed as they pass, every table's data block
//! hashed line by line (one line is one row in `COPY` text), and nothing is buffered beyond one
//! piece of the stream: memory does not grow with a table. The drill hashes `COPY … TO STDOUT`
//! of the restored table with the same [`RowHasher`], under the settings pg_dump pins, so the
//! same rows give the same checksum. Rows are combined by a wrapping sum of per-row hashes:
//! order-independent, and duplicate rows do not cancel out as they would under xor.
//!
//! The bytes come from pg_dump, but names and data are the database's: every length is checked
//! against what is left to read, kept strings are bounded, and anything unexpected is an error
//! naming the byte offset, never a panic.

use std::collections::BTreeMap;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use super::TableStats;

/// How the checksums a backup records were computed, so a drill recomputes the same function.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum ChecksumKind {
    /// A query in the dump's snapshot: `sum(hashtextextended(t::text, 0))` over each table
    /// (backups written before the dump was read for validation data).
    #[default]
    #[serde(rename = "row-text-hashtextextended")]
    RowText,
    /// [`RowHasher`] over each table's `COPY` text, read from the dump.
    #[serde(rename = "copy-text-word64-sum")]
    CopyText,
}

/// Longest string of the table of contents kept (names, the encoding statement); PostgreSQL
/// names are at most 63 bytes, so anything longer is a malformed archive.
const MAX_KEPT: i64 = 64 * 1024;
/// The custom format (`archCustom`); directory and tar archives are not streamed.
const FORMAT_CUSTOM: u8 = 1;
/// Block types of the data section.
const BLK_DATA: u8 = 1;
const BLK_BLOBS: u8 = 3;
/// Archive versions read: 1.12 (pg_dump 11) to 1.16 (pg_dump 17).
const MIN_VERSION: (u8, u8) = (1, 12);
const MAX_VERSION: (u8, u8) = (1, 16);
/// The row hash's start and its word multiplier (odd, so each step is a bijection).
const ROW_SEED: u64 = 0xcbf2_9ce4_8422_2325;
const WORD_PRIME: u64 = 0x9e37_79b9_7f4a_7c15;

/// Why a dump could not be read for validation data.
#[derive(Debug, thiserror::Error)]
pub enum DumpStatsError {
    /// The stream is not a custom-format archive as pg_dump writes it.
    #[error("pg_dump's archive is malformed at byte {offset}: {what}")]
    Malformed {
        /// Bytes read before the problem.
        offset: u64,
        /// What was wrong.
        what: String,
    },
    /// An archive version this agent does not know the layout of.
    #[error(
        "pg_dump wrote archive version {major}.{minor}, which this agent cannot read for validation data (it reads 1.12 to 1.16, pg_dump 11 to 17): use pg_dump 11 to 17 (--pg-bin-dir)"
    )]
    Version {
        /// Major.
        major: u8,
        /// Minor.
        minor: u8,
    },
    /// The data blocks are compressed, so their rows cannot be read as they pass.
    #[error(
        "pg_dump's archive is compressed ({what}); the agent runs pg_dump with --compress=0 and compresses itself, so a wrapper or a newer pg_dump changed that: point --pg-bin-dir at an unmodified pg_dump"
    )]
    Compressed {
        /// The compression the header names.
        what: String,
    },
    /// Reading the stream failed.
    #[error("reading pg_dump's archive: {0}")]
    Io(#[from] std::io::Error),
}

/// What a dump says for validation: its encoding and every table's rows and checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpStats {
    /// The client encoding its `COPY` text is in (the `ENCODING` entry), `None` if it has none.
    pub encoding: Option<String>,
    /// One entry per `TABLE DATA` entry, ordered by schema and name.
    pub tables: Vec<TableStats>,
}

/// Count and order-independent checksum of `COPY` text rows, fed in pieces of any size.
///
/// Each row (a line without its newline) is read eight bytes at a time (little-endian words,
/// the last padded with zeros), each word mixed in as `rotl31((h ^ w) * P)`, the row's length
/// added, and the result finished with a multiply-xorshift; rows are added (wrapping) to the sum.
/// Eight bytes per step keeps up with pg_dump on a shared core where a byte-at-a-time hash did
/// not; the function is fixed and documented, since the value is stored in manifests and
/// recomputed by later agent versions.
///
/// pg_dump ends each table's data with the end-of-data line `\.` and blank lines; `COPY TO
/// STDOUT` through psql has none. `\.` is never a row (COPY writes a backslash in data as
/// `\\`), so rows end there and only blank lines may follow.
#[derive(Debug, Clone)]
pub(crate) struct RowHasher {
    row: u64,
    len: u64,
    head: [u8; 2],
    word: [u8; 8],
    word_len: usize,
    rows: u64,
    sum: u64,
    ended: bool,
    after_end: bool,
}

impl Default for RowHasher {
    fn default() -> Self {
        Self {
            row: ROW_SEED,
            len: 0,
            head: [0; 2],
            word: [0; 8],
            word_len: 0,
            rows: 0,
            sum: 0,
            ended: false,
            after_end: false,
        }
    }
}

/// The first byte of `bytes` that is a newline, found eight bytes at a time.
fn newline(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let x = u64::from_le_bytes(w) ^ (ONES * u64::from(b'\n'));
        if x.wrapping_sub(ONES) & !x & HIGHS != 0 {
            return chunk.iter().position(|&b| b == b'\n').map(|i| at + i);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| at + i)
}

impl RowHasher {
    /// Feeds the next bytes of the text.
    pub(crate) fn update(&mut self, mut bytes: &[u8]) {
        while let Some(i) = newline(bytes) {
            self.feed(&bytes[..i]);
            self.end_row();
            bytes = &bytes[i + 1..];
        }
        self.feed(bytes);
    }

    fn mix(&mut self, word: u64) {
        self.row = (self.row ^ word).wrapping_mul(WORD_PRIME).rotate_left(31);
    }

    /// Part of a row.
    fn feed(&mut self, mut bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        for (i, &b) in bytes.iter().take(2).enumerate() {
            if let Some(h) = self.head.get_mut(self.len as usize + i) {
                *h = b;
            }
        }
        self.len += bytes.len() as u64;
        if self.word_len > 0 {
            let take = (8 - self.word_len).min(bytes.len());
            self.word[self.word_len..self.word_len + take].copy_from_slice(&bytes[..take]);
            self.word_len += take;
            bytes = &bytes[take..];
            if self.word_len < 8 {
                return;
            }
            self.mix(u64::from_le_bytes(self.word));
            self.word_len = 0;
        }
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        self.word[..rest.len()].copy_from_slice(rest);
        self.word_len = rest.len();
    }

    fn end_row(&mut self) {
        if self.word_len > 0 {
            let mut w = [0u8; 8];
            w[..self.word_len].copy_from_slice(&self.word[..self.word_len]);
            self.mix(u64::from_le_bytes(w));
            self.word_len = 0;
        }
        if self.ended {
            self.after_end |= self.len != 0;
        } else if self.len == 2 && &self.head == b"\\." {
            self.ended = true;
        } else {
            self.sum = self.sum.wrapping_add(finish(self.row ^ self.len));
            self.rows += 1;
        }
        self.row = ROW_SEED;
        self.len = 0;
    }

    /// Whether the text read is whole `COPY` text: every row ended by a newline, and nothing
    /// but blank lines after an end-of-data line.
    pub(crate) fn is_complete(&self) -> bool {
        self.len == 0 && !self.after_end
    }

    /// Rows counted.
    pub(crate) fn rows(&self) -> u64 {
        self.rows
    }

    /// The checksum as recorded: the sum in decimal.
    pub(crate) fn checksum(&self) -> String {
        self.sum.to_string()
    }
}

/// Spreads a row's FNV state over all bits (the finaliser of a 64-bit mix).
fn finish(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The archive read sequentially, with the sizes its header declares.
struct Archive<R> {
    inner: R,
    offset: u64,
    int_size: usize,
    off_size: usize,
    version: (u8, u8),
}

impl<R: AsyncBufRead + Unpin> Archive<R> {
    fn malformed(&self, what: impl Into<String>) -> DumpStatsError {
        DumpStatsError::Malformed {
            offset: self.offset,
            what: what.into(),
        }
    }

    /// The next byte, `None` at the end of the stream.
    async fn byte_or_end(&mut self) -> Result<Option<u8>, DumpStatsError> {
        let buf = self.inner.fill_buf().await?;
        let Some(&b) = buf.first() else {
            return Ok(None);
        };
        self.inner.consume(1);
        self.offset += 1;
        Ok(Some(b))
    }

    async fn byte(&mut self) -> Result<u8, DumpStatsError> {
        match self.byte_or_end().await? {
            Some(b) => Ok(b),
            None => Err(self.malformed("the stream ends early")),
        }
    }

    /// Passes the next `len` bytes to `each` in the pieces they arrive in.
    async fn pass(&mut self, len: u64, mut each: impl FnMut(&[u8])) -> Result<(), DumpStatsError> {
        let mut left = len;
        while left > 0 {
            let buf = self.inner.fill_buf().await?;
            if buf.is_empty() {
                return Err(self.malformed("the stream ends early"));
            }
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            each(&buf[..n]);
            self.inner.consume(n);
            self.offset += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    /// `ReadInt`: a sign byte, then `int_size` bytes, least significant first.
    async fn int(&mut self) -> Result<i64, DumpStatsError> {
        let negative = self.byte().await? != 0;
        let mut value: i64 = 0;
        for i in 0..self.int_size {
            value |= i64::from(self.byte().await?) << (8 * i);
        }
        // Eight bytes may make `i64::MIN`, which has no negation: wrap, it is malformed anyway.
        Ok(if negative {
            value.wrapping_neg()
        } else {
            value
        })
    }

    /// `ReadStr`: a length (negative: no string) and that many bytes, kept when `keep`.
    async fn string(&mut self, keep: bool) -> Result<Option<Vec<u8>>, DumpStatsError> {
        let len = self.int().await?;
        if len < 0 {
            return Ok(None);
        }
        if !keep {
            self.pass(len as u64, |_| {}).await?;
            return Ok(Some(Vec::new()));
        }
        if len > MAX_KEPT {
            return Err(self.malformed(format!("a name of {len} bytes")));
        }
        let mut out = Vec::with_capacity(len as usize);
        self.pass(len as u64, |b| out.extend_from_slice(b)).await?;
        Ok(Some(out))
    }

    async fn header(&mut self) -> Result<(), DumpStatsError> {
        let mut magic = [0u8; 5];
        for m in &mut magic {
            *m = self.byte().await?;
        }
        if &magic != b"PGDMP" {
            return Err(self.malformed("not a pg_dump archive (no PGDMP at the start)"));
        }
        let (major, minor, _rev) = (self.byte().await?, self.byte().await?, self.byte().await?);
        if (major, minor) < MIN_VERSION || (major, minor) > MAX_VERSION {
            return Err(DumpStatsError::Version { major, minor });
        }
        self.version = (major, minor);
        self.int_size = usize::from(self.byte().await?);
        self.off_size = usize::from(self.byte().await?);
        if !(1..=8).contains(&self.int_size) || !(1..=8).contains(&self.off_size) {
            return Err(self.malformed(format!(
                "integer size {} or offset size {}",
                self.int_size, self.off_size
            )));
        }
        let format = self.byte().await?;
        if format != FORMAT_CUSTOM {
            return Err(self.malformed(format!("archive format {format}, not custom")));
        }
        if self.version >= (1, 15) {
            let algorithm = self.byte().await?;
            if algorithm != 0 {
                return Err(DumpStatsError::Compressed {
                    what: format!("algorithm {algorithm}"),
                });
            }
        } else {
            let level = self.int().await?;
            if level != 0 {
                return Err(DumpStatsError::Compressed {
                    what: format!("zlib level {level}"),
                });
            }
        }
        // Creation time (7 integers), database name, server and pg_dump versions.
        for _ in 0..7 {
            self.int().await?;
        }
        for _ in 0..3 {
            self.string(false).await?;
        }
        Ok(())
    }

    /// Reads the table of contents: the `TABLE DATA` entries by dump id and the encoding.
    async fn toc(&mut self) -> Result<(BTreeMap<i64, Entry>, Option<String>), DumpStatsError> {
        let count = self.int().await?;
        if count < 0 {
            return Err(self.malformed(format!("{count} table of contents entries")));
        }
        let mut tables = BTreeMap::new();
        let mut encoding = None;
        // Each entry takes dozens of bytes, so the stream, not `count`, bounds this loop.
        for _ in 0..count {
            let id = self.int().await?;
            self.int().await?; // hadDumper
            self.string(false).await?; // table oid
            self.string(false).await?; // oid
            let tag = self.string(true).await?.unwrap_or_default();
            let desc = self.string(true).await?.unwrap_or_default();
            self.int().await?; // section
            let defn = self.string(desc == b"ENCODING").await?;
            self.string(false).await?; // drop statement
            self.string(false).await?; // copy statement
            let namespace = self.string(true).await?.unwrap_or_default();
            self.string(false).await?; // tablespace
            if self.version >= (1, 14) {
                self.string(false).await?; // table access method
            }
            if self.version >= (1, 16) {
                self.int().await?; // relkind
            }
            self.string(false).await?; // owner
            self.string(false).await?; // "with oids"
            while self.string(false).await?.is_some() {} // dependencies
            self.byte().await?; // data offset's flag
            self.pass(self.off_size as u64, |_| {}).await?;
            if desc == b"ENCODING" {
                encoding = defn.as_deref().and_then(encoding_of);
            } else if desc == b"TABLE DATA" {
                let entry = Entry {
                    schema: String::from_utf8_lossy(&namespace).into_owned(),
                    table: String::from_utf8_lossy(&tag).into_owned(),
                    hasher: None,
                };
                if tables.insert(id, entry).is_some() {
                    return Err(self.malformed(format!("dump id {id} listed twice")));
                }
            }
        }
        Ok((tables, encoding))
    }

    /// Passes a data block's chunks (a length, that many bytes; a zero length ends it) to `each`.
    async fn chunks(&mut self, mut each: impl FnMut(&[u8])) -> Result<(), DumpStatsError> {
        loop {
            let len = self.int().await?;
            if len == 0 {
                return Ok(());
            }
            if len < 0 {
                return Err(self.malformed(format!("a data chunk of {len} bytes")));
            }
            self.pass(len as u64, &mut each).await?;
        }
    }
}

/// A `TABLE DATA` entry and, once its block was read, its rows.
struct Entry {
    schema: String,
    table: String,
    hasher: Option<RowHasher>,
}

/// The encoding name out of `SET client_encoding = 'NAME';`, if it is a plain name.
fn encoding_of(defn: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(defn).ok()?;
    let name = text.split('\'').nth(1)?;
    let plain = !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    plain.then(|| name.to_string())
}

/// Reads a whole custom-format archive, without compression, and returns its tables' rows and
/// checksums. Fails on anything pg_dump does not write: a table whose data block is missing,
/// repeated or ends inside a row, an unknown block, a short stream.
pub async fn dump_stats<R: AsyncBufRead + Unpin>(reader: R) -> Result<DumpStats, DumpStatsError> {
    let mut a = Archive {
        inner: reader,
        offset: 0,
        int_size: 4,
        off_size: 8,
        version: MIN_VERSION,
    };
    a.header().await?;
    let (mut tables, encoding) = a.toc().await?;
    while let Some(kind) = a.byte_or_end().await? {
        let id = a.int().await?;
        match kind {
            BLK_DATA => match tables.get_mut(&id) {
                Some(entry) => {
                    if entry.hasher.is_some() {
                        return Err(a.malformed(format!("two data blocks for dump id {id}")));
                    }
                    let mut hasher = RowHasher::default();
                    a.chunks(|b| hasher.update(b)).await?;
                    if !hasher.is_complete() {
                        return Err(a.malformed(format!(
                            "the data of {}.{} ends inside a row or goes on after its end",
                            entry.schema, entry.table
                        )));
                    }
                    entry.hasher = Some(hasher);
                }
                None => a.chunks(|_| {}).await?,
            },
            BLK_BLOBS => loop {
                if a.int().await? == 0 {
                    break;
                }
                a.chunks(|_| {}).await?;
            },
            other => return Err(a.malformed(format!("unknown block type {other}"))),
        }
    }
    let mut out = Vec::with_capacity(tables.len());
    for entry in tables.into_values() {
        let Some(hasher) = entry.hasher else {
            return Err(a.malformed(format!(
                "no data block for table {}.{}",
                entry.schema, entry.table
            )));
        };
        out.push(TableStats {
            schema: entry.schema,
            table: entry.table,
            rows: hasher.rows(),
            checksum: hasher.checksum(),
        });
    }
    out.sort_by(|x, y| (&x.schema, &x.table).cmp(&(&y.schema, &y.table)));
    Ok(DumpStats {
        encoding,
        tables: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_counted_and_summed_in_any_order_and_any_pieces() {
        let mut whole = RowHasher::default();
        whole.update(b"1\ta\n2\t\\N\n\n");
        let mut pieces = RowHasher::default();
        for b in b"\n2\t\\N\n1\ta\n" {
            pieces.update(std::slice::from_ref(b));
        }
        assert_eq!(whole.rows(), 3);
        assert_eq!(whole.checksum(), pieces.checksum());
        let mut changed = RowHasher::default();
        changed.update(b"1\tb\n2\t\\N\n\n");
        assert_ne!(whole.checksum(), changed.checksum());
        let mut twice = RowHasher::default();
        twice.update(b"1\ta\n1\ta\n");
        assert_ne!(twice.checksum(), "0", "duplicate rows do not cancel out");
        let mut open = RowHasher::default();
        open.update(b"1\ta");
        assert!(!open.is_complete());
        let mut dumped = RowHasher::default();
        dumped.update(b"\n2\t\\N\n1\ta\n\\.\n\n\n");
        assert!(dumped.is_complete());
        assert_eq!((dumped.rows(), dumped.checksum()), (3, whole.checksum()));
        dumped.update(b"3\n");
        assert!(!dumped.is_complete(), "rows after the end of data");
    }

    #[test]
    fn encoding_names_are_plain() {
        assert_eq!(
            encoding_of(b"SET client_encoding = 'UTF8';\n").as_deref(),
            Some("UTF8")
        );
        assert_eq!(encoding_of(b"SET client_encoding = 'a;b';"), None);
        assert_eq!(encoding_of(b"nothing"), None);
    }

    #[tokio::test]
    async fn junk_is_an_error() {
        for junk in [
            &b""[..],
            b"PGDMP",
            b"PGDMQ\x01\x0e\x00\x04\x08\x01",
            b"PGDMP\x01\x0e",
        ] {
            assert!(dump_stats(junk).await.is_err(), "{junk:?}");
        }
        let e = dump_stats(&b"PGDMP\x01\x09\x00\x04\x08\x01"[..])
            .await
            .unwrap_err();
        assert!(
            matches!(e, DumpStatsError::Version { major: 1, minor: 9 }),
            "{e}"
        );
    }
}
