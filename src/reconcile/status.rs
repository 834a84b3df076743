//! Status: conditions built from the outcome of a pass, written by server-side apply
//! under one field manager, and only when something in them changed.

use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use crate::api::{Condition, PrefectDeployment, PrefectDeploymentStatus, ScheduleStatus};
use crate::plan::SyncState;
use crate::prefect::truncate;
use crate::Result;

pub const FIELD_MANAGER: &str = "prefect-operator";
pub const READY: &str = "Ready";

/// The `Ready` condition; lastTransitionTime is kept unless the status flips, so a
/// repeated outcome produces an identical condition (and no write).
pub fn ready(
    old: Option<&PrefectDeploymentStatus>,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let previous = old.and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now(),
    };
    Condition {
        type_: READY.into(),
        status: status.into(),
        reason: reason.into(),
        message: truncate(message, 512),
        last_transition_time,
        observed_generation: generation,
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn build(
    state: &SyncState,
    ready: Condition,
    generation: Option<i64>,
    preview: Preview,
) -> PrefectDeploymentStatus {
    PrefectDeploymentStatus {
        deployment_id: state.deployment_id.clone(),
        flow_id: state.flow_id.clone(),
        observed_generation: generation,
        conditions: vec![ready],
        automation_ids: if state.automation_ids.is_empty() && state.triggers_hash.is_none() {
            None
        } else {
            Some(state.automation_ids.clone())
        },
        triggers_hash: state.triggers_hash.clone(),
        schedules: preview.0,
        next_run: preview.1,
    }
}

/// The next-run part of status: per-schedule runs and the earliest of them.
pub type Preview = (Option<Vec<ScheduleStatus>>, Option<String>);

/// What a failed pass keeps: the preview last shown.
pub fn kept_preview(old: Option<&PrefectDeploymentStatus>) -> Preview {
    old.map(|s| (s.schedules.clone(), s.next_run.clone()))
        .unwrap_or_default()
}

pub fn state_of(status: Option<&PrefectDeploymentStatus>) -> SyncState {
    status
        .map(|s| SyncState {
            deployment_id: s.deployment_id.clone(),
            flow_id: s.flow_id.clone(),
            automation_ids: s.automation_ids.clone().unwrap_or_default(),
            triggers_hash: s.triggers_hash.clone(),
            schedules_seen: Vec::new(),
        })
        .unwrap_or_default()
}

/// Writes `new` unless it equals what the object already has.
pub async fn write(
    api: &Api<PrefectDeployment>,
    obj: &PrefectDeployment,
    new: &PrefectDeploymentStatus,
) -> Result<()> {
    if obj.status.as_ref() == Some(new) {
        return Ok(());
    }
    let name = obj.metadata.name.as_deref().unwrap_or_default();
    let patch = json!({
        "apiVersion": "prefect.io/v1",
        "kind": "PrefectDeployment",
        "status": new,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
