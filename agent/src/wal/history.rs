//! Timeline history files in the archive: a bad line is refused, since recovery chooses its
//! timeline through them. The line format is [`crate::timeline_history`]'s.

use super::{WalError, naming::WalFile};
use crate::{
    lsn::Lsn,
    timeline_history::{is_blank, parse_line},
};

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
