//! Lines of PostgreSQL's timeline history files: `parent timeline`, `switch LSN`, `reason`, with
//! `#` comments. A leaf module next to [`crate::lsn`], so the WAL archive (which refuses a bad
//! line) and the engine (which reads the server's `TIMELINE_HISTORY` answer and keeps the reason)
//! share one parser without the engine importing the archive.

use crate::lsn::Lsn;

/// One line of a history file: the parent timeline, where the child began and the reason (the
/// rest of the line, trimmed); `None` for a line that is not one.
pub(crate) fn parse_line(line: &str) -> Option<(u32, Lsn, &str)> {
    let line = line.trim();
    let (tli, rest) = line.split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    let (lsn, reason) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    Some((tli.parse().ok()?, lsn.parse().ok()?, reason.trim()))
}

/// Whether a history line carries nothing (blank or a comment).
pub(crate) fn is_blank(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with('#')
}
