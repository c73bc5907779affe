//! A running client tool: its pipes, its exit status and the tail of its stderr.

use tokio::{
    process::{Child, ChildStdin, ChildStdout},
    task::JoinHandle,
};

use super::PgError;

/// A running client tool whose stderr is collected for error messages.
#[derive(Debug)]
pub struct ToolProcess {
    pub(super) tool: &'static str,
    pub(super) child: Child,
    pub(super) stderr: Option<JoinHandle<String>>,
}

impl ToolProcess {
    /// The tool's stdout (taken once).
    pub fn stdout(&mut self) -> ChildStdout {
        self.child
            .stdout
            .take()
            .expect("stdout piped and taken once")
    }

    /// The tool's stdin (taken once).
    pub fn stdin(&mut self) -> ChildStdin {
        self.child.stdin.take().expect("stdin piped and taken once")
    }

    /// Waits for the tool; a non-zero exit becomes [`PgError::ToolFailed`] with its stderr.
    pub async fn wait(self) -> Result<(), PgError> {
        self.wait_output().await.map(|_| ())
    }

    /// Waits for the tool and returns the last lines of its stderr.
    pub async fn wait_output(mut self) -> Result<String, PgError> {
        let status = self.child.wait().await.map_err(|source| PgError::Io {
            tool: self.tool,
            source,
        })?;
        let stderr = match self.stderr.take() {
            Some(h) => h.await.unwrap_or_default(),
            None => String::new(),
        };
        if status.success() {
            Ok(stderr)
        } else {
            Err(PgError::ToolFailed {
                tool: self.tool,
                status: status.to_string(),
                stderr: if stderr.is_empty() {
                    "no error output".into()
                } else {
                    stderr
                },
            })
        }
    }

    /// Process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the tool without consuming it (for `select!`); returns how it ended.
    pub async fn exited(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }

    /// The last lines of stderr once the tool has exited.
    pub async fn stderr_tail(&mut self) -> String {
        match self.stderr.take() {
            Some(h) => h.await.unwrap_or_default(),
            None => String::new(),
        }
    }

    /// Kills the tool (used to make pg_restore roll back) and reaps it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
