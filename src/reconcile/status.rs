//! Status: conditions built from the outcome of a pass, written by server-side apply
//! under one field manager, and only when something in them changed.

use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use crate::api::{reason, Condition, PrefectDeployment, PrefectDeploymentStatus, ScheduleStatus};
use crate::plan::SyncState;
use crate::prefect::truncate;
use crate::Result;

pub const FIELD_MANAGER: &str = "prefect-operator";
pub const READY: &str = "Ready";

pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";

/// How a pass ended, in the terms of kstatus (which Flux and `kubectl wait` read):
/// `Ready` always; `Reconciling=True` while a failure is being retried; `Stalled=True`
/// when only a person can move it on. The two are left out otherwise.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    Ready { message: &'a str },
    Retrying { reason: &'a str, message: &'a str },
    Stalled { reason: &'a str, message: &'a str },
}

pub const DRIFTED: &str = "Drifted";

/// The `Drifted` condition of a resource with driftPolicy Report: which differences a
/// drift check found in Prefect and left in place.
pub fn drifted(
    old: Option<&PrefectDeploymentStatus>,
    drift: &[String],
    generation: Option<i64>,
) -> Condition {
    let status = if drift.is_empty() { "False" } else { "True" };
    let (reason, message) = if drift.is_empty() {
        ("InSync", "Prefect matches the spec".to_string())
    } else {
        (
            "DriftReported",
            format!(
                "Prefect differs from the spec in {}; left in place (driftPolicy: Report)",
                drift.join(", ")
            ),
        )
    };
    let previous = old.and_then(|s| s.conditions.iter().find(|c| c.type_ == DRIFTED));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now(),
    };
    Condition {
        type_: DRIFTED.into(),
        status: status.into(),
        reason: reason.into(),
        message: truncate(&message, 512),
        last_transition_time,
        observed_generation: generation,
    }
}

impl<'a> Outcome<'a> {
    /// The outcome of a pass that failed with `e`, whose message is `message`.
    pub fn failed(e: &crate::Error, message: &'a str) -> Outcome<'a> {
        let kind = e.kind();
        if kind.stalls {
            Outcome::Stalled {
                reason: kind.reason,
                message,
            }
        } else {
            Outcome::Retrying {
                reason: kind.reason,
                message,
            }
        }
    }
}

/// The conditions for `outcome`. A condition keeps its lastTransitionTime while its
/// status stays the same, so a repeated outcome produces identical conditions (and no
/// write).
pub fn conditions(
    old: Option<&PrefectDeploymentStatus>,
    outcome: Outcome,
    generation: Option<i64>,
) -> Vec<Condition> {
    let make = |type_: &str, ok: bool, reason: &str, message: &str| {
        let status = if ok { "True" } else { "False" };
        let previous = old.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
        let last_transition_time = match previous {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => now(),
        };
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            // Never empty: server-side apply on some apiservers (1.20) turns "" into
            // null, which the schema refuses, and the whole status write with it.
            message: truncate(if message.is_empty() { reason } else { message }, 512),
            last_transition_time,
            observed_generation: generation,
        }
    };
    match outcome {
        Outcome::Ready { message } => vec![make(READY, true, reason::SYNCED, message)],
        Outcome::Retrying { reason, message } => vec![
            make(READY, false, reason, message),
            make(RECONCILING, true, reason, message),
        ],
        Outcome::Stalled { reason, message } => vec![
            make(READY, false, reason, message),
            make(STALLED, true, reason, message),
        ],
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn build(
    state: &SyncState,
    conditions: Vec<Condition>,
    generation: Option<i64>,
    preview: Preview,
) -> PrefectDeploymentStatus {
    PrefectDeploymentStatus {
        deployment_id: state.deployment_id.clone(),
        flow_id: state.flow_id.clone(),
        observed_generation: generation,
        conditions,
        automation_ids: if state.automation_ids.is_empty() && state.triggers_hash.is_none() {
            None
        } else {
            Some(state.automation_ids.clone())
        },
        triggers_hash: state.triggers_hash.clone(),
        schedules: preview.0,
        next_run: preview.1,
        last_handled_reconcile_at: None,
        last_run: None,
        applied_ignored_fields: (!state.applied_ignored.is_empty())
            .then(|| state.applied_ignored.clone()),
        global_concurrency_limit: state.limit.clone(),
        server: state.server.clone(),
        pending_deletions: (!state.leftovers.is_empty()).then(|| state.leftovers.clone()),
    }
}

/// The next-run part of status: per-schedule runs and the earliest of them.
pub type Preview = (Option<Vec<ScheduleStatus>>, Option<String>);

/// What a failed pass keeps: the preview last shown.
pub fn kept_preview(old: Option<&PrefectDeploymentStatus>) -> Preview {
    old.map(|s| (s.schedules.clone(), s.next_run.clone()))
        .unwrap_or_default()
}

/// Whether `status` says generation `generation` is applied: the resource's next pass
/// with nothing new asked is a drift check.
pub fn applied(status: Option<&PrefectDeploymentStatus>, generation: Option<i64>) -> bool {
    status.is_some_and(|s| {
        s.observed_generation == generation
            && s.conditions
                .iter()
                .any(|c| c.type_ == READY && c.status == "True")
    })
}

pub fn state_of(status: Option<&PrefectDeploymentStatus>) -> SyncState {
    status
        .map(|s| SyncState {
            deployment_id: s.deployment_id.clone(),
            flow_id: s.flow_id.clone(),
            automation_ids: s.automation_ids.clone().unwrap_or_default(),
            triggers_hash: s.triggers_hash.clone(),
            schedules_seen: Vec::new(),
            applied_ignored: s.applied_ignored_fields.clone().unwrap_or_default(),
            spec_applied: false,
            drift: Vec::new(),
            limit: s.global_concurrency_limit.clone(),
            limit_shared: false,
            unsupported: None,
            check_automations: false,
            server: s.server.clone(),
            leftovers: s.pending_deletions.clone().unwrap_or_default(),
            leftover_note: None,
            dropped: Vec::new(),
        })
        .unwrap_or_default()
}

/// Writes `new` as the status by server-side apply (the caller skips an unchanged one).
pub async fn write(
    api: &Api<PrefectDeployment>,
    obj: &PrefectDeployment,
    new: &PrefectDeploymentStatus,
) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_message_is_never_empty() {
        for outcome in [
            Outcome::Ready { message: "" },
            Outcome::Retrying {
                reason: "PrefectUnavailable",
                message: "",
            },
            Outcome::Stalled {
                reason: "InvalidSpec",
                message: "",
            },
        ] {
            for c in conditions(None, outcome, Some(1)) {
                assert!(!c.message.is_empty(), "{c:?}");
                assert_eq!(c.message, c.reason);
            }
        }
        let c = conditions(None, Outcome::Ready { message: "applied" }, Some(1));
        assert_eq!(c[0].message, "applied");
    }
}
