//! Process wiring for `prefect-operator run`: the admin endpoints, the start-up checks,
//! leader election, one controller per watched namespace, and readiness. The
//! per-object logic is in `reconcile`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kube::Api;

use crate::access::Access;
use crate::admin::Health;
use crate::api::PrefectDeployment;
use crate::leader::{Elector, LeaseConfig};
use crate::reconcile::{self, Context};

/// Options for `run`.
pub struct RunOptions {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Resources reconciled in parallel.
    pub concurrency: u16,
    /// Requests in flight per Prefect server, at most.
    pub max_requests_per_server: u16,
    /// Kubernetes writes in flight at most; `None`: no limit.
    pub max_kube_writes: Option<u16>,
    pub default_resync: Duration,
    /// Where to serve /livez, /readyz and /metrics.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Set to run only while holding this lease.
    pub leader_election: Option<LeaseConfig>,
    /// Which servers may be called and which Secrets read.
    pub access: Access,
    /// Handle only resources of this shard (see `SHARD_LABEL`); `None`: the unlabelled.
    pub shard: Option<String>,
}

/// Flux's sharding label: an operator started with `--shard KEY` handles the resources
/// labelled with KEY, the one without `--shard` those without the label.
pub const SHARD_LABEL: &str = "sharding.fluxcd.io/key";

/// The label selector of a shard.
pub fn shard_selector(shard: Option<&str>) -> String {
    match shard {
        Some(key) => format!("{SHARD_LABEL}={key}"),
        None => format!("!{SHARD_LABEL}"),
    }
}

/// Runs the operator until SIGTERM/SIGINT. An error is a message for the person
/// starting it (missing CRD, missing permissions) or says why it had to stop (the
/// leader lease was lost); `main` decides what the process does with it.
pub async fn run(kube: kube::Client, opts: RunOptions) -> Result<(), String> {
    if opts.access.allowed_servers.is_empty() {
        tracing::warn!("every Prefect server is allowed: anyone who may create a PrefectDeployment can make this operator call any URL; set --allowed-server to limit it");
    }
    let ctx = Arc::new(
        Context::new(kube.clone(), opts.default_resync)
            .with_access(opts.access)
            .with_request_limit(usize::from(opts.max_requests_per_server))
            .with_kube_write_limit(opts.max_kube_writes.map(usize::from)),
    );
    let metrics = ctx.metrics.clone();
    let health = Arc::new(Health::default());
    if let Some(addr) = opts.admin_addr {
        let bound = crate::admin::serve(addr, health.clone(), metrics.clone())
            .await
            .map_err(|e| format!("cannot serve the admin endpoints on {addr}: {e}"))?;
        tracing::info!(%bound, "serving /livez, /readyz and /metrics");
    }
    let apis: Vec<Api<PrefectDeployment>> = if opts.namespaces.is_empty() {
        vec![Api::all(kube.clone())]
    } else {
        opts.namespaces
            .iter()
            .map(|ns| Api::namespaced(kube.clone(), ns))
            .collect()
    };
    for api in &apis {
        preflight(api).await?;
    }
    let selector = shard_selector(opts.shard.as_deref());
    tracing::info!(%selector, "handling the PrefectDeployments of this shard");

    let mut elector = None;
    if let Some(cfg) = opts.leader_election {
        // A standby is healthy and ready; it just does not reconcile.
        health.ready.store(true, Ordering::Relaxed);
        tracing::info!(lease = %cfg.name, namespace = %cfg.namespace, identity = %cfg.identity, "waiting to become leader");
        let mut e = Elector::new(kube.clone(), cfg);
        e.acquire().await;
        tracing::info!("became leader");
        elector = Some(e);
    }
    metrics.leader.set(1);

    // Ready once every watch (one per namespace) has listed.
    let unsynced = Arc::new(AtomicUsize::new(apis.len()));
    let controllers = apis.into_iter().map(|api| {
        let c = reconcile::build_with(api, opts.concurrency, Some(&selector));
        let store = c.store();
        let (health, unsynced) = (health.clone(), unsynced.clone());
        tokio::spawn(async move {
            // The store's readiness signal wakes only its most recent waiter, and the
            // controller itself waits on it too: poll again every half second rather
            // than wait once and never be woken.
            loop {
                let wait =
                    tokio::time::timeout(Duration::from_millis(500), store.wait_until_ready());
                match wait.await {
                    Ok(Ok(())) => {
                        if unsynced.fetch_sub(1, Ordering::AcqRel) == 1 {
                            tracing::info!("first watch list synced; ready");
                            health.ready.store(true, Ordering::Relaxed);
                        }
                        break;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "watch ended before its first list");
                        break;
                    }
                    Err(_) => continue,
                }
            }
        });
        reconcile::drive(c, ctx.clone())
    });
    let all = futures::future::join_all(controllers);
    match &mut elector {
        Some(e) => {
            tokio::select! {
                _ = all => {}
                _ = e.keep() => {
                    // Another replica may already be acting: stop at once. Returning
                    // drops the controllers, and with them every pass in flight.
                    metrics.leader.set(0);
                    return Err("lost the leader lease; stopping so that the new leader acts alone".into());
                }
            }
            e.release().await;
        }
        None => {
            all.await;
        }
    }
    metrics.leader.set(0);
    Ok(())
}

/// Checks the CRD is installed and may be listed, with a message saying what to do.
async fn preflight(api: &Api<PrefectDeployment>) -> Result<(), String> {
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(
            "the PrefectDeployment CRD (prefectdeployments.prefect.io) is not installed. Install it with: kubectl apply --validate=false -f crds/prefectdeployments.prefect.io.yaml (or: prefect-operator crd | kubectl apply --validate=false -f -)".into(),
        ),
        Err(kube::Error::Api(s)) if s.code == 403 => Err(format!(
            "not allowed to list PrefectDeployments ({}). Grant the operator's ServiceAccount the RBAC rules of the Helm chart",
            s.message
        )),
        Err(e) => Err(format!("cannot list PrefectDeployments: {e}")),
    }
}
