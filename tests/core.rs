//! The pure core from YAML fixtures: spec in, exact Prefect JSON out; validation
//! messages. No servers.

mod support;

use std::path::Path;

use prefect_operator::api::{PrefectDeployment, PrefectDeploymentSpec};
use prefect_operator::desired;
use prefect_operator::validate::validate;
use serde_json::{json, Value};
use support::merge_patch as merge;

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap()
}

fn check_desired(file: &str) {
    let f = fixture(file);
    let pd: PrefectDeployment = serde_json::from_value(f["resource"].clone()).unwrap();
    let valid = validate(&pd.spec, &pd.metadata.name.clone().unwrap())
        .unwrap_or_else(|p| panic!("{file}: fixture must be valid: {p}"));
    let name = pd.deployment_name();
    let uid = pd.metadata.uid.clone().unwrap();
    let want = desired::deployment(&valid, &uid);
    let exp = &f["expected"];
    assert_eq!(json!(want.flow_name), exp["flowName"], "{file}: flow name");
    assert_eq!(json!(want.name), exp["name"], "{file}: deployment name");
    if !exp["create"].is_null() {
        assert_eq!(
            want.create_body("FLOW_ID"),
            exp["create"],
            "{file}: create body"
        );
    }
    if !exp["schedules"].is_null() {
        let got: Vec<Value> = want.schedules.iter().map(|s| s.body.clone()).collect();
        assert_eq!(Value::Array(got), exp["schedules"], "{file}: schedules");
    }
    let id = f["deploymentId"].as_str().unwrap();
    let automations = desired::automations(&pd.spec.deployment, &name, id);
    assert_eq!(
        Value::Array(automations.clone()),
        exp["automations"],
        "{file}: automations"
    );
    // The deployment carries the same bodies with the id filled in after a create, and
    // the fingerprint status records is theirs.
    assert_eq!(
        want.automations_for(id),
        automations,
        "{file}: automations_for"
    );
    assert_eq!(
        want.triggers_hash(id),
        desired::fingerprint(&automations),
        "{file}: triggers hash"
    );
    // Keys are sorted before hashing: the same content in another key order hashes the
    // same (the status of an older operator version stays valid).
    let reordered: Vec<Value> = automations
        .iter()
        .map(|a| serde_json::from_str(&reverse_keys(a)).unwrap())
        .collect();
    assert_eq!(
        desired::fingerprint(&reordered),
        desired::fingerprint(&automations)
    );
}

/// The JSON text of `v` with every object's keys written in reverse order.
fn reverse_keys(v: &Value) -> String {
    match v {
        Value::Object(o) => {
            let parts: Vec<String> = o
                .iter()
                .rev()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), reverse_keys(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(reverse_keys).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

#[test]
fn minimal_spec_payloads() {
    check_desired("desired/minimal.yaml");
}

#[test]
fn full_spec_payloads() {
    check_desired("desired/full.yaml");
}

#[test]
fn trigger_payloads() {
    check_desired("desired/triggers.yaml");
}

#[test]
fn fingerprint_changes_with_any_trigger_field() {
    let f = fixture("desired/triggers.yaml");
    let pd: PrefectDeployment = serde_json::from_value(f["resource"].clone()).unwrap();
    let base = desired::fingerprint(&desired::automations(&pd.spec.deployment, "reactive", "d1"));
    let mut changed = pd.spec.deployment.clone();
    changed.triggers.as_mut().unwrap()[1].condition.within = Some(601);
    assert_ne!(
        base,
        desired::fingerprint(&desired::automations(&changed, "reactive", "d1"))
    );
    assert_ne!(
        base,
        desired::fingerprint(&desired::automations(&pd.spec.deployment, "reactive", "d2")),
        "a new deployment id re-applies"
    );
    assert_eq!(
        base,
        desired::fingerprint(&desired::automations(&pd.spec.deployment, "reactive", "d1"))
    );
}

#[test]
fn validation_messages() {
    let f = fixture("invalid.yaml");
    let cases = f["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let mut spec = f["base"].clone();
        merge(&mut spec, &case["patch"]);
        let want = case["error"].as_str().unwrap();
        let parsed: Result<PrefectDeploymentSpec, _> = serde_json::from_value(spec.clone());
        let spec = match parsed {
            Ok(s) => s,
            Err(e) => panic!("case {} does not parse as a spec: {e}", case["patch"]),
        };
        match validate(&spec, "resource") {
            Ok(_) => panic!("case {} was accepted; expected: {want}", case["patch"]),
            Err(p) => assert_eq!(p.to_string(), want, "case {}", case["patch"]),
        }
    }
    for patch in f["valid"].as_array().unwrap() {
        let mut spec = f["base"].clone();
        merge(&mut spec, patch);
        let spec: PrefectDeploymentSpec = serde_json::from_value(spec).unwrap();
        if let Err(p) = validate(&spec, "resource") {
            panic!("valid case {patch} was rejected: {p}");
        }
    }
}

#[test]
fn examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc).unwrap();
            if v["kind"] != "PrefectDeployment" {
                continue;
            }
            let pd: PrefectDeployment =
                serde_json::from_value(v).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            validate(&pd.spec, &pd.metadata.name.clone().unwrap())
                .unwrap_or_else(|p| panic!("{}: {p}", path.display()));
            seen += 1;
        }
    }
    assert!(seen > 0, "no example PrefectDeployment found");
}
