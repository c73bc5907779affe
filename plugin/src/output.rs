//! Rendering results as kubectl does: a table (`-o wide` adds columns, `--no-headers` drops the
//! header line), `resource/name` lines, JSON, YAML, or a JSONPath template over the JSON document.

pub mod jsonpath;

use std::{
    borrow::Cow,
    sync::atomic::{AtomicBool, Ordering},
};

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

/// How much layout a printed text keeps in [`terminal_safe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One line (a table cell, a field, a progress message): a newline or tab in it becomes a
    /// space, so a value can neither forge a line of its own nor break a column.
    Line,
    /// A block of lines this plugin laid out (a table, a YAML document, an error and its hint):
    /// newlines and tabs stay.
    Block,
}

/// Text from an agent, a store or the cluster (all untrusted) made harmless for a terminal. A
/// control character — ESC starting a sequence that clears the screen, moves the cursor or
/// retitles the window, a carriage return that overwrites a line, BEL, DEL, the C1 controls
/// such as CSI — and the bidirectional overrides that reorder what a line seems to say are
/// printed escaped (`\u{1b}`), so they are visible and inert; see [`Layout`] for newlines and
/// tabs. Text with none of them is returned as it is.
pub fn terminal_safe(text: &str, layout: Layout) -> Cow<'_, str> {
    let keeps = |c: char| match c {
        '\n' | '\t' => layout == Layout::Block,
        c => !unsafe_char(c),
    };
    if text.chars().all(keeps) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            c if keeps(c) => out.push(c),
            '\n' | '\t' | '\r' | '\u{b}' | '\u{c}' if layout == Layout::Line => out.push(' '),
            c => out.extend(c.escape_default()),
        }
    }
    Cow::Owned(out)
}

/// A control character (C0, DEL, C1) or a bidirectional formatting character.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// Prints a block this plugin laid out, with [`terminal_safe`] over whatever values it holds.
pub fn print_block(text: &str) {
    print!("{}", terminal_safe(text, Layout::Block));
}

/// JSON text with every character [`terminal_safe`] would escape written as a JSON `\uXXXX`
/// escape instead: the same document for a parser, inert on a terminal. serde_json escapes the
/// C0 controls itself but writes DEL, the C1 controls and the bidirectional characters as they
/// are; they can only stand inside strings, where the escape means the same character.
fn json_terminal_safe(json: String) -> String {
    if !json.chars().any(|c| c != '\n' && unsafe_char(c)) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c != '\n' && unsafe_char(c) {
            // Every such character is in the Basic Multilingual Plane: one escape each.
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Prints `value` as JSON, YAML, a JSONPath template's result, or (`-o name`) `backup/<id>` for
/// the document (or each element of a list) that names a backup by `id` or `backup_id`. A
/// command without a table of its own prints YAML for `table`/`wide`.
pub fn print_structured<T: Serialize>(format: OutputFormat, value: &T) -> Result<(), CliError> {
    print_block(&structured(format, value, "backup")?);
    Ok(())
}

/// What [`print_structured`] prints, with `kind` as the resource of `-o name`. JSON keeps every
/// value exactly (control characters as JSON escapes); the other formats are text for a
/// terminal and go through [`terminal_safe`].
pub fn structured<T: Serialize>(
    format: OutputFormat,
    value: &T,
    kind: &str,
) -> Result<String, CliError> {
    let unreadable =
        |e: &dyn std::fmt::Display| CliError::Other(format!("cannot encode the result: {e}"));
    let text = match format {
        OutputFormat::Yaml | OutputFormat::Table | OutputFormat::Wide => {
            serde_yaml::to_string(value).map_err(|e| unreadable(&e))?
        }
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(value).map_err(|e| unreadable(&e))?;
            s.push('\n');
            return Ok(json_terminal_safe(s));
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
    };
    Ok(terminal_safe(&text, Layout::Block).into_owned())
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
        "rejected": w.rejected,
        "error": w.error,
    })
}

/// Engine name of a backup.
pub fn engine_name(info: &v1::BackupInfo) -> &'static str {
    v1::Engine::try_from(info.engine)
        .unwrap_or(v1::Engine::Unspecified)
        .short_name()
}

/// A value from an agent made safe for one table cell ([`terminal_safe`] as one line: a newline
/// in an error message becomes a space, an escape sequence shows escaped) and cut to `max`
/// characters with `…`.
pub fn cell(text: &str, max: usize) -> String {
    let clean = terminal_safe(text, Layout::Line).into_owned();
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
    print_block(&render_table(headers, rows));
}

/// Rows as aligned columns, with the header line unless `--no-headers`. Every cell is one line
/// ([`terminal_safe`]), so no value can break the columns or the terminal.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|c| terminal_safe(c, Layout::Line).into_owned())
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
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
    for row in &rows {
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

    /// What the tests plant: ESC sequences that clear the screen and set the window title, a
    /// carriage return, BEL, DEL, CSI as a C1 control, and a right-to-left override.
    const HOSTILE: &str = "label\u{1b}[2J\u{1b}]0;owned\u{7}\rx\u{7f}\u{9b}31m\u{202e}gnp.exe";

    fn raw_controls(text: &str) -> Vec<char> {
        text.chars()
            .filter(|&c| c != '\n' && unsafe_char(c))
            .collect()
    }

    #[test]
    fn terminal_safe_escapes_controls() {
        let line = terminal_safe(HOSTILE, Layout::Line);
        assert!(raw_controls(&line).is_empty(), "{line:?}");
        assert_eq!(
            line,
            "label\\u{1b}[2J\\u{1b}]0;owned\\u{7} x\\u{7f}\\u{9b}31m\\u{202e}gnp.exe"
        );
        assert_eq!(terminal_safe("a\nb\tc", Layout::Line), "a b c");
        assert_eq!(terminal_safe("a\nb\tc", Layout::Block), "a\nb\tc");
        assert_eq!(terminal_safe("a\r\nb", Layout::Block), "a\\r\nb");
        assert!(matches!(
            terminal_safe("plain ünïcödé — text", Layout::Line),
            Cow::Borrowed(_)
        ));
        assert_eq!(cell("x\u{1b}[2Jy", 100), "x\\u{1b}[2Jy");
        assert_eq!(cell("error:\nline two", 100), "error: line two");
    }

    #[test]
    fn tables_hold_no_control_characters() {
        let rows = vec![
            vec![HOSTILE.to_string(), "ok".into()],
            vec!["a\nb".into(), "c".into()],
        ];
        let text = render_table(&["NAME", "STATE"], &rows);
        assert!(raw_controls(&text).is_empty(), "{text:?}");
        assert_eq!(text.lines().count(), 3, "one line per row:\n{text}");
    }

    #[test]
    fn structured_output_is_inert_and_json_exact() {
        let value = serde_json::json!({"id": "x", "label": HOSTILE, "lines": "a\nb"});
        let json = structured(OutputFormat::Json, &value, "backup").unwrap();
        assert!(raw_controls(&json).is_empty(), "{json:?}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back, value, "JSON keeps every value exactly");

        let yaml = structured(OutputFormat::Yaml, &value, "backup").unwrap();
        assert!(raw_controls(&yaml).is_empty(), "{yaml:?}");

        let template = jsonpath::Template::parse("{.label}").unwrap();
        let template: &'static jsonpath::Template = Box::leak(Box::new(template));
        let text = structured(OutputFormat::JsonPath(template), &value, "backup").unwrap();
        assert!(raw_controls(&text).is_empty(), "{text:?}");
        assert!(text.starts_with("label\\u{1b}[2J"), "{text:?}");
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
