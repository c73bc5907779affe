//! Proves `kubectl soma` works the Kubernetes way, with no `--agent`: it reads a real kubeconfig,
//! finds agent pods through the API (labels `soma.dev/agent`, `soma.dev/engine`, the bitnami
//! `app.kubernetes.io/component=primary`), and reaches the agent through the pods/portforward
//! subresource. The API server is `soma_tests::kube::KubeDouble`, which speaks the real wire
//! protocol (Pod/PodList/Status JSON, bearer tokens over TLS, RBAC 403s in the API server's format,
//! port-forward over WebSocket with `v4.channel.k8s.io` as the kubelet serves it) and relays each
//! port-forward to the real agent on 127.0.0.1 — so a real backup and restore run through it.
//! The real `kubectl` also runs the plugin (`kubectl soma ...`) against the same kubeconfig.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use soma_tests::{
    Agent, CmdOutput, KubeDouble, PgCluster, PodSpec, TestStore, assert_same_database, bin_dir,
    kubectl_soma,
};

const NS: &str = "soma-agent-hub";

fn agent_pod(name: &str, engine: &str, agent: &Agent) -> PodSpec {
    PodSpec::agent(NS, name, engine, agent.addr().parse().unwrap())
}

struct Cluster {
    // Drop order: the agent before its database and store.
    agent: Agent,
    pg: PgCluster,
    store: TestStore,
    kube: KubeDouble,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

fn cluster() -> Cluster {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql(
        "appdb",
        "create table users (id int primary key, name text);
         insert into users select i, 'user ' || i from generate_series(1, 1000) i;",
    );
    let store = TestStore::local();
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    let kube = KubeDouble::start();
    kube.add_pod(
        agent_pod("postgresql-0", "postgres", &agent)
            .label("app.kubernetes.io/component", "primary"),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    // The context's namespace is the default, as with kubectl.
    kube.write_kubeconfig(&kubeconfig, NS);
    Cluster {
        agent,
        pg,
        store,
        kube,
        _dir: dir,
        kubeconfig,
    }
}

#[test]
fn backup_and_restore_run_through_a_port_forward() {
    let c = cluster();
    let out = kubectl_soma(
        &c.kubeconfig,
        &["-o", "json", "backup", "postgres", "--database", "appdb"],
    );
    out.assert_success("backup through the Kubernetes API");
    let id = out.json()["id"].as_str().unwrap().to_string();
    assert!(
        c.kube.port_forward_count() >= 1,
        "no port-forward was opened"
    );

    let out = kubectl_soma(&c.kubeconfig, &["-n", NS, "list", "-o", "json"]);
    out.assert_success("list");
    assert_eq!(out.json()[0]["id"], id.as_str());
    kubectl_soma(
        &c.kubeconfig,
        &["restore", &id, "--database", "appdb_restored"],
    )
    .assert_success("restore through the Kubernetes API");
    assert_same_database(&c.pg, "appdb", "appdb_restored");
    // Nothing bypassed the API server: the agent was never given a Service or a host port.
    assert!(
        c.kube
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/pods/postgresql-0/portforward"))
    );
    drop(c.agent);
}

#[test]
fn the_real_kubectl_runs_the_plugin() {
    let c = cluster();
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("kubectl")
        .args(["soma", "--kubeconfig"])
        .arg(&c.kubeconfig)
        .args(["-n", NS, "backup", "postgres", "--database", "appdb"])
        .env("PATH", &path)
        .env_remove("SOMA_AGENT")
        .stdin(Stdio::null())
        .output()
        .expect("kubectl is installed");
    let out = CmdOutput::from_output(&out);
    out.assert_success("kubectl soma backup postgres");
    assert!(out.stdout.contains("complete"), "{out}");
}

#[test]
fn status_shows_every_agent_and_its_health() {
    let c = cluster();
    kubectl_soma(&c.kubeconfig, &["backup", "postgres"]).assert_success("backup");
    let out = kubectl_soma(&c.kubeconfig, &["status", "-o", "json"]);
    out.assert_success("status");
    let rows = out.json();
    let row = &rows[0];
    assert_eq!(row["pod"], "postgresql-0");
    assert_eq!(row["namespace"], NS);
    assert_eq!(row["engine"], "postgres");
    assert_eq!(row["health"], "ok");
    assert_eq!(row["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(
        row["store"].as_str().unwrap().starts_with("file://"),
        "{row}"
    );
    assert!(
        row["last_backup"].as_str().unwrap().contains("-pg-appdb-"),
        "{row}"
    );
    assert!(row["last_backup_age_seconds"].as_i64().unwrap() >= 0);

    // A second agent pod that is not ready shows up as such, and status fails.
    c.kube
        .add_pod(agent_pod("qdrant-0", "qdrant", &c.agent).ready(false));
    let out = kubectl_soma(&c.kubeconfig, &["status"]);
    out.assert_code(1, "status with an unready agent");
    assert!(
        out.stdout.contains("qdrant-0") && out.stdout.contains("not ready"),
        "{out}"
    );
    assert!(out.stdout.contains("postgresql-0"), "{out}");
}

#[test]
fn discovery_errors_say_what_to_do() {
    let c = cluster();
    // No agent in the namespace.
    kubectl_soma(&c.kubeconfig, &["-n", "elsewhere", "list"])
        .assert_code(1, "no agent in the namespace")
        .assert_stderr_contains("no soma agent in namespace elsewhere", "no agent")
        .assert_stderr_contains("soma.dev/agent=true", "no agent");

    // More agents: the primary label decides for PostgreSQL, the engine of a backup decides
    // which agent acts on it.
    c.kube
        .add_pod(agent_pod("pg-replica-a", "postgres", &c.agent));
    c.kube
        .add_pod(agent_pod("pg-replica-b", "postgres", &c.agent));
    c.kube.add_pod(agent_pod("qdrant-0", "qdrant", &c.agent));
    kubectl_soma(&c.kubeconfig, &["backup", "postgres"]).assert_success("backup picks the primary");
    kubectl_soma(&c.kubeconfig, &["describe", "latest"]).assert_success("describe finds its agent");

    // Without a primary, two ready PostgreSQL agents are ambiguous, and the candidates are named.
    assert!(c.kube.remove_pod(NS, "postgresql-0"));
    kubectl_soma(&c.kubeconfig, &["backup", "postgres"])
        .assert_code(1, "several candidates")
        .assert_stderr_contains("several soma agents for postgres", "several candidates")
        .assert_stderr_contains("pg-replica-a", "several candidates")
        .assert_stderr_contains("--pod", "several candidates");
    kubectl_soma(
        &c.kubeconfig,
        &["--pod", "pg-replica-b", "backup", "postgres"],
    )
    .assert_success("--pod resolves it");
    c.kube.add_pod(
        agent_pod("postgresql-0", "postgres", &c.agent)
            .label("app.kubernetes.io/component", "primary"),
    );

    // The chosen pod is not ready.
    c.kube.set_ready("postgresql-0", false);
    kubectl_soma(&c.kubeconfig, &["--pod", "postgresql-0", "list"])
        .assert_code(1, "pod not ready")
        .assert_stderr_contains("is not ready", "pod not ready");
}

#[test]
fn rbac_denials_name_the_missing_rights() {
    let c = cluster();
    c.kube.deny(NS, "list", "pods");
    kubectl_soma(&c.kubeconfig, &["list"])
        .assert_code(1, "list pods denied")
        .assert_stderr_contains("refused to list pods", "list pods denied")
        .assert_stderr_contains("cannot list resource \"pods\"", "list pods denied");

    c.kube.allow_all();
    c.kube.deny(NS, "create", "pods/portforward");
    kubectl_soma(&c.kubeconfig, &["list"])
        .assert_code(1, "port-forward denied")
        .assert_stderr_contains("pods/portforward", "port-forward denied");
}

/// One sidecar per engine, as the chart deploys them, writing to one store: `backup all` (the
/// pre-upgrade hook's command) is one platform set whose members each sidecar wrote, and
/// `restore SET` brings every member back through the agent serving it.
#[test]
fn backup_all_spans_one_sidecar_per_engine() {
    let c = cluster();
    let q = soma_tests::QdrantDouble::start(None);
    q.add_collection("memory", 8, 100, 64 * 1024, 1);
    let original = q.fingerprint("memory");
    let url = q.url();
    let qdrant_agent = Agent::start(&c.store.url(), "", &["--qdrant-url", &url], &c.store.env());
    c.kube
        .add_pod(agent_pod("qdrant-0", "qdrant", &qdrant_agent));

    let out = kubectl_soma(&c.kubeconfig, &["-o", "json", "backup", "all"]);
    out.assert_success("backup all across two sidecars");
    let set = out.json();
    assert_eq!(set["kind"], "set", "{out}");
    let members: Vec<String> = set["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members[0].contains("-pg-"), "PostgreSQL first: {members:?}");
    assert!(members[1].contains("-qd-"), "{members:?}");
    let set_id = set["id"].as_str().unwrap().to_string();
    let listed = kubectl_soma(&c.kubeconfig, &["-o", "json", "list"]);
    listed.assert_success("list");
    assert!(
        listed
            .json()
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["id"] == set_id.as_str()),
        "the platform set is listed:\n{listed}"
    );

    q.add_collection("memory", 8, 100, 64 * 1024, 2);
    assert_ne!(q.fingerprint("memory"), original);
    c.pg.psql("appdb", "delete from users where id > 500");
    let out = kubectl_soma(&c.kubeconfig, &["restore", &set_id, "--force", "--clean"]);
    out.assert_success("restore the platform set through both sidecars");
    assert_eq!(
        q.fingerprint("memory"),
        original,
        "the restore did not bring the backed-up collection back"
    );
    assert_eq!(
        c.pg.psql("appdb", "select count(*) from users"),
        "1000",
        "{out}"
    );
}

/// Sidecars writing to different stores cannot make one platform set: refused, naming the
/// stores, before anything is backed up.
#[test]
fn backup_all_refuses_agents_with_different_stores() {
    let c = cluster();
    let q = soma_tests::QdrantDouble::start(None);
    q.add_collection("memory", 8, 10, 1024, 1);
    let other = TestStore::local();
    let qdrant_agent = Agent::start(&other.url(), "", &["--qdrant-url", &q.url()], &other.env());
    c.kube
        .add_pod(agent_pod("qdrant-0", "qdrant", &qdrant_agent));
    let out = kubectl_soma(&c.kubeconfig, &["backup", "all"]);
    out.assert_code(1, "backup all across stores");
    out.assert_stderr_contains("different stores", "names the problem");
    assert!(
        c.store.manifests().is_empty() && other.manifests().is_empty(),
        "nothing was backed up"
    );
}

/// An agent started with `--token-file`: the plugin reads the token from the Secret the pod's
/// `soma.dev/token-secret` annotation names (`get` on secrets, as the API server answers it), and
/// says what is wrong when the Secret is missing or RBAC forbids reading it. Only a Secret labelled
/// as a soma-backup agent token is read: a pod's annotation naming any other Secret (whoever can
/// create pods writes annotations) makes the plugin refuse before it opens a port-forward, so
/// that Secret's value never reaches the pod.
/// The labels the chart puts on the token Secret it creates.
const TOKEN_LABELS: &[(&str, &str)] = &[
    ("app.kubernetes.io/part-of", "soma-backup"),
    ("app.kubernetes.io/component", "agent-token"),
];

#[test]
fn the_token_comes_from_the_secret_the_pod_names() {
    let token = "k8s-secret-token-0123456789abcdef";
    let store = TestStore::local();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let agent = Agent::start(
        &store.url(),
        "",
        &["--token-file", &token_file.display().to_string()],
        &store.env(),
    );
    let kube = KubeDouble::start();
    kube.add_pod(
        agent_pod("postgresql-0", "postgres", &agent)
            .annotation("soma.dev/token-secret", "soma-agent-token"),
    );
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig, NS);

    // No Secret yet: the plugin names it.
    let out = kubectl_soma(&kubeconfig, &["list"]);
    assert_ne!(out.code, 0, "{out}");
    out.assert_stderr_contains(
        "secrets \"soma-agent-token\" not found",
        "list without the Secret",
    );

    // The right token, in a Secret without the chart's labels: not read, nothing forwarded.
    kube.add_secret(
        NS,
        "soma-agent-token",
        &[("token", format!("{token}\n").as_bytes())],
    );
    let forwards = kube.port_forward_count();
    let out = kubectl_soma(&kubeconfig, &["list"]);
    out.assert_code(1, "list with an unlabelled Secret");
    out.assert_stderr_contains(
        "not labelled as a soma-backup agent token",
        "list with an unlabelled Secret",
    );
    out.assert_stderr_contains(
        "app.kubernetes.io/part-of=soma-backup",
        "names the labels to set",
    );
    assert_eq!(
        kube.port_forward_count(),
        forwards,
        "no port-forward was opened to the pod"
    );
    // Only part of the labels: still refused.
    kube.add_labelled_secret(
        NS,
        "soma-agent-token",
        &[("app.kubernetes.io/part-of", "soma-backup")],
        &[("token", format!("{token}\n").as_bytes())],
    );
    kubectl_soma(&kubeconfig, &["list"]).assert_code(1, "list with a half-labelled Secret");
    assert_eq!(kube.port_forward_count(), forwards);

    kube.add_labelled_secret(
        NS,
        "soma-agent-token",
        TOKEN_LABELS,
        &[("token", format!("{token}\n").as_bytes())],
    );
    kubectl_soma(&kubeconfig, &["list"]).assert_success("list with the token from the Secret");
    kubectl_soma(&kubeconfig, &["status"]).assert_success("status with the token from the Secret");

    // A Secret holding another token: the agent refuses it.
    kube.add_labelled_secret(
        NS,
        "soma-agent-token",
        TOKEN_LABELS,
        &[("token", b"some-other-token-0123456789")],
    );
    let out = kubectl_soma(&kubeconfig, &["list"]);
    assert_ne!(out.code, 0, "{out}");
    out.assert_stderr_contains("not this agent's", "list with another token");
    kube.add_labelled_secret(
        NS,
        "soma-agent-token",
        TOKEN_LABELS,
        &[("token", token.as_bytes())],
    );

    // RBAC without `get` on secrets: the plugin says which permission is missing.
    kube.deny(NS, "get", "secrets");
    let out = kubectl_soma(&kubeconfig, &["list"]);
    assert_ne!(out.code, 0, "{out}");
    out.assert_stderr_contains("get secret soma-agent-token", "list without get on secrets");
    out.assert_stderr_contains("forbidden", "list without get on secrets");
    assert!(
        !out.stderr.contains(token) && !out.stdout.contains(token),
        "{out}"
    );
}
