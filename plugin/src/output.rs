//! Rendering results as kubectl does: a table (`-o wide` adds columns, `--no-headers` drops the
//! header line), `resource/name` lines, JSON, YAML, or a JSONPath template over the JSON document.

pub mod jsonpath;

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use soma_proto::v1;

use crate::{cli::OutputFormat, error::CliError};

/// `--no-headers`: set once from the command line before any command prints; a process-wide
/// presentation choice, like the terminal width, rather than a parameter of every command.
static NO_HEADERS: AtomicBool = AtomicBool::new(false);

/// Whether `--no-headers` was given.
pub fn no_headers() -> bool {
    NO_HEADERS.load(Ordering::Relaxed)
}

/// Makes [`table`] print no header line (`--no-headers`).
pub fn set_no_headers(no_headers: bool) {
    NO_HEADERS.store(no_headers, Ordering::Relaxed);
}

/// Human-readable byte count, e.g. `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Prints `value` as JSON, YAML, a JSONPath template's result, or (`-o name`) `backup/<id>` for
/// the document (or each element of a list) that names a backup by `id` or `backup_id`. A
/// command without a table of its own prints YAML for `table`/`wide`.
pub fn print_structured<T: Serialize>(format: OutputFormat, value: &T) -> Result<(), CliError> {
    print!("{}", structured(format, value, "backup")?);
    Ok(())
}

/// What [`print_structured`] prints, with `kind` as the resource of `-o name`.
pub fn structured<T: Serialize>(
    format: OutputFormat,
    value: &T,
    kind: &str,
) -> Result<String, CliError> {
    let unreadable =
        |e: &dyn std::fmt::Display| CliError::Other(format!("cannot encode the result: {e}"));
    Ok(match format {
        OutputFormat::Yaml | OutputFormat::Table | OutputFormat::Wide => {
            serde_yaml::to_string(value).map_err(|e| unreadable(&e))?
        }
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(value).map_err(|e| unreadable(&e))?;
            s.push('\n');
            s
        }
        OutputFormat::JsonPath(template) => {
            template.render(&serde_json::to_value(value).map_err(|e| unreadable(&e))?)
        }
        OutputFormat::Name => {
            let doc = serde_json::to_value(value).map_err(|e| unreadable(&e))?;
            let items = match &doc {
                serde_json::Value::Array(items) => items.iter().collect(),
                other => vec![other],
            };
            let mut out = String::new();
            for item in items {
                let name = ["id", "backup_id"]
                    .iter()
                    .find_map(|k| item[*k].as_str())
                    .ok_or_else(|| {
                        CliError::Usage(
                            "-o name: this result names no backup; use -o json or -o yaml".into(),
                        )
                    })?;
                out.push_str(&format!("{kind}/{name}\n"));
            }
            out
        }
    })
}

/// The manifest of a backup as a JSON value (it always carries `id`); a physical base backup's
/// recoverable window, computed by the agent from the WAL in the store, is added as
/// `recovery_window`.
pub fn manifest(info: &v1::BackupInfo) -> Result<serde_json::Value, CliError> {
    let mut value: serde_json::Value = serde_json::from_str(&info.manifest_json).map_err(|e| {
        CliError::Other(format!(
            "the agent sent an unreadable manifest for {}: {e}",
            info.id
        ))
    })?;
    if let (Some(w), Some(obj)) = (&info.recovery_window, value.as_object_mut()) {
        obj.insert("recovery_window".into(), window_json(w));
    }
    Ok(value)
}

/// A recoverable window as JSON.
pub fn window_json(w: &v1::RecoveryWindow) -> serde_json::Value {
    serde_json::json!({
        "system_id": w.system_id,
        "earliest_time": w.earliest_time,
        "earliest_lsn": w.earliest_lsn,
        "latest_time": w.latest_time,
        "latest_lsn": w.latest_lsn,
        "timeline": w.timeline,
        "gaps": w.gaps,
        "error": w.error,
    })
}

/// Engine name of a backup.
pub fn engine_name(info: &v1::BackupInfo) -> &'static str {
    v1::Engine::try_from(info.engine)
        .unwrap_or(v1::Engine::Unspecified)
        .short_name()
}

/// A value from an agent made safe for one table cell: control characters (a newline in an error
/// message, an escape sequence) become spaces, and it is cut to `max` characters with `…`.
pub fn cell(text: &str, max: usize) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= max {
        clean
    } else {
        let mut cut: String = clean.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// Prints rows as aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(headers, rows));
}

/// Rows as aligned columns, with the header line unless `--no-headers`.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let pad = widths.get(i).copied().unwrap_or(0);
                text.push_str(&format!("{cell:<pad$}   "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    if !NO_HEADERS.load(Ordering::Relaxed) {
        line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    }
    for row in rows {
        line(row);
    }
    out
}

/// A timestamp shortened for tables (RFC 3339 in, `YYYY-MM-DD HH:MM:SS` out).
pub fn short_time(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|_| rfc3339.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
