//! The thin async edge to Prefect: `observe` reads what `plan::plan` needs, `perform`
//! makes the calls a `Plan` lists and records progress. No decisions here, and no
//! Kubernetes: the state that must survive between passes comes in and goes out as
//! `SyncState`, which the caller keeps in the resource's status.
//!
//! A pass over an unchanged resource is one GET; an interrupted pass can simply be run
//! again, because the next plan starts from what Prefect then holds.

use serde_json::Value;

use crate::api::PrefectDeploymentSpec;
use crate::desired::{self, DesiredDeployment, OWNER_LABEL};
use crate::observed::{ObservedAutomation, ObservedDeployment};
use crate::plan::{
    self, AutomationAction, DeploymentAction, LimitAction, LimitRecord, Observed, Plan,
    ScheduleChange, LIMIT_ID_FIELD, MAX_LEFTOVERS,
};
use crate::prefect::PrefectClient;
use crate::validate::ValidSpec;
use crate::{Error, Result};

pub use crate::plan::SyncState;

/// Something the pass changed in Prefect, reported as a Kubernetes Event.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A new deployment, with the trigger automations made for it in the same pass
    /// (one Event for both: a cold start makes thousands).
    Created {
        id: String,
        automations: usize,
    },
    Adopted {
        id: String,
    },
    Replaced {
        old_id: String,
        new_id: String,
    },
    Updated {
        fields: Vec<String>,
    },
    SchedulesChanged {
        created: Vec<String>,
        updated: Vec<String>,
        deleted: Vec<String>,
    },
    AutomationsReplaced {
        count: usize,
    },
    /// Automations deleted or edited in Prefect, made again from their triggers.
    AutomationsRestored {
        names: Vec<String>,
    },
    LimitCreated {
        name: String,
    },
    LimitUpdated {
        name: String,
        fields: Vec<String>,
    },
    LimitDeleted {
        name: String,
    },
    /// A deployment the resource replaced earlier, deleted now; `server` when it is
    /// not the spec's.
    LeftoverDeleted {
        id: String,
        server: Option<String>,
        /// The named limit the resource made there, deleted with it.
        limit: Option<String>,
    },
    /// A deployment the resource replaced that the operator will not delete (its server
    /// refuses, or status had no room left for it): left for people, with the named
    /// limit made there.
    LeftBehind {
        id: String,
        server: String,
        limit: Option<String>,
        why: String,
    },
    /// A flow run made for a `prefect.io/run-requested-at` token.
    RunCreated {
        token: String,
        flow_run_id: String,
    },
    /// A run request refused (its parameters do not fit); no run was made.
    RunRejected {
        token: String,
        problem: String,
    },
}

impl Change {
    pub fn reason(&self) -> &'static str {
        match self {
            Change::Created { .. } => "Created",
            Change::Adopted { .. } => "Adopted",
            Change::Replaced { .. } => "Replaced",
            Change::Updated { .. } => "Updated",
            Change::SchedulesChanged { .. } => "SchedulesUpdated",
            Change::AutomationsReplaced { .. } => "AutomationsReplaced",
            Change::AutomationsRestored { .. } => "AutomationsRestored",
            Change::LimitCreated { .. } => "ConcurrencyLimitCreated",
            Change::LimitUpdated { .. } => "ConcurrencyLimitUpdated",
            Change::LimitDeleted { .. } => "ConcurrencyLimitDeleted",
            Change::LeftoverDeleted { .. } => "Deleted",
            Change::LeftBehind { .. } => "CleanupSkipped",
            Change::RunCreated { .. } => "RunCreated",
            Change::RunRejected { .. } => "RunRejected",
        }
    }

    /// Whether the Event is a Warning.
    pub fn is_warning(&self) -> bool {
        matches!(self, Change::RunRejected { .. } | Change::LeftBehind { .. })
    }

    pub fn message(&self) -> String {
        match self {
            Change::Created { id, automations: 0 } => format!("Created Prefect deployment {id}"),
            Change::Created { id, automations } => {
                format!("Created Prefect deployment {id} with {automations} trigger automation(s)")
            }
            Change::Adopted { id } => format!("Adopted existing Prefect deployment {id}"),
            Change::Replaced { old_id, new_id } => format!(
                "Name or flow changed: created Prefect deployment {new_id} and deleted {old_id}"
            ),
            Change::LeftoverDeleted {
                id, server: None, ..
            } => {
                format!("Deleted Prefect deployment {id}, which this resource replaced")
            }
            Change::LeftoverDeleted {
                id,
                server: Some(s),
                limit,
            } => format!(
                "Deleted Prefect deployment {id} and its automations{} from {s}, the server spec.server named before",
                limit.as_ref().map(|l| format!(", and global concurrency limit {l},")).unwrap_or_default()
            ),
            Change::LeftBehind {
                id,
                server,
                limit,
                why,
            } => format!(
                "Prefect deployment {id}{} on {server} is left in place: {why}; delete it there by hand",
                limit.as_ref().map(|l| format!(" (and global concurrency limit {l})")).unwrap_or_default()
            ),
            Change::Updated { fields } => format!("Updated {}", fields.join(", ")),
            Change::SchedulesChanged {
                created,
                updated,
                deleted,
            } => {
                let mut parts = Vec::new();
                for (verb, slugs) in [
                    ("created", created),
                    ("updated", updated),
                    ("deleted", deleted),
                ] {
                    if !slugs.is_empty() {
                        parts.push(format!("{verb} {}", slugs.join(", ")));
                    }
                }
                format!("Schedules {}", parts.join("; "))
            }
            Change::AutomationsReplaced { count } => {
                format!("Applied {count} trigger automation(s)")
            }
            Change::AutomationsRestored { names } => format!(
                "Put back trigger automation(s) deleted or edited in Prefect: {}",
                names.join(", ")
            ),
            Change::LimitCreated { name } => {
                format!("Created global concurrency limit {name}")
            }
            Change::LimitUpdated { name, fields } => {
                format!(
                    "Updated {} of global concurrency limit {name}",
                    fields.join(", ")
                )
            }
            Change::LimitDeleted { name } => {
                format!("Deleted global concurrency limit {name} (this resource created it)")
            }
            Change::RunCreated { token, flow_run_id } => {
                format!("Created flow run {flow_run_id} for run request {token}")
            }
            Change::RunRejected { token, problem } => {
                format!("Run request {token} refused, no run made: {problem}")
            }
        }
    }
}

/// Applies the validated spec to Prefect: observe, plan, perform. `state` is updated as
/// each step succeeds, so the caller can record progress even when a later step fails.
pub async fn apply(
    client: &PrefectClient,
    valid: &ValidSpec<'_>,
    owner_uid: &str,
    state: &mut SyncState,
    changes: &mut Vec<Change>,
) -> Result<()> {
    apply_from(client, valid, owner_uid, state, changes, None, &|_| None).await
}

/// Another resource that records deployment id `.0`, if any (see `plan::Holder`).
pub type HolderOf<'a> = &'a (dyn Fn(&str) -> Option<plan::Holder> + Send + Sync);

/// What the bulk snapshots hold for one drift check.
pub struct Snapshot {
    pub deployment: ObservedDeployment,
    /// The automations status records, when the snapshot holds every one of them.
    pub automations: Option<Vec<ObservedAutomation>>,
}

/// Like `apply`, first planning against `snapshot` (from the bulk reads) when it shows
/// the recorded deployment under the desired name: if that plan writes nothing, the
/// pass is done without a request, or with only the automations read when the
/// snapshot lacks them. Otherwise, and without a snapshot, it reads Prefect directly,
/// so nothing is ever written on the word of a snapshot.
pub async fn apply_from(
    client: &PrefectClient,
    valid: &ValidSpec<'_>,
    owner_uid: &str,
    state: &mut SyncState,
    changes: &mut Vec<Change>,
    snapshot: Option<Snapshot>,
    holder_of: HolderOf<'_>,
) -> Result<()> {
    let caps = client.capabilities().await?;
    if caps.too_old() {
        return Err(Error::PrefectRejected(format!(
            "{caps} is older than the oldest supported server (3.1); no request was made"
        )));
    }
    let (want, lost) = desired::deployment(valid, owner_uid).for_server(&caps);
    state.unsupported =
        (!lost.is_empty()).then(|| format!("{caps} cannot hold {}", lost.join(", ")));
    // Automations read directly below, kept for the direct read that may follow: only
    // the deployment's part of the snapshot plan is read again.
    let mut related = Related::default();
    if let Some(Snapshot {
        deployment: d,
        automations,
    }) = snapshot
    {
        let same_deployment = state.deployment_id.as_deref() == Some(d.id.as_str())
            && d.fields.get("name").and_then(Value::as_str) == Some(want.name.as_str())
            && d.flow_id.is_some()
            && d.flow_id == state.flow_id;
        let holder = holder_of(&d.id);
        let reads = plan::reads(&want, state, Some(&d), holder.as_ref());
        if same_deployment && reads.only_automations() {
            // The automations from the snapshot when it has them; else one read of
            // their own, the deployment's part still coming from the snapshot.
            let (related_automations, read_here) = match automations {
                Some(a) if reads.related_automations.is_some() => (Some(a), false),
                _ => (read_related(client, &reads, &mut related).await?, true),
            };
            let observed = Observed {
                holder,
                by_name: Some(d),
                related_automations,
                ..Observed::default()
            };
            let p = plan::plan(&want, state, &observed);
            if p.is_noop() && p.drift.is_empty() {
                return perform(client, &want, &p, observed.by_name.as_ref(), state, changes).await;
            }
            if read_here {
                related.keep(&reads, observed.related_automations);
            }
        }
    }
    let by_name = client
        .deployment_by_name(&want.flow_name, &want.name)
        .await?;
    let holder = by_name.as_ref().and_then(|d| holder_of(&d.id));
    let observed = observe_reusing(client, &want, state, by_name, holder, related).await?;
    let plan = plan::plan(&want, state, &observed);
    perform(
        client,
        &want,
        &plan,
        observed.by_name.as_ref(),
        state,
        changes,
    )
    .await
}

/// Reads what planning needs: the deployment by name, and only where that answer
/// leaves a question open, the recorded deployment or the related automations.
pub async fn observe(
    client: &PrefectClient,
    want: &DesiredDeployment,
    state: &SyncState,
) -> Result<Observed> {
    let by_name = client
        .deployment_by_name(&want.flow_name, &want.name)
        .await?;
    observe_given(client, want, state, by_name).await
}

/// `observe` for a caller that already read the deployment by name.
pub async fn observe_given(
    client: &PrefectClient,
    want: &DesiredDeployment,
    state: &SyncState,
    by_name: Option<ObservedDeployment>,
) -> Result<Observed> {
    observe_reusing(client, want, state, by_name, None, Related::default()).await
}

async fn observe_reusing(
    client: &PrefectClient,
    want: &DesiredDeployment,
    state: &SyncState,
    by_name: Option<ObservedDeployment>,
    holder: Option<plan::Holder>,
    mut related: Related,
) -> Result<Observed> {
    let reads = plan::reads(want, state, by_name.as_ref(), holder.as_ref());
    let recorded_exists = match &reads.recorded {
        Some(id) => Some(client.read_deployment(id).await?.is_some()),
        None => None,
    };
    let related_automations = read_related(client, &reads, &mut related).await?;
    let limit = match &reads.limit {
        Some(name) => client.read_limit(name).await?,
        None => None,
    };
    Ok(Observed {
        by_name,
        recorded_exists,
        related_automations,
        limit,
        holder,
    })
}

/// Automations of one deployment read earlier in the same pass.
#[derive(Default)]
struct Related(Option<(String, Vec<ObservedAutomation>)>);

impl Related {
    fn keep(&mut self, reads: &plan::Reads, read: Option<Vec<ObservedAutomation>>) {
        self.0 = reads.related_automations.clone().zip(read);
    }
}

/// The automations related to the deployment `reads` names, if it names one; taken
/// from `known` when this pass already read that deployment's.
async fn read_related(
    client: &PrefectClient,
    reads: &plan::Reads,
    known: &mut Related,
) -> Result<Option<Vec<ObservedAutomation>>> {
    let Some(id) = &reads.related_automations else {
        return Ok(None);
    };
    if let Some((_, read)) = known.0.take().filter(|(of, _)| of == id) {
        return Ok(Some(read));
    }
    let read = client
        .automations_related_to(&desired::owner_resource(id))
        .await?;
    Ok(Some(read))
}

/// Makes the calls `plan` lists, in order, recording each success in `state` and each
/// change in `changes`.
pub async fn perform(
    client: &PrefectClient,
    want: &DesiredDeployment,
    plan: &Plan,
    actual: Option<&ObservedDeployment>,
    state: &mut SyncState,
    changes: &mut Vec<Change>,
) -> Result<()> {
    if let DeploymentAction::Conflict { id, holder, let_go } = &plan.deployment {
        // Another resource keeps the deployment: this one stops recording it, and its
        // own automations for it go, or each trigger would start two runs.
        if let Some(ids) = let_go {
            for a in ids {
                client.delete_automation(a).await?;
            }
            state.deployment_id = None;
            state.flow_id = None;
            state.automation_ids.clear();
            state.triggers_hash = None;
        }
        return Err(Error::Conflict(match holder {
            Some(h) => format!(
                "Prefect deployment {}/{} ({id}) is managed by PrefectDeployment {h}; one deployment can have only one resource: remove one or give it another spec.deployment.name{}",
                plan.flow_name,
                plan.name,
                match let_go {
                    Some(ids) => format!(
                        " (this resource no longer records it; {} automation(s) it had made for it were deleted)",
                        ids.len()
                    ),
                    None => String::new(),
                }
            ),
            None => format!(
                "Prefect already has a deployment {}/{} ({id}) that this resource did not create; set spec.adoptExisting: true to manage it",
                plan.flow_name, plan.name
            ),
        }));
    }
    let limit_id = apply_limit(client, plan, state, changes).await?;
    let id = match &plan.deployment {
        DeploymentAction::Conflict { .. } => unreachable!("returned above"),
        DeploymentAction::Update { id } => id.clone(),
        DeploymentAction::Resume { id, retire } | DeploymentAction::Adopt { id, retire } => {
            if let Some(old) = retire {
                retire_deployment(client, old).await?;
                state.gone(old);
            }
            if matches!(plan.deployment, DeploymentAction::Adopt { .. }) {
                changes.push(Change::Adopted { id: id.clone() });
            }
            state.deployment_id = Some(id.clone());
            state.triggers_hash = None;
            state.automation_ids.clear();
            id.clone()
        }
        DeploymentAction::Create {
            retire,
            schedules_in_body,
        } => {
            let mut flow_id = client.flow_id(&want.flow_name).await?;
            let body = |flow_id: &str| {
                let mut body = want.create_body(flow_id);
                if let Some(l) = &limit_id {
                    body[LIMIT_ID_FIELD] = Value::String(l.clone());
                }
                body
            };
            let id = match client.create_deployment(&body(&flow_id)).await {
                // A cached flow id whose flow was deleted in Prefect: ask again, once.
                Err(Error::PrefectRejected(_)) if client.forget_flow(&want.flow_name) => {
                    flow_id = client.flow_id(&want.flow_name).await?;
                    client.create_deployment(&body(&flow_id)).await?
                }
                other => other?,
            };
            // The one replaced is recorded before the new id takes its place, so a
            // failure from here on cannot lose it.
            if let Some(old) = retire {
                state.leave(old.clone(), client.base_url().to_string(), None);
            }
            state.deployment_id = Some(id.clone());
            state.flow_id = Some(flow_id);
            state.automation_ids.clear();
            state.triggers_hash = None;
            if !schedules_in_body {
                create_schedules(client, &id, &plan.schedules).await?;
            }
            match retire {
                Some(old) => {
                    retire_deployment(client, old).await?;
                    state.gone(old);
                    changes.push(Change::Replaced {
                        old_id: old.clone(),
                        new_id: id.clone(),
                    });
                }
                None => changes.push(Change::Created {
                    id: id.clone(),
                    automations: 0,
                }),
            }
            id
        }
    };
    if let Some(actual) = actual.filter(|a| a.id == id) {
        state.flow_id = actual.flow_id.clone();
        state.schedules_seen = actual.schedules.clone();
        if plan.detach_shared_limit {
            let detach = serde_json::json!({ LIMIT_ID_FIELD: null });
            client.update_deployment(&id, &detach).await?;
        }
        if plan.release_own_limit {
            client
                .update_deployment(&id, &serde_json::json!({"concurrency_limit": null}))
                .await?;
        }
        update_fields(client, &id, plan, limit_id.as_deref(), changes).await?;
        update_schedules(client, &id, &plan.schedules, changes).await?;
    }
    if plan.read_back {
        if let Some(d) = client.read_deployment(&id).await? {
            state.schedules_seen = d.schedules;
        }
    }
    apply_automations(client, want, &id, &plan.automations, state, changes).await?;
    if let Some(old) = &plan.delete_limit {
        client.delete_limit(&old.id).await?;
        changes.push(Change::LimitDeleted {
            name: old.name.clone(),
        });
    }
    if plan.limit.is_none() {
        state.limit = None;
    }
    state.applied_ignored = plan.record_ignored.clone();
    state.drift = plan.drift.clone();
    delete_leftovers(client, state, changes).await
}

/// Tells of the deployments to delete that status had no room left for.
pub fn report_dropped(state: &mut SyncState, changes: &mut Vec<Change>) {
    for d in state.dropped.drain(..) {
        changes.push(Change::LeftBehind {
            id: d.deployment_id,
            server: d.server,
            limit: d.limit.map(|l| l.name),
            why: format!(
                "status keeps at most {MAX_LEFTOVERS} deployments to delete, and newer ones took its place"
            ),
        });
    }
}

/// Deletes the deployments on this server that the resource replaced and could not
/// delete when it did (the server failed, or the pass was cut short).
pub async fn delete_leftovers(
    client: &PrefectClient,
    state: &mut SyncState,
    changes: &mut Vec<Change>,
) -> Result<()> {
    for id in state.leftovers_on(client.base_url()) {
        retire_deployment(client, &id).await?;
        state.gone(&id);
        changes.push(Change::LeftoverDeleted {
            id,
            server: None,
            limit: None,
        });
    }
    Ok(())
}

async fn create_schedules(
    client: &PrefectClient,
    id: &str,
    schedules: &[ScheduleChange],
) -> Result<()> {
    let bodies: Vec<Value> = schedules
        .iter()
        .filter_map(|s| match s {
            ScheduleChange::Create { body, .. } => Some(body.clone()),
            _ => None,
        })
        .collect();
    if bodies.is_empty() {
        return Ok(());
    }
    client.create_schedules(id, &bodies).await
}

/// Removes a deployment this resource no longer describes, with its automations.
/// Prefect deletes the global concurrency limit a deployment is attached to along with
/// it; a named limit others may share is first let go of, so only the deployment's
/// own limit goes.
pub async fn retire_deployment(client: &PrefectClient, id: &str) -> Result<()> {
    client
        .delete_owned_automations(&desired::owner_resource(id))
        .await?;
    if let Some(d) = client.read_deployment(id).await? {
        if d.shared_limit().is_some() {
            let detach = serde_json::json!({ LIMIT_ID_FIELD: null });
            client.update_deployment(id, &detach).await?;
        }
        client.delete_deployment(id).await?;
    }
    Ok(())
}

/// Makes or updates the named global concurrency limit the plan names, records it, and
/// returns its id.
async fn apply_limit(
    client: &PrefectClient,
    plan: &Plan,
    state: &mut SyncState,
    changes: &mut Vec<Change>,
) -> Result<Option<String>> {
    let Some(l) = &plan.limit else {
        return Ok(None);
    };
    let (id, created) = match &l.action {
        LimitAction::Keep { id } => (id.clone(), false),
        LimitAction::Update { id, fields } => {
            let body: serde_json::Map<String, Value> = fields
                .iter()
                .map(|f| (f.field.clone(), f.to.clone()))
                .collect();
            client.update_limit(id, &Value::Object(body)).await?;
            changes.push(Change::LimitUpdated {
                name: l.name.clone(),
                fields: fields.iter().map(|f| f.field.clone()).collect(),
            });
            (id.clone(), false)
        }
        LimitAction::Create { body } => match client.create_limit(body).await? {
            Some(id) => {
                changes.push(Change::LimitCreated {
                    name: l.name.clone(),
                });
                (id, true)
            }
            // Made by another resource meanwhile: use it; the next pass brings its
            // settings in step if they differ.
            None => match client.read_limit(&l.name).await? {
                Some(found) => (found.id, false),
                None => return Err(limit_missing(&l.name)),
            },
        },
        LimitAction::Missing => return Err(limit_missing(&l.name)),
    };
    let created = created
        || state
            .limit
            .as_ref()
            .is_some_and(|r| r.created && r.id == id);
    state.limit = Some(LimitRecord {
        name: l.name.clone(),
        id: id.clone(),
        created,
    });
    Ok(Some(id))
}

fn limit_missing(name: &str) -> Error {
    Error::ConcurrencyLimitMissing(format!(
        "Prefect has no global concurrency limit {name:?}, and spec.deployment.globalConcurrencyLimit.limit is not set to create it"
    ))
}

async fn update_fields(
    client: &PrefectClient,
    id: &str,
    plan: &Plan,
    limit_id: Option<&str>,
    changes: &mut Vec<Change>,
) -> Result<()> {
    if plan.fields.is_empty() {
        return Ok(());
    }
    let mut body = plan.patch_body();
    if let (Some(l), Some(field)) = (limit_id, body.get_mut(LIMIT_ID_FIELD)) {
        *field = Value::String(l.to_string());
    }
    client.update_deployment(id, &body).await?;
    changes.push(Change::Updated {
        fields: plan.fields.iter().map(|f| f.field.clone()).collect(),
    });
    Ok(())
}

async fn update_schedules(
    client: &PrefectClient,
    id: &str,
    schedules: &[ScheduleChange],
    changes: &mut Vec<Change>,
) -> Result<()> {
    let (mut created, mut updated, mut deleted) = (Vec::new(), Vec::new(), Vec::new());
    for s in schedules {
        match s {
            ScheduleChange::Delete { slug, id: sid } => {
                client.delete_schedule(id, sid).await?;
                deleted.push(slug.clone().unwrap_or_else(|| "(no slug)".into()));
            }
            ScheduleChange::Update {
                slug,
                id: sid,
                renamed_from,
                body,
            } => {
                client.update_schedule(id, sid, body).await?;
                updated.push(match renamed_from {
                    Some(old) if old.is_empty() => format!("{slug} (had no slug)"),
                    Some(old) => format!("{slug} (renamed from {old})"),
                    None => slug.clone(),
                });
            }
            ScheduleChange::Create { slug, .. } => created.push(slug.clone()),
        }
    }
    create_schedules(client, id, schedules).await?;
    if !(created.is_empty() && updated.is_empty() && deleted.is_empty()) {
        changes.push(Change::SchedulesChanged {
            created,
            updated,
            deleted,
        });
    }
    Ok(())
}

async fn apply_automations(
    client: &PrefectClient,
    want: &DesiredDeployment,
    id: &str,
    action: &AutomationAction,
    state: &mut SyncState,
    changes: &mut Vec<Change>,
) -> Result<()> {
    match action {
        AutomationAction::Unchanged => Ok(()),
        AutomationAction::Adopt { ids } => {
            state.automation_ids = ids.clone();
            state.triggers_hash = Some(want.triggers_hash(id));
            Ok(())
        }
        AutomationAction::DeleteLeftovers { delete } => {
            state.automation_ids.retain(|a| !delete.contains(a));
            for (k, old) in delete.iter().enumerate() {
                if let Err(e) = client.delete_automation(old).await {
                    state.automation_ids.extend_from_slice(&delete[k..]);
                    return Err(e);
                }
            }
            Ok(())
        }
        AutomationAction::Restore { triggers, gone } => {
            let bodies = want.automations_for(id);
            let mut names = Vec::new();
            for t in triggers {
                let i = t.index;
                let Some(body) = bodies.get(i) else {
                    continue;
                };
                let new = match &t.take {
                    Some(existing) => existing.clone(),
                    None => client
                        .create_automation(body)
                        .await
                        .map_err(|e| trigger_error(body, i, e))?,
                };
                // The edited (or vanished) one becomes a leftover, deleted below or, if
                // that fails, on a later pass.
                match state.automation_ids.get_mut(i) {
                    Some(slot) => {
                        let old = std::mem::replace(slot, new);
                        state.automation_ids.push(old);
                    }
                    None => {
                        let at = i.min(state.automation_ids.len());
                        state.automation_ids.insert(at, new);
                    }
                }
                names.push(body["name"].as_str().unwrap_or_default().to_string());
            }
            let leftovers = state
                .automation_ids
                .get(bodies.len()..)
                .unwrap_or_default()
                .to_vec();
            for old in &leftovers {
                if !gone.contains(old) {
                    client.delete_automation(old).await?;
                }
                state.automation_ids.retain(|x| x != old);
            }
            changes.push(Change::AutomationsRestored { names });
            Ok(())
        }
        AutomationAction::Replace { delete, .. } => {
            let bodies = want.automations_for(id);
            // Create the new set first; the previous one keeps working until all are
            // accepted.
            let mut created = Vec::new();
            for (i, body) in bodies.iter().enumerate() {
                match client.create_automation(body).await {
                    Ok(new) => created.push(new),
                    Err(e) => {
                        // Take back what this attempt made; the previous set stays.
                        for new in &created {
                            let _ = client.delete_automation(new).await;
                        }
                        return Err(trigger_error(body, i, e));
                    }
                }
            }
            // Recorded before the old set goes, so an interruption below leaves the new
            // set known and the leftovers (listed after it) to be deleted next pass.
            state.automation_ids = created.iter().chain(delete).cloned().collect();
            state.triggers_hash = Some(desired::fingerprint(&bodies));
            for old in delete {
                client.delete_automation(old).await?;
                state.automation_ids.retain(|x| x != old);
            }
            let created_now = changes.iter_mut().find_map(|c| match c {
                Change::Created { automations, .. } if delete.is_empty() => Some(automations),
                _ => None,
            });
            match created_now {
                Some(n) => *n = bodies.len(),
                None if !delete.is_empty() || !bodies.is_empty() => {
                    changes.push(Change::AutomationsReplaced {
                        count: bodies.len(),
                    })
                }
                None => {}
            }
            Ok(())
        }
    }
}

/// Names the trigger Prefect refused; for a metric trigger, says plainly that only
/// Prefect Cloud has them.
fn trigger_error(body: &Value, index: usize, e: Error) -> Error {
    let Error::AutomationFailed(detail) = e else {
        return e;
    };
    let field = format!("spec.deployment.triggers[{index}]");
    let trigger = &body["trigger"];
    let metric = trigger["type"] == "metric"
        || trigger["triggers"]
            .as_array()
            .is_some_and(|t| t.iter().any(|c| c["type"] == "metric"));
    if metric {
        Error::AutomationFailed(format!(
            "{field}: metric triggers exist only on Prefect Cloud and this server refused it; the deployment is applied, its previous automations are kept ({detail})"
        ))
    } else {
        Error::AutomationFailed(format!(
            "{field}: Prefect refused the automation; the previous automations are kept ({detail})"
        ))
    }
}

/// Deletes what the resource created: its automations, then the deployment. A
/// deployment already gone counts as deleted. Without a recorded id, a deployment of the
/// right name is removed only if its owner label says it was made for this resource.
pub async fn delete(
    client: &PrefectClient,
    spec: &PrefectDeploymentSpec,
    name: &str,
    owner_uid: &str,
    state: &SyncState,
) -> Result<Option<String>> {
    let id = match &state.deployment_id {
        Some(id) => Some(id.clone()),
        None => {
            let flow = spec.deployment.flow_name();
            client
                .read_deployment_by_name(&flow, name)
                .await?
                .filter(|d| d.label(OWNER_LABEL) == Some(owner_uid))
                .map(|d| d.id)
        }
    };
    if let Some(id) = &id {
        retire_deployment(client, id).await?;
    }
    if let Some(l) = state
        .limit
        .as_ref()
        .filter(|l| l.created && !state.limit_shared)
    {
        client.delete_limit(&l.id).await?;
    }
    Ok(id)
}
