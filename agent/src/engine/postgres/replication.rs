//! The replication side of PostgreSQL: identity of the cluster, base backups, the WAL stream's
//! slot and receiver — all over a replication connection, so a user with only REPLICATION
//! suffices.

use tokio::process::Command;

use super::{PgError, Postgres, ToolProcess, quote_literal, sql::psql_result};
use crate::lsn::Lsn;

/// What `IDENTIFY_SYSTEM` reports over a replication connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier (kept by physical copies and point-in-time restores).
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
}

/// WAL positions pg_basebackup reports on stderr with `--verbose`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseBackupPositions {
    /// Where replay of the backup starts.
    pub start_lsn: Lsn,
    /// Timeline the backup was taken on.
    pub timeline: u32,
    /// Where the backup becomes consistent.
    pub stop_lsn: Lsn,
}

/// Parses `write-ahead log start point: 0/2000028 on timeline 1` and `... end point: 0/2000100`.
pub(crate) fn parse_basebackup_positions(stderr: &str) -> Option<BaseBackupPositions> {
    let mut start = None;
    let mut stop = None;
    for line in stderr.lines() {
        if let Some(rest) = line.split("write-ahead log start point: ").nth(1) {
            let mut words = rest.split_whitespace();
            let lsn: Lsn = words.next()?.parse().ok()?;
            let tli = words.nth(2)?.parse().ok()?;
            start = Some((lsn, tli));
        } else if let Some(rest) = line.split("write-ahead log end point: ").nth(1) {
            stop = rest.split_whitespace().next()?.parse::<Lsn>().ok();
        }
    }
    let (start_lsn, timeline) = start?;
    Some(BaseBackupPositions {
        start_lsn,
        timeline,
        stop_lsn: stop?,
    })
}

impl Postgres {
    /// A tool command on the replication connection: the replication user's password, if it has
    /// its own, goes into the child's environment, never into its arguments.
    fn replication_command(&self, tool: &'static str) -> Command {
        let mut cmd = self.command(tool);
        if let Some(pw) = &self.replication_password {
            cmd.env("PGPASSWORD", pw);
        }
        cmd
    }

    /// The replication connection URL (`replication=true` is added by the tools that need it).
    fn replication_url(&self) -> String {
        self.replication_url
            .as_ref()
            .unwrap_or(&self.url)
            .to_string()
    }

    /// The server the replication connection reaches, without credentials.
    pub fn replication_server(&self) -> String {
        let mut u = self
            .replication_url
            .clone()
            .unwrap_or_else(|| self.url.clone());
        u.set_path("");
        u.set_query(None);
        u.to_string()
    }

    /// Runs a replication command (e.g. `IDENTIFY_SYSTEM`) over a replication connection.
    async fn replication_query(&self, command: &str) -> Result<String, PgError> {
        let mut url = self
            .replication_url
            .clone()
            .unwrap_or_else(|| self.url.clone());
        url.query_pairs_mut().append_pair("replication", "true");
        let mut cmd = self.replication_command("psql");
        cmd.args(["-X", "-w", "-A", "-t", "-q", "-F", "|", "-d"])
            .arg(url.as_str())
            .arg("-c")
            .arg(command);
        let out = cmd
            .output()
            .await
            .map_err(|source| self.spawn_error("psql", source))?;
        psql_result(&out, || self.replication_server())
    }

    /// The cluster's system identifier, timeline and WAL position, over a replication connection
    /// (so a replication-only user suffices).
    pub async fn identify_system(&self) -> Result<SystemIdentity, PgError> {
        let out = self.replication_query("IDENTIFY_SYSTEM").await?;
        let bad = || PgError::ToolFailed {
            tool: "psql",
            status: "unexpected IDENTIFY_SYSTEM output".into(),
            stderr: out.clone(),
        };
        let mut fields = out.split('|');
        // It names the archive's folder: only a system identifier (digits) may pass.
        let system_id = fields
            .next()
            .filter(|s| crate::wal::valid_system_id(s))
            .ok_or_else(bad)?;
        let timeline = fields.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
        let xlogpos = fields
            .next()
            .and_then(|l| l.parse::<Lsn>().ok())
            .ok_or_else(bad)?;
        Ok(SystemIdentity {
            system_id: system_id.to_string(),
            timeline,
            xlogpos,
        })
    }

    /// The server's WAL segment size in bytes (`SHOW wal_segment_size` over replication),
    /// refused unless PostgreSQL can have it: WAL names, spool checks and recovery windows are
    /// all computed from it.
    pub async fn wal_segment_size(&self) -> Result<u64, PgError> {
        let out = self.replication_query("SHOW wal_segment_size").await?;
        parse_pg_size(&out)
            .filter(|size| crate::wal::valid_seg_size(*size))
            .ok_or_else(|| PgError::ToolFailed {
                tool: "psql",
                status: "unexpected wal_segment_size".into(),
                stderr: out,
            })
    }

    /// Starts `pg_basebackup` of the whole cluster as one tar stream on stdout, with the WAL needed
    /// for consistency inside it (`-X fetch`) and a fast checkpoint; `--verbose` makes it report
    /// the start and end positions on stderr.
    pub fn start_basebackup(&self) -> Result<ToolProcess, PgError> {
        let mut cmd = self.replication_command("pg_basebackup");
        cmd.args([
            "--pgdata=-",
            "--format=tar",
            "--wal-method=fetch",
            "--checkpoint=fast",
            "--verbose",
            "--no-password",
            "--dbname",
        ])
        .arg(self.replication_url());
        self.spawn("pg_basebackup", cmd)
    }

    /// Creates the physical replication slot `slot` unless it exists, reserving WAL from the
    /// moment it is created (pg_receivewal's own `--create-slot` reserves nothing until its first
    /// feedback, a window in which the server could remove WAL the archive still needs).
    pub async fn create_slot(&self, slot: &str) -> Result<(), PgError> {
        check_slot_name(slot)?;
        match self
            .replication_query(&format!(
                "CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL"
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(PgError::ToolFailed { stderr, .. }) if stderr.contains("already exists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Starts `pg_receivewal` into `dir` through `slot`. It exits when the connection ends
    /// (`--no-loop`): the agent decides when to try again.
    ///
    /// `--synchronous` makes it fsync what it received and report that position to the server
    /// at once (instead of at the end of each segment, and every `--status-interval`): the
    /// slot's `restart_lsn` then says how far the spool durably holds the WAL, which is what
    /// [`slot_flushed_lsn`](Self::slot_flushed_lsn) reads when the agent drains on shutdown.
    /// It fsyncs once per batch of messages, not per message.
    pub fn start_receivewal(
        &self,
        dir: &std::path::Path,
        slot: &str,
    ) -> Result<ToolProcess, PgError> {
        let mut cmd = self.replication_command("pg_receivewal");
        cmd.arg("--directory")
            .arg(dir)
            .args([
                "--no-loop",
                "--no-password",
                "--synchronous",
                "--status-interval=1",
                "--slot",
            ])
            .arg(slot)
            .arg("--dbname")
            .arg(self.replication_url());
        self.spawn("pg_receivewal", cmd)
    }

    /// The server's current WAL flush position (for the archive lag, and what a drain on
    /// shutdown waits for).
    pub async fn current_wal_lsn(&self) -> Result<Lsn, PgError> {
        Ok(self.identify_system().await?.xlogpos)
    }

    /// How far the receiver on physical slot `slot` has confirmed that it flushed WAL: the slot's
    /// `restart_lsn`, which the server moves to the flush position each status report of the
    /// receiver carries. `None` when the slot does not exist or has reserved nothing yet.
    ///
    /// Read with `READ_REPLICATION_SLOT` over the replication connection (PostgreSQL 15 and
    /// later, so a replication-only user suffices), else from `pg_replication_slots` over the
    /// main connection.
    pub async fn slot_flushed_lsn(&self, slot: &str) -> Result<Option<Lsn>, PgError> {
        check_slot_name(slot)?;
        let lsn = match self
            .replication_query(&format!("READ_REPLICATION_SLOT {slot}"))
            .await
        {
            // slot_type|restart_lsn|restart_tli, all empty (NULL) without such a slot.
            Ok(out) => out.split('|').nth(1).unwrap_or_default().to_string(),
            Err(PgError::ToolFailed { stderr, .. }) if stderr.contains("syntax error") => {
                self.query(
                    &self.default_database(),
                    &format!(
                        "select restart_lsn from pg_replication_slots where slot_name = {}",
                        quote_literal(slot)?
                    ),
                )
                .await?
            }
            Err(e) => return Err(e),
        };
        let lsn = lsn.trim();
        if lsn.is_empty() {
            return Ok(None);
        }
        lsn.parse().map(Some).map_err(|_| PgError::ToolFailed {
            tool: "psql",
            status: "unexpected restart_lsn of the replication slot".into(),
            stderr: lsn.to_string(),
        })
    }
}

/// One line of a timeline history file: the timeline it branched from, where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryLine {
    /// The parent timeline.
    pub parent: u32,
    /// Where the child timeline began (where replay of the parent ended).
    pub switch: Lsn,
    /// PostgreSQL's reason, e.g. `no recovery target specified` or `before 2026-… +00`
    /// (control characters removed, cut to [`MAX_REASON`] characters: the server is not trusted).
    pub reason: String,
}

/// The longest history reason kept.
pub(super) const MAX_REASON: usize = 200;
/// The most history lines read (one per earlier timeline).
const MAX_HISTORY_LINES: usize = 10_000;

/// Parses the content of a history file (the line format of [`crate::timeline_history`]); lines
/// that do not parse are skipped (the last good line is what matters to a caller).
pub(crate) fn parse_history_lines(text: &str) -> Vec<HistoryLine> {
    use crate::timeline_history::{is_blank, parse_line};
    text.lines()
        .take(MAX_HISTORY_LINES)
        .filter(|l| !is_blank(l))
        .filter_map(parse_line)
        .map(|(parent, switch, reason)| HistoryLine {
            parent,
            switch,
            reason: reason
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_REASON)
                .collect(),
        })
        .collect()
}

impl Postgres {
    /// The history of `timeline` (`TIMELINE_HISTORY` over a replication connection, so a
    /// replication-only user suffices), oldest first; its last line says where the timeline
    /// began and why.
    pub async fn timeline_history(&self, timeline: u32) -> Result<Vec<HistoryLine>, PgError> {
        let out = self
            .replication_query(&format!("TIMELINE_HISTORY {timeline}"))
            .await?;
        // `<file name>|<content>`: psql prints the content as the server sends it, newlines
        // and all.
        let content = out.split_once('|').map_or("", |(_, c)| c);
        Ok(parse_history_lines(content))
    }

    /// The recovery settings the server's configuration files set now, non-empty, by name
    /// (`pg_file_settings` reads the files at the time of the query, the last occurrence of
    /// each name winning, as it would at the next start; a setting that needs a restart to take
    /// effect is listed with an error there, and counts too). Needs a superuser or
    /// `pg_read_all_settings`.
    pub async fn recovery_settings_in_files(&self) -> Result<Vec<String>, PgError> {
        let names = crate::ops::physical::RECOVERY_SETTINGS
            .iter()
            .map(|n| format!("'{n}'"))
            .collect::<Vec<_>>()
            .join(",");
        let out = self
            .query(
                &self.default_database(),
                &format!(
                    "select coalesce(string_agg(name, ',' order by name), '') from \
                     (select distinct on (lower(name)) lower(name) as name, setting \
                      from pg_file_settings where lower(name) in ({names}) \
                      order by lower(name), seqno desc) s where setting <> ''"
                ),
            )
            .await?;
        Ok(out
            .trim()
            .split(',')
            .filter(|n| crate::ops::physical::RECOVERY_SETTINGS.contains(n))
            .map(str::to_string)
            .collect())
    }

    /// Whether the server is still recovering (not promoted yet).
    pub async fn in_recovery(&self) -> Result<bool, PgError> {
        let out = self
            .query(&self.default_database(), "select pg_is_in_recovery()")
            .await?;
        match out.trim() {
            "t" => Ok(true),
            "f" => Ok(false),
            other => Err(PgError::ToolFailed {
                tool: "psql",
                status: "unexpected answer to pg_is_in_recovery()".into(),
                stderr: other.chars().take(200).collect(),
            }),
        }
    }
}

/// Checks a replication slot name as PostgreSQL does (it is also spliced into a replication
/// command, so nothing else may pass).
pub(crate) fn check_slot_name(slot: &str) -> Result<(), PgError> {
    let ok = !slot.is_empty()
        && slot.len() <= 63
        && slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PgError::InvalidSlotName {
            slot: slot.to_string(),
        })
    }
}

/// Parses a size as PostgreSQL shows it (`16MB`, `1GB`, `8192`).
fn parse_pg_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    Some(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_basebackup_output() {
        let stderr = "pg_basebackup: initiating base backup, waiting for checkpoint to complete\n\
            pg_basebackup: checkpoint completed\n\
            pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1\n\
            pg_basebackup: write-ahead log end point: 0/2000100\n\
            pg_basebackup: base backup completed";
        assert_eq!(
            parse_basebackup_positions(stderr),
            Some(BaseBackupPositions {
                start_lsn: Lsn(0x2000028),
                timeline: 1,
                stop_lsn: Lsn(0x2000100)
            })
        );
        assert_eq!(parse_pg_size("16MB"), Some(16 << 20));
        assert_eq!(parse_pg_size("1GB"), Some(1 << 30));
    }
}
