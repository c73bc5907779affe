//! Shell completion: `kubectl soma completion bash|zsh|fish` prints a static script (clap_complete)
//! for `kubectl-soma`, and [`candidates`] answers kubectl's plugin-completion protocol for
//! `kubectl soma …`: kubectl (≥ 1.26) runs `kubectl_complete-soma WORD… CURRENT` (the words
//! after `soma`, the last being the one being typed, possibly empty) and reads candidates, one per
//! line (`value<TAB>description`), then `:DIRECTIVE`, Cobra's ShellCompDirective. `kubectl-soma
//! __complete WORD…` answers the same, as Cobra programs do.
//!
//! Backup ids come from the agent the words select (`--agent`, `SOMA_AGENT`, or the namespace's
//! agents through Kubernetes), within [`ID_LOOKUP_BUDGET`]: a shell waiting on a Tab must never
//! hang, so an unreachable agent only means no ids.

use std::time::Duration;

use clap::{Arg, CommandFactory};

use crate::{
    cli::{Cli, KubeArgs, OutputFormat},
    connect,
    error::CliError,
};

/// How long a Tab may wait for backup ids from an agent.
pub const ID_LOOKUP_BUDGET: Duration = Duration::from_secs(3);

/// Cobra's ShellCompDirective bits.
mod directive {
    /// Do not add a space after the completion (e.g. after `jsonpath=`).
    pub(super) const NO_SPACE: u32 = 2;
    /// Do not fall back to file names.
    pub(super) const NO_FILE_COMP: u32 = 4;
    /// Complete directory names only.
    pub(super) const FILTER_DIRS: u32 = 16;
}

/// Commands whose first argument is a backup id.
const ID_COMMANDS: [&str; 5] = ["restore", "describe", "verify", "delete", "drill"];

/// `kubectl soma completion SHELL`: the script on stdout.
pub fn print_script(shell: clap_complete::Shell) -> Result<(), CliError> {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "kubectl-soma", &mut std::io::stdout());
    Ok(())
}

/// What the words typed so far select, read the way clap would parse them.
#[derive(Debug, Default)]
struct Typed {
    /// Subcommand path, e.g. ["backup", "postgres"].
    path: Vec<String>,
    /// Positional arguments given to the innermost subcommand.
    positionals: usize,
    /// Flags with values seen so far (by arg id), for reaching the agent.
    values: Vec<(String, String)>,
}

impl Typed {
    fn value(&self, id: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| k == id)
            .map(|(_, v)| v.as_str())
    }
}

/// The completion protocol's answer for `words` (the last is the word being completed): the
/// candidates, one per line, then `:DIRECTIVE`.
pub async fn candidates(words: &[String]) -> String {
    let mut root = Cli::command();
    root.build();
    let (current, typed) = match words.split_last() {
        Some((current, before)) => (current.as_str(), before),
        None => ("", &[][..]),
    };
    let mut walk = Walk::new(&root);
    for word in typed {
        walk.word(word);
    }
    let Walk {
        node,
        state,
        pending,
        only_positionals,
    } = walk;

    let mut out: Vec<String> = Vec::new();
    let mut bits = directive::NO_FILE_COMP;
    if let Some(arg) = pending {
        bits = value_candidates(arg, "", current, &mut out);
    } else if let Some((name, partial)) = current
        .strip_prefix("--")
        .and_then(|c| c.split_once('='))
        .filter(|_| !only_positionals)
    {
        if let Some(arg) = find_long(node, name) {
            bits = value_candidates(arg, &format!("--{name}="), partial, &mut out);
        }
    } else if current.starts_with('-') && !only_positionals {
        for arg in node.get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(long) = arg.get_long() {
                push(&mut out, &format!("--{long}"), arg.get_help(), current);
            }
        }
    } else {
        word_candidates(node, &state, current, &mut out).await;
    }
    let mut text: String = out.iter().map(|c| format!("{c}\n")).collect();
    text.push_str(&format!(":{bits}\n"));
    text
}

/// Where the words typed so far lead in the command tree, read one word at a time.
struct Walk<'a> {
    /// The innermost subcommand reached.
    node: &'a clap::Command,
    state: Typed,
    /// A flag whose value is the next word.
    pending: Option<&'a Arg>,
    /// After `--`, every word is a positional.
    only_positionals: bool,
}

impl<'a> Walk<'a> {
    fn new(root: &'a clap::Command) -> Self {
        Walk {
            node: root,
            state: Typed::default(),
            pending: None,
            only_positionals: false,
        }
    }

    fn word(&mut self, word: &str) {
        if let Some(arg) = self.pending.take() {
            self.state
                .values
                .push((arg.get_id().to_string(), word.to_string()));
            return;
        }
        if !self.only_positionals && word == "--" {
            self.only_positionals = true;
            return;
        }
        if !self.only_positionals && word.starts_with("--") {
            return self.long(&word[2..]);
        }
        if !self.only_positionals && word.len() > 1 && word.starts_with('-') {
            return self.short(&word[1..]);
        }
        if let Some(sub) = self
            .node
            .find_subcommand(word)
            .filter(|_| self.state.positionals == 0)
        {
            self.node = sub;
            self.state.path.push(sub.get_name().to_string());
            return;
        }
        self.state.positionals += 1;
    }

    /// `--name` or `--name=value` (without the dashes).
    fn long(&mut self, flag: &str) {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (flag, None),
        };
        if let Some(arg) = find_long(self.node, name) {
            match inline {
                Some(v) => self
                    .state
                    .values
                    .push((arg.get_id().to_string(), v.to_string())),
                None if takes_value(arg) => self.pending = Some(arg),
                None => {}
            }
        }
    }

    /// `-x`, `-xVALUE` or `-x=VALUE` (without the dash; not empty).
    fn short(&mut self, flag: &str) {
        let mut chars = flag.chars();
        let short = chars.next().expect("longer than one byte");
        if let Some(arg) = self
            .node
            .get_arguments()
            .find(|a| a.get_short() == Some(short))
        {
            let rest: String = chars.collect();
            if takes_value(arg) {
                if rest.is_empty() {
                    self.pending = Some(arg);
                } else {
                    let v = rest.strip_prefix('=').unwrap_or(&rest).to_string();
                    self.state.values.push((arg.get_id().to_string(), v));
                }
            }
        }
    }
}

/// Candidates for a word that is not a flag: subcommands, the positional's possible values, and
/// backup ids where the command takes one.
async fn word_candidates(
    node: &clap::Command,
    state: &Typed,
    current: &str,
    out: &mut Vec<String>,
) {
    if state.positionals == 0 {
        // clap's `help` subcommand: offered at the top, as Cobra does, not under each command.
        let nested = !state.path.is_empty();
        for sub in node
            .get_subcommands()
            .filter(|s| !(s.is_hide_set() || nested && s.get_name() == "help"))
        {
            push(out, sub.get_name(), sub.get_about(), current);
        }
    }
    let positional = node
        .get_positionals()
        .nth(state.positionals)
        .filter(|_| !node.has_subcommands() || state.positionals > 0);
    if let Some(arg) = positional {
        for value in arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
        {
            push(out, value.get_name(), value.get_help(), current);
        }
    }
    let command = state.path.last().map(String::as_str).unwrap_or("");
    if state.positionals == 0 && ID_COMMANDS.contains(&command) {
        if command != "delete" {
            push(
                out,
                "latest",
                Some(&"the newest complete backup".into()),
                current,
            );
        }
        for (id, about) in backup_ids(state).await {
            push(out, &id, Some(&about.into()), current);
        }
    }
}

fn find_long<'a>(node: &'a clap::Command, name: &str) -> Option<&'a Arg> {
    node.get_arguments().find(|a| {
        a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|al| al.contains(&name))
    })
}

fn takes_value(arg: &Arg) -> bool {
    arg.get_action().takes_values()
}

/// A candidate line, when it starts with what was typed: `value<TAB>first line of help`.
fn push(out: &mut Vec<String>, value: &str, help: Option<&clap::builder::StyledStr>, typed: &str) {
    if !value.starts_with(typed) {
        return;
    }
    let about = help
        .map(|h| h.to_string())
        .and_then(|h| h.lines().next().map(str::to_string))
        .unwrap_or_default();
    if about.is_empty() {
        out.push(value.to_string());
    } else {
        out.push(format!("{value}\t{}", about.trim_end_matches('.')));
    }
}

/// Candidates for a flag's value, each prefixed with `prefix` (`--flag=` when typed that way);
/// returns the directive: file names for `--kubeconfig`, directories for `--pgdata`.
fn value_candidates(arg: &Arg, prefix: &str, typed: &str, out: &mut Vec<String>) -> u32 {
    match arg.get_id().as_str() {
        "kubeconfig" => return 0,
        "pgdata" => return directive::FILTER_DIRS,
        // restore's recovery target: its parser explains engine names, so it lists no values
        // (the hidden deprecated global `--target` shares the id and lists postgres|qdrant).
        "target" if arg.get_possible_values().is_empty() => {
            push(
                out,
                &format!("{prefix}latest"),
                None,
                &format!("{prefix}{typed}"),
            );
            return directive::NO_FILE_COMP;
        }
        "output" => {
            for name in OutputFormat::NAMES {
                push(
                    out,
                    &format!("{prefix}{name}"),
                    None,
                    &format!("{prefix}{typed}"),
                );
            }
            return if out.iter().any(|c| c.ends_with('=')) {
                directive::NO_FILE_COMP | directive::NO_SPACE
            } else {
                directive::NO_FILE_COMP
            };
        }
        _ => {}
    }
    for value in arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
    {
        push(
            out,
            &format!("{prefix}{}", value.get_name()),
            value.get_help(),
            &format!("{prefix}{typed}"),
        );
    }
    directive::NO_FILE_COMP
}

/// The backup ids the selected agent(s) list, with a short description; empty when no agent
/// answers within [`ID_LOOKUP_BUDGET`].
async fn backup_ids(state: &Typed) -> Vec<(String, String)> {
    let agent = state
        .value("agent")
        .map(str::to_string)
        .or_else(|| std::env::var("SOMA_AGENT").ok().filter(|a| !a.is_empty()));
    let kube = KubeArgs {
        kubeconfig: state.value("kubeconfig").map(Into::into),
        context: state.value("context").map(Into::into),
        namespace: state.value("namespace").map(Into::into),
        pod: state.value("pod").map(Into::into),
        engine: None,
        legacy_target: None,
        token_file: state.value("token-file").map(Into::into),
        agent_ca: state.value("agent-ca").map(Into::into),
        agent_tls_name: state.value("agent-tls-name").map(Into::into),
    };
    let lookup = async {
        let agents = match &agent {
            Some(addr) => vec![connect::direct(addr, &kube).await?],
            None if kube.pod.is_some() => vec![connect::connect(None, &kube, None).await?],
            None => connect::ready_agents(&kube).await?,
        };
        let mut ids: Vec<(String, String)> = Vec::new();
        for mut agent in agents {
            let listed = agent.all_backups().await?.backups;
            for b in listed {
                if !ids.iter().any(|(id, _)| *id == b.id) {
                    let about = format!(
                        "{} {}, completed {}",
                        crate::output::engine_name(&b),
                        crate::output::cell(&b.kind, 20),
                        crate::output::short_time(&b.completed_at)
                    );
                    ids.push((crate::output::cell(&b.id, 200), about));
                }
            }
        }
        Ok::<_, CliError>(ids)
    };
    match tokio::time::timeout(ID_LOOKUP_BUDGET, lookup).await {
        Ok(Ok(ids)) => ids,
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn complete(words: &[&str]) -> Vec<String> {
        // No agent can be reached from unit tests: ids are left to the integration tests.
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        candidates(&words)
            .await
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn values(lines: &[String]) -> Vec<&str> {
        lines
            .iter()
            .map(|l| l.split('\t').next().unwrap_or(""))
            .collect()
    }

    #[tokio::test]
    async fn subcommands_flags_and_values() {
        let lines = complete(&[""]).await;
        let v = values(&lines);
        for sub in ["backup", "restore", "list", "status", "completion"] {
            assert!(v.contains(&sub), "{lines:?}");
        }
        assert_eq!(lines.last().unwrap(), ":4");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("backup\tTake a backup now")),
            "{lines:?}"
        );

        assert_eq!(values(&complete(&["ba"]).await), ["backup", ":4"]);
        assert_eq!(
            values(&complete(&["backup", ""]).await),
            ["postgres", "qdrant", "all", ":4"]
        );
        let v = complete(&["list", "--"]).await;
        let v = values(&v);
        for flag in [
            "--failed",
            "--output",
            "--no-headers",
            "--engine",
            "--namespace",
        ] {
            assert!(v.contains(&flag), "{v:?}");
        }
        assert!(
            !v.contains(&"--target"),
            "the deprecated alias stays hidden: {v:?}"
        );

        let v = complete(&["list", "-o", ""]).await;
        assert_eq!(
            values(&v),
            ["table", "wide", "name", "json", "yaml", "jsonpath=", ":6"]
        );
        assert_eq!(
            values(&complete(&["list", "--output=j"]).await),
            ["--output=json", "--output=jsonpath=", ":6"]
        );
        assert_eq!(
            values(&complete(&["--engine", ""]).await),
            ["postgres", "qdrant", ":4"]
        );
        assert_eq!(
            values(&complete(&["completion", ""]).await),
            ["bash", "elvish", "fish", "powershell", "zsh", ":4"]
        );
        assert_eq!(complete(&["--kubeconfig", ""]).await, [":0"]);
        assert_eq!(
            complete(&["restore", "latest", "--pgdata", ""]).await,
            [":16"]
        );
        assert_eq!(
            values(&complete(&["restore", "latest", "--target", ""]).await),
            ["latest", ":4"]
        );
    }

    #[tokio::test]
    async fn unreachable_agent_means_no_ids_not_a_hang() {
        let started = std::time::Instant::now();
        let v = complete(&["--agent", "127.0.0.1:1", "describe", ""]).await;
        assert_eq!(values(&v), ["latest", ":4"]);
        let v = complete(&["--agent", "127.0.0.1:1", "delete", ""]).await;
        assert_eq!(values(&v), [":4"]);
        assert!(started.elapsed() < ID_LOOKUP_BUDGET * 2);
    }
}
