//! A fault-injecting TCP proxy in front of a real S3 server (Garage), for what production object
//! stores do to long backups: answer `503 SlowDown`, reset a connection in the middle of a body,
//! or accept a request and never answer.
//!
//! Each new connection draws its fate from a seeded generator, so a failing run can be repeated
//! with the same seed. The SDK keeps connections alive and reuses them, so a connection that is
//! passed through is itself cut after a random number of bytes with the reset probability: that
//! is what forces fresh connections, and fresh fates, all through a long backup.
//!
//! Besides the random fates, a test can script exact ones ([`FaultProxy::freeze_next`],
//! [`FaultProxy::freeze_mid_body`]) and slow every connection down to a given rate
//! ([`FaultProxy::throttle`]), for what a stall detector must and must not drop.
//!
//! Bounded: it listens on 127.0.0.1 only, a frozen connection is held at most
//! [`FaultPlan::freeze_for`] (or the hold a script gives) and every thread ends when the proxy is
//! dropped.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Per-connection fault probabilities, in percent, and their bounds.
#[derive(Debug, Clone, Copy)]
pub struct FaultPlan {
    /// Answer the first request with `503 SlowDown` and close.
    pub slow_down: u32,
    /// Pass through, then reset after a random number of bytes (either direction).
    pub reset: u32,
    /// Read what the client sends and never answer.
    pub freeze: u32,
    /// How long a frozen connection is held before it is closed.
    pub freeze_for: Duration,
    /// Bytes a resetting connection carries at most before it is cut.
    pub reset_within: u64,
    /// Bytes a passed connection carries at most before it is reset too (0: no limit), so the
    /// client's kept-alive connections end and new ones meet new fates. Keep it well above the
    /// part size, or a part could never get through.
    pub recycle_within: u64,
    /// Seed of the fate generator.
    pub seed: u64,
}

impl FaultPlan {
    /// No faults: a plain proxy.
    pub fn clean() -> Self {
        Self {
            slow_down: 0,
            reset: 0,
            freeze: 0,
            freeze_for: Duration::from_secs(0),
            reset_within: 0,
            recycle_within: 0,
            seed: 1,
        }
    }
}

/// How many connections met each fate so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Connections passed through untouched (so far).
    pub passed: u64,
    /// Connections answered 503 SlowDown.
    pub slow_down: u64,
    /// Connections reset mid-stream.
    pub reset: u64,
    /// Passed connections reset once they carried their share.
    pub recycled: u64,
    /// Connections frozen.
    pub frozen: u64,
}

#[derive(Debug, Default)]
struct Counters {
    passed: AtomicU64,
    slow_down: AtomicU64,
    reset: AtomicU64,
    recycled: AtomicU64,
    frozen: AtomicU64,
    tripped: AtomicU64,
}

/// Which way a connection's bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (the agent) to the server: request bodies, uploads.
    Up,
    /// From the server to the client: answers, downloads.
    Down,
}

/// A freeze armed for the first connection that carries more than `after` bytes one way.
#[derive(Debug, Clone, Copy)]
struct Trip {
    direction: Direction,
    after: u64,
    hold: Duration,
}

/// Fates a test scripted, met before the plan's.
#[derive(Debug, Default)]
struct Script {
    /// Connections still to be frozen from their first byte, and for how long.
    freeze_next: u32,
    freeze_hold: Duration,
    trip: Option<Trip>,
    /// Bytes a second each way of every passed connection (0: no limit).
    rate: u64,
}

/// The proxy; dropping it stops it and closes every connection it holds.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    plan: Arc<Mutex<FaultPlan>>,
    script: Arc<Mutex<Script>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    /// Bumped by [`FaultProxy::set_plan`]: connections of an older plan are cut, so kept-alive
    /// connections cannot carry requests past a change of plan.
    generation: Arc<AtomicU64>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `upstream` (e.g. Garage's S3 endpoint,
    /// `http://127.0.0.1:PORT`).
    pub fn start(upstream: &str, plan: FaultPlan) -> Self {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream is http://IP:PORT");
        assert!(
            upstream.ip().is_loopback(),
            "the proxy only forwards to loopback"
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fault proxy");
        let addr = listener.local_addr().unwrap();
        let plan = Arc::new(Mutex::new(plan));
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let script = Arc::new(Mutex::new(Script::default()));
        let accept = {
            let shared = Shared {
                counters: counters.clone(),
                stop: stop.clone(),
                generation: generation.clone(),
                script: script.clone(),
            };
            let plan = plan.clone();
            std::thread::spawn(move || accept_loop(listener, upstream, plan, shared))
        };
        Self {
            addr,
            plan,
            script,
            counters,
            stop,
            generation,
            accept: Some(accept),
        }
    }

    /// The endpoint to give the agent instead of the server's (`AWS_ENDPOINT_URL`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An agent's environment `env` with its S3 endpoint replaced by this proxy's.
    pub fn in_front(&self, env: Vec<(String, String)>) -> Vec<(String, String)> {
        env.into_iter()
            .map(|(k, v)| {
                if k == "AWS_ENDPOINT_URL" {
                    (k, self.endpoint())
                } else {
                    (k, v)
                }
            })
            .collect()
    }

    /// Changes the faults of connections accepted from now on (e.g. to check the results
    /// through a clean path).
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock().unwrap() = plan;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The next `n` connections accepted are frozen (what they send is read, nothing is
    /// answered) for `hold`, whatever the plan says.
    pub fn freeze_next(&self, n: u32, hold: Duration) {
        let mut script = self.script.lock().unwrap();
        script.freeze_next = n;
        script.freeze_hold = hold;
    }

    /// The first passed connection that carries more than `after` bytes `direction` stops
    /// there: from then on it neither reads nor sends, both ways, for `hold` (a frozen peer
    /// in the middle of a body, whose buffers fill up); then it is reset. Once only.
    pub fn freeze_mid_body(&self, direction: Direction, after: u64, hold: Duration) {
        self.script.lock().unwrap().trip = Some(Trip {
            direction,
            after,
            hold,
        });
    }

    /// Every connection passed from now on moves at most `bytes_per_second` each way, as over a
    /// slow link (0: no limit); its socket buffers are kept small so that the client feels the
    /// pace instead of filling them.
    pub fn throttle(&self, bytes_per_second: u64) {
        self.script.lock().unwrap().rate = bytes_per_second;
    }

    /// Whether the freeze of [`FaultProxy::freeze_mid_body`] was met.
    pub fn froze_mid_body(&self) -> bool {
        self.counters.tripped.load(Ordering::SeqCst) > 0
    }

    /// Fates so far.
    pub fn counts(&self) -> FaultCounts {
        FaultCounts {
            passed: self.counters.passed.load(Ordering::SeqCst),
            slow_down: self.counters.slow_down.load(Ordering::SeqCst),
            reset: self.counters.reset.load(Ordering::SeqCst),
            recycled: self.counters.recycled.load(Ordering::SeqCst),
            frozen: self.counters.frozen.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// xorshift64*: small, seeded, good enough to spread fates.
struct Fates(u64);

impl Fates {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn percent(&mut self) -> u32 {
        (self.next() % 100) as u32
    }
}

enum Fate {
    Pass(Option<u64>),
    SlowDown,
    Reset(u64),
    Freeze(Duration),
}

/// What every connection's thread shares with the proxy.
#[derive(Clone)]
struct Shared {
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    script: Arc<Mutex<Script>>,
}

impl Shared {
    /// The proxy stopped, or its plan changed since `born`.
    fn over(&self, born: u64) -> bool {
        self.stop.load(Ordering::SeqCst) || self.generation.load(Ordering::SeqCst) != born
    }
}

fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    plan: Arc<Mutex<FaultPlan>>,
    shared: Shared,
) {
    let mut fates = Fates(plan.lock().unwrap().seed | 1);
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(client) = conn else { continue };
        let p = *plan.lock().unwrap();
        let born = shared.generation.load(Ordering::SeqCst);
        let roll = fates.percent();
        let scripted = {
            let mut script = shared.script.lock().unwrap();
            (script.freeze_next > 0).then(|| {
                script.freeze_next -= 1;
                script.freeze_hold
            })
        };
        let fate = if let Some(hold) = scripted {
            Fate::Freeze(hold)
        } else if roll < p.slow_down {
            Fate::SlowDown
        } else if roll < p.slow_down + p.freeze {
            Fate::Freeze(p.freeze_for)
        } else if roll < p.slow_down + p.freeze + p.reset {
            Fate::Reset(1 + fates.next() % p.reset_within.max(1))
        } else if p.recycle_within > 0 {
            Fate::Pass(Some(1 + fates.next() % p.recycle_within))
        } else {
            Fate::Pass(None)
        };
        let shared = shared.clone();
        workers.retain(|w| !w.is_finished());
        workers.push(std::thread::spawn(move || {
            handle(client, upstream, fate, &shared, born)
        }));
    }
    for w in workers {
        let _ = w.join();
    }
}

fn handle(client: TcpStream, upstream: SocketAddr, fate: Fate, shared: &Shared, born: u64) {
    let counters = &shared.counters;
    match fate {
        Fate::SlowDown => {
            counters.slow_down.fetch_add(1, Ordering::SeqCst);
            slow_down(client);
        }
        Fate::Freeze(for_) => {
            counters.frozen.fetch_add(1, Ordering::SeqCst);
            freeze(client, for_, shared, born);
        }
        Fate::Pass(recycle) => {
            counters.passed.fetch_add(1, Ordering::SeqCst);
            if pipe(client, upstream, recycle, shared, born) {
                counters.recycled.fetch_add(1, Ordering::SeqCst);
            }
        }
        Fate::Reset(after) => {
            if pipe(client, upstream, Some(after), shared, born) {
                counters.reset.fetch_add(1, Ordering::SeqCst);
            } else {
                // The connection ended before its budget: it was passed through after all.
                counters.passed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Reads the request (head and `Content-Length` body, bounded) and answers as S3 does when it
/// throttles.
fn slow_down(mut client: TcpStream) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return;
        }
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut left = length.saturating_sub((buf.len() - head_end) as u64);
    while left > 0 {
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n as u64),
        }
    }
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
    let answer = format!(
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(answer.as_bytes());
    let _ = client.shutdown(Shutdown::Both);
}

/// Takes what the client sends and answers nothing, until `for_` passes or the proxy stops.
fn freeze(mut client: TcpStream, for_: Duration, shared: &Shared, born: u64) {
    let until = Instant::now() + for_;
    let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 16 * 1024];
    while Instant::now() < until && !shared.over(born) {
        match client.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
    reset(&client);
}

/// Copies both ways; with `cut_after`, resets both sides once that many bytes went through.
/// Returns whether it cut the connection.
fn pipe(
    client: TcpStream,
    upstream: SocketAddr,
    cut_after: Option<u64>,
    shared: &Shared,
    born: u64,
) -> bool {
    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
        reset(&client);
        return false;
    };
    let moved = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    // Set when this connection met the scripted mid-body freeze: until then, how long it holds.
    let held: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let rate = shared.script.lock().unwrap().rate;
    if rate > 0 {
        for s in [&client, &server] {
            let _ = nix::sys::socket::setsockopt(
                &s.as_fd(),
                nix::sys::socket::sockopt::RcvBuf,
                &(64 * 1024),
            );
            let _ = nix::sys::socket::setsockopt(
                &s.as_fd(),
                nix::sys::socket::sockopt::SndBuf,
                &(64 * 1024),
            );
        }
    }
    // A read at most a tenth of a second's worth when throttled, so the pace is even.
    let chunk = if rate > 0 {
        usize::try_from(rate / 10)
            .unwrap_or(usize::MAX)
            .clamp(1, 32 * 1024)
    } else {
        32 * 1024
    };
    let copy = |mut from: TcpStream, mut to: TcpStream, direction: Direction| {
        let (moved, cut, held) = (moved.clone(), cut.clone(), held.clone());
        move || {
            let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 32 * 1024];
            let mut carried = 0u64;
            loop {
                if cut.load(Ordering::SeqCst) {
                    return;
                }
                if shared.over(born) {
                    reset(&from);
                    reset(&to);
                    return;
                }
                let until = *held.lock().unwrap();
                if let Some(until) = until {
                    // Frozen: neither side's bytes move until the hold ends.
                    while Instant::now() < until && !shared.over(born) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    cut.store(true, Ordering::SeqCst);
                    reset(&from);
                    reset(&to);
                    return;
                }
                let n = match from.read(&mut buf[..chunk]) {
                    Ok(0) => {
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        continue;
                    }
                    Err(_) => {
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                };
                carried += n as u64;
                if held.lock().unwrap().is_some() || trips(shared, direction, carried, &held) {
                    // The other way froze it meanwhile, or this piece does: not passed on.
                    continue;
                }
                let total = moved.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                let send = match cut_after {
                    Some(limit) if total >= limit => {
                        (n as u64).saturating_sub(total - limit) as usize
                    }
                    _ => n,
                };
                if to.write_all(&buf[..send]).is_err() {
                    return;
                }
                if rate > 0 {
                    std::thread::sleep(Duration::from_secs_f64(send as f64 / rate as f64));
                }
                if send < n || cut_after.is_some_and(|l| total >= l) {
                    cut.store(true, Ordering::SeqCst);
                    reset(&from);
                    reset(&to);
                    return;
                }
            }
        }
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return false;
    };
    std::thread::scope(|scope| {
        scope.spawn(copy(client, server, Direction::Up));
        scope.spawn(copy(s2, c2, Direction::Down));
    });
    cut.load(Ordering::SeqCst)
}

/// Whether this connection, having carried `carried` bytes `direction`, meets the scripted
/// mid-body freeze (claiming it, so it is met once); if so, `held` says until when.
fn trips(
    shared: &Shared,
    direction: Direction,
    carried: u64,
    held: &Mutex<Option<Instant>>,
) -> bool {
    let mut script = shared.script.lock().unwrap();
    let Some(trip) = script.trip else {
        return false;
    };
    if trip.direction != direction || carried <= trip.after {
        return false;
    }
    script.trip = None;
    *held.lock().unwrap() = Some(Instant::now() + trip.hold);
    shared.counters.tripped.fetch_add(1, Ordering::SeqCst);
    shared.counters.frozen.fetch_add(1, Ordering::SeqCst);
    true
}

/// Makes the socket's close a TCP reset (SO_LINGER 0) rather than an orderly FIN, as a dying
/// load balancer's; the close itself happens when the last handle of it is dropped.
fn reset(stream: &TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        &stream.as_fd(),
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
