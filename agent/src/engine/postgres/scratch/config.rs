//! The configuration a scratch server runs with, written by the drill: the only file it reads,
//! with the same settings repeated on its command line, and its authentication files and log.

use std::path::{Path, PathBuf};

use super::{SOCKET_PORT, ScratchError, files::create_owned, scratch_io};
use crate::engine::postgres::conf_quote;

/// The drill's configuration: written as the server's only configuration file and repeated on its
/// command line (which outranks any file), so no restored setting can turn one back on.
pub(super) const SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", ""),
    ("unix_socket_permissions", "0700"),
    ("archive_mode", "off"),
    ("archive_command", ""),
    ("archive_library", ""),
    ("archive_cleanup_command", ""),
    ("recovery_end_command", ""),
    ("ssl", "off"),
    ("ssl_passphrase_command", ""),
    ("hot_standby", "off"),
    ("primary_conninfo", ""),
    ("primary_slot_name", ""),
    ("synchronous_standby_names", ""),
    ("max_wal_senders", "0"),
    ("shared_preload_libraries", ""),
    ("session_preload_libraries", ""),
    ("local_preload_libraries", ""),
    ("dynamic_library_path", "$libdir"),
    // The provider is loaded only when a query is compiled; with jit off none is, and the name is
    // the installation's own (a restored one could climb out of $libdir with `../`).
    ("jit", "off"),
    ("jit_provider", "llvmjit"),
    ("logging_collector", "off"),
    ("log_destination", "stderr"),
    ("cluster_name", "soma_drill"),
    ("max_connections", "10"),
    ("superuser_reserved_connections", "2"),
    ("shared_buffers", "32MB"),
    ("huge_pages", "off"),
    ("maintenance_work_mem", "32MB"),
    ("work_mem", "4MB"),
    ("autovacuum", "off"),
    ("restart_after_crash", "off"),
    // Recovery runs to the end of the archive, at once, whatever the restored files ask for.
    ("recovery_target", ""),
    ("recovery_target_time", ""),
    ("recovery_target_xid", ""),
    ("recovery_target_lsn", ""),
    ("recovery_target_name", ""),
    ("recovery_target_timeline", "latest"),
    ("recovery_min_apply_delay", "0"),
    ("default_transaction_read_only", "off"),
    ("statement_timeout", "0"),
];

/// The files a scratch server reads besides its data directory, all in the drill directory and
/// owned by the server's user: authentication, its only configuration, and its log.
pub(super) struct ScratchFiles {
    pub(super) log: PathBuf,
    pub(super) log_file: std::fs::File,
    pub(super) conf: PathBuf,
    /// Settings naming the scratch directory's own paths, after [`SETTINGS`].
    dynamic: Vec<(&'static str, String)>,
}

impl ScratchFiles {
    pub(super) fn write(
        pgdata: &Path,
        dir: &Path,
        run_as: Option<(u32, u32)>,
        restore_command: Option<&str>,
    ) -> Result<Self, ScratchError> {
        let io = |action| scratch_io(dir, action);
        let hba = dir.join("pg_hba.conf");
        // Trust on the socket alone: the socket sits in a mode-0700 directory, so only the
        // server's own user (and root) can reach it.
        create_owned(&hba, "local all all trust\n", run_as).map_err(io("writing pg_hba.conf"))?;
        let ident = dir.join("pg_ident.conf");
        create_owned(&ident, "", run_as).map_err(io("writing pg_ident.conf"))?;
        let log = dir.join("server.log");
        let log_file = create_owned(&log, "", run_as).map_err(io("creating the server log"))?;
        let dynamic = vec![
            // A restored setting could point data_directory at the real server's.
            ("data_directory", pgdata.display().to_string()),
            ("port", SOCKET_PORT.to_string()),
            ("unix_socket_directories", dir.display().to_string()),
            ("hba_file", hba.display().to_string()),
            ("ident_file", ident.display().to_string()),
            // Inside the scratch directory: a restored setting could name the real server's.
            (
                "external_pid_file",
                dir.join("external.pid").display().to_string(),
            ),
        ];
        let files = ScratchFiles {
            log,
            log_file,
            conf: dir.join("scratch.conf"),
            dynamic,
        };
        let mut text = String::from(
            "# A restore drill's scratch server: written by soma-agent, the only configuration read.\n",
        );
        for (name, value) in files.settings() {
            text.push_str(&format!("{name} = {}\n", conf_quote(value)));
        }
        if let Some(command) = restore_command {
            text.push_str(&format!("restore_command = {}\n", conf_quote(command)));
        }
        create_owned(&files.conf, &text, run_as)
            .map_err(io("writing the drill's configuration"))?;
        Ok(files)
    }

    /// Every setting the server gets, in the configuration file and again on its command line.
    pub(super) fn settings(&self) -> impl Iterator<Item = (&str, &str)> {
        SETTINGS
            .iter()
            .copied()
            .chain(self.dynamic.iter().map(|(n, v)| (*n, v.as_str())))
    }
}
