//! Pure: a deployment as a Prefect server holds it -> the PrefectDeployment manifest
//! that describes it, so existing deployments can be brought under the operator
//! (`adoptExisting: true`) without a change. What a manifest cannot say is reported,
//! never guessed.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::desired::OWNER_LABEL;
use crate::observed::{ObservedAutomation, ObservedDeployment, ObservedSchedule};

/// Where the manifests say the credentials are (a `valueFrom` placeholder, never the
/// value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    None,
    ApiKey,
    AuthString,
}

/// A manifest, or why the deployment cannot be one; `notes` say what was left out.
pub struct Exported {
    pub manifest: Value,
    pub notes: Vec<String>,
}

/// The manifest of deployment `d` of flow `flow_name` on `server_url`, with the
/// automations that run it as triggers.
pub fn manifest(
    d: &ObservedDeployment,
    flow_name: &str,
    automations: &[ObservedAutomation],
    server_url: &str,
    namespace: Option<&str>,
    credentials: Credentials,
) -> Result<Exported, String> {
    let f = |k: &str| d.fields.get(k).cloned().unwrap_or(Value::Null);
    let name = f("name").as_str().unwrap_or_default().to_string();
    let Some(entrypoint) = f("entrypoint").as_str().map(str::to_string) else {
        return Err(
            "it has no entrypoint (a served deployment, run by a process, not a worker)".into(),
        );
    };
    let Some(pool) = f("work_pool_name").as_str().map(str::to_string) else {
        return Err(
            "it has no work pool (a served deployment, run by a process, not a worker)".into(),
        );
    };
    let mut notes = Vec::new();

    let mut dep = Map::new();
    dep.insert("name".into(), json!(name));
    dep.insert("flow_name".into(), json!(flow_name));
    dep.insert("entrypoint".into(), json!(entrypoint));
    put(&mut dep, "description", f("description"));
    put(&mut dep, "path", f("path"));
    put(&mut dep, "tags", f("tags"));
    if let Some(v) = f("version").as_str() {
        put(&mut dep, "versionInfo", json!({"version": v}));
    }
    let labels: Map<String, Value> = d
        .labels
        .iter()
        .filter(|(k, _)| k.as_str() != OWNER_LABEL && !k.starts_with("prefect."))
        .filter(|(_, v)| v.is_string())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    put(&mut dep, "labels", Value::Object(labels));
    put(&mut dep, "parameters", f("parameters"));
    put(
        &mut dep,
        "parameterOpenApiSchema",
        f("parameter_openapi_schema"),
    );
    if let Some(b) = f("enforce_parameter_schema").as_bool() {
        dep.insert("enforceParameterSchema".into(), json!(b));
    }
    put(&mut dep, "jobVariables", f("job_variables"));
    put(&mut dep, "pullSteps", f("pull_steps"));
    if f("paused") == json!(true) {
        dep.insert("paused".into(), json!(true));
    }
    let limit = d.field("concurrency_limit").cloned().unwrap_or(Value::Null);
    put(&mut dep, "concurrencyLimit", limit);
    if let Some(o) = f("concurrency_options").as_object() {
        let mut opts = json!({"collisionStrategy": o.get("collision_strategy").cloned().unwrap_or(json!("ENQUEUE"))});
        if let Some(g) = o.get("grace_period_seconds").filter(|g| !g.is_null()) {
            opts["gracePeriodSeconds"] = g.clone();
        }
        dep.insert("concurrencyOptions".into(), opts);
    }

    let schedules: Vec<Value> = d.schedules.iter().map(schedule).collect();
    if !schedules.is_empty() {
        dep.insert("schedules".into(), Value::Array(schedules));
    }

    let mut triggers = Vec::new();
    for a in automations.iter().filter(|a| a.runs_deployment(&d.id)) {
        match trigger(a) {
            Ok(t) => triggers.push(t),
            Err(why) => notes.push(format!("automation {} left out: {why}", a.id)),
        }
    }
    if !triggers.is_empty() {
        dep.insert("triggers".into(), Value::Array(triggers));
    }

    let mut server = json!({"remoteApiUrl": server_url});
    match credentials {
        Credentials::None => {}
        Credentials::ApiKey => {
            server["apiKey"] =
                json!({"valueFrom": {"secretKeyRef": {"name": "prefect-api-key", "key": "key"}}});
            notes.push(
                "credentials: create the Secret prefect-api-key (key: key) with the API key".into(),
            );
        }
        Credentials::AuthString => {
            server["authString"] =
                json!({"valueFrom": {"secretKeyRef": {"name": "prefect-auth", "key": "auth"}}});
            notes.push(
                "credentials: create the Secret prefect-auth (key: auth) with user:password".into(),
            );
        }
    }
    let mut metadata = json!({"name": kubernetes_name(&name)});
    if let Some(ns) = namespace {
        metadata["namespace"] = json!(ns);
    }
    let mut work_pool = json!({"name": pool});
    if let Some(q) = f("work_queue_name").as_str().filter(|q| *q != "default") {
        work_pool["workQueue"] = json!(q);
    }
    Ok(Exported {
        manifest: json!({
            "apiVersion": "prefect.io/v1",
            "kind": "PrefectDeployment",
            "metadata": metadata,
            "spec": {
                "server": server,
                "workPool": work_pool,
                "adoptExisting": true,
                "deployment": Value::Object(dep),
            },
        }),
        notes,
    })
}

/// Sets `key` unless `v` says nothing.
fn put(dep: &mut Map<String, Value>, key: &str, v: Value) {
    if !is_empty(&v) {
        dep.insert(key.into(), v);
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// A valid Kubernetes object name for a Prefect deployment name: lower case, `a-z0-9-.`,
/// starting and ending alphanumeric, at most 253 characters. The Prefect name itself
/// stays in `spec.deployment.name`.
pub fn kubernetes_name(name: &str) -> String {
    let mut out: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    out = out
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    out.truncate(253);
    let out = out
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    if out.is_empty() {
        "deployment".into()
    } else {
        out
    }
}

/// A number as an integer when it is a whole one (Prefect returns 3600.0).
fn whole(v: &Value) -> Value {
    match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => json!(x as i64),
        _ => v.clone(),
    }
}

fn schedule(s: &ObservedSchedule) -> Value {
    let inner = &s.schedule;
    let mut out = Map::new();
    let slug = s.slug.clone().unwrap_or_else(|| {
        // Stable for the same definition, so exporting twice gives the same manifest.
        let digest = Sha256::digest(inner.to_string().as_bytes());
        let short: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        format!("schedule-{short}")
    });
    out.insert("slug".into(), json!(slug));
    for (from, to) in [
        ("interval", "interval"),
        ("anchor_date", "anchor_date"),
        ("cron", "cron"),
        ("day_or", "day_or"),
        ("rrule", "rrule"),
        ("timezone", "timezone"),
    ] {
        if let Some(v) = inner.get(from).filter(|v| !v.is_null()) {
            // The CRD takes an interval as whole seconds or a string: a fraction of a
            // second goes as a string of seconds, which reads back the same.
            let v = match whole(v) {
                Value::Number(n) if from == "interval" && !n.is_i64() => {
                    Value::String(n.to_string())
                }
                w if from == "interval" => w,
                _ => v.clone(),
            };
            // day_or true is the default, and only cron schedules have it.
            if from == "day_or" && v == json!(true) {
                continue;
            }
            out.insert(to.into(), v);
        }
    }
    if s.active == Some(false) {
        out.insert("active".into(), json!(false));
    }
    if let Some(m) = s.max_scheduled_runs.as_ref().filter(|m| !m.is_null()) {
        out.insert("max_scheduled_runs".into(), m.clone());
    }
    if let Some(p) = s.parameters.as_ref().filter(|p| !is_empty(p)) {
        out.insert("parameters".into(), p.clone());
    }
    Value::Object(out)
}

/// An automation that runs the deployment, as a trigger of the spec.
fn trigger(a: &ObservedAutomation) -> Result<Value, String> {
    if a.actions.len() != 1 {
        return Err(format!(
            "it has {} actions; a trigger runs the deployment once",
            a.actions.len()
        ));
    }
    let action = &a.actions[0];
    let af = |k: &str| action.fields.get(k).cloned().unwrap_or(Value::Null);
    if af("source") != json!("selected") {
        return Err("its action does not run a selected deployment".into());
    }
    let field = |k: &str| a.fields.get(k).cloned().unwrap_or(Value::Null);
    let t = field("trigger");
    let mut out = condition(&t)?;
    match t["type"].as_str() {
        Some("compound") | Some("sequence") => {
            out = Map::new();
            out.insert("type".into(), t["type"].clone());
            out.insert("within".into(), whole(&t["within"]));
            if t["type"] == "compound" {
                out.insert("require".into(), t["require"].clone());
            }
            let children: Result<Vec<Value>, String> = t["triggers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| condition(c).map(Value::Object))
                .collect();
            out.insert("triggers".into(), Value::Array(children?));
        }
        _ => {}
    }
    out.insert("name".into(), field("name"));
    if let Some(d) = field("description").as_str().filter(|d| !d.is_empty()) {
        out.insert("description".into(), json!(d));
    }
    if field("enabled") == json!(false) {
        out.insert("enabled".into(), json!(false));
    }
    for (from, to) in [
        ("parameters", "parameters"),
        ("job_variables", "jobVariables"),
    ] {
        let v = af(from);
        if !v.is_null() {
            out.insert(to.into(), v);
        }
    }
    let after = whole(&af("schedule_after"));
    if !after.is_null() && after != json!(0) {
        out.insert("scheduleAfter".into(), after);
    }
    Ok(Value::Object(out))
}

/// One event or metric trigger condition in the spec's words.
fn condition(t: &Value) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    match t["type"].as_str() {
        Some("event") => {
            out.insert("posture".into(), t["posture"].clone());
            for (from, to) in [
                ("match", "match"),
                ("match_related", "matchRelated"),
                ("after", "after"),
                ("expect", "expect"),
                ("for_each", "forEach"),
            ] {
                if !is_empty(&t[from]) {
                    out.insert(to.into(), t[from].clone());
                }
            }
            out.insert("threshold".into(), whole(&t["threshold"]));
            out.insert("within".into(), whole(&t["within"]));
        }
        Some("metric") => {
            out.insert("type".into(), json!("metric"));
            for (from, to) in [("match", "match"), ("match_related", "matchRelated")] {
                if !is_empty(&t[from]) {
                    out.insert(to.into(), t[from].clone());
                }
            }
            let m = &t["metric"];
            out.insert(
                "metric".into(),
                json!({
                    "name": m["name"], "operator": m["operator"], "threshold": m["threshold"],
                    "range": whole(&m["range"]), "firingFor": whole(&m["firing_for"]),
                }),
            );
        }
        Some("compound") | Some("sequence") => {}
        other => return Err(format!("trigger type {other:?} has no equivalent")),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(kubernetes_name("My_ETL job"), "my-etl-job");
        assert_eq!(kubernetes_name("--"), "deployment");
        assert_eq!(kubernetes_name("a.b"), "a.b");
        assert_eq!(kubernetes_name(&"x".repeat(300)).len(), 253);
    }

    #[test]
    fn intervals_are_whole_seconds_or_strings() {
        let of = |interval: Value| {
            let s: ObservedSchedule = serde_json::from_value(json!({"id": "s", "slug": "a",
                "schedule": {"interval": interval, "timezone": "UTC"}}))
            .unwrap();
            schedule(&s)["interval"].clone()
        };
        assert_eq!(of(json!(3600.0)), json!(3600));
        // The CRD's int-or-string refuses 90.5 as a number; the string reads back the same.
        assert_eq!(of(json!(90.5)), json!("90.5"));
        let read = |v: Value| format!("{:?}", crate::schedule::interval::parse(&v));
        assert_eq!(read(of(json!(90.5))), read(json!(90.5)));
        assert!(read(json!(90.5)).starts_with("Ok"));
    }
}
