//! Pure: the `deployments:` of a `prefect.yaml` -> PrefectDeployment manifests. What a
//! manifest cannot hold (build and push steps, values Prefect fills in at deploy time
//! from step outputs, variables or the environment) is reported with its path and left
//! out, never guessed.

use serde_json::{json, Map, Value};

use crate::export::kubernetes_name;

/// The manifests, and what was left out (`path: why`).
pub struct Converted {
    pub manifests: Vec<Value>,
    pub left_out: Vec<String>,
}

/// Converts `text` (a prefect.yaml). `server_url` goes into every `spec.server`.
pub fn convert(text: &str, server_url: &str, namespace: Option<&str>) -> Result<Converted, String> {
    let mut yaml: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    // `<<: *anchor` merge keys, as prefect.yaml files use them with `definitions`.
    yaml.apply_merge()
        .map_err(|e| format!("a YAML merge key cannot be applied: {e}"))?;
    let doc: Value = serde_json::to_value(&yaml).map_err(|e| format!("not a mapping: {e}"))?;
    let mut left_out = Vec::new();
    for key in ["build", "push"] {
        if !doc[key].is_null() {
            left_out.push(format!(
                "{key}: {key} steps run where `prefect deploy` runs; build and push in CI, the manifests only declare the deployments"
            ));
        }
    }
    let deployments = doc["deployments"]
        .as_array()
        .ok_or("it has no `deployments:` list")?;
    let mut manifests = Vec::new();
    for (i, d) in deployments.iter().enumerate() {
        let path = format!("deployments[{i}]");
        match deployment(d, &doc["pull"], &path, server_url, namespace, &mut left_out) {
            Ok(m) => manifests.push(m),
            Err(why) => left_out.push(format!("{path}: not converted: {why}")),
        }
    }
    Ok(Converted {
        manifests,
        left_out,
    })
}

fn deployment(
    d: &Value,
    top_pull: &Value,
    path: &str,
    server_url: &str,
    namespace: Option<&str>,
    left_out: &mut Vec<String>,
) -> Result<Value, String> {
    let name = d["name"].as_str().ok_or("it has no name")?.to_string();
    let entrypoint = d["entrypoint"]
        .as_str()
        .ok_or("it has no entrypoint")?
        .to_string();
    let pool = &d["work_pool"];
    let pool_name = pool["name"]
        .as_str()
        .ok_or("it has no work_pool.name (a served deployment)")?;
    for key in ["build", "push"] {
        if !d[key].is_null() {
            left_out.push(format!(
                "{path}.{key}: {key} steps have no equivalent in a manifest"
            ));
        }
    }

    let mut out = Map::new();
    out.insert("name".into(), json!(name));
    out.insert("entrypoint".into(), json!(entrypoint));
    let mut copy = |from: &str, to: &str, out: &mut Map<String, Value>| {
        let v = &d[from];
        if !v.is_null() {
            if let Some(v) = resolved(v, &format!("{path}.{from}"), left_out) {
                out.insert(to.into(), v);
            }
        }
    };
    copy("description", "description", &mut out);
    copy("tags", "tags", &mut out);
    copy("parameters", "parameters", &mut out);
    copy(
        "enforce_parameter_schema",
        "enforceParameterSchema",
        &mut out,
    );
    copy("paused", "paused", &mut out);
    if let Some(v) = d["version"].as_str() {
        if let Some(v) = resolved(&json!(v), &format!("{path}.version"), left_out) {
            out.insert("versionInfo".into(), json!({"version": v}));
        }
    }
    match &d["concurrency_limit"] {
        Value::Null => {}
        Value::Object(c) => {
            if let Some(l) = c.get("limit") {
                out.insert("concurrencyLimit".into(), l.clone());
            }
            if let Some(s) = c.get("collision_strategy") {
                let mut o = json!({"collisionStrategy": s});
                if let Some(g) = c.get("grace_period_seconds").filter(|g| !g.is_null()) {
                    o["gracePeriodSeconds"] = g.clone();
                }
                out.insert("concurrencyOptions".into(), o);
            }
        }
        v => {
            out.insert("concurrencyLimit".into(), v.clone());
        }
    }
    if let Some(jv) = pool.get("job_variables").filter(|v| !v.is_null()) {
        if let Some(v) = resolved(jv, &format!("{path}.work_pool.job_variables"), left_out) {
            out.insert("jobVariables".into(), v);
        }
    }
    // Pull steps run with each flow run, and their templates are filled in then: kept.
    let pull = if d["pull"].is_null() {
        top_pull
    } else {
        &d["pull"]
    };
    if let Some(steps) = pull.as_array() {
        out.insert("pullSteps".into(), Value::Array(steps.clone()));
    }

    let mut schedules: Vec<Value> = match (&d["schedules"], &d["schedule"]) {
        (Value::Array(list), _) => list.clone(),
        (_, Value::Object(_)) => vec![d["schedule"].clone()],
        _ => Vec::new(),
    };
    let mut converted = Vec::new();
    for (j, s) in schedules.iter_mut().enumerate() {
        let spath = format!("{path}.schedules[{j}]");
        let Some(s) = resolved(s, &spath, left_out) else {
            continue;
        };
        let mut o = Map::new();
        // The operator matches schedules by slug: one without gets a stable one.
        let slug = s["slug"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("schedule-{}", j + 1));
        o.insert("slug".into(), json!(slug));
        for key in [
            "interval",
            "anchor_date",
            "cron",
            "day_or",
            "rrule",
            "timezone",
            "active",
            "max_scheduled_runs",
            "parameters",
            "replaces",
        ] {
            if let Some(v) = s.get(key).filter(|v| !v.is_null()) {
                o.insert(key.into(), v.clone());
            }
        }
        converted.push(Value::Object(o));
    }
    if !converted.is_empty() {
        out.insert("schedules".into(), Value::Array(converted));
    }

    let mut triggers = Vec::new();
    for (j, t) in d["triggers"].as_array().into_iter().flatten().enumerate() {
        triggers.push(trigger(t, &format!("{path}.triggers[{j}]"), left_out));
    }
    if !triggers.is_empty() {
        out.insert("triggers".into(), Value::Array(triggers));
    }

    let mut metadata = json!({"name": kubernetes_name(&name)});
    if let Some(ns) = namespace {
        metadata["namespace"] = json!(ns);
    }
    let mut work_pool = json!({"name": pool_name});
    if let Some(q) = pool["work_queue_name"].as_str() {
        work_pool["workQueue"] = json!(q);
    }
    Ok(json!({
        "apiVersion": "prefect.io/v1",
        "kind": "PrefectDeployment",
        "metadata": metadata,
        "spec": {
            "server": {"remoteApiUrl": server_url},
            "workPool": work_pool,
            "deployment": Value::Object(out),
        },
    }))
}

/// A trigger of prefect.yaml in the spec's words. Templates in its parameters are
/// filled in when the automation fires, so they are kept.
fn trigger(t: &Value, path: &str, left_out: &mut Vec<String>) -> Value {
    let mut o = Map::new();
    let renames = [
        ("type", "type"),
        ("name", "name"),
        ("description", "description"),
        ("enabled", "enabled"),
        ("posture", "posture"),
        ("match", "match"),
        ("match_related", "matchRelated"),
        ("after", "after"),
        ("expect", "expect"),
        ("for_each", "forEach"),
        ("threshold", "threshold"),
        ("within", "within"),
        ("require", "require"),
        ("parameters", "parameters"),
        ("job_variables", "jobVariables"),
        ("schedule_after", "scheduleAfter"),
    ];
    for (from, to) in renames {
        if let Some(v) = t.get(from).filter(|v| !v.is_null()) {
            o.insert(to.into(), v.clone());
        }
    }
    if let Some(m) = t.get("metric").filter(|m| !m.is_null()) {
        let mut metric = m.clone();
        if let Some(f) = metric.as_object_mut().and_then(|m| m.remove("firing_for")) {
            metric["firingFor"] = f;
        }
        o.insert("metric".into(), metric);
    }
    if let Some(children) = t.get("triggers").and_then(Value::as_array) {
        let converted: Vec<Value> = children
            .iter()
            .enumerate()
            .map(|(k, c)| trigger(c, &format!("{path}.triggers[{k}]"), left_out))
            .collect();
        o.insert("triggers".into(), Value::Array(converted));
    }
    for key in t.as_object().into_iter().flatten().map(|(k, _)| k) {
        let known = renames.iter().any(|(f, _)| f == key) || key == "metric" || key == "triggers";
        if !known {
            left_out.push(format!(
                "{path}.{key}: not a trigger field the operator knows"
            ));
        }
    }
    Value::Object(o)
}

/// `v` without the values `prefect deploy` fills in from step outputs, Prefect
/// variables or blocks, or the environment: those are reported and `None` returned
/// for the field (leaving it out is safer than sending a placeholder).
fn resolved(v: &Value, path: &str, left_out: &mut Vec<String>) -> Option<Value> {
    let mut found = Vec::new();
    templates(v, path, &mut found);
    if found.is_empty() {
        return Some(v.clone());
    }
    for (p, text) in found {
        left_out.push(format!(
            "{p}: {text:?} is filled in by `prefect deploy` (a step output, a Prefect variable or block, or an environment variable); put the value in the manifest"
        ));
    }
    None
}

fn templates(v: &Value, path: &str, found: &mut Vec<(String, String)>) {
    match v {
        Value::String(s) if s.contains("{{") => found.push((path.to_string(), s.clone())),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| templates(x, &format!("{path}[{i}]"), found)),
        Value::Object(o) => o
            .iter()
            .for_each(|(k, x)| templates(x, &format!("{path}.{k}"), found)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_anchors_schedules_and_reports_templates() {
        let text = r#"
definitions:
  pools:
    k8s: &k8s
      name: k8s
      job_variables:
        image: "{{ build_image.image }}"
  schedules:
    daily: &daily
      cron: "0 6 * * *"
      timezone: Europe/Berlin
build:
  - prefect_docker.deployments.steps.build_docker_image:
      id: build_image
pull:
  - prefect.deployments.steps.git_clone:
      repository: https://example.invalid/etl.git
deployments:
  - name: nightly_etl
    entrypoint: flows/etl.py:etl
    version: "1.2"
    concurrency_limit: {limit: 2, collision_strategy: CANCEL_NEW}
    work_pool: *k8s
    schedules:
      - <<: *daily
        slug: daily
      - interval: 3600
    triggers:
      - type: event
        expect: [a.b]
        parameters: {x: "{{ event.id }}"}
  - name: old
    entrypoint: flows/etl.py:old
    work_pool: {name: k8s, work_queue_name: critical}
    schedule: {rrule: "FREQ=DAILY"}
    concurrency_limit: 3
"#;
        let c = convert(text, "http://prefect/api", Some("data")).unwrap();
        assert_eq!(c.manifests.len(), 2);
        let d = &c.manifests[0]["spec"]["deployment"];
        assert_eq!(c.manifests[0]["metadata"]["name"], "nightly-etl");
        assert_eq!(d["name"], "nightly_etl");
        assert_eq!(
            d["schedules"][0],
            json!({"slug": "daily", "cron": "0 6 * * *", "timezone": "Europe/Berlin"})
        );
        assert_eq!(
            d["schedules"][1],
            json!({"slug": "schedule-2", "interval": 3600})
        );
        assert_eq!(
            d["concurrencyOptions"],
            json!({"collisionStrategy": "CANCEL_NEW"})
        );
        assert_eq!(
            d["triggers"][0]["parameters"],
            json!({"x": "{{ event.id }}"})
        );
        assert!(d.get("jobVariables").is_none());
        assert_eq!(
            d["pullSteps"][0]["prefect.deployments.steps.git_clone"]["repository"],
            "https://example.invalid/etl.git"
        );
        let old = &c.manifests[1]["spec"];
        assert_eq!(old["workPool"]["workQueue"], "critical");
        assert_eq!(old["deployment"]["schedules"][0]["rrule"], "FREQ=DAILY");
        assert_eq!(old["deployment"]["concurrencyLimit"], 3);
        assert!(
            c.left_out.iter().any(|l| l.starts_with("build:")),
            "{:?}",
            c.left_out
        );
        assert!(
            c.left_out
                .iter()
                .any(|l| l.starts_with("deployments[0].work_pool.job_variables.image:")),
            "{:?}",
            c.left_out
        );
    }
}
