//! How the S3 store survives a misbehaving endpoint: every request is retried with capped
//! exponential backoff and jitter, an attempt that moves no byte for the stall time is abandoned
//! rather than waited on (a frozen connection costs seconds, while a slow one that still moves
//! is left alone), every attempt has a deadline, and the whole operation has a deadline so a
//! store that never recovers fails the backup with an error instead of stalling it. What happened is kept in
//! [`StoreHealth`] for `status` and the metrics.
//!
//! The SDK's own retries are turned off (see `s3/mod.rs`), so this policy is the only one: the
//! number of attempts a user configures is the number made, and every retry is counted and logged.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use rand::Rng as _;

use super::StoreError;
use crate::error::Remedy;

/// Retries and deadlines of store requests (`--store-retries`, `--store-attempt-timeout`,
/// `--store-stall-timeout`, `--store-operation-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included (at least 1).
    pub attempts: u32,
    /// Backoff before the second attempt; it doubles each time, up to `max_delay`.
    pub base_delay: Duration,
    /// Longest wait between two attempts.
    pub max_delay: Duration,
    /// Longest one attempt may take: past it the connection counts as frozen and is dropped. It
    /// must allow one part (`--part-size`) to travel at the slowest bandwidth that is still
    /// acceptable.
    pub attempt_timeout: Duration,
    /// Longest an attempt or a download may go without a byte moving (taken by the network,
    /// or received): past it the connection counts as frozen and is dropped. Short, because a
    /// frozen connection otherwise costs the whole attempt timeout, and progress-based, because
    /// a slow connection that still moves must never be dropped.
    pub stall_timeout: Duration,
    /// Longest one request may take over all its attempts and waits.
    pub operation_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 8,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(20),
            attempt_timeout: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(15 * 60),
        }
    }
}

/// Most of a request body that can wait in send buffers after the connection took it all:
/// the kernel's (Linux's default `tcp_wmem` maximum, 4 MiB) and the HTTP client's (~400 KiB).
const SEND_BUFFERS: u64 = 4_608 * 1024;
/// The slowest link whose send buffers are allowed to drain before an answer is expected
/// (512 KiB/s, 4 Mbit/s); a slower one needs a longer stall time.
const DRAIN_RATE: u64 = 512 * 1024;

/// When an attempt last moved a byte, shared between the attempt (its request and response
/// bodies record progress, see `s3/progress.rs`) and the watchdog of [`RetryPolicy::run`].
#[derive(Debug, Clone)]
pub struct Progress(Arc<ProgressState>);

#[derive(Debug)]
struct ProgressState {
    origin: Instant,
    /// Milliseconds from `origin` to the last progress.
    last: AtomicU64,
    /// Milliseconds from `origin` to the end of the request body, plus one (0: not ended).
    body_ended: AtomicU64,
    /// Bytes of the request body the connection took.
    body_bytes: AtomicU64,
}

impl Progress {
    /// Progress starting now.
    pub fn new() -> Self {
        Self(Arc::new(ProgressState {
            origin: Instant::now(),
            last: AtomicU64::new(0),
            body_ended: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
        }))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes moved just now.
    pub fn touch(&self) {
        self.0.last.fetch_max(self.now_ms(), Ordering::Relaxed);
    }

    /// The connection took `bytes` more of the request body.
    pub fn body_taken(&self, bytes: u64) {
        self.0.body_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.touch();
    }

    /// The request body was all taken by the connection: what is left of it waits in the
    /// connection's and the kernel's send buffers, where its progress cannot be seen.
    pub fn body_ended(&self) {
        let now = self.now_ms().saturating_add(1);
        let _ = self
            .0
            .body_ended
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        self.touch();
    }

    /// How long the attempt may still go without progress before it counts as stalled, or
    /// `None` once it has.
    ///
    /// Between the end of a request body and the answer, what the send buffers still hold
    /// drains unseen: that wait is also granted the time the buffered tail (at most the body,
    /// at most [`SEND_BUFFERS`]) takes at [`DRAIN_RATE`], so a large part on a slow link is
    /// not dropped while its tail is still on the wire, and a bodiless request that gets no
    /// answer is dropped after the stall time.
    fn left(&self, stall: Duration) -> Option<Duration> {
        let s = &self.0;
        let now = self.now_ms();
        let last = s.last.load(Ordering::Relaxed);
        let ended = s.body_ended.load(Ordering::Relaxed);
        let mut allowed = u64::try_from(stall.as_millis()).unwrap_or(u64::MAX);
        if ended > 0 && last < ended {
            let tail = s.body_bytes.load(Ordering::Relaxed).min(SEND_BUFFERS);
            allowed = allowed.saturating_add(tail * 1000 / DRAIN_RATE);
        }
        let idle = now.saturating_sub(last);
        (idle < allowed).then(|| Duration::from_millis(allowed - idle))
    }

    /// Resolves once the attempt has gone `stall` without progress (see [`Progress::left`]).
    async fn stalled(&self, stall: Duration) {
        while let Some(left) = self.left(stall) {
            tokio::time::sleep(left).await;
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryPolicy {
    /// The wait before attempt `next` (2 for the first retry): "equal jitter", half the capped
    /// exponential delay plus a random share of the other half, so many agents throttled at
    /// once spread out, and none retries at once.
    pub fn delay(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(20);
        let cap = self
            .base_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay);
        let half = cap / 2;
        let extra = rand::rng().random_range(0..=half.as_millis().min(u128::from(u64::MAX)) as u64);
        half + Duration::from_millis(extra)
    }

    /// Runs `attempt` until it succeeds, fails with an error that retrying cannot fix, or the
    /// attempts or the operation deadline run out. `op` names the S3 request for logs and errors.
    /// Each attempt is given a fresh [`Progress`] to record its bytes in; one that records none
    /// for the stall time is dropped and retried like one that ran out of time.
    pub async fn run<T, F, Fut>(
        &self,
        health: &StoreHealth,
        op: &'static str,
        key: &str,
        mut attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Progress) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let started = Instant::now();
        let deadline = started + self.operation_timeout;
        let attempts = self.attempts.max(1);
        let mut n = 1;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let progress = Progress::new();
            let limit = self.attempt_timeout.min(left);
            let outcome = tokio::select! {
                out = tokio::time::timeout(limit, attempt(progress.clone())) => out.map_err(|_| {
                    format!("{op} had no answer within {}s", limit.as_secs_f32())
                }),
                () = progress.stalled(self.stall_timeout) => Err(format!(
                    "{op} moved no byte for {}s (stalled)",
                    self.stall_timeout.as_secs_f32()
                )),
            };
            let err = match outcome {
                Ok(Ok(value)) => {
                    health.succeeded();
                    return Ok(value);
                }
                Ok(Err(e)) if !e.is_retryable() => {
                    if e.is_store_failure() {
                        health.gave_up(op, &e);
                    }
                    return Err(e);
                }
                Ok(Err(e)) => e,
                Err(what) => {
                    health.timed_out();
                    StoreError::Request {
                        key: key.to_string(),
                        message: format!("{what}; the connection was dropped"),
                        retryable: true,
                        remedy: None,
                        source: None,
                    }
                }
            };
            let wait = self.delay(n + 1);
            let out_of_time = Instant::now() + wait >= deadline;
            if n >= attempts || out_of_time {
                let err = exhausted(err, op, n, started.elapsed());
                health.gave_up(op, &err);
                tracing::error!(op, key, attempts = n, error = %crate::error::render(&err), "store request failed");
                return Err(err);
            }
            health.retried(op, &err);
            tracing::warn!(op, key, attempt = n, retry_in = ?wait, error = %crate::error::render(&err), "store request failed; retrying");
            tokio::time::sleep(wait).await;
            n += 1;
        }
    }
}

/// The last error of a request that ran out of attempts or time, saying so; its cause stays
/// its cause, and its remedy becomes allowing more (after reaching the endpoint, if that failed).
fn exhausted(err: StoreError, op: &str, attempts: u32, took: Duration) -> StoreError {
    match err {
        StoreError::Request {
            key,
            message,
            remedy,
            source,
            ..
        } => StoreError::Request {
            key,
            message: format!(
                "{message} (gave up on {op} after {attempts} attempt(s) in {:.0}s: the store is failing or unreachable)",
                took.as_secs_f64()
            ),
            retryable: true,
            remedy: Some(if remedy == Some(Remedy::StoreEndpoint) {
                Remedy::StoreEndpointRetries
            } else {
                Remedy::StoreRetries
            }),
            source,
        },
        other => other,
    }
}

/// How long retries and frozen connections keep the store reported as slow.
const SLOW_WINDOW: Duration = Duration::from_secs(300);
/// Retry times remembered for [`SLOW_WINDOW`] (older ones are dropped first).
const MAX_RECENT: usize = 1024;
/// Longest problem message kept (it can quote what the server said).
const MAX_MESSAGE: usize = 512;

/// What the store's requests have met since the agent started, shared by every clone.
#[derive(Debug, Clone, Default)]
pub struct StoreHealth(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    retries: u64,
    timeouts: u64,
    failures: u64,
    resumed: u64,
    recent: VecDeque<Instant>,
    last_problem: Option<(SystemTime, String)>,
    failing: bool,
}

/// The store's condition as `status` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// No retry in the last five minutes.
    Ok,
    /// Requests needed retries, or connections froze, in the last five minutes, but they
    /// succeeded in the end.
    Slow,
    /// The last request that ended gave up (and none has succeeded since).
    Failing,
}

impl Condition {
    /// The word `status` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Ok => "ok",
            Condition::Slow => "slow",
            Condition::Failing => "failing",
        }
    }
}

/// A snapshot of [`StoreHealth`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// Ok, slow or failing.
    pub condition: Condition,
    /// Attempts that failed and were retried, since start.
    pub retries: u64,
    /// Attempts abandoned because the endpoint did not answer in time, since start.
    pub timeouts: u64,
    /// Requests that failed after every attempt, since start.
    pub failures: u64,
    /// Downloads resumed with a ranged GET after their connection broke, since start.
    pub resumed: u64,
    /// The most recent failure and when it happened.
    pub last_problem: Option<(SystemTime, String)>,
}

impl StoreHealth {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn note(s: &mut State, op: &str, err: &StoreError) {
        let message =
            crate::error::shorten(format!("{op}: {}", crate::error::render(err)), MAX_MESSAGE);
        s.last_problem = Some((SystemTime::now(), message));
    }

    fn mark_recent(s: &mut State) {
        if s.recent.len() >= MAX_RECENT {
            s.recent.pop_front();
        }
        s.recent.push_back(Instant::now());
    }

    pub(crate) fn succeeded(&self) {
        self.with(|s| s.failing = false);
    }

    pub(crate) fn retried(&self, op: &str, err: &StoreError) {
        self.with(|s| {
            s.retries += 1;
            Self::mark_recent(s);
            Self::note(s, op, err);
        });
    }

    pub(crate) fn timed_out(&self) {
        self.with(|s| {
            s.timeouts += 1;
            Self::mark_recent(s);
        });
    }

    pub(crate) fn resumed(&self) {
        self.with(|s| {
            s.resumed += 1;
            Self::mark_recent(s);
        });
    }

    pub(crate) fn gave_up(&self, op: &str, err: &StoreError) {
        self.with(|s| {
            s.failures += 1;
            s.failing = true;
            Self::note(s, op, err);
        });
    }

    /// What the store's requests met, as of now.
    pub fn report(&self) -> HealthReport {
        self.with(|s| {
            while s.recent.front().is_some_and(|t| t.elapsed() > SLOW_WINDOW) {
                s.recent.pop_front();
            }
            let condition = if s.failing {
                Condition::Failing
            } else if !s.recent.is_empty() {
                Condition::Slow
            } else {
                Condition::Ok
            };
            HealthReport {
                condition,
                retries: s.retries,
                timeouts: s.timeouts,
                failures: s.failures,
                resumed: s.resumed,
                last_problem: s.last_problem.clone(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn quick() -> RetryPolicy {
        RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            attempt_timeout: Duration::from_millis(200),
            stall_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(10),
        }
    }

    fn flaky(key: &str) -> StoreError {
        StoreError::Request {
            key: key.into(),
            message: "SlowDown".into(),
            retryable: true,
            remedy: None,
            source: None,
        }
    }

    #[test]
    fn delays_grow_are_capped_and_never_zero() {
        let p = RetryPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        for _ in 0..100 {
            let d2 = p.delay(2);
            assert!(d2 >= Duration::from_millis(50) && d2 <= Duration::from_millis(100));
            let d4 = p.delay(4);
            assert!(d4 >= Duration::from_millis(200) && d4 <= Duration::from_millis(400));
            let d30 = p.delay(u32::MAX);
            assert!(d30 >= Duration::from_millis(500) && d30 <= Duration::from_secs(1));
        }
    }

    #[tokio::test]
    async fn a_retryable_failure_is_retried_until_it_succeeds_and_counted() {
        let health = StoreHealth::default();
        let calls = AtomicU32::new(0);
        let out = quick()
            .run(&health, "PutObject", "k", |_| async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err(flaky("k")),
                    _ => Ok(7),
                }
            })
            .await
            .unwrap();
        assert_eq!(out, 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let r = health.report();
        assert_eq!(
            (r.retries, r.failures, r.condition),
            (2, 0, Condition::Slow)
        );
        assert!(r.last_problem.unwrap().1.contains("SlowDown"));
    }

    #[tokio::test]
    async fn attempts_run_out_with_an_error_saying_so_and_the_store_is_failing() {
        let health = StoreHealth::default();
        let calls = AtomicU32::new(0);
        let err = quick()
            .run(&health, "UploadPart", "k", |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(flaky("k"))
            })
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        let text = err.to_string();
        assert!(
            text.contains("gave up on UploadPart after 4 attempt(s)"),
            "{text}"
        );
        // The store names no flag; the edge that knows the configuration does.
        assert!(!text.contains("--store-retries"), "{text}");
        assert_eq!(err.remedy(), Some(Remedy::StoreRetries));
        let rendered = crate::error::render(&err);
        assert!(rendered.contains("gave up on UploadPart"), "{rendered}");
        assert!(rendered.contains("--store-retries"), "{rendered}");
        assert_eq!(health.report().condition, Condition::Failing);
        // One success clears "failing"; the retries keep it "slow" for a while.
        quick()
            .run(&health, "HeadObject", "k", |_| async { Ok(()) })
            .await
            .unwrap();
        assert_eq!(health.report().condition, Condition::Slow);
    }

    #[tokio::test]
    async fn an_error_retrying_cannot_fix_is_returned_at_once() {
        let health = StoreHealth::default();
        let calls = AtomicU32::new(0);
        let err = quick()
            .run(&health, "GetObject", "k", |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(StoreError::NotFound { key: "k".into() })
            })
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(health.report().condition, Condition::Ok);
    }

    #[tokio::test]
    async fn a_frozen_attempt_is_abandoned_and_retried() {
        let health = StoreHealth::default();
        let calls = AtomicU32::new(0);
        let out = quick()
            .run(&health, "UploadPart", "k", |_| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        std::future::pending::<()>().await;
                    }
                    Ok(n)
                }
            })
            .await
            .unwrap();
        assert_eq!(out, 1);
        let r = health.report();
        assert_eq!((r.timeouts, r.retries), (1, 1));
        assert!(r.last_problem.unwrap().1.contains("no answer within"));
    }

    #[tokio::test]
    async fn the_operation_deadline_bounds_every_attempt_together() {
        let health = StoreHealth::default();
        let policy = RetryPolicy {
            attempts: 1000,
            attempt_timeout: Duration::from_millis(300),
            operation_timeout: Duration::from_millis(700),
            ..quick()
        };
        let started = Instant::now();
        let err = policy
            .run(&health, "CompleteMultipartUpload", "k", |_| {
                std::future::pending::<Result<(), StoreError>>()
            })
            .await
            .unwrap_err();
        // Two whole attempts and a third cut short by the deadline; never the 1000 allowed.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(700), "took {took:?}");
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert!(err.to_string().contains("gave up"), "{err}");
        assert_eq!(health.report().timeouts, 3);
    }

    #[tokio::test]
    async fn an_attempt_that_moves_nothing_is_dropped_after_the_stall_time_not_the_attempt_time() {
        let health = StoreHealth::default();
        let policy = RetryPolicy {
            attempt_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_millis(300),
            ..quick()
        };
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let out = policy
            .run(&health, "UploadPart", "k", |progress| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        // A few bytes, then nothing: a connection frozen mid-body.
                        progress.body_taken(64 * 1024);
                        std::future::pending::<()>().await;
                    }
                    Ok(n)
                }
            })
            .await
            .unwrap();
        assert_eq!(out, 1);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let r = health.report();
        assert_eq!((r.timeouts, r.retries), (1, 1));
        assert!(r.last_problem.unwrap().1.contains("moved no byte"));
    }

    #[tokio::test]
    async fn an_attempt_that_keeps_moving_is_never_dropped_for_stalling() {
        let health = StoreHealth::default();
        let policy = RetryPolicy {
            attempts: 1,
            attempt_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_millis(300),
            ..quick()
        };
        let started = Instant::now();
        let out = policy
            .run(&health, "UploadPart", "k", |progress| async move {
                // Four times the stall time in all, a piece every 100 ms.
                for _ in 0..12 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    progress.body_taken(1024);
                }
                Ok(7)
            })
            .await
            .unwrap();
        assert_eq!(out, 7);
        assert!(started.elapsed() >= Duration::from_millis(1200));
        assert_eq!(health.report().timeouts, 0);
    }

    #[tokio::test]
    async fn the_wait_for_an_answer_allows_a_large_body_to_drain_but_not_a_bodiless_request() {
        let policy = RetryPolicy {
            attempts: 1,
            attempt_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_millis(300),
            ..quick()
        };
        // 1 MiB handed to the send buffers at once; it drains unseen (~2 s at the drain rate
        // allowed) for longer than the stall time before the answer comes.
        let health = StoreHealth::default();
        let out = policy
            .run(&health, "UploadPart", "k", |progress| async move {
                progress.body_taken(1 << 20);
                progress.body_ended();
                tokio::time::sleep(Duration::from_millis(900)).await;
                Ok(7)
            })
            .await
            .unwrap();
        assert_eq!(out, 7);
        assert_eq!(health.report().timeouts, 0);
        // No body: the same silence is a stall.
        let health = StoreHealth::default();
        let started = Instant::now();
        let err = policy
            .run(&health, "HeadObject", "k", |_| async move {
                tokio::time::sleep(Duration::from_millis(900)).await;
                Ok(7)
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("moved no byte"), "{err}");
        assert!(started.elapsed() < Duration::from_millis(800));
    }
}
