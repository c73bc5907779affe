//! The disaster, played end to end: the README's runbook is the test.
//!
//! An "old platform" — PostgreSQL with an application database owned by a login role that grants
//! to a second role, two databases shaped like Temporal's (`temporal`, `temporal_visibility`:
//! their own login role, many tables, `btree_gin`, bytea payloads), sequences advanced; Qdrant
//! (the double) with several collections and an alias; agents with `--wal-stream` writing to a
//! real S3 server (Garage) — takes a platform backup, keeps writing, and is then killed and
//! deleted. A NEW PostgreSQL (fresh initdb, no roles) and Qdrant get new agents that read the old
//! bucket read-only (`--restore-from`) and write their own backups elsewhere. The commands of the
//! README's "Disaster recovery runbook" blocks then run exactly as written, through `bash`, with
//! `kubectl soma` reaching the agents through the Kubernetes API double (`KubeDouble`: the real
//! API's pod list and pods/portforward over WebSocket, relayed to the agents on 127.0.0.1).
//! Every database, role, membership, ownership, grant, sequence position and row, and every
//! collection's points, vector config and alias must be back; the platform RTO is printed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use soma_tests::db::{DbFingerprint, assert_fingerprints_equal};
use soma_tests::{
    Agent, CmdOutput, KubeDouble, PgCluster, PodSpec, QdrantDouble, TestStore, bin_dir,
    kubectl_soma, pitr,
};

/// The runbook's namespace.
const NS: &str = "soma";
/// The application and Temporal databases of the old platform.
const DATABASES: [&str; 3] = ["appdb", "temporal", "temporal_visibility"];
/// Its roles (besides the bootstrap superuser, which every cluster has).
const ROLES: &str = "('app_owner', 'app_reader', 'temporal')";

/// The lines of the README block marked `<!-- runbook:NAME -->`.
fn runbook(name: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("read README.md");
    let marker = format!("<!-- runbook:{name} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"))
        .1;
    let body = after
        .trim_start()
        .strip_prefix("```sh\n")
        .unwrap_or_else(|| panic!("{marker} is not followed by a ```sh block"));
    body.split_once("\n```")
        .unwrap_or_else(|| panic!("the block after {marker} is not closed"))
        .0
        .to_string()
}

/// Runs a runbook block with `bash -euo pipefail`, `kubectl` finding the plugin on PATH.
fn run_runbook(
    name: &str,
    kubeconfig: &Path,
    env: &[(String, String)],
    as_owner: Option<&PgCluster>,
) -> (CmdOutput, Duration) {
    let script = runbook(name);
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = match as_owner {
        Some(pg) => pg.owner_command("bash"),
        None => Command::new("bash"),
    };
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("AWS_") || k.starts_with("SOMA_") || k.starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
    let started = Instant::now();
    let out = cmd
        .args(["-euo", "pipefail", "-c", &script])
        .env("PATH", &path)
        .env("KUBECONFIG", kubeconfig)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .output()
        .expect("run bash");
    let took = started.elapsed();
    (CmdOutput::from_output(&out), took)
}

fn agent_pod(name: &str, engine: &str, agent: &Agent) -> PodSpec {
    let pod = PodSpec::agent(NS, name, engine, agent.addr().parse().unwrap());
    if engine == "postgres" {
        pod.label("app.kubernetes.io/component", "primary")
    } else {
        pod
    }
}

/// PostgreSQL as the platform uses it.
fn seed_postgres(pg: &PgCluster) {
    pg.psql(
        "postgres",
        "create role app_owner login password 'app-owner-secret' connection limit 20;
         create role app_reader nologin;
         grant app_reader to app_owner;
         create role temporal login password 'temporal-secret' createdb;
         create database appdb owner app_owner;
         create database temporal owner temporal;
         create database temporal_visibility owner temporal;",
    );
    pg.psql(
        "appdb",
        "set role app_owner;
         create table users (id bigserial primary key, name text not null, policy jsonb);
         create table policies (id serial primary key, user_id bigint references users, rule text);
         insert into users (name, policy)
           select 'user ' || i, jsonb_build_object('tier', i % 3) from generate_series(1, 3000) i;
         insert into policies (user_id, rule) select i, 'allow ' || i from generate_series(1, 3000) i;
         create sequence tickets start 100;
         select nextval('tickets') from generate_series(1, 37);
         grant select on users, policies to app_reader;
         grant usage on sequence tickets to app_reader;",
    );
    for db in ["temporal", "temporal_visibility"] {
        pg.psql(db, "create extension btree_gin;");
        let mut sql = String::from("set role temporal;\n");
        for t in 0..12 {
            sql.push_str(&format!(
                "create table history_{t} (shard_id int, workflow_id text, run_id uuid,
                   event_id bigserial, data bytea, primary key (shard_id, workflow_id, event_id));
                 create index on history_{t} using gin (shard_id, workflow_id);
                 insert into history_{t} (shard_id, workflow_id, run_id, data)
                   select i % 4, 'wf-' || i, md5(i::text)::uuid,
                          convert_to(repeat(md5(i::text || '{t}'), 8), 'UTF8')
                   from generate_series(1, 400) i;\n"
            ));
        }
        pg.psql(db, &sql);
    }
}

/// More writes after the platform backup: what a logical restore does not bring back.
fn write_more(pg: &PgCluster, tag: &str) {
    pg.psql(
        "appdb",
        &format!(
            "insert into users (name) select '{tag} ' || i from generate_series(1, 50) i;
             select nextval('tickets') from generate_series(1, 5);"
        ),
    );
    pg.psql(
        "temporal",
        &format!(
            "insert into history_0 (shard_id, workflow_id, run_id, data)
               select 9, '{tag}-' || i, md5(i::text)::uuid, '\\x00ff'::bytea from generate_series(1, 50) i;"
        ),
    );
}

/// Everything the user checks in PostgreSQL after a restore.
#[derive(Debug, PartialEq, Eq)]
struct PgState {
    roles: String,
    memberships: String,
    database_owners: String,
    databases: Vec<DbFingerprint>,
}

fn pg_state(pg: &PgCluster) -> PgState {
    PgState {
        roles: pg.psql(
            "postgres",
            &format!(
                "select rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin,
                        rolreplication, rolbypassrls, rolconnlimit, rolpassword
                 from pg_authid where rolname in {ROLES} order by 1"
            ),
        ),
        memberships: pg.psql(
            "postgres",
            "select r.rolname, m.rolname, a.admin_option from pg_auth_members a
               join pg_roles r on r.oid = a.roleid join pg_roles m on m.oid = a.member
             where r.rolname not like 'pg\\_%' order by 1, 2",
        ),
        database_owners: pg.psql(
            "postgres",
            "select datname, pg_get_userbyid(datdba) from pg_database
             where datname in ('appdb', 'temporal', 'temporal_visibility') order by 1",
        ),
        // Schema (with every OWNER TO and GRANT), rows and sequence positions.
        databases: DATABASES
            .iter()
            .map(|db| DbFingerprint::of(pg, db))
            .collect(),
    }
}

/// How sequence positions must compare after the restore.
#[derive(Clone, Copy)]
enum Sequences {
    /// A logical restore sets each sequence to the dumped value.
    Exact,
    /// WAL replay: PostgreSQL WAL-logs sequences 32 values ahead of what it hands out
    /// (SEQ_LOG_VALS), so after recovery a sequence may have skipped values but never hands out
    /// one it had handed out before the target.
    NeverBehind,
}

fn assert_pg_state(expected: &PgState, got: &PgState, sequences: Sequences) {
    assert_eq!(
        expected.roles, got.roles,
        "roles (attributes, password hashes) differ"
    );
    assert_eq!(
        expected.memberships, got.memberships,
        "role memberships differ"
    );
    assert_eq!(
        expected.database_owners, got.database_owners,
        "database owners differ"
    );
    for ((db, e), g) in DATABASES
        .iter()
        .zip(&expected.databases)
        .zip(&got.databases)
    {
        let mut g = g.clone();
        if let Sequences::NeverBehind = sequences {
            for (name, value) in &e.sequences {
                let restored = g.sequences.get(name).cloned().unwrap_or_default();
                let (old, new) = (value.parse::<i64>(), restored.parse::<i64>());
                assert!(
                    matches!((&old, &new), (Ok(o), Ok(n)) if n >= o) || value == &restored,
                    "sequence {name} of {db} went back: {value} before the target, {restored} restored"
                );
                g.sequences.insert(name.clone(), value.clone());
            }
        }
        assert_fingerprints_equal(e, &g, &format!("old {db}"), &format!("restored {db}"));
    }
}

fn seed_qdrant(q: &QdrantDouble) {
    q.add_collection("memory", 16, 2000, 512 * 1024, 1);
    q.add_collection("episodes", 8, 500, 128 * 1024, 2);
    q.add_collection("documents", 32, 800, 256 * 1024, 3);
    q.add_alias("memory-current", "memory");
}

/// Per collection: name, vector size, point count, fingerprint of its data.
type Collections = Vec<(String, u64, u64, String)>;

/// Every collection's fingerprint and vector config, and the aliases.
fn qdrant_state(q: &QdrantDouble) -> (Collections, Vec<(String, String)>) {
    let collections = q
        .collections()
        .into_iter()
        .map(|name| {
            let c = q.collection(&name).expect("listed collection exists");
            (
                name.clone(),
                c.vector_size,
                c.points_count,
                q.fingerprint(&name),
            )
        })
        .collect();
    (collections, q.aliases())
}

/// The old platform: PostgreSQL and Qdrant, one sidecar each with `--wal-stream`, behind the
/// Kubernetes double, writing to `store`.
struct OldPlatform {
    pg_agent: Agent,
    qdrant_agent: Agent,
    pg: PgCluster,
    qdrant: QdrantDouble,
    kube: KubeDouble,
    _spool: tempfile::TempDir,
    kubeconfig: PathBuf,
}

fn old_platform(store: &TestStore, dir: &Path) -> OldPlatform {
    let pg = PgCluster::start();
    seed_postgres(&pg);
    let qdrant = QdrantDouble::start(None);
    seed_qdrant(&qdrant);
    let spool = tempfile::tempdir().unwrap();
    let pg_agent = pitr::wal_agent(&pg, store, spool.path(), "1s");
    let qdrant_agent = Agent::start(
        &store.url(),
        "",
        &["--qdrant-url", &qdrant.url()],
        &store.env(),
    );
    let kube = KubeDouble::start();
    kube.add_pod(agent_pod("postgresql-0", "postgres", &pg_agent));
    kube.add_pod(agent_pod("qdrant-0", "qdrant", &qdrant_agent));
    let kubeconfig = dir.join("old-kubeconfig");
    kube.write_kubeconfig(&kubeconfig, NS);
    OldPlatform {
        pg_agent,
        qdrant_agent,
        pg,
        qdrant,
        kube,
        _spool: spool,
        kubeconfig,
    }
}

/// The new, empty platform: fresh PostgreSQL (`pg`, or one the runbook restores into), fresh
/// Qdrant, agents reading the old store read-only and writing their own backups to a new prefix.
struct NewPlatform {
    // Kept alive (killed on drop) while the runbook runs.
    _agents: Vec<Agent>,
    _kube: KubeDouble,
    kubeconfig: PathBuf,
}

fn new_platform(old: &TestStore, pg: &PgCluster, qdrant: &QdrantDouble, dir: &Path) -> NewPlatform {
    let own = old.url().replace("some/prefix", "new-cluster/prefix");
    let old_url = old.url();
    let pg_agent = Agent::start(
        &own,
        &pg.url("postgres"),
        &["--restore-from", &old_url, "--owner-id", "new-cluster"],
        &old.env(),
    );
    let qdrant_agent = Agent::start(
        &own,
        "",
        &[
            "--qdrant-url",
            &qdrant.url(),
            "--restore-from",
            &old_url,
            "--owner-id",
            "new-cluster",
        ],
        &old.env(),
    );
    let kube = KubeDouble::start();
    kube.add_pod(agent_pod("postgresql-0", "postgres", &pg_agent));
    kube.add_pod(agent_pod("qdrant-0", "qdrant", &qdrant_agent));
    let kubeconfig = dir.join("new-kubeconfig");
    kube.write_kubeconfig(&kubeconfig, NS);
    NewPlatform {
        _agents: vec![pg_agent, qdrant_agent],
        _kube: kube,
        kubeconfig,
    }
}

/// Kills the old platform and deletes its data: only the bucket survives.
fn disaster(old: OldPlatform) {
    let OldPlatform {
        mut pg_agent,
        mut qdrant_agent,
        mut pg,
        qdrant,
        kube,
        ..
    } = old;
    pg_agent.kill_9();
    qdrant_agent.kill_9();
    pg.kill_9();
    drop(kube);
    drop(qdrant);
    drop(pg); // removes the data directory
}

#[test]
fn logical_platform_set_restores_everything_into_an_empty_cluster() {
    let store = TestStore::garage();
    let dir = tempfile::tempdir().unwrap();
    let old = old_platform(&store, dir.path());

    let backup = kubectl_soma(&old.kubeconfig, &["-n", NS, "-o", "json", "backup", "all"]);
    backup.assert_success("backup all (the platform)");
    let set = backup.json();
    assert_eq!(set["kind"], "set", "{backup}");
    let members: Vec<String> = set["members"]
        .as_array()
        .expect("the set lists its members")
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(members.len(), 2, "one member per sidecar: {members:?}");
    let expected_pg = pg_state(&old.pg);
    let expected_qdrant = qdrant_state(&old.qdrant);
    // Written after the backup: a logical restore brings back the backup's state, not this.
    write_more(&old.pg, "after-backup");
    old.qdrant.add_collection("scratch", 4, 10, 1024, 9);
    disaster(old);

    let old_objects = store.list("");
    let pg = PgCluster::start();
    let qdrant = QdrantDouble::start(None);
    let new = new_platform(&store, &pg, &qdrant, dir.path());
    let (out, rto) = run_runbook("logical", &new.kubeconfig, &[], None);
    out.assert_success("the README's logical runbook");
    assert!(
        out.stdout.contains(set["id"].as_str().unwrap()),
        "latest is the platform set:\n{out}"
    );

    assert_pg_state(&expected_pg, &pg_state(&pg), Sequences::Exact);
    assert_eq!(
        qdrant_state(&qdrant),
        expected_qdrant,
        "Qdrant collections and aliases"
    );
    // Nothing was written to, deleted from or swept in the old prefix.
    assert_eq!(store.list(""), old_objects, "the read-only source changed");
    eprintln!(
        "platform RTO (logical, README runbook incl. list, describe, verify): {:.1}s",
        rto.as_secs_f64()
    );
    drop(new);
}

#[test]
fn physical_platform_set_restores_to_a_point_in_time() {
    let store = TestStore::garage();
    let dir = tempfile::tempdir().unwrap();
    let old = old_platform(&store, dir.path());

    kubectl_soma(
        &old.kubeconfig,
        &["-n", NS, "-o", "json", "backup", "all", "--physical"],
    )
    .assert_success("backup all --physical (the platform)");
    // After the set: more writes, and a Qdrant backup taken before the target time.
    write_more(&old.pg, "before-target");
    old.qdrant
        .add_collection("episodes", 8, 600, 128 * 1024, 20);
    kubectl_soma(&old.kubeconfig, &["-n", NS, "backup", "qdrant"]).assert_success("backup qdrant");
    let expected_qdrant = qdrant_state(&old.qdrant);
    let expected_pg = pg_state(&old.pg);
    let target_time = old.pg.psql("postgres", "select now()");
    // After the target: neither comes back.
    write_more(&old.pg, "after-target");
    old.qdrant
        .add_collection("episodes", 8, 700, 128 * 1024, 30);
    kubectl_soma(&old.kubeconfig, &["-n", NS, "backup", "qdrant"])
        .assert_success("backup qdrant after the target");
    pitr::wait_archived(old.pg_agent.addr(), &old.pg);
    disaster(old);

    // The new server's data directory does not exist yet: the runbook lays it down.
    let mut pg = PgCluster::empty();
    let old_store = store.url();
    let pgdata = pg.data_path().display().to_string();
    let vars = |extra: &[(&str, &str)]| {
        let mut v: Vec<(String, String)> = store.env();
        v.push(("TARGET_TIME".into(), target_time.clone()));
        v.push(("OLD_STORE".into(), old_store.clone()));
        v.push(("PGDATA".into(), pgdata.clone()));
        v.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        v
    };
    let started = Instant::now();
    let kubeconfig_unused = dir.path().join("unused");
    let (out, pgdata_took) =
        run_runbook("physical-pgdata", &kubeconfig_unused, &vars(&[]), Some(&pg));
    out.assert_success("the README's restore-pgdata step");
    let replay = Instant::now();
    pg.start_existing(&store.env())
        .unwrap_or_else(|e| panic!("the restored server did not start:\n{e}"));
    assert!(
        pg.wait_promoted_or_stopped(pitr::PROMOTE_TIMEOUT),
        "the restored server stopped instead of promoting:\n{}",
        pg.log()
    );
    let replay_took = replay.elapsed();

    let qdrant = QdrantDouble::start(None);
    let new = new_platform(&store, &pg, &qdrant, dir.path());
    let (out, rest_took) = run_runbook("physical-rest", &new.kubeconfig, &vars(&[]), None);
    out.assert_success("the README's point-in-time runbook");
    let rto = started.elapsed();

    assert_pg_state(&expected_pg, &pg_state(&pg), Sequences::NeverBehind);
    assert_eq!(
        qdrant_state(&qdrant),
        expected_qdrant,
        "Qdrant must be the newest backup at or before the target time"
    );
    eprintln!(
        "platform RTO (physical to a time): {:.1}s — base backup laid down {:.1}s, WAL replay {:.1}s, Qdrant + checks {:.1}s",
        rto.as_secs_f64(),
        pgdata_took.as_secs_f64(),
        replay_took.as_secs_f64(),
        rest_took.as_secs_f64()
    );
    drop(new);
}
