//! Applying the desired deployment to Prefect: flow, deployment, schedules by slug,
//! automations. No Kubernetes here: the state that must survive between passes comes in
//! and goes out as `SyncState`, which the caller keeps in the resource's status.
//!
//! Every step reads first and writes only what differs, so a pass over an unchanged
//! resource is one GET, and an interrupted pass can simply be run again.

use serde_json::{Map, Value};

use crate::api::{PrefectDeploymentSpec, TriggerType};
use crate::desired::{self, DesiredDeployment, DesiredSchedule, OWNER_LABEL};
use crate::prefect::PrefectClient;
use crate::validate::ValidSpec;
use crate::{Error, Result};

/// What the operator remembers between passes (mirrors the status fields).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncState {
    pub deployment_id: Option<String>,
    pub flow_id: Option<String>,
    pub automation_ids: Vec<String>,
    pub triggers_hash: Option<String>,
    /// The schedules as Prefect reported them in this pass (not kept in status): the
    /// source of anchor dates Prefect chose itself, for the next-run preview.
    pub schedules_seen: Vec<Value>,
}

/// Something the pass changed in Prefect, reported as a Kubernetes Event.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Created {
        id: String,
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
        }
    }

    pub fn message(&self) -> String {
        match self {
            Change::Created { id } => format!("Created Prefect deployment {id}"),
            Change::Adopted { id } => format!("Adopted existing Prefect deployment {id}"),
            Change::Replaced { old_id, new_id } => format!(
                "Name or flow changed: created Prefect deployment {new_id} and deleted {old_id}"
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
        }
    }
}

/// Applies `spec` to Prefect, updating `state` as each step succeeds (so the caller can
/// record progress even when a later step fails).
pub async fn apply(
    client: &PrefectClient,
    valid: &ValidSpec<'_>,
    owner_uid: &str,
    state: &mut SyncState,
    changes: &mut Vec<Change>,
) -> Result<()> {
    let (spec, name) = (valid.spec, valid.name.as_str());
    let want = desired::deployment(valid, owner_uid);
    let adopt = spec.adopt_existing.unwrap_or(false);

    let by_name = client
        .read_deployment_by_name(&want.flow_name, &want.name)
        .await?;
    let existing = match (by_name, state.deployment_id.clone()) {
        (Some(found), known) => {
            let found_id = str_field(&found, "id");
            if known.as_deref() != Some(found_id.as_str()) {
                // Not the deployment we recorded: take it only if it is provably ours
                // (an interrupted create) or the user asked for adoption.
                let ours = found
                    .get("labels")
                    .and_then(|l| l.get(OWNER_LABEL))
                    .and_then(Value::as_str)
                    == Some(owner_uid);
                if !ours && !adopt {
                    return Err(Error::Conflict(format!(
                        "Prefect already has a deployment {}/{} ({found_id}) that this resource did not create; set spec.adoptExisting: true to manage it",
                        want.flow_name, want.name
                    )));
                }
                if let Some(old) = known {
                    retire(client, &old).await?;
                }
                if !ours {
                    changes.push(Change::Adopted {
                        id: found_id.clone(),
                    });
                }
                state.deployment_id = Some(found_id);
                state.triggers_hash = None;
                state.automation_ids.clear();
            }
            Some(found)
        }
        (None, Some(known)) => {
            // Either deleted in Prefect (create it again) or renamed in the spec (create
            // the new one, then remove the old one and its automations).
            if client.read_deployment(&known).await?.is_some() {
                let new_id = create(client, &want, state).await?;
                retire(client, &known).await?;
                changes.push(Change::Replaced {
                    old_id: known,
                    new_id,
                });
            } else {
                let id = create(client, &want, state).await?;
                changes.push(Change::Created { id });
            }
            None
        }
        (None, None) => {
            let id = create(client, &want, state).await?;
            changes.push(Change::Created { id });
            None
        }
    };
    let created = existing.is_none();
    let id = state
        .deployment_id
        .clone()
        .expect("deployment id is set above");
    if created && !want.schedules_in_create_body() {
        let bodies: Vec<Value> = want.schedules.iter().map(|s| s.body.clone()).collect();
        client.create_schedules(&id, &bodies).await?;
    }

    let written: Vec<String> = match &existing {
        Some(actual) => {
            state.flow_id = Some(str_field(actual, "flow_id"));
            state.schedules_seen = schedules_of(actual);
            update_fields(client, &id, &want, actual, changes).await?;
            update_schedules(client, &id, &want.schedules, actual, changes).await?
        }
        None => want.schedules.iter().map(|s| s.slug.clone()).collect(),
    };
    // Prefect anchors an interval schedule without anchor_date at the moment it stores
    // it; read that back once so the preview shows the runs Prefect will create.
    let unanchored = |s: &&DesiredSchedule| {
        s.body.pointer("/schedule/interval").is_some()
            && s.body.pointer("/schedule/anchor_date").is_none()
    };
    if want
        .schedules
        .iter()
        .filter(unanchored)
        .any(|s| written.contains(&s.slug))
    {
        if let Some(d) = client.read_deployment(&id).await? {
            state.schedules_seen = schedules_of(&d);
        }
    }
    apply_automations(client, spec, name, &id, created, state, changes).await
}

async fn create(
    client: &PrefectClient,
    want: &DesiredDeployment,
    state: &mut SyncState,
) -> Result<String> {
    let flow_id = client.upsert_flow(&want.flow_name).await?;
    let id = client
        .create_deployment(&want.create_body(&flow_id))
        .await?;
    state.deployment_id = Some(id.clone());
    state.flow_id = Some(flow_id);
    state.automation_ids.clear();
    state.triggers_hash = None;
    Ok(id)
}

/// Removes a deployment this resource no longer describes, with its automations.
async fn retire(client: &PrefectClient, id: &str) -> Result<()> {
    client
        .delete_owned_automations(&desired::owner_resource(id))
        .await?;
    client.delete_deployment(id).await?;
    Ok(())
}

async fn update_fields(
    client: &PrefectClient,
    id: &str,
    want: &DesiredDeployment,
    actual: &Value,
    changes: &mut Vec<Change>,
) -> Result<()> {
    let mut patch = Map::new();
    for (key, value) in &want.fields {
        let differs = desired::observed_field(actual, key).is_some_and(|a| !same(value, a));
        if differs {
            patch.insert(key.clone(), value.clone());
        }
    }
    if patch.is_empty() {
        return Ok(());
    }
    // Prefect checks parameters against the schema in the same request: send the three
    // together so a change to both is judged as a whole.
    const PARAMS: [&str; 3] = [
        "parameters",
        "parameter_openapi_schema",
        "enforce_parameter_schema",
    ];
    if PARAMS.iter().any(|k| patch.contains_key(*k)) {
        for k in PARAMS {
            patch.insert(k.into(), want.fields[k].clone());
        }
    }
    let fields: Vec<String> = patch.keys().cloned().collect();
    client.update_deployment(id, &Value::Object(patch)).await?;
    changes.push(Change::Updated { fields });
    Ok(())
}

async fn update_schedules(
    client: &PrefectClient,
    id: &str,
    want: &[DesiredSchedule],
    actual: &Value,
    changes: &mut Vec<Change>,
) -> Result<Vec<String>> {
    let actual: Vec<&Value> = actual
        .get("schedules")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let (mut created, mut updated, mut deleted) = (Vec::new(), Vec::new(), Vec::new());

    for a in &actual {
        let slug = a.get("slug").and_then(Value::as_str);
        if !want.iter().any(|w| Some(w.slug.as_str()) == slug) {
            client.delete_schedule(id, &str_field(a, "id")).await?;
            deleted.push(slug.unwrap_or("(no slug)").to_string());
        }
    }
    let mut to_create = Vec::new();
    for w in want {
        match actual
            .iter()
            .find(|a| a.get("slug").and_then(Value::as_str) == Some(w.slug.as_str()))
        {
            Some(a) if schedule_same(&w.body, a) => {}
            // Updated in place: the schedule keeps its id and its runs are re-planned
            // by Prefect, rather than dropped with a delete.
            Some(a) => {
                client
                    .update_schedule(id, &str_field(a, "id"), &w.body)
                    .await?;
                updated.push(w.slug.clone());
            }
            None => {
                to_create.push(w.body.clone());
                created.push(w.slug.clone());
            }
        }
    }
    if !to_create.is_empty() {
        client.create_schedules(id, &to_create).await?;
    }
    let written = created.iter().chain(&updated).cloned().collect();
    if !(created.is_empty() && updated.is_empty() && deleted.is_empty()) {
        changes.push(Change::SchedulesChanged {
            created,
            updated,
            deleted,
        });
    }
    Ok(written)
}

fn schedules_of(deployment: &Value) -> Vec<Value> {
    deployment
        .get("schedules")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

async fn apply_automations(
    client: &PrefectClient,
    spec: &PrefectDeploymentSpec,
    name: &str,
    id: &str,
    just_created: bool,
    state: &mut SyncState,
    changes: &mut Vec<Change>,
) -> Result<()> {
    let bodies = desired::automations(&spec.deployment, name, id);
    let hash = desired::fingerprint(&bodies);
    if state.triggers_hash.as_deref() == Some(hash.as_str()) {
        // Unchanged: no automation call at all, unless an earlier replacement could not
        // finish deleting the previous set (kept after the current ids).
        if state.automation_ids.len() > bodies.len() {
            let extra = state.automation_ids.split_off(bodies.len());
            for (k, old) in extra.iter().enumerate() {
                if let Err(e) = client.delete_automation(old).await {
                    state.automation_ids.extend_from_slice(&extra[k..]);
                    return Err(e);
                }
            }
        }
        return Ok(());
    }
    // The set being replaced: the ids we recorded. On a first apply to a deployment
    // that already existed, the automations another tool (Prefect's own `apply()`, a
    // previous install) made to run this deployment. A deployment created in this very
    // pass has a new id that nothing can refer to yet.
    let previous: Vec<String> = if just_created {
        Vec::new()
    } else if state.triggers_hash.is_some() || !state.automation_ids.is_empty() {
        state.automation_ids.clone()
    } else {
        client
            .automations_related_to(&desired::owner_resource(id))
            .await?
            .iter()
            .filter(|a| runs_deployment(a, id))
            .map(|a| str_field(a, "id"))
            .collect()
    };

    // Create the new set first; the previous one keeps working until all are accepted.
    let mut created = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        match client.create_automation(body).await {
            Ok(new) => created.push(new),
            Err(e) => {
                // Take back what this attempt made; the previous set stays as it was.
                for new in &created {
                    let _ = client.delete_automation(new).await;
                }
                return Err(trigger_error(spec, i, e));
            }
        }
    }
    // Recorded before the old set goes, so an interruption below leaves the new set
    // known and the leftovers (listed after it) to be deleted on the next pass.
    let leftovers: Vec<String> = previous
        .iter()
        .filter(|p| !created.contains(p))
        .cloned()
        .collect();
    state.automation_ids = created.iter().chain(&leftovers).cloned().collect();
    state.triggers_hash = Some(hash);
    for old in &leftovers {
        client.delete_automation(old).await?;
        state.automation_ids.retain(|x| x != old);
    }
    if !previous.is_empty() || !bodies.is_empty() {
        changes.push(Change::AutomationsReplaced {
            count: bodies.len(),
        });
    }
    Ok(())
}

/// Whether an automation's actions run deployment `id`.
fn runs_deployment(automation: &Value, id: &str) -> bool {
    automation
        .get("actions")
        .and_then(Value::as_array)
        .is_some_and(|actions| {
            actions.iter().any(|a| {
                a.get("type").and_then(Value::as_str) == Some("run-deployment")
                    && a.get("deployment_id").and_then(Value::as_str) == Some(id)
            })
        })
}

/// Names the trigger Prefect refused; for a metric trigger, says plainly that only
/// Prefect Cloud has them.
fn trigger_error(spec: &PrefectDeploymentSpec, index: usize, e: Error) -> Error {
    let Error::AutomationFailed(detail) = e else {
        return e;
    };
    let field = format!("spec.deployment.triggers[{index}]");
    let trigger = spec
        .deployment
        .triggers
        .as_deref()
        .and_then(|t| t.get(index));
    let metric = trigger.is_some_and(|t| {
        t.condition.type_ == Some(TriggerType::Metric)
            || t.triggers
                .iter()
                .flatten()
                .any(|c| c.type_ == Some(TriggerType::Metric))
    });
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
                .filter(|d| {
                    d.get("labels")
                        .and_then(|l| l.get(OWNER_LABEL))
                        .and_then(Value::as_str)
                        == Some(owner_uid)
                })
                .map(|d| str_field(&d, "id"))
        }
    };
    if let Some(id) = &id {
        retire(client, id).await?;
    }
    Ok(id)
}

fn str_field(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
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
pub fn schedule_same(want: &Value, actual: &Value) -> bool {
    for key in ["active", "max_scheduled_runs", "parameters"] {
        if !same(&want[key], actual.get(key).unwrap_or(&Value::Null)) {
            return false;
        }
    }
    let (w, a) = (
        &want["schedule"],
        actual.get("schedule").unwrap_or(&Value::Null),
    );
    let Some(w) = w.as_object() else { return false };
    w.iter().all(|(k, wv)| {
        let av = a.get(k).unwrap_or(&Value::Null);
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
    let want_has_start = want.to_ascii_uppercase().contains("DTSTART");
    if want_has_start {
        want.trim() == actual.trim()
    } else {
        strip(want) == strip(actual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_treats_empty_values_alike() {
        assert!(same(&json!(null), &json!({})));
        assert!(same(&json!([]), &json!(null)));
        assert!(same(&json!(3600), &json!(3600.0)));
        assert!(same(&json!({"a": 1}), &json!({"a": 1, "b": null})));
        assert!(!same(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(!same(&json!(["a", "b"]), &json!(["b", "a"])));
    }

    #[test]
    fn schedule_same_allows_prefect_defaults() {
        let want = json!({"schedule": {"rrule": "FREQ=DAILY", "timezone": "UTC"}, "active": true, "max_scheduled_runs": null, "parameters": {}, "slug": "s"});
        let actual = json!({"id": "x", "schedule": {"rrule": "DTSTART:20200101T000000\nFREQ=DAILY", "timezone": "UTC"}, "active": true, "max_scheduled_runs": null, "parameters": {}, "slug": "s"});
        assert!(schedule_same(&want, &actual));
        let want = json!({"schedule": {"interval": 60, "timezone": "UTC"}, "active": true, "parameters": {}});
        let actual = json!({"schedule": {"interval": 60.0, "anchor_date": "2026-01-01T00:00:00Z", "timezone": "UTC"}, "active": true, "max_scheduled_runs": null, "parameters": {}});
        assert!(schedule_same(&want, &actual));
        let want = json!({"schedule": {"interval": 60, "anchor_date": "2026-01-01T01:00:00+01:00", "timezone": "UTC"}, "active": true});
        assert!(schedule_same(&want, &actual));
        let want = json!({"schedule": {"interval": 60, "timezone": "UTC"}, "active": false});
        assert!(!schedule_same(&want, &actual));
    }
}
