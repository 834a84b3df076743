//! The finalizer that lets the operator remove from Prefect what it created before
//! Kubernetes forgets the resource.
//!
//! Contract:
//! - The finalizer is added before the first write to Prefect, so nothing the operator
//!   creates can outlive its resource unnoticed.
//! - On deletion, with `deletionPolicy: Delete` (the default), the deployment and its
//!   automations are deleted; a deployment already gone counts as deleted. Without a
//!   recorded id, only a deployment carrying this resource's owner label is deleted.
//!   Deployments the resource replaced and has not deleted yet (`pendingDeletions`,
//!   on this server or on one spec.server named before) go too. With `Orphan`,
//!   Prefect is left as it is. A server outside `--allowed-server` is not called: the
//!   finalizer goes with a Warning event.
//! - The finalizer is removed only after that succeeded. A failure leaves it in place,
//!   says so on the resource (`Ready=False`, reason `CleanupFailed`, an Event) and is
//!   retried with backoff; removing the finalizer by hand is the way out when the
//!   Prefect server is gone for good.
//! - Every step may be repeated: edits carry the resourceVersion they were computed
//!   from, and deletes treat "already gone" as done.
//!
//! kube-runtime's `finalizer` helper gives the same guarantees, but it wraps every
//! error in its own type (the retry policy, metrics and conditions work on `Error`),
//! and it ends the pass after adding the finalizer, which costs each new resource a
//! second pass before its first apply.

use super::events::EventType;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{execute, prefect_client, report_not_ready, status, Context, Failure};
use crate::api::{reason, DeletionPolicy, PrefectDeployment, FINALIZER};
use crate::Result;

/// Finalizer edits are merge patches carrying the resourceVersion they were computed
/// from, so a concurrent change to the list makes the patch fail (and retry) instead of
/// being overwritten.
async fn set_finalizers(
    obj: &PrefectDeployment,
    api: &Api<PrefectDeployment>,
    list: Vec<String>,
) -> Result<()> {
    let patch =
        json!({"metadata": {"resourceVersion": obj.resource_version(), "finalizers": list}});
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Already gone: the object was deleted once the last finalizer went.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn add_finalizer(
    obj: &PrefectDeployment,
    api: &Api<PrefectDeployment>,
) -> Result<()> {
    let mut list = obj.finalizers().to_vec();
    list.push(FINALIZER.to_string());
    set_finalizers(obj, api, list).await
}

async fn remove_finalizer(obj: &PrefectDeployment, api: &Api<PrefectDeployment>) -> Result<()> {
    let list = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    set_finalizers(obj, api, list).await
}

pub(super) async fn finalize(
    obj: &PrefectDeployment,
    ctx: &Context,
    api: &Api<PrefectDeployment>,
) -> Result<Action> {
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let ns = obj.namespace().unwrap_or_default();
    if obj.deletion_policy() == DeletionPolicy::Delete {
        let mut state = status::state_of(obj.status.as_ref());
        let result = async {
            ctx.limit_peers(obj, None, &mut state)?;
            let (client, _turn) = prefect_client(obj, ctx, &ns).await?;
            // A deployment recorded on the server spec.server named before is deleted
            // there, like the ones replaced earlier and not deleted yet.
            state.move_to(client.base_url());
            let mut dropped = Vec::new();
            execute::report_dropped(&mut state, &mut dropped);
            ctx.report_changes(obj, &dropped, "Delete").await;
            let id = execute::delete(
                &client,
                &obj.spec,
                &obj.deployment_name(),
                &obj.uid().unwrap_or_default(),
                &state,
            )
            .await?;
            let mut changes = Vec::new();
            execute::delete_leftovers(&client, &mut state, &mut changes).await?;
            ctx.delete_moved(&client, &mut state, &mut changes).await;
            ctx.report_changes(obj, &changes, "Delete").await;
            match state.leftover_note.take() {
                Some(note) => Err(crate::Error::PrefectUnreachable(note, None)),
                None => Ok(id),
            }
        }
        .await;
        match result {
            Ok(Some(id)) => {
                ctx.event(
                    obj,
                    EventType::Normal,
                    "Deleted",
                    format!("Deleted Prefect deployment {id} and its automations"),
                    "Delete",
                )
                .await;
            }
            Ok(None) => {}
            // The operator may not call that server, so it made nothing there to
            // delete (or lost the right to since): nothing to wait for.
            Err(e @ crate::Error::ServerNotAllowed(_)) => {
                ctx.event(
                    obj,
                    EventType::Warning,
                    "CleanupSkipped",
                    format!("Nothing deleted in Prefect: {e}"),
                    "Delete",
                )
                .await;
            }
            Err(e) => {
                ctx.refused_credentials(obj, &e);
                let msg = format!("Could not delete the Prefect deployment, will retry: {e}");
                let failure = Failure {
                    reason: reason::CLEANUP_FAILED,
                    message: msg,
                    stalled: false,
                };
                report_not_ready(obj, ctx, api, &state, failure, "Delete").await?;
                return Err(e);
            }
        }
    } else {
        ctx.event(
            obj,
            EventType::Normal,
            "Orphaned",
            "deletionPolicy is Orphan: the Prefect deployment is left in place".into(),
            "Delete",
        )
        .await;
    }
    ctx.kube_write(remove_finalizer(obj, api)).await?;
    ctx.metrics.set_ready(&obj.uid().unwrap_or_default(), None);
    ctx.metrics
        .set_drifted(&obj.uid().unwrap_or_default(), false);
    Ok(Action::await_change())
}
