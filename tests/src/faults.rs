//! A fault-injecting TCP proxy in front of a real S3 server (Garage), for what production object
//! stores do to long backups: answer `503 SlowDown`, reset a connection in the middle of a body,
//! or accept a request and never answer.
//!
//! Each new connection draws its fate from a seeded generator, so a failing run can be repeated
//! with the same seed. The SDK keeps connections alive and reuses them, so a connection that is
//! passed through is itself cut after a random number of bytes with the reset probability: that
//! is what forces fresh connections, and fresh fates, all through a long backup.
//!
//! Bounded: it listens on 127.0.0.1 only, a frozen connection is held at most
//! [`FaultPlan::freeze_for`] and every thread ends when the proxy is dropped.

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
}

/// The proxy; dropping it stops it and closes every connection it holds.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    plan: Arc<Mutex<FaultPlan>>,
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
        let accept = {
            let shared = Shared {
                counters: counters.clone(),
                stop: stop.clone(),
                generation: generation.clone(),
            };
            let plan = plan.clone();
            std::thread::spawn(move || accept_loop(listener, upstream, plan, shared))
        };
        Self {
            addr,
            plan,
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

    /// Changes the faults of connections accepted from now on (e.g. to check the results
    /// through a clean path).
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock().unwrap() = plan;
        self.generation.fetch_add(1, Ordering::SeqCst);
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
        let fate = if roll < p.slow_down {
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
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        let (moved, cut) = (moved.clone(), cut.clone());
        move || {
            let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 32 * 1024];
            loop {
                if cut.load(Ordering::SeqCst) {
                    return;
                }
                if shared.over(born) {
                    reset(&from);
                    reset(&to);
                    return;
                }
                let n = match from.read(&mut buf) {
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
        scope.spawn(copy(client, server));
        scope.spawn(copy(s2, c2));
    });
    cut.load(Ordering::SeqCst)
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
