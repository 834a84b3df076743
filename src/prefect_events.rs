//! Changes made in Prefect, seen as they happen. One websocket per Prefect server to its
//! event stream (`/events/out`, the protocol Prefect's own event subscriber speaks),
//! filtered to deployment and automation events; an update or deletion of a deployment
//! or an automation a resource manages marks that resource and asks its controller for
//! a pass at once.
//!
//! The stream only shortens the wait: the periodic drift check runs whether or not a
//! stream is up, so a change is never missed for longer than one resync interval while
//! a stream is down, being re-established, or the server has none.
//!
//! A stream counts as up only once it has delivered an event the operator posted itself
//! (`Echo`): a websocket can connect, authenticate and answer pings yet deliver nothing,
//! as on several API replicas that share no message broker, where each replica's stream
//! hears only what was posted to that replica.
//!
//! A stream reports only what happens while it is subscribed. Each subscription after
//! a server's first is a new stretch (`Coverage`), from the moment it proves it
//! delivers: automations known to a resource from an earlier stretch are read again on
//! its next drift check, since a change made while no stream listened is not replayed
//! by a server that keeps no events (and one that does replays at most its last 15
//! minutes).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures::{SinkExt, StreamExt};
use kube::runtime::reflector::ObjectRef;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{ClientRequestBuilder, Message};

use crate::api::PrefectDeployment;
use crate::capabilities::Capabilities;
use crate::metrics::Metrics;
use crate::prefect::{Auth, CallLog, FlowCache, PrefectClient};

/// More servers than this get no stream (the resync still covers them): the servers
/// come from specs, which anyone allowed to create a resource writes.
const MAX_STREAMS: usize = 64;
/// An event is a few KiB; a larger message is not Prefect's.
const MAX_MESSAGE: usize = 1 << 20;
/// We ping this often; a stream silent for twice as long is taken as dead.
const PING_EVERY: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The events that start a pass: a change made by someone else, or a deletion.
const WANTED: [&str; 4] = [
    "prefect.deployment.updated",
    "prefect.deployment.deleted",
    "prefect.automation.updated",
    "prefect.automation.deleted",
];
/// The kinds of Prefect resource those events are about.
const KINDS: [&str; 2] = ["prefect.deployment.", "prefect.automation."];
/// The event the operator posts to see that its stream delivers, and the prefix of the
/// resource it is about (followed by this process's id).
const PROBE_EVENT: &str = "prefect-operator.stream.probe";
const PROBE_RESOURCE: &str = "prefect-operator.stream.";
/// A probe not back within this long means the stream delivers nothing. Events go
/// through in well under a second on a loaded server (benchmarks: 0.15 s p95).
const ECHO_WAIT: Duration = Duration::from_secs(20);

pub type Trigger = ObjectRef<PrefectDeployment>;

/// The streams of every server, and who to tell about an event.
pub struct EventStreams {
    servers: Mutex<HashMap<String, Arc<Server>>>,
    /// Resources changed in Prefect since their last pass: their next pass reads Prefect
    /// directly instead of trusting a recent bulk read or skipping until the resync.
    changed: Mutex<HashSet<Trigger>>,
    /// Resources whose drift checks trusted a stream found deaf, and when it was found:
    /// their next pass checks from bulk reads made since, instead of waiting until due.
    rechecks: Mutex<HashMap<Trigger, Instant>>,
    triggers: broadcast::Sender<Trigger>,
    metrics: Arc<Metrics>,
    /// For the one read a stream makes over HTTP: whether the server's stream is on.
    http: reqwest::Client,
    calls: Arc<CallLog>,
    /// The servers' versions, kept fresh while their streams deliver.
    versions: Option<Arc<FlowCache>>,
    /// Numbers the stretches after a server's first (see `Coverage`).
    stretches: AtomicU64,
}

/// Which stretch of a server's stream a drift check ran under: a stretch begins when a
/// subscription proves it delivers and ends when the stream drops or goes unproven.
/// Automations read (or made) under the stretch the stream is still on need no reading
/// while it is up; what was known before a drop is read again once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// 0 for the first stretch since the server was first followed: what a pass read
    /// before it (the first second or so of a start) counts as within it.
    pub stretch: u64,
    /// When this stretch began (none yet for the first one): a snapshot read before
    /// then may not show what changed while no stream listened.
    pub since: Option<Instant>,
}

struct Server {
    /// Managed deployment and automation ids on this server (UUIDs, so one map holds
    /// both), and the resource of each.
    watched: Mutex<HashMap<String, Trigger>>,
    auth: Mutex<Option<Auth>>,
    /// Up and known to deliver.
    connected: AtomicBool,
    /// The current subscription's stretch and when it began.
    stretch: Mutex<Coverage>,
    /// The shortest resync interval of the resources watched here: a quiet stream is
    /// probed this often, so a stream gone deaf is found within about one interval.
    probe_every: Mutex<Duration>,
}

impl Server {
    fn probe_every(&self) -> Duration {
        *self.probe_every.lock().expect("events lock")
    }
}

impl EventStreams {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let (triggers, _) = broadcast::channel(1024);
        Self {
            servers: Mutex::default(),
            changed: Mutex::default(),
            rechecks: Mutex::default(),
            triggers,
            metrics,
            http: crate::prefect::http_client(),
            calls: Arc::default(),
            versions: None,
            stretches: AtomicU64::new(0),
        }
    }

    /// Makes the settings read with this HTTP client, counted in `calls`.
    pub fn calling(mut self, http: reqwest::Client, calls: Arc<CallLog>) -> Self {
        self.http = http;
        self.calls = calls;
        self
    }

    /// Keeps the versions in `flows` fresh while a server's stream delivers, so a
    /// server whose stream is up is not asked its version every ten minutes.
    pub fn confirming(mut self, flows: Arc<FlowCache>) -> Self {
        self.versions = Some(flows);
        self
    }

    /// The resources to reconcile now, for a controller's `reconcile_on`. A receiver that
    /// falls behind loses triggers, not correctness (the resync catches up).
    pub fn subscribe(&self) -> impl futures::Stream<Item = Trigger> + Send + 'static {
        let rx = self.triggers.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(t) => return Some((t, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    /// Whether Prefect reported a change to this resource's deployment since its last
    /// pass (and forgets it: the pass about to run handles it).
    pub fn take_changed(&self, who: &Trigger) -> bool {
        self.changed.lock().expect("events lock").remove(who)
    }

    /// Watches deployment `id` and `automations` on server `base` for resource `who`,
    /// whose drift check runs every `resync`, starting the server's stream if it has
    /// none. False where there is nothing to follow: a server older than 3.7 announces
    /// no deployment changes, and beyond `MAX_STREAMS` servers the resync alone covers
    /// them.
    #[allow(clippy::too_many_arguments)]
    pub fn watch(
        self: &Arc<Self>,
        base: &str,
        caps: &Capabilities,
        auth: Option<Auth>,
        id: &str,
        automations: &[String],
        who: Trigger,
        resync: Duration,
    ) -> bool {
        if !caps.deployment_events {
            return false;
        }
        let mut servers = self.servers.lock().expect("events lock");
        if !servers.contains_key(base) && servers.len() >= MAX_STREAMS {
            return false;
        }
        let server = servers.entry(base.to_string()).or_insert_with(|| {
            let server = Arc::new(Server {
                watched: Mutex::default(),
                auth: Mutex::new(auth.clone()),
                connected: AtomicBool::new(false),
                stretch: Mutex::new(Coverage {
                    stretch: 0,
                    since: None,
                }),
                probe_every: Mutex::new(resync),
            });
            tokio::spawn(run(self.clone(), base.to_string(), server.clone()));
            server
        });
        let fresh = server.watched.lock().expect("events lock").is_empty();
        // The latest credentials of any resource on the server (a rotated key).
        *server.auth.lock().expect("events lock") = auth;
        {
            let mut every = server.probe_every.lock().expect("events lock");
            *every = (*every).min(resync);
        }
        let mut watched = server.watched.lock().expect("events lock");
        // Every pass registers again; unless its ids changed, there is nothing to do
        // (the scan below is over every id of the server).
        let mine = |k: &str| watched.get(k) == Some(&who);
        if mine(id) && automations.iter().all(|a| mine(a)) {
            return true;
        }
        watched.retain(|_, w| *w != who);
        for a in automations {
            watched.insert(a.clone(), who.clone());
        }
        watched.insert(id.to_string(), who);
        drop(watched);
        drop(servers);
        if fresh {
            self.count();
        }
        true
    }

    /// The stretch the stream of server `base` is on, or would start with if the server
    /// is not followed yet. Taken before a drift check reads, and compared after.
    pub fn coverage(&self, base: &str) -> Coverage {
        let servers = self.servers.lock().expect("events lock");
        servers.get(base).map_or(
            Coverage {
                stretch: 0,
                since: None,
            },
            |s| *s.stretch.lock().expect("events lock"),
        )
    }

    /// Whether server `base`'s stream is up and has been since `known` was taken: then
    /// it has reported every change made since to the automations it watches.
    pub fn covers(&self, base: &str, known: Coverage) -> bool {
        let servers = self.servers.lock().expect("events lock");
        servers.get(base).is_some_and(|s| {
            s.connected.load(Ordering::Relaxed)
                && s.stretch.lock().expect("events lock").stretch == known.stretch
        })
    }

    /// Starts a new stretch for `server`, unless this is its first.
    fn new_stretch(&self, server: &Server) {
        let mut stretch = server.stretch.lock().expect("events lock");
        if stretch.since.is_some() {
            stretch.stretch = self.stretches.fetch_add(1, Ordering::Relaxed) + 1;
        }
        stretch.since = Some(Instant::now());
    }

    /// Stops watching what resource `who` had on any server, and forgets what was noted
    /// for its next pass (a deleted resource has none, and must leave nothing behind).
    pub fn forget(&self, who: &Trigger) {
        let servers = self.servers.lock().expect("events lock");
        for server in servers.values() {
            server
                .watched
                .lock()
                .expect("events lock")
                .retain(|_, w| w != who);
        }
        self.changed.lock().expect("events lock").remove(who);
        self.rechecks.lock().expect("events lock").remove(who);
    }

    /// Number of servers whose stream is up.
    pub fn connected(&self) -> usize {
        self.up_and_followed().0
    }

    /// Servers whose stream is up, and servers followed.
    fn up_and_followed(&self) -> (usize, usize) {
        let servers = self.servers.lock().expect("events lock");
        let up = servers
            .values()
            .filter(|s| s.connected.load(Ordering::Relaxed))
            .count();
        (up, servers.len())
    }

    fn on_event(&self, server: &Server, event: &Value) {
        let name = event["event"].as_str().unwrap_or_default();
        if !WANTED.contains(&name) {
            return;
        }
        let Some(id) = event["resource"]["prefect.resource.id"]
            .as_str()
            .and_then(|r| KINDS.iter().find_map(|k| r.strip_prefix(k)))
        else {
            return;
        };
        let who = server.watched.lock().expect("events lock").get(id).cloned();
        if let Some(who) = who {
            tracing::debug!(event = name, id, resource = %who, "change in Prefect");
            self.notify(who);
        }
    }

    /// When the stream resource `who` relied on was found deaf, if it was since the
    /// resource's last pass (and forgets it).
    pub fn take_recheck(&self, who: &Trigger) -> Option<Instant> {
        self.rechecks.lock().expect("events lock").remove(who)
    }

    /// The stream of `server` delivered nothing since some moment after its last proof,
    /// and drift checks skipped what it covers meanwhile: every resource on it is
    /// checked now, from bulk reads made from now on, so a change it missed is found
    /// within about one interval of the proof rather than two.
    fn recheck(&self, server: &Server) {
        // Down first, so none of those checks takes the stream as covering it.
        self.set_connected(server, false);
        let now = Instant::now();
        let who: HashSet<Trigger> = server
            .watched
            .lock()
            .expect("events lock")
            .values()
            .cloned()
            .collect();
        let mut rechecks = self.rechecks.lock().expect("events lock");
        for w in who {
            rechecks.insert(w.clone(), now);
            let _ = self.triggers.send(w);
        }
    }

    /// Marks resource `who` as changed in Prefect and asks its controller for a pass.
    pub fn notify(&self, who: Trigger) {
        self.changed
            .lock()
            .expect("events lock")
            .insert(who.clone());
        let _ = self.triggers.send(who);
    }

    fn set_connected(&self, server: &Server, up: bool) {
        if up {
            self.new_stretch(server);
        }
        server.connected.store(up, Ordering::Relaxed);
        self.count();
    }

    /// Sets the gauges of streams up and down (followed but not up).
    fn count(&self) {
        let (up, followed) = self.up_and_followed();
        self.metrics.event_streams.set(up as i64);
        self.metrics.event_streams_down.set((followed - up) as i64);
    }
}

/// One server's stream, for as long as resources on it are watched: connect, follow,
/// and after a drop connect again with backoff, asking for the events missed meanwhile.
async fn run(streams: Arc<EventStreams>, base: String, server: Arc<Server>) {
    let mut backoff = Duration::from_secs(1);
    let mut since = chrono::Utc::now();
    let mut said_off = false;
    loop {
        if server.watched.lock().expect("events lock").is_empty() {
            streams.servers.lock().expect("events lock").remove(&base);
            streams.count();
            return;
        }
        let auth = server.auth.lock().expect("events lock").clone();
        if switched_off(&streams, &base, auth.clone()).await {
            if !said_off {
                tracing::warn!(server = %base, "this Prefect server's event stream is switched off (server.events.stream_out_enabled is false); changes made in Prefect are found by the drift check, and automations are read on each one");
                said_off = true;
            }
            tokio::time::sleep(MAX_BACKOFF).await;
            continue;
        }
        said_off = false;
        let started = std::time::Instant::now();
        let result = follow(&streams, &base, auth, &server, &mut since).await;
        if server.connected.load(Ordering::Relaxed) {
            streams.set_connected(&server, false);
            streams.metrics.event_stream_drops.inc();
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        match result {
            Ok(()) => {
                tracing::info!(server = %base, "Prefect event stream closed; drift checks continue on the resync")
            }
            Err(e) => {
                tracing::warn!(server = %base, error = %e, retry_in = ?backoff, "no Prefect event stream; drift checks continue on the resync")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Whether the server says its stream is switched off: its websocket would then accept
/// the subscription and never deliver, and look up all the while. Prefect Cloud has no
/// such setting to read, and its stream is on.
async fn switched_off(streams: &EventStreams, base: &str, auth: Option<Auth>) -> bool {
    if base.contains("/accounts/") && base.contains("/workspaces/") {
        return false;
    }
    PrefectClient::new(streams.http.clone(), base, auth, streams.calls.clone())
        .event_stream_switched_off()
        .await
}

/// Connects, authenticates, subscribes and reads until the stream ends. `since` moves
/// with the events seen, so a reconnection asks Prefect for what it missed.
async fn follow(
    streams: &EventStreams,
    base: &str,
    auth: Option<Auth>,
    server: &Server,
    since: &mut chrono::DateTime<chrono::Utc>,
) -> Result<(), String> {
    let url = ws_url(base)?;
    let uri: tokio_tungstenite::tungstenite::http::Uri =
        url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().ok_or("no host")?.to_string();
    let tls = uri.scheme_str() == Some("wss");
    let client = PrefectClient::new(
        streams.http.clone(),
        base,
        auth.clone(),
        streams.calls.clone(),
    );
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = tokio::time::timeout(Duration::from_secs(10), open(&host, port, tls))
        .await
        .map_err(|_| "connect timed out".to_string())??;
    let request = ClientRequestBuilder::new(uri).with_sub_protocol("prefect");
    if tls {
        let connector = tokio_rustls::TlsConnector::from(tls_config()?);
        let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        talk(streams, &client, request, stream, server, since).await
    } else {
        talk(streams, &client, request, tcp, server, since).await
    }
}

async fn talk<S: AsyncRead + AsyncWrite + Unpin>(
    streams: &EventStreams,
    client: &PrefectClient,
    request: ClientRequestBuilder,
    stream: S,
    server: &Server,
    since: &mut chrono::DateTime<chrono::Utc>,
) -> Result<(), String> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())?;
    // Prefect Cloud takes the API key, a server with an auth string takes that string.
    let token = match client.auth() {
        Some(Auth::Bearer(k)) | Some(Auth::Basic(k)) => Value::String(k.clone()),
        None => Value::Null,
    };
    ws.send(Message::text(
        json!({"type": "auth", "token": token}).to_string(),
    ))
    .await
    .map_err(|e| e.to_string())?;
    // The server's process answering this websocket stays the same until it drops (an
    // upgrade restarts it): a version read since then holds while the probes come back.
    let connected = std::time::Instant::now();
    let answer = next_text(&mut ws).await?;
    if answer["type"] != "auth_success" {
        return Err(format!(
            "the event stream refused the credentials: {}",
            answer["reason"].as_str().unwrap_or("no reason given")
        ));
    }
    // A little overlap with what was seen before the drop: a repeated event costs one
    // pass that finds nothing to do.
    let from = *since - chrono::Duration::seconds(10);
    let filter = json!({
        "type": "filter",
        "backfill": true,
        "filter": {
            "occurred": {
                "since": from.to_rfc3339(),
                "until": (chrono::Utc::now() + chrono::Duration::days(3650)).to_rfc3339(),
            },
            // Only the events that start a pass (every deployment the operator creates
            // announces itself too, and a cold start need not stream those back), and
            // the probes.
            "event": {"name": ([&WANTED[..], &[PROBE_EVENT]].concat())},
            "resource": {"id_prefix": ([&KINDS[..], &[PROBE_RESOURCE]].concat())},
        },
    });
    ws.send(Message::text(filter.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("Prefect event stream subscribed; probing it");
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut heard = Instant::now();
    let mut echo = Echo::new();
    let mut said_unposted = false;
    loop {
        let every = server.probe_every();
        let wake = match echo.due(Instant::now(), every) {
            Due::Deaf => {
                if server.connected.load(Ordering::Relaxed) {
                    streams.recheck(server);
                }
                return Err(format!(
                    "a probe event posted {} s ago did not come back through the event stream (API replicas without a shared message broker do this); taking the stream as down",
                    ECHO_WAIT.as_secs()
                ));
            }
            Due::Probe => {
                let id = new_id();
                match client.emit_event(&probe_event(&id)).await {
                    Ok(()) => echo.posted(id, Instant::now()),
                    Err(e) => {
                        if !said_unposted {
                            tracing::warn!(error = %e, "cannot post the event that shows this Prefect event stream delivers; until one is posted, drift checks read automations themselves");
                            said_unposted = true;
                        }
                        echo.not_posted(Instant::now());
                        if server.connected.load(Ordering::Relaxed) {
                            streams.set_connected(server, false);
                        }
                    }
                }
                continue;
            }
            Due::Wait(at) => at,
        };
        tokio::select! {
            _ = ping.tick() => {
                if heard.elapsed() > PING_EVERY * 2 + Duration::from_secs(5) {
                    return Err("the event stream went silent".into());
                }
                ws.send(Message::Ping(Default::default())).await.map_err(|e| e.to_string())?;
            }
            _ = tokio::time::sleep_until(wake) => {}
            msg = ws.next() => {
                heard = Instant::now();
                match msg {
                    None | Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Err(e)) => return Err(e.to_string()),
                    Some(Ok(Message::Text(text))) => {
                        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        if v["type"] == "event" {
                            let id = v["event"]["id"].as_str().unwrap_or_default();
                            let probe = echo.heard(id, Instant::now());
                            if let (Some(first), Some(versions)) = (probe, &streams.versions) {
                                // The passes read the version before this stream
                                // connected: read it once more, then keep it.
                                if !versions.confirm_version(client.base_url(), connected)
                                    && first
                                {
                                    if let Err(e) = versions.read_version(client).await {
                                        tracing::debug!(error = %e, "reading the server's version failed; it is read again in ten minutes");
                                    }
                                }
                            }
                            if probe == Some(true) {
                                said_unposted = false;
                                streams.set_connected(server, true);
                                tracing::info!("Prefect event stream connected and delivering");
                            }
                            if let Some(at) = v["event"]["occurred"]
                                .as_str()
                                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            {
                                *since = (*since).max(at.with_timezone(&chrono::Utc));
                            }
                            streams.on_event(server, &v["event"]);
                        }
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
    }
}

/// Whether a stream delivers, found by posting an event and waiting for it to come back:
/// once after connecting, then again after every quiet interval. Only the probe counts:
/// the events a new subscription first receives are read from the database (the
/// backfill), not delivered live.
struct Echo {
    /// The probe out, and when it was posted.
    pending: Option<(String, Instant)>,
    /// Since when the stream has been quiet (its last proof, or a probe that could not
    /// be posted): the next probe is due an interval later, by the interval as it is
    /// then (a resource checked more often may have joined meanwhile). None: due now.
    quiet_since: Option<Instant>,
    /// A probe came back, and none failed to post since.
    delivers: bool,
}

#[derive(Debug, PartialEq)]
enum Due {
    Wait(Instant),
    Probe,
    Deaf,
}

impl Echo {
    fn new() -> Self {
        Echo {
            pending: None,
            quiet_since: None,
            delivers: false,
        }
    }

    fn due(&self, now: Instant, every: Duration) -> Due {
        match (&self.pending, self.quiet_since) {
            (Some((_, sent)), _) if now >= *sent + ECHO_WAIT => Due::Deaf,
            (Some((_, sent)), _) => Due::Wait(*sent + ECHO_WAIT),
            (None, Some(quiet)) if now < quiet + every => Due::Wait(quiet + every),
            (None, _) => Due::Probe,
        }
    }

    fn posted(&mut self, id: String, now: Instant) {
        self.pending = Some((id, now));
    }

    /// The probe could not be posted: whether the stream delivers is not known; the
    /// next try is an interval away.
    fn not_posted(&mut self, now: Instant) {
        self.delivers = false;
        self.quiet_since = Some(now);
    }

    /// Event `id` came through at `now`. `Some` when it is the probe: `Some(true)` when
    /// the stream was not known to deliver before.
    fn heard(&mut self, id: &str, now: Instant) -> Option<bool> {
        if self.pending.as_ref().is_some_and(|(p, _)| p == id) {
            self.pending = None;
            self.quiet_since = Some(now);
            return Some(!std::mem::replace(&mut self.delivers, true));
        }
        // Any event on a stream known to deliver shows it still does.
        if self.delivers && self.pending.is_none() {
            self.quiet_since = Some(now);
        }
        None
    }
}

/// A random version-4 UUID (Prefect wants one as an event's id).
fn new_id() -> String {
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The probe: an event about this operator process, which changes nothing in Prefect.
fn probe_event(id: &str) -> Value {
    static PROCESS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let process = PROCESS.get_or_init(new_id);
    json!({
        "id": id,
        "occurred": chrono::Utc::now().to_rfc3339(),
        "event": PROBE_EVENT,
        "resource": {
            "prefect.resource.id": format!("{PROBE_RESOURCE}{process}"),
            "prefect.resource.name": "prefect-operator",
        },
        "related": [],
        "payload": {},
    })
}

async fn next_text<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) -> Result<Value, String> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .map_err(|_| "no answer from the event stream".to_string())?;
        match msg {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(&t).map_err(|e| e.to_string())
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(format!(
                    "the event stream closed: {}",
                    frame.map(|f| f.reason.to_string()).unwrap_or_default()
                ))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the event stream closed".into()),
        }
    }
}

/// `http(s)://host/api` -> `ws(s)://host/api/events/out`.
fn ws_url(base: &str) -> Result<String, String> {
    let (scheme, rest) = base
        .split_once("://")
        .ok_or_else(|| format!("{base} is not a URL"))?;
    let ws = match scheme {
        "http" => "ws",
        "https" => "wss",
        other => return Err(format!("no event stream over {other}")),
    };
    Ok(format!("{ws}://{}/events/out", rest.trim_end_matches('/')))
}

/// The proxy rules of the environment (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY and
/// their lowercase forms), read once: the same rules reqwest applies to the API calls,
/// so the stream goes where they go.
fn proxies() -> &'static hyper_util::client::proxy::matcher::Matcher {
    static RULES: std::sync::OnceLock<hyper_util::client::proxy::matcher::Matcher> =
        std::sync::OnceLock::new();
    RULES.get_or_init(hyper_util::client::proxy::matcher::Matcher::from_env)
}

/// The stream's TCP connection to `host:port`: a tunnel through the HTTP proxy the
/// environment names for it (CONNECT), else a direct one.
async fn open(host: &str, port: u16, tls: bool) -> Result<tokio::net::TcpStream, String> {
    open_with(proxies(), host, port, tls).await
}

async fn open_with(
    rules: &hyper_util::client::proxy::matcher::Matcher,
    host: &str,
    port: u16,
    tls: bool,
) -> Result<tokio::net::TcpStream, String> {
    let scheme = if tls { "https" } else { "http" };
    let target: tokio_tungstenite::tungstenite::http::Uri = format!("{scheme}://{host}:{port}")
        .parse()
        .map_err(|e| format!("{host}:{port}: {e}"))?;
    let Some(proxy) = rules.intercept(&target) else {
        return tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string());
    };
    // Named by host and port only: the proxy URL may carry credentials.
    let via = proxy.uri();
    let (proxy_host, proxy_port) = (
        via.host().unwrap_or_default().to_string(),
        via.port_u16().unwrap_or(80),
    );
    if via.scheme_str() != Some("http") {
        return Err(format!(
            "proxy {proxy_host}: only http:// proxies carry the event stream"
        ));
    }
    let mut tcp = tokio::net::TcpStream::connect((proxy_host.as_str(), proxy_port))
        .await
        .map_err(|e| format!("proxy {proxy_host}:{proxy_port}: {e}"))?;
    let mut ask = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n");
    if let Some(auth) = proxy.basic_auth().and_then(|v| v.to_str().ok()) {
        ask.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    ask.push_str("\r\n");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(ask.as_bytes())
        .await
        .map_err(|e| format!("proxy {proxy_host}:{proxy_port}: {e}"))?;
    // The answer's head, a byte at a time so that nothing past it is taken from the
    // tunnel; bounded, as a proxy is another party.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= 8192 {
            return Err(format!("proxy {proxy_host}:{proxy_port}: answer too long"));
        }
        let byte = tcp
            .read_u8()
            .await
            .map_err(|e| format!("proxy {proxy_host}:{proxy_port}: {e}"))?;
        head.push(byte);
    }
    let status = String::from_utf8_lossy(&head);
    let status = status.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        return Err(format!(
            "proxy {proxy_host}:{proxy_port} refused the tunnel to {host}:{port}: {}",
            status.chars().take(120).collect::<String>()
        ));
    }
    Ok(tcp)
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy on loopback that reads one request head, hands it over, and answers
    /// `answer`; after a 200 it echoes what comes through the tunnel.
    async fn one_shot_proxy(answer: &'static str) -> (u16, tokio::sync::oneshot::Receiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(c.read_u8().await.unwrap());
            }
            let _ = tx.send(String::from_utf8(head).unwrap());
            c.write_all(answer.as_bytes()).await.unwrap();
            if answer.contains(" 200 ") {
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf).await.unwrap();
                c.write_all(&buf).await.unwrap();
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn the_stream_tunnels_through_the_proxy_the_environment_names() {
        use hyper_util::client::proxy::matcher::Matcher;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (port, head) = one_shot_proxy("HTTP/1.1 200 Connection established\r\n\r\n").await;
        let rules = Matcher::builder()
            .https(format!("http://ops:s3cret@127.0.0.1:{port}"))
            .build();
        let mut tcp = open_with(&rules, "prefect.example.com", 443, true)
            .await
            .unwrap();
        let head = head.await.unwrap();
        assert!(
            head.starts_with("CONNECT prefect.example.com:443 HTTP/1.1\r\n"),
            "{head}"
        );
        // ops:s3cret
        assert!(
            head.contains("Proxy-Authorization: Basic b3BzOnMzY3JldA==\r\n"),
            "{head}"
        );
        // Nothing of the tunnel was read with the answer.
        tcp.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tcp.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
    }

    #[tokio::test]
    async fn a_refused_tunnel_is_named_without_the_proxy_credentials() {
        use hyper_util::client::proxy::matcher::Matcher;
        let (port, _) = one_shot_proxy("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await;
        let rules = Matcher::builder()
            .https(format!("http://ops:s3cret@127.0.0.1:{port}"))
            .build();
        let e = open_with(&rules, "prefect.example.com", 443, true)
            .await
            .unwrap_err();
        assert!(
            e.contains("refused the tunnel to prefect.example.com:443")
                && e.contains("407")
                && !e.contains("s3cret"),
            "{e}"
        );
        // ws:// goes by HTTP_PROXY, which is not set here: no proxy, a direct attempt.
        let direct = open_with(&rules, "127.0.0.1", 9, false).await.unwrap_err();
        assert!(!direct.contains("proxy"), "{direct}");
        // NO_PROXY keeps a host out of the proxy.
        let rules = Matcher::builder()
            .https(format!("http://127.0.0.1:{port}"))
            .no("127.0.0.1")
            .build();
        let direct = open_with(&rules, "127.0.0.1", 9, true).await.unwrap_err();
        assert!(!direct.contains("proxy"), "{direct}");
    }

    /// Streams following server `base`, not up yet, which watches `watched`.
    fn following(base: &str, watched: HashMap<String, Trigger>) -> (EventStreams, Arc<Server>) {
        // The HTTP client the streams keep for their own reads needs a TLS provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let calls = CallLog::default();
        let streams = EventStreams::new(Arc::new(Metrics::new(calls.durations.clone())));
        let server = Arc::new(Server {
            watched: Mutex::new(watched),
            auth: Mutex::default(),
            connected: AtomicBool::new(false),
            stretch: Mutex::new(streams.coverage(base)),
            probe_every: Mutex::new(Duration::from_secs(60)),
        });
        streams
            .servers
            .lock()
            .unwrap()
            .insert(base.into(), server.clone());
        (streams, server)
    }

    /// What a drift check knows under one stretch stays covered while the stream is
    /// up on it, and no longer once the stream has dropped, even when it is back.
    #[test]
    fn a_drop_ends_what_the_stream_covers() {
        let base = "http://prefect/api";
        let (streams, server) = following(base, HashMap::new());
        let before = streams.coverage(base);
        assert_eq!(before.stretch, 0);
        // Not up yet: nothing is covered.
        assert!(!streams.covers(base, before));
        // The first proof keeps the first stretch: a start reads before its stream is up.
        streams.set_connected(&server, true);
        assert!(streams.covers(base, before));
        let first = streams.coverage(base);
        assert_eq!(first.stretch, 0);
        assert!(first.since.is_some());
        // Down, then up again: a new stretch, and what was known before is not covered.
        streams.set_connected(&server, false);
        assert!(!streams.covers(base, first));
        streams.set_connected(&server, true);
        let second = streams.coverage(base);
        assert_ne!(second.stretch, first.stretch);
        assert!(!streams.covers(base, first));
        assert!(streams.covers(base, second));
        // Another server is covered by nothing.
        assert!(!streams.covers("http://other/api", second));
    }

    /// A stream found deaf asks for a pass of every resource it watched, to be checked
    /// from fresh reads, and covers nothing from then on.
    #[tokio::test]
    async fn a_deaf_stream_has_every_resource_on_it_checked_now() {
        use futures::StreamExt;
        let base = "http://prefect/api";
        let who = |name: &str| Trigger::new(name).within("ns");
        let watched = HashMap::from([
            ("d1".to_string(), who("a")),
            ("a1".to_string(), who("a")),
            ("d2".to_string(), who("b")),
        ]);
        let (streams, server) = following(base, watched);
        streams.set_connected(&server, true);
        let known = streams.coverage(base);
        assert!(streams.covers(base, known));
        let mut asked = Box::pin(streams.subscribe());
        let before = Instant::now();
        streams.recheck(&server);
        assert!(!streams.covers(base, known));
        let mut passes = vec![asked.next().await.unwrap(), asked.next().await.unwrap()];
        passes.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(passes, vec![who("a"), who("b")], "one pass each");
        let found = streams.take_recheck(&who("a")).expect("a is rechecked");
        assert!(found >= before);
        assert!(streams.take_recheck(&who("a")).is_none(), "once");
        assert!(!streams.take_changed(&who("b")), "not a change in Prefect");
        // A resource deleted before its pass leaves nothing noted.
        streams.forget(&who("b"));
        assert!(streams.take_recheck(&who("b")).is_none());
    }

    #[test]
    fn urls() {
        assert_eq!(
            ws_url("http://127.0.0.1:4200/api").unwrap(),
            "ws://127.0.0.1:4200/api/events/out"
        );
        assert_eq!(
            ws_url("https://api.prefect.cloud/api/accounts/a/workspaces/w/").unwrap(),
            "wss://api.prefect.cloud/api/accounts/a/workspaces/w/events/out"
        );
        assert!(ws_url("ftp://x").is_err());
    }

    #[test]
    fn a_stream_delivers_once_its_probe_is_back() {
        let every = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut echo = Echo::new();
        assert_eq!(echo.due(t0, every), Due::Probe);
        echo.posted("p1".into(), t0);
        assert_eq!(echo.due(t0, every), Due::Wait(t0 + ECHO_WAIT));
        // Backfilled or unrelated events prove nothing before the probe is back.
        assert_eq!(echo.heard("old", t0), None);
        assert!(!echo.delivers);
        assert_eq!(echo.heard("p1", t0 + Duration::from_secs(1)), Some(true));
        assert!(echo.delivers);
        // Quiet for an interval: probed again; an event meanwhile puts that off.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(echo.due(t1, every), Due::Wait(t1 + every));
        let t2 = t1 + Duration::from_secs(30);
        assert_eq!(echo.heard("someone's edit", t2), None);
        assert_eq!(echo.due(t2 + every, every), Due::Probe);
        // A resource checked more often joined: the next probe comes sooner.
        let often = Duration::from_secs(10);
        assert_eq!(echo.due(t2, often), Due::Wait(t2 + often));
        echo.posted("p2".into(), t2 + every);
        // The same probe twice does not verify twice; a lost one is the stream's end.
        assert_eq!(echo.heard("p1", t2 + every), None);
        // A later probe back on a stream that delivers is a probe, not a new proof.
        echo.heard("p2", t2 + every);
        echo.posted("p3".into(), t2 + every * 2);
        assert_eq!(echo.heard("p3", t2 + every * 2), Some(false));
        echo.posted("p4".into(), t2 + every * 3);
        assert_eq!(echo.due(t2 + every * 3 + ECHO_WAIT, every), Due::Deaf);
    }

    #[test]
    fn a_probe_that_cannot_be_posted_leaves_the_stream_unproven() {
        let every = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut echo = Echo::new();
        echo.posted("p1".into(), t0);
        assert_eq!(echo.heard("p1", t0), Some(true));
        echo.not_posted(t0 + every);
        assert!(!echo.delivers);
        assert_eq!(echo.due(t0 + every, every), Due::Wait(t0 + every * 2));
    }

    #[test]
    fn probe_ids_are_uuids() {
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!("89ab".contains(&id[19..20]));
        assert_ne!(id, new_id());
        let e = probe_event(&id);
        assert_eq!(e["event"], PROBE_EVENT);
        assert!(e["resource"]["prefect.resource.id"]
            .as_str()
            .unwrap()
            .starts_with(PROBE_RESOURCE));
    }
}
