//! The recovery configuration of a restored data directory: exactly what this restore asks for.
//!
//! A base backup carries its cluster's `postgresql.auto.conf`, and a cluster that was itself
//! restored still has its restore's settings there: PostgreSQL keeps `recovery_target_time`,
//! `restore_command` and the rest after promotion, so every later base backup carries them. A
//! restore to `latest` adds no target of its own, and the inherited one wins — recovery stops at
//! the old restore's target, promotes, and nothing says rows are missing. Hence:
//!
//! - every inherited recovery setting in `postgresql.auto.conf` is commented out, line by line
//!   ([`neutralise`]);
//! - this restore's block is appended last and sets every recovery setting explicitly, empty
//!   where this restore wants none, so one set in `postgresql.conf` or a file it includes loses
//!   too (PostgreSQL applies only the last occurrence of a setting, and the automatic file is
//!   read after all others);
//! - the block sets `recovery_end_command` to `soma-agent recovery-end --block <nonce>`, which
//!   removes the block (found by a random nonce no backup can predict) when recovery ends, so a
//!   base backup of the promoted cluster carries none of it ([`remove_block`]).

use std::path::Path;

/// Every setting that steers or ends recovery. One inherited from a backup would make this
/// restore stop early (targets, `promote_trigger_file`), wait (`recovery_min_apply_delay`),
/// follow another server (`primary_*`), or run a command the backup chose.
pub(crate) const RECOVERY_SETTINGS: &[&str] = &[
    "restore_command",
    "archive_cleanup_command",
    "recovery_end_command",
    "recovery_target",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_lsn",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
    "recovery_min_apply_delay",
    "primary_conninfo",
    "primary_slot_name",
    "promote_trigger_file",
];

/// The five mutually exclusive targets: PostgreSQL refuses a second one set non-empty, and
/// complains about an empty one assigned after a set one, so the empties come first.
const TARGETS: &[&str] = &[
    "recovery_target",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_lsn",
];

/// The largest configuration file a restore reads (ALTER SYSTEM writes a few KiB at most).
pub(crate) const MAX_AUTO_CONF: u64 = 16 << 20;
/// The largest postgresql.auto.conf `recovery-end` reads: what a restore wrote from one of
/// [`MAX_AUTO_CONF`] (each disabled line grows by [`DISABLED`], plus the block), with room.
const MAX_REWRITTEN: u64 = 4 * MAX_AUTO_CONF;

/// Where this restore stops, as settings: the target setting and its value, or none for the
/// end of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target<'a> {
    /// `recovery_target_time`, `recovery_target_lsn` or `recovery_target_name`.
    pub(crate) setting: &'a str,
    /// Its value, unquoted.
    pub(crate) value: String,
}

/// What a restore's block holds.
#[derive(Debug, Clone)]
pub(crate) struct Block<'a> {
    /// A random word naming this block; `recovery-end` removes only the block it names.
    pub(crate) nonce: String,
    /// A line of comment: which backup, when.
    pub(crate) origin: String,
    /// The restore_command, unquoted.
    pub(crate) restore_command: String,
    /// The recovery_end_command, unquoted (it removes this block).
    pub(crate) recovery_end_command: String,
    /// Where recovery stops; `None` for the end of the archive.
    pub(crate) target: Option<Target<'a>>,
    /// Whether the server knows `promote_trigger_file` (PostgreSQL 15 and older: a later
    /// server refuses a setting it does not know).
    pub(crate) has_promote_trigger_file: bool,
}

/// The first line of a block.
fn begin(nonce: &str) -> String {
    format!("# soma-agent restore-pgdata {nonce} begin")
}

/// The last line of a block.
fn end(nonce: &str) -> String {
    format!("# soma-agent restore-pgdata {nonce} end")
}

pub(crate) use crate::engine::postgres::conf_quote;

impl Block<'_> {
    /// The block's text, ending with a newline.
    pub(crate) fn render(&self) -> String {
        let mut lines = vec![
            begin(&self.nonce),
            format!("# {}", self.origin.replace(['\n', '\r'], " ")),
            "# These settings are this restore's alone: recovery_end_command removes this block when recovery ends."
                .to_string(),
            format!("restore_command = {}", conf_quote(&self.restore_command)),
            format!(
                "recovery_end_command = {}",
                conf_quote(&self.recovery_end_command)
            ),
            "archive_cleanup_command = ''".into(),
            "primary_conninfo = ''".into(),
            "primary_slot_name = ''".into(),
            "recovery_min_apply_delay = 0".into(),
            // A replay that meets a damaged page or a reference to a missing one stops with an
            // error instead of going on as if nothing happened.
            "ignore_invalid_pages = off".into(),
            "zero_damaged_pages = off".into(),
            "ignore_checksum_failure = off".into(),
        ];
        if self.has_promote_trigger_file {
            lines.push("promote_trigger_file = ''".into());
        }
        let chosen = self.target.as_ref().map(|t| t.setting);
        for setting in TARGETS.iter().filter(|s| Some(**s) != chosen) {
            lines.push(format!("{setting} = ''"));
        }
        if let Some(t) = &self.target {
            lines.push(format!("{} = {}", t.setting, conf_quote(&t.value)));
        }
        lines.extend([
            "recovery_target_inclusive = on".into(),
            "recovery_target_timeline = 'latest'".into(),
            "recovery_target_action = 'promote'".into(),
            end(&self.nonce),
        ]);
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }
}

/// The setting a configuration line assigns, lower-cased, if it assigns one (PostgreSQL's names
/// are case-insensitive; `name = value` and `name value` both assign).
pub(crate) fn assigned_setting(line: &str) -> Option<String> {
    let line = line.trim_start();
    let name: String = line
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.'))
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit() || c == '$') {
        return None;
    }
    Some(name.to_ascii_lowercase())
}

/// Whether a configuration line sets one of [`RECOVERY_SETTINGS`].
pub(crate) fn sets_recovery(line: &str) -> bool {
    assigned_setting(line).is_some_and(|n| RECOVERY_SETTINGS.contains(&n.as_str()))
}

/// The prefix of a line a restore disabled: short, so a file of many such lines grows by at most
/// a fifth.
const DISABLED: &str = "#~ ";

/// Directives that read another file: in postgresql.auto.conf (ALTER SYSTEM never writes one)
/// they could bring settings the restore cannot see; PostgreSQL compares names case-sensitively
/// when it drops earlier duplicates, so `Recovery_Target_Xid` there would not yield to the block.
const INCLUDES: &[&str] = &["include", "include_dir", "include_if_exists"];

/// `text` with every line that sets a recovery setting (and, with `includes`, every include
/// directive) commented out with [`DISABLED`], preceded by one comment saying so; every other
/// line as it was.
pub(crate) fn neutralise(text: &str, origin: &str, includes: bool) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 5 + 256);
    let mut disabled = false;
    for line in text.split_inclusive('\n') {
        let include =
            includes && assigned_setting(line).is_some_and(|n| INCLUDES.contains(&n.as_str()));
        if sets_recovery(line) || include {
            if !disabled {
                out.push_str(&format!(
                    "# soma-agent restore-pgdata ({}): lines starting {DISABLED:?} set recovery settings or included files, and are disabled\n",
                    origin.replace(['\n', '\r'], " ")
                ));
                disabled = true;
            }
            out.push_str(DISABLED);
        }
        out.push_str(line);
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// `text` without the block named `nonce`, or `None` when it holds no such whole block.
pub(crate) fn remove_block(text: &str, nonce: &str) -> Option<String> {
    let (first, last) = (begin(nonce), end(nonce));
    let mut out = String::with_capacity(text.len());
    let (mut inside, mut found) = (false, false);
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if !inside && !found && bare == first {
            inside = true;
        } else if inside && bare == last {
            inside = false;
            found = true;
        } else if !inside {
            out.push_str(line);
        }
    }
    (found && !inside).then_some(out)
}

/// A random block name: 128 bits, so a backup cannot carry a block `recovery-end` would take
/// for this restore's.
pub(crate) fn new_nonce() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Why `recovery-end` did not remove the block.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecoveryEndError {
    /// The nonce is not one this agent writes.
    #[error("--block {0:?} is not a block name soma-agent restore-pgdata writes (32 hex digits)")]
    BadNonce(String),
    /// The file is not a regular file, or too large.
    #[error("{path}: {why}; left as it is")]
    Refused {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// The file has no such block (removed already, or edited by hand).
    #[error(
        "{path} holds no recovery settings block {nonce}; nothing removed (it was removed already, or edited by hand)"
    )]
    NoBlock {
        /// The file.
        path: String,
        /// The block.
        nonce: String,
    },
    /// The filesystem failed.
    #[error("{action} ({path}): {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// `soma-agent recovery-end`: removes the block named `nonce` from `dir`'s postgresql.auto.conf,
/// replacing the file atomically (as ALTER SYSTEM does). PostgreSQL runs it as
/// `recovery_end_command` in the data directory once recovery ended, before it accepts
/// connections, so nothing else writes the file meanwhile.
pub(crate) fn recovery_end(dir: &Path, nonce: &str) -> Result<(), RecoveryEndError> {
    if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RecoveryEndError::BadNonce(nonce.chars().take(64).collect()));
    }
    let path = dir.join(AUTO_CONF);
    let shown = path.display().to_string();
    let text = read_conf(dir, AUTO_CONF, MAX_REWRITTEN)
        .map_err(|e| match e {
            ReadError::NotAFile(found) => RecoveryEndError::Refused {
                path: shown.clone(),
                why: format!("is {found}, not a regular file"),
            },
            ReadError::Refused(why) => RecoveryEndError::Refused {
                path: shown.clone(),
                why,
            },
            ReadError::Io(action, source) => RecoveryEndError::Io {
                action,
                path: shown.clone(),
                source,
            },
        })?
        .unwrap_or_default();
    let Some(kept) = remove_block(&text, nonce) else {
        return Err(RecoveryEndError::NoBlock {
            path: shown,
            nonce: nonce.into(),
        });
    };
    replace_auto_conf(dir, &latin1(&kept)).map_err(|(action, source)| RecoveryEndError::Io {
        action,
        path: shown,
        source,
    })
}

/// The automatic configuration file, read last by PostgreSQL.
pub(crate) const AUTO_CONF: &str = "postgresql.auto.conf";

/// Why postgresql.auto.conf was not read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Not a regular file (a link or directory from the archive): what is there.
    NotAFile(&'static str),
    /// Too large, or not text.
    Refused(String),
    /// The filesystem failed.
    Io(&'static str, std::io::Error),
}

/// Reads the configuration file `name` in `dir` (at most `max` bytes) without following a link
/// there; `None` when missing.
/// The file is checked with `lstat`, opened with `O_NOFOLLOW | O_NONBLOCK` (a link or a FIFO
/// swapped in meanwhile neither leads elsewhere nor blocks), and read only if the opened file is
/// the regular file checked.
///
/// PostgreSQL reads configuration files as bytes in no particular encoding (a LATIN1 cluster's
/// ALTER SYSTEM writes LATIN1), so the text is decoded byte for byte (each byte one `char` below
/// U+0100) and [`latin1`] gives the same bytes back: lines the restore does not touch are kept
/// exactly, whatever their encoding.
pub(crate) fn read_conf(dir: &Path, name: &str, max: u64) -> Result<Option<String>, ReadError> {
    use std::{
        io::Read,
        os::unix::fs::{MetadataExt, OpenOptionsExt},
    };
    let path = dir.join(name);
    let checked = match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => m,
        Ok(m) => return Err(ReadError::NotAFile(super::untar::found(&m))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReadError::Io("inspecting a configuration file", e)),
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| ReadError::Io("opening a configuration file", e))?;
    let opened = file
        .metadata()
        .map_err(|e| ReadError::Io("inspecting a configuration file", e))?;
    if (opened.dev(), opened.ino()) != (checked.dev(), checked.ino()) || !opened.is_file() {
        return Err(ReadError::NotAFile(
            "a file that changed while it was opened",
        ));
    }
    if opened.len() > max {
        return Err(ReadError::Refused(format!(
            "is {} bytes, more than the {max} a configuration file can need",
            opened.len()
        )));
    }
    let mut bytes = Vec::with_capacity(opened.len() as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadError::Io("reading a configuration file", e))?;
    if bytes.len() as u64 > max {
        return Err(ReadError::Refused("grew while it was read".to_string()));
    }
    Ok(Some(bytes.iter().map(|&b| char::from(b)).collect()))
}

/// The bytes of text [`read_conf`] decoded (every `char` below U+0100; anything else, which it
/// never produces, becomes `?`).
pub(crate) fn latin1(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
        .collect()
}

/// Replaces `dir`'s postgresql.auto.conf with `bytes`: written to a new file of a random name
/// (mode 0600, created exclusively so nothing there is followed), synced, renamed over the old
/// one (a rename replaces a link, never its target), and the directory synced.
pub(crate) fn replace_auto_conf(
    dir: &Path,
    bytes: &[u8],
) -> Result<(), (&'static str, std::io::Error)> {
    replace_conf(dir, AUTO_CONF, bytes)
}

/// [`replace_auto_conf`] for the configuration file `name`.
pub(crate) fn replace_conf(
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(), (&'static str, std::io::Error)> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = dir.join(format!("{name}.soma-{:016x}", rand::random::<u64>()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| ("creating a new configuration file", e))?;
        file.write_all(bytes)
            .map_err(|e| ("writing a new configuration file", e))?;
        file.sync_all()
            .map_err(|e| ("writing a new configuration file", e))?;
        std::fs::rename(&tmp, dir.join(name)).map_err(|e| ("replacing a configuration file", e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ("syncing the data directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(target: Option<Target<'static>>) -> Block<'static> {
        Block {
            nonce: "0123456789abcdef0123456789abcdef".into(),
            origin: "base backup pg-x at now".into(),
            restore_command: "soma-agent wal-fetch %f %p".into(),
            recovery_end_command:
                "soma-agent recovery-end --block 0123456789abcdef0123456789abcdef".into(),
            target,
            has_promote_trigger_file: true,
        }
    }

    #[test]
    fn inherited_recovery_settings_are_commented_out_and_nothing_else() {
        // Bytes of any encoding survive a read and a write untouched.
        let latin = "work_mem = '8MB' # caf\u{e9}\n";
        assert_eq!(latin1(latin), b"work_mem = '8MB' # caf\xe9\n");
        let inherited = "# Do not edit this file manually!\n\
            work_mem = '8MB'\n\
            recovery_target_time = '2026-12-01 10:00:00+00'\n\
            RESTORE_COMMAND='cp /x/%f %p'\n\
            \x20 primary_conninfo 'host=elsewhere'\n\
            recovery_target_lsn = '0/3000000'\n\
            shared_buffers = '1GB'\n\
            # recovery_target_xid = '5' is a comment already\n\
            promote_trigger_file = '/etc/hostname'";
        let out = neutralise(inherited, "base backup pg-1", true);
        let active: Vec<&str> = out
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert_eq!(active, ["work_mem = '8MB'", "shared_buffers = '1GB'"]);
        assert!(out.contains("#~ recovery_target_time = '2026-12-01 10:00:00+00'\n"));
        assert!(out.contains("# soma-agent restore-pgdata (base backup pg-1): lines starting"));
        // Include directives go too in postgresql.auto.conf, not in postgresql.conf.
        let with_include = "include_if_exists = 'more.conf'\nwork_mem = '8MB'\n";
        assert!(neutralise(with_include, "x", true).contains("#~ include_if_exists"));
        assert_eq!(
            neutralise(with_include, "x", false),
            with_include,
            "nothing to disable: the text is kept exactly"
        );
        assert!(out.ends_with('\n'));
        // Names that only begin like a recovery setting are kept.
        assert!(!sets_recovery("restore_command_timeout = 5"));
        assert!(!sets_recovery("recovery_prefetch = try"));
        assert!(sets_recovery("recovery_target_action='shutdown'"));
    }

    #[test]
    fn the_block_sets_every_target_empty_before_the_chosen_one() {
        let text = block(Some(Target {
            setting: "recovery_target_lsn",
            value: "0/5000028".into(),
        }))
        .render();
        let settings: Vec<String> = text.lines().filter_map(assigned_setting).collect();
        for s in RECOVERY_SETTINGS {
            assert!(settings.iter().any(|n| n == s), "{s} is not set:\n{text}");
        }
        let lsn = settings
            .iter()
            .position(|n| n == "recovery_target_lsn")
            .unwrap();
        for t in TARGETS.iter().filter(|t| **t != "recovery_target_lsn") {
            let at = settings.iter().position(|n| n == t).unwrap();
            assert!(at < lsn, "{t} must come before the chosen target");
        }
        assert_eq!(
            settings
                .iter()
                .filter(|n| *n == "recovery_target_lsn")
                .count(),
            1
        );
        assert!(text.contains("recovery_target_lsn = '0/5000028'\n"));
        // For the end of the archive, every target is empty.
        let latest = block(None).render();
        for t in TARGETS {
            assert!(latest.contains(&format!("\n{t} = ''\n")), "{latest}");
        }
        let mut no_trigger = block(None);
        no_trigger.has_promote_trigger_file = false;
        assert!(!no_trigger.render().contains("promote_trigger_file"));
    }

    #[test]
    fn recovery_end_removes_only_its_own_block() {
        let b = block(None);
        let forged = "# soma-agent restore-pgdata ffffffffffffffffffffffffffffffff begin\n\
            shared_preload_libraries = 'evil'\n\
            # soma-agent restore-pgdata ffffffffffffffffffffffffffffffff end\n";
        let text = format!("work_mem = '8MB'\n{forged}{}", b.render());
        let kept = remove_block(&text, &b.nonce).unwrap();
        assert_eq!(kept, format!("work_mem = '8MB'\n{forged}"));
        assert_eq!(remove_block(&kept, &b.nonce), None);
        // A block cut short is not one.
        let cut = format!("a = 1\n{}\nrestore_command = 'x'\n", begin(&b.nonce));
        assert_eq!(remove_block(&cut, &b.nonce), None);

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(AUTO_CONF), &text).unwrap();
        recovery_end(dir.path(), &b.nonce).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(AUTO_CONF)).unwrap(),
            format!("work_mem = '8MB'\n{forged}")
        );
        assert!(matches!(
            recovery_end(dir.path(), &b.nonce),
            Err(RecoveryEndError::NoBlock { .. })
        ));
        assert!(matches!(
            recovery_end(dir.path(), "../../etc"),
            Err(RecoveryEndError::BadNonce(_))
        ));
        // Only the file itself is left in the directory: no temporary file behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [AUTO_CONF]);
    }

    #[test]
    fn a_link_is_neither_read_nor_replaced_through() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pgdata");
        std::fs::create_dir(&dir).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, block(None).render()).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join(AUTO_CONF)).unwrap();
        assert!(matches!(
            read_conf(&dir, AUTO_CONF, MAX_AUTO_CONF),
            Err(ReadError::NotAFile("a symbolic link"))
        ));
        assert!(matches!(
            recovery_end(&dir, &block(None).nonce),
            Err(RecoveryEndError::Refused { .. })
        ));
        assert_eq!(
            std::fs::read_to_string(&outside).unwrap(),
            block(None).render()
        );
    }
}
