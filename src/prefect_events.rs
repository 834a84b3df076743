//! Changes made in Prefect, seen as they happen. One websocket per Prefect server to its
//! event stream (`/events/out`, the protocol Prefect's own event subscriber speaks),
//! filtered to deployment and automation events; an update or deletion of a deployment
//! or an automation a resource manages marks that resource and asks its controller for
//! a pass at once.
//!
//! The stream only shortens the wait: the periodic drift check runs whether or not a
//! stream is up, so a change is never missed for longer than one resync interval while
//! a stream is down, being re-established, or the server has none.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
use crate::prefect::{Auth, CallLog, PrefectClient};

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

pub type Trigger = ObjectRef<PrefectDeployment>;

/// The streams of every server, and who to tell about an event.
pub struct EventStreams {
    servers: Mutex<HashMap<String, Arc<Server>>>,
    /// Resources changed in Prefect since their last pass: their next pass reads Prefect
    /// directly instead of trusting a recent bulk read or skipping until the resync.
    changed: Mutex<HashSet<Trigger>>,
    triggers: broadcast::Sender<Trigger>,
    metrics: Arc<Metrics>,
    /// For the one read a stream makes over HTTP: whether the server's stream is on.
    http: reqwest::Client,
    calls: Arc<CallLog>,
}

struct Server {
    /// Managed deployment and automation ids on this server (UUIDs, so one map holds
    /// both), and the resource of each.
    watched: Mutex<HashMap<String, Trigger>>,
    auth: Mutex<Option<Auth>>,
    connected: AtomicBool,
}

impl EventStreams {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let (triggers, _) = broadcast::channel(1024);
        Self {
            servers: Mutex::default(),
            changed: Mutex::default(),
            triggers,
            metrics,
            http: crate::prefect::http_client(),
            calls: Arc::default(),
        }
    }

    /// Makes the settings read with this HTTP client, counted in `calls`.
    pub fn calling(mut self, http: reqwest::Client, calls: Arc<CallLog>) -> Self {
        self.http = http;
        self.calls = calls;
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
    /// starting the server's stream if it has none. False where there is nothing to
    /// follow: a server older than 3.7 announces no deployment changes, and beyond
    /// `MAX_STREAMS` servers the resync alone covers them.
    pub fn watch(
        self: &Arc<Self>,
        base: &str,
        caps: &Capabilities,
        auth: Option<Auth>,
        id: &str,
        automations: &[String],
        who: Trigger,
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
            });
            tokio::spawn(run(self.clone(), base.to_string(), server.clone()));
            server
        });
        let fresh = server.watched.lock().expect("events lock").is_empty();
        // The latest credentials of any resource on the server (a rotated key).
        *server.auth.lock().expect("events lock") = auth;
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

    /// Whether the stream of server `base` is up: then it reports changes to the
    /// automations it watches, and they need no periodic read.
    pub fn live(&self, base: &str) -> bool {
        let servers = self.servers.lock().expect("events lock");
        servers
            .get(base)
            .is_some_and(|s| s.connected.load(Ordering::Relaxed))
    }

    /// Stops watching what resource `who` had on any server.
    pub fn forget(&self, who: &Trigger) {
        let servers = self.servers.lock().expect("events lock");
        for server in servers.values() {
            server
                .watched
                .lock()
                .expect("events lock")
                .retain(|_, w| w != who);
        }
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

    /// Marks resource `who` as changed in Prefect and asks its controller for a pass.
    pub fn notify(&self, who: Trigger) {
        self.changed
            .lock()
            .expect("events lock")
            .insert(who.clone());
        let _ = self.triggers.send(who);
    }

    fn set_connected(&self, server: &Server, up: bool) {
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
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let request = ClientRequestBuilder::new(uri).with_sub_protocol("prefect");
    if tls {
        let connector = tokio_rustls::TlsConnector::from(tls_config()?);
        let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        talk(streams, request, stream, auth, server, since).await
    } else {
        talk(streams, request, tcp, auth, server, since).await
    }
}

async fn talk<S: AsyncRead + AsyncWrite + Unpin>(
    streams: &EventStreams,
    request: ClientRequestBuilder,
    stream: S,
    auth: Option<Auth>,
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
    let token = match auth {
        Some(Auth::Bearer(k)) | Some(Auth::Basic(k)) => Value::String(k),
        None => Value::Null,
    };
    ws.send(Message::text(
        json!({"type": "auth", "token": token}).to_string(),
    ))
    .await
    .map_err(|e| e.to_string())?;
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
            // Only the events that start a pass: every deployment the operator creates
            // announces itself too, and a cold start need not stream those back.
            "event": {"name": WANTED},
            "resource": {"id_prefix": KINDS},
        },
    });
    ws.send(Message::text(filter.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    streams.set_connected(server, true);
    tracing::info!("Prefect event stream connected");
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut heard = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if heard.elapsed() > PING_EVERY * 2 + Duration::from_secs(5) {
                    return Err("the event stream went silent".into());
                }
                ws.send(Message::Ping(Default::default())).await.map_err(|e| e.to_string())?;
            }
            msg = ws.next() => {
                heard = std::time::Instant::now();
                match msg {
                    None | Some(Ok(Message::Close(_))) => return Ok(()),
                    Some(Err(e)) => return Err(e.to_string()),
                    Some(Ok(Message::Text(text))) => {
                        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        if v["type"] == "event" {
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
}
