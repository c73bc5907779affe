//! The metrics listener under abuse, with the real agent binary beside a real PostgreSQL 15 that
//! streams WAL: it may bind the pod IP, so anyone who reaches the pod can open connections to it,
//! and the kubelet's readiness probe goes through the same port. A readiness probe that times out
//! takes the database pod out of its Service, so hundreds of slow connections must not keep the
//! probes (or Prometheus) from an answer within a kubelet timeout, and neither may a frozen
//! database server.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use soma_tests::{Agent, PgCluster, TestStore, metrics::http_get_within, poll_until};

/// Slow clients held open against the listener at once.
const SLOW_CLIENTS: usize = 300;
/// What a probe or scrape must answer within: well inside the kubelet's default probe timeout
/// (1 s) plus scheduling slack on a loaded 2-core machine, far below the 10 s the old listener
/// held a connection slot for.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// How long the attack lasts: longer than the old listener's 10 s header timeout, so every slot
/// it had was taken and retaken.
const ATTACK_FOR: Duration = Duration::from_secs(12);
/// The agent's per-connection deadline (10 s) plus slack for noticing the close.
const CONNECTION_LIFETIME_BOUND: Duration = Duration::from_secs(12);

fn streaming_agent(pg: &PgCluster, store: &TestStore, spool: &std::path::Path) -> Agent {
    Agent::start(
        &store.url(),
        &pg.url("postgres"),
        &[
            "--wal-stream",
            "--wal-spool",
            &spool.display().to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &store.env(),
    )
}

/// What the slow clients saw.
#[derive(Default)]
struct Attack {
    opened: AtomicU64,
    closed_by_agent: AtomicU64,
    longest_lived: Mutex<Duration>,
}

/// One slow client, until `stop`: connects, then sends nothing (`trickle` false) or an unfinished
/// request head one byte every 250 ms, and reconnects whenever the agent closes the connection.
fn slow_client(addr: String, trickle: bool, stop: Arc<AtomicBool>, attack: Arc<Attack>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(&addr) else {
            // Pacing a client that could not connect, not waiting for anything.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        attack.opened.fetch_add(1, Ordering::Relaxed);
        let opened = Instant::now();
        // The read timeout paces the client and notices the agent closing the connection.
        stream
            .set_read_timeout(Some(Duration::from_millis(250)))
            .unwrap();
        if trickle
            && stream
                .write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
                .is_err()
        {
            continue;
        }
        let mut byte = [0u8; 1];
        while !stop.load(Ordering::Relaxed) {
            let closed = match stream.read(&mut byte) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            };
            let closed = closed || (trickle && stream.write_all(b"a").is_err());
            if closed {
                attack.closed_by_agent.fetch_add(1, Ordering::Relaxed);
                let lived = opened.elapsed();
                let mut longest = attack.longest_lived.lock().unwrap();
                *longest = (*longest).max(lived);
                break;
            }
        }
    }
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Hundreds of connections that send nothing or a byte at a time: the old listener took one of
/// 16 slots before accepting and held it up to 10 s, so 16 of them kept every probe waiting
/// (measured: readiness unanswered for seconds). Now every connection is accepted at once, the
/// oldest is dropped beyond 512 open, each has a deadline, and probes answer from memory.
#[test]
fn hundreds_of_slow_connections_do_not_starve_probes_or_scrapes() {
    let pg = PgCluster::start();
    let store = TestStore::local();
    let spool = tempfile::tempdir().unwrap();
    let agent = streaming_agent(&pg, &store, spool.path());
    let m = agent.metrics_addr();
    for path in ["/readyz", "/livez", "/metrics"] {
        let (code, body) = http_get_within(&m, path, ANSWER_WITHIN)
            .unwrap_or_else(|e| panic!("before the attack: {e}"));
        assert_eq!(code, 200, "{path}: {body}");
    }
    let baseline_fds = open_descriptors(agent.pid());

    let stop = Arc::new(AtomicBool::new(false));
    let attack = Arc::new(Attack::default());
    let clients: Vec<_> = (0..SLOW_CLIENTS)
        .map(|i| {
            let (addr, stop, attack) = (m.clone(), stop.clone(), attack.clone());
            std::thread::spawn(move || slow_client(addr, i % 2 == 1, stop, attack))
        })
        .collect();
    poll_until(
        Duration::from_secs(30),
        "every slow client to have connected",
        || (attack.opened.load(Ordering::Relaxed) >= SLOW_CLIENTS as u64).then_some(()),
    );

    // A normal prober, as the kubelet and Prometheus are, all through the attack.
    let started = Instant::now();
    let (mut answered, mut slowest, mut most_fds) = (0u32, Duration::ZERO, 0usize);
    let mut failures = Vec::new();
    while started.elapsed() < ATTACK_FOR {
        for path in ["/readyz", "/livez", "/metrics"] {
            let asked = Instant::now();
            match http_get_within(&m, path, ANSWER_WITHIN) {
                Ok((200, body)) => {
                    answered += 1;
                    slowest = slowest.max(asked.elapsed());
                    if path == "/metrics" {
                        assert!(body.trim_end().ends_with("# EOF"), "{body}");
                    }
                }
                Ok((code, body)) => failures.push(format!("{path}: {code} {body}")),
                Err(e) => failures.push(e),
            }
        }
        most_fds = most_fds.max(open_descriptors(agent.pid()));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let opened = attack.opened.load(Ordering::Relaxed);
    let closed = attack.closed_by_agent.load(Ordering::Relaxed);
    let longest = *attack.longest_lived.lock().unwrap();
    eprintln!(
        "{answered} probes and scrapes answered, slowest {slowest:?}; {opened} slow connections opened, \
         {closed} closed by the agent, longest lived {longest:?}; agent descriptors {baseline_fds} before, \
         at most {most_fds} during"
    );
    assert!(
        failures.is_empty(),
        "{} of {} probes and scrapes got no answer within {ANSWER_WITHIN:?} during the attack: {failures:#?}",
        failures.len(),
        failures.len() + answered as usize
    );
    assert!(answered >= 9, "only {answered} probes answered");
    // The agent closed slow connections itself (deadline or a newer connection), within its
    // deadline, and never held more than its bound of them.
    assert!(
        closed >= SLOW_CLIENTS as u64,
        "the agent closed {closed} of {opened} slow connections"
    );
    assert!(
        most_fds < baseline_fds + SLOW_CLIENTS + 64,
        "the agent held {most_fds} descriptors during the attack ({baseline_fds} before)"
    );
    assert!(
        longest <= CONNECTION_LIFETIME_BOUND,
        "a slow connection lived {longest:?}"
    );
}

/// Sends SIGCONT to the postmaster when dropped, so a failing assertion cannot leave it stopped.
struct Frozen(nix::unistd::Pid);

impl Frozen {
    fn postmaster(pg: &PgCluster) -> Frozen {
        let pid_file = std::fs::read_to_string(pg.data_path().join("postmaster.pid")).unwrap();
        let pid: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// A database server that accepts connections and never answers (its postmaster stopped): the
/// old listener asked the server for its WAL position on every `/livez` and `/metrics`, and
/// answered after its 5 s wait, past the chart's probe timeout. Probes and scrapes now read what
/// the background refresh last saw, and answer at once.
#[test]
fn probes_answer_at_once_while_the_database_server_is_frozen() {
    let pg = PgCluster::start();
    let store = TestStore::local();
    let spool = tempfile::tempdir().unwrap();
    let agent = streaming_agent(&pg, &store, spool.path());
    let m = agent.metrics_addr();
    soma_tests::pitr::wait_archived(agent.addr(), &pg);

    let frozen = Frozen::postmaster(&pg);
    for round in 0..4 {
        for path in ["/livez", "/readyz", "/metrics"] {
            let asked = Instant::now();
            let (code, body) = http_get_within(&m, path, ANSWER_WITHIN)
                .unwrap_or_else(|e| panic!("round {round}, with the database server frozen: {e}"));
            assert_eq!(code, 200, "{path}: {body}");
            eprintln!("{path} answered in {:?}", asked.elapsed());
        }
    }
    drop(frozen);
    let (code, body) = http_get_within(&m, "/livez", ANSWER_WITHIN).unwrap();
    assert_eq!(code, 200, "{body}");
}
