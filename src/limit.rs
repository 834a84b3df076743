//! How many requests may be in flight to one Prefect server at a time, adapted to how
//! it copes (additive increase, multiplicative decrease): when it answers 429/503 or a
//! request takes much longer than usual, every worker calling it slows down together,
//! instead of each request backing off alone while the others keep pressing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The limits of every server this process calls, by base URL.
pub struct Limits {
    max: usize,
    servers: Mutex<HashMap<String, Arc<Limit>>>,
    decreases: Counter,
    /// A spec may name a URL that leads nowhere, or a server that accepts connections
    /// and never answers; each pass to it may then wait for a whole timeout. Passes to a
    /// server that has stopped answering take turns from `failing`; a server not yet
    /// heard from is tried by one pass at a time, at most `probes` servers at once. Each
    /// pool holds a quarter of the per-server request limit (2 of the default 8), far
    /// fewer than the controller's workers, which stay free for servers that answer.
    failing: Arc<Semaphore>,
    probes: Arc<Semaphore>,
}

/// How long a pass waits for the first answer of a server that another pass is trying,
/// and how long a server may give no answer before its passes take turns.
const TURN_WAIT: Duration = Duration::from_secs(5);

/// A pass's turn to call a server in doubt, held until the pass ends.
pub struct Turn {
    _permit: OwnedSemaphorePermit,
    /// The server this pass is the one to try.
    probing: Option<Arc<Limit>>,
}

impl Turn {
    /// A probe turn on `permit`: this pass is the one trying the server, unless another
    /// already is (`h` is the server's health, locked).
    fn on(limit: &Arc<Limit>, h: &mut Health, permit: OwnedSemaphorePermit) -> Turn {
        let mine = h.probing.is_none();
        if mine {
            h.probing = Some(Instant::now());
        }
        Turn {
            _permit: permit,
            probing: mine.then(|| limit.clone()),
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(l) = &self.probing {
            l.health.lock().expect("limit lock").probing = None;
            // The passes waiting on this try learn how it went.
            l.news.notify_waiters();
        }
    }
}

impl Limits {
    /// At most `max` requests in flight per server (`--max-requests-per-server`).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        let quarter = (max / 4).max(1);
        Limits {
            max,
            servers: Mutex::default(),
            decreases: Counter::default(),
            failing: Arc::new(Semaphore::new(quarter)),
            probes: Arc::new(Semaphore::new(quarter)),
        }
    }

    /// Counts every decrease of any server's limit in `decreases`.
    pub fn counting(mut self, decreases: Counter) -> Self {
        self.decreases = decreases;
        self
    }

    /// A pass's turn to call the server of `limit`. A server that answers needs none
    /// (`None`). One whose requests have been timing out for a while gets a turn if one
    /// is free. One not heard from yet (or timing out only since a moment ago) is tried
    /// by one pass; the others wait for how that goes, a few seconds at most (a cold
    /// start asks a new server many things at once). Otherwise the error says why, and
    /// the pass is retried later.
    pub async fn turn(&self, limit: &Arc<Limit>) -> Result<Option<Turn>, String> {
        match limit.doubt() {
            None => Ok(None),
            Some(Doubt::Failing(why)) => match self.failing.clone().try_acquire_owned() {
                Ok(permit) => Ok(Some(Turn {
                    _permit: permit,
                    probing: None,
                })),
                Err(_) => Err(why),
            },
            Some(Doubt::Unproven) => {
                if let Some(turn) = self.probe(limit) {
                    return Ok(Some(turn));
                }
                let said = |limit: &Limit| match limit.doubt() {
                    Some(Doubt::Failing(why)) => why,
                    _ => format!("no answer yet after {} s", TURN_WAIT.as_secs()),
                };
                match limit.wait_until() {
                    // Another pass is trying the server: how that goes decides.
                    Some(until) => {
                        match tokio::time::timeout_at(until.into(), limit.settled()).await {
                            Ok(()) => match limit.doubt() {
                                None => Ok(None),
                                Some(Doubt::Failing(why)) => Err(why),
                                Some(Doubt::Unproven) => Err(limit.last_error()),
                            },
                            Err(_) => Err(said(limit)),
                        }
                    }
                    // Every probe is taken (a restart meets many servers at once): wait
                    // for one to free up.
                    None => {
                        match tokio::time::timeout(TURN_WAIT, self.probes.clone().acquire_owned())
                            .await
                        {
                            Ok(Ok(permit)) => {
                                let mut h = limit.health.lock().expect("limit lock");
                                Ok(Some(Turn::on(limit, &mut h, permit)))
                            }
                            _ => Err(format!(
                                "{}; other servers that do not answer are being tried",
                                said(limit)
                            )),
                        }
                    }
                }
            }
        }
    }

    /// The turn to try `limit`'s server, unless another pass is trying it or every
    /// probe is taken.
    fn probe(&self, limit: &Arc<Limit>) -> Option<Turn> {
        let mut h = limit.health.lock().expect("limit lock");
        if h.probing.is_some() {
            return None;
        }
        let permit = self.probes.clone().try_acquire_owned().ok()?;
        Some(Turn::on(limit, &mut h, permit))
    }

    pub fn for_server(&self, base: &str) -> Arc<Limit> {
        let mut map = self.servers.lock().expect("limits lock");
        map.entry(base.to_string())
            .or_insert_with(|| {
                let mut limit = Limit::new(self.max);
                limit.decreases = self.decreases.clone();
                Arc::new(limit)
            })
            .clone()
    }
}

/// One server's adaptive limit.
pub struct Limit {
    state: Mutex<State>,
    freed: Notify,
    decreases: Counter,
    health: Mutex<Health>,
    /// An answer came, or a try of a server in doubt ended.
    news: Notify,
}

/// Whether the server answers at all (any HTTP answer, whatever its status).
#[derive(Default)]
struct Health {
    answered_once: bool,
    /// Since when requests end without an answer after a timeout (they hold a worker
    /// for the whole timeout), and why the latest did; cleared by an answer. A refused
    /// connection fails at once and holds nobody up, so it does not count here.
    failing: Option<(Instant, String)>,
    /// Why the latest request got no answer, however quickly; cleared by an answer.
    last_error: Option<String>,
    /// Since when a pass holding a probe turn is trying the server.
    probing: Option<Instant>,
}

/// Why passes to a server take turns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Doubt {
    /// It has not answered yet, or its requests began to time out only a moment ago:
    /// worth waiting a little for.
    Unproven,
    /// Its requests have been timing out for a while, or the first try of it has had
    /// no answer for as long; the reason is the latest.
    Failing(String),
}

struct State {
    /// Requests allowed in flight (fractional: grows by 1/limit per success).
    limit: f64,
    max: f64,
    in_flight: usize,
    /// A decrease waits this long after the last, so one burst of 503s halves once.
    last_decrease: Option<Instant>,
    /// Smoothed duration of a successful request of each kind, to notice a server
    /// slowing down. By kind: a create takes several times a read, and one average
    /// over both would take a busy stretch of creates for a slowdown. The kinds are the
    /// client's fixed endpoint names, so this stays a few entries long.
    typical: Vec<Typical>,
}

struct Typical {
    kind: &'static str,
    took: Duration,
    answers: u32,
}

/// Answers of a kind before its usual time is trusted: the first ones meet an idle
/// server, and the same requests take several times as long once the others are in
/// flight too (a busy server queues them). Judged too early, that ramp reads as a
/// slowdown and halves the limit at every cold start.
const SETTLED: u32 = 20;

/// How a request ended, as far as the limit cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer from endpoint kind `.0` after `.1`.
    Ok(&'static str, Duration),
    /// 429 or 503 (or 502/504): the server is overloaded.
    Overloaded,
    /// Any other failure; says nothing about load.
    Other,
}

/// Held while a request is in flight; dropping it frees the slot.
pub struct Permit {
    limit: Arc<Limit>,
    done: bool,
}

impl Limit {
    pub fn new(max: usize) -> Self {
        Limit {
            state: Mutex::new(State {
                limit: max as f64,
                max: max as f64,
                in_flight: 0,
                last_decrease: None,
                typical: Vec::new(),
            }),
            freed: Notify::new(),
            decreases: Counter::default(),
            health: Mutex::default(),
            news: Notify::new(),
        }
    }

    /// Records an answer (any HTTP status).
    pub fn answered(&self) {
        let mut h = self.health.lock().expect("limit lock");
        h.answered_once = true;
        h.failing = None;
        h.last_error = None;
        drop(h);
        self.news.notify_waiters();
    }

    /// Records a request that got no answer, and whether it waited out a timeout.
    pub fn unanswered(&self, why: String, slow: bool) {
        let mut h = self.health.lock().expect("limit lock");
        if slow {
            let since = h.failing.as_ref().map_or_else(Instant::now, |f| f.0);
            h.failing = Some((since, why.clone()));
        }
        h.last_error = Some(why);
    }

    fn last_error(&self) -> String {
        let h = self.health.lock().expect("limit lock");
        h.last_error
            .clone()
            .unwrap_or_else(|| "no answer yet".to_string())
    }

    /// Why passes to this server take turns, if they do.
    pub fn doubt(&self) -> Option<Doubt> {
        let h = self.health.lock().expect("limit lock");
        match (&h.failing, h.answered_once, h.probing) {
            (Some((since, why)), _, _) if since.elapsed() >= TURN_WAIT => {
                Some(Doubt::Failing(why.clone()))
            }
            (None, false, Some(t)) if t.elapsed() >= TURN_WAIT => Some(Doubt::Failing(format!(
                "no answer after {} s",
                t.elapsed().as_secs()
            ))),
            (Some(_), _, _) | (None, false, _) => Some(Doubt::Unproven),
            (None, true, _) => None,
        }
    }

    /// Until when an answer is worth waiting for: the doubt started recently (a probe
    /// in flight, or the first request without an answer). None when nothing is trying.
    fn wait_until(&self) -> Option<Instant> {
        let h = self.health.lock().expect("limit lock");
        let since = match (&h.failing, h.probing) {
            (Some((since, _)), _) => Some(*since),
            (None, probing) => probing,
        };
        since.map(|t| t + TURN_WAIT)
    }

    /// Returns once the server answers again, or no pass is trying it any more.
    async fn settled(&self) {
        loop {
            let next = self.news.notified();
            {
                let h = self.health.lock().expect("limit lock");
                if (h.answered_once && h.failing.is_none()) || h.probing.is_none() {
                    return;
                }
            }
            next.await;
        }
    }

    /// The current limit, rounded down (at least 1).
    pub fn current(&self) -> usize {
        let s = self.state.lock().expect("limit lock");
        (s.limit.floor() as usize).max(1)
    }

    /// Waits for a slot.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let freed = self.freed.notified();
            {
                let mut s = self.state.lock().expect("limit lock");
                if s.in_flight < (s.limit.floor() as usize).max(1) {
                    s.in_flight += 1;
                    return Permit {
                        limit: self.clone(),
                        done: false,
                    };
                }
            }
            freed.await;
        }
    }

    fn finish(&self, outcome: Outcome) {
        let mut s = self.state.lock().expect("limit lock");
        s.in_flight = s.in_flight.saturating_sub(1);
        let now = Instant::now();
        let typical = match outcome {
            Outcome::Ok(kind, _) => s.typical.iter().position(|t| t.kind == kind),
            _ => None,
        };
        let slow = match (outcome, typical) {
            // Four times the usual time for its kind, and not just a fast server's jitter.
            (Outcome::Ok(_, d), Some(i)) => {
                let t = &s.typical[i];
                t.answers >= SETTLED && d > t.took * 4 && d > Duration::from_millis(200)
            }
            _ => false,
        };
        let decreased = match outcome {
            Outcome::Overloaded => decrease(&mut s, now),
            Outcome::Ok(..) if slow => decrease(&mut s, now),
            Outcome::Ok(kind, d) => {
                s.limit = (s.limit + 1.0 / s.limit).min(s.max);
                match typical {
                    Some(i) => {
                        let t = &mut s.typical[i];
                        t.answers = t.answers.saturating_add(1);
                        // The mean of the first answers, then a moving average.
                        let weight = 1.0 / f64::from(t.answers.min(10));
                        t.took = t.took.mul_f64(1.0 - weight) + d.mul_f64(weight);
                    }
                    None => s.typical.push(Typical {
                        kind,
                        took: d,
                        answers: 1,
                    }),
                }
                false
            }
            Outcome::Other => false,
        };
        drop(s);
        if decreased {
            self.decreases.inc();
        }
        self.freed.notify_waiters();
    }
}

/// Halves the limit unless it was halved less than a second ago; says whether it did.
fn decrease(s: &mut State, now: Instant) -> bool {
    let recent = s
        .last_decrease
        .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1));
    if !recent {
        s.limit = (s.limit / 2.0).max(1.0);
        s.last_decrease = Some(now);
    }
    !recent
}

impl Permit {
    /// Reports how the request ended and frees the slot.
    pub fn finish(mut self, outcome: Outcome) {
        self.done = true;
        self.limit.finish(outcome);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Cancelled before an answer: free the slot without judging the server.
        if !self.done {
            self.limit.finish(Outcome::Other);
        }
    }
}

/// A bound on the Kubernetes writes in flight (finalizers, status, Events), shared by
/// every pass. A cold start of thousands of resources otherwise has each of its passes
/// write at once, and the apiserver takes those bursts from the CPUs its neighbours use.
#[derive(Clone, Default)]
pub struct KubeWrites(Option<Arc<Semaphore>>);

impl KubeWrites {
    /// At most `n` writes at once; `None`: no bound.
    pub fn new(n: Option<usize>) -> Self {
        Self(n.map(|n| Arc::new(Semaphore::new(n.max(1)))))
    }

    /// Runs the write `w` once a slot is free. The semaphore is fair: a write waits for
    /// those queued before it, and no longer.
    pub async fn run<T>(&self, w: impl std::future::Future<Output = T>) -> T {
        // Never closed, so acquiring cannot fail; if it did, the write goes unbounded.
        let _slot = match &self.0 {
            Some(s) => s.acquire().await.ok(),
            None => None,
        };
        w.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kube_writes_never_exceed_the_bound_and_all_finish() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for (bound, expect) in [(Some(2), 2), (Some(1), 1), (None, 12)] {
            let gate = KubeWrites::new(bound);
            let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
            let writes = (0..12).map(|_| {
                let (gate, now, peak) = (gate.clone(), now.clone(), peak.clone());
                tokio::spawn(async move {
                    gate.run(async {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                })
            });
            let done = futures::future::join_all(writes).await;
            assert!(done.iter().all(Result::is_ok));
            assert_eq!(peak.load(Ordering::SeqCst), expect, "bound {bound:?}");
        }
    }

    /// `times` successful answers of `kind`, each after `ms` milliseconds.
    async fn answers(limit: &Arc<Limit>, kind: &'static str, ms: u64, times: u32) {
        for _ in 0..times {
            limit
                .acquire()
                .await
                .finish(Outcome::Ok(kind, Duration::from_millis(ms)));
        }
    }

    #[tokio::test]
    async fn halves_on_overload_and_grows_back() {
        let decreases = Counter::default();
        let limits = Limits::new(8).counting(decreases.clone());
        let limit = limits.for_server("http://prefect/api");
        assert_eq!(limit.current(), 8);
        limit.acquire().await.finish(Outcome::Overloaded);
        assert_eq!(limit.current(), 4);
        // A burst of 503s within a second halves once, and is counted once.
        limit.acquire().await.finish(Outcome::Overloaded);
        assert_eq!(limit.current(), 4);
        assert_eq!(decreases.get(), 1);
        // Successes add about one per round of `limit` requests (4 + 1/4 + 1/4.25 ...).
        answers(&limit, "read", 5, 5).await;
        assert_eq!(limit.current(), 5);
        answers(&limit, "read", 5, 100).await;
        assert_eq!(limit.current(), 8, "never above the maximum");
    }

    #[tokio::test]
    async fn a_slow_answer_counts_as_overload() {
        let limit = Arc::new(Limit::new(8));
        answers(&limit, "read", 50, SETTLED).await;
        answers(&limit, "read", 2000, 1).await;
        assert_eq!(limit.current(), 4);
    }

    #[tokio::test]
    async fn each_kind_of_request_has_its_own_usual_time() {
        let limit = Arc::new(Limit::new(8));
        answers(&limit, "read", 60, SETTLED).await;
        // Creates take several times a read: that is their usual time, not a slowdown.
        answers(&limit, "create", 300, SETTLED).await;
        assert_eq!(limit.current(), 8);
        // Four times a create's own usual time is.
        answers(&limit, "create", 1500, 1).await;
        assert_eq!(limit.current(), 4);
    }

    #[tokio::test]
    async fn the_ramp_of_a_cold_start_is_not_a_slowdown() {
        let limit = Arc::new(Limit::new(8));
        // The first answers meet an idle server; then eight in flight take five times
        // as long each, which is how long they take from then on.
        answers(&limit, "create", 50, 3).await;
        answers(&limit, "create", 250, 100).await;
        assert_eq!(limit.current(), 8);
        // Once settled, a real slowdown still halves it.
        answers(&limit, "create", 1200, 1).await;
        assert_eq!(limit.current(), 4);
    }

    #[tokio::test]
    async fn waits_for_a_free_slot() {
        let limit = Arc::new(Limit::new(1));
        let first = limit.acquire().await;
        let l2 = limit.clone();
        let second = tokio::spawn(async move { l2.acquire().await.finish(Outcome::Other) });
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("freed")
            .unwrap();
    }

    #[tokio::test]
    async fn a_new_server_is_tried_by_one_pass_while_the_others_wait_for_its_answer() {
        let limits = Arc::new(Limits::new(8));
        let server = limits.for_server("http://prefect/api");
        let probe = limits.turn(&server).await.unwrap();
        assert!(probe.is_some(), "the first pass tries the server");
        let (l, s) = (limits.clone(), server.clone());
        let waiting = tokio::spawn(async move { l.turn(&s).await.map(|t| t.is_some()) });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a second pass waits for the answer");
        server.answered();
        let waited = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the answer ends the wait")
            .unwrap();
        assert_eq!(waited, Ok(false), "once it answered, no turn is needed");
        drop(probe);
        assert!(limits.turn(&server).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn only_requests_that_wait_out_a_timeout_put_a_server_in_doubt() {
        let limits = Limits::new(4);
        let server = limits.for_server("http://prefect/api");
        server.answered();
        // Refused at once: holds nobody up, so passes go on as usual.
        server.unanswered("connection failed".into(), false);
        assert_eq!(server.doubt(), None);
        // Timed out: for a moment it is tried by one pass at a time, then passes take
        // turns until it answers.
        server.unanswered("timed out".into(), true);
        assert_eq!(server.doubt(), Some(Doubt::Unproven));
        let probe = limits.turn(&server).await.unwrap();
        assert!(probe.is_some());
        server.answered();
        assert_eq!(server.doubt(), None);
    }

    #[tokio::test]
    async fn a_new_server_that_refuses_does_not_keep_the_others_waiting() {
        let limits = Arc::new(Limits::new(8));
        let server = limits.for_server("http://nowhere/api");
        let probe = limits.turn(&server).await.unwrap();
        let (l, s) = (limits.clone(), server.clone());
        let waiting = tokio::spawn(async move { l.turn(&s).await.map(|t| t.is_some()) });
        tokio::task::yield_now().await;
        server.unanswered("connection failed: refused".into(), false);
        drop(probe);
        let waited = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("the end of the try ends the wait")
            .unwrap();
        assert_eq!(waited, Err("connection failed: refused".to_string()));
    }
}
