//! Pure validation of a `PrefectDeploymentSpec`: no network, no clock. Returns the first
//! problem with the path of the field it is about, so a person can fix it from the
//! condition message alone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono_tz::Tz;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::api::{
    DeploymentSpec, Posture, PrefectDeploymentSpec, Schedule, SecretValue, ServerSpec, Trigger,
    TriggerCondition, TriggerType,
};
use crate::schedule::{cron::Cron, interval, rrule, zone, Rule};

/// Limits on a parameter schema, so that compiling and running it stays within a few
/// MiB and milliseconds: nesting depth, JSON values in it, serialized size.
pub const MAX_SCHEMA_DEPTH: usize = 32;
pub const MAX_SCHEMA_NODES: usize = 20_000;
pub const MAX_SCHEMA_BYTES: usize = 256 * 1024;
/// Backtracking steps one `pattern` may take on one value (look-around and
/// back-references need a backtracking engine; the rest runs in linear time).
const REGEX_BACKTRACK_LIMIT: usize = 5_000;
/// Wall time all parameter checks of one spec may take together: a backstop for many
/// long values against a costly pattern (each check is bounded, their number is not).
const PARAMETER_CHECK_TIME: Duration = Duration::from_secs(1);
/// Compiled parameter validators kept across passes, keyed by schema hash.
const VALIDATOR_CACHE: usize = 64;
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

/// A `slotDecayPerSecond` string as the number Prefect takes: digits, optionally a
/// fraction (the form the CRD's rule accepts, so both evaluators agree).
pub fn slot_decay(text: &str) -> Option<f64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, "0"));
    let digits = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
    if !(digits(whole) && digits(frac)) {
        return None;
    }
    text.parse().ok()
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        field: field.into(),
        message: message.into(),
    }
}

/// A spec that passed validation, with every piece the next steps need already parsed.
/// Only `validate` makes one, so nothing downstream meets an invalid spec.
#[derive(Debug, Clone)]
pub struct ValidSpec<'a> {
    pub spec: &'a PrefectDeploymentSpec,
    /// The Prefect deployment name (spec.deployment.name, else the resource's name).
    pub name: String,
    pub flow_name: String,
    pub schedules: Vec<ValidSchedule>,
    /// spec.interval, parsed.
    pub resync: Option<Duration>,
}

/// One schedule, parsed.
#[derive(Debug, Clone)]
pub struct ValidSchedule {
    pub slug: String,
    pub rule: Rule,
    pub tz: Tz,
    /// The zone as Prefect is sent it: the manifest's name, or UTC.
    pub tz_name: String,
    /// The cron or rrule text as Prefect is sent it (empty for intervals).
    pub text: String,
    pub active: bool,
    pub max_scheduled_runs: Option<i64>,
    pub parameters: Option<Value>,
    /// The slug it is renamed from, if any.
    pub replaces: Option<String>,
}

/// Validates the whole spec; `resource_name` stands in for an unset deployment name.
pub fn validate<'a>(
    spec: &'a PrefectDeploymentSpec,
    resource_name: &str,
) -> Result<ValidSpec<'a>, Problem> {
    server(&spec.server)?;
    if spec.work_pool.name.trim().is_empty() {
        return Err(problem("spec.workPool.name", "must not be empty"));
    }
    let resync = match &spec.interval {
        Some(i) => Some(parse_go_duration(i).map_err(|m| problem("spec.interval", m))?),
        None => None,
    };
    let schedules = deployment(&spec.deployment, resource_name)?;
    Ok(ValidSpec {
        spec,
        name: spec
            .deployment
            .name
            .clone()
            .unwrap_or_else(|| resource_name.to_string()),
        flow_name: spec.deployment.flow_name(),
        schedules,
        resync,
    })
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

fn deployment(d: &DeploymentSpec, resource_name: &str) -> Result<Vec<ValidSchedule>, Problem> {
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
        if d.concurrency_limit.is_some() {
            return Err(problem(
                "spec.deployment.concurrencyLimit",
                "set concurrencyLimit (this deployment's own limit) or globalConcurrencyLimit (a named limit shared with others), not both",
            ));
        }
        let field = |f: &str| format!("spec.deployment.globalConcurrencyLimit.{f}");
        if g.name.is_empty() {
            return Err(problem(field("name"), "must not be empty"));
        }
        if let Some(c) = g.name.chars().find(|c| BANNED_NAME_CHARS.contains(c)) {
            return Err(problem(
                field("name"),
                format!(
                    "{:?} contains {c:?}; Prefect refuses /, %, &, < and > in names",
                    g.name
                ),
            ));
        }
        if let Some(limit) = g.limit {
            if limit < 0 {
                return Err(problem(field("limit"), "must be 0 or more"));
            }
        }
        if let Some(s) = &g.collision_strategy {
            if s != "ENQUEUE" && s != "CANCEL_NEW" {
                return Err(problem(
                    field("collisionStrategy"),
                    format!("{s:?} is not ENQUEUE or CANCEL_NEW"),
                ));
            }
        }
        if let Some(s) = &g.slot_decay_per_second {
            if slot_decay(s).is_none() {
                return Err(problem(
                    field("slotDecayPerSecond"),
                    format!("{s:?} is not a non-negative decimal number, such as \"0.5\""),
                ));
            }
        }
    }
    if let Some(g) = d
        .concurrency_options
        .as_ref()
        .and_then(|o| o.grace_period_seconds)
    {
        if !(60..=86400).contains(&g) {
            return Err(problem(
                "spec.deployment.concurrencyOptions.gracePeriodSeconds",
                format!("{g} is outside 60-86400 seconds, the range Prefect accepts"),
            ));
        }
    }
    let mut slugs = HashSet::new();
    let mut schedules = Vec::new();
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
        schedules.push(schedule(s, &field)?);
    }
    // A rename names a slug the spec no longer uses, once.
    let mut renamed = HashSet::new();
    for (i, s) in d.schedules.iter().flatten().enumerate() {
        let Some(old) = &s.replaces else { continue };
        let field = format!("spec.deployment.schedules[{i}].replaces");
        if slugs.contains(old.as_str()) {
            return Err(problem(
                field,
                format!("{old:?} is the slug of a schedule in the spec; replaces names the slug this schedule had before"),
            ));
        }
        if !renamed.insert(old.as_str()) {
            return Err(problem(
                field,
                format!("{old:?} is replaced by an earlier schedule already"),
            ));
        }
    }
    for (i, t) in d.triggers.iter().flatten().enumerate() {
        trigger(t, &format!("spec.deployment.triggers[{i}]"))?;
    }
    parameters(d)?;
    Ok(schedules)
}

/// With an enforced parameter schema, every set of parameters a run can get must pass
/// it: the deployment's, each schedule's merged over them (Prefect itself never checks
/// these), and each trigger's (values templated from the event are checked when the
/// trigger fires, so they are left out here). Each distinct set is checked once.
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
    let mut checked = HashSet::new();
    let deadline = std::time::Instant::now() + PARAMETER_CHECK_TIME;
    let mut check = |params: &Value, field: &str| -> Check {
        if std::time::Instant::now() > deadline {
            return Err(problem(
                field,
                "checking the parameters against parameterOpenApiSchema takes more than a second; simplify the schema's patterns or shorten the values",
            ));
        }
        if checked.insert(Sha256::digest(params.to_string().as_bytes())) {
            check_parameters(&validator, params, field)?;
        }
        Ok(())
    };
    check(&base, "spec.deployment.parameters")?;
    for (i, s) in d.schedules.iter().flatten().enumerate() {
        if let Some(Value::Object(own)) = &s.parameters {
            let mut merged = base.clone();
            for (k, v) in own {
                merged[k] = v.clone();
            }
            check(
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
            check(
                &Value::Object(fixed),
                &format!("spec.deployment.triggers[{i}].parameters"),
            )?;
        }
    }
    Ok(())
}

/// A value Prefect fills in later: a Jinja template or a placeholder object.
/// Parameter overrides for one flow run (the `prefect.io/run-parameters` annotation):
/// a JSON object, merged over the deployment's parameters as Prefect merges them and
/// checked against the schema the same way as the spec's. `field` names the source.
pub fn run_parameters(d: &DeploymentSpec, text: &str, field: &str) -> Result<Value, Problem> {
    const MAX_TEXT: usize = 256 * 1024;
    if text.len() > MAX_TEXT {
        return Err(problem(field, "is larger than 256 KiB"));
    }
    let overrides: Value =
        serde_json::from_str(text).map_err(|e| problem(field, format!("is not JSON: {e}")))?;
    let Value::Object(own) = &overrides else {
        return Err(problem(
            field,
            "must be a JSON object of parameter names to values",
        ));
    };
    if let (Some(schema), true) = (
        &d.parameter_open_api_schema,
        d.enforce_parameter_schema.unwrap_or(true),
    ) {
        let validator = parameter_validator(schema)
            .map_err(|m| problem("spec.deployment.parameterOpenApiSchema", m))?;
        let mut merged = d
            .parameters
            .clone()
            .unwrap_or_else(|| Value::Object(Default::default()));
        for (k, v) in own {
            merged[k] = v.clone();
        }
        check_parameters(&validator, &merged, field)?;
    }
    Ok(overrides)
}

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
/// Schemas over the size limits are refused before compiling; compiled validators are
/// kept by schema hash, so an unchanged schema is compiled once, not on every pass.
pub fn parameter_validator(schema: &Value) -> Result<Arc<jsonschema::Validator>, String> {
    schema_within_limits(schema)?;
    let text = schema.to_string();
    if text.len() > MAX_SCHEMA_BYTES {
        return Err(format!(
            "is {} KiB; at most {} KiB is accepted",
            text.len() / 1024,
            MAX_SCHEMA_BYTES / 1024
        ));
    }
    let key: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    if let Some(v) = validators().lock().expect("lock").get(&key) {
        return Ok(v.clone());
    }
    // Prefect checks the schema as written against draft 2020-12 before it drops the
    // `required` lists, so a malformed list (YAML 1.1 reads a bare `n` or `no` as false)
    // is refused there and must be refused here.
    if let Err(e) = jsonschema::draft202012::meta::validate(schema) {
        let at = e.instance_path().as_str();
        return Err(if at.is_empty() {
            format!("is not a valid JSON Schema (draft 2020-12): {e}")
        } else {
            format!("is not a valid JSON Schema (draft 2020-12): at {at}: {e}")
        });
    }
    let mut prepared = schema.clone();
    drop_required(&mut prepared);
    let patterns = jsonschema::PatternOptions::fancy_regex()
        .backtrack_limit(REGEX_BACKTRACK_LIMIT)
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20);
    let mut options = jsonschema::options()
        .should_validate_formats(false)
        .with_pattern_options(patterns);
    if prepared.get("$schema").is_none() {
        options = options.with_draft(jsonschema::Draft::Draft202012);
    }
    let validator = Arc::new(
        options
            .build(&prepared)
            .map_err(|e| format!("is not a valid JSON Schema: {e}"))?,
    );
    validators()
        .lock()
        .expect("lock")
        .put(key, validator.clone());
    Ok(validator)
}

/// A small cache that forgets the oldest entry when full.
#[derive(Default)]
struct Validators {
    map: HashMap<[u8; 32], Arc<jsonschema::Validator>>,
    order: VecDeque<[u8; 32]>,
}

impl Validators {
    fn get(&self, key: &[u8; 32]) -> Option<&Arc<jsonschema::Validator>> {
        self.map.get(key)
    }

    fn put(&mut self, key: [u8; 32], v: Arc<jsonschema::Validator>) {
        if self.map.insert(key, v).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > VALIDATOR_CACHE {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }
}

fn validators() -> &'static Mutex<Validators> {
    static CACHE: std::sync::OnceLock<Mutex<Validators>> = std::sync::OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// Depth and size of a schema, measured without recursion (a hostile schema may nest
/// deeper than the stack allows) and stopping at the first limit crossed.
fn schema_within_limits(schema: &Value) -> Result<(), String> {
    let mut stack = vec![(schema, 1usize)];
    let mut nodes = 0usize;
    while let Some((v, depth)) = stack.pop() {
        nodes += 1;
        if nodes > MAX_SCHEMA_NODES {
            return Err(format!(
                "has more than {MAX_SCHEMA_NODES} values; at most {MAX_SCHEMA_NODES} are accepted"
            ));
        }
        if depth > MAX_SCHEMA_DEPTH {
            return Err(format!(
                "nests deeper than {MAX_SCHEMA_DEPTH} levels; at most {MAX_SCHEMA_DEPTH} are accepted"
            ));
        }
        match v {
            Value::Object(m) => stack.extend(m.values().map(|c| (c, depth + 1))),
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
    Ok(())
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
            let message = match e.kind() {
                jsonschema::error::ValidationErrorKind::BacktrackLimitExceeded { .. } => {
                    "a pattern of parameterOpenApiSchema takes too many backtracking steps on this value to check; simplify the pattern (look-arounds and back-references backtrack)".to_string()
                }
                _ => format!("{e} (parameterOpenApiSchema)"),
            };
            Err(problem(format!("{field}{path}"), message))
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

/// One schedule, parsed into the typed value the next steps use.
pub fn schedule(s: &Schedule, field: &str) -> Result<ValidSchedule, Problem> {
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
        Some(tz) => zone::timezone(tz).map_err(|m| problem(format!("{field}.timezone"), m))?,
        None => Tz::UTC,
    };
    if s.anchor_date.is_some() && s.interval.is_none() {
        return Err(problem(
            format!("{field}.anchor_date"),
            "is only for interval schedules",
        ));
    }
    if s.day_or.is_some() && s.cron.is_none() {
        return Err(problem(
            format!("{field}.day_or"),
            "is only for cron schedules",
        ));
    }
    let day_or = s.day_or.unwrap_or(true);
    let (rule, text) = if let Some(v) = &s.interval {
        let every = interval::parse(v).map_err(|m| problem(format!("{field}.interval"), m))?;
        let anchor = match &s.anchor_date {
            Some(a) => Some(
                zone::parse_anchor_date(a, tz)
                    .map_err(|m| problem(format!("{field}.anchor_date"), m))?,
            ),
            None => None,
        };
        (Rule::Interval { every, anchor }, String::new())
    } else if let Some(c) = &s.cron {
        let cron = cron_expression(c, day_or).map_err(|m| problem(format!("{field}.cron"), m))?;
        (Rule::Cron(cron), c.trim().to_string())
    } else {
        let text = s.rrule.clone().unwrap_or_default();
        let r = rrule::parse(&text).map_err(|m| problem(format!("{field}.rrule"), m))?;
        // Prefect drops a TZID and reads the times in the schedule's zone, UTC unless
        // set. With no timezone set, which one was meant is not clear (the runs would
        // come hours away from the written times), so it must be said; a timezone set
        // explicitly is what Prefect uses, as an exported deployment has it.
        if s.timezone.is_none() {
            if let Some(named) = rrule::zones_named(&text)
                .into_iter()
                .find(|n| zone::timezone(n).ok() != Some(Tz::UTC))
            {
                return Err(problem(
                    format!("{field}.rrule"),
                    format!(
                        "names TZID={named}, which Prefect ignores: it reads the rule's times in the schedule's timezone, UTC when none is set; set timezone: {named} (or timezone: UTC to keep Prefect's reading)"
                    ),
                ));
            }
        }
        (Rule::RRule(r), text)
    };
    Ok(ValidSchedule {
        slug: s.slug.clone(),
        rule,
        tz,
        tz_name: s.timezone.clone().unwrap_or_else(|| "UTC".into()),
        text,
        active: s.active.unwrap_or(true),
        max_scheduled_runs: s.max_scheduled_runs,
        parameters: s.parameters.clone(),
        replaces: s.replaces.clone(),
    })
}

/// Cron as Prefect (croniter) reads it: five fields or a macro. Refused although Prefect
/// takes them: six fields (Prefect reads the sixth as seconds, firing far more often
/// than meant) and expressions that match no date at all.
pub fn cron_expression(expr: &str, day_or: bool) -> Result<Cron, String> {
    let cron = Cron::parse(expr, day_or)?;
    if !cron.ever_fires() {
        return Err(format!(
            "{:?} never fires: no date matches its day-of-month, month and day-of-week",
            expr.trim()
        ));
    }
    Ok(cron)
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
        // Digits as the CRD's rule takes them: no sign, no leading zero.
        Value::String(s) => {
            matches!(s.parse::<u64>(), Ok(k) if k >= 1 && k as usize <= children && k.to_string() == *s)
        }
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
            if c.posture == Some(Posture::Metric) {
                return Err(problem(
                    format!("{field}.posture"),
                    "Metric is the posture of metric triggers (set type: metric); event triggers are Reactive or Proactive",
                ));
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
            if c.posture.is_some_and(|p| p != Posture::Metric)
                || c.after.is_some()
                || c.expect.is_some()
                || c.threshold.is_some()
                || c.within.is_some()
            {
                return Err(problem(
                    field,
                    "a metric trigger takes metric, match and matchRelated only (and posture Metric)",
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
/// accepts for spec.interval, up to Go's longest duration (about 292 years).
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration such as 30s, 5m or 1h30m");
    let too_long = || format!("{s:?} is longer than the longest duration Go allows (2562047h)");
    // i64 nanoseconds, as Go's time.Duration.
    let max = Duration::from_nanos(i64::MAX as u64);
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
        let term = Duration::try_from_secs_f64(n * secs).map_err(|_| too_long())?;
        total = total
            .checked_add(term)
            .filter(|t| *t <= max)
            .ok_or_else(too_long)?;
        rest = tail;
    }
    Ok(total)
}
