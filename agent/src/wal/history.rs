//! Timeline history files: `parent timeline`, `switch LSN`, `reason` per line, `#` comments.
//! One line parser serves the archive (which refuses a bad line) and the server's
//! `TIMELINE_HISTORY` answer (which keeps the reason).

use super::{WalError, naming::WalFile};
use crate::lsn::Lsn;

/// One line of a history file: the parent timeline, where the child began and the reason (the
/// rest of the line, trimmed); `None` for a line that is not one.
pub fn parse_line(line: &str) -> Option<(u32, Lsn, &str)> {
    let line = line.trim();
    let (tli, rest) = line.split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    let (lsn, reason) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    Some((tli.parse().ok()?, lsn.parse().ok()?, reason.trim()))
}

/// Whether a history line carries nothing (blank or a comment).
pub fn is_blank(line: &str) -> bool {
    let line = line.trim();
    line.is_empty() || line.starts_with('#')
}

/// Parses a history file's text into (parent timeline, switch LSN), refusing a bad line.
pub fn parse_history(file: &WalFile, text: &str) -> Result<Vec<(u32, Lsn)>, WalError> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !is_blank(l)) {
        let (tli, lsn, _) = parse_line(line).ok_or_else(|| WalError::BadHistory {
            file: file.name(),
            reason: format!("line {:?} is not `timeline  LSN  reason`", line.trim()),
        })?;
        out.push((tli, lsn));
    }
    Ok(out)
}
