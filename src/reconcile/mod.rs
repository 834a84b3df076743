//! The per-object controller: for each PrefectDeployment, validate, resolve the server,
//! observe, plan and perform (`execute`), record status; on deletion, clean up behind
//! the finalizer (`finalizer`).

pub mod execute;
mod finalizer;
pub mod server;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};

use crate::api::{PrefectDeployment, FINALIZER};
use crate::metrics::{Metrics, ReconcileLabels};
use crate::prefect::{CallLog, PrefectClient};
use crate::validate::{validate, ValidSchedule};
use crate::{Error, Result};

use execute::SyncState;

/// Shortest drift-check interval a resource may ask for.
const MIN_RESYNC: Duration = Duration::from_secs(10);
/// Longest: a drift check at least daily, whatever the spec says.
const MAX_RESYNC: Duration = Duration::from_secs(24 * 3600);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
const REPORTER: &str = "prefect-operator";

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
    synced: Mutex<HashMap<ObjectRef<PrefectDeployment>, (i64, Instant)>>,
}

impl Context {
    pub fn new(kube: kube::Client, default_resync: Duration) -> Self {
        let calls = Arc::new(CallLog::default());
        let metrics = Arc::new(Metrics::new(calls.durations.clone()));
        Self {
            recorder: Recorder::new(kube.clone(), Reporter::from(REPORTER)),
            kube,
            http: crate::prefect::http_client(),
            calls,
            metrics,
            default_resync,
            failures: Mutex::default(),
            synced: Mutex::default(),
        }
    }

    fn resync(&self, asked: Option<Duration>) -> Duration {
        asked
            .unwrap_or(self.default_resync)
            .clamp(MIN_RESYNC, MAX_RESYNC)
    }

    async fn event(
        &self,
        obj: &PrefectDeployment,
        type_: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(crate::prefect::truncate(&note, 1000)),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, "could not publish event");
        }
    }
}

pub(crate) fn build(
    api: Api<PrefectDeployment>,
    concurrency: u16,
) -> Controller<PrefectDeployment> {
    use kube::runtime::WatchStreamExt;
    let (reader, writer) = kube::runtime::reflector::store();
    // The cache keeps every watched object; managedFields and kubectl's last-applied
    // copy of the manifest are the bulk of one and nothing here reads them.
    let objects = kube::runtime::watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|pd: &mut PrefectDeployment| {
            pd.metadata.managed_fields = None;
            if let Some(a) = pd.metadata.annotations.as_mut() {
                a.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
        })
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(objects, reader)
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .shutdown_on_signal()
}

pub(crate) async fn drive(c: Controller<PrefectDeployment>, ctx: Arc<Context>) {
    c.run(reconcile, error_policy, ctx)
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

pub fn error_policy(obj: Arc<PrefectDeployment>, err: &Error, ctx: Arc<Context>) -> Action {
    if err.needs_spec_change() {
        // Retrying cannot help; the next generation of the spec wakes us.
        return Action::await_change();
    }
    let oref = ObjectRef::from_obj(&*obj);
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
        return finalizer::finalize(obj, ctx, &api).await;
    }
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        finalizer::add_finalizer(obj, &api).await?;
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
    let last = ctx.synced.lock().expect("lock").get(&oref).copied();
    if let (Some(g), Some((synced_gen, due))) = (generation, last) {
        let now = Instant::now();
        // A next run shown in status that has passed makes a full pass due now, which
        // rewrites the preview from fresh data (a partial status write here could
        // resurrect stale conditions from the cache).
        let shown = preview_wait(old.and_then(|s| s.next_run.as_deref()));
        if synced_gen == g && now < due && shown != Some(Duration::ZERO) {
            let wait = shown.map_or(due - now, |w| w.min(due - now));
            return Ok(Action::requeue(wait));
        }
    }

    let mut state = status::state_of(old);
    let mut changes = Vec::new();
    let outcome = async {
        let client = prefect_client(obj, ctx, &ns).await?;
        execute::apply(&client, &valid, &uid, &mut state, &mut changes).await?;
        Ok::<_, Error>(client.base_url().to_string())
    }
    .await;

    for c in &changes {
        ctx.event(obj, EventType::Normal, c.reason(), c.message(), "Sync")
            .await;
    }
    match outcome {
        Ok(base) => {
            let message = format!("Deployment {name} is applied in Prefect at {base}");
            let conds = status::conditions(
                old,
                status::Outcome::Ready { message: &message },
                generation,
            );
            let preview = preview_of(obj, &valid.schedules, &state.schedules_seen).await?;
            let refresh = preview_wait(preview.1.as_deref());
            status::write(
                &api,
                obj,
                &status::build(&state, conds, generation, preview),
            )
            .await?;
            ctx.metrics.set_ready(&uid, Some("True"));
            let next = jitter(resync);
            if let Some(g) = generation {
                ctx.synced
                    .lock()
                    .expect("lock")
                    .insert(oref, (g, Instant::now() + next));
            }
            Ok(Action::requeue(refresh.map_or(next, |r| r.min(next))))
        }
        Err(e) => {
            ctx.synced.lock().expect("lock").remove(&oref);
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

async fn prefect_client(obj: &PrefectDeployment, ctx: &Context, ns: &str) -> Result<PrefectClient> {
    let base = server::base_url(&obj.spec.server, ns);
    let auth = server::credentials(&ctx.kube, ns, &obj.spec.server).await?;
    Ok(PrefectClient::new(
        ctx.http.clone(),
        &base,
        auth,
        ctx.calls.clone(),
    ))
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
    let conds = status::conditions(old, outcome, generation);
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
    status::write(api, obj, &status::build(state, conds, generation, preview)).await?;
    Ok(())
}
