//! Issue 22, point 8: a frozen store connection costs seconds, not minutes. Garage behind the
//! fault proxy, the real agent and a real PostgreSQL 15: a connection that is accepted and never
//! answers, or that stops in the middle of an upload's or a download's body, is dropped once
//! no byte moved for the stall time (`--store-stall-timeout`, 10 s by default) and the request
//! retried, instead of being waited on for the 2-minute attempt timeout (measured before: start-up
//! plus one backup through one frozen connection took minutes). And a connection that is slow
//! but keeps moving is never dropped for it.

use std::time::{Duration, Instant};

use soma_tests::db::assert_same_database;
use soma_tests::faults::{Direction, FaultPlan, FaultProxy};
use soma_tests::fixtures::{create_big_table, create_varied_database};
use soma_tests::{Agent, PgCluster, TestStore, soma};

/// How long a frozen connection is held by the proxy: longer than any bound here, so only the
/// agent's own detection can end the wait.
const HOLD: Duration = Duration::from_secs(180);

/// What issue 22 asks of start-up plus one backup through one frozen connection.
const BOUND: Duration = Duration::from_secs(30);

fn store_health(agent: &Agent) -> serde_json::Value {
    let out = soma(agent.addr(), &["-o", "json", "status"]);
    out.json()[0]["store_health"].clone()
}

/// Backs `db` up; returns the backup's id and the bytes it stored.
fn backup(agent: &Agent, db: &str) -> (String, u64) {
    let out = soma(
        agent.addr(),
        &["-o", "json", "backup", "postgres", "--database", db],
    );
    out.assert_success("backup through the proxy");
    let manifest = out.json();
    let stored = manifest["artifacts"]
        .as_array()
        .map(|a| a.iter().filter_map(|a| a["stored_bytes"].as_u64()).sum())
        .unwrap_or(0);
    let id = manifest["id"].as_str().expect("backup id").to_owned();
    (id, stored)
}

/// The first connection the agent opens to the store is accepted and never answered. Start-up
/// and one logical backup still end within 30 s with the agent's defaults, the frozen attempt
/// is counted in status, and the backup restores equal.
#[test]
fn a_frozen_first_connection_costs_seconds_at_start_up_and_backup() {
    let store = TestStore::garage();
    let garage = store.garage_server().expect("garage");
    let proxy = FaultProxy::start(garage.endpoint(), FaultPlan::clean());
    let pg = PgCluster::start();
    create_varied_database(&pg, "stall");
    proxy.freeze_next(1, HOLD);

    let started = Instant::now();
    let agent = Agent::start(
        &store.url(),
        &pg.url("stall"),
        &[],
        &proxy.in_front(store.env()),
    );
    let (id, _) = backup(&agent, "stall");
    let took = started.elapsed();
    eprintln!("start-up and one backup through a frozen first connection took {took:?}");

    assert_eq!(
        proxy.counts().frozen,
        1,
        "the first connection was not frozen: {:?}",
        proxy.counts()
    );
    assert!(
        took <= BOUND,
        "start-up and one backup through one frozen connection took {took:?}"
    );
    let health = store_health(&agent);
    assert!(
        health["timeouts"].as_u64().unwrap_or(0) >= 1,
        "status does not count the frozen attempt: {health}"
    );
    assert_eq!(health["failures"], 0, "a request gave up: {health}");
    soma(
        agent.addr(),
        &["restore", &id, "--database", "stall_restored"],
    )
    .assert_success("restore of the backup");
    assert_same_database(&pg, "stall", "stall_restored");
}

/// A connection that stops in the middle of an upload's body (the proxy stops reading, so the
/// agent's buffers fill and nothing moves), and later one that stops in the middle of a
/// download's body: each is dropped after the stall time, the part is sent again and the
/// download resumes, and the backup restores equal.
#[test]
fn connections_frozen_mid_body_are_dropped_in_seconds() {
    let store = TestStore::garage();
    let garage = store.garage_server().expect("garage");
    let proxy = FaultProxy::start(garage.endpoint(), FaultPlan::clean());
    let pg = PgCluster::start();
    pg.createdb("midbody");
    // ~40 MB of poorly compressible rows: one whole 16 MiB part (the default) and more, larger
    // than the socket buffers between the agent and the proxy can hold.
    create_big_table(&pg, "midbody", "payload", 40);
    proxy.freeze_mid_body(Direction::Up, 2 << 20, HOLD);

    let started = Instant::now();
    let agent = Agent::start(
        &store.url(),
        &pg.url("midbody"),
        &[],
        &proxy.in_front(store.env()),
    );
    let (id, _) = backup(&agent, "midbody");
    let took = started.elapsed();
    eprintln!("start-up and one backup through an upload frozen mid-body took {took:?}");
    assert!(proxy.froze_mid_body(), "no upload was frozen mid-body");
    assert!(
        took <= BOUND,
        "start-up and one backup through an upload frozen mid-body took {took:?}"
    );
    assert!(
        store_health(&agent)["timeouts"].as_u64().unwrap_or(0) >= 1,
        "status does not count the stalled upload"
    );

    proxy.freeze_mid_body(Direction::Down, 2 << 20, HOLD);
    let started = Instant::now();
    soma(
        agent.addr(),
        &["restore", &id, "--database", "midbody_restored"],
    )
    .assert_success("restore through a download frozen mid-body");
    let took = started.elapsed();
    eprintln!("a restore through a download frozen mid-body took {took:?}");
    assert!(proxy.froze_mid_body(), "no download was frozen mid-body");
    // The stall time and the restore itself; the SDK's own stalled-stream protection (20 s
    // grace) or the attempt timeout (2 min) would take longer.
    assert!(
        took < Duration::from_secs(20),
        "a restore through one download frozen mid-body took {took:?}"
    );
    assert_same_database(&pg, "midbody", "midbody_restored");
    let health = store_health(&agent);
    assert!(
        health["resumed_downloads"].as_u64().unwrap_or(0) >= 1,
        "the frozen download was not resumed: {health}"
    );
    assert_eq!(health["failures"], 0, "a request gave up: {health}");
}

/// Every connection crawls at 1 MiB/s, so each 5 MiB part takes seconds longer to travel than
/// the 2 s stall time allows for silence; bytes keep moving, so nothing is dropped: the backup
/// and its restore succeed without a single timeout.
#[test]
fn a_slow_connection_that_keeps_moving_is_never_dropped() {
    let store = TestStore::garage();
    let garage = store.garage_server().expect("garage");
    let proxy = FaultProxy::start(garage.endpoint(), FaultPlan::clean());
    let pg = PgCluster::start();
    pg.createdb("slow");
    create_big_table(&pg, "slow", "payload", 16);
    const RATE: u64 = 1 << 20;
    proxy.throttle(RATE);
    let agent = Agent::start(
        &store.url(),
        &pg.url("slow"),
        &["--part-size", "5MiB", "--store-stall-timeout", "2s"],
        &proxy.in_front(store.env()),
    );

    let started = Instant::now();
    let (id, stored) = backup(&agent, "slow");
    let took = started.elapsed();
    eprintln!("a backup of {stored} bytes at 1 MiB/s took {took:?}");
    // The link really was slow: each 5 MiB part took longer on its connection than the stall
    // time (parts travel side by side, each connection at the rate).
    assert!(
        took >= Duration::from_secs_f64((5u64 << 20) as f64 / RATE as f64),
        "the backup of {stored} bytes took only {took:?}: the proxy did not slow it"
    );
    soma(
        agent.addr(),
        &["restore", &id, "--database", "slow_restored"],
    )
    .assert_success("restore through the slow link");
    assert_same_database(&pg, "slow", "slow_restored");
    let health = store_health(&agent);
    assert_eq!(
        (health["timeouts"].as_u64(), health["retries"].as_u64()),
        (Some(0), Some(0)),
        "a slow connection that kept moving was dropped: {health}"
    );
}
