//! What Prefect holds, as typed values: the parts of its answers that planning and the
//! preview read. Decoded once, where the answer arrives; everything after works on these.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A deployment as `GET /deployments/{id}` or `/deployments/name/{flow}/{name}` returns it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ObservedDeployment {
    pub id: String,
    #[serde(default)]
    pub flow_id: Option<String>,
    /// Prefect answers `{}` for none; tolerate `null` as the same.
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: Map<String, Value>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub schedules: Vec<ObservedSchedule>,
    /// Every other field as Prefect reported it, compared with what the spec wants.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// One schedule of a deployment (`DeploymentSchedule`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ObservedSchedule {
    pub id: String,
    #[serde(default)]
    pub slug: Option<String>,
    #[serde(default)]
    pub active: Option<bool>,
    #[serde(default)]
    pub max_scheduled_runs: Option<Value>,
    #[serde(default)]
    pub parameters: Option<Value>,
    /// The schedule itself (`cron`, `interval` or `rrule` with `timezone` and more).
    #[serde(default)]
    pub schedule: Value,
}

/// An automation as `/automations/related-to/...` lists it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ObservedAutomation {
    pub id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub actions: Vec<ObservedAction>,
    /// Everything else (name, trigger, enabled, ...), as Prefect returned it.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// One action of an automation; its other fields are kept as returned.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ObservedAction {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub deployment_id: Option<String>,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl ObservedDeployment {
    /// The value of the resource-owner label, if the deployment carries one.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).and_then(Value::as_str)
    }

    /// The value Prefect reports for a `DeploymentUpdate` field, comparable with what we
    /// would write, or `None` where the server does not report it back (so it cannot be
    /// compared). Prefect 3 turns `concurrency_limit` into a global concurrency limit and
    /// reports it there; the open-source server accepts `version_info` but does not keep it.
    pub fn field(&self, key: &str) -> Option<&Value> {
        const NULL: &Value = &Value::Null;
        let v = self.fields.get(key).unwrap_or(NULL);
        match key {
            // Only the deployment's own limit counts as its `concurrency_limit`; a named
            // limit it is attached to is compared by `planned_limit`.
            "concurrency_limit" if v.is_null() => Some(
                self.fields
                    .get("global_concurrency_limit")
                    .filter(|g| {
                        g.get("name").and_then(Value::as_str)
                            == Some(crate::desired::own_limit_name(&self.id).as_str())
                    })
                    .and_then(|g| g.get("limit"))
                    .unwrap_or(NULL),
            ),
            "version_info" if v.is_null() => None,
            _ => Some(v),
        }
    }
}

impl ObservedDeployment {
    /// The global concurrency limit the deployment is attached to: its own (named
    /// `deployment:<id>`) or a named one shared with others.
    pub fn attached_limit(&self) -> Option<ObservedLimit> {
        let g = self.fields.get("global_concurrency_limit")?;
        serde_json::from_value(g.clone()).ok()
    }

    /// The id of the named (shared) limit the deployment is attached to, if any.
    pub fn shared_limit(&self) -> Option<ObservedLimit> {
        self.attached_limit()
            .filter(|g| g.name != crate::desired::own_limit_name(&self.id))
    }
}

/// A global concurrency limit (`GlobalConcurrencyLimitResponse`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ObservedLimit {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub limit: Option<Value>,
    /// The settings as reported (`active`, `slot_decay_per_second`, ...).
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl ObservedLimit {
    /// The value Prefect holds for a `ConcurrencyLimitV2Update` key.
    pub fn setting(&self, key: &str) -> Value {
        match key {
            "limit" => self.limit.clone().unwrap_or(Value::Null),
            _ => self.fields.get(key).cloned().unwrap_or(Value::Null),
        }
    }
}

impl ObservedSchedule {
    /// The anchor date Prefect holds for an interval schedule (it picks one itself when
    /// none was sent).
    pub fn anchor_date(&self) -> Option<&str> {
        self.schedule.get("anchor_date").and_then(Value::as_str)
    }
}

impl ObservedAutomation {
    /// Whether one of the automation's actions runs deployment `id`.
    pub fn runs_deployment(&self, id: &str) -> bool {
        self.actions
            .iter()
            .any(|a| a.type_ == "run-deployment" && a.deployment_id.as_deref() == Some(id))
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_a_deployment_with_nulls() {
        let d: ObservedDeployment = serde_json::from_value(json!({
            "id": "d1", "flow_id": "f1", "labels": null, "schedules": [
                {"id": "s1", "slug": null, "active": true, "schedule": {"interval": 60.0, "anchor_date": "2026-01-01T00:00:00Z"}}
            ],
            "paused": false, "global_concurrency_limit": {"id": "g1", "name": "deployment:d1", "limit": 3}
        }))
        .unwrap();
        assert!(d.labels.is_empty());
        assert_eq!(d.schedules[0].anchor_date(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(d.field("concurrency_limit"), Some(&json!(3)));
        assert_eq!(d.field("version_info"), None);
        assert_eq!(d.field("paused"), Some(&json!(false)));
        assert_eq!(d.field("description"), Some(&Value::Null));
    }
}
