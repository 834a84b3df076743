//! Pure: the `deployments:` of a `prefect.yaml` -> PrefectDeployment manifests. What a
//! manifest cannot hold (build and push steps, values Prefect fills in at deploy time
//! from step outputs, variables or the environment) is reported with its path and left
//! out, never guessed. Prefect variables are the exception when their values are given
//! (`convert --resolve-variables` reads them from the server, as `prefect deploy` does).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};

use crate::export::kubernetes_name;

/// The manifests, and what was left out (`path: why`).
pub struct Converted {
    pub manifests: Vec<Value>,
    pub left_out: Vec<String>,
}

/// Prefect variables by name: those of the server that exist, with their values.
pub type Variables = BTreeMap<String, Value>;

/// What `convert` fills in where `prefect deploy` would: Prefect variables, read from
/// the server, and environment variables, of the process that converts (as `prefect
/// deploy` reads those where it runs). `None` leaves such placeholders unfilled.
#[derive(Default, Debug)]
pub struct Inputs {
    pub variables: Option<Variables>,
    pub environment: Option<BTreeMap<String, String>>,
}

const VARIABLE_PREFIX: &str = "prefect.variables.";

fn parse(text: &str) -> Result<Value, String> {
    let mut yaml: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    // `<<: *anchor` merge keys, as prefect.yaml files use them with `definitions`.
    yaml.apply_merge()
        .map_err(|e| format!("a YAML merge key cannot be applied: {e}"))?;
    serde_json::to_value(&yaml).map_err(|e| format!("not a mapping: {e}"))
}

/// The Prefect variables the deployments of `text` name (`{{ prefect.variables.NAME }}`),
/// outside their pull steps, which are filled in when each flow run starts.
pub fn variable_names(text: &str) -> Result<BTreeSet<String>, String> {
    fn walk(v: &Value, names: &mut BTreeSet<String>) {
        match v {
            Value::String(s) => names.extend(
                placeholders(s)
                    .into_iter()
                    .filter_map(|(_, name)| name.strip_prefix(VARIABLE_PREFIX))
                    .map(str::to_string),
            ),
            Value::Array(a) => a.iter().for_each(|x| walk(x, names)),
            Value::Object(o) => o.values().for_each(|x| walk(x, names)),
            _ => {}
        }
    }
    let doc = parse(text)?;
    let mut names = BTreeSet::new();
    for d in doc["deployments"].as_array().into_iter().flatten() {
        // Only a deployment's own `pull` is its pull steps; a parameter may be called so.
        match d.as_object() {
            Some(fields) => fields
                .iter()
                .filter(|(k, _)| *k != "pull")
                .for_each(|(_, x)| walk(x, &mut names)),
            None => walk(d, &mut names),
        }
    }
    Ok(names)
}

/// The `{{ name }}` placeholders of `s` as Prefect finds them: (the whole placeholder,
/// the name). A name is word characters, dots, dashes, brackets and `$`.
fn placeholders(s: &str) -> Vec<(&str, &str)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = s[from..].find("{{").map(|i| from + i) {
        // A brace may open the next try: `{{{ a }}` holds `{{ a }}`.
        from = at + 1;
        let rest = &s[at + 2..];
        let inner = rest.trim_start();
        let len = inner
            .find(|c: char| !(c.is_alphanumeric() || "_.-[]$".contains(c)))
            .unwrap_or(inner.len());
        if len == 0 {
            continue;
        }
        let after = inner[len..].trim_start();
        if after.starts_with("}}") {
            let end = s.len() - after.len() + 2;
            found.push((&s[at..end], &inner[..len]));
            from = end;
        }
    }
    found
}

/// A variable's value as Python's `str()` writes it into text, as `prefect deploy`
/// does; `None` for a list or an object, whose Python form a manifest should not copy.
fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(match n.as_f64() {
            Some(f) if !(n.is_i64() || n.is_u64()) => python_float(f),
            _ => n.to_string(),
        }),
        Value::Bool(true) => Some("True".into()),
        Value::Bool(false) => Some("False".into()),
        Value::Null => Some("None".into()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// A float as Python's `str()` writes it: the shortest digits that read back the same
/// (Rust's too), in positional form from 1e-4 up to below 1e16 and with a `.0` when
/// whole, else as `1.5e-05` / `1e+16` (a sign and at least two exponent digits).
fn python_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "nan"
        } else if f > 0.0 {
            "inf"
        } else {
            "-inf"
        }
        .into();
    }
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    // Where the point goes: 0.DIGITS x 10^point.
    let point = exp + 1;
    if !(-4 < point && point <= 16) {
        let e_sign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{mantissa}e{e_sign}{:02}", exp.abs());
    }
    let n = digits.len() as i32;
    let body = if point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else if point >= n {
        format!("{digits}{}.0", "0".repeat((point - n) as usize))
    } else {
        let (a, b) = digits.split_at(point as usize);
        format!("{a}.{b}")
    };
    format!("{sign}{body}")
}

/// `v` with its variable placeholders filled in from `vars`: a string that is one
/// placeholder and nothing else becomes the variable's value (of any JSON type), one
/// with text around it gets the value as text. Problems are collected, not fatal.
fn fill(v: &Value, path: &str, vars: &Variables, problems: &mut Vec<String>) -> Value {
    let missing = |name: &str, path: &str| {
        format!("{path}: Prefect variable {name:?} does not exist on the server (`prefect deploy` would put an empty string there)")
    };
    map_strings(v, path, &mut |s, path| {
        let found = placeholders(s);
        if let [(whole, name)] = found.as_slice() {
            if let Some(name) = name.strip_prefix(VARIABLE_PREFIX).filter(|_| *whole == s) {
                return vars.get(name).cloned().unwrap_or_else(|| {
                    problems.push(missing(name, path));
                    json!(s)
                });
            }
        }
        json!(substitute(s, |name| {
            let name = name.strip_prefix(VARIABLE_PREFIX)?;
            match vars.get(name).map(as_text) {
                Some(Some(text)) => Some(text),
                Some(None) => {
                    problems.push(format!("{path}: Prefect variable {name:?} holds a list or an object, which cannot go inside text"));
                    None
                }
                None => {
                    problems.push(missing(name, path));
                    None
                }
            }
        }))
    })
}

/// `v` with its environment placeholders filled in from `env`, as `prefect deploy`
/// does: `{{ $NAME }}` takes the variable's text (one not set is a problem), and a
/// plain `{{ NAME }}` takes it where NAME is set (else it stays: a step output, say).
fn fill_env(
    v: &Value,
    path: &str,
    env: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) -> Value {
    map_strings(v, path, &mut |s, path| {
        json!(substitute(s, |name| {
            if let Some(var) = name.strip_prefix('$') {
                let var = var.trim_start_matches('$');
                let found = env.get(var).cloned();
                if found.is_none() {
                    problems.push(format!(
                        "{path}: environment variable {var:?} is not set (`prefect deploy` would leave the placeholder unfilled)"
                    ));
                }
                found
            } else if name.contains(['.', '[', ']']) {
                None
            } else {
                env.get(name).cloned()
            }
        }))
    })
}

/// `s` with each placeholder whose name `value` gives text for replaced by it, in one
/// pass as Prefect substitutes: inserted text is not read for placeholders again.
fn substitute(s: &str, mut value: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut copied = 0;
    for (whole, name) in placeholders(s) {
        if let Some(text) = value(name) {
            // `whole` is a slice of `s`: its offset says where it sits.
            let at = whole.as_ptr() as usize - s.as_ptr() as usize;
            out.push_str(&s[copied..at]);
            out.push_str(&text);
            copied = at + whole.len();
        }
    }
    out.push_str(&s[copied..]);
    out
}

/// `v` with each string replaced by `f(string, its path)`, through lists and objects.
fn map_strings(v: &Value, path: &str, f: &mut dyn FnMut(&str, &str) -> Value) -> Value {
    match v {
        Value::String(s) => f(s, path),
        Value::Array(a) => Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| map_strings(x, &format!("{path}[{i}]"), f))
                .collect(),
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), map_strings(x, &format!("{path}.{k}"), f)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Deployment `d` with `fill` applied to each field but its pull steps (which Prefect
/// fills in when each flow run starts). A field with a placeholder that cannot be
/// filled in is left out and reported.
fn with_filled(
    d: &Value,
    path: &str,
    left_out: &mut Vec<String>,
    fill: impl Fn(&Value, &str, &mut Vec<String>) -> Value,
) -> Value {
    let Some(fields) = d.as_object() else {
        return d.clone();
    };
    let mut out = Map::new();
    for (k, v) in fields {
        if k == "pull" {
            out.insert(k.clone(), v.clone());
            continue;
        }
        let mut problems = Vec::new();
        let filled = fill(v, &format!("{path}.{k}"), &mut problems);
        if problems.is_empty() {
            out.insert(k.clone(), filled);
        } else {
            left_out.extend(problems);
        }
    }
    Value::Object(out)
}

/// Converts `text` (a prefect.yaml). `server_url` goes into every `spec.server`.
/// Placeholders are filled in from `inputs` in `prefect deploy`'s order: Prefect
/// variables, then the environment.
pub fn convert(
    text: &str,
    server_url: &str,
    namespace: Option<&str>,
    inputs: &Inputs,
) -> Result<Converted, String> {
    let doc = parse(text)?;
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
        let mut d = d.clone();
        if let Some(vars) = &inputs.variables {
            d = with_filled(&d, &path, &mut left_out, |v, p, problems| {
                fill(v, p, vars, problems)
            });
        }
        if let Some(env) = &inputs.environment {
            d = with_filled(&d, &path, &mut left_out, |v, p, problems| {
                fill_env(v, p, env, problems)
            });
        }
        match deployment(
            &d,
            &doc["pull"],
            &path,
            server_url,
            namespace,
            &mut left_out,
        ) {
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
    // What names the deployment cannot be left out: without it there is nothing. Nor
    // can its queue: without it runs would go to the pool's default queue.
    let queue = pool["work_queue_name"].as_str().unwrap_or_default();
    for (field, v) in [
        ("name", name.as_str()),
        ("entrypoint", entrypoint.as_str()),
        ("work_pool.name", pool_name),
        ("work_pool.work_queue_name", queue),
    ] {
        if !placeholders(v).is_empty() {
            return Err(format!(
                "its {field} {v:?} is filled in by `prefect deploy`; put the value in the file{}",
                variables_hint(v)
            ));
        }
    }
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
    let limit = match &d["concurrency_limit"] {
        Value::Null => Value::Null,
        v => resolved(v, &format!("{path}.concurrency_limit"), left_out).unwrap_or_default(),
    };
    match &limit {
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

/// A duration of prefect.yaml (seconds, or text Prefect reads as a `timedelta`, such as
/// `PT10M` or `0:01:30`) as the whole seconds the spec holds. Anything else is kept as
/// written, for the check of the manifest to name.
fn whole_seconds(v: &Value) -> Value {
    let secs = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(_) => crate::schedule::interval::parse(v).ok().map(|e| e.seconds),
        _ => None,
    };
    match secs {
        // Below 2^53 a whole f64 is exact as an integer.
        Some(s) if (0.0..9.0e15).contains(&s) && s.fract() == 0.0 => json!(s as i64),
        _ => v.clone(),
    }
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
            let v = match from {
                "within" | "schedule_after" => whole_seconds(v),
                _ => v.clone(),
            };
            o.insert(to.into(), v);
        }
    }
    if let Some(m) = t.get("metric").filter(|m| !m.is_null()) {
        let mut metric = m.clone();
        if let Some(f) = metric.as_object_mut().and_then(|m| m.remove("firing_for")) {
            metric["firingFor"] = whole_seconds(&f);
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
            "{p}: {text:?} is filled in by `prefect deploy` (a step output, a Prefect variable or block, or an environment variable); put the value in the manifest{}",
            variables_hint(&text)
        ));
    }
    None
}

/// For a template naming a Prefect or an environment variable: the option that fills
/// those in.
fn variables_hint(text: &str) -> &'static str {
    if text.contains(VARIABLE_PREFIX) {
        " (`--resolve-variables` reads Prefect variables from the server)"
    } else if placeholders(text)
        .iter()
        .any(|(_, name)| name.starts_with('$'))
    {
        " (`--resolve-env` fills in environment variables)"
    } else {
        ""
    }
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

    fn with_vars(vars: &Variables) -> Inputs {
        Inputs {
            variables: Some(vars.clone()),
            environment: None,
        }
    }

    #[test]
    fn environment_variables_are_filled_in_as_prefect_deploy_does() {
        let text = r#"
pull:
  - prefect.deployments.steps.git_clone: {repository: "{{ $REPO }}"}
deployments:
  - name: "etl-{{ $STAGE }}"
    entrypoint: flows/etl.py:etl
    work_pool:
      name: k8s
      job_variables: {image: "{{ build.image }}", tier: "{{ UNSET }}"}
    version: "{{ $VERSION }}"
    tags: ["{{ STAGE }}", "{{ $$STAGE }}"]
    description: "built by {{ $UNSET }}"
    concurrency_limit: "{{ LIMIT }}"
    parameters: {region: "{{ $REGION }}-1", both: "{{ $STAGE }}/{{ $STAGE }}"}
    triggers:
      - expect: [a.b]
        parameters: {x: "{{ event.id }}", stage: "{{ $STAGE }}"}
  - name: queued
    entrypoint: flows/etl.py:etl
    work_pool: {name: k8s, work_queue_name: "{{ $TRICK }}"}
"#;
        let env: BTreeMap<String, String> = [
            ("STAGE", "prod"),
            ("VERSION", "2.1"),
            ("REGION", "eu"),
            ("REPO", "https://git.example/etl"),
            ("TRICK", "{{ $STAGE }}"),
            ("build.image", "never"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let inputs = Inputs {
            variables: None,
            environment: Some(env),
        };
        let c = convert(text, "http://prefect/api", None, &inputs).unwrap();
        let m = &c.manifests[0];
        let d = &m["spec"]["deployment"];
        assert_eq!(d["name"], "etl-prod");
        // A value stays text: "2.1" is not read as a number.
        assert_eq!(d["versionInfo"]["version"], "2.1");
        assert_eq!(
            d["parameters"],
            json!({"region": "eu-1", "both": "prod/prod"})
        );
        assert_eq!(
            d["triggers"][0]["parameters"],
            json!({"x": "{{ event.id }}", "stage": "prod"})
        );
        // A plain name is filled where set, `$$` reads as `$`.
        assert_eq!(d["tags"], json!(["prod", "prod"]));
        // A value is not read again for placeholders; a queue still a template stops
        // the conversion (left out, the runs would go to the default queue).
        assert_eq!(c.manifests.len(), 1);
        assert!(
            c.left_out.iter().any(|l| l.starts_with(
                r#"deployments[1]: not converted: its work_pool.work_queue_name "{{ $STAGE }}" is filled in"#
            )),
            "{:?}",
            c.left_out
        );
        // A template where a number goes is reported, not copied.
        assert!(d.get("concurrencyLimit").is_none(), "{d}");
        assert!(c
            .left_out
            .iter()
            .any(|l| l
                .starts_with(r#"deployments[0].concurrency_limit: "{{ LIMIT }}" is filled in"#)));
        // `$` not set: said, and the field left out.
        assert!(d.get("description").is_none());
        assert!(c.left_out.iter().any(|l| l
            == r#"deployments[0].description: environment variable "UNSET" is not set (`prefect deploy` would leave the placeholder unfilled)"#),
            "{:?}", c.left_out);
        // Dotted names are step outputs, never the environment's, and a plain name
        // not set stays; pull steps are filled in when each run starts, so they keep
        // theirs.
        assert!(d.get("jobVariables").is_none());
        for (field, text) in [("image", "{{ build.image }}"), ("tier", "{{ UNSET }}")] {
            let said =
                format!("deployments[0].work_pool.job_variables.{field}: {text:?} is filled in");
            assert!(
                c.left_out.iter().any(|l| l.starts_with(&said)),
                "{:?}",
                c.left_out
            );
        }
        assert_eq!(
            d["pullSteps"][0]["prefect.deployments.steps.git_clone"]["repository"],
            "{{ $REPO }}"
        );

        // Without the environment given, the same placeholders are reported.
        let c = convert(text, "http://prefect/api", None, &Inputs::default()).unwrap();
        assert!(c.manifests.is_empty());
        assert!(
            c.left_out
                .iter()
                .any(|l| l == "deployments[0]: not converted: its name \"etl-{{ $STAGE }}\" is filled in by `prefect deploy`; put the value in the file (`--resolve-env` fills in environment variables)"),
            "{:?}",
            c.left_out
        );
    }

    #[test]
    fn trigger_durations_become_whole_seconds() {
        let mut left_out = Vec::new();
        let t = trigger(
            &json!({"within": "PT10M", "schedule_after": "0:01:30", "triggers": [
                {"within": 90.0, "metric": {"firing_for": "P1D"}},
                {"within": 0},
                {"within": 1.5},
                {"within": "soon"},
            ]}),
            "t",
            &mut left_out,
        );
        assert!(left_out.is_empty(), "{left_out:?}");
        assert_eq!(t["within"], json!(600));
        assert_eq!(t["scheduleAfter"], json!(90));
        let c = &t["triggers"];
        assert_eq!(c[0]["within"], json!(90));
        assert_eq!(c[0]["metric"]["firingFor"], json!(86400));
        assert_eq!(c[1]["within"], json!(0));
        // Not whole seconds, or not a duration: kept for the manifest check to refuse.
        assert_eq!(c[2]["within"], json!(1.5));
        assert_eq!(c[3]["within"], json!("soon"));
    }

    /// Python's own `str()` of each (CPython 3.11), as `prefect deploy` puts a float
    /// variable into text.
    #[test]
    fn floats_in_text_read_as_python_writes_them() {
        for (f, python) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (100.0, "100.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (1e20, "1e+20"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (0.00012345, "0.00012345"),
            (1.5e-5, "1.5e-05"),
            (123.456, "123.456"),
            (1e300, "1e+300"),
            (-1e-300, "-1e-300"),
            (5e-324, "5e-324"),
            (9007199254740992.0, "9007199254740992.0"),
            (1.0 / 3.0, "0.3333333333333333"),
        ] {
            assert_eq!(python_float(f), python, "{f:e}");
            assert_eq!(as_text(&json!(f)).unwrap(), python);
        }
        assert_eq!(as_text(&json!(42)).unwrap(), "42");
        assert_eq!(as_text(&json!(-7)).unwrap(), "-7");
    }

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
        let c = convert(text, "http://prefect/api", Some("data"), &Inputs::default()).unwrap();
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

    #[test]
    fn prefect_variables_are_filled_in_as_prefect_deploy_does() {
        let text = r#"
pull:
  - prefect.deployments.steps.git_clone:
      repository: "{{ prefect.variables.repo }}"
deployments:
  - name: "{{ prefect.variables.team }}-etl"
    entrypoint: flows/etl.py:etl
    tags: ["{{ prefect.variables.team }}", "{{prefect.variables.team}}"]
    parameters:
      # A parameter may be called `pull`: only the deployment's own are pull steps.
      pull: "{{ prefect.variables.owner }}"
      limits: "{{ prefect.variables.limits }}"
      retries: "{{ prefect.variables.retries }}"
      note: "retries={{ prefect.variables.retries }} dry={{ prefect.variables.dry }}"
      missing: "{{ prefect.variables.nowhere }}"
    work_pool:
      name: k8s
      job_variables: {image: "{{ prefect.variables.image }}:{{ build.tag }}"}
    description: "uses {{ prefect.variables.limits }}"
"#;
        let names = variable_names(text).unwrap();
        // The pull step's variable is Prefect's to fill in when each run starts.
        assert_eq!(
            names.iter().map(String::as_str).collect::<Vec<_>>(),
            ["dry", "image", "limits", "nowhere", "owner", "retries", "team"]
        );
        let vars: Variables = [
            ("team", json!("data")),
            ("limits", json!({"cpu": 2})),
            ("retries", json!(3)),
            ("dry", json!(false)),
            ("owner", json!("ana")),
            ("image", json!("registry.example/etl")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let c = convert(text, "http://prefect/api", None, &with_vars(&vars)).unwrap();
        let d = &c.manifests[0]["spec"]["deployment"];
        assert_eq!(d["name"], "data-etl");
        assert_eq!(d["tags"], json!(["data", "data"]));
        // A missing variable leaves its whole field out, as any unfilled template.
        assert!(d.get("parameters").is_none(), "{d}");
        assert!(c.left_out.iter().any(|l| l
            == "deployments[0].parameters.missing: Prefect variable \"nowhere\" does not exist on the server (`prefect deploy` would put an empty string there)"));
        // An object cannot go inside text; a step output is still not ours to fill.
        assert!(d.get("description").is_none());
        assert!(c.left_out.iter().any(|l| l.starts_with(
            "deployments[0].description: Prefect variable \"limits\" holds a list or an object"
        )));
        assert!(d.get("jobVariables").is_none());
        assert!(c.left_out.iter().any(|l| l.starts_with(
            "deployments[0].work_pool.job_variables.image: \"registry.example/etl:{{ build.tag }}\" is filled in by `prefect deploy`"
        )), "{:?}", c.left_out);
        assert_eq!(
            d["pullSteps"][0]["prefect.deployments.steps.git_clone"]["repository"],
            "{{ prefect.variables.repo }}"
        );

        // With every variable present, values keep their JSON type when a field is
        // the placeholder alone, and become Python's text inside other text.
        let text = text.replace("nowhere", "retries").replace(
            r#"description: "uses {{ prefect.variables.limits }}""#,
            "description: plain",
        );
        let c = convert(&text, "http://prefect/api", None, &with_vars(&vars)).unwrap();
        let p = &c.manifests[0]["spec"]["deployment"]["parameters"];
        assert_eq!(p["limits"], json!({"cpu": 2}));
        assert_eq!(p["pull"], json!("ana"));
        assert_eq!(p["retries"], json!(3));
        assert_eq!(p["note"], json!("retries=3 dry=False"));

        // Without variables given, the report points at the option.
        let c = convert(&text, "http://prefect/api", None, &Inputs::default()).unwrap();
        assert!(
            c.left_out.iter().any(|l| l
                == "deployments[0]: not converted: its name \"{{ prefect.variables.team }}-etl\" is filled in by `prefect deploy`; put the value in the file (`--resolve-variables` reads Prefect variables from the server)"),
            "{:?}",
            c.left_out
        );
        assert!(c.manifests.is_empty());
    }

    #[test]
    fn placeholders_are_found_as_prefect_finds_them() {
        assert_eq!(
            placeholders("a {{ x.y }} b {{z}} {{ $HOME }} {{ not valid }} {{ q"),
            [
                ("{{ x.y }}", "x.y"),
                ("{{z}}", "z"),
                ("{{ $HOME }}", "$HOME")
            ]
        );
        assert_eq!(placeholders("{{{{ a }}}}"), [("{{ a }}", "a")]);
        assert_eq!(placeholders("{{{ a }}"), [("{{ a }}", "a")]);
        assert!(placeholders("{{ }}").is_empty());
    }
}
