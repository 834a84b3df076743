//! Prometheus metrics. Every label comes from a small fixed set (result, error category,
//! HTTP method, endpoint name, status code, Ready state): never from error text or object
//! names, so the number of series stays bounded.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub result: &'static str,
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub endpoint: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    pub ready: &'static str,
}

pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub fn duration_histogram() -> Histogram {
    // 5 ms .. ~40 s
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_duration: Histogram,
    resources: Family<ReadyLabels, Gauge>,
    pub leader: Gauge,
    /// Ready state per object uid, to derive the resources gauge.
    ready_by_uid: Mutex<HashMap<String, &'static str>>,
    drifted: Gauge,
    drifted_uids: Mutex<std::collections::HashSet<String>>,
    /// Prefect servers whose event stream is connected and delivers.
    pub event_streams: Gauge,
    /// Prefect servers followed whose event stream is not up (connecting, refused,
    /// switched off on the server, or not shown to deliver).
    pub event_streams_down: Gauge,
    /// Event streams lost (each falls back to the resync until it is back).
    pub event_stream_drops: Counter,
    /// Times a server's in-flight request limit was halved (429/503 or slow answers).
    pub request_limit_decreases: Counter,
}

impl Metrics {
    /// `prefect_requests` is the family the Prefect client records into.
    pub fn new(prefect_requests: HistogramFamily<RequestLabels>) -> Self {
        let mut registry = Registry::with_prefix("prefect_operator");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconcile passes by result and error category",
            reconciles.clone(),
        );
        let reconcile_duration = duration_histogram();
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile pass takes",
            reconcile_duration.clone(),
        );
        registry.register(
            "prefect_request_duration_seconds",
            "Prefect API requests by method, endpoint and status code (0: no answer)",
            prefect_requests,
        );
        let resources = Family::<ReadyLabels, Gauge>::default();
        registry.register(
            "resources",
            "PrefectDeployments by Ready condition status",
            resources.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica is the leader and reconciles",
            leader.clone(),
        );
        let drifted = Gauge::default();
        registry.register(
            "drifted_resources",
            "PrefectDeployments with driftPolicy Report whose deployment differs in Prefect",
            drifted.clone(),
        );
        let event_streams = Gauge::default();
        registry.register(
            "event_streams_connected",
            "Prefect servers whose event stream is connected and delivers (a probe event came back; changes there are repaired at once)",
            event_streams.clone(),
        );
        let event_streams_down = Gauge::default();
        registry.register(
            "event_streams_down",
            "Prefect servers with managed deployments whose event stream is not up or not shown to deliver (changes there are found by the drift check)",
            event_streams_down.clone(),
        );
        let event_stream_drops = Counter::default();
        registry.register(
            "event_stream_drops",
            "Prefect event streams lost; until one is back, drift is found by the resync",
            event_stream_drops.clone(),
        );
        let request_limit_decreases = Counter::default();
        registry.register(
            "request_limit_decreases",
            "Times a Prefect server's in-flight request limit was halved because it answered 429/503 or slowed down",
            request_limit_decreases.clone(),
        );
        Self {
            registry,
            request_limit_decreases,
            event_streams,
            event_streams_down,
            event_stream_drops,
            drifted,
            drifted_uids: Mutex::default(),
            reconciles,
            reconcile_duration,
            resources,
            leader,
            ready_by_uid: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Records whether one object's deployment has drifted (driftPolicy Report).
    pub fn set_drifted(&self, uid: &str, drifted: bool) {
        let mut set = self.drifted_uids.lock().expect("metrics lock");
        if drifted {
            set.insert(uid.to_string());
        } else {
            set.remove(uid);
        }
        self.drifted.set(set.len() as i64);
    }

    /// Records the Ready status of one object (`None` when it is gone).
    pub fn set_ready(&self, uid: &str, ready: Option<&'static str>) {
        let mut map = self.ready_by_uid.lock().expect("metrics lock");
        match ready {
            Some(r) => {
                map.insert(uid.to_string(), r);
            }
            None => {
                map.remove(uid);
            }
        }
        for state in ["True", "False"] {
            let n = map.values().filter(|v| **v == state).count();
            self.resources
                .get_or_create(&ReadyLabels { ready: state })
                .set(n as i64);
        }
    }
}
