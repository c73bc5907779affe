//! The real `soma-agent` binary, started per test.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::util::bin_path;

/// How long the agent may take to announce that it listens (includes its startup sweep of
/// uploads a crash left behind).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// What the agent prints on stdout once it is ready to serve.
const READY_LINE: &str = "soma-agent listening on ";
/// What the agent prints on stdout once its metrics listener is bound.
const METRICS_LINE: &str = "soma-agent metrics on ";

/// A running `soma-agent --listen 127.0.0.1:0 ...`, killed on drop. Its stdout and stderr are
/// captured and printed when the test panics.
#[derive(Debug)]
pub struct Agent {
    dir: TempDir,
    child: Child,
    addr: String,
    stdout: Arc<Mutex<String>>,
    reaped: bool,
    /// The agent's own `--drill-dir` when the test gave none: the agent sweeps every
    /// `soma_drill_*` entry of its drill directory at start-up (it owns that directory in a
    /// pod), so agents of tests running side by side must not share the default one.
    _drill_dir: Option<TempDir>,
}

/// An agent that exited before it announced that it listens.
#[derive(Debug)]
pub struct AgentExit {
    /// How it exited.
    pub status: ExitStatus,
    /// Its stdout and stderr.
    pub output: String,
}

impl Agent {
    /// Starts the agent and waits for its "listening" line; panics with its output when it exits
    /// first.
    pub fn start(
        store: &str,
        postgres_url: &str,
        extra_args: &[&str],
        env: &[(String, String)],
    ) -> Agent {
        Self::try_start(store, postgres_url, extra_args, env).unwrap_or_else(|exit| {
            panic!(
                "soma-agent exited before listening ({}):\n{}",
                exit.status, exit.output
            )
        })
    }

    /// Starts `soma-agent --listen 127.0.0.1:0 --store STORE [--postgres-url URL] EXTRA_ARGS` with
    /// `env` added to a cleaned environment (no inherited `AWS_*`, `SOMA_*`, `PG*`), and waits
    /// for the "listening" line. Returns how it exited when it exits first.
    pub fn try_start(
        store: &str,
        postgres_url: &str,
        extra_args: &[&str],
        env: &[(String, String)],
    ) -> Result<Agent, AgentExit> {
        let binary = bin_path("soma-agent");
        let dir = tempfile::Builder::new()
            .prefix("soma-agent-")
            .tempdir()
            .expect("cannot create a temporary directory for the agent");
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))
            .expect("cannot create the agent's stderr log");
        let mut cmd = Command::new(&binary);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("AWS_") || k.starts_with("SOMA_") || k.starts_with("PG") {
                cmd.env_remove(&key);
            }
        }
        cmd.args(["--listen", "127.0.0.1:0", "--store", store]);
        // An empty URL starts an agent without PostgreSQL (e.g. one beside Qdrant only).
        if !postgres_url.is_empty() {
            cmd.args(["--postgres-url", postgres_url]);
        }
        let drill_dir = (!extra_args.contains(&"--drill-dir")
            && !env.iter().any(|(k, _)| k == "SOMA_DRILL_DIR"))
        .then(|| crate::pg::PgCluster::server_owned_dir("soma-drill-"));
        if let Some(d) = &drill_dir {
            cmd.arg("--drill-dir").arg(d.path());
        }
        cmd.args(extra_args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_BACKTRACE", "1")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));

        // A reader thread keeps draining stdout for the agent's whole life (so it never blocks on
        // a full pipe) and forwards lines until the ready line has been seen.
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let pipe = child.stdout.take().expect("agent stdout");
        let sink = Arc::clone(&stdout);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        sink.lock().expect("stdout log lock").push_str(&line);
                        let _ = tx.send(line);
                    }
                }
            }
        });

        let mut agent = Agent {
            dir,
            child,
            addr: String::new(),
            stdout,
            reaped: false,
            _drill_dir: drill_dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(remaining) {
                Ok(line) => {
                    if let Some(rest) = line.trim().strip_prefix(READY_LINE) {
                        agent.addr = rest
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        assert!(
                            agent.addr.starts_with("127.0.0.1:"),
                            "unexpected listening address in {line:?}:\n{}",
                            agent.logs()
                        );
                        return Ok(agent);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // stdout closed: the agent is exiting.
                    let status = agent.wait_exit(deadline);
                    return Err(AgentExit {
                        status,
                        output: agent.logs(),
                    });
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "soma-agent did not print {READY_LINE:?} within {START_TIMEOUT:?}:\n{}",
                        agent.logs()
                    );
                }
            }
        }
    }

    /// Address of the agent's metrics listener (`--metrics-listen`), from the line it prints
    /// before it is ready; panics when the agent was started without one.
    pub fn metrics_addr(&self) -> String {
        let stdout = self.stdout.lock().expect("stdout log lock").clone();
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(METRICS_LINE))
            .map(str::to_owned)
            .unwrap_or_else(|| {
                panic!(
                    "the agent printed no {METRICS_LINE:?} line (started without --metrics-listen?):\n{}",
                    self.logs()
                )
            })
    }

    /// Address the agent listens on, `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("agent's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// Sends SIGKILL (a crash: no cleanup runs) and reaps the process.
    pub fn kill_9(&mut self) {
        if self.reaped {
            return;
        }
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits in i32"));
        kill(pid, Signal::SIGKILL).expect("cannot SIGKILL soma-agent");
        self.child.wait().expect("cannot reap soma-agent");
        self.reaped = true;
    }

    /// Sends SIGTERM (how Kubernetes stops a container) and waits up to `timeout` for the agent
    /// to exit; returns how it exited, or `None` when it still runs then (it is killed on drop).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.reaped {
            return None;
        }
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits in i32"));
        kill(pid, Signal::SIGTERM).expect("cannot SIGTERM soma-agent");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot wait for soma-agent") {
                self.reaped = true;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the agent wrote so far (stdout, then stderr).
    pub fn logs(&self) -> String {
        let stdout = self.stdout.lock().expect("stdout log lock").clone();
        let stderr =
            std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        format!(
            "--- soma-agent (pid {}) stdout ---\n{stdout}\n--- soma-agent stderr ---\n{stderr}",
            self.child.id()
        )
    }

    fn wait_exit(&mut self, deadline: Instant) -> ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot wait for soma-agent") {
                self.reaped = true;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "soma-agent did not exit in time:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
