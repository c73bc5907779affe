//! Recovery target times as users type them, shared by the agent (point-in-time restore) and the
//! plugin (choosing the Qdrant backups of a set restored to a time).

use chrono::{DateTime, FixedOffset};

/// A target time in RFC 3339 (`2026-11-29T14:35:01.8Z`) or as PostgreSQL prints a `timestamptz`
/// (`2026-11-29 14:35:01.800778+00`, `+05:30`, with or without a fraction), so a time copied from
/// `now()` or a log line works as it is.
pub fn parse_target_time(t: &str) -> Result<DateTime<FixedOffset>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(t).or_else(|rfc| {
        DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f%#z")
            // Report what the form the value resembles found wrong.
            .map_err(|pg| if t.contains('T') { rfc } else { pg })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_name_the_same_instant() {
        let rfc = parse_target_time("2026-11-29T14:35:01.800778Z").unwrap();
        let pg = parse_target_time("2026-11-29 14:35:01.800778+00").unwrap();
        assert_eq!(rfc, pg);
        assert!(parse_target_time("2026-11-29 14:35:01+05:30").is_ok());
        assert!(parse_target_time("yesterday").is_err());
    }
}
