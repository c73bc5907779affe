//! Rendering results as a table, JSON or YAML.

use serde::Serialize;
use soma_proto::v1;

use crate::{cli::OutputFormat, error::CliError};

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

/// Prints `value` as JSON or YAML.
pub fn print_structured<T: Serialize>(format: OutputFormat, value: &T) -> Result<(), CliError> {
    let text = match format {
        OutputFormat::Yaml => {
            serde_yaml::to_string(value).map_err(|e| CliError::Other(e.to_string()))?
        }
        _ => {
            let mut s =
                serde_json::to_string_pretty(value).map_err(|e| CliError::Other(e.to_string()))?;
            s.push('\n');
            s
        }
    };
    print!("{text}");
    Ok(())
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

/// Prints rows as aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
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
