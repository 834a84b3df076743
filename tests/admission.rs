//! Admission-time checks: the CRD's OpenAPI bounds and CEL rules (x-kubernetes-validations).
//!
//! The CEL rules are evaluated here with kube-cel, which compiles and runs them the way
//! the apiserver does (including transition rules with oldSelf), against valid manifests
//! that must pass and broken ones that must fail with the rule's message. The OpenAPI
//! bounds are checked by the real apiserver. The test apiserver built here (1.20) drops
//! CEL rules; where KUBEBUILDER_ASSETS supplies 1.25 or newer, the same broken manifests
//! are also applied with kubectl and must be rejected with the same messages.

mod support;

use std::path::Path;

use kube_cel::{compile_schema, Validator};
use prefect_operator::api::PrefectDeployment;
use prefect_operator::manifests;
use prefect_operator::validate::validate;
use serde_json::{json, Value};
use support::{unique, ControlPlane};

const CRD: &str = include_str!("../crds/prefectdeployments.prefect.io.yaml");

/// The CRD's schema, with the rules adapted to two known differences of kube-cel 0.8 from
/// the apiserver. The apiserver exposes a property such as `anchor_date` to CEL under
/// its own name (it escapes only `__`, `.`, `-` and `/`), kube-cel renames it
/// `anchor__date`. And kube-cel has no `type()`: an int-or-string field's
/// `type(x) == int` becomes `string(x) != x`, true for an int and false for a string.
/// The rules are written for the apiserver; here each field name after a `.` gets
/// kube-cel's spelling, the type test its stand-in, and nothing else changes.
fn schema() -> Value {
    let crd: Value = serde_yaml::from_str(CRD).unwrap();
    let mut schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    adapt_rules(&mut schema);
    schema
}

fn adapt_rules(node: &mut Value) {
    match node {
        Value::Object(map) => {
            if let Some(Value::Array(rules)) = map.get_mut("x-kubernetes-validations") {
                for r in rules {
                    let text = r["rule"].as_str().unwrap().to_string();
                    r["rule"] = json!(kube_cel_spelling(&without_type_test(&text)));
                }
            }
            map.values_mut().for_each(adapt_rules);
        }
        Value::Array(items) => items.iter_mut().for_each(adapt_rules),
        _ => {}
    }
}

fn without_type_test(rule: &str) -> String {
    let mut out = rule.to_string();
    while let Some(start) = out.find("type(") {
        let rest = &out[start + 5..];
        let end = rest
            .find(") == int")
            .expect("only `type(x) == int` is adapted");
        let operand = rest[..end].to_string();
        out = format!(
            "{}(string({operand}) != {operand}){}",
            &out[..start],
            &rest[end + 8..]
        );
    }
    out
}

fn kube_cel_spelling(rule: &str) -> String {
    let mut out = String::new();
    let mut chars = rule.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '\'' {
            in_string = !in_string;
        }
        if c == '.' && !in_string && chars.peek().is_some_and(|n| n.is_ascii_alphabetic()) {
            while let Some(&n) = chars.peek() {
                if !(n.is_ascii_alphanumeric() || n == '_') {
                    break;
                }
                out.push_str(if n == '_' { "__" } else { &rule[0..0] });
                if n != '_' {
                    out.push(n);
                }
                chars.next();
            }
        }
    }
    out
}

fn base() -> Value {
    json!({
        "apiVersion": "prefect.io/v1",
        "kind": "PrefectDeployment",
        "metadata": {"name": "cel"},
        "spec": {
            "server": {"remoteApiUrl": "http://prefect:4200/api"},
            "workPool": {"name": "pool"},
            "deployment": {"entrypoint": "flows/a.py:main"},
        },
    })
}

fn with_deployment(patch: Value) -> Value {
    let mut o = base();
    for (k, v) in patch.as_object().unwrap() {
        o["spec"]["deployment"][k] = v.clone();
    }
    o
}

/// Broken manifests and the one message each must be rejected with.
fn broken() -> Vec<(Value, &'static str)> {
    let sched = |s: Value| with_deployment(json!({"schedules": [s]}));
    let trig = |t: Value| with_deployment(json!({"triggers": [t]}));
    vec![
        (
            with_deployment(
                json!({"concurrencyLimit": 2, "globalConcurrencyLimit": {"name": "shared", "limit": 2}}),
            ),
            "set concurrencyLimit (this deployment's own limit) or globalConcurrencyLimit (a named limit shared with others), not both",
        ),
        (
            with_deployment(
                json!({"globalConcurrencyLimit": {"name": "shared", "slotDecayPerSecond": "fast"}}),
            ),
            "slotDecayPerSecond must be a non-negative decimal number, such as \"0.5\"",
        ),
        (
            with_deployment(
                json!({"globalConcurrencyLimit": {"name": "shared", "slotDecayPerSecond": "-1"}}),
            ),
            "slotDecayPerSecond must be a non-negative decimal number, such as \"0.5\"",
        ),
        (
            with_deployment(json!({"globalConcurrencyLimit": {"name": "team/etl"}})),
            "name cannot contain /, %, &, < or > (Prefect refuses them in names)",
        ),
        (
            sched(json!({"slug": "a"})),
            "a schedule needs exactly one of interval, cron or rrule",
        ),
        (
            sched(json!({"slug": "a", "interval": 60, "cron": "* * * * *"})),
            "a schedule needs exactly one of interval, cron or rrule",
        ),
        (
            sched(json!({"slug": "a", "cron": "0 * * * *", "rrule": "FREQ=DAILY"})),
            "a schedule needs exactly one of interval, cron or rrule",
        ),
        (
            sched(json!({"slug": "a", "interval": 0})),
            "interval must be a positive number of seconds (or an ISO 8601 duration such as PT1H)",
        ),
        (
            sched(json!({"slug": "a", "interval": -60})),
            "interval must be a positive number of seconds (or an ISO 8601 duration such as PT1H)",
        ),
        (
            sched(json!({"slug": "a", "interval": "-PT1H"})),
            "interval must be a positive number of seconds (or an ISO 8601 duration such as PT1H)",
        ),
        (
            sched(json!({"slug": "a", "interval": "0"})),
            "interval must be a positive number of seconds (or an ISO 8601 duration such as PT1H)",
        ),
        (
            sched(json!({"slug": "a", "cron": "0 9 * * *", "anchor_date": "2024-01-01T00:00:00Z"})),
            "anchor_date is only for interval schedules",
        ),
        (
            sched(json!({"slug": "a", "interval": 60, "day_or": false})),
            "day_or is only for cron schedules",
        ),
        (
            with_deployment(json!({"entrypoint": "flows/a.py"})),
            "entrypoint must have the form path/to/file.py:function",
        ),
        (
            with_deployment(json!({"entrypoint": "flows/a.py:1main"})),
            "entrypoint must have the form path/to/file.py:function",
        ),
        (
            trig(json!({"type": "compound", "triggers": [{"expect": ["a"]}]})),
            "compound and sequence triggers need within and at least one child trigger",
        ),
        (
            trig(json!({"type": "sequence", "within": 60, "triggers": []})),
            "compound and sequence triggers need within and at least one child trigger",
        ),
        (
            trig(
                json!({"type": "sequence", "within": 60, "require": 1, "triggers": [{"expect": ["a"]}]}),
            ),
            "require is only for compound triggers",
        ),
        (
            trig(
                json!({"type": "compound", "within": 60, "require": 3, "triggers": [{"expect": ["a"]}, {"expect": ["b"]}]}),
            ),
            "require must be any, all, or a number from 1 to the number of child triggers",
        ),
        (
            trig(
                json!({"type": "compound", "within": 60, "require": 0, "triggers": [{"expect": ["a"]}]}),
            ),
            "require must be any, all, or a number from 1 to the number of child triggers",
        ),
        (
            trig(
                json!({"type": "compound", "within": 60, "require": "most", "triggers": [{"expect": ["a"]}]}),
            ),
            "require must be any, all, or a number from 1 to the number of child triggers",
        ),
        (
            trig(
                json!({"type": "compound", "within": 60, "require": "2", "triggers": [{"expect": ["a"]}]}),
            ),
            "require must be any, all, or a number from 1 to the number of child triggers",
        ),
        (
            trig(
                json!({"type": "compound", "within": 60, "require": "01", "triggers": [{"expect": ["a"]}]}),
            ),
            "require must be any, all, or a number from 1 to the number of child triggers",
        ),
        (
            trig(json!({"posture": "Proactive", "expect": ["a"], "within": 5})),
            "a Proactive trigger needs within of at least 10 seconds",
        ),
        (
            trig(json!({"posture": "Proactive", "expect": ["a"]})),
            "a Proactive trigger needs within of at least 10 seconds",
        ),
        (
            trig(
                json!({"type": "compound", "within": 60, "triggers": [{"posture": "Proactive", "expect": ["a"], "within": 1}]}),
            ),
            "a Proactive trigger needs within of at least 10 seconds",
        ),
        (
            trig(json!({"type": "sequence", "within": 60, "triggers": [{"type": "compound"}]})),
            "child triggers must be event or metric triggers",
        ),
        (
            trig(json!({"type": "metric"})),
            "metric is required for metric triggers and only allowed on them",
        ),
        (
            trig(
                json!({"expect": ["a"], "metric": {"name": "lateness", "operator": ">", "threshold": 1}}),
            ),
            "metric is required for metric triggers and only allowed on them",
        ),
        (
            trig(json!({"type": "compound", "within": 60, "triggers": [{"type": "metric"}]})),
            "metric is required for metric triggers and only allowed on them",
        ),
    ]
}

/// Manifests that must pass every rule.
fn accepted() -> Vec<Value> {
    let mut out = vec![
        base(),
        with_deployment(json!({"schedules": [
            {"slug": "a", "interval": 60, "anchor_date": "2024-01-01T00:00:00Z"},
            {"slug": "b", "interval": "PT1H"},
            {"slug": "e", "interval": "90"},
            {"slug": "c", "cron": "0 9 * * 1-5", "day_or": false, "timezone": "Europe/Berlin"},
            {"slug": "d", "rrule": "FREQ=DAILY"},
        ]})),
        with_deployment(json!({"entrypoint": "my_pkg.flows:etl.run", "flow_name": "etl"})),
        with_deployment(json!({"triggers": [
            {"expect": ["a"]},
            {"posture": "Proactive", "expect": ["a"], "within": 10},
            {"type": "compound", "within": 60, "require": "any", "triggers": [{"expect": ["a"]}, {"type": "metric", "metric": {"name": "lateness", "operator": ">", "threshold": 1}}]},
            {"type": "compound", "within": 0, "require": 2, "triggers": [{"expect": ["a"]}, {"expect": ["b"]}]},
            {"type": "compound", "within": 60, "require": "2", "triggers": [{"expect": ["a"]}, {"expect": ["b"]}]},
            {"type": "compound", "within": 60, "require": "all", "triggers": [{"expect": ["a"]}]},
            {"type": "sequence", "within": 60, "triggers": [{"expect": ["a"]}, {"posture": "Proactive", "expect": ["b"], "within": 30}]},
            {"type": "metric", "metric": {"name": "duration", "operator": ">=", "threshold": 5, "range": 300, "firingFor": 600}},
        ]})),
        with_deployment(
            json!({"globalConcurrencyLimit": {"name": "shared", "limit": 0, "active": false, "slotDecayPerSecond": "0.25", "collisionStrategy": "CANCEL_NEW"}}),
        ),
    ];
    // Every example and fixture manifest in the repository.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["examples/etl.yaml", "examples/reference-schema.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"] == json!("PrefectDeployment") {
                out.push(v);
            }
        }
    }
    for file in ["minimal.yaml", "full.yaml", "triggers.yaml"] {
        let text = std::fs::read_to_string(root.join("tests/fixtures/desired").join(file)).unwrap();
        let v: Value = serde_yaml::from_str(&text).unwrap();
        out.push(v["resource"].clone());
    }
    out
}

fn messages(object: &Value, old: Option<&Value>) -> Vec<String> {
    match Validator::new().validate(&schema(), object, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.into_vec().into_iter().map(|e| e.message).collect(),
    }
}

#[test]
fn every_rule_compiles_within_the_cost_budget() {
    let compiled = compile_schema(&schema());
    let errors: Vec<String> = compiled
        .compilation_errors()
        .iter()
        .map(|e| format!("{e:?}"))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    // The apiserver refuses a CRD whose rules may cost too much (1.25 and later), by
    // its own estimate: each rule times how often it can run, at most 10,000,000;
    // all rules together at most 100,000,000. Estimated here as the apiserver does,
    // erring high, with int-or-string values as long as apiservers before 1.34 take
    // them (a whole request: they ignore maxLength there).
    let crd: Value = serde_yaml::from_str(CRD).unwrap();
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut costs = Vec::new();
    rule_costs(root, 1, &mut costs);
    let mut total = 0u64;
    for (rule, cost) in &costs {
        eprintln!("{cost:>12}  {rule:.100}");
        assert!(
            *cost <= 10_000_000,
            "estimated cost {cost} over the budget: {rule}"
        );
        total = total.saturating_add(*cost);
    }
    assert!(total <= 100_000_000, "all rules together: {total}");
    assert!(
        costs.len() >= 14,
        "expected the CRD to carry the CEL rules, found {}",
        costs.len()
    );
}

/// Each rule with its estimated cost times the most times it can run (`times`: the
/// product of the maxItems of the lists above it).
fn rule_costs(node: &Value, times: u64, out: &mut Vec<(String, u64)>) {
    for r in node["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let rule = r["rule"].as_str().unwrap();
        let program = kube_cel::cel::Program::compile(rule).unwrap();
        let vars = vec![("self".to_string(), node), ("oldSelf".to_string(), node)];
        let (cost, _) = estimate(&program.expression().expr, &vars, rule);
        out.push((rule.to_string(), cost.saturating_mul(times)));
    }
    for child in node["properties"].as_object().into_iter().flatten() {
        rule_costs(child.1, times, out);
    }
    if node.get("items").is_some() {
        let bound = node["maxItems"].as_u64().unwrap_or(REQUEST_BYTES);
        rule_costs(&node["items"], times.saturating_mul(bound), out);
    }
}

/// The largest request the apiserver takes: its bound for what a schema leaves open.
const REQUEST_BYTES: u64 = 3 * 1024 * 1024;

/// How long a value can be, in the estimator's units (bytes of a string, items of a
/// list), as the oldest apiserver with CEL reads the schema.
fn max_size(schema: &Value) -> u64 {
    if schema["x-kubernetes-int-or-string"] == json!(true) {
        return REQUEST_BYTES;
    }
    if let Some(values) = schema["enum"].as_array() {
        return values
            .iter()
            .filter_map(Value::as_str)
            .map(str::len)
            .max()
            .unwrap_or(0) as u64;
    }
    match schema["type"].as_str() {
        Some("string") => schema["maxLength"]
            .as_u64()
            .map_or(REQUEST_BYTES, |l| 4 * l),
        Some("array") => schema["maxItems"].as_u64().unwrap_or(REQUEST_BYTES),
        Some("object") => schema["maxProperties"].as_u64().unwrap_or(REQUEST_BYTES),
        _ => 8,
    }
}

fn traversal(size: u64) -> u64 {
    size.div_ceil(10)
}

/// cel-go's cost model as the apiserver applies it (checker/cost.go and the apiserver's
/// library costs), for the parts of CEL the CRD uses; anything else stops the test so
/// the model grows with the rules. Returns the cost and, where known, the schema the
/// value comes from (for sizes).
fn estimate<'a>(
    expr: &kube_cel::cel::common::ast::Expr,
    vars: &[(String, &'a Value)],
    rule: &str,
) -> (u64, Option<Size<'a>>) {
    use kube_cel::cel::common::ast::{Expr, LiteralValue};
    match expr {
        Expr::Literal(LiteralValue::String(s)) => (0, Some(Size::Fixed(s.inner().len() as u64))),
        Expr::Literal(_) => (0, Some(Size::Fixed(8))),
        Expr::Ident(name) => {
            let found = vars
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, s)| Size::Schema(s));
            (1, found.or(Some(Size::Fixed(8))))
        }
        Expr::Select(sel) => {
            let (cost, of) = estimate(&sel.operand.expr, vars, rule);
            let field = match of {
                Some(Size::Schema(s)) => s["properties"].get(&sel.field).map(Size::Schema),
                _ => None,
            };
            (
                cost + 1,
                if sel.test {
                    Some(Size::Fixed(1))
                } else {
                    field
                },
            )
        }
        Expr::List(list) => {
            let parts: Vec<_> = list
                .elements
                .iter()
                .map(|e| estimate(&e.expr, vars, rule))
                .collect();
            let longest = parts.iter().map(|(_, s)| size_of(s)).max().unwrap_or(0);
            let cost = 10 + parts.iter().map(|(c, _)| c).sum::<u64>();
            (cost, Some(Size::List(list.elements.len() as u64, longest)))
        }
        Expr::Comprehension(c) => {
            let (range_cost, range) = estimate(&c.iter_range.expr, vars, rule);
            let n = size_of(&range);
            let mut inner = vars.to_vec();
            if let Some(Size::Schema(s)) = range {
                inner.push((c.iter_var.clone(), &s["items"]));
            }
            let (init, _) = estimate(&c.accu_init.expr, &inner, rule);
            let (cond, _) = estimate(&c.loop_cond.expr, &inner, rule);
            let (step, _) = estimate(&c.loop_step.expr, &inner, rule);
            let (result, _) = estimate(&c.result.expr, &inner, rule);
            (
                range_cost + init + n.saturating_mul(cond + step) + result,
                Some(Size::Fixed(1)),
            )
        }
        Expr::Call(call) => {
            let target = call.target.as_ref().map(|t| estimate(&t.expr, vars, rule));
            let args: Vec<_> = call
                .args
                .iter()
                .map(|a| estimate(&a.expr, vars, rule))
                .collect();
            let sum = target.iter().chain(&args).map(|(c, _)| *c).sum::<u64>();
            let arg_size = |i: usize| size_of(&args[i].1);
            match call.func_name.as_str() {
                "_&&_" | "_||_" | "!_" | "-_" | "@not_strictly_false" | "has" | "size" | "type" => {
                    (sum + 1, Some(Size::Fixed(8)))
                }
                "_?_:_" => {
                    let branch = args[1].0.max(args[2].0);
                    (
                        args[0].0 + branch + 1,
                        Some(Size::Fixed(size_of(&args[1].1).max(arg_size(2)))),
                    )
                }
                "_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_" => (
                    sum + 1 + traversal(arg_size(0).min(arg_size(1))),
                    Some(Size::Fixed(1)),
                ),
                "_+_" => (
                    sum + 1 + traversal(arg_size(0) + arg_size(1)),
                    Some(Size::Fixed(arg_size(0) + arg_size(1))),
                ),
                "@in" => {
                    let (items, longest) = match args[1].1 {
                        Some(Size::List(n, longest)) => (n, longest),
                        ref other => (size_of(other), REQUEST_BYTES),
                    };
                    let each = 1 + traversal(arg_size(0).min(longest));
                    (sum + items.saturating_mul(each), Some(Size::Fixed(1)))
                }
                "int" => (sum + 1, Some(Size::Fixed(8))),
                // string() may convert bytes, which walks them.
                "string" => {
                    let n = arg_size(0);
                    (sum + 1 + traversal(n), Some(Size::Fixed(n)))
                }
                "matches" => {
                    let text = size_of(&target.as_ref().unwrap().1);
                    let regex = arg_size(0).div_ceil(4);
                    (
                        sum + 1 + traversal(text).saturating_mul(regex),
                        Some(Size::Fixed(1)),
                    )
                }
                // Cost of the prefix, not of the text searched.
                "startsWith" | "endsWith" => {
                    (sum + 1 + traversal(arg_size(0)), Some(Size::Fixed(1)))
                }
                other => panic!("the cost model does not know {other}() (in {rule}); add it"),
            }
        }
        other => panic!("the cost model does not know {other:?} (in {rule}); add it"),
    }
}

#[derive(Clone, Copy)]
enum Size<'a> {
    Schema(&'a Value),
    Fixed(u64),
    /// A list literal: items, longest item.
    List(u64, u64),
}

fn size_of(size: &Option<Size<'_>>) -> u64 {
    match size {
        Some(Size::Schema(s)) => max_size(s),
        Some(Size::Fixed(n)) => *n,
        Some(Size::List(n, _)) => *n,
        None => REQUEST_BYTES,
    }
}

#[test]
fn broken_manifests_fail_with_their_message() {
    let cases = broken();
    assert!(cases.len() >= 20, "{}", cases.len());
    for (object, message) in cases {
        let got = messages(&object, None);
        assert_eq!(
            got,
            vec![message.to_string()],
            "{}",
            object["spec"]["deployment"]
        );
    }
}

#[test]
fn valid_manifests_pass() {
    let all = accepted();
    assert!(all.len() >= 9, "{}", all.len());
    for object in all {
        let got = messages(&object, None);
        assert!(got.is_empty(), "{}: {got:?}", object["metadata"]["name"]);
    }
}

#[test]
fn flow_name_cannot_change_once_set() {
    let old = with_deployment(json!({"flow_name": "etl"}));
    let renamed = with_deployment(json!({"flow_name": "other"}));
    let removed = base();
    let message = "flow_name cannot be changed or removed once set: a Prefect deployment belongs to one flow (create a new resource for another flow)";
    assert_eq!(messages(&renamed, Some(&old)), vec![message.to_string()]);
    assert_eq!(messages(&removed, Some(&old)), vec![message.to_string()]);
    // Unchanged, or set for the first time: allowed.
    assert!(messages(&old, Some(&old)).is_empty());
    assert!(messages(&old, Some(&removed)).is_empty());
}

/// The controller's own verdict on a manifest: decoded as the watch decodes it, then
/// `validate()`. `Err` carries the message.
fn controller_verdict(object: &Value) -> Result<(), String> {
    let pd: PrefectDeployment =
        serde_json::from_value(object.clone()).map_err(|e| format!("does not decode: {e}"))?;
    validate(&pd.spec, pd.metadata.name.as_deref().unwrap_or("x"))
        .map(|_| ())
        .map_err(|p| p.to_string())
}

/// The field a broken manifest breaks: the first `spec.deployment` key that differs
/// from `base()`, with the list index for schedules and triggers.
fn broken_field(object: &Value) -> String {
    let base = base();
    let d = object["spec"]["deployment"].as_object().unwrap();
    let key = d
        .keys()
        .find(|k| d[*k] != base["spec"]["deployment"][k.as_str()])
        .expect("a broken case changes spec.deployment");
    match key.as_str() {
        "schedules" | "triggers" => format!("spec.deployment.{key}[0]"),
        _ => format!("spec.deployment.{key}"),
    }
}

/// The CEL rules and `validate()` cannot drift apart: every manifest the rules refuse,
/// the controller refuses too, naming the same field; every manifest they accept, it
/// accepts. (A manifest that reaches the controller through an apiserver without CEL,
/// like 1.20's, is still refused, with a condition instead of at `kubectl apply`.)
#[test]
fn validate_agrees_with_the_cel_rules() {
    for (object, cel_message) in broken() {
        let field = broken_field(&object);
        match controller_verdict(&object) {
            Ok(()) => panic!("validate() accepts what CEL refuses ({cel_message}): {object}"),
            Err(message) => assert!(
                message.starts_with(&field),
                "CEL: {cel_message}\nvalidate(): {message}\nexpected it to name {field}"
            ),
        }
        // `prefect-operator validate` (schema, then validate()) says the same.
        match manifests::check(&object) {
            Ok(_) => panic!("the validate command accepts what CEL refuses: {object}"),
            Err(message) => assert!(message.starts_with(&field), "{message} / {field}"),
        }
    }
    for object in accepted() {
        if let Err(message) = controller_verdict(&object) {
            panic!(
                "{}: CEL accepts, validate() refuses: {message}",
                object["metadata"]["name"]
            );
        }
        if let Err(message) = manifests::check(&object) {
            panic!(
                "{}: the validate command refuses: {message}",
                object["metadata"]["name"]
            );
        }
    }
}

fn server_minor(cp: &ControlPlane) -> u32 {
    let out = cp.kubectl_ok(&["version", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["serverVersion"]["minor"]
        .as_str()
        .unwrap()
        .trim_end_matches('+')
        .parse()
        .unwrap()
}

fn apply(cp: &ControlPlane, ns: &str, object: &Value) -> (bool, String) {
    let mut object = object.clone();
    object["metadata"] = json!({"name": unique("adm"), "namespace": ns});
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "--server-side", "-f", "-"],
        Some(&object.to_string()),
    );
    (ok, err)
}

/// Manifests outside the OpenAPI bounds of the CRD, with the field the apiserver names.
fn out_of_bounds() -> Vec<(Value, &'static str)> {
    let sched = |s: Value| with_deployment(json!({"schedules": [s]}));
    let trig = |t: Value| with_deployment(json!({"triggers": [t]}));
    let mut policy = base();
    policy["spec"]["deletionPolicy"] = json!("Keep");
    vec![
        (
            sched(json!({"slug": "a", "interval": 60, "max_scheduled_runs": 0})),
            "max_scheduled_runs",
        ),
        (
            sched(json!({"slug": "a", "interval": 60, "max_scheduled_runs": 51})),
            "max_scheduled_runs",
        ),
        (sched(json!({"slug": "", "interval": 60})), "slug"),
        (
            trig(
                json!({"type": "metric", "metric": {"name": "lateness", "operator": ">", "threshold": 1, "range": 60}}),
            ),
            "range",
        ),
        (
            trig(
                json!({"type": "metric", "metric": {"name": "lateness", "operator": ">", "threshold": 1, "firingFor": 299}}),
            ),
            "firingFor",
        ),
        (
            trig(json!({"expect": ["a"], "scheduleAfter": -1})),
            "scheduleAfter",
        ),
        (trig(json!({"expect": ["a"], "within": -1})), "within"),
        (policy, "deletionPolicy"),
        (
            with_deployment(
                json!({"concurrencyOptions": {"collisionStrategy": "ENQUEUE", "gracePeriodSeconds": 30}}),
            ),
            "gracePeriodSeconds",
        ),
        (
            with_deployment(json!({"concurrencyOptions": {"collisionStrategy": "RANDOM"}})),
            "collisionStrategy",
        ),
        (
            with_deployment(json!({"globalConcurrencyLimit": {"name": "shared", "limit": -1}})),
            "limit",
        ),
        (
            with_deployment(
                json!({"schedules": [{"slug": "a", "interval": 60}, {"slug": "a", "cron": "0 * * * *"}]}),
            ),
            "Duplicate value",
        ),
    ]
}

/// What the OpenAPI bounds refuse, the controller refuses too, naming the field, so a
/// manifest that reached it some other way (an apiserver that lost the schema, a CRD
/// edited by hand) still gets a clear condition.
#[test]
fn validate_refuses_what_the_bounds_refuse() {
    for (object, field) in out_of_bounds() {
        let message = manifests::check(&object).err().unwrap_or_default();
        assert!(
            message.contains(field) || message.contains("slug"),
            "the validate command on {field}: {message:?}"
        );
        match controller_verdict(&object) {
            Ok(()) => panic!("validate() accepts what the schema refuses ({field}): {object}"),
            // An enum outside its values fails to decode before validate() runs; serde
            // names the value and the choices rather than the field.
            Err(message) if message.starts_with("does not decode") => {
                assert!(message.contains("unknown variant"), "{field}: {message}")
            }
            Err(message) => assert!(
                message.contains(field) || (field == "Duplicate value" && message.contains("slug")),
                "{field}: {message}"
            ),
        }
    }
}

/// The OpenAPI bounds are enforced by every apiserver, including the 1.20 one here.
#[test]
fn apiserver_enforces_openapi_bounds() {
    let cp = ControlPlane::shared();
    let ns = unique("adm");
    cp.kubectl_ok(&["create", "namespace", &ns]);
    let cases = out_of_bounds();
    for (object, field) in cases {
        let (ok, err) = apply(cp, &ns, &object);
        assert!(!ok && err.contains(field), "{field}: {err}");
    }
    for object in accepted() {
        let (ok, err) = apply(cp, &ns, &object);
        assert!(ok, "{}: {err}", object["metadata"]["name"]);
    }
}

/// CEL rules in the apiserver itself: only where the apiserver enforces them (1.25+).
#[test]
fn apiserver_enforces_cel_rules_where_supported() {
    let cp = ControlPlane::shared();
    let minor = server_minor(cp);
    if minor < 25 {
        eprintln!(
            "SKIPPED: the test apiserver is 1.{minor}, which drops x-kubernetes-validations; \
             set KUBEBUILDER_ASSETS to a 1.25+ kube-apiserver to run the CEL rules in the apiserver \
             (they are evaluated by kube-cel in the other tests of this file)"
        );
        return;
    }
    let ns = unique("cel");
    cp.kubectl_ok(&["create", "namespace", &ns]);
    for (object, message) in broken() {
        let (ok, err) = apply(cp, &ns, &object);
        assert!(!ok && err.contains(message), "{message}: {err}");
    }
    // flow_name is immutable once set.
    let mut object = with_deployment(json!({"flow_name": "etl"}));
    object["metadata"]["name"] = json!(unique("imm"));
    object["metadata"]["namespace"] = json!(ns);
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "--server-side", "-f", "-"],
        Some(&object.to_string()),
    );
    assert!(ok, "{err}");
    object["spec"]["deployment"]["flow_name"] = json!("other");
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "--server-side", "-f", "-"],
        Some(&object.to_string()),
    );
    assert!(!ok && err.contains("flow_name cannot be changed"), "{err}");
}
