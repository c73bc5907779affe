//! kubectl conventions of the real `kubectl-soma`: shell completion (the scripts `completion`
//! prints are valid shell; the `kubectl_complete-soma` helper answers kubectl's plugin-completion
//! protocol, through the real `kubectl` too, with backup ids from a real agent), output formats
//! (`-o name`, `-o jsonpath=…`, `-o wide`, `--no-headers`) against a real agent, real PostgreSQL
//! and a local store, `status` with schedules, retention and failures, `list --failed`, and the
//! engine selection (`--engine`, the deprecated global `--target`) next to `restore --target
//! latest` through Kubernetes (the API double) with two agents in the namespace.

use std::process::{Command, Stdio};

use soma_tests::{
    Agent, CmdOutput, KubeDouble, PgCluster, PodSpec, QdrantDouble, TestStore, bin_dir, bin_path,
    kubectl_soma, soma,
};

/// Runs a workspace binary with `args`, stdin closed, and optional extra environment.
fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
    let out = Command::new(bin_path(binary))
        .args(args)
        .env_remove("SOMA_AGENT")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {binary}: {e}"));
    CmdOutput::from_output(&out)
}

/// What the completion helper offers: the candidate values (descriptions dropped) and the
/// directive line.
fn offered(out: &CmdOutput) -> (Vec<String>, String) {
    let mut lines: Vec<&str> = out.stdout.lines().collect();
    let directive = lines.pop().unwrap_or_default().to_string();
    let values = lines
        .iter()
        .map(|l| l.split('\t').next().unwrap_or("").to_string())
        .collect();
    (values, directive)
}

/// Whether `program` is installed (for the shells other than bash, which CI always has).
fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn completion_scripts_are_valid_shell() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, checker) in [("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")] {
        let out = run("kubectl-soma", &["completion", shell], &[]);
        out.assert_success(&format!("completion {shell}"));
        assert!(
            out.stdout.contains("kubectl-soma") && out.stdout.contains("restore"),
            "the {shell} script completes kubectl-soma's commands:\n{out}"
        );
        if shell != "bash" && !installed(checker) {
            eprintln!("{checker} is not installed: its script's syntax is not checked");
            continue;
        }
        let script = dir.path().join(format!("soma.{shell}"));
        std::fs::write(&script, &out.stdout).unwrap();
        let check = Command::new(checker)
            .arg("-n")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {checker}: {e}"));
        assert!(
            check.status.success(),
            "{checker} -n rejects the script: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let out = run("kubectl-soma", &["completion", "tcsh"], &[]);
    out.assert_code(2, "completion of an unknown shell");
}

/// The helper answers as kubectl expects (candidates, then `:DIRECTIVE`) with nothing on stderr,
/// and the real kubectl finds it on PATH and relays its answer for `kubectl soma <Tab>`.
#[test]
fn kubectl_complete_helper_speaks_the_protocol() {
    let out = run("kubectl_complete-soma", &[""], &[]);
    out.assert_success("kubectl_complete-soma ''");
    assert_eq!(
        out.stderr, "",
        "the helper writes nothing to the shell's stderr"
    );
    let (values, directive) = offered(&out);
    for sub in [
        "backup",
        "restore",
        "list",
        "describe",
        "verify",
        "delete",
        "status",
        "completion",
    ] {
        assert!(values.contains(&sub.to_string()), "{out}");
    }
    assert_eq!(directive, ":4", "no file names for a subcommand:\n{out}");

    let out = run("kubectl_complete-soma", &["list", "-o", "js"], &[]);
    assert_eq!(
        offered(&out),
        (vec!["json".into(), "jsonpath=".into()], ":6".into()),
        "{out}"
    );
    let out = run("kubectl_complete-soma", &["restore", "latest", "--en"], &[]);
    assert_eq!(offered(&out).0, ["--engine"], "{out}");
    let out = run("kubectl_complete-soma", &["--engine", ""], &[]);
    assert_eq!(offered(&out).0, ["postgres", "qdrant"], "{out}");
    // The same answer from the plugin itself, Cobra's way.
    let same = run("kubectl-soma", &["__complete", "--engine", ""], &[]);
    assert_eq!(same.stdout, out.stdout);

    // kubectl ≥ 1.26 runs kubectl_complete-soma for `kubectl soma …` and prints its candidates
    // and directive.
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("kubectl")
        .args(["__complete", "soma", "backup", ""])
        .env("PATH", &path)
        .env("KUBECONFIG", "/dev/null")
        .env_remove("SOMA_AGENT")
        .stdin(Stdio::null())
        .output()
        .expect("kubectl is installed (apt-get install kubectl, or see .ci/run)");
    let out = CmdOutput::from_output(&out);
    out.assert_success("kubectl __complete soma backup ''");
    let (values, directive) = offered(&out);
    assert_eq!(values, ["postgres", "qdrant", "all"], "{out}");
    assert_eq!(directive, ":4", "{out}");
}

/// Every format a script would use, on real backups.
#[test]
fn output_conventions_against_a_real_agent() {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql(
        "appdb",
        "create table users (id int primary key, name text);
         insert into users select i, 'user ' || i from generate_series(1, 100) i;",
    );
    let store = TestStore::local();
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    let a = agent.addr();

    let backup = || {
        let out = soma(a, &["-o", "name", "backup", "postgres"]);
        out.assert_success("backup postgres -o name");
        let name = out.stdout.trim_end().to_string();
        assert_eq!(out.stdout.lines().count(), 1, "{out}");
        name.strip_prefix("backup/")
            .unwrap_or_else(|| panic!("-o name prints backup/<id>:\n{out}"))
            .to_string()
    };
    let first = backup();
    let second = backup();

    let out = soma(a, &["list", "-o", "name"]);
    out.assert_success("list -o name");
    assert_eq!(out.stdout, format!("backup/{second}\nbackup/{first}\n"));

    // JSONPath over exactly the document -o json prints (a list's elements are `.items`).
    let out = soma(a, &["list", "-o", "jsonpath={.items[*].id}"]);
    out.assert_success("list -o jsonpath");
    assert_eq!(out.stdout, format!("{second} {first}"));
    let out = soma(a, &["list", "-o", "jsonpath={.items[0].id}"]);
    assert_eq!(out.stdout, second, "{out}");
    let out = soma(
        a,
        &[
            "list",
            "-o",
            r#"jsonpath={range .items[*]}{.id}{"\t"}{.kind}{"\n"}{end}"#,
        ],
    );
    assert_eq!(
        out.stdout,
        format!("{second}\tlogical\n{first}\tlogical\n"),
        "{out}"
    );
    let out = soma(
        a,
        &[
            "describe",
            "latest",
            "-o",
            "jsonpath=id={.id} tool={.tool.name}",
        ],
    );
    out.assert_success("describe latest -o jsonpath");
    assert_eq!(out.stdout, format!("id={second} tool=pg_dump"));
    let out = soma(
        a,
        &[
            "list",
            "-o",
            r#"jsonpath={.items[?(@.kind=="logical")].id}"#,
        ],
    );
    out.assert_code(2, "an unsupported JSONPath filter")
        .assert_stderr_contains("not supported", "the unsupported part is named");

    // Tables: the header line, --no-headers, and wide's extra columns.
    let out = soma(a, &["list"]);
    out.assert_success("list");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("ID "), "{out}");
    let out = soma(a, &["list", "--no-headers"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with(&second) && lines[1].starts_with(&first),
        "{out}"
    );
    let out = soma(a, &["list", "-o", "wide"]);
    out.assert_success("list -o wide");
    let header = out.stdout.lines().next().unwrap_or_default();
    for column in [
        "KIND",
        "STARTED (UTC)",
        "COMPLETED (UTC)",
        "STORED",
        "MEMBERS",
        "LAST DRILL",
    ] {
        assert!(header.contains(column), "-o wide misses {column}:\n{out}");
    }
    assert!(
        out.stdout
            .lines()
            .nth(1)
            .unwrap_or_default()
            .contains("logical"),
        "{out}"
    );
    let out = soma(a, &["list", "-o", "wide", "--no-headers"]);
    assert_eq!(out.stdout.lines().count(), 2, "{out}");

    // The agent is chosen with --engine, which also narrows `latest`; the old global --target
    // still selects, with a warning.
    let out = soma(
        a,
        &[
            "--engine",
            "postgres",
            "describe",
            "latest",
            "-o",
            "jsonpath={.id}",
        ],
    );
    out.assert_success("--engine postgres describe latest");
    assert_eq!(out.stdout, second);
    let out = soma(
        a,
        &["verify", "latest", "--engine", "postgres", "-o", "name"],
    );
    out.assert_success("verify latest -o name");
    assert_eq!(out.stdout, format!("backup/{second}\n"));
    let out = soma(a, &["list", "--target", "postgres", "-o", "name"]);
    out.assert_success("list --target postgres (deprecated)")
        .assert_stderr_contains(
            "--target postgres is deprecated; use --engine postgres",
            "warns",
        );
    assert_eq!(out.stdout.lines().count(), 2, "{out}");
    soma(a, &["describe", &first, "--engine", "qdrant"])
        .assert_code(2, "--engine that contradicts the id")
        .assert_stderr_contains("is a postgres backup", "says why");

    // status: the agent with its schedules, retention and failures (this agent runs none).
    let out = soma(a, &["status"]);
    out.assert_success("status");
    for text in [
        "Schedules: none",
        "Retention: none",
        "Recent failures: no failures recorded",
    ] {
        assert!(out.stdout.contains(text), "status misses {text:?}:\n{out}");
    }
    let out = soma(a, &["status", "--no-headers"]);
    assert_eq!(
        out.stdout.lines().count(),
        1,
        "--no-headers: the agent lines only:\n{out}"
    );
    let out = soma(a, &["status", "-o", "wide"]);
    let header = out.stdout.lines().next().unwrap_or_default();
    for column in ["ARCHIVED LSN", "SCHEDULES", "RETENTION", "JOBS"] {
        assert!(
            header.contains(column),
            "status -o wide misses {column}:\n{out}"
        );
    }
    let out = soma(a, &["status", "-o", "json"]);
    let row = &out.json()[0];
    assert_eq!(row["schedules"], serde_json::json!([]), "{out}");
    assert_eq!(row["recent_failures"], serde_json::json!([]), "{out}");
    assert_eq!(row["retention"], serde_json::Value::Null, "{out}");
    let out = soma(a, &["status", "-o", "name"]);
    assert_eq!(out.stdout, format!("agent/{a}\n"));

    // Completion offers the agent's backup ids (and `latest`) for the commands taking one.
    let out = run(
        "kubectl_complete-soma",
        &["--agent", a, "describe", ""],
        &[],
    );
    let (values, directive) = offered(&out);
    assert_eq!(values, ["latest", second.as_str(), first.as_str()], "{out}");
    assert_eq!(directive, ":4");
    // `delete` takes no `latest`; the typed prefix filters, and SOMA_AGENT names the agent.
    let out = run(
        "kubectl_complete-soma",
        &["delete", &first[..first.len() - 1]],
        &[("SOMA_AGENT", a)],
    );
    assert_eq!(offered(&out).0, [first.as_str()], "{out}");
    assert!(
        out.stdout.contains("postgres logical, completed"),
        "ids carry what they are:\n{out}"
    );
}

/// `list --failed` against the agent as it is: an agent that records failures lists them (none
/// here: nothing failed); an older agent that answers Unimplemented is named as too old, with its
/// version, never with a raw gRPC message.
#[test]
fn list_failed_names_an_agent_too_old_for_it() {
    let pg = PgCluster::start();
    let store = TestStore::local();
    let agent = Agent::start(&store.url(), &pg.url("postgres"), &[], &store.env());
    let version = soma(
        agent.addr(),
        &["status", "-o", "jsonpath={.items[0].agent_version}"],
    );
    version.assert_success("status -o jsonpath");
    let out = soma(agent.addr(), &["list", "--failed"]);
    if out.code == 0 {
        assert!(out.stderr.contains("no failures recorded"), "{out}");
    } else {
        out.assert_code(1, "list --failed on an older agent").assert_stderr_contains(
            &format!(
                "this agent (version {}) does not support listing failures (list --failed); upgrade the agent",
                version.stdout
            ),
            "an older agent is named as such",
        );
        assert!(!out.stderr.contains("Unimplemented"), "{out}");
    }
}

/// A failed backup is recorded and shown by `list --failed` and `status` (the agent's records,
/// issue 12 part 3).
#[test]
fn a_failed_backup_is_listed_by_list_failed_and_status() {
    let pg = PgCluster::start();
    let store = TestStore::local();
    let agent = Agent::start(&store.url(), &pg.url("postgres"), &[], &store.env());
    let a = agent.addr();
    soma(a, &["backup", "postgres", "--database", "no_such_db"])
        .assert_code(1, "a backup of a database that does not exist");

    let out = soma(a, &["list", "--failed"]);
    out.assert_success("list --failed");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for column in [
        "WHEN (UTC)",
        "OPERATION",
        "BACKUP",
        "TARGET",
        "TRIGGER",
        "ERROR",
    ] {
        assert!(lines[0].contains(column), "{out}");
    }
    assert!(
        lines[1].contains("backup") && lines[1].contains("client"),
        "{out}"
    );
    assert!(
        lines[1].contains("no_such_db"),
        "the error names the database:\n{out}"
    );

    let out = soma(a, &["list", "--failed", "-o", "json"]);
    let records = out.json();
    assert_eq!(records.as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(records[0]["operation"], "backup");
    assert_eq!(records[0]["trigger"], "client");
    let id = records[0]["id"].as_str().unwrap().to_string();
    let out = soma(a, &["list", "--failed", "-o", "name"]);
    assert_eq!(out.stdout, format!("failure/{id}\n"));
    let out = soma(
        a,
        &["list", "--failed", "-o", "jsonpath={.items[*].operation}"],
    );
    assert_eq!(out.stdout, "backup");
    // Nothing that looks like a backup was left.
    assert_eq!(soma(a, &["list", "-o", "name"]).stdout, "");

    let out = soma(a, &["status"]);
    assert!(out.stdout.contains("Recent failures"), "{out}");
    assert!(!out.stdout.contains("no failures recorded"), "{out}");
    let out = soma(a, &["status", "-o", "json"]);
    assert_eq!(
        out.json()[0]["recent_failures"][0]["id"],
        id.as_str(),
        "{out}"
    );
}

const NS: &str = "shop";

/// `restore latest --target latest` (the recovery target) with `--engine postgres` choosing the
/// agent among two in the namespace, through Kubernetes: the restored server has every row
/// written after the base backup. The deprecated `--target postgres` is refused before `restore`
/// and accepted before `list`.
#[test]
fn restore_target_latest_with_engine_selection_through_kubernetes() {
    let pg = PgCluster::start();
    pg.psql(
        "postgres",
        "create table orders (id int primary key);
         insert into orders select generate_series(1, 100);",
    );
    let store = TestStore::local();
    let spool = tempfile::tempdir().unwrap();
    let pg_agent = soma_tests::pitr::wal_agent(&pg, &store, spool.path(), "1s");
    let qdrant = QdrantDouble::start(None);
    let qdrant_agent = Agent::start(
        &store.url(),
        "",
        &["--qdrant-url", &qdrant.url()],
        &store.env(),
    );
    let base = soma_tests::pitr::physical_backup(pg_agent.addr());
    pg.psql(
        "postgres",
        "insert into orders select generate_series(101, 250)",
    );
    soma_tests::pitr::wait_archived(pg_agent.addr(), &pg);

    let kube = KubeDouble::start();
    kube.add_pod(PodSpec::agent(
        NS,
        "postgresql-0",
        "postgres",
        pg_agent.addr().parse().unwrap(),
    ));
    kube.add_pod(PodSpec::agent(
        NS,
        "qdrant-0",
        "qdrant",
        qdrant_agent.addr().parse().unwrap(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig, NS);

    // Two agents: `status --engine` shows one, `describe latest` narrowed to PostgreSQL names the
    // base backup.
    let out = kubectl_soma(&kubeconfig, &["--engine", "qdrant", "status", "-o", "name"]);
    out.assert_success("--engine qdrant status -o name");
    assert_eq!(out.stdout, "agent/qdrant-0\n");
    let out = kubectl_soma(
        &kubeconfig,
        &[
            "--engine",
            "postgres",
            "describe",
            "latest",
            "-o",
            "jsonpath={.id}",
        ],
    );
    out.assert_success("--engine postgres describe latest");
    assert_eq!(out.stdout, base);

    let out = kubectl_soma(
        &kubeconfig,
        &[
            "--target",
            "postgres",
            "restore",
            "latest",
            "--pgdata",
            "/nonexistent",
        ],
    );
    out.assert_code(2, "the old global --target before restore")
        .assert_stderr_contains("use --engine postgres", "names the new flag");
    let out = kubectl_soma(&kubeconfig, &["--target", "postgres", "list", "-o", "name"]);
    out.assert_success("--target postgres list (deprecated alias)")
        .assert_stderr_contains("deprecated", "warns");
    assert_eq!(out.stdout, format!("backup/{base}\n"));

    let mut target = PgCluster::empty();
    let data = target.data_path().display().to_string();
    let out = kubectl_soma(
        &kubeconfig,
        &[
            "restore", "latest", "--engine", "postgres", "--pgdata", &data, "--target", "latest",
        ],
    );
    out.assert_success("restore latest --engine postgres --pgdata DIR --target latest");
    target
        .start_existing(&store.env())
        .unwrap_or_else(|e| panic!("the restored server did not start:\n{e}"));
    assert!(
        target.wait_promoted_or_stopped(soma_tests::pitr::PROMOTE_TIMEOUT),
        "{}",
        target.log()
    );
    assert_eq!(
        target.psql("postgres", "select count(*) from orders"),
        "250",
        "--target latest replays to the end of the archive"
    );
}

/// A value the agent relays — here a database name, which becomes the backup's target, and the
/// error naming a missing one — reaches the terminal with its control characters escaped: a
/// name holding ESC sequences cannot clear the screen or retitle the window through `backup`,
/// `list`, `describe` or an error, while `-o json` keeps the name exactly (as a JSON escape).
#[test]
fn control_characters_from_the_agent_never_reach_the_terminal() {
    const HOSTILE: &str = "app\u{1b}[2J\u{1b}]0;owned\u{7}db";
    let pg = PgCluster::start();
    pg.psql("postgres", &format!("create database \"{HOSTILE}\""));
    pg.psql(
        HOSTILE,
        "create table users (id int primary key); insert into users values (1), (2);",
    );
    let store = TestStore::local();
    let agent = Agent::start(&store.url(), &pg.url("postgres"), &[], &store.env());
    let a = agent.addr();
    let inert = |out: &CmdOutput, what: &str| {
        for (stream, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            assert!(
                !text.contains('\u{1b}') && !text.contains('\u{7}'),
                "{what} printed a raw control character on {stream}: {text:?}"
            );
        }
    };

    let out = soma(a, &["backup", "postgres", "--database", HOSTILE]);
    out.assert_success("backup postgres --database <name with ESC>");
    inert(&out, "backup");
    assert!(
        out.stdout.contains("app\\u{1b}[2J"),
        "the name is shown, escaped: {out}"
    );
    for args in [
        &["list"][..],
        &["list", "-o", "wide"],
        &["describe", "latest"],
        &["describe", "latest", "-o", "yaml"],
        &["list", "-o", "jsonpath={.items[0].target}"],
    ] {
        let out = soma(a, args);
        out.assert_success(&args.join(" "));
        inert(&out, &args.join(" "));
    }

    let out = soma(a, &["describe", "latest", "-o", "json"]);
    out.assert_success("describe latest -o json");
    inert(&out, "describe -o json");
    assert_eq!(
        out.json()["target"]["name"],
        serde_json::Value::from(HOSTILE),
        "JSON keeps the name exactly"
    );

    let missing = format!("missing{HOSTILE}");
    let out = soma(a, &["backup", "postgres", "--database", &missing]);
    assert_ne!(out.code, 0, "a backup of a missing database fails:\n{out}");
    inert(&out, "a failed backup");
    assert!(
        out.stderr.contains("missingapp\\u{1b}[2J"),
        "the error names the database, escaped: {out}"
    );
}
