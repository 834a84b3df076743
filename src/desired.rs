//! Pure: a validated spec in, the Prefect payloads we want out. This is the one place
//! that knows Prefect's wire field names; the reconciler only moves these values around.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::api::{
    DeploymentSpec, DriftPolicy, IgnoredField, Posture, Trigger, TriggerCondition, TriggerType,
};
use crate::capabilities::Capabilities;
use crate::schedule::{zone, Rule};
use crate::validate::{ValidSchedule, ValidSpec};

/// The Prefect label that marks a deployment as created for one Kubernetes resource
/// (its metadata.uid), so an interrupted create is recognised as ours on the next pass
/// and a stranger's deployment is not.
pub const OWNER_LABEL: &str = "prefect-operator.io/resource-uid";

/// What the resource wants to exist in Prefect, before any id is known.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredDeployment {
    pub flow_name: String,
    pub name: String,
    /// Fields of `DeploymentUpdate` (PATCH body, minus schedules). A field the user did
    /// not set and Prefect fills in itself is left out, so it is neither sent nor compared.
    pub fields: Map<String, Value>,
    /// Labels are accepted only on create (Prefect refuses them in PATCH).
    pub labels: Map<String, Value>,
    pub schedules: Vec<DesiredSchedule>,
    /// The resource's metadata.uid, also in `labels` under `OWNER_LABEL`.
    pub owner_uid: String,
    /// Whether a deployment of this name that the resource did not create may be taken over.
    pub adopt_existing: bool,
    /// One `AutomationCreate` body per trigger, in spec order, without the deployment id
    /// (unknown before a create); `automations_for` fills it in.
    pub automations: Vec<Value>,
    /// Fields people own in Prefect (spec.ignoreFields).
    pub ignored: Vec<IgnoredField>,
    /// spec.driftPolicy is Report.
    pub report_drift: bool,
    /// The named global concurrency limit the deployment is attached to.
    pub limit: Option<DesiredLimit>,
    /// The server keeps schedule slugs: schedules are matched by slug (else by what
    /// they say).
    pub schedules_by_slug: bool,
    /// Fields the server takes only when the deployment is created (not in its PATCH).
    pub create_only: Vec<&'static str>,
}

/// A named global concurrency limit: the name, and the settings the spec declares (a
/// `ConcurrencyLimitV2Update` body with only those keys).
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredLimit {
    pub name: String,
    pub settings: Map<String, Value>,
}

impl DesiredLimit {
    /// The `ConcurrencyLimitV2Create` body, or `None` when the spec gives no `limit`
    /// (then the limit must exist already).
    pub fn create_body(&self) -> Option<Value> {
        self.settings.get("limit")?;
        let mut body = self.settings.clone();
        body.insert("name".into(), Value::String(self.name.clone()));
        Some(Value::Object(body))
    }
}

/// The name Prefect gives the limit it makes for a deployment's own `concurrency_limit`.
pub fn own_limit_name(deployment_id: &str) -> String {
    format!("deployment:{deployment_id}")
}

impl DesiredLimit {
    /// How `other`'s declared settings differ from these, where both declare one.
    pub fn conflict_with(&self, other: &DesiredLimit) -> Option<String> {
        if other.name != self.name {
            return None;
        }
        self.settings.iter().find_map(|(k, mine)| {
            let theirs = other.settings.get(k)?;
            (!crate::plan::same(mine, theirs)).then(|| format!("{k} is {mine} here and {theirs}"))
        })
    }
}

/// The limit a `globalConcurrencyLimit` describes.
pub fn deployment_limit(g: &crate::api::GlobalConcurrencyLimit) -> DesiredLimit {
    let mut settings = Map::new();
    if let Some(l) = g.limit {
        settings.insert("limit".into(), Value::from(l));
    }
    if let Some(a) = g.active {
        settings.insert("active".into(), Value::Bool(a));
    }
    if let Some(v) = g
        .slot_decay_per_second
        .as_deref()
        .and_then(crate::validate::slot_decay)
    {
        settings.insert("slot_decay_per_second".into(), json!(v));
    }
    DesiredLimit {
        name: g.name.clone(),
        settings,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DesiredSchedule {
    pub slug: String,
    /// The slug it had before (a rename in place).
    pub replaces: Option<String>,
    /// A `DeploymentScheduleCreate` body.
    pub body: Value,
}

/// The deployment a validated spec describes, labelled as made for resource `owner_uid`.
pub fn deployment(valid: &ValidSpec, owner_uid: &str) -> DesiredDeployment {
    let spec = valid.spec;
    let d = &spec.deployment;
    let mut f = Map::new();
    let opt_str = |v: &Option<String>| v.clone().map(Value::String).unwrap_or(Value::Null);
    f.insert("description".into(), opt_str(&d.description));
    let version = d.version_info.as_ref();
    f.insert(
        "version".into(),
        opt_str(&version.and_then(|v| v.version.clone())),
    );
    f.insert(
        "version_info".into(),
        match version.map(|v| (&v.type_, &v.version)) {
            Some((Some(t), Some(v))) => json!({"type": t, "version": v}),
            _ => Value::Null,
        },
    );
    f.insert("entrypoint".into(), Value::String(d.entrypoint.clone()));
    f.insert("path".into(), opt_str(&d.path));
    f.insert("paused".into(), Value::Bool(d.paused.unwrap_or(false)));
    f.insert("tags".into(), json!(d.tags.clone().unwrap_or_default()));
    f.insert(
        "parameters".into(),
        d.parameters.clone().unwrap_or_else(|| json!({})),
    );
    f.insert(
        "parameter_openapi_schema".into(),
        d.parameter_open_api_schema.clone().unwrap_or(Value::Null),
    );
    // Prefect enforces by default, but refuses any parameter change on an enforcing
    // deployment that has no schema; without a schema there is nothing to enforce.
    f.insert(
        "enforce_parameter_schema".into(),
        Value::Bool(
            d.enforce_parameter_schema
                .unwrap_or(d.parameter_open_api_schema.is_some()),
        ),
    );
    f.insert(
        "job_variables".into(),
        d.job_variables.clone().unwrap_or_else(|| json!({})),
    );
    f.insert(
        "pull_steps".into(),
        d.pull_steps
            .clone()
            .map(Value::Array)
            .unwrap_or(Value::Null),
    );
    let gcl = d.global_concurrency_limit.as_ref();
    // Attached to a named limit, the deployment's own `concurrency_limit` is never sent:
    // Prefect would write it into the shared limit, or (as null) delete that limit.
    if gcl.is_none() {
        f.insert(
            "concurrency_limit".into(),
            d.concurrency_limit.map(Value::from).unwrap_or(Value::Null),
        );
    }
    f.insert(
        "concurrency_options".into(),
        match (
            &d.concurrency_options,
            gcl.and_then(|g| g.collision_strategy.as_ref()),
        ) {
            (Some(o), _) => {
                let mut v = json!({"collision_strategy": o.collision_strategy.as_str()});
                if let Some(g) = o.grace_period_seconds {
                    v["grace_period_seconds"] = json!(g);
                }
                v
            }
            (None, Some(s)) => json!({"collision_strategy": s}),
            (None, None) => Value::Null,
        },
    );
    f.insert(
        "work_pool_name".into(),
        Value::String(spec.work_pool.name.clone()),
    );
    // Unset, Prefect puts the deployment on the pool's default queue; comparing against
    // an absent value would flag that as drift forever.
    if let Some(q) = &spec.work_pool.work_queue {
        f.insert("work_queue_name".into(), Value::String(q.clone()));
    }

    let mut labels: Map<String, Value> = d
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    labels.insert(OWNER_LABEL.into(), Value::String(owner_uid.into()));

    DesiredDeployment {
        flow_name: valid.flow_name.clone(),
        name: valid.name.clone(),
        fields: f,
        labels,
        schedules: valid.schedules.iter().map(schedule).collect(),
        owner_uid: owner_uid.into(),
        adopt_existing: spec.adopt_existing.unwrap_or(false),
        automations: automations(d, &valid.name, ""),
        ignored: spec.ignore_fields.clone().unwrap_or_default(),
        report_drift: spec.drift_policy == Some(DriftPolicy::Report),
        limit: d.global_concurrency_limit.as_ref().map(deployment_limit),
        schedules_by_slug: true,
        create_only: Vec::new(),
    }
}

impl DesiredDeployment {
    /// The deployment as a server with `caps` can hold it (an older server refuses a
    /// request with a field it does not know), and the spec's settings it cannot hold,
    /// for the resource's condition.
    pub fn for_server(mut self, caps: &Capabilities) -> (DesiredDeployment, Vec<String>) {
        let mut lost = Vec::new();
        if !caps.version_info
            && self
                .fields
                .remove("version_info")
                .is_some_and(|v| !v.is_null())
        {
            lost.push("versionInfo".to_string());
        }
        if !caps.schedule_slugs {
            self.schedules_by_slug = false;
            let mut parameters = false;
            for s in &mut self.schedules {
                if let Value::Object(body) = &mut s.body {
                    body.remove("slug");
                    let p = body.remove("parameters");
                    parameters |= p.is_some_and(|p| !crate::plan::same(&p, &json!({})));
                }
            }
            if parameters {
                lost.push("schedules[].parameters".to_string());
            }
        }
        if !caps.update_schema_and_pull_steps {
            for (key, spec_name) in [
                ("parameter_openapi_schema", "parameterOpenApiSchema"),
                ("pull_steps", "pullSteps"),
            ] {
                self.create_only.push(key);
                if self.fields.get(key).is_some_and(|v| !v.is_null()) {
                    lost.push(format!("{spec_name} (set at creation only)"));
                }
            }
        }
        if !caps.grace_period {
            if let Some(Value::Object(o)) = self.fields.get_mut("concurrency_options") {
                if o.remove("grace_period_seconds").is_some() {
                    lost.push("concurrencyOptions.gracePeriodSeconds".to_string());
                }
            }
        }
        if !caps.schedule_after {
            // Sent all the same (such a server takes the field and drops it, so a
            // status written before this check keeps its fingerprint); named when it
            // asks for a delay the server will not make.
            for (i, a) in self.automations.iter().enumerate() {
                let after = &a["actions"][0]["schedule_after"];
                if after.as_f64().is_some_and(|s| s != 0.0) {
                    lost.push(format!("triggers[{i}].scheduleAfter"));
                }
            }
        }
        if !caps.limit_id {
            if let Some(l) = self.limit.take() {
                // The nearest this server has: a limit of the deployment's own.
                let own = l.settings.get("limit").cloned().unwrap_or(Value::Null);
                self.fields.insert("concurrency_limit".into(), own);
                lost.push(format!(
                    "globalConcurrencyLimit {} (the deployment gets a limit of its own instead)",
                    l.name
                ));
            }
        }
        (self, lost)
    }

    /// Whether the schedules can go in the create body (one request fewer). Not when one
    /// sets `max_scheduled_runs`: that endpoint drops it, the schedules sub-resource
    /// keeps it.
    pub fn schedules_in_create_body(&self) -> bool {
        self.schedules
            .iter()
            .all(|s| s.body["max_scheduled_runs"].is_null())
    }

    /// The `POST /deployments/` body for a first create.
    pub fn create_body(&self, flow_id: &str) -> Value {
        let mut body = self.fields.clone();
        body.insert("name".into(), Value::String(self.name.clone()));
        body.insert("flow_id".into(), Value::String(flow_id.into()));
        body.insert("labels".into(), Value::Object(self.labels.clone()));
        // Named at all, even as null, `concurrency_limit` makes Prefect read the new
        // deployment and its limit back inside the create; for a deployment that does
        // not exist yet, null and absent mean the same.
        if body.get("concurrency_limit").is_some_and(Value::is_null) {
            body.remove("concurrency_limit");
        }
        if self.schedules_in_create_body() {
            let schedules = self.schedules.iter().map(|s| s.body.clone()).collect();
            body.insert("schedules".into(), Value::Array(schedules));
        }
        Value::Object(body)
    }

    /// The automation bodies for deployment `id`: the same as `automations(spec, name, id)`.
    pub fn automations_for(&self, id: &str) -> Vec<Value> {
        self.automations
            .iter()
            .map(|a| {
                let mut a = a.clone();
                a["actions"][0]["deployment_id"] = Value::String(id.into());
                a["owner_resource"] = Value::String(owner_resource(id));
                a
            })
            .collect()
    }

    /// The fingerprint of the automations for deployment `id`, as status records it.
    pub fn triggers_hash(&self, id: &str) -> String {
        fingerprint(&self.automations_for(id))
    }
}

fn schedule(s: &ValidSchedule) -> DesiredSchedule {
    let tz = s.tz_name.clone();
    let inner = match &s.rule {
        Rule::Interval { every, anchor } => {
            let mut o = json!({"interval": every.to_json(), "timezone": tz});
            if let Some(anchor) = anchor {
                // Sent with an explicit offset so Prefect never has to guess: a naive
                // time was read in the schedule's zone (Prefect alone would read UTC).
                o["anchor_date"] = Value::String(zone::format_anchor(anchor));
            }
            o
        }
        Rule::Cron(c) => json!({"cron": s.text, "timezone": tz, "day_or": c.day_or()}),
        Rule::RRule(_) => json!({"rrule": s.text, "timezone": tz}),
    };
    DesiredSchedule {
        slug: s.slug.clone(),
        replaces: s.replaces.clone(),
        body: json!({
            "schedule": inner,
            "active": s.active,
            "max_scheduled_runs": s.max_scheduled_runs,
            "parameters": s.parameters.clone().unwrap_or_else(|| json!({})),
            "slug": s.slug,
        }),
    }
}

/// The resource Prefect uses to tie automations to the deployment that owns them.
pub fn owner_resource(deployment_id: &str) -> String {
    format!("prefect.deployment.{deployment_id}")
}

/// One `AutomationCreate` body per trigger, in spec order.
pub fn automations(d: &DeploymentSpec, deployment_name: &str, deployment_id: &str) -> Vec<Value> {
    d.triggers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, t)| automation(t, i, deployment_name, deployment_id))
        .collect()
}

fn automation(t: &Trigger, index: usize, deployment_name: &str, deployment_id: &str) -> Value {
    let name = t
        .name
        .clone()
        .unwrap_or_else(|| format!("{deployment_name}__automation_{}", index + 1));
    json!({
        "name": name,
        "description": t.description.clone().unwrap_or_default(),
        "enabled": t.enabled.unwrap_or(true),
        "trigger": trigger(t),
        "actions": [{
            "type": "run-deployment",
            "source": "selected",
            "deployment_id": deployment_id,
            "parameters": t.parameters,
            "job_variables": t.job_variables,
            "schedule_after": t.schedule_after.unwrap_or(0),
        }],
        "owner_resource": owner_resource(deployment_id),
    })
}

fn trigger(t: &Trigger) -> Value {
    let c = &t.condition;
    match c.type_.unwrap_or(TriggerType::Event) {
        TriggerType::Compound => json!({
            "type": "compound",
            "require": t.require.clone().map(require).unwrap_or_else(|| json!("all")),
            "within": c.within.unwrap_or(0),
            "triggers": t.triggers.iter().flatten().map(condition).collect::<Vec<_>>(),
        }),
        TriggerType::Sequence => json!({
            "type": "sequence",
            "within": c.within.unwrap_or(0),
            "triggers": t.triggers.iter().flatten().map(condition).collect::<Vec<_>>(),
        }),
        _ => condition(c),
    }
}

/// `require` as Prefect wants it: a number, or "any"/"all" (an int-or-string field may
/// carry a number as a string).
fn require(v: Value) -> Value {
    match &v {
        Value::String(s) => s.parse::<u64>().map(Value::from).unwrap_or(v),
        _ => v,
    }
}

fn condition(c: &TriggerCondition) -> Value {
    let match_ = c.match_.clone().unwrap_or_else(|| json!({}));
    let match_related = c.match_related.clone().unwrap_or_else(|| json!({}));
    match c.type_.unwrap_or(TriggerType::Event) {
        TriggerType::Metric => {
            let m = c.metric.clone().unwrap_or_default();
            json!({
                "type": "metric",
                "match": match_,
                "match_related": match_related,
                "metric": {
                    "name": m.name,
                    "operator": m.operator,
                    "threshold": m.threshold,
                    "range": m.range.unwrap_or(300),
                    "firing_for": m.firing_for.unwrap_or(300),
                },
            })
        }
        _ => json!({
            "type": "event",
            "posture": match c.posture.unwrap_or(Posture::Reactive) {
                Posture::Reactive => "Reactive",
                Posture::Proactive => "Proactive",
                // Refused by `validate` on an event trigger; sent as written otherwise.
                Posture::Metric => "Metric",
            },
            "match": match_,
            "match_related": match_related,
            "after": c.after.clone().unwrap_or_default(),
            "expect": c.expect.clone().unwrap_or_default(),
            "for_each": c.for_each.clone().unwrap_or_default(),
            "threshold": c.threshold.unwrap_or(1),
            "within": c.within.unwrap_or(0),
        }),
    }
}

/// Stable fingerprint of a set of automation bodies. serde_json maps are sorted by key,
/// so equal content always hashes equal, across restarts and versions of this operator.
pub fn fingerprint(automations: &[Value]) -> String {
    let text = serde_json::to_string(automations).expect("JSON values serialize");
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}
