//! The per-object controller: for each PrefectDeployment, validate, resolve the server,
//! observe, plan and perform (`execute`), record status; on deletion, clean up behind
//! the finalizer (`finalizer`).

pub mod events;
pub mod execute;
mod finalizer;
pub mod server;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};

use crate::access::Access;
use crate::api::{
    DriftPolicy, LastRun, PrefectDeployment, FINALIZER, RECONCILE_REQUESTED_AT, RUN_PARAMETERS,
    RUN_REQUESTED_AT,
};
use crate::cache::Cached;
use crate::limit::Limits;
use crate::lookup::Lookups;
use crate::metrics::{Metrics, ReconcileLabels};
use crate::prefect::{CallLog, FlowCache, PrefectClient};
use crate::prefect_events::{Coverage, EventStreams, Trigger};
use crate::snapshot::Snapshots;
use crate::validate::{validate, ValidSchedule};
use crate::{Error, Result};

use events::{Event, EventType, Recorder};
use execute::SyncState;

/// Shortest drift-check interval a resource may ask for.
const MIN_RESYNC: Duration = Duration::from_secs(10);
/// Longest: a drift check at least daily, whatever the spec says.
const MAX_RESYNC: Duration = Duration::from_secs(24 * 3600);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Requests in flight per Prefect server when the caller does not say (the CLI's
/// default).
const DEFAULT_REQUEST_LIMIT: usize = 8;
/// Shortest time between two rewrites of a resource's next-run preview: a status write
/// each, so 10,000 resources on minutely crons stay at most 2,000 writes a minute.
const PREVIEW_REFRESH: Duration = Duration::from_secs(300);
const REPORTER: &str = "prefect-operator";

/// What the last successful pass over an object covered.
#[derive(Clone, PartialEq)]
struct Synced {
    generation: i64,
    /// When the next drift check is due.
    due: Instant,
    /// When the next-run preview it shows was computed.
    at: Instant,
    /// The action annotations it handled.
    requests: Requests,
    /// A digest of the status it wrote (or found already in place), and when.
    status: u64,
    written: Instant,
    /// The event stream's stretch (see `prefect_events::Coverage`) under which a pass
    /// since the operator started last checked or made the automations.
    automations_known: Option<Coverage>,
}

/// How long a pass waits for the cache to show the status the last one wrote: a pass on
/// an older copy would plan from ids that are no longer current.
const CACHE_CATCH_UP: Duration = Duration::from_secs(10);

fn status_digest(status: Option<&crate::api::PrefectDeploymentStatus>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(&status).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// The action annotations of an object (see `api::RECONCILE_REQUESTED_AT` and
/// `api::RUN_REQUESTED_AT`).
#[derive(Clone, PartialEq, Default)]
struct Requests {
    reconcile: Option<String>,
    run: Option<String>,
}

impl Requests {
    fn of(obj: &PrefectDeployment) -> Requests {
        // An empty value asks for nothing (a template that rendered no timestamp, say).
        // Copied into status it would be refused: server-side apply on some apiservers
        // turns "" into null, which the status schema does not allow.
        let get = |k: &str| obj.annotations().get(k).filter(|v| !v.is_empty()).cloned();
        Requests {
            reconcile: get(RECONCILE_REQUESTED_AT),
            run: get(RUN_REQUESTED_AT),
        }
    }
}

pub struct Context {
    pub kube: kube::Client,
    /// One connection pool for every Prefect server.
    pub http: reqwest::Client,
    pub calls: Arc<CallLog>,
    pub metrics: Arc<Metrics>,
    recorder: Recorder,
    default_resync: Duration,
    /// Consecutive failures per object, for exponential backoff; cleared on success.
    failures: Mutex<HashMap<ObjectRef<PrefectDeployment>, u32>>,
    /// Generation last synced successfully and when the next drift check is due, per
    /// object. Our own writes come back as watch events; this lets those echoes skip the
    /// Prefect round trip.
    synced: Mutex<HashMap<ObjectRef<PrefectDeployment>, Synced>>,
    access: Access,
    /// Adaptive in-flight request limits, one per Prefect server.
    limits: Arc<Limits>,
    /// Flow ids known per server and flow name.
    flows: Arc<FlowCache>,
    /// Bulk reads of the managed deployments, per server, for drift checks.
    snapshots: Snapshots,
    /// The ownership guard's reads by name, coalesced per server.
    lookups: Arc<Lookups>,
    /// The controllers' caches of resources, to see which others name the same global
    /// concurrency limit.
    stores: Mutex<Vec<Store<Cached>>>,
    /// Prefect's event streams: a change made in Prefect triggers a pass at once.
    events: Arc<EventStreams>,
    /// When this operator started.
    started: Instant,
    /// Credentials read from Secrets and ConfigMaps, kept for a while.
    pub credentials: server::CredentialCache,
    /// The caches (by their place in `stores`) whose recorded ids are registered.
    registered: tokio::sync::Mutex<Vec<usize>>,
    /// Resources found holding a deployment another resource wants (`holder_of`), and
    /// those others: woken once the holder is gone, not left to their backoff.
    blocked: Mutex<HashMap<ObjectRef<PrefectDeployment>, HashSet<ObjectRef<PrefectDeployment>>>>,
    /// The bound on Kubernetes writes in flight.
    kube_writes: crate::limit::KubeWrites,
}

impl Context {
    pub fn new(kube: kube::Client, default_resync: Duration) -> Self {
        let calls = Arc::new(CallLog::default());
        let metrics = Arc::new(Metrics::new(calls.durations.clone()));
        let http = crate::prefect::http_client();
        let flows: Arc<FlowCache> = Arc::default();
        Self {
            recorder: Recorder::new(kube.clone(), REPORTER),
            kube,
            events: Arc::new(
                EventStreams::new(metrics.clone())
                    .calling(http.clone(), calls.clone())
                    .confirming(flows.clone()),
            ),
            http,
            calls,
            default_resync,
            failures: Mutex::default(),
            synced: Mutex::default(),
            access: Access::default(),
            limits: Arc::new(
                Limits::new(DEFAULT_REQUEST_LIMIT)
                    .counting(metrics.request_limit_decreases.clone()),
            ),
            flows,
            snapshots: Snapshots::default(),
            lookups: Arc::default(),
            stores: Mutex::default(),
            metrics,
            started: Instant::now(),
            credentials: server::CredentialCache::default(),
            registered: tokio::sync::Mutex::default(),
            blocked: Mutex::default(),
            kube_writes: crate::limit::KubeWrites::default(),
        }
    }

    /// At most `n` Kubernetes writes (finalizers, status, Events) in flight together.
    pub fn with_kube_write_limit(mut self, n: Option<usize>) -> Self {
        self.kube_writes = crate::limit::KubeWrites::new(n);
        self
    }

    async fn kube_write<T>(&self, w: impl std::future::Future<Output = T>) -> T {
        self.kube_writes.run(w).await
    }

    /// Writes `new` as the status unless the object already has it (which takes no
    /// slot: a pass that changes nothing does not queue behind a burst of writes).
    async fn write_status(
        &self,
        api: &Api<PrefectDeployment>,
        obj: &PrefectDeployment,
        new: &crate::api::PrefectDeploymentStatus,
    ) -> Result<()> {
        if obj.status.as_ref() == Some(new) {
            return Ok(());
        }
        self.kube_write(status::write(api, obj, new)).await
    }

    /// At most `n` requests in flight per Prefect server (fewer while it is overloaded).
    pub fn with_request_limit(mut self, n: usize) -> Self {
        self.limits =
            Arc::new(Limits::new(n).counting(self.metrics.request_limit_decreases.clone()));
        self
    }

    /// Restricts the servers called and the Secrets read (default: no restriction).
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// The base URL `s` points at from namespace `ns`, if this operator may call it, and
    /// the credentials to call it with.
    async fn server(
        &self,
        s: &crate::api::ServerSpec,
        ns: &str,
    ) -> Result<(String, Option<crate::prefect::Auth>)> {
        let base = server::base_url(s, ns);
        if !self.access.server_allowed(&base) {
            return Err(Error::ServerNotAllowed(format!(
                "spec.server: {base} is not among the Prefect servers this operator may call (its --allowed-server list); no request was made"
            )));
        }
        let auth = server::credentials(&self.kube, ns, s, &self.access, &self.credentials);
        Ok((base, auth.await?))
    }

    /// A client of server `base`, and the turn a pass to a server that does not answer
    /// must hold.
    async fn client(
        &self,
        base: &str,
        auth: Option<crate::prefect::Auth>,
    ) -> Result<(PrefectClient, Option<crate::limit::Turn>)> {
        let limit = self.limits.for_server(base);
        let turn = self.limits.turn(&limit).await.map_err(|why| {
            Error::PrefectUnreachable(
                format!("{base}: {why}; passes to a server that does not answer take turns, and this one is retried later"),
                None,
            )
        })?;
        let client = PrefectClient::new(self.http.clone(), base, auth, self.calls.clone())
            .with_limit(limit)
            .with_flow_cache(self.flows.clone())
            .with_lookups(self.lookups.clone());
        Ok((client, turn))
    }

    /// Deletes what the resource left on servers spec.server named before, with the
    /// credentials of the current one. Such a server may be gone for good, so a failure
    /// does not fail the pass: it is noted for the Ready message and tried again on
    /// the next. A server that refuses the credentials, or that this operator may no
    /// longer call, is given up on with a Warning event.
    async fn delete_moved(
        &self,
        client: &PrefectClient,
        state: &mut SyncState,
        changes: &mut Vec<execute::Change>,
    ) {
        let others: Vec<_> = state
            .leftovers
            .iter()
            .filter(|l| l.server != client.base_url())
            .cloned()
            .collect();
        let mut notes = Vec::new();
        for l in others {
            let (id, server) = (l.deployment_id, l.server);
            // A limit another resource names there is theirs now.
            let limit = l
                .limit
                .filter(|lim| !self.limit_named_on(&server, &lim.name));
            let result = async {
                if !self.access.server_allowed(&server) {
                    return Err(Error::ServerNotAllowed(format!(
                        "{server} is not among the servers this operator may call"
                    )));
                }
                let (old, _turn) = self.client(&server, client.auth().cloned()).await?;
                execute::retire_deployment(&old, &id).await?;
                // After the deployment, which would otherwise lose its limit first.
                match &limit {
                    Some(lim) => old.delete_limit(&lim.id).await,
                    None => Ok(()),
                }
            }
            .await;
            let limit = limit.map(|lim| lim.name);
            match result {
                Ok(()) => {
                    state.gone(&id);
                    changes.push(execute::Change::LeftoverDeleted {
                        id,
                        server: Some(server),
                        limit,
                    });
                }
                Err(e @ (Error::PrefectUnauthorized(_) | Error::ServerNotAllowed(_))) => {
                    state.gone(&id);
                    let why = format!("spec.server no longer names that server, and {e}");
                    changes.push(execute::Change::LeftBehind {
                        id,
                        server,
                        limit,
                        why,
                    });
                }
                Err(e) => notes.push(format!("{id} on {server} ({e})")),
            }
        }
        state.leftover_note = (!notes.is_empty()).then(|| {
            format!(
                "the deployment(s) it replaced on the server spec.server named before are not deleted yet, tried again on the next pass: {}",
                notes.join("; ")
            )
        });
    }

    /// After a pass failed with `e`: credentials the server refused are dropped, so the
    /// next pass reads them anew (the Secret may have been fixed or rotated since).
    fn refused_credentials(&self, obj: &PrefectDeployment, e: &Error) {
        if matches!(e, Error::PrefectUnauthorized(_)) {
            let ns = obj.namespace().unwrap_or_default();
            self.credentials.forget(&ns, &obj.spec.server);
        }
    }

    /// Registers, once per cache, what every applied resource's status records with its
    /// server's snapshots. Called by a start's first drift checks before they read (the
    /// controller starts passes once its cache holds every resource), so the reads take
    /// full pages; registered only by their own passes, a few dozen at once, each read
    /// carried the few that came since the one before.
    async fn register_recorded(&self) {
        let mut done = self.registered.lock().await;
        let stores = self.stores.lock().expect("lock").clone();
        for (i, store) in stores.iter().enumerate() {
            if done.contains(&i) {
                continue;
            }
            // Empty before its first list is in (it arrives whole).
            let objects = store.state();
            if objects.is_empty() {
                continue;
            }
            done.push(i);
            // Decoding every status is CPU work: off the async workers.
            let recorded: Vec<(String, String, crate::cache::Recorded)> = off_the_workers(|| {
                objects
                    .iter()
                    .filter_map(|c| {
                        let ns = c.metadata.namespace.clone().unwrap_or_default();
                        let name = c.metadata.name.clone().unwrap_or_default();
                        Some((ns, name, c.recorded()?))
                    })
                    .collect()
            });
            // Credentials read as the passes read them (and kept for them), several at
            // once; a resource whose server is not allowed or whose Secret cannot be read
            // is left to its own pass.
            let registered = futures::stream::iter(recorded)
                .map(|(ns, name, r)| async move {
                    let Ok((base, auth)) = self.server(&r.server, &ns).await else {
                        return false;
                    };
                    let client =
                        PrefectClient::new(self.http.clone(), &base, auth, self.calls.clone());
                    let who = Trigger::new(&name).within(&ns);
                    self.snapshots
                        .register(&client, &r.deployment_id, who.clone());
                    self.snapshots
                        .register_automations(&client, &who, &r.automation_ids);
                    true
                })
                .buffer_unordered(16)
                .filter(|done| std::future::ready(*done))
                .count()
                .await;
            tracing::debug!(registered, "registered what applied resources record");
        }
    }

    /// Another resource this operator handles whose status records deployment `id` on
    /// `client`'s server: found through the ids the resources registered, so a pass
    /// does not look through every cached resource.
    fn holder_of(
        &self,
        client: &PrefectClient,
        id: &str,
        me: &PrefectDeployment,
    ) -> Option<crate::plan::Holder> {
        let mine = ObjectRef::from_obj(me);
        let claimants = self.snapshots.claimants(client, id);
        if claimants.iter().all(|w| *w == mine) {
            return None;
        }
        let stores = self.stores.lock().expect("lock").clone();
        for who in claimants.into_iter().filter(|w| *w != mine) {
            let key = retyped::<_, Cached>(&who);
            let Some(other) = stores.iter().find_map(|s| s.get(&key)) else {
                continue;
            };
            // One on its way out, or a resource deleted and made again under the same
            // name, holds nothing.
            if other.meta().deletion_timestamp.is_some() || other.uid() == me.uid() {
                continue;
            }
            let Ok(decoded) = other.decode() else {
                continue;
            };
            let records = decoded
                .status
                .as_ref()
                .and_then(|s| s.deployment_id.as_deref());
            if records != Some(id) {
                continue;
            }
            self.blocked
                .lock()
                .expect("lock")
                .entry(who.clone())
                .or_default()
                .insert(mine.clone());
            let automations = decoded.status.and_then(|s| s.automation_ids);
            return Some(crate::plan::Holder {
                automations: automations.unwrap_or_default(),
                ..crate::plan::Holder::new(other.meta(), &me.metadata)
            });
        }
        None
    }

    /// Checks the named global concurrency limit `valid` asks for against the other
    /// resources that name a limit of the same name on the same server: their declared
    /// settings must agree. Records in `state` whether any of them names the limit this
    /// resource created (then it is not deleted when this resource lets go of it).
    fn limit_peers(
        &self,
        obj: &PrefectDeployment,
        valid: Option<&crate::validate::ValidSpec>,
        state: &mut SyncState,
    ) -> Result<()> {
        let ns = obj.namespace().unwrap_or_default();
        let server = server::base_url(&obj.spec.server, &ns);
        let mine = valid.and_then(|v| {
            let g = v.spec.deployment.global_concurrency_limit.as_ref()?;
            Some(crate::desired::deployment_limit(g))
        });
        let created = state
            .limit
            .as_ref()
            .filter(|l| l.created)
            .map(|l| l.name.clone());
        state.limit_shared = false;
        if mine.is_none() && created.is_none() {
            return Ok(());
        }
        for other in self.limit_claims(obj.uid()) {
            let Some((other_server, g)) = other.limit() else {
                continue;
            };
            if other_server != server {
                continue;
            }
            let other_ns = other.namespace().unwrap_or_default();
            if created.as_deref() == Some(g.name.as_str()) {
                state.limit_shared = true;
            }
            let theirs = crate::desired::deployment_limit(g);
            if let Some(difference) = mine.as_ref().and_then(|m| m.conflict_with(&theirs)) {
                return Err(Error::ConcurrencyLimitConflict(format!(
                    "globalConcurrencyLimit {:?}: {difference} in {other_ns}/{}; resources naming one limit must declare the same settings (or leave them unset)",
                    theirs.name,
                    other.name_any()
                )));
            }
        }
        Ok(())
    }

    /// The resources this operator handles, other than `me`, that name a named limit.
    /// Resources on their way out no longer hold a claim.
    fn limit_claims(&self, me: Option<String>) -> Vec<Arc<Cached>> {
        let stores = self.stores.lock().expect("lock").clone();
        let claims = stores
            .iter()
            .flat_map(|s| s.state())
            .filter(|o| o.limit().is_some() && o.meta().deletion_timestamp.is_none())
            .filter(|o| me.is_none() || o.uid() != me)
            .collect();
        claims
    }

    /// Whether a resource this operator handles names limit `name` on server `server`.
    fn limit_named_on(&self, server: &str, name: &str) -> bool {
        self.limit_claims(None).iter().any(|o| {
            o.limit()
                .is_some_and(|(s, g)| s == server && g.name == name)
        })
    }

    fn resync(&self, asked: Option<Duration>) -> Duration {
        asked
            .unwrap_or(self.default_resync)
            .clamp(MIN_RESYNC, MAX_RESYNC)
    }

    /// One Event per change a pass or the finalizer made in Prefect.
    async fn report_changes(
        &self,
        obj: &PrefectDeployment,
        changes: &[execute::Change],
        action: &str,
    ) {
        for c in changes {
            let type_ = if c.is_warning() {
                EventType::Warning
            } else {
                EventType::Normal
            };
            self.event(obj, type_, c.reason(), c.message(), action)
                .await;
        }
    }

    async fn event(
        &self,
        obj: &PrefectDeployment,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let note = crate::prefect::truncate(&note, 1000);
        let ev = Event {
            type_,
            reason,
            note: &note,
            action,
        };
        let about = obj.object_ref(&());
        if let Err(e) = self.kube_write(self.recorder.publish(&ev, &about)).await {
            tracing::warn!(error = %e, "could not publish event");
        }
    }
}

pub(crate) fn build(api: Api<PrefectDeployment>, concurrency: u16) -> Controller<Cached> {
    build_with(api, concurrency, None)
}

/// The controller over the objects matching `labels` (a label selector), or all.
pub(crate) fn build_with(
    api: Api<PrefectDeployment>,
    concurrency: u16,
    labels: Option<&str>,
) -> Controller<Cached> {
    use kube::runtime::WatchStreamExt;
    let (reader, writer) = kube::runtime::reflector::store();
    // The cache keeps every watched object, slimmed and mostly as text (`cache`). The
    // first list is read in pages (500 objects each): a list from the apiserver's cache
    // (resourceVersion=0) would come as one answer, at 10,000 objects tens of MB held at
    // once.
    let mut config = watcher::Config::default();
    if let Some(l) = labels {
        config = config.labels(l);
    }
    let api: Api<Cached> = match api.namespace().map(str::to_string) {
        Some(ns) => Api::namespaced(api.into_client(), &ns),
        None => Api::all(api.into_client()),
    };
    let objects = kube::runtime::watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(objects, reader)
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .shutdown_on_signal()
}

/// The same object's reference as another type (the cache holds resources in a trimmed
/// form of their own type).
fn retyped<K, L>(r: &ObjectRef<K>) -> ObjectRef<L>
where
    K: kube::Resource<DynamicType = ()>,
    L: kube::Resource<DynamicType = ()>,
{
    let to = ObjectRef::new(&r.name);
    match &r.namespace {
        Some(ns) => to.within(ns),
        None => to,
    }
}

pub(crate) async fn drive(c: Controller<Cached>, ctx: Arc<Context>) {
    ctx.stores.lock().expect("lock").push(c.store());
    let c = c.reconcile_on(ctx.events.subscribe().map(|who| retyped(&who)));
    c.run(reconcile_cached, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile did not complete");
            }
        })
        .await;
}

/// The controller loop over `api`, with a caller-supplied context (tests use this).
pub async fn controller(api: Api<PrefectDeployment>, ctx: Arc<Context>, concurrency: u16) {
    drive(build(api, concurrency), ctx).await;
}

fn jitter(d: Duration) -> Duration {
    // +-10% so resources created together do not resync together forever.
    let f = 0.9 + fastrand::f64() * 0.2;
    d.mul_f64(f)
}

/// One pass over a cached object: decoded here, so only passes in flight hold whole
/// objects.
async fn reconcile_cached(obj: Arc<Cached>, ctx: Arc<Context>) -> Result<Action> {
    match obj.decode() {
        Ok(pd) => reconcile(Arc::new(pd), ctx).await,
        // The apiserver's schema admits only objects that decode (`tests/admission.rs`);
        // one that does not (stored under an older schema, say) fails alone.
        Err(e) => Err(Error::Internal(format!(
            "the cached copy of this resource does not decode ({e})"
        ))),
    }
}

#[tracing::instrument(skip_all, fields(namespace = obj.namespace().unwrap_or_default(), name = obj.name_any()))]
pub async fn reconcile(obj: Arc<PrefectDeployment>, ctx: Arc<Context>) -> Result<Action> {
    use futures::FutureExt;
    let started = Instant::now();
    let oref = ObjectRef::from_obj(&*obj);
    // A panic stays this resource's problem: reported on it, retried with backoff, and
    // never unwound into the controller that serves every other resource.
    let result = match std::panic::AssertUnwindSafe(reconcile_inner(&obj, &ctx))
        .catch_unwind()
        .await
    {
        Ok(r) => r,
        Err(panic) => Err(internal_error(&obj, &ctx, panic_text(&*panic)).await),
    };
    let labels = match &result {
        Ok(_) => ReconcileLabels {
            result: "ok",
            category: "",
        },
        Err(e) => ReconcileLabels {
            result: "error",
            category: e.category(),
        },
    };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            ctx.failures.lock().expect("lock").remove(&oref);
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "reconciled"
            );
        }
        Err(e) => tracing::warn!(category = e.category(), error = %e.chain(), "reconcile failed"),
    }
    result
}

/// Runs bounded but CPU-heavy work (parameter checks against a schema may take up to
/// a second) without holding an async worker: other reconciles and the leader lease
/// move to other workers meanwhile. Inline on a current-thread runtime (tests).
fn off_the_workers<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// The message of a caught panic, kept short.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into());
    crate::prefect::truncate(&text, 200)
}

/// Reports a caught panic on the object (Ready=False, reason InternalError, an Event)
/// and returns the error the retry policy sees.
async fn internal_error(obj: &PrefectDeployment, ctx: &Context, text: String) -> Error {
    tracing::error!(error = %text, "reconcile panicked; only this resource is affected");
    let err = Error::Internal(format!(
        "the operator failed on this resource ({text}); retrying with backoff"
    ));
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<PrefectDeployment> = Api::namespaced(ctx.kube.clone(), &ns);
    let state = status::state_of(obj.status.as_ref());
    if let Err(e) = report_failure(obj, ctx, &api, &state, &err).await {
        tracing::warn!(error = %e, "could not report the internal error");
    }
    err
}

fn error_policy(obj: Arc<Cached>, err: &Error, ctx: Arc<Context>) -> Action {
    if err.needs_spec_change() {
        // Retrying cannot help; the next generation of the spec wakes us.
        return Action::await_change();
    }
    let oref = retyped(&ObjectRef::from_obj(&*obj));
    let mut failures = ctx.failures.lock().expect("lock");
    let n = failures.entry(oref).or_insert(0);
    *n = n.saturating_add(1);
    let delay = Duration::from_secs(2)
        .saturating_mul(2u32.saturating_pow((*n - 1).min(10)))
        .min(MAX_BACKOFF);
    Action::requeue(jitter(delay))
}

async fn reconcile_inner(obj: &PrefectDeployment, ctx: &Context) -> Result<Action> {
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<PrefectDeployment> = Api::namespaced(ctx.kube.clone(), &ns);
    let oref = ObjectRef::from_obj(obj);

    if obj.meta().deletion_timestamp.is_some() {
        ctx.synced.lock().expect("lock").remove(&oref);
        ctx.events.forget(&oref);
        ctx.snapshots.forget_resource(&oref);
        let done = finalizer::finalize(obj, ctx, &api).await?;
        let waiting = ctx.blocked.lock().expect("lock").remove(&oref);
        for who in waiting.into_iter().flatten() {
            ctx.events.notify(who);
        }
        return Ok(done);
    }
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        ctx.kube_write(finalizer::add_finalizer(obj, &api)).await?;
    }

    let generation = obj.meta().generation;
    let uid = obj.uid().unwrap_or_default();
    let old = obj.status.as_ref();

    let valid = match off_the_workers(|| validate(&obj.spec, &obj.name_any())) {
        Ok(v) => v,
        Err(problem) => {
            let state = status::state_of(old);
            let err = Error::InvalidSpec(problem.to_string());
            report_failure(obj, ctx, &api, &state, &err).await?;
            return Err(err);
        }
    };
    let name = valid.name.clone();
    let resync = ctx.resync(valid.resync);

    // Our own finalizer and status writes come back as watch events for the same
    // generation, possibly before the cache shows the new status. The spec is unchanged
    // since the last successful pass, so there is nothing to do until the resync is due.
    let requests = Requests::of(obj);
    let last = ctx.synced.lock().expect("lock").get(&oref).cloned();
    // The first pass over this object since the operator started (or since a failure).
    let first_here = last.is_none();
    let automations_known = last.as_ref().and_then(|l| l.automations_known);
    // A pass triggered before the cache shows the status the last pass wrote (an event
    // from Prefect about that pass's own writes, say) waits for it; only someone else
    // writing the status keeps it different, and then it stops waiting.
    if let Some(l) = &last {
        if l.status != status_digest(old) && l.written.elapsed() < CACHE_CATCH_UP {
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
    }
    // When the next-run preview of this generation was last written.
    let previewed = last.as_ref().map(|l| (l.generation, l.at));
    // A new action annotation (reconcile now, run now) makes a full pass due now.
    let last = last.filter(|l| l.requests == requests);
    // Prefect reported a change to the deployment: look now, and at Prefect itself.
    let changed_in_prefect = ctx.events.take_changed(&oref);
    // The stream this resource relied on was found deaf: check now, not when due.
    let recheck = ctx.events.take_recheck(&oref);
    let last = last.filter(|_| !changed_in_prefect && recheck.is_none());
    if let (
        Some(g),
        Some(Synced {
            generation: synced_gen,
            due,
            at,
            ..
        }),
    ) = (generation, last)
    {
        let now = Instant::now();
        // A next run shown in status that has passed makes a full pass due, which
        // rewrites the preview from fresh data (a partial status write here could
        // resurrect stale conditions from the cache); at most one such rewrite per
        // PREVIEW_REFRESH, whatever the schedule.
        let shown = preview_wait(old.and_then(|s| s.next_run.as_deref()))
            .map(|w| w.max(PREVIEW_REFRESH.saturating_sub(now - at)));
        if synced_gen == g && now < due && shown != Some(Duration::ZERO) {
            let wait = shown.map_or(due - now, |w| w.min(due - now));
            return Ok(Action::requeue(wait));
        }
    }

    let mut state = status::state_of(old);
    // Whether this generation was applied before: then this pass is a drift check.
    state.spec_applied = status::applied(old, generation);
    let mut changes = Vec::new();
    let mut last_run = old.and_then(|s| s.last_run.clone());
    // The stream's stretch as this pass began: what it reads of the automations is
    // known under it.
    let mut coverage = None;
    let outcome = async {
        ctx.limit_peers(obj, Some(&valid), &mut state)?;
        let (client, _turn) = prefect_client(obj, ctx, &ns).await?;
        if state.move_to(client.base_url()) {
            // What the old server's bulk reads and stream followed for this resource.
            ctx.snapshots.forget_resource(&oref);
            ctx.events.forget(&oref);
        }
        // A drift check (nothing new asked) plans against the server's bulk snapshot.
        let recorded = state.deployment_id.clone();
        let checking = state.spec_applied
            && !changed_in_prefect
            && requests.reconcile == old.and_then(|s| s.last_handled_reconcile_at.clone());
        // Automations' changes come from the event stream. Where it cannot have told
        // us (no stream up, one that dropped since they were last known, or the
        // operator was not running), a drift check checks the resource's own, from the
        // bulk snapshot. A server that cannot read automations in bulk is not asked on
        // the first pass after a start, so a restart re-checks at the speed of the
        // deployments' bulk read and those direct reads spread over the next interval.
        let in_bulk = ctx.snapshots.automations_in_bulk(&client);
        let now_on = ctx.events.coverage(client.base_url());
        coverage = Some(now_on);
        let covered =
            automations_known.is_some_and(|known| ctx.events.covers(client.base_url(), known));
        state.check_automations =
            changed_in_prefect || (checking && (!first_here || in_bulk) && !covered);
        // After a drop, a snapshot read before the new stretch began may miss what
        // changed while no stream listened.
        let automations_age = match (automations_known, now_on.since) {
            (Some(known), Some(since)) if known.stretch != now_on.stretch => {
                resync.min(since.elapsed())
            }
            _ => resync,
        };
        // After a deaf stream, only reads made since it was found deaf show what it
        // missed.
        let fresh = |age: Duration| recheck.map_or(age, |at| age.min(at.elapsed()));
        let automations_age = fresh(automations_age);
        let tell = |changed: Vec<Trigger>| {
            for who in changed {
                ctx.events.notify(who);
            }
        };
        // What status records is registered before the reads, so that after a restart
        // the first checks read together, a page at a time, while one read is out (the
        // automations too: they are read after the deployments).
        let automations_in_bulk = state.check_automations && in_bulk;
        let deployment = match (&recorded, checking) {
            (Some(id), true) => {
                if first_here {
                    ctx.register_recorded().await;
                }
                ctx.snapshots.register(&client, id, oref.clone());
                if automations_in_bulk {
                    let ids = &state.automation_ids;
                    ctx.snapshots.register_automations(&client, &oref, ids);
                }
                match ctx.snapshots.lookup(&client, id, fresh(resync), tell).await {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::debug!(error = %e, "bulk read failed; reading directly");
                        None
                    }
                }
            }
            _ => None,
        };
        let automations = match &deployment {
            Some(_) if automations_in_bulk => {
                let ids = &state.automation_ids;
                let found = ctx
                    .snapshots
                    .lookup_automations(&client, ids, automations_age, tell);
                found.await.unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "bulk read of automations failed");
                    None
                })
            }
            _ => None,
        };
        let snapshot = deployment.map(|deployment| execute::Snapshot {
            deployment,
            automations,
        });
        let holder_of = |id: &str| ctx.holder_of(&client, id, obj);
        execute::apply_from(
            &client,
            &valid,
            &uid,
            &mut state,
            &mut changes,
            snapshot,
            &holder_of,
        )
        .await?;
        ctx.delete_moved(&client, &mut state, &mut changes).await;
        if let Some(id) = &state.deployment_id {
            ctx.snapshots.register(&client, id, oref.clone());
            ctx.snapshots
                .register_automations(&client, &oref, &state.automation_ids);
            // Known from this pass (kept for ten minutes): no request.
            let caps = client.capabilities().await?;
            ctx.events.watch(
                client.base_url(),
                &caps,
                client.auth().cloned(),
                id,
                &state.automation_ids,
                oref.clone(),
                resync,
            );
        }
        if let Some(old_id) = recorded.filter(|o| Some(o) != state.deployment_id.as_ref()) {
            ctx.snapshots.forget(&client, &old_id, &oref);
        }
        run_if_requested(obj, &client, &state, &mut last_run, &mut changes).await?;
        Ok::<_, Error>(client.base_url().to_string())
    }
    .await;

    execute::report_dropped(&mut state, &mut changes);
    ctx.report_changes(obj, &changes, "Sync").await;
    match outcome {
        Ok(base) => {
            let mut message = format!("Deployment {name} is applied in Prefect at {base}");
            if let Some(note) = &state.leftover_note {
                message.push_str(&format!("; {note}"));
                let shown = old
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == status::READY))
                    .is_some_and(|c| c.message == message);
                if !shown {
                    ctx.event(
                        obj,
                        EventType::Warning,
                        "CleanupPending",
                        note.clone(),
                        "Sync",
                    )
                    .await;
                }
            }
            if let Some(lost) = &state.unsupported {
                message.push_str(&format!("; {lost}"));
                // Once per change of the spec, not on every drift check.
                if !state.spec_applied {
                    let note = format!("{lost}; those settings are left out");
                    ctx.event(obj, EventType::Warning, "UnsupportedByServer", note, "Sync")
                        .await;
                }
            }
            let mut conds = status::conditions(
                old,
                status::Outcome::Ready { message: &message },
                generation,
            );
            if obj.spec.drift_policy == Some(DriftPolicy::Report) {
                let drifted = status::drifted(old, &state.drift, generation);
                let before =
                    old.and_then(|s| s.conditions.iter().find(|c| c.type_ == status::DRIFTED));
                if drifted.status == "True" && before.is_none_or(|b| b.message != drifted.message) {
                    ctx.event(
                        obj,
                        EventType::Warning,
                        "DriftDetected",
                        drifted.message.clone(),
                        "Sync",
                    )
                    .await;
                }
                ctx.metrics.set_drifted(&uid, drifted.status == "True");
                conds.push(drifted);
            } else {
                ctx.metrics.set_drifted(&uid, false);
            }
            // A preview of this generation written less than PREVIEW_REFRESH ago stays
            // when this pass changed nothing in Prefect: refreshing it only because
            // time moved on is a status write per resource per resync.
            // A restarted operator does not know when the preview it finds in an applied
            // status was written: it counts it as written at start, so a restart
            // rewrites no preview sooner than a running operator would.
            let previewed = previewed.or_else(|| {
                generation
                    .filter(|_| state.spec_applied)
                    .map(|g| (g, ctx.started))
            });
            let recent = previewed.filter(|(g, at)| {
                Some(*g) == generation && at.elapsed() < PREVIEW_REFRESH && changes.is_empty()
            });
            let (preview, previewed_at) = match recent {
                Some((_, at)) if old.is_some_and(|s| s.observed_generation == generation) => {
                    (status::kept_preview(old), at)
                }
                _ => (
                    preview_of(obj, &valid.schedules, &state.schedules_seen).await?,
                    Instant::now(),
                ),
            };
            let refresh = preview_wait(preview.1.as_deref())
                .map(|w| w.max(PREVIEW_REFRESH.saturating_sub(previewed_at.elapsed())));
            let mut new = status::build(&state, conds, generation, preview);
            new.last_handled_reconcile_at = requests.reconcile.clone();
            new.last_run = last_run;
            ctx.write_status(&api, obj, &new).await?;
            ctx.metrics.set_ready(&uid, Some("True"));
            let next = jitter(resync);
            if let Some(g) = generation {
                let synced = Synced {
                    generation: g,
                    due: Instant::now() + next,
                    at: previewed_at,
                    requests,
                    status: status_digest(Some(&new)),
                    written: Instant::now(),
                    // Made or read by this pass: known to be as the triggers say.
                    automations_known: if state.check_automations
                        || changes.iter().any(|c| {
                            matches!(
                                c,
                                execute::Change::Created { .. }
                                    | execute::Change::AutomationsReplaced { .. }
                                    | execute::Change::AutomationsRestored { .. }
                            )
                        }) {
                        coverage
                    } else {
                        automations_known
                    },
                };
                ctx.synced.lock().expect("lock").insert(oref, synced);
            }
            Ok(Action::requeue(refresh.map_or(next, |r| r.min(next))))
        }
        Err(e) => {
            ctx.synced.lock().expect("lock").remove(&oref);
            ctx.refused_credentials(obj, &e);
            report_failure(obj, ctx, &api, &state, &e).await?;
            Err(e)
        }
    }
}

/// The next-run preview for status, from the validated schedules and the schedules
/// Prefect reported. Computed on a blocking thread: it is budgeted, but still CPU work
/// that must not hold up other reconciles or the leader lease on the async workers.
async fn preview_of(
    obj: &PrefectDeployment,
    schedules: &[ValidSchedule],
    seen: &[crate::observed::ObservedSchedule],
) -> Result<status::Preview> {
    if schedules.is_empty() {
        return Ok((None, None));
    }
    let schedules = schedules.to_vec();
    let seen = seen.to_vec();
    let previous = obj
        .status
        .as_ref()
        .and_then(|s| s.schedules.clone())
        .unwrap_or_default();
    let paused = obj.spec.deployment.paused.unwrap_or(false);
    let (list, next) = tokio::task::spawn_blocking(move || {
        crate::preview::schedules_preview(&schedules, paused, &seen, &previous, chrono::Utc::now())
    })
    .await
    .map_err(|e| match e.try_into_panic() {
        Ok(panic) => Error::Internal(format!("next-run preview failed: {}", panic_text(&*panic))),
        Err(e) => Error::Internal(format!("next-run preview did not finish: {e}")),
    })?;
    Ok((Some(list), next))
}

/// How long until the next run shown in status passes (zero once it has); `None` when
/// nothing is shown.
fn preview_wait(next_run: Option<&str>) -> Option<Duration> {
    let t = chrono::DateTime::parse_from_rfc3339(next_run?).ok()?;
    let left = t.with_timezone(&chrono::Utc) - chrono::Utc::now();
    // One second past the run, so the recomputed preview no longer contains it.
    Some(
        (left + chrono::Duration::seconds(1))
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// Makes the one flow run a new `prefect.io/run-requested-at` token asks for, once the
/// deployment is applied. The idempotency key (resource uid + token) makes Prefect
/// return the same run when a pass is repeated before status recorded it.
async fn run_if_requested(
    obj: &PrefectDeployment,
    client: &PrefectClient,
    state: &SyncState,
    last_run: &mut Option<LastRun>,
    changes: &mut Vec<execute::Change>,
) -> Result<()> {
    let Some(token) = Requests::of(obj).run else {
        return Ok(());
    };
    // Compared as recorded: a long token is kept shortened, and must still match.
    let token = crate::prefect::truncate(&token, 256);
    if last_run.as_ref().is_some_and(|r| r.token == token) {
        return Ok(());
    }
    let Some(id) = &state.deployment_id else {
        return Ok(());
    };
    // Empty, like an empty request, means none: no overrides.
    let text = obj
        .annotations()
        .get(RUN_PARAMETERS)
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .unwrap_or("{}");
    let field = format!("metadata.annotations[{RUN_PARAMETERS}]");
    let parameters = match off_the_workers(|| {
        crate::validate::run_parameters(&obj.spec.deployment, text, &field)
    }) {
        Ok(p) => p,
        Err(problem) => {
            changes.push(execute::Change::RunRejected {
                token: token.clone(),
                problem: problem.to_string(),
            });
            *last_run = Some(LastRun {
                token,
                error: Some(crate::prefect::truncate(&problem.to_string(), 512)),
                ..LastRun::default()
            });
            return Ok(());
        }
    };
    let key = format!("prefect-operator:{}:{token}", obj.uid().unwrap_or_default());
    let run_id = match client.create_flow_run(id, &parameters, &key).await {
        Ok(run_id) => run_id,
        // Refused by Prefect: the request is answered (recorded, an Event) rather than
        // the deployment marked as failing. Transient errors are retried.
        Err(e) if e.kind().stalls => {
            changes.push(execute::Change::RunRejected {
                token: token.clone(),
                problem: e.to_string(),
            });
            *last_run = Some(LastRun {
                token,
                error: Some(crate::prefect::truncate(&e.to_string(), 512)),
                ..LastRun::default()
            });
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    changes.push(execute::Change::RunCreated {
        token: token.clone(),
        flow_run_id: run_id.clone(),
    });
    *last_run = Some(LastRun {
        token,
        flow_run_id: Some(run_id),
        created_at: Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        error: None,
    });
    Ok(())
}

/// The client for the resource's server, and the pass's turn where that server is in
/// doubt (see `Limits::turn`); the turn is held until the pass ends.
async fn prefect_client(
    obj: &PrefectDeployment,
    ctx: &Context,
    ns: &str,
) -> Result<(PrefectClient, Option<crate::limit::Turn>)> {
    let (base, auth) = ctx.server(&obj.spec.server, ns).await?;
    ctx.client(&base, auth).await
}

/// Ready=False with the error's reason; a Warning event when the reason or message is
/// new (a repeated failure does not repeat the event).
async fn report_failure(
    obj: &PrefectDeployment,
    ctx: &Context,
    api: &Api<PrefectDeployment>,
    state: &SyncState,
    e: &Error,
) -> Result<()> {
    let failure = Failure {
        reason: e.reason(),
        message: e.to_string(),
        stalled: e.kind().stalls,
    };
    report_not_ready(obj, ctx, api, state, failure, "Sync").await
}

/// A failed pass as the resource reports it.
pub(super) struct Failure {
    pub reason: &'static str,
    pub message: String,
    /// Only a person can move it on (kstatus `Stalled`), rather than a retry.
    pub stalled: bool,
}

async fn report_not_ready(
    obj: &PrefectDeployment,
    ctx: &Context,
    api: &Api<PrefectDeployment>,
    state: &SyncState,
    failure: Failure,
    action: &str,
) -> Result<()> {
    let generation = obj.meta().generation;
    let old = obj.status.as_ref();
    let (reason, message) = (failure.reason, failure.message.as_str());
    let outcome = if failure.stalled {
        status::Outcome::Stalled { reason, message }
    } else {
        status::Outcome::Retrying { reason, message }
    };
    let mut conds = status::conditions(old, outcome, generation);
    // A failed pass learns nothing about drift: what the last one found stays shown.
    if let Some(d) = old.and_then(|s| s.conditions.iter().find(|c| c.type_ == status::DRIFTED)) {
        conds.push(d.clone());
    }
    let cond = &conds[0];
    let previous = old.and_then(|s| s.conditions.iter().find(|c| c.type_ == status::READY));
    let is_new = previous.is_none_or(|p| p.reason != cond.reason || p.message != cond.message);
    if is_new {
        ctx.event(
            obj,
            EventType::Warning,
            reason,
            failure.message.clone(),
            action,
        )
        .await;
    }
    ctx.metrics
        .set_ready(&obj.uid().unwrap_or_default(), Some("False"));
    let preview = status::kept_preview(old);
    let mut new = status::build(state, conds, generation, preview);
    // A failed pass also answers a reconcile request; a run is only ever recorded by
    // the pass that made it.
    new.last_handled_reconcile_at = Requests::of(obj).reconcile;
    new.last_run = old.and_then(|s| s.last_run.clone());
    ctx.write_status(api, obj, &new).await?;
    Ok(())
}
