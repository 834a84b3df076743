//! Pure validation of a `PrefectDeploymentSpec`: no network, no clock. Returns the first
//! problem with the path of the field it is about, so a person can fix it from the
//! condition message alone.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;

use crate::api::{
    DeploymentSpec, Posture, PrefectDeploymentSpec, Schedule, SecretValue, ServerSpec, Trigger,
    TriggerCondition, TriggerType,
};

/// The longest rrule Prefect stores.
pub const MAX_RRULE_LEN: usize = 6500;
/// Characters Prefect refuses in flow and deployment names.
const BANNED_NAME_CHARS: [char; 5] = ['/', '%', '&', '>', '<'];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

type Check = Result<(), Problem>;

fn problem(field: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        field: field.into(),
        message: message.into(),
    }
}

/// Validates the whole spec; `resource_name` stands in for an unset deployment name.
pub fn validate(spec: &PrefectDeploymentSpec, resource_name: &str) -> Check {
    server(&spec.server)?;
    if spec.work_pool.name.trim().is_empty() {
        return Err(problem("spec.workPool.name", "must not be empty"));
    }
    if let Some(interval) = &spec.interval {
        parse_go_duration(interval).map_err(|m| problem("spec.interval", m))?;
    }
    deployment(&spec.deployment, resource_name)
}

fn server(s: &ServerSpec) -> Check {
    let cloud = s.account_id.is_some() || s.workspace_id.is_some();
    if cloud
        && (s.account_id.as_deref().unwrap_or("").is_empty()
            || s.workspace_id.as_deref().unwrap_or("").is_empty())
    {
        return Err(problem(
            "spec.server",
            "accountId and workspaceId must be set together",
        ));
    }
    if let Some(url) = &s.remote_api_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
            return Err(problem(
                "spec.server.remoteApiUrl",
                format!("{url:?} is not an http(s) URL"),
            ));
        }
    } else if !cloud && s.name.as_deref().unwrap_or("").is_empty() {
        return Err(problem(
            "spec.server",
            "set remoteApiUrl, accountId and workspaceId (Prefect Cloud), or name (an in-cluster server)",
        ));
    }
    if s.api_key.is_some() && s.auth_string.is_some() {
        return Err(problem("spec.server", "set apiKey or authString, not both"));
    }
    if let Some(k) = &s.api_key {
        secret_value(k, "spec.server.apiKey")?;
    }
    if let Some(k) = &s.auth_string {
        secret_value(k, "spec.server.authString")?;
        if let Some(v) = &k.value {
            if !v.contains(':') {
                return Err(problem(
                    "spec.server.authString.value",
                    "must have the form user:password",
                ));
            }
        }
    }
    Ok(())
}

fn secret_value(v: &SecretValue, field: &str) -> Check {
    match (&v.value, &v.value_from) {
        (Some(_), Some(_)) => Err(problem(field, "set either value or valueFrom, not both")),
        (None, None) => Err(problem(field, "set value or valueFrom")),
        (Some(_), None) => Ok(()),
        (None, Some(from)) => {
            let r = match (&from.secret_key_ref, &from.config_map_key_ref) {
                (Some(r), None) => r,
                (None, Some(r)) => r,
                _ => {
                    return Err(problem(
                        format!("{field}.valueFrom"),
                        "set exactly one of secretKeyRef or configMapKeyRef",
                    ))
                }
            };
            if r.name.as_deref().unwrap_or("").is_empty() || r.key.is_empty() {
                return Err(problem(
                    format!("{field}.valueFrom"),
                    "name and key must not be empty",
                ));
            }
            Ok(())
        }
    }
}

fn name_check(field: &str, name: &str) -> Check {
    if name.trim().is_empty() {
        return Err(problem(field, "must not be empty"));
    }
    if let Some(c) = name.chars().find(|c| BANNED_NAME_CHARS.contains(c)) {
        return Err(problem(
            field,
            format!("{name:?} contains {c:?}, which Prefect does not allow in names"),
        ));
    }
    Ok(())
}

fn object_check(field: &str, v: &Option<Value>) -> Check {
    match v {
        Some(v) if !v.is_object() => Err(problem(field, "must be an object")),
        _ => Ok(()),
    }
}

fn deployment(d: &DeploymentSpec, resource_name: &str) -> Check {
    let name = d.name.as_deref().unwrap_or(resource_name);
    name_check("spec.deployment.name", name)?;
    entrypoint(&d.entrypoint)?;
    if let Some(flow) = &d.flow_name {
        name_check("spec.deployment.flow_name", flow)?;
    }
    object_check("spec.deployment.parameters", &d.parameters)?;
    object_check("spec.deployment.jobVariables", &d.job_variables)?;
    object_check(
        "spec.deployment.parameterOpenApiSchema",
        &d.parameter_open_api_schema,
    )?;
    if let Some(steps) = &d.pull_steps {
        if let Some(i) = steps.iter().position(|s| !s.is_object()) {
            return Err(problem(
                format!("spec.deployment.pullSteps[{i}]"),
                "must be an object",
            ));
        }
    }
    if let Some(limit) = d.concurrency_limit {
        if limit < 1 {
            return Err(problem(
                "spec.deployment.concurrencyLimit",
                "must be at least 1",
            ));
        }
    }
    if let Some(g) = &d.global_concurrency_limit {
        if let Some(limit) = g.limit {
            if limit < 1 {
                return Err(problem(
                    "spec.deployment.globalConcurrencyLimit.limit",
                    "must be at least 1",
                ));
            }
        }
        if let Some(s) = &g.collision_strategy {
            if s != "ENQUEUE" && s != "CANCEL_NEW" {
                return Err(problem(
                    "spec.deployment.globalConcurrencyLimit.collisionStrategy",
                    format!("{s:?} is not ENQUEUE or CANCEL_NEW"),
                ));
            }
        }
    }
    let mut slugs = HashSet::new();
    for (i, s) in d.schedules.iter().flatten().enumerate() {
        let field = format!("spec.deployment.schedules[{i}]");
        if !slugs.insert(s.slug.as_str()) {
            return Err(problem(
                format!("{field}.slug"),
                format!(
                    "{:?} is used by an earlier schedule; slugs must be unique",
                    s.slug
                ),
            ));
        }
        schedule(s, &field)?;
    }
    for (i, t) in d.triggers.iter().flatten().enumerate() {
        trigger(t, &format!("spec.deployment.triggers[{i}]"))?;
    }
    parameters(d)
}

/// With an enforced parameter schema, every set of parameters a run can get must pass
/// it: the deployment's, each schedule's merged over them (Prefect itself never checks
/// these), and each trigger's (values templated from the event are checked when the
/// trigger fires, so they are left out here).
fn parameters(d: &DeploymentSpec) -> Check {
    let Some(schema) = &d.parameter_open_api_schema else {
        return Ok(());
    };
    if !d.enforce_parameter_schema.unwrap_or(true) {
        return Ok(());
    }
    let validator = parameter_validator(schema)
        .map_err(|m| problem("spec.deployment.parameterOpenApiSchema", m))?;
    let base = d
        .parameters
        .clone()
        .unwrap_or_else(|| Value::Object(Default::default()));
    check_parameters(&validator, &base, "spec.deployment.parameters")?;
    for (i, s) in d.schedules.iter().flatten().enumerate() {
        if let Some(Value::Object(own)) = &s.parameters {
            let mut merged = base.clone();
            for (k, v) in own {
                merged[k] = v.clone();
            }
            check_parameters(
                &validator,
                &merged,
                &format!("spec.deployment.schedules[{i}].parameters"),
            )?;
        }
    }
    for (i, t) in d.triggers.iter().flatten().enumerate() {
        if let Some(Value::Object(own)) = &t.parameters {
            let fixed: serde_json::Map<String, Value> = own
                .iter()
                .filter(|(_, v)| !is_templated(v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            check_parameters(
                &validator,
                &Value::Object(fixed),
                &format!("spec.deployment.triggers[{i}].parameters"),
            )?;
        }
    }
    Ok(())
}

/// A value Prefect fills in later: a Jinja template or a placeholder object.
fn is_templated(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("{{") || s.contains("{%"),
        Value::Object(o) => o.contains_key("__prefect_kind"),
        _ => false,
    }
}

/// The schema as Prefect's server applies it when it creates a deployment: missing
/// required parameters are allowed, formats are not checked, the latest draft (2020-12)
/// unless the schema names another. (Prefect's update path also lets an optional
/// parameter be null; the create path does not, and a deployment must stay creatable.)
pub fn parameter_validator(schema: &Value) -> Result<jsonschema::Validator, String> {
    let mut prepared = schema.clone();
    drop_required(&mut prepared);
    let mut options = jsonschema::options().should_validate_formats(false);
    if prepared.get("$schema").is_none() {
        options = options.with_draft(jsonschema::Draft::Draft202012);
    }
    options
        .build(&prepared)
        .map_err(|e| format!("is not a valid JSON Schema: {e}"))
}

fn drop_required(node: &mut Value) {
    match node {
        Value::Object(map) => {
            if map.get("required").is_some_and(Value::is_array) {
                map.remove("required");
            }
            map.values_mut().for_each(drop_required);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_required),
        _ => {}
    }
}

fn check_parameters(validator: &jsonschema::Validator, params: &Value, field: &str) -> Check {
    match validator.iter_errors(params).next() {
        None => Ok(()),
        Some(e) => {
            let mut path = String::new();
            for part in e.instance_path().as_str().split('/').skip(1) {
                if part.parse::<usize>().is_ok() {
                    path.push_str(&format!("[{part}]"));
                } else {
                    path.push('.');
                    path.push_str(part);
                }
            }
            Err(problem(
                format!("{field}{path}"),
                format!("{e} (parameterOpenApiSchema)"),
            ))
        }
    }
}

fn entrypoint(e: &str) -> Check {
    let field = "spec.deployment.entrypoint";
    let Some((path, func)) = e.rsplit_once(':') else {
        return Err(problem(
            field,
            format!("{e:?} must have the form path/to/file.py:function"),
        ));
    };
    if path.trim().is_empty() {
        return Err(problem(field, format!("{e:?} has no path before ':'")));
    }
    if !func.split('.').all(is_identifier) {
        return Err(problem(
            field,
            format!("{func:?} after ':' is not a Python function name"),
        ));
    }
    Ok(())
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_alphabetic())
        && chars.all(|c| c == '_' || c.is_alphanumeric())
}

fn schedule(s: &Schedule, field: &str) -> Check {
    if s.slug.trim().is_empty() {
        return Err(problem(format!("{field}.slug"), "must not be empty"));
    }
    let kinds = [s.interval.is_some(), s.cron.is_some(), s.rrule.is_some()]
        .iter()
        .filter(|k| **k)
        .count();
    if kinds != 1 {
        return Err(problem(field, "set exactly one of interval, cron or rrule"));
    }
    if let Some(n) = s.max_scheduled_runs {
        if !(1..=50).contains(&n) {
            return Err(problem(
                format!("{field}.max_scheduled_runs"),
                "must be between 1 and 50",
            ));
        }
    }
    object_check(&format!("{field}.parameters"), &s.parameters)?;
    let tz = match &s.timezone {
        Some(tz) => timezone(tz).map_err(|m| problem(format!("{field}.timezone"), m))?,
        None => chrono_tz::Tz::UTC,
    };
    if let Some(interval) = &s.interval {
        interval_seconds(interval).map_err(|m| problem(format!("{field}.interval"), m))?;
    }
    if let Some(anchor) = &s.anchor_date {
        if s.interval.is_none() {
            return Err(problem(
                format!("{field}.anchor_date"),
                "is only for interval schedules",
            ));
        }
        parse_anchor_date(anchor, tz).map_err(|m| problem(format!("{field}.anchor_date"), m))?;
    }
    if s.day_or.is_some() && s.cron.is_none() {
        return Err(problem(
            format!("{field}.day_or"),
            "is only for cron schedules",
        ));
    }
    if let Some(cron) = &s.cron {
        cron_expression(cron, s.day_or.unwrap_or(true))
            .map_err(|m| problem(format!("{field}.cron"), m))?;
    }
    if let Some(rrule) = &s.rrule {
        rrule_expression(rrule).map_err(|m| problem(format!("{field}.rrule"), m))?;
    }
    Ok(())
}

pub fn timezone(tz: &str) -> Result<chrono_tz::Tz, String> {
    chrono_tz::Tz::from_str(tz).map_err(|_| format!("{tz:?} is not an IANA time zone name"))
}

/// RFC 3339, or a date-time without offset, which is read in the schedule's zone `tz`
/// (Prefect itself would read it as UTC; the operator sends it with an explicit offset).
pub fn parse_anchor_date(
    s: &str,
    tz: chrono_tz::Tz,
) -> Result<chrono::DateTime<chrono::FixedOffset>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t);
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(crate::preview::resolve_forward(tz, t).fixed_offset());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let t = d.and_hms_opt(0, 0, 0).expect("midnight exists");
        return Ok(crate::preview::resolve_forward(tz, t).fixed_offset());
    }
    Err(format!(
        "{s:?} is not a date-time; use RFC 3339, e.g. 2024-01-01T00:00:00Z"
    ))
}

/// Cron as Prefect (croniter) reads it: five fields or a macro. Refused although Prefect
/// takes them: six fields (Prefect reads the sixth as seconds, firing far more often
/// than meant) and expressions that match no date at all.
pub fn cron_expression(expr: &str, day_or: bool) -> Result<(), String> {
    let cron = crate::preview::Cron::parse(expr, day_or)?;
    if !cron.ever_fires() {
        return Err(format!(
            "{:?} never fires: no date matches its day-of-month, month and day-of-week",
            expr.trim()
        ));
    }
    Ok(())
}

/// An interval as Prefect takes it: seconds (a positive number), or a duration string
/// in ISO 8601 (`PT1H30M`, `P1D`, `P2W`) or `[D day[s], ]HH:MM:SS` form. Years and
/// months are refused: Prefect would count them as 365 and 30 days, which is not what
/// "every month" means (use cron or rrule for calendar months).
pub fn interval_seconds(v: &Value) -> Result<f64, String> {
    let secs = match v {
        Value::Number(n) => n.as_f64().unwrap_or(0.0),
        Value::String(s) => match s.trim().parse::<f64>() {
            Ok(n) => n,
            Err(_) => duration_string(s.trim())?,
        },
        _ => return Err("must be a number of seconds or a duration such as PT1H".into()),
    };
    if secs.is_nan() || secs <= 0.0 || !secs.is_finite() {
        return Err(format!("{v} must be a positive interval"));
    }
    Ok(secs)
}

fn duration_string(s: &str) -> Result<f64, String> {
    let bad = || {
        format!(
            "{s:?} is not an interval; use seconds or an ISO 8601 duration such as PT1H30M or P1D"
        )
    };
    if let Some(rest) = s.strip_prefix(['P', 'p']) {
        let (date, time) = match rest.split_once(['T', 't']) {
            Some((d, t)) => (d, Some(t)),
            None => (rest, None),
        };
        let mut total = 0.0;
        let mut any = false;
        for (part, units) in [(date, "YMWD"), (time.unwrap_or(""), "HMS")] {
            let mut num = String::new();
            for c in part.chars() {
                if c.is_ascii_digit() || c == '.' {
                    num.push(c);
                    continue;
                }
                let u = c.to_ascii_uppercase();
                if !units.contains(u) || num.is_empty() {
                    return Err(bad());
                }
                let n: f64 = num.parse().map_err(|_| bad())?;
                num.clear();
                any = true;
                total += n * match (units, u) {
                    ("YMWD", 'Y') | ("YMWD", 'M') => {
                        return Err(format!(
                            "{s:?}: years and months are not fixed lengths (Prefect would count 365 and 30 days); use a cron or rrule schedule for calendar months"
                        ))
                    }
                    ("YMWD", 'W') => 604_800.0,
                    ("YMWD", 'D') => 86_400.0,
                    ("HMS", 'H') => 3600.0,
                    ("HMS", 'M') => 60.0,
                    _ => 1.0,
                };
            }
            if !num.is_empty() {
                return Err(bad());
            }
        }
        if !any || time == Some("") {
            return Err(bad());
        }
        return Ok(total);
    }
    // `[D day[s], ]HH:MM:SS[.f]`
    let (days, clock) = match s.split_once(',') {
        Some((d, c)) => (d.trim(), c.trim()),
        None => ("", s),
    };
    let days: f64 = if days.is_empty() {
        0.0
    } else {
        days.trim_end_matches("days")
            .trim_end_matches("day")
            .trim_end_matches('d')
            .trim()
            .parse()
            .map_err(|_| bad())?
    };
    let parts: Vec<&str> = clock.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 {
        return Err(bad());
    }
    let mut total = 0.0;
    for p in &parts {
        total = total * 60.0 + p.parse::<f64>().map_err(|_| bad())?;
    }
    if parts.len() == 2 {
        total *= 60.0; // HH:MM
    }
    Ok(days * 86_400.0 + total)
}

/// An RFC 5545 recurrence rule as Prefect (dateutil) reads it: with or without an
/// `RRULE:` prefix and a DTSTART line.
pub fn rrule_expression(rule: &str) -> Result<(), String> {
    if rule.len() > MAX_RRULE_LEN {
        return Err(format!(
            "is {} characters; Prefect allows at most {MAX_RRULE_LEN}",
            rule.len()
        ));
    }
    // Checked in the form the preview computes runs from (dates as wall-clock times, a
    // default DTSTART), so an accepted rule always yields a preview.
    let text = crate::preview::wall_clock_rrule(rule, chrono::NaiveDateTime::MIN);
    rrule::RRuleSet::from_str(&text).map(|_| ()).map_err(|e| {
        let e = e.to_string();
        let e = e
            .strip_prefix("RRule parsing error: ")
            .unwrap_or(&e)
            .to_string();
        format!("{rule:?} is not a valid RFC 5545 rule: {e}")
    })
}

fn trigger(t: &Trigger, field: &str) -> Check {
    if let Some(n) = &t.name {
        if n.trim().is_empty() {
            return Err(problem(
                format!("{field}.name"),
                "must not be empty when set",
            ));
        }
    }
    object_check(&format!("{field}.parameters"), &t.parameters)?;
    object_check(&format!("{field}.jobVariables"), &t.job_variables)?;
    if let Some(s) = t.schedule_after {
        if s < 0 {
            return Err(problem(
                format!("{field}.scheduleAfter"),
                "must be 0 or more seconds",
            ));
        }
    }
    let kind = t.condition.type_.unwrap_or(TriggerType::Event);
    match kind {
        TriggerType::Event | TriggerType::Metric => {
            if t.triggers.is_some() || t.require.is_some() {
                return Err(problem(
                    field,
                    "triggers and require are only for compound and sequence triggers",
                ));
            }
            condition(&t.condition, field)
        }
        TriggerType::Compound | TriggerType::Sequence => {
            let c = &t.condition;
            if c.posture.is_some()
                || c.match_.is_some()
                || c.match_related.is_some()
                || c.after.is_some()
                || c.expect.is_some()
                || c.for_each.is_some()
                || c.threshold.is_some()
                || c.metric.is_some()
            {
                return Err(problem(
                    field,
                    "a compound or sequence trigger takes only within, triggers (and require); put event fields on its child triggers",
                ));
            }
            let children = t.triggers.as_deref().unwrap_or_default();
            if children.is_empty() {
                return Err(problem(
                    format!("{field}.triggers"),
                    "a compound or sequence trigger needs at least one child trigger",
                ));
            }
            match c.within {
                None => {
                    return Err(problem(
                        format!("{field}.within"),
                        "is required for compound and sequence triggers",
                    ))
                }
                Some(w) if w < 0 => {
                    return Err(problem(
                        format!("{field}.within"),
                        "must be 0 or more seconds",
                    ))
                }
                _ => {}
            }
            if kind == TriggerType::Sequence && t.require.is_some() {
                return Err(problem(
                    format!("{field}.require"),
                    "is only for compound triggers",
                ));
            }
            if let Some(r) = &t.require {
                require(r, children.len()).map_err(|m| problem(format!("{field}.require"), m))?;
            }
            for (i, child) in children.iter().enumerate() {
                let cf = format!("{field}.triggers[{i}]");
                match child.type_.unwrap_or(TriggerType::Event) {
                    TriggerType::Event | TriggerType::Metric => condition(child, &cf)?,
                    _ => {
                        return Err(problem(
                            format!("{cf}.type"),
                            "child triggers must be event or metric triggers",
                        ))
                    }
                }
            }
            Ok(())
        }
    }
}

fn require(r: &Value, children: usize) -> Result<(), String> {
    let ok = match r {
        Value::String(s) if s == "any" || s == "all" => true,
        Value::Number(n) => matches!(n.as_u64(), Some(k) if k >= 1 && k as usize <= children),
        Value::String(s) => matches!(s.parse::<u64>(), Ok(k) if k >= 1 && k as usize <= children),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{r} must be between 1 and {children} (the number of child triggers), any or all"
        ))
    }
}

fn condition(c: &TriggerCondition, field: &str) -> Check {
    let kind = c.type_.unwrap_or(TriggerType::Event);
    object_check(&format!("{field}.match"), &c.match_)?;
    if let Some(related) = &c.match_related {
        let ok = related.is_object()
            || related
                .as_array()
                .is_some_and(|a| a.iter().all(Value::is_object));
        if !ok {
            return Err(problem(
                format!("{field}.matchRelated"),
                "must be an object or a list of objects",
            ));
        }
    }
    if let Some(w) = c.within {
        if w < 0 {
            return Err(problem(
                format!("{field}.within"),
                "must be 0 or more seconds",
            ));
        }
    }
    match kind {
        TriggerType::Event => {
            if c.metric.is_some() {
                return Err(problem(
                    format!("{field}.metric"),
                    "is only for metric triggers (set type: metric)",
                ));
            }
            if let Some(t) = c.threshold {
                if t < 1 {
                    return Err(problem(format!("{field}.threshold"), "must be at least 1"));
                }
            }
            if c.posture == Some(Posture::Proactive) && c.within.unwrap_or(0) < 10 {
                return Err(problem(
                    format!("{field}.within"),
                    "a Proactive trigger needs within of at least 10 seconds",
                ));
            }
            Ok(())
        }
        TriggerType::Metric => {
            let Some(m) = &c.metric else {
                return Err(problem(
                    format!("{field}.metric"),
                    "is required for metric triggers",
                ));
            };
            if c.posture.is_some()
                || c.after.is_some()
                || c.expect.is_some()
                || c.threshold.is_some()
                || c.within.is_some()
            {
                return Err(problem(
                    field,
                    "a metric trigger takes metric, match and matchRelated only",
                ));
            }
            if !["lateness", "duration", "successes"].contains(&m.name.as_str()) {
                return Err(problem(
                    format!("{field}.metric.name"),
                    format!("{:?} is not lateness, duration or successes", m.name),
                ));
            }
            if !["<", "<=", ">", ">="].contains(&m.operator.as_str()) {
                return Err(problem(
                    format!("{field}.metric.operator"),
                    format!("{:?} is not <, <=, > or >=", m.operator),
                ));
            }
            for (name, v) in [("range", m.range), ("firingFor", m.firing_for)] {
                if let Some(v) = v {
                    if v < 300 {
                        return Err(problem(
                            format!("{field}.metric.{name}"),
                            "must be at least 300 seconds",
                        ));
                    }
                }
            }
            Ok(())
        }
        _ => unreachable!("callers pass event or metric conditions"),
    }
}

/// Parses a Go-style duration (`90s`, `5m`, `1h30m`, `500ms`), as PrefectHQ's operator
/// accepts for spec.interval.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration such as 30s, 5m or 1h30m");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        let (num, tail) = rest.split_at(num_end);
        let n: f64 = num.parse().map_err(|_| err())?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let secs = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        total += Duration::from_secs_f64(n * secs);
        rest = tail;
    }
    Ok(total)
}
