//! Pure: what the operator would do to Prefect, from what the resource wants
//! (`DesiredDeployment`), what an earlier pass recorded (`SyncState`, kept in status) and
//! what Prefect holds now (`Observed`). `plan` decides everything; the executor in
//! `reconcile::execute` performs a `Plan` and decides nothing; `diff` prints one.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::api::IgnoredField;
pub use crate::api::{LimitRecord, PendingDeletion};
use crate::desired::{DesiredDeployment, OWNER_LABEL};
use crate::observed::{ObservedAutomation, ObservedDeployment, ObservedLimit, ObservedSchedule};

/// What the operator remembers between passes (mirrors the status fields).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SyncState {
    pub deployment_id: Option<String>,
    pub flow_id: Option<String>,
    /// The automations made for the current triggers, then any left from an earlier set
    /// that could not be deleted yet.
    pub automation_ids: Vec<String>,
    pub triggers_hash: Option<String>,
    /// The schedules as Prefect reported them in this pass (not kept in status): the
    /// source of anchor dates Prefect chose itself, for the next-run preview.
    #[serde(skip)]
    pub schedules_seen: Vec<ObservedSchedule>,
    /// Fingerprints of the spec's values of the ignored fields when last applied.
    pub applied_ignored: BTreeMap<String, String>,
    /// The current generation of the spec was applied before: this pass is a drift
    /// check, not the application of a change.
    pub spec_applied: bool,
    /// Differences left in place this pass (driftPolicy Report), for status.
    #[serde(skip)]
    pub drift: Vec<String>,
    /// The named global concurrency limit the deployment is attached to.
    #[serde(rename = "globalConcurrencyLimit")]
    pub limit: Option<LimitRecord>,
    /// What the server could not hold of the spec (older servers), for the condition.
    #[serde(skip)]
    pub unsupported: Option<String>,
    /// Another resource names the limit this one created (not kept in status: the
    /// caller looks it up each pass), so it is not deleted when this one lets go of it.
    #[serde(skip)]
    pub limit_shared: bool,
    /// Prefect may have changed this resource's automations (its event stream said so,
    /// or no stream reports their changes): read the deployment's automations and put
    /// back any recorded one that is gone or differs from its trigger.
    #[serde(skip)]
    pub check_automations: bool,
    /// The Prefect API the ids above belong to (unknown in statuses written before it
    /// was recorded: then the spec's).
    pub server: Option<String>,
    /// Deployments this resource replaced that are still to be deleted.
    pub leftovers: Vec<PendingDeletion>,
    /// Why a replaced deployment on another server is not deleted yet, for the condition.
    #[serde(skip)]
    pub leftover_note: Option<String>,
    /// Deployments to delete that newer ones pushed out of status (it holds
    /// `MAX_LEFTOVERS`): told to people, since nothing will delete them now.
    #[serde(skip)]
    pub dropped: Vec<PendingDeletion>,
}

/// The most deployments status keeps as still to delete (the CRD's bound).
pub const MAX_LEFTOVERS: usize = 16;

impl SyncState {
    /// Takes the resource to server `base`. Ids recorded for another server name
    /// nothing there: the deployment recorded becomes one to delete on its own server,
    /// and the rest is forgotten. True when the server changed.
    pub fn move_to(&mut self, base: &str) -> bool {
        let from = self.server.replace(base.to_string());
        let Some(from) = from.filter(|f| f != base) else {
            return false;
        };
        // A named limit it made there goes with the deployment; one it only attached to
        // belongs to others.
        let limit = self.limit.take().filter(|l| l.created);
        if let Some(id) = self.deployment_id.take() {
            self.leave(id, from, limit);
        }
        self.flow_id = None;
        self.automation_ids.clear();
        self.triggers_hash = None;
        self.applied_ignored.clear();
        self.spec_applied = false;
        true
    }

    /// Records deployment `id` on server `server` as one to delete, with the named
    /// `limit` the resource made there, if any.
    pub fn leave(&mut self, id: String, server: String, limit: Option<LimitRecord>) {
        if let Some(known) = self.leftovers.iter_mut().find(|l| l.deployment_id == id) {
            known.limit = limit.or(known.limit.take());
            return;
        }
        // Status holds 16 at most; so many moves in a row cannot all be pending.
        if self.leftovers.len() >= MAX_LEFTOVERS {
            let out = self.leftovers.remove(0);
            self.dropped.push(out);
        }
        self.leftovers.push(PendingDeletion {
            deployment_id: id,
            server,
            limit,
        });
    }

    /// The deployments still to delete on server `base`, dropping any that is the
    /// recorded deployment again (the same server under another URL, or moved back).
    pub fn leftovers_on(&mut self, base: &str) -> Vec<String> {
        let current = self.deployment_id.clone();
        self.leftovers
            .retain(|l| Some(&l.deployment_id) != current.as_ref());
        self.leftovers
            .iter()
            .filter(|l| l.server == base)
            .map(|l| l.deployment_id.clone())
            .collect()
    }

    /// Deployment `id` is deleted.
    pub fn gone(&mut self, id: &str) {
        self.leftovers.retain(|l| l.deployment_id != id);
    }
}

/// What Prefect holds, as far as planning needs to know. `observe` in the executor
/// reads exactly what `reads` asks for.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Observed {
    /// The deployment Prefect has under the desired flow and deployment name.
    pub by_name: Option<ObservedDeployment>,
    /// Whether the deployment recorded in status still exists under any name; read only
    /// when nothing has the desired name (a rename, or a deletion in Prefect).
    pub recorded_exists: Option<bool>,
    /// The automations related to the deployment; read only when the recorded state
    /// cannot say which automations to replace (a first apply to an existing deployment),
    /// or to check the recorded ones (`SyncState::check_automations`).
    pub related_automations: Option<Vec<ObservedAutomation>>,
    /// The named global concurrency limit the spec asks for; read only when it names one
    /// (`None`: there is no limit of that name).
    pub limit: Option<ObservedLimit>,
    /// Another resource this operator handles whose status records the deployment found
    /// by name (`by_name`): only one resource may write to a deployment.
    pub holder: Option<Holder>,
}

/// Another resource that manages the deployment found by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    /// `namespace/name`.
    pub resource: String,
    /// Its metadata.uid: it made the deployment when that is the owner label.
    pub uid: String,
    /// Whether it came first (created before this resource; the same second decided
    /// by namespace/name): of two resources that both took over a deployment they did
    /// not make, the first keeps it.
    #[serde(default)]
    pub senior: bool,
    /// The automations its status records.
    #[serde(default)]
    pub automations: Vec<String>,
}

impl Holder {
    /// Resource `other`, whose status records the deployment, as the holder `me` meets.
    /// A resource not created yet (no timestamp: `diff` of a new manifest) comes last.
    pub fn new(other: &ObjectMeta, me: &ObjectMeta) -> Holder {
        let rank = |m: &ObjectMeta| {
            (
                m.creation_timestamp.as_ref().map(|t| t.0),
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        let (theirs, mine) = (rank(other), rank(me));
        Holder {
            resource: format!("{}/{}", theirs.1, theirs.2),
            uid: other.uid.clone().unwrap_or_default(),
            senior: mine.0.is_none() || (theirs.0.is_some() && theirs < mine),
            automations: Vec::new(),
        }
    }
}

/// The calls that bring Prefect to the desired state, in the order they are made.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub flow_name: String,
    pub name: String,
    pub deployment: DeploymentAction,
    /// Fields sent in one PATCH, sorted by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldChange>,
    /// Deletions first, then updates, then creations (one request for all creations).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleChange>,
    pub automations: AutomationAction,
    /// Read the deployment back after writing: Prefect anchors an interval schedule sent
    /// without an anchor date at the moment it stores it, and the preview needs that.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_back: bool,
    /// Differences found and, by driftPolicy Report, left in place.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    /// What to record as applied for the ignored fields once the plan succeeded.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub record_ignored: BTreeMap<String, String>,
    /// The named global concurrency limit, made or brought in step before the
    /// deployment is written (the deployment then refers to it by id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<LimitPlan>,
    /// Drop the deployment's own limit in a PATCH of its own before attaching it to a
    /// named one: in one request Prefect would delete the named limit instead.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub release_own_limit: bool,
    /// Detach the deployment from a named limit the spec no longer names, in a PATCH of
    /// its own before the others (Prefect 3.4 given the detach and a new own limit in
    /// one request keeps neither).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub detach_shared_limit: bool,
    /// A limit this resource created and no longer names: deleted once the deployment
    /// is off it (and only if no other resource names it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete_limit: Option<LimitRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitPlan {
    pub name: String,
    #[serde(flatten)]
    pub action: LimitAction,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(
    tag = "action",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum LimitAction {
    /// It exists with the settings the spec declares.
    Keep { id: String },
    /// Missing: create it (`ConcurrencyLimitV2Create`).
    Create {
        #[serde(skip)]
        body: Value,
    },
    /// Its settings differ from the spec's: PATCH these.
    Update {
        id: String,
        fields: Vec<FieldChange>,
    },
    /// Missing, and the spec gives no `limit` to create it with.
    Missing,
}

impl LimitPlan {
    pub fn id(&self) -> Option<&str> {
        match &self.action {
            LimitAction::Keep { id } | LimitAction::Update { id, .. } => Some(id),
            LimitAction::Create { .. } | LimitAction::Missing => None,
        }
    }
}

/// The deployment field that attaches it to a named global concurrency limit. Where
/// the limit does not exist yet, the plan holds a placeholder that the executor
/// replaces with the id of the limit it creates.
pub const LIMIT_ID_FIELD: &str = "global_concurrency_limit_id";

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(
    tag = "action",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum DeploymentAction {
    /// The deployment recorded in status, found by name: changed in place.
    Update { id: String },
    /// Found by name with this resource's owner label but not recorded: a create whose
    /// pass was interrupted before status was written. Taken back; `retire` is the
    /// deployment status did record (the resource was renamed meanwhile).
    Resume {
        id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        retire: Option<String>,
    },
    /// Found by name, made by someone else, and `spec.adoptExisting` allows taking it.
    Adopt {
        id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        retire: Option<String>,
    },
    /// Nothing has the name: create the flow (an upsert) and the deployment. `retire` is
    /// the deployment status recorded, still present under its old name or flow: it is
    /// deleted with its automations after the new one exists.
    Create {
        #[serde(skip_serializing_if = "Option::is_none")]
        retire: Option<String>,
        /// The schedules go in the create request (else one request after it).
        schedules_in_body: bool,
    },
    /// A deployment of this name that this resource did not create and may not adopt,
    /// or that another resource (`holder`, `namespace/name`) manages. Nothing is
    /// written; the pass fails with `Conflict` and is retried with backoff.
    Conflict {
        id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        holder: Option<String>,
        /// This resource's status records the deployment too (it managed it before
        /// the one-resource rule, or the status was set by hand): it lets go of it,
        /// deleting these automations it made for it (those the holder does not record).
        #[serde(skip_serializing_if = "Option::is_none")]
        let_go: Option<Vec<String>>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    pub field: String,
    /// What Prefect reports now.
    pub from: Value,
    pub to: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(
    tag = "action",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum ScheduleChange {
    Create {
        slug: String,
        #[serde(skip)]
        body: Value,
    },
    /// Changed in place: the schedule keeps its id and Prefect re-plans its runs.
    Update {
        slug: String,
        id: String,
        /// The slug it had in Prefect when this also renames it (empty: it had none).
        #[serde(skip_serializing_if = "Option::is_none")]
        renamed_from: Option<String>,
        #[serde(skip)]
        body: Value,
    },
    /// In Prefect but not in the spec (a schedule without a slug is never ours to keep).
    Delete { slug: Option<String>, id: String },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(
    tag = "action",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum AutomationAction {
    /// The recorded set matches the triggers.
    Unchanged,
    /// The triggers are unchanged, but an earlier replacement could not delete all of
    /// the previous set: delete the rest.
    DeleteLeftovers { delete: Vec<String> },
    /// Create one automation per trigger, then delete `delete` (the previous set keeps
    /// working until the whole new set is accepted).
    Replace { create: usize, delete: Vec<String> },
    /// The triggers are unchanged, but the automations of these triggers were deleted
    /// or edited in Prefect: each gets one that says what it says again, then the
    /// edited ones and any left over are deleted, except those in `gone`: recorded, but
    /// Prefect no longer has them, so there is nothing to delete. The others are kept as
    /// they are (with their state).
    Restore {
        triggers: Vec<RestoredTrigger>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        gone: Vec<String>,
    },
    /// Nothing recorded, but the automations that run the deployment are exactly the
    /// ones the triggers describe (made by Prefect's own `apply()`, say): take them as
    /// they are, in trigger order, without a write.
    Adopt { ids: Vec<String> },
}

/// A trigger whose automation is made again.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoredTrigger {
    /// Its position in the spec's triggers.
    pub index: usize,
    /// An automation that already says what the trigger says and runs the deployment,
    /// but is not in status (an earlier pass made it, and this pass sees an older
    /// status): taken instead of making another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub take: Option<String>,
}

impl Plan {
    /// Whether performing the plan writes nothing to Prefect (adopting automations only
    /// records their ids).
    pub fn is_noop(&self) -> bool {
        let writes_deployment = match &self.deployment {
            DeploymentAction::Update { .. } => false,
            // Taking a deployment over only records its id; retiring one deletes.
            DeploymentAction::Resume { retire, .. } | DeploymentAction::Adopt { retire, .. } => {
                retire.is_some()
            }
            DeploymentAction::Create { .. } | DeploymentAction::Conflict { .. } => true,
        };
        let writes_limit = self
            .limit
            .as_ref()
            .is_some_and(|l| !matches!(l.action, LimitAction::Keep { .. }));
        !writes_deployment
            && !writes_limit
            && !self.release_own_limit
            && !self.detach_shared_limit
            && self.delete_limit.is_none()
            && self.fields.is_empty()
            && self.schedules.is_empty()
            && matches!(
                self.automations,
                AutomationAction::Unchanged | AutomationAction::Adopt { .. }
            )
    }

    /// The PATCH body for the field changes.
    pub fn patch_body(&self) -> Value {
        let map: Map<String, Value> = self
            .fields
            .iter()
            .map(|f| (f.field.clone(), f.to.clone()))
            .collect();
        Value::Object(map)
    }
}

/// The deployment `plan` will act on and the recorded automation state that holds for
/// it: taking over a deployment starts from nothing recorded.
fn target(
    want: &DesiredDeployment,
    recorded: &SyncState,
    by_name: Option<&ObservedDeployment>,
    recorded_exists: Option<bool>,
    holder: Option<&Holder>,
) -> DeploymentAction {
    let known = recorded.deployment_id.clone();
    match by_name {
        Some(found) => {
            let id = found.id.clone();
            let recorded_here = known.as_deref() == Some(found.id.as_str());
            let owner = found.label(OWNER_LABEL);
            let made_here = owner == Some(want.owner_uid.as_str());
            // Two resources writing one deployment would undo each other's writes on
            // every pass. The one that made it keeps it; else the one that already
            // manages it; of two that both took it over, the first.
            if let Some(h) = holder.filter(|_| !made_here) {
                if owner == Some(h.uid.as_str()) || !recorded_here || h.senior {
                    let mine = recorded.automation_ids.iter();
                    let let_go = recorded_here.then(|| {
                        mine.filter(|a| !h.automations.contains(a))
                            .cloned()
                            .collect()
                    });
                    return DeploymentAction::Conflict {
                        id,
                        holder: Some(h.resource.clone()),
                        let_go,
                    };
                }
            }
            if recorded_here {
                DeploymentAction::Update { id }
            } else if made_here {
                DeploymentAction::Resume { id, retire: known }
            } else if want.adopt_existing {
                DeploymentAction::Adopt { id, retire: known }
            } else {
                DeploymentAction::Conflict {
                    id,
                    holder: None,
                    let_go: None,
                }
            }
        }
        None => DeploymentAction::Create {
            // A recorded deployment that is gone is not retired, only replaced.
            retire: known.filter(|_| recorded_exists == Some(true)),
            schedules_in_body: want.schedules_in_create_body(),
        },
    }
}

/// What `observe` must read beyond the deployment by name, given that answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reads {
    /// Read the recorded deployment by id (does it still exist?).
    pub recorded: Option<String>,
    /// List the automations related to this deployment id.
    pub related_automations: Option<String>,
    /// Read the named global concurrency limit.
    pub limit: Option<String>,
}

impl Reads {
    /// Nothing to read but the automations.
    pub fn only_automations(&self) -> bool {
        self.recorded.is_none() && self.limit.is_none()
    }
}

pub fn reads(
    want: &DesiredDeployment,
    recorded: &SyncState,
    by_name: Option<&ObservedDeployment>,
    holder: Option<&Holder>,
) -> Reads {
    let limit = want.limit.as_ref().map(|l| l.name.clone());
    if by_name.is_none() {
        return Reads {
            recorded: recorded.deployment_id.clone(),
            related_automations: None,
            limit,
        };
    }
    // Only the automations of a set this resource made for the current triggers are
    // checked; a changed spec replaces the set anyway.
    let check = |id: &str| {
        recorded.check_automations
            && !recorded.automation_ids.is_empty()
            && recorded.triggers_hash.as_deref() == Some(want.triggers_hash(id).as_str())
    };
    let related = match target(want, recorded, by_name, None, holder) {
        DeploymentAction::Update { id } => (previous_unknown(recorded) || check(&id)).then_some(id),
        // Taking a deployment over starts from nothing recorded.
        DeploymentAction::Resume { id, .. } | DeploymentAction::Adopt { id, .. } => Some(id),
        _ => None,
    };
    Reads {
        recorded: None,
        related_automations: related,
        // Attached to the limit recorded in status under that name: the deployment's
        // own answer carries the limit, no read needed.
        limit: limit.filter(|name| !limit_known(recorded, by_name, name)),
    }
}

/// The deployment is attached to the limit status recorded under `name`, and Prefect's
/// answer about the deployment shows that limit's settings.
fn limit_known(recorded: &SyncState, by_name: Option<&ObservedDeployment>, name: &str) -> bool {
    let attached = by_name.and_then(|d| d.shared_limit());
    match (&recorded.limit, attached) {
        (Some(r), Some(a)) => r.name == name && a.name == name && a.id == r.id,
        _ => false,
    }
}

/// The limit `plan` works with: the one read by name, else the one the deployment is
/// attached to when that is the recorded one (the read was skipped).
fn observed_limit(
    want: &DesiredDeployment,
    recorded: &SyncState,
    observed: &Observed,
) -> Option<ObservedLimit> {
    let name = &want.limit.as_ref()?.name;
    observed.limit.clone().or_else(|| {
        let by_name = observed.by_name.as_ref();
        limit_known(recorded, by_name, name)
            .then(|| by_name.and_then(|d| d.shared_limit()))
            .flatten()
    })
}

/// What to do to the named limit the spec asks for.
fn limit_plan(want: &DesiredDeployment, actual: Option<&ObservedLimit>) -> Option<LimitPlan> {
    let w = want.limit.as_ref()?;
    let action = match actual {
        None => match w.create_body() {
            Some(body) => LimitAction::Create { body },
            None => LimitAction::Missing,
        },
        Some(a) => {
            let fields: Vec<FieldChange> = w
                .settings
                .iter()
                .filter(|(k, v)| !same(v, &a.setting(k)))
                .map(|(k, v)| FieldChange {
                    field: k.clone(),
                    from: a.setting(k),
                    to: v.clone(),
                })
                .collect();
            if fields.is_empty() {
                LimitAction::Keep { id: a.id.clone() }
            } else {
                LimitAction::Update {
                    id: a.id.clone(),
                    fields,
                }
            }
        }
    };
    Some(LimitPlan {
        name: w.name.clone(),
        action,
    })
}

/// The change to `global_concurrency_limit_id` that attaches the deployment to the
/// limit the spec names, or detaches it from a named one the spec no longer names.
fn limit_field(
    limit: Option<&LimitPlan>,
    actual: Option<&ObservedDeployment>,
) -> Option<FieldChange> {
    let now = actual.and_then(|d| d.shared_limit()).map(|l| l.id);
    let to = match limit {
        Some(l) => match l.id() {
            Some(id) => Value::String(id.to_string()),
            None => Value::String(format!("(the id of {})", l.name)),
        },
        None => Value::Null,
    };
    let from = now.map(Value::String).unwrap_or(Value::Null);
    (from != to).then(|| FieldChange {
        field: LIMIT_ID_FIELD.into(),
        from,
        to,
    })
}

/// A limit this resource created that the spec no longer names.
fn limit_to_delete(want: &DesiredDeployment, recorded: &SyncState) -> Option<LimitRecord> {
    let r = recorded.limit.as_ref().filter(|r| r.created)?;
    let still_named = want.limit.as_ref().is_some_and(|l| l.name == r.name);
    (!still_named && !recorded.limit_shared).then(|| r.clone())
}

/// Nothing recorded says which automations the triggers replace.
fn previous_unknown(recorded: &SyncState) -> bool {
    recorded.triggers_hash.is_none() && recorded.automation_ids.is_empty()
}

/// The plan that brings Prefect from `observed` to `want`.
pub fn plan(want: &DesiredDeployment, recorded: &SyncState, observed: &Observed) -> Plan {
    let deployment = target(
        want,
        recorded,
        observed.by_name.as_ref(),
        observed.recorded_exists,
        observed.holder.as_ref(),
    );
    let mut plan = Plan {
        flow_name: want.flow_name.clone(),
        name: want.name.clone(),
        deployment: deployment.clone(),
        fields: Vec::new(),
        schedules: Vec::new(),
        automations: AutomationAction::Unchanged,
        read_back: false,
        drift: Vec::new(),
        record_ignored: ignored_values(want),
        limit: None,
        release_own_limit: false,
        detach_shared_limit: false,
        delete_limit: None,
    };
    if !matches!(deployment, DeploymentAction::Conflict { .. }) {
        let limit = observed_limit(want, recorded, observed);
        plan.limit = limit_plan(want, limit.as_ref());
        plan.delete_limit = limit_to_delete(want, recorded);
    }
    let (id, actual, from) = match (&deployment, &observed.by_name) {
        (DeploymentAction::Conflict { .. }, _) => return plan,
        (DeploymentAction::Create { .. }, _) | (_, None) => {
            plan.schedules = want
                .schedules
                .iter()
                .map(|s| ScheduleChange::Create {
                    slug: s.slug.clone(),
                    body: s.body.clone(),
                })
                .collect();
            // Nothing can refer to a deployment id that does not exist yet.
            plan.automations = AutomationAction::Replace {
                create: want.automations.len(),
                delete: Vec::new(),
            };
            plan.read_back = reads_back(&plan.schedules);
            if let Some(change) = limit_field(plan.limit.as_ref(), None) {
                plan.fields.push(change);
            }
            return report_only(plan, want, recorded);
        }
        (DeploymentAction::Update { id }, Some(actual)) => (id, actual, recorded.clone()),
        (
            DeploymentAction::Resume { id, .. } | DeploymentAction::Adopt { id, .. },
            Some(actual),
        ) => (id, actual, SyncState::default()),
    };
    plan.fields = field_changes(want, actual);
    match limit_field(plan.limit.as_ref(), Some(actual)) {
        Some(change) if change.to.is_null() => plan.detach_shared_limit = true,
        Some(change) => {
            plan.fields.push(change);
            plan.fields.sort_by(|a, b| a.field.cmp(&b.field));
        }
        None => {}
    }
    plan.release_own_limit =
        want.limit.is_some() && !actual.field("concurrency_limit").is_none_or(Value::is_null);
    plan.schedules = schedule_changes(want, &actual.schedules);
    // What people own in Prefect is left alone unless the spec's value changed since
    // it was last applied (then it is applied once).
    let owned = |key: &str| {
        plan.record_ignored.contains_key(key)
            && plan.record_ignored.get(key) == from.applied_ignored.get(key)
    };
    plan.fields.retain(|f| !owned(&f.field));
    if want.ignored.contains(&IgnoredField::SchedulesActive) {
        let actual_active = |id: &str| {
            actual
                .schedules
                .iter()
                .find(|a| a.id == id)
                .and_then(|a| a.active)
        };
        plan.schedules.retain_mut(|c| {
            let ScheduleChange::Update { slug, id, body, .. } = c else {
                return true;
            };
            if !owned(&format!("schedules.active/{slug}")) {
                return true;
            }
            let Some(active) = actual_active(id) else {
                return true;
            };
            body["active"] = Value::Bool(active);
            actual
                .schedules
                .iter()
                .find(|a| a.id == *id)
                .is_none_or(|a| !schedule_same(body, a) || a.slug.as_ref() != Some(slug))
        });
    }
    plan.automations = automation_action(want, &from, id, observed.related_automations.as_deref());
    plan.read_back = reads_back(&plan.schedules);
    report_only(plan, want, &from)
}

/// The fingerprints of the spec's values of its ignored fields.
pub fn ignored_values(want: &DesiredDeployment) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for f in &want.ignored {
        match f.prefect_field() {
            Some(key) => {
                let v = want.fields.get(key).cloned().unwrap_or(Value::Null);
                out.insert(key.to_string(), crate::desired::fingerprint(&[v]));
            }
            None => {
                for s in &want.schedules {
                    out.insert(
                        format!("schedules.active/{}", s.slug),
                        crate::desired::fingerprint(&[s.body["active"].clone()]),
                    );
                }
            }
        }
    }
    out
}

/// With driftPolicy Report, a drift check (the spec unchanged since it was applied)
/// writes nothing to the deployment: the differences are listed instead.
fn report_only(mut plan: Plan, want: &DesiredDeployment, recorded: &SyncState) -> Plan {
    if !(want.report_drift && recorded.spec_applied) {
        return plan;
    }
    let mut drift: Vec<String> = Vec::new();
    if let DeploymentAction::Create { .. } = plan.deployment {
        drift.push("deployment (missing in Prefect)".into());
        plan.deployment = DeploymentAction::Update {
            id: recorded.deployment_id.clone().unwrap_or_default(),
        };
        plan.automations = AutomationAction::Unchanged;
    }
    if let Some(l) = &mut plan.limit {
        match &l.action {
            LimitAction::Update { id, fields } => {
                let name = &l.name;
                drift.extend(
                    fields
                        .iter()
                        .map(|f| format!("globalConcurrencyLimit {name}: {}", f.field)),
                );
                l.action = LimitAction::Keep { id: id.clone() };
            }
            LimitAction::Create { .. } => {
                drift.push(format!(
                    "globalConcurrencyLimit {} (missing in Prefect)",
                    l.name
                ));
                plan.limit = None;
            }
            LimitAction::Keep { .. } | LimitAction::Missing => {}
        }
    }
    if let AutomationAction::Restore { triggers, .. } = &plan.automations {
        let names: Vec<String> = triggers
            .iter()
            .map(|t| {
                want.automations[t.index]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        drift.push(format!("automations {}", names.join(", ")));
        plan.automations = AutomationAction::Unchanged;
    }
    plan.release_own_limit = false;
    if std::mem::take(&mut plan.detach_shared_limit) {
        drift.push(LIMIT_ID_FIELD.to_string());
    }
    drift.extend(plan.fields.drain(..).map(|f| f.field));
    drift.extend(plan.schedules.drain(..).map(|c| match c {
        ScheduleChange::Create { slug, .. } => format!("schedules.{slug} (missing)"),
        ScheduleChange::Update { slug, .. } => format!("schedules.{slug}"),
        ScheduleChange::Delete { slug, .. } => {
            format!(
                "schedules.{} (not in the spec)",
                slug.unwrap_or_else(|| "(no slug)".into())
            )
        }
    }));
    plan.read_back = false;
    plan.drift = drift;
    plan
}

/// The fields Prefect reports differently from the spec. Prefect checks parameters
/// against the schema in the same request, so a change to any of the three sends all
/// three and a change to both is judged as a whole.
fn field_changes(want: &DesiredDeployment, actual: &ObservedDeployment) -> Vec<FieldChange> {
    const PARAMS: [&str; 3] = [
        "parameters",
        "parameter_openapi_schema",
        "enforce_parameter_schema",
    ];
    let mut out: BTreeMap<&str, FieldChange> = BTreeMap::new();
    let change = |key: &str, to: &Value| FieldChange {
        field: key.to_string(),
        from: actual.field(key).cloned().unwrap_or(Value::Null),
        to: to.clone(),
    };
    let patchable = |key: &str| !want.create_only.contains(&key);
    for (key, value) in want.fields.iter().filter(|(k, _)| patchable(k)) {
        if actual.field(key).is_some_and(|a| !same(value, a)) {
            out.insert(key, change(key, value));
        }
    }
    if PARAMS.iter().any(|k| out.contains_key(k)) {
        for k in PARAMS.into_iter().filter(|k| patchable(k)) {
            if let Some(v) = want.fields.get(k) {
                out.entry(k).or_insert_with(|| change(k, v));
            }
        }
    }
    out.into_values().collect()
}

fn schedule_changes(want: &DesiredDeployment, actual: &[ObservedSchedule]) -> Vec<ScheduleChange> {
    if !want.schedules_by_slug {
        return schedule_changes_by_definition(want, actual);
    }
    let wanted = |slug: &Option<String>| {
        want.schedules
            .iter()
            .any(|w| Some(&w.slug) == slug.as_ref())
    };
    // Schedules in Prefect that no desired schedule claims by slug: deleted, unless a
    // desired schedule renames one (`replaces`), or one with the same definition has
    // no slug of its own yet (made by another tool); those keep their id and runs.
    let mut unclaimed: Vec<&ObservedSchedule> =
        actual.iter().filter(|a| !wanted(&a.slug)).collect();
    let mut updates = Vec::new();
    let mut creates = Vec::new();
    for w in &want.schedules {
        if let Some(a) = actual.iter().find(|a| a.slug.as_ref() == Some(&w.slug)) {
            if !schedule_same(&w.body, a) {
                updates.push(ScheduleChange::Update {
                    slug: w.slug.clone(),
                    id: a.id.clone(),
                    renamed_from: None,
                    body: w.body.clone(),
                });
            }
            continue;
        }
        let by_rename = unclaimed
            .iter()
            .position(|a| w.replaces.is_some() && a.slug == w.replaces);
        let by_definition = || {
            unclaimed
                .iter()
                .position(|a| a.slug.is_none() && schedule_same(&w.body, a))
        };
        match by_rename.or_else(by_definition) {
            Some(i) => {
                let a = unclaimed.remove(i);
                updates.push(ScheduleChange::Update {
                    slug: w.slug.clone(),
                    id: a.id.clone(),
                    renamed_from: Some(a.slug.clone().unwrap_or_default()),
                    body: w.body.clone(),
                });
            }
            None => creates.push(ScheduleChange::Create {
                slug: w.slug.clone(),
                body: w.body.clone(),
            }),
        }
    }
    in_order(unclaimed, updates, creates)
}

/// Deletions of the schedules nothing claimed first, then updates, then creations: the
/// order `Plan.schedules` promises.
fn in_order(
    unclaimed: Vec<&ObservedSchedule>,
    updates: Vec<ScheduleChange>,
    creates: Vec<ScheduleChange>,
) -> Vec<ScheduleChange> {
    let mut out: Vec<ScheduleChange> = unclaimed
        .into_iter()
        .map(|a| ScheduleChange::Delete {
            slug: a.slug.clone(),
            id: a.id.clone(),
        })
        .collect();
    out.extend(updates);
    out.extend(creates);
    out
}

/// For a server without schedule slugs: a schedule in Prefect that says what a desired
/// one says is that one; the others are deleted, the missing ones created.
fn schedule_changes_by_definition(
    want: &DesiredDeployment,
    actual: &[ObservedSchedule],
) -> Vec<ScheduleChange> {
    let mut unclaimed: Vec<&ObservedSchedule> = actual.iter().collect();
    let mut creates = Vec::new();
    for w in &want.schedules {
        match unclaimed.iter().position(|a| schedule_same(&w.body, a)) {
            Some(i) => {
                unclaimed.remove(i);
            }
            None => creates.push(ScheduleChange::Create {
                slug: w.slug.clone(),
                body: w.body.clone(),
            }),
        }
    }
    in_order(unclaimed, Vec::new(), creates)
}

fn automation_action(
    want: &DesiredDeployment,
    recorded: &SyncState,
    id: &str,
    related: Option<&[ObservedAutomation]>,
) -> AutomationAction {
    let n = want.automations.len();
    if recorded.triggers_hash.as_deref() == Some(want.triggers_hash(id).as_str()) {
        let triggers = changed_in_prefect(want, recorded, id, related);
        if !triggers.is_empty() {
            let has = |aid: &String| related.unwrap_or_default().iter().any(|a| a.id == *aid);
            let gone = recorded
                .automation_ids
                .iter()
                .filter(|aid| !has(aid))
                .cloned()
                .collect();
            return AutomationAction::Restore { triggers, gone };
        }
        return if recorded.automation_ids.len() > n {
            AutomationAction::DeleteLeftovers {
                delete: recorded.automation_ids[n..].to_vec(),
            }
        } else {
            AutomationAction::Unchanged
        };
    }
    // The set being replaced: the ids recorded, or, on a first apply to a deployment
    // that already existed, the automations another tool (Prefect's own `apply()`, an
    // earlier install) made to run this deployment.
    let delete = if recorded.triggers_hash.is_some() || !recorded.automation_ids.is_empty() {
        recorded.automation_ids.clone()
    } else {
        let running: Vec<&ObservedAutomation> = related
            .unwrap_or_default()
            .iter()
            .filter(|a| a.runs_deployment(id))
            .collect();
        if let Some(ids) = matching(&want.automations_for(id), &running) {
            return AutomationAction::Adopt { ids };
        }
        running.iter().map(|a| a.id.clone()).collect()
    };
    AutomationAction::Replace { create: n, delete }
}

/// The triggers whose recorded automation is missing from `observed` (the automations
/// related to the deployment) or no longer says what the trigger says; none when the
/// automations were not read.
fn changed_in_prefect(
    want: &DesiredDeployment,
    recorded: &SyncState,
    id: &str,
    observed: Option<&[ObservedAutomation]>,
) -> Vec<RestoredTrigger> {
    let Some(observed) = observed else {
        return Vec::new();
    };
    let bodies = want.automations_for(id);
    let in_place = |i: usize| {
        recorded
            .automation_ids
            .get(i)
            .and_then(|aid| observed.iter().find(|a| a.id == *aid))
            .is_some_and(|a| automation_same(&bodies[i], a))
    };
    // Automations that run the deployment but are not in status: an earlier pass made
    // them and this one reads an older status (automations, unlike deployments, may
    // share a name, so making another would double it).
    let mut spare: Vec<&ObservedAutomation> = observed
        .iter()
        .filter(|a| a.runs_deployment(id) && !recorded.automation_ids.contains(&a.id))
        .collect();
    (0..bodies.len())
        .filter(|i| !in_place(*i))
        .map(|index| {
            let take = spare
                .iter()
                .position(|a| automation_same(&bodies[index], a))
                .map(|k| spare.remove(k).id.clone());
            RestoredTrigger { index, take }
        })
        .collect()
}

/// The ids of `actual`, one per desired body in its order, when each body has exactly
/// one automation that says the same; `None` otherwise (or when there are more).
fn matching(bodies: &[Value], actual: &[&ObservedAutomation]) -> Option<Vec<String>> {
    if bodies.len() != actual.len() || bodies.is_empty() {
        return None;
    }
    let mut free: Vec<&ObservedAutomation> = actual.to_vec();
    let mut ids = Vec::with_capacity(bodies.len());
    for body in bodies {
        let i = free.iter().position(|a| automation_same(body, a))?;
        ids.push(free.remove(i).id.clone());
    }
    Some(ids)
}

/// A desired `AutomationCreate` body against an automation Prefect returned: the same
/// name, description, enabled flag, trigger (ignoring the ids Prefect gives triggers)
/// and actions.
fn automation_same(want: &Value, actual: &ObservedAutomation) -> bool {
    let field = |k: &str| actual.fields.get(k).unwrap_or(&Value::Null);
    let mut trigger = field("trigger").clone();
    strip_ids(&mut trigger);
    let wanted = |i: usize, k: &str| want["actions"].get(i).and_then(|a| a.get(k)).cloned();
    let actions: Vec<Value> = actual
        .actions
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut v = Value::Object(a.fields.clone());
            v["type"] = Value::String(a.type_.clone());
            if let Some(d) = &a.deployment_id {
                v["deployment_id"] = Value::String(d.clone());
            }
            // A server older than `schedule_after` (3.1, early 3.4) leaves it out of its
            // answer: a difference it cannot hold, not one to mend on every check.
            if !a.fields.contains_key("schedule_after") {
                if let Some(w) = wanted(i, "schedule_after") {
                    v["schedule_after"] = w;
                }
            }
            v
        })
        .collect();
    ["name", "description", "enabled"]
        .iter()
        .all(|k| same(&want[*k], field(k)))
        && same(&want["trigger"], &trigger)
        && same(&want["actions"], &Value::Array(actions))
}

/// Removes the `id` Prefect adds to a trigger and to each child trigger.
fn strip_ids(trigger: &mut Value) {
    if let Value::Object(t) = trigger {
        t.remove("id");
        if let Some(Value::Array(children)) = t.get_mut("triggers") {
            children.iter_mut().for_each(strip_ids);
        }
    }
}

/// Whether a schedule written by these changes is an interval without an anchor date.
fn reads_back(changes: &[ScheduleChange]) -> bool {
    changes.iter().any(|c| match c {
        ScheduleChange::Create { body, .. } | ScheduleChange::Update { body, .. } => {
            body.pointer("/schedule/interval").is_some()
                && body.pointer("/schedule/anchor_date").is_none()
        }
        ScheduleChange::Delete { .. } => false,
    })
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Structural equality as Prefect round-trips values: null, {} and [] are the same
/// "nothing", numbers compare by value (3600 == 3600.0), a missing key equals null.
pub fn same(a: &Value, b: &Value) -> bool {
    if is_empty(a) && is_empty(b) {
        return true;
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Object(x), Value::Object(y)) => x.keys().chain(y.keys()).all(|k| {
            same(
                x.get(k).unwrap_or(&Value::Null),
                y.get(k).unwrap_or(&Value::Null),
            )
        }),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        _ => a == b,
    }
}

/// Compares a desired `DeploymentScheduleCreate` body with a schedule Prefect returned,
/// allowing for what Prefect fills in itself: an anchor date when none was given, and a
/// default DTSTART on rrules.
pub fn schedule_same(want: &Value, actual: &ObservedSchedule) -> bool {
    let null = Value::Null;
    let active = actual.active.map(Value::Bool).unwrap_or(Value::Null);
    let pairs = [
        ("active", &active),
        (
            "max_scheduled_runs",
            actual.max_scheduled_runs.as_ref().unwrap_or(&null),
        ),
        ("parameters", actual.parameters.as_ref().unwrap_or(&null)),
    ];
    if !pairs.iter().all(|(k, a)| same(&want[*k], a)) {
        return false;
    }
    let Some(w) = want["schedule"].as_object() else {
        return false;
    };
    w.iter().all(|(k, wv)| {
        let av = actual.schedule.get(k).unwrap_or(&Value::Null);
        match k.as_str() {
            "anchor_date" => match (wv.as_str(), av.as_str()) {
                (Some(x), Some(y)) => {
                    let parse = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok();
                    matches!((parse(x), parse(y)), (Some(p), Some(q)) if p == q)
                }
                _ => false,
            },
            "rrule" => match (wv.as_str(), av.as_str()) {
                (Some(x), Some(y)) => rrule_same(x, y),
                _ => false,
            },
            // A schedule stored without a zone (by Prefect's own client) runs in UTC.
            "timezone" if av.is_null() => wv == "UTC",
            _ => same(wv, av),
        }
    })
}

/// Prefect prepends `DTSTART:20200101T000000` to an rrule given without one.
fn rrule_same(want: &str, actual: &str) -> bool {
    let strip = |s: &str| -> String {
        s.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.to_ascii_uppercase().starts_with("DTSTART"))
            .map(|l| l.strip_prefix("RRULE:").unwrap_or(l).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    if want.to_ascii_uppercase().contains("DTSTART") {
        want.trim() == actual.trim()
    } else {
        strip(want) == strip(actual)
    }
}

/// The plan as a person reads it: what `diff` prints.
impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = format!("{}/{}", self.flow_name, self.name);
        match &self.deployment {
            DeploymentAction::Conflict {
                id,
                holder: Some(holder),
                let_go,
            } => {
                write!(
                    f,
                    "{who}: conflict: Prefect deployment {id} is managed by PrefectDeployment {holder}"
                )?;
                return match let_go {
                    Some(ids) if !ids.is_empty() => writeln!(
                        f,
                        "; this resource lets go of it and deletes its automation(s) {}",
                        ids.join(", ")
                    ),
                    Some(_) => writeln!(f, "; this resource lets go of it"),
                    None => writeln!(f),
                };
            }
            DeploymentAction::Conflict {
                id, holder: None, ..
            } => {
                return writeln!(
                    f,
                    "{who}: conflict: Prefect deployment {id} was not made by this resource (set spec.adoptExisting: true to manage it)"
                )
            }
            DeploymentAction::Update { .. } if self.is_noop() && !self.drift.is_empty() => {
                return writeln!(
                    f,
                    "{who}: no changes (driftPolicy Report leaves these differences: {})",
                    self.drift.join(", ")
                )
            }
            DeploymentAction::Update { .. } if self.is_noop() => {
                return writeln!(f, "{who}: no changes")
            }
            DeploymentAction::Update { id } => writeln!(f, "{who}: update {id}")?,
            DeploymentAction::Resume { id, retire } => {
                writeln!(f, "{who}: take back {id} (made by this resource)")?;
                if let Some(old) = retire {
                    writeln!(f, "  delete previous deployment {old} and its automations")?;
                }
            }
            DeploymentAction::Adopt { id, retire } => {
                writeln!(f, "{who}: adopt {id}")?;
                if let Some(old) = retire {
                    writeln!(f, "  delete previous deployment {old} and its automations")?;
                }
            }
            DeploymentAction::Create { retire, .. } => {
                writeln!(f, "{who}: create")?;
                if let Some(old) = retire {
                    writeln!(f, "  then delete previous deployment {old} and its automations")?;
                }
            }
        }
        if let Some(l) = &self.limit {
            match &l.action {
                LimitAction::Keep { .. } => {}
                LimitAction::Create { body } => writeln!(
                    f,
                    "  global concurrency limit {}: create {}",
                    l.name,
                    short(body)
                )?,
                LimitAction::Update { fields, .. } => {
                    for c in fields {
                        writeln!(
                            f,
                            "  global concurrency limit {}: {}: {} -> {}",
                            l.name,
                            c.field,
                            short(&c.from),
                            short(&c.to)
                        )?;
                    }
                }
                LimitAction::Missing => writeln!(
                    f,
                    "  global concurrency limit {}: missing, and no limit given to create it",
                    l.name
                )?,
            }
        }
        if self.release_own_limit {
            writeln!(
                f,
                "  concurrency_limit: drop the deployment's own limit first"
            )?;
        }
        if self.detach_shared_limit {
            writeln!(f, "  {LIMIT_ID_FIELD}: detach from the named limit first")?;
        }
        for c in &self.fields {
            writeln!(f, "  {}: {} -> {}", c.field, short(&c.from), short(&c.to))?;
        }
        if let Some(l) = &self.delete_limit {
            writeln!(
                f,
                "  delete global concurrency limit {} (made by this resource)",
                l.name
            )?;
        }
        for s in &self.schedules {
            match s {
                ScheduleChange::Create { slug, body } => {
                    writeln!(f, "  schedule {slug}: create {}", short(&body["schedule"]))?
                }
                ScheduleChange::Update {
                    slug,
                    body,
                    renamed_from: Some(old),
                    ..
                } => writeln!(
                    f,
                    "  schedule {slug}: rename from {}, update to {}",
                    if old.is_empty() { "(no slug)" } else { old },
                    short(&body["schedule"])
                )?,
                ScheduleChange::Update { slug, body, .. } => writeln!(
                    f,
                    "  schedule {slug}: update to {}",
                    short(&body["schedule"])
                )?,
                ScheduleChange::Delete { slug, id } => writeln!(
                    f,
                    "  schedule {}: delete ({id})",
                    slug.as_deref().unwrap_or("(no slug)")
                )?,
            }
        }
        match &self.automations {
            AutomationAction::Unchanged => {}
            AutomationAction::DeleteLeftovers { delete } => {
                writeln!(f, "  automations: delete left over {}", delete.join(", "))?
            }
            AutomationAction::Adopt { ids } => {
                writeln!(f, "  automations: take the existing {}", ids.join(", "))?
            }
            AutomationAction::Replace { create, delete } if delete.is_empty() => {
                writeln!(f, "  automations: create {create}")?
            }
            AutomationAction::Replace { create, delete } => writeln!(
                f,
                "  automations: create {create}, then delete {}",
                delete.join(", ")
            )?,
            AutomationAction::Restore { triggers, .. } => {
                let which: Vec<String> = triggers
                    .iter()
                    .map(|t| match &t.take {
                        Some(id) => format!("trigger #{} (taking {id})", t.index + 1),
                        None => format!("trigger #{}", t.index + 1),
                    })
                    .collect();
                writeln!(
                    f,
                    "  automations: restore {}, deleted or edited in Prefect",
                    which.join(", ")
                )?
            }
        }
        Ok(())
    }
}

/// A value on one line, cut to keep the diff readable.
fn short(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 120 {
        let cut: String = text.chars().take(119).collect();
        format!("{cut}…")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_resource_created_first_is_senior_and_one_not_created_yet_comes_last() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let meta = |ns: &str, name: &str, at: Option<&str>| ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            creation_timestamp: at.map(|t| Time(t.parse().unwrap())),
            ..ObjectMeta::default()
        };
        let early = meta("b", "early", Some("2026-01-01T00:00:00Z"));
        let late = meta("a", "late", Some("2026-01-02T00:00:00Z"));
        let same_second = meta("a", "zz", Some("2026-01-01T00:00:00Z"));
        let manifest = meta("a", "new", None);
        let h = Holder::new(&early, &late);
        assert_eq!(
            (h.resource.as_str(), h.uid.as_str()),
            ("b/early", "uid-early")
        );
        assert!(h.senior);
        assert!(!Holder::new(&late, &early).senior);
        // The same second: namespace, then name, decides.
        assert!(Holder::new(&same_second, &early).senior);
        assert!(!Holder::new(&early, &same_second).senior);
        assert!(Holder::new(&late, &manifest).senior);
        assert!(!Holder::new(&manifest, &late).senior);
    }

    #[test]
    fn a_new_server_leaves_the_recorded_deployment_to_delete_there() {
        let (a, b) = ("http://a:4200/api", "http://b:4200/api");
        let mut state = SyncState {
            deployment_id: Some("d1".into()),
            flow_id: Some("f1".into()),
            automation_ids: vec!["a1".into()],
            triggers_hash: Some("h".into()),
            spec_applied: true,
            ..SyncState::default()
        };
        // A status from before the server was recorded: taken as the spec's.
        assert!(!state.move_to(a));
        assert_eq!(state.deployment_id.as_deref(), Some("d1"));
        assert!(!state.move_to(a), "the same server again");
        assert!(state.move_to(b));
        assert_eq!(state.server.as_deref(), Some(b));
        assert_eq!(
            (state.deployment_id.as_ref(), state.flow_id.as_ref()),
            (None, None)
        );
        assert!(state.automation_ids.is_empty() && state.triggers_hash.is_none());
        assert!(
            !state.spec_applied,
            "a new server is an apply, not a drift check"
        );
        let left = PendingDeletion {
            deployment_id: "d1".into(),
            server: a.into(),
            limit: None,
        };
        assert_eq!(state.leftovers, vec![left.clone()]);
        assert!(state.leftovers_on(b).is_empty());
        assert_eq!(state.leftovers_on(a), vec!["d1".to_string()]);
        assert_eq!(
            state.leftovers_on(a),
            vec!["d1".to_string()],
            "kept until gone"
        );
        // The new URL reached the same server: the deployment found there is the one
        // recorded, which is then not deleted.
        state.deployment_id = Some("d1".into());
        assert!(state.leftovers_on(a).is_empty());
        assert!(state.leftovers.is_empty());
        // Moving back and forth records each once, and never more than status holds.
        for i in 0..40 {
            state.deployment_id = Some(format!("d{}", i % 20));
            state.move_to(if i % 2 == 0 { a } else { b });
        }
        assert_eq!(state.leftovers.len(), MAX_LEFTOVERS);
        // Those pushed out are kept aside to be told, not silently forgotten.
        let mut all: Vec<_> = state.leftovers.iter().chain(&state.dropped).collect();
        all.sort_by_key(|l| l.deployment_id[1..].parse::<u32>().unwrap());
        all.dedup_by_key(|l| &l.deployment_id);
        assert_eq!(all.len(), 20);
        state.gone("d19");
        assert!(state.leftovers.iter().all(|l| l.deployment_id != "d19"));
    }

    #[test]
    fn a_limit_the_resource_made_moves_out_with_its_deployment() {
        let (a, b) = ("http://a:4200/api", "http://b:4200/api");
        let made = LimitRecord {
            name: "db".into(),
            id: "l1".into(),
            created: true,
        };
        let mut state = SyncState {
            server: Some(a.into()),
            deployment_id: Some("d1".into()),
            limit: Some(made.clone()),
            ..SyncState::default()
        };
        assert!(state.move_to(b));
        assert_eq!(state.limit, None, "the limit's id names nothing on b");
        assert_eq!(state.leftovers[0].limit, Some(made.clone()));
        // Only attached to it: another resource's, left where it is.
        let mut attached = SyncState {
            server: Some(a.into()),
            deployment_id: Some("d2".into()),
            limit: Some(LimitRecord {
                created: false,
                ..made.clone()
            }),
            ..SyncState::default()
        };
        assert!(attached.move_to(b));
        assert_eq!(
            (attached.limit, attached.leftovers[0].limit.clone()),
            (None, None)
        );
        // Recorded again (a rename of what is already pending): the limit stays with it.
        state.leave("d1".into(), a.into(), None);
        assert_eq!(state.leftovers.len(), 1);
        assert_eq!(state.leftovers[0].limit, Some(made));
    }

    #[test]
    fn an_action_field_the_server_does_not_return_is_not_a_difference() {
        let want = json!({"name": "a", "enabled": true, "trigger": {"expect": ["x"]},
            "actions": [{"type": "run-deployment", "deployment_id": "d", "schedule_after": 0}]});
        let answer = |action: Value| -> ObservedAutomation {
            serde_json::from_value(json!({"id": "1", "name": "a", "enabled": true,
                "trigger": {"expect": ["x"], "id": "t"}, "actions": [action]}))
            .unwrap()
        };
        let older = answer(json!({"type": "run-deployment", "deployment_id": "d"}));
        assert!(automation_same(&want, &older), "a 3.1 server's answer");
        let same_delay =
            answer(json!({"type": "run-deployment", "deployment_id": "d", "schedule_after": 0.0}));
        assert!(automation_same(&want, &same_delay));
        let edited = answer(
            json!({"type": "run-deployment", "deployment_id": "d", "schedule_after": 600.0}),
        );
        assert!(!automation_same(&want, &edited), "an edit is still found");
    }

    #[test]
    fn same_treats_empty_values_alike() {
        assert!(same(&json!(null), &json!({})));
        assert!(same(&json!([]), &json!(null)));
        assert!(same(&json!(3600), &json!(3600.0)));
        assert!(same(&json!({"a": 1}), &json!({"a": 1, "b": null})));
        assert!(!same(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!same(&json!(["a", "b"]), &json!(["b", "a"])));
    }

    fn observed(v: Value) -> ObservedSchedule {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn schedule_same_allows_prefect_defaults() {
        let want = json!({"schedule": {"rrule": "FREQ=DAILY", "timezone": "UTC"}, "active": true, "max_scheduled_runs": null, "parameters": {}, "slug": "s"});
        let actual = observed(
            json!({"id": "x", "schedule": {"rrule": "DTSTART:20200101T000000\nFREQ=DAILY", "timezone": "UTC"}, "active": true, "max_scheduled_runs": null, "parameters": {}, "slug": "s"}),
        );
        assert!(schedule_same(&want, &actual));
        let want = json!({"schedule": {"interval": 60, "timezone": "UTC"}, "active": true, "parameters": {}});
        let actual = observed(
            json!({"id": "y", "schedule": {"interval": 60.0, "anchor_date": "2026-01-01T00:00:00Z", "timezone": "UTC"}, "active": true, "max_scheduled_runs": null, "parameters": {}}),
        );
        assert!(schedule_same(&want, &actual));
        let want = json!({"schedule": {"interval": 60, "anchor_date": "2026-01-01T01:00:00+01:00", "timezone": "UTC"}, "active": true});
        assert!(schedule_same(&want, &actual));
        let want = json!({"schedule": {"interval": 60, "timezone": "UTC"}, "active": false});
        assert!(!schedule_same(&want, &actual));
        // Stored without a zone (Prefect's own client) is UTC.
        let actual = observed(
            json!({"id": "z", "schedule": {"cron": "0 * * * *", "day_or": true, "timezone": null}, "active": true}),
        );
        let want = json!({"schedule": {"cron": "0 * * * *", "day_or": true, "timezone": "UTC"}, "active": true});
        assert!(schedule_same(&want, &actual));
        let want = json!({"schedule": {"cron": "0 * * * *", "day_or": true, "timezone": "Europe/Berlin"}, "active": true});
        assert!(!schedule_same(&want, &actual));
    }
}
