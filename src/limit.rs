//! How many requests may be in flight to one Prefect server at a time, adapted to how
//! it copes (additive increase, multiplicative decrease): when it answers 429/503 or a
//! request takes much longer than usual, every worker calling it slows down together,
//! instead of each request backing off alone while the others keep pressing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

/// The limits of every server this process calls, by base URL.
#[derive(Default)]
pub struct Limits {
    max: usize,
    servers: Mutex<HashMap<String, Arc<Limit>>>,
    decreases: Counter,
}

impl Limits {
    /// At most `max` requests in flight per server (the controller's concurrency).
    pub fn new(max: usize) -> Self {
        Limits {
            max: max.max(1),
            servers: Mutex::default(),
            decreases: Counter::default(),
        }
    }

    /// Counts every decrease of any server's limit in `decreases`.
    pub fn counting(mut self, decreases: Counter) -> Self {
        self.decreases = decreases;
        self
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
