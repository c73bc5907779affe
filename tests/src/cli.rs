//! Running the real `kubectl-soma` binary.

use std::fmt;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::bin_path;

/// How long one plugin invocation may take before the test gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// What a finished command produced.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Exit code; -1 when killed by a signal.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CmdOutput {
    /// Captures a finished process's exit code and output.
    pub fn from_output(out: &std::process::Output) -> CmdOutput {
        CmdOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics (showing the output) unless the exit code is `code`.
    pub fn assert_code(&self, code: i32, what: &str) -> &Self {
        assert_eq!(
            self.code, code,
            "{what}: expected exit code {code}, got:\n{self}"
        );
        self
    }

    /// Panics (showing the output) unless the command exited 0.
    pub fn assert_success(&self, what: &str) -> &Self {
        self.assert_code(0, what)
    }

    /// Panics unless stderr contains `needle` (case-insensitive).
    pub fn assert_stderr_contains(&self, needle: &str, what: &str) -> &Self {
        assert!(
            self.stderr.to_lowercase().contains(&needle.to_lowercase()),
            "{what}: expected stderr to contain {needle:?}, got:\n{self}"
        );
        self
    }

    /// Panics unless stdout contains `needle` (exactly).
    pub fn assert_stdout_contains(&self, needle: &str, what: &str) -> &Self {
        assert!(
            self.stdout.contains(needle),
            "{what}: expected stdout to contain {needle:?}, got:\n{self}"
        );
        self
    }

    /// Stdout parsed as JSON; panics (showing the output) when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{self}"))
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit code {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `kubectl-soma --agent ADDR ARGS...` with stdin closed (not a TTY) and waits for it.
pub fn soma(agent_addr: &str, args: &[&str]) -> CmdOutput {
    soma_spawn(agent_addr, args).wait()
}

/// Starts `kubectl-soma --agent ADDR ARGS...` in the background (stdin closed, output captured).
pub fn soma_spawn(agent_addr: &str, args: &[&str]) -> SomaChild {
    soma_spawn_env(agent_addr, args, &[])
}

/// `kubectl-soma --agent ADDR ARGS...` with `env` added to its environment, run to the end.
pub fn soma_env(agent_addr: &str, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
    soma_spawn_env(agent_addr, args, env).wait()
}

fn soma_spawn_env(agent_addr: &str, args: &[&str], env: &[(&str, &str)]) -> SomaChild {
    let binary = bin_path("kubectl-soma");
    let mut child = Command::new(&binary)
        .arg("--agent")
        .arg(agent_addr)
        .args(args)
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers = vec![
        drain(child.stdout.take().expect("stdout"), Arc::clone(&stdout)),
        drain(child.stderr.take().expect("stderr"), Arc::clone(&stderr)),
    ];
    SomaChild {
        child,
        stdout,
        stderr,
        readers,
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        done: false,
    }
}

/// The ids `kubectl-soma list -o json` prints, in its order (newest first).
pub fn listed_ids(agent_addr: &str) -> Vec<String> {
    let out = soma(agent_addr, &["list", "-o", "json"]);
    out.assert_success("list -o json");
    out.json()
        .as_array()
        .unwrap_or_else(|| panic!("list -o json is not an array:\n{out}"))
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect()
}

/// A `kubectl-soma` running in the background; killed on drop if still running.
#[derive(Debug)]
pub struct SomaChild {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    args: Vec<String>,
    done: bool,
}

impl SomaChild {
    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Standard error written so far.
    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }

    /// Waits for the process (at most ten minutes, then kills it and panics) and returns its output.
    pub fn wait(mut self) -> CmdOutput {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("cannot wait for kubectl-soma") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "kubectl-soma {:?} did not finish within {COMMAND_TIMEOUT:?}; stderr so far:\n{}",
                    self.args,
                    self.stderr_so_far()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.done = true;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let text = |buf: &Arc<Mutex<Vec<u8>>>| {
            String::from_utf8_lossy(&buf.lock().expect("output lock")).into_owned()
        };
        CmdOutput {
            code: status.code().unwrap_or(-1),
            stdout: text(&self.stdout),
            stderr: text(&self.stderr),
        }
    }
}

impl Drop for SomaChild {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn drain(mut pipe: impl Read + Send + 'static, sink: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink
                    .lock()
                    .expect("output lock")
                    .extend_from_slice(&buf[..n]),
            }
        }
    })
}

/// Runs `kubectl-soma` the Kubernetes way: with a kubeconfig and no `--agent`.
pub fn kubectl_soma(kubeconfig: &std::path::Path, args: &[&str]) -> CmdOutput {
    let out = Command::new(bin_path("kubectl-soma"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("SOMA_AGENT")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .output()
        .expect("run kubectl-soma");
    CmdOutput::from_output(&out)
}
