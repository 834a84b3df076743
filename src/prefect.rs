//! A small client for the parts of Prefect's REST API the operator uses.
//!
//! One `reqwest::Client` (one connection pool, keyed by host inside reqwest) is shared by
//! every reconcile; a `PrefectClient` is only that pool plus a base URL and credentials,
//! so building one per reconcile costs nothing. Retries cover what Prefect itself
//! retries: 429/502/503/504 and dropped connections, a bounded number of times,
//! honouring Retry-After.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use prometheus_client::metrics::family::Family;

use crate::capabilities::Capabilities;
use crate::limit::{Limit, Outcome as LimitOutcome};
use crate::metrics::{duration_histogram, HistogramFamily, RequestLabels};
use crate::observed::{ObservedAutomation, ObservedDeployment, ObservedLimit};
use crate::Error;

/// The API version Prefect 3.x clients announce.
const API_VERSION: &str = "0.8.4";
// Busy answers (429/502/503/504) get up to 8 attempts, about 20 s with the backoff below:
// enough to ride out SQLite lock contention without reporting a transient failure on the
// resource. A server that cannot be reached at all is reported after 3.
const MAX_ATTEMPTS: u32 = 8;
const MAX_ATTEMPTS_UNREACHABLE: u32 = 3;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub enum Auth {
    /// Prefect Cloud API key (or any server expecting a Bearer token).
    Bearer(String),
    /// `user:password` for PREFECT_SERVER_API_AUTH_STRING.
    Basic(String),
}

// Never print credentials, not even in debug logs.
impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Bearer(_) => f.write_str("Bearer(***)"),
            Auth::Basic(_) => f.write_str("Basic(***)"),
        }
    }
}

/// Calls made, by method and endpoint (a fixed set of names, never ids): counts of calls
/// for tests and benchmarks, and each attempt's duration by status code for the metrics
/// endpoint.
const RECENT_CALLS: usize = 256;

pub struct CallLog {
    counts: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// The latest calls in order (bounded); only kept with the `test-util` feature.
    recent: Mutex<std::collections::VecDeque<String>>,
    pub durations: HistogramFamily<RequestLabels>,
}

impl Default for CallLog {
    fn default() -> Self {
        Self {
            counts: Mutex::default(),
            recent: Mutex::default(),
            durations: Family::new_with_constructor(duration_histogram),
        }
    }
}

impl std::fmt::Debug for CallLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CallLog").field(&self.snapshot()).finish()
    }
}

impl CallLog {
    fn record(&self, method: &Method, endpoint: &'static str) {
        let mut m = self.counts.lock().expect("call log lock");
        *m.entry((method.to_string(), endpoint)).or_default() += 1;
        drop(m);
        if cfg!(feature = "test-util") {
            let mut recent = self.recent.lock().expect("call log lock");
            if recent.len() == RECENT_CALLS {
                recent.pop_front();
            }
            recent.push_back(format!("{method} {endpoint}"));
        }
    }

    /// The latest calls (at most 256), oldest first, as "METHOD endpoint". For tests
    /// that check the order of calls.
    #[cfg(feature = "test-util")]
    pub fn recent(&self) -> Vec<String> {
        self.recent
            .lock()
            .expect("call log lock")
            .iter()
            .cloned()
            .collect()
    }

    fn observe(&self, method: &Method, endpoint: &'static str, code: u16, elapsed: Duration) {
        self.durations
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                endpoint,
                code,
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn snapshot(&self) -> BTreeMap<(String, &'static str), u64> {
        self.counts.lock().expect("call log lock").clone()
    }

    /// Calls made with `method` to `endpoint`.
    #[cfg(feature = "test-util")]
    pub fn count(&self, method: &str, endpoint: &str) -> u64 {
        self.counts
            .lock()
            .expect("call log lock")
            .get(&(method.to_string(), endpoint))
            .copied()
            .unwrap_or(0)
    }

    /// Requests that change something in Prefect (see `is_write`).
    #[cfg(feature = "test-util")]
    pub fn writes(&self) -> u64 {
        self.snapshot()
            .iter()
            .filter(|((m, e), _)| is_write(m, e))
            .map(|(_, n)| n)
            .sum()
    }
}

/// Whether a request (method and endpoint label, as counted) changes something in
/// Prefect: all but GETs, the bulk reads (`POST .../filter`) and the event stream's
/// probes (`POST /events`, an event about the operator itself). For tests and the
/// benchmark, which count writes from the call log or from the metrics.
#[cfg(feature = "test-util")]
pub fn is_write(method: &str, endpoint: &str) -> bool {
    method != "GET" && !endpoint.ends_with("_filter") && endpoint != "events"
}

/// The largest answer read from a Prefect server. A page of 200 deployments is a few MiB
/// at most; the URL comes from a spec, so the server at the other end may be anyone's,
/// and an endless answer must not take the operator's memory.
pub const MAX_RESPONSE_BYTES: usize = 32 << 20;

/// The answer's body, refused once it passes `MAX_RESPONSE_BYTES` (read chunk by chunk,
/// so a server that sends no length or a wrong one is stopped there too).
async fn read_bounded(
    mut resp: reqwest::Response,
    method: &Method,
    endpoint: &str,
) -> Result<Vec<u8>, Error> {
    let too_large = || {
        Error::PrefectRejected(format!(
            "{method} {endpoint}: the answer is larger than {} MiB; is the URL Prefect's API?",
            MAX_RESPONSE_BYTES >> 20
        ))
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::PrefectUnreachable(short_transport(&e), Some(e)))?
    {
        let need = body.len() + chunk.len();
        if need > MAX_RESPONSE_BYTES {
            return Err(too_large());
        }
        if need > body.capacity() {
            // Powers of two up to the bound (itself one), so the last copy holds at most
            // 16 + 32 MiB; Vec's own doubling from an odd first chunk could end at a
            // capacity just under the bound and copy into twice that.
            let cap = need
                .next_power_of_two()
                .max(body.capacity() * 2)
                .min(MAX_RESPONSE_BYTES);
            body.reserve_exact(cap - body.len());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Builds the shared HTTP client.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("prefect-operator/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("HTTP client builds")
}

#[derive(Clone)]
pub struct PrefectClient {
    http: reqwest::Client,
    base: String,
    auth: Option<Auth>,
    calls: Arc<CallLog>,
    /// Requests in flight to this server, shared by every client of it.
    limit: Option<Arc<Limit>>,
    /// Flow ids by (server, flow name), shared by every client.
    flows: Option<Arc<FlowCache>>,
    /// Guard reads by name, coalesced with those of other passes.
    lookups: Option<Arc<crate::lookup::Lookups>>,
    /// This client's own memory of the server's capabilities, when no `FlowCache` is
    /// shared.
    capabilities: Arc<Mutex<Option<(Capabilities, std::time::Instant)>>>,
}

/// How long a server's version is trusted before it is read again (servers are
/// upgraded in place).
const VERSION_TTL: Duration = Duration::from_secs(600);

impl std::fmt::Debug for PrefectClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefectClient")
            .field("base", &self.base)
            .finish()
    }
}

/// Flow ids by server and flow name: a flow is created once per name, so a create of a
/// deployment whose flow is known needs no `POST /flows/`.
#[derive(Default)]
pub struct FlowCache {
    ids: Mutex<std::collections::HashMap<(String, String), String>>,
    /// Each server's capabilities, and when they were read.
    versions: Mutex<std::collections::HashMap<String, (Capabilities, std::time::Instant)>>,
    /// Per server (and flow), held while its version (or the flow's id) is read, so
    /// concurrent passes wait for one read (and a slow server delays only its own).
    reading: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl FlowCache {
    /// Server `base`'s version, if read at or after `since`, still holds now: `since`
    /// is when an event stream that still delivers connected, and a server changes
    /// version only by restarting, which drops the stream. Its ten minutes start again.
    /// False when there is no such read to keep.
    pub fn confirm_version(&self, base: &str, since: std::time::Instant) -> bool {
        let mut map = self.versions.lock().expect("version cache lock");
        match map.get_mut(base) {
            Some((_, at)) if *at >= since => {
                *at = std::time::Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Server `base`'s version as `client` reads it now, kept as `confirm_version` keeps
    /// it (for a stream that connected after the passes' last read).
    pub async fn read_version(&self, client: &PrefectClient) -> Result<(), Error> {
        let caps = client.capabilities().await?;
        self.versions
            .lock()
            .expect("version cache lock")
            .insert(client.base.clone(), (caps, std::time::Instant::now()));
        Ok(())
    }

    /// The lock to hold while reading what `key` names.
    fn gate(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.reading.lock().expect("flow cache lock");
        if gates.len() >= 10_000 {
            gates.clear();
        }
        gates.entry(key).or_default().clone()
    }

    fn get(&self, base: &str, name: &str) -> Option<String> {
        let map = self.ids.lock().expect("flow cache lock");
        map.get(&(base.to_string(), name.to_string())).cloned()
    }

    fn put(&self, base: &str, name: &str, id: &str) {
        let mut map = self.ids.lock().expect("flow cache lock");
        // Bounded: one entry per flow name the resources use; a flood of names only
        // costs the cache, not correctness.
        if map.len() >= 100_000 {
            map.clear();
        }
        map.insert((base.to_string(), name.to_string()), id.to_string());
    }

    fn forget(&self, base: &str, name: &str) {
        let mut map = self.ids.lock().expect("flow cache lock");
        map.remove(&(base.to_string(), name.to_string()));
    }
}

/// A Prefect answer that is not a success, before it is turned into an `Error`.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    summary: String,
}

impl PrefectClient {
    pub fn new(http: reqwest::Client, base: &str, auth: Option<Auth>, calls: Arc<CallLog>) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            auth,
            calls,
            limit: None,
            flows: None,
            lookups: None,
            capabilities: Arc::default(),
        }
    }

    /// What the server can hold, from its version (`GET /admin/version`), read once per
    /// server and kept for ten minutes. A server that does not say (404) is taken to
    /// have everything.
    pub async fn capabilities(&self) -> Result<Capabilities, Error> {
        let fresh = |c: &Option<(Capabilities, std::time::Instant)>| {
            c.filter(|(_, at)| at.elapsed() < VERSION_TTL)
                .map(|(c, _)| c)
        };
        let known = || match &self.flows {
            Some(f) => fresh(
                &f.versions
                    .lock()
                    .expect("version cache lock")
                    .get(&self.base)
                    .copied(),
            ),
            None => fresh(&self.capabilities.lock().expect("version cache lock")),
        };
        if let Some(c) = known() {
            return Ok(c);
        }
        let gate = self
            .flows
            .as_ref()
            .map(|f| f.gate(format!("version {}", self.base)));
        let _reading = match &gate {
            Some(g) => Some(g.lock().await),
            None => None,
        };
        if let Some(c) = known() {
            return Ok(c);
        }
        let caps = match self
            .call_opt(Method::GET, "admin_version", "/admin/version", None)
            .await?
        {
            Some(Value::String(v)) => Capabilities::of(&v),
            _ => Capabilities::LATEST,
        };
        let entry = (caps, std::time::Instant::now());
        match &self.flows {
            Some(f) => {
                let mut map = f.versions.lock().expect("version cache lock");
                if map.len() >= 10_000 {
                    map.clear();
                }
                map.insert(self.base.clone(), entry);
            }
            None => *self.capabilities.lock().expect("version cache lock") = Some(entry),
        }
        Ok(caps)
    }

    /// Whether the server says its event stream is switched off
    /// (`server.events.stream_out_enabled: false` in `GET /admin/settings`). Its websocket
    /// then accepts a subscription and never delivers an event. Anything else (no such
    /// endpoint, as on Prefect Cloud, or an error) is not taken as off: the stream is tried.
    pub async fn event_stream_switched_off(&self) -> bool {
        match self
            .call_opt(Method::GET, "admin_settings", "/admin/settings", None)
            .await
        {
            Ok(Some(v)) => v["server"]["events"]["stream_out_enabled"] == Value::Bool(false),
            _ => false,
        }
    }

    /// Posts one event (`POST /events`): how the event stream checks that it delivers.
    pub async fn emit_event(&self, event: &Value) -> Result<(), Error> {
        let body = Value::Array(vec![event.clone()]);
        self.call(Method::POST, "events", "/events", Some(&body))
            .await
            .map(|_| ())
    }

    /// Shares an adaptive in-flight limit with every other client of this server.
    pub fn with_limit(mut self, limit: Arc<Limit>) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Shares known flow ids with every other client.
    pub fn with_flow_cache(mut self, flows: Arc<FlowCache>) -> Self {
        self.flows = Some(flows);
        self
    }

    /// Coalesces this client's reads by name with those of every other client.
    pub fn with_lookups(mut self, lookups: Arc<crate::lookup::Lookups>) -> Self {
        self.lookups = Some(lookups);
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn auth(&self) -> Option<&Auth> {
        self.auth.as_ref()
    }

    /// Sends one request with retries; `Ok(Err(failure))` is a definite non-2xx answer.
    async fn send(
        &self,
        method: Method,
        endpoint: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Result<Value, Failure>, Error> {
        let url = format!("{}{}", self.base, path);
        // One call, however many attempts it takes: the attempts and their answers are
        // in the duration histogram.
        self.calls.record(&method, endpoint);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("X-PREFECT-API-VERSION", API_VERSION);
            req = match &self.auth {
                Some(Auth::Bearer(k)) => req.bearer_auth(k),
                Some(Auth::Basic(s)) => {
                    let (user, pass) = s.split_once(':').unwrap_or((s, ""));
                    req.basic_auth(user, Some(pass))
                }
                None => req,
            };
            if let Some(b) = body {
                req = req.json(b);
            }
            let permit = match &self.limit {
                Some(l) => Some(l.acquire().await),
                None => None,
            };
            let started = std::time::Instant::now();
            let sent = req.send().await;
            let code = sent.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
            let took = started.elapsed();
            self.calls.observe(&method, endpoint, code, took);
            let outcome = match (&sent, code) {
                (_, 429 | 502 | 503 | 504) => LimitOutcome::Overloaded,
                (Err(e), _) if e.is_timeout() => LimitOutcome::Overloaded,
                (Ok(_), _) => LimitOutcome::Ok(endpoint, took),
                (Err(_), _) => LimitOutcome::Other,
            };
            // The body is read while the request still counts as in flight, so the
            // per-server limit also bounds the answers held in memory at once.
            let answer = match sent {
                Ok(resp) => {
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let status = resp.status();
                    read_bounded(resp, &method, endpoint)
                        .await
                        .map(|bytes| Ok((status, retry_after, bytes)))
                }
                Err(e) => Ok(Err(e)),
            };
            if let Some(l) = &self.limit {
                // Only a whole answer counts: headers followed by a body that never
                // ends (or never arrives) are as good as silence.
                match &answer {
                    Ok(Ok(_)) => l.answered(),
                    Ok(Err(e)) => l.unanswered(short_transport(e), e.is_timeout()),
                    Err(Error::PrefectUnreachable(why, source)) => {
                        l.unanswered(why.clone(), source.as_ref().is_some_and(|e| e.is_timeout()))
                    }
                    Err(e) => l.unanswered(e.to_string(), true),
                }
            }
            if let Some(p) = permit {
                // Freed before any retry wait, so a backing-off request holds no slot.
                p.finish(outcome);
            }
            let retry_in = match answer? {
                Ok((status, retry_after, bytes)) => {
                    if status.is_success() {
                        if bytes.is_empty() {
                            return Ok(Ok(Value::Null));
                        }
                        // A 2xx that is not JSON is not Prefect's API: most often the
                        // URL points at the UI (which answers any path with HTML).
                        return serde_json::from_slice(&bytes).map(Ok).map_err(|_| {
                            Error::PrefectRejected(format!(
                                "{method} {endpoint}: the server answered {} with a body that is not JSON; is the URL Prefect's API (usually ending in /api)?",
                                status.as_u16()
                            ))
                        });
                    }
                    let retryable = matches!(status.as_u16(), 429 | 502 | 503 | 504);
                    if !retryable || attempt >= MAX_ATTEMPTS {
                        return Ok(Err(Failure {
                            status,
                            summary: summarize(&bytes),
                        }));
                    }
                    retry_after
                        .map(|d| d.min(MAX_RETRY_AFTER))
                        .unwrap_or_else(|| backoff(attempt))
                }
                Err(e) => {
                    // A request that timed out has held its worker for the whole
                    // timeout already; the pass fails and is retried with backoff
                    // instead of holding it for two more.
                    if e.is_timeout() || attempt >= MAX_ATTEMPTS_UNREACHABLE {
                        return Err(Error::PrefectUnreachable(short_transport(&e), Some(e)));
                    }
                    backoff(attempt)
                }
            };
            tracing::debug!(%method, endpoint, attempt, ?retry_in, "retrying Prefect request");
            tokio::time::sleep(retry_in).await;
        }
    }

    /// Like `send`, with every non-2xx answer turned into an error.
    async fn call(
        &self,
        method: Method,
        endpoint: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Error> {
        let what = format!("{method} {endpoint}");
        self.send(method, endpoint, path, body)
            .await?
            .map_err(|f| failure_to_error(&what, f))
    }

    /// Like `call`, with 404 mapped to `None`.
    async fn call_opt(
        &self,
        method: Method,
        endpoint: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>, Error> {
        let what = format!("{method} {endpoint}");
        match self.send(method, endpoint, path, body).await? {
            Ok(v) => Ok(Some(v)),
            Err(f) if f.status == StatusCode::NOT_FOUND => Ok(None),
            Err(f) => Err(failure_to_error(&what, f)),
        }
    }

    /// The flow's id: from the cache when known, else `POST /flows/` (an upsert by name).
    /// Passes asking for the same unknown flow at once wait for one upsert.
    pub async fn flow_id(&self, name: &str) -> Result<String, Error> {
        let Some(c) = &self.flows else {
            return self.upsert_flow(name).await;
        };
        if let Some(id) = c.get(&self.base, name) {
            return Ok(id);
        }
        let gate = c.gate(format!("flow {} {name}", self.base));
        let _reading = gate.lock().await;
        if let Some(id) = c.get(&self.base, name) {
            return Ok(id);
        }
        let id = self.upsert_flow(name).await?;
        c.put(&self.base, name, &id);
        Ok(id)
    }

    /// Drops a cached flow id (the flow was deleted in Prefect).
    pub fn forget_flow(&self, name: &str) -> bool {
        match &self.flows {
            Some(c) if c.get(&self.base, name).is_some() => {
                c.forget(&self.base, name);
                true
            }
            _ => false,
        }
    }

    /// `POST /flows/` is an upsert by name; returns the flow id.
    pub async fn upsert_flow(&self, name: &str) -> Result<String, Error> {
        let v = self
            .call(
                Method::POST,
                "flows",
                "/flows/",
                Some(&serde_json::json!({"name": name})),
            )
            .await?;
        id_of("POST flows", v)
    }

    pub async fn read_deployment(&self, id: &str) -> Result<Option<ObservedDeployment>, Error> {
        let what = "GET deployment";
        self.call_opt(
            Method::GET,
            "deployment",
            &format!("/deployments/{id}"),
            None,
        )
        .await?
        .map(|v| decode(what, v))
        .transpose()
    }

    /// The deployments with these ids (at most 200, one page), as `POST /deployments/filter`
    /// returns them; ids Prefect no longer has are simply absent.
    pub async fn read_deployments(&self, ids: &[String]) -> Result<Vec<ObservedDeployment>, Error> {
        let body = serde_json::json!({
            "deployments": {"id": {"any_": ids}},
            "limit": ids.len().clamp(1, 200),
            "offset": 0,
        });
        let v = self
            .call(
                Method::POST,
                "deployments_filter",
                "/deployments/filter",
                Some(&body),
            )
            .await?;
        decode("POST deployments_filter", v)
    }

    /// One page of `POST /deployments/filter` with the caller's filter body.
    pub async fn filter_deployments(&self, body: &Value) -> Result<Vec<ObservedDeployment>, Error> {
        let v = self
            .call(
                Method::POST,
                "deployments_filter",
                "/deployments/filter",
                Some(body),
            )
            .await?;
        decode("POST deployments_filter", v)
    }

    /// The name of flow `id`, if it exists.
    pub async fn flow_name(&self, id: &str) -> Result<Option<String>, Error> {
        let v = self
            .call_opt(Method::GET, "flow", &format!("/flows/{id}"), None)
            .await?;
        Ok(v.and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_string)))
    }

    /// The values of the Prefect variables with these names (any JSON), by name; a name
    /// Prefect does not have is absent. One `POST /variables/filter` per 200 names.
    pub async fn variables(&self, names: &[String]) -> Result<BTreeMap<String, Value>, Error> {
        #[derive(serde::Deserialize)]
        struct Variable {
            name: String,
            #[serde(default)]
            value: Value,
        }
        let mut found = BTreeMap::new();
        // Names are unique, so a page of N names holds at most N variables.
        for page in names.chunks(200) {
            let body = serde_json::json!({
                "variables": {"name": {"any_": page}},
                "limit": page.len(),
                "offset": 0,
            });
            let v = self
                .call(
                    Method::POST,
                    "variables_filter",
                    "/variables/filter",
                    Some(&body),
                )
                .await?;
            let page: Vec<Variable> = decode("POST variables_filter", v)?;
            found.extend(page.into_iter().map(|v| (v.name, v.value)));
        }
        Ok(found)
    }

    /// Identifies the server and credentials, so a snapshot read with one client is
    /// only used by clients that could have read it themselves.
    pub fn identity(&self) -> String {
        use sha2::{Digest, Sha256};
        let auth = match &self.auth {
            None => String::new(),
            Some(Auth::Bearer(k)) => format!("bearer:{k}"),
            Some(Auth::Basic(b)) => format!("basic:{b}"),
        };
        let digest = Sha256::digest(auth.as_bytes());
        let short: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("{} {short}", self.base)
    }

    /// Deployment `flow`/`name` as the server has it now: through the shared lookups
    /// when this client has them, else one GET.
    pub async fn deployment_by_name(
        &self,
        flow: &str,
        name: &str,
    ) -> Result<Option<ObservedDeployment>, Error> {
        match &self.lookups {
            Some(l) => l.by_name(self, flow, name).await,
            None => self.read_deployment_by_name(flow, name).await,
        }
    }

    pub async fn read_deployment_by_name(
        &self,
        flow: &str,
        name: &str,
    ) -> Result<Option<ObservedDeployment>, Error> {
        let path = format!(
            "/deployments/name/{}/{}",
            encode_segment(flow),
            encode_segment(name)
        );
        self.call_opt(Method::GET, "deployment_by_name", &path, None)
            .await?
            .map(|v| decode("GET deployment_by_name", v))
            .transpose()
    }

    /// Only for a deployment known not to exist: on an existing one this endpoint is an
    /// upsert that replaces every schedule and its scheduled runs.
    pub async fn create_deployment(&self, body: &Value) -> Result<String, Error> {
        let answer = self
            .send(Method::POST, "deployments", "/deployments/", Some(body))
            .await?;
        match answer {
            Ok(v) => id_of("POST deployments", v),
            Err(f) => Err(self.pool_or(body, "POST deployments", f).await),
        }
    }

    pub async fn update_deployment(&self, id: &str, body: &Value) -> Result<(), Error> {
        let path = format!("/deployments/{id}");
        match self
            .send(Method::PATCH, "deployment", &path, Some(body))
            .await?
        {
            Ok(_) => Ok(()),
            Err(f) => Err(self.pool_or(body, "PATCH deployment", f).await),
        }
    }

    /// A failed request that names a work pool is `WorkPoolNotFound` when the pool itself
    /// reads as 404: recognised by status codes, not by the wording of the body. Prefect
    /// 3.9 answers a create naming a missing pool with 404, a PATCH with 500.
    async fn pool_or(&self, body: &Value, what: &str, f: Failure) -> Error {
        let pool = body.get("work_pool_name").and_then(Value::as_str);
        let may_be_pool = f.status == StatusCode::NOT_FOUND || f.status.is_server_error();
        if let (true, Some(pool)) = (may_be_pool, pool) {
            let path = format!("/work_pools/{}", encode_segment(pool));
            if let Ok(Err(g)) = self.send(Method::GET, "work_pool", &path, None).await {
                if g.status == StatusCode::NOT_FOUND {
                    return Error::WorkPoolNotFound(format!(
                        "work pool \"{pool}\" does not exist in Prefect; create it or change spec.workPool.name"
                    ));
                }
            }
        }
        failure_to_error(what, f)
    }

    /// Returns false when the deployment was already gone.
    pub async fn delete_deployment(&self, id: &str) -> Result<bool, Error> {
        self.call_opt(
            Method::DELETE,
            "deployment",
            &format!("/deployments/{id}"),
            None,
        )
        .await
        .map(|v| v.is_some())
    }

    pub async fn create_schedules(
        &self,
        deployment_id: &str,
        bodies: &[Value],
    ) -> Result<(), Error> {
        self.call(
            Method::POST,
            "schedules",
            &format!("/deployments/{deployment_id}/schedules"),
            Some(&Value::Array(bodies.to_vec())),
        )
        .await
        .map(|_| ())
    }

    pub async fn update_schedule(
        &self,
        deployment_id: &str,
        schedule_id: &str,
        body: &Value,
    ) -> Result<(), Error> {
        self.call(
            Method::PATCH,
            "schedule",
            &format!("/deployments/{deployment_id}/schedules/{schedule_id}"),
            Some(body),
        )
        .await
        .map(|_| ())
    }

    pub async fn delete_schedule(
        &self,
        deployment_id: &str,
        schedule_id: &str,
    ) -> Result<(), Error> {
        self.call_opt(
            Method::DELETE,
            "schedule",
            &format!("/deployments/{deployment_id}/schedules/{schedule_id}"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// A global concurrency limit by name.
    pub async fn read_limit(&self, name: &str) -> Result<Option<ObservedLimit>, Error> {
        let what = "GET concurrency_limit";
        self.call_opt(
            Method::GET,
            "concurrency_limit",
            &format!("/v2/concurrency_limits/{}", encode_segment(name)),
            None,
        )
        .await?
        .map(|v| decode(what, v))
        .transpose()
    }

    /// Creates a global concurrency limit; `None` when one of that name appeared
    /// meanwhile (another resource made it first: Prefect answers 409).
    pub async fn create_limit(&self, body: &Value) -> Result<Option<String>, Error> {
        let what = "POST concurrency_limits";
        match self
            .send(
                Method::POST,
                "concurrency_limits",
                "/v2/concurrency_limits/",
                Some(body),
            )
            .await?
        {
            Ok(v) => id_of(what, v).map(Some),
            Err(f) if f.status == StatusCode::CONFLICT => Ok(None),
            Err(f) => Err(failure_to_error(what, f)),
        }
    }

    pub async fn update_limit(&self, id: &str, body: &Value) -> Result<(), Error> {
        self.call(
            Method::PATCH,
            "concurrency_limit",
            &format!("/v2/concurrency_limits/{id}"),
            Some(body),
        )
        .await
        .map(|_| ())
    }

    /// Deletes a global concurrency limit; one already gone counts as deleted.
    pub async fn delete_limit(&self, id: &str) -> Result<(), Error> {
        self.call_opt(
            Method::DELETE,
            "concurrency_limit",
            &format!("/v2/concurrency_limits/{id}"),
            None,
        )
        .await
        .map(|_| ())
    }

    pub async fn create_automation(&self, body: &Value) -> Result<String, Error> {
        let what = "POST automations";
        match self
            .send(Method::POST, "automations", "/automations/", Some(body))
            .await?
        {
            Ok(v) => id_of(what, v),
            // The trigger itself was refused (for example a metric trigger on a server
            // without Prefect Cloud's metrics): say so as a trigger problem.
            Err(f)
                if f.status.is_client_error()
                    && f.status != StatusCode::UNAUTHORIZED
                    && f.status != StatusCode::FORBIDDEN =>
            {
                Err(Error::AutomationFailed(format!(
                    "{what}: {}: {}",
                    f.status.as_u16(),
                    f.summary
                )))
            }
            Err(f) => Err(failure_to_error(what, f)),
        }
    }

    /// Creates one flow run of a deployment. Prefect returns the existing run when one
    /// with the same idempotency key exists, so a retry never makes a second run.
    pub async fn create_flow_run(
        &self,
        deployment_id: &str,
        parameters: &Value,
        idempotency_key: &str,
    ) -> Result<String, Error> {
        let body = serde_json::json!({
            "parameters": parameters,
            "idempotency_key": idempotency_key,
        });
        let v = self
            .call(
                Method::POST,
                "create_flow_run",
                &format!("/deployments/{deployment_id}/create_flow_run"),
                Some(&body),
            )
            .await?;
        id_of("POST create_flow_run", v)
    }

    /// Deletes one automation; one already gone counts as deleted.
    pub async fn delete_automation(&self, id: &str) -> Result<(), Error> {
        self.call_opt(
            Method::DELETE,
            "automation",
            &format!("/automations/{id}"),
            None,
        )
        .await
        .map(|_| ())
    }

    /// Automations that mention `resource` (owned by it or merely referring to it).
    pub async fn automations_related_to(
        &self,
        resource: &str,
    ) -> Result<Vec<ObservedAutomation>, Error> {
        // A server without the automations API answers 404: nothing is related.
        self.call_opt(
            Method::GET,
            "automations_related_to",
            &format!("/automations/related-to/{}", encode_segment(resource)),
            None,
        )
        .await?
        .map(|v| decode("GET automations_related_to", v))
        .transpose()
        .map(Option::unwrap_or_default)
    }

    /// The automations with these ids (at most 200, one page), as `POST /automations/filter`
    /// returns them; ids Prefect no longer has are absent. `None`: the server cannot
    /// filter automations by id (older servers' filter, 3.4's among them, refuses the
    /// field with 422; a server without the automations API answers 404).
    pub async fn read_automations(
        &self,
        ids: &[String],
    ) -> Result<Option<Vec<ObservedAutomation>>, Error> {
        let body = serde_json::json!({
            "automations": {"id": {"any_": ids}},
            "limit": ids.len().clamp(1, 200),
            "offset": 0,
        });
        let what = "POST automations_filter";
        match self
            .send(
                Method::POST,
                "automations_filter",
                "/automations/filter",
                Some(&body),
            )
            .await?
        {
            Ok(v) => decode(what, v).map(Some),
            Err(f) if matches!(f.status.as_u16(), 404 | 422) => Ok(None),
            Err(f) => Err(failure_to_error(what, f)),
        }
    }

    /// Deletes every automation owned by `resource`. A server without the automations
    /// API answers 404, which means there is nothing to delete.
    pub async fn delete_owned_automations(&self, resource: &str) -> Result<(), Error> {
        self.call_opt(
            Method::DELETE,
            "automations_owned_by",
            &format!("/automations/owned-by/{}", encode_segment(resource)),
            None,
        )
        .await
        .map(|_| ())
    }
}

/// 400 ms, 800 ms, 1.6 s, ... up to 5 s (+ up to 100 ms of jitter). Measured in the
/// benchmark: under SQLite lock contention a shorter first wait only adds load (more
/// 503s, lower throughput).
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(200) * 2u32.pow(attempt.min(5));
    base.min(Duration::from_secs(5)) + Duration::from_millis(fastrand::u64(0..100))
}

/// The id of what a create returned (flow, deployment, automation).
fn id_of(what: &str, v: Value) -> Result<String, Error> {
    #[derive(serde::Deserialize)]
    struct Created {
        id: String,
    }
    decode::<Created>(what, v).map(|c| c.id)
}

/// A typed answer, or an error naming the endpoint whose answer did not have the shape
/// Prefect's API documents.
fn decode<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T, Error> {
    serde_json::from_value(v)
        .map_err(|e| Error::PrefectRejected(format!("{what}: unexpected answer from Prefect: {e}")))
}

fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn short_transport(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // The source chain says why (refused, DNS, TLS) without echoing bodies or headers.
    let mut cause = String::new();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        cause = s.to_string();
        src = s.source();
    }
    // Scheme, host and port only: never a path or query.
    let url = e
        .url()
        .map(|u| {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(" ({}://{}{port})", u.scheme(), u.host_str().unwrap_or(""))
        })
        .unwrap_or_default();
    // Only an unknown issuer is fixed by trusting another CA (not an expired
    // certificate or one for another name).
    let hint = if cause.contains("UnknownIssuer") {
        " (a server whose certificate comes from a private CA needs that CA: the chart's caBundle, or SSL_CERT_DIR)"
    } else {
        ""
    };
    format!("{}{hint}", truncate(&format!("{kind}{url}: {cause}"), 200))
}

fn failure_to_error(what: &str, f: Failure) -> Error {
    let code = f.status.as_u16();
    let msg = format!("{what}: {code}: {}", f.summary);
    if f.status.is_server_error() || code == 429 {
        Error::PrefectUnreachable(msg, None)
    } else if code == 401 || code == 403 {
        Error::PrefectUnauthorized(format!(
            "{msg} (the server refused the credentials of spec.server)"
        ))
    } else {
        Error::PrefectRejected(msg)
    }
}

/// A one-line summary of a Prefect error body. Validation errors can be many KB (one
/// entry per union branch): keep the first two messages, cut to 300 characters.
fn summarize(bytes: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return truncate(String::from_utf8_lossy(bytes).trim(), 200);
    };
    if let Some(d) = v.get("detail").and_then(Value::as_str) {
        return truncate(d, 300);
    }
    let details = v
        .get("exception_detail")
        .or_else(|| v.get("detail"))
        .and_then(Value::as_array);
    if let Some(list) = details {
        let parts: Vec<String> = list
            .iter()
            .take(2)
            .map(|e| {
                let loc = e
                    .get("loc")
                    .and_then(Value::as_array)
                    .map(|l| {
                        l.iter()
                            .map(|p| {
                                p.as_str()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| p.to_string())
                            })
                            .collect::<Vec<_>>()
                            .join(".")
                    })
                    .unwrap_or_default();
                let msg = e.get("msg").and_then(Value::as_str).unwrap_or("invalid");
                format!("{loc}: {msg}")
            })
            .collect();
        let more = list.len().saturating_sub(2);
        let tail = if more > 0 {
            format!(" (and {more} more)")
        } else {
            String::new()
        };
        return truncate(&format!("{}{tail}", parts.join("; ")), 300);
    }
    if let Some(m) = v.get("exception_message").and_then(Value::as_str) {
        return truncate(m, 300);
    }
    truncate(&v.to_string(), 200)
}

pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let cut: String = s.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version read while the stream that delivers was connected is kept fresh; one
    /// read before it connected (the server may have restarted since) is not.
    #[test]
    fn a_delivering_stream_keeps_the_version_read_since_it_connected() {
        let flows = FlowCache::default();
        let base = "http://prefect/api";
        let old = std::time::Instant::now() - VERSION_TTL / 2;
        let at = |f: &FlowCache| f.versions.lock().unwrap()[base].1;
        flows
            .versions
            .lock()
            .unwrap()
            .insert(base.into(), (Capabilities::LATEST, old));
        // Connected after the read: the read may predate a restart.
        assert!(!flows.confirm_version(base, old + Duration::from_secs(1)));
        assert_eq!(at(&flows), old);
        // Connected before the read: the same process answered both.
        assert!(flows.confirm_version(base, old - Duration::from_secs(1)));
        assert!(at(&flows) > old);
        assert!(at(&flows).elapsed() < VERSION_TTL / 4);
        // No version read yet: nothing to keep.
        assert!(!flows.confirm_version("http://other/api", old));
        assert_eq!(flows.versions.lock().unwrap().len(), 1);
    }

    #[test]
    fn summarize_keeps_validation_errors_short() {
        let many: Vec<Value> = (0..50)
            .map(|i| serde_json::json!({"loc": ["body", "schedules", i], "msg": "x".repeat(400)}))
            .collect();
        let body =
            serde_json::json!({"exception_message": "Invalid request", "exception_detail": many});
        let s = summarize(body.to_string().as_bytes());
        assert!(s.chars().count() <= 300, "{s}");
        assert!(s.starts_with("body.schedules.0: xxx"), "{s}");
    }

    #[test]
    fn summarize_handler_errors() {
        assert_eq!(
            summarize(br#"{"detail":"Deployment not found"}"#),
            "Deployment not found"
        );
        assert_eq!(summarize(b"oops"), "oops");
    }

    #[test]
    fn encode_segment_escapes_reserved() {
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(encode_segment("my-flow_1.x"), "my-flow_1.x");
    }
}
