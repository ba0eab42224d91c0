//! The load engine: closed loop (N connections, each sends its next request when the previous answer is in)
//! and open loop (requests scheduled at a fixed rate; latency counted from the *intended* send time, so a
//! server that falls behind shows its queueing instead of silently slowing the generator down — the
//! "coordinated omission" of closed-loop tools).
//!
//! The engine knows nothing of HTTP versions, TLS or protocols: a [`Connector`] makes connections, a
//! [`Workload`] makes requests and judges answers. Time comes from `tokio::time`, so tests drive the real
//! engine on a paused clock.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::hist::Latency;

pub type Body = Full<Bytes>;

/// One connection: sends a request, returns the status and the whole body.
pub trait Conn: Send + 'static {
    fn send(&mut self, req: http::Request<Body>) -> impl Future<Output = anyhow::Result<(u16, Bytes)>> + Send;
}

/// Makes connections to the system under test.
pub trait Connector: Send + Sync + 'static {
    type Conn: Conn;
    fn connect(&self) -> impl Future<Output = anyhow::Result<Self::Conn>> + Send;
}

/// Makes requests and judges responses.
pub trait Workload: Send + Sync + 'static {
    /// Per-connection state (a signer with its own key cache, say), so the hot path takes no lock.
    type State: Send + 'static;
    fn state(&self) -> Self::State;
    /// Request number `seq` (unique across the run).
    fn request(&self, seq: u64, state: &mut Self::State) -> anyhow::Result<http::Request<Body>>;
    /// `Ok` for a good answer, else the label it is counted under (`401 AuthenticationFailedException`...).
    /// With `verify`, the body is checked in depth (field sizes, integrity values), not just the status.
    fn check(&self, seq: u64, status: u16, body: &[u8], verify: bool) -> Result<(), String>;
}

/// Which answers are checked in depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    /// Warm-up answers in depth, measured ones by status: keeps the generator's CPU share small on a machine
    /// it shares with the server.
    Warmup,
    /// Every answer in depth.
    All,
    /// Status only.
    Never,
}

/// How to drive the load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub connections: usize,
    /// `None`: closed loop. `Some(r)`: open loop at `r` requests per second.
    pub rate: Option<f64>,
    pub warmup: Duration,
    pub duration: Duration,
    pub verify: Verify,
    /// Closed loop only: stop after this many requests (warm-up included) instead of after `duration`; the
    /// window is then the measured time. A fixed amount of work, for counting the server's work per request.
    pub requests: Option<u64>,
}

/// What one run measured. Counts and latencies cover the measurement window only.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Successful requests' latency: from the send (closed loop) or from the intended send time (open loop).
    pub latency: Latency,
    /// Successful requests' service time, from the actual send: equal to `latency` in a closed loop.
    pub service: Latency,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub warmup_ok: u64,
    pub warmup_errors: BTreeMap<String, u64>,
    /// Open loop: requests of the window the generator never got to send (all connections were busy until
    /// the end). They are a symptom of overload, like the latency.
    pub unsent: u64,
    pub window: Duration,
}

impl LoadResult {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Successful requests per second of the window.
    pub fn ok_per_sec(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 { self.ok as f64 / secs } else { 0.0 }
    }
}

/// When ticket `k` of an open loop at `rate` per second is due, counted from the start. Computed from `k`
/// directly (not by adding intervals), so rounding never accumulates into drift.
pub fn ticket_offset(k: u64, rate: f64) -> Duration {
    Duration::from_nanos((k as f64 * 1e9 / rate) as u64)
}

/// How many tickets are due strictly before `t`.
pub fn tickets_before(t: Duration, rate: f64) -> u64 {
    let mut n = (t.as_secs_f64() * rate).ceil().max(0.0) as u64;
    while n > 0 && ticket_offset(n - 1, rate) >= t {
        n -= 1;
    }
    while ticket_offset(n, rate) < t {
        n += 1;
    }
    n
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    start: Instant,
    measure_start: Instant,
    end: Instant,
    rate: Option<f64>,
    verify: Verify,
    limit: Option<u64>,
}

struct Shared {
    next: AtomicU64,
}

struct WorkerOut {
    latency: Latency,
    service: Latency,
    ok: u64,
    errors: BTreeMap<String, u64>,
    warmup_ok: u64,
    warmup_errors: BTreeMap<String, u64>,
    sent_in_window: u64,
}

impl WorkerOut {
    fn new() -> anyhow::Result<Self> {
        Ok(WorkerOut {
            latency: Latency::new()?,
            service: Latency::new()?,
            ok: 0,
            errors: BTreeMap::new(),
            warmup_ok: 0,
            warmup_errors: BTreeMap::new(),
            sent_in_window: 0,
        })
    }

    fn error(&mut self, warm: bool, label: String) {
        let map = if warm { &mut self.warmup_errors } else { &mut self.errors };
        *map.entry(label).or_insert(0) += 1;
    }
}

/// Runs one load. Connections are opened before the clock starts, so handshakes land in neither phase; a
/// connection that breaks is re-opened (its failure counted).
pub async fn run<C: Connector, W: Workload>(
    connector: Arc<C>,
    workload: Arc<W>,
    spec: &LoadSpec,
) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(spec.connections > 0, "at least one connection is needed");
    if let Some(r) = spec.rate {
        anyhow::ensure!(r.is_finite() && r > 0.0, "the request rate must be positive");
        anyhow::ensure!(spec.requests.is_none(), "a fixed request count needs the closed loop");
    }
    let mut conns = Vec::with_capacity(spec.connections);
    let opening: Vec<_> = (0..spec.connections)
        .map(|_| {
            let c = connector.clone();
            tokio::spawn(async move { c.connect().await })
        })
        .collect();
    for o in opening {
        conns.push(o.await.map_err(|e| anyhow::anyhow!("connection task failed: {e}"))??);
    }

    let start = Instant::now();
    // With a fixed count the clock does not end the run (a year is "never" here).
    let duration = if spec.requests.is_some() { Duration::from_secs(365 * 86_400) } else { spec.duration };
    let plan = Plan {
        start,
        measure_start: start + spec.warmup,
        end: start + spec.warmup + duration,
        rate: spec.rate,
        verify: spec.verify,
        limit: spec.requests,
    };
    let shared = Arc::new(Shared { next: AtomicU64::new(0) });
    let mut tasks = Vec::with_capacity(spec.connections);
    for conn in conns {
        let (c, w, s) = (connector.clone(), workload.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            match plan.rate {
                None => closed_worker(c, w, s, plan, conn).await,
                Some(rate) => open_worker(c, w, s, plan, conn, rate).await,
            }
        }));
    }
    let mut total = WorkerOut::new()?;
    for t in tasks {
        let out = t.await.map_err(|e| anyhow::anyhow!("load task failed: {e}"))??;
        total.latency.add(&out.latency);
        total.service.add(&out.service);
        total.ok += out.ok;
        total.warmup_ok += out.warmup_ok;
        total.sent_in_window += out.sent_in_window;
        for (k, v) in out.errors {
            *total.errors.entry(k).or_insert(0) += v;
        }
        for (k, v) in out.warmup_errors {
            *total.warmup_errors.entry(k).or_insert(0) += v;
        }
    }
    let unsent = match spec.rate {
        Some(rate) => {
            let due = tickets_before(spec.warmup + spec.duration, rate) - tickets_before(spec.warmup, rate);
            due.saturating_sub(total.sent_in_window)
        }
        None => 0,
    };
    Ok(LoadResult {
        latency: total.latency,
        service: total.service,
        ok: total.ok,
        errors: total.errors,
        warmup_ok: total.warmup_ok,
        warmup_errors: total.warmup_errors,
        unsent,
        window: if spec.requests.is_some() {
            Instant::now().saturating_duration_since(plan.measure_start)
        } else {
            spec.duration
        },
    })
}

async fn reconnect<C: Connector>(connector: &C, conn: &mut Option<C::Conn>, out: &mut WorkerOut, warm: bool) {
    if conn.is_some() {
        return;
    }
    match connector.connect().await {
        Ok(c) => *conn = Some(c),
        Err(_) => {
            out.error(warm, "transport: connect failed".to_owned());
            // Do not spin on a refusing server.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn wants_verify(v: Verify, warm: bool) -> bool {
    match v {
        Verify::All => true,
        Verify::Warmup => warm,
        Verify::Never => false,
    }
}

async fn closed_worker<C: Connector, W: Workload>(
    connector: Arc<C>,
    workload: Arc<W>,
    shared: Arc<Shared>,
    plan: Plan,
    first: C::Conn,
) -> anyhow::Result<WorkerOut> {
    let mut out = WorkerOut::new()?;
    let mut state = workload.state();
    let mut conn = Some(first);
    loop {
        let now = Instant::now();
        if now >= plan.end {
            break;
        }
        reconnect(connector.as_ref(), &mut conn, &mut out, now < plan.measure_start).await;
        let Some(c) = conn.as_mut() else { continue };
        let seq = shared.next.fetch_add(1, Ordering::Relaxed);
        if plan.limit.is_some_and(|l| seq >= l) {
            break;
        }
        let req = workload.request(seq, &mut state)?;
        let t0 = Instant::now();
        let res = c.send(req).await;
        let t1 = Instant::now();
        // A request belongs to the phase in which it completes: ok/s is then exact for the window.
        if t1 >= plan.end {
            break;
        }
        let warm = t1 < plan.measure_start;
        match res {
            Ok((status, body)) => match workload.check(seq, status, &body, wants_verify(plan.verify, warm)) {
                Ok(()) if warm => out.warmup_ok += 1,
                Ok(()) => {
                    out.ok += 1;
                    out.latency.record(t1 - t0);
                    out.service.record(t1 - t0);
                }
                Err(label) => out.error(warm, label),
            },
            Err(_) => {
                conn = None;
                out.error(warm, "transport: request failed".to_owned());
            }
        }
    }
    Ok(out)
}

async fn open_worker<C: Connector, W: Workload>(
    connector: Arc<C>,
    workload: Arc<W>,
    shared: Arc<Shared>,
    plan: Plan,
    first: C::Conn,
    rate: f64,
) -> anyhow::Result<WorkerOut> {
    let mut out = WorkerOut::new()?;
    let mut state = workload.state();
    let mut conn = Some(first);
    loop {
        let k = shared.next.fetch_add(1, Ordering::Relaxed);
        let intended = plan.start + ticket_offset(k, rate);
        if intended >= plan.end {
            break;
        }
        // A connection that reaches its ticket late was busy: the delay is queueing and counts. One that is early
        // waits for a timer of 1 ms granularity, whose lateness is the generator's, not the server's: count
        // from the actual send then.
        let behind = Instant::now() > intended;
        if !behind {
            tokio::time::sleep_until(intended).await;
        }
        // Behind schedule at the end: what is left of the window is counted as unsent, not sent late.
        if Instant::now() >= plan.end {
            break;
        }
        let warm = intended < plan.measure_start;
        if !warm {
            out.sent_in_window += 1;
        }
        reconnect(connector.as_ref(), &mut conn, &mut out, warm).await;
        let Some(c) = conn.as_mut() else { continue };
        let req = workload.request(k, &mut state)?;
        let t_send = Instant::now();
        let res = c.send(req).await;
        let done = Instant::now();
        match res {
            Ok((status, body)) => match workload.check(k, status, &body, wants_verify(plan.verify, warm)) {
                Ok(()) if warm => out.warmup_ok += 1,
                Ok(()) => {
                    out.ok += 1;
                    out.latency.record(done - if behind { intended } else { t_send });
                    out.service.record(done - t_send);
                }
                Err(label) => out.error(warm, label),
            },
            Err(_) => {
                conn = None;
                out.error(warm, "transport: request failed".to_owned());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A server that takes a fixed time per request on each connection, and answers 500 to every `fail_every`-th.
    struct Fake {
        service: Duration,
        fail_every: u64,
    }
    struct FakeConn {
        service: Duration,
    }
    impl Conn for FakeConn {
        async fn send(&mut self, req: http::Request<Body>) -> anyhow::Result<(u16, Bytes)> {
            tokio::time::sleep(self.service).await;
            let seq: u64 = req.uri().path().trim_start_matches('/').parse()?;
            Ok((200, Bytes::from(seq.to_string())))
        }
    }
    impl Connector for Fake {
        type Conn = FakeConn;
        async fn connect(&self) -> anyhow::Result<FakeConn> {
            Ok(FakeConn { service: self.service })
        }
    }
    impl Workload for Fake {
        type State = ();
        fn state(&self) {}
        fn request(&self, seq: u64, _: &mut ()) -> anyhow::Result<http::Request<Body>> {
            Ok(http::Request::builder().uri(format!("/{seq}")).body(Body::default())?)
        }
        fn check(&self, _seq: u64, _status: u16, body: &[u8], _verify: bool) -> Result<(), String> {
            let seq: u64 = std::str::from_utf8(body).unwrap().parse().unwrap();
            if self.fail_every > 0 && seq % self.fail_every == self.fail_every - 1 {
                Err("500 InternalException".to_owned())
            } else {
                Ok(())
            }
        }
    }

    fn spec(connections: usize, rate: Option<f64>, warmup_ms: u64, duration_ms: u64) -> LoadSpec {
        LoadSpec {
            connections,
            rate,
            warmup: Duration::from_millis(warmup_ms),
            duration: Duration::from_millis(duration_ms),
            verify: Verify::Warmup,
            requests: None,
        }
    }

    fn close(actual_us: u64, expected_us: u64) -> bool {
        (actual_us as f64 - expected_us as f64).abs() <= expected_us as f64 * 0.002
    }

    #[test]
    fn schedule_is_exact_and_does_not_drift() {
        assert_eq!(ticket_offset(0, 3.0), Duration::ZERO);
        assert_eq!(ticket_offset(1, 4.0), Duration::from_millis(250));
        // Adding a rounded 333,333,333 ns interval 3,000 times would lose 1 µs; computing from k does not.
        assert_eq!(ticket_offset(3_000, 3.0), Duration::from_secs(1_000));
        assert_eq!(ticket_offset(1_000_000, 1_800.0).as_millis(), 555_555);
        assert_eq!(tickets_before(Duration::from_secs(1), 4.0), 4); // 0, 250, 500, 750 ms
        assert_eq!(tickets_before(Duration::from_millis(1_001), 4.0), 5);
        assert_eq!(tickets_before(Duration::ZERO, 4.0), 0);
        assert_eq!(tickets_before(Duration::from_secs(10), 1_800.0), 18_000);
    }

    // On a paused clock the engine's arithmetic is exact: these are logic tests, not timing tests.
    #[tokio::test(start_paused = true)]
    async fn closed_loop_counts_only_the_window() {
        let fake = Arc::new(Fake { service: Duration::from_millis(10), fail_every: 0 });
        let r = run(fake.clone(), fake, &spec(2, None, 100, 1_000)).await.unwrap();
        // Each of 2 connections completes one request per 10 ms: 100 per second each in the window.
        assert_eq!(r.ok, 200);
        assert_eq!(r.warmup_ok, 18); // completions at 10..90 ms on each connection
        assert!(r.errors.is_empty());
        assert!((r.ok_per_sec() - 200.0).abs() < 1e-9);
        assert!(close(r.latency.summary().p99_us, 10_000));
        assert_eq!(r.unsent, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_count_sends_exactly_that_many() {
        let fake = Arc::new(Fake { service: Duration::from_millis(10), fail_every: 0 });
        let r = run(fake.clone(), fake, &LoadSpec { requests: Some(1_001), ..spec(4, None, 0, 1) }).await.unwrap();
        assert_eq!(r.ok, 1_001, "the duration does not end a counted run");
        assert_eq!(r.warmup_ok, 0);
        // 4 connections, 10 ms each: 251 rounds, the last with one request.
        assert_eq!(r.window, Duration::from_millis(2_510));
        let open = LoadSpec { requests: Some(10), ..spec(1, Some(100.0), 0, 1) };
        let fake = Arc::new(Fake { service: Duration::from_millis(10), fail_every: 0 });
        assert!(run(fake.clone(), fake, &open).await.is_err(), "the open loop has no fixed count");
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_counted_by_label_and_kept_out_of_latency() {
        let fake = Arc::new(Fake { service: Duration::from_millis(10), fail_every: 4 });
        let r = run(fake.clone(), fake, &spec(1, None, 0, 1_000)).await.unwrap();
        assert_eq!(r.ok + r.error_count(), 99, "the 100th completes exactly at the end");
        assert_eq!(r.errors.get("500 InternalException"), Some(&24));
        assert_eq!(r.latency.count(), r.ok);
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_measures_from_the_intended_time() {
        // 100 requests/s into one connection that needs 20 ms each: the server can do only half. A closed
        // loop would report 20 ms for everything; the open loop must show the queue growing.
        let fake = Arc::new(Fake { service: Duration::from_millis(20), fail_every: 0 });
        let r = run(fake.clone(), fake, &spec(1, Some(100.0), 0, 1_000)).await.unwrap();
        // Ticket k is due at 10k ms, sent at 20k ms, done at 20k+20 ms: latency 10k+20 ms, for k = 0..49.
        assert_eq!(r.ok, 50);
        assert_eq!(r.unsent, 50, "tickets 50..99 were never sent");
        let l = r.latency.summary();
        assert!(close(l.max_us, 510_000), "{l:?}");
        assert!(close(r.latency.quantile_us(0.5), 260_000), "{l:?}");
        // The service time alone hides the queue.
        assert!(close(r.service.summary().max_us, 20_000));
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_under_capacity_keeps_the_rate() {
        let fake = Arc::new(Fake { service: Duration::from_millis(5), fail_every: 0 });
        let r = run(fake.clone(), fake, &spec(4, Some(200.0), 500, 2_000)).await.unwrap();
        assert_eq!(r.ok, 400);
        assert_eq!(r.unsent, 0);
        assert_eq!(r.warmup_ok, 100);
        assert!(close(r.latency.summary().max_us, 5_000));
    }
}
