//! The planner's decision table, from YAML: a resource, what status recorded and what
//! Prefect holds in, the exact reads and plan out. No server; runs in milliseconds.
//!
//! Each case in `tests/fixtures/plan/cases/` changes `base.yaml` with JSON merge patches:
//! `resource` (the manifest), `state` (status; `null` for nothing recorded) and
//! `prefect.deployment` (what the by-name read returns; `null` for a 404). The reads
//! the case gets answered are the ones `plan::reads` asks for, as the executor's
//! `observe` would make them: `prefect.recordedExists` for the recorded id, and
//! `prefect.automations` (default: base's) for the related automations. A case with
//! `checkAutomations: true` is a pass told to check the recorded automations (an event
//! said they changed). `prefect.holder` is another resource whose status records the
//! deployment found by name (`resource`, `uid`, `senior`).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use prefect_operator::api::PrefectDeployment;
use prefect_operator::desired::{self, DesiredDeployment};
use prefect_operator::observed::{ObservedAutomation, ObservedDeployment};
use prefect_operator::plan::{self, Observed, SyncState};
use prefect_operator::validate::validate;
use serde_json::{json, Value};
use support::merge_patch as merge;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plan")
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `base` with `patch` applied where the case has one; `null` in the case means none.
fn patched(base: &Value, case: &Value, key: &str) -> Option<Value> {
    match case.get(key) {
        None => Some(base.clone()),
        Some(Value::Null) => None,
        Some(p) => {
            let mut v = base.clone();
            merge(&mut v, p);
            Some(v)
        }
    }
}

struct Outcome {
    reads: Value,
    plan: plan::Plan,
}

fn desired_of(resource: Value, name: &str) -> DesiredDeployment {
    let pd: PrefectDeployment = serde_json::from_value(resource)
        .unwrap_or_else(|e| panic!("{name}: resource does not decode: {e}"));
    let valid = validate(&pd.spec, pd.metadata.name.as_deref().unwrap())
        .unwrap_or_else(|p| panic!("{name}: resource must be valid: {p}"));
    desired::deployment(&valid, pd.metadata.uid.as_deref().unwrap())
}

fn run(base: &Value, case: &Value, name: &str) -> Outcome {
    let want = desired_of(patched(&base["resource"], case, "resource").unwrap(), name);
    // What the last successful pass recorded: the base resource's triggers.
    let applied = desired_of(base["resource"].clone(), "base");

    let mut state: SyncState = match patched(&base["state"], case, "state") {
        None => SyncState::default(),
        Some(mut s) => {
            if s["appliedIgnored"] == "$current" {
                // The spec's ignored fields unchanged since they were applied.
                s["appliedIgnored"] = json!(plan::ignored_values(&want));
            }
            if s["triggersHash"] == "$current" {
                let id = s["deploymentId"]
                    .as_str()
                    .expect("deploymentId with $current");
                s["triggersHash"] = json!(applied.triggers_hash(id));
            }
            serde_json::from_value(s).unwrap_or_else(|e| panic!("{name}: state: {e}"))
        }
    };
    state.schedules_seen.clear();
    state.check_automations = case["checkAutomations"].as_bool().unwrap_or(false);

    let prefect = case.get("prefect").cloned().unwrap_or(json!({}));
    let by_name: Option<ObservedDeployment> = patched(&base["deployment"], &prefect, "deployment")
        .map(|d| serde_json::from_value(d).unwrap_or_else(|e| panic!("{name}: deployment: {e}")));

    // Another resource that records the deployment found by name: `prefect.holder`.
    let holder: Option<plan::Holder> = prefect.get("holder").map(|h| {
        serde_json::from_value(h.clone()).unwrap_or_else(|e| panic!("{name}: holder: {e}"))
    });
    let reads = plan::reads(&want, &state, by_name.as_ref(), holder.as_ref());
    let recorded_exists = reads.recorded.as_ref().map(|_| {
        prefect["recordedExists"].as_bool().unwrap_or_else(|| {
            panic!("{name}: the planner reads the recorded deployment: give prefect.recordedExists")
        })
    });
    let related_automations = reads.related_automations.as_ref().map(|_| {
        let list = prefect.get("automations").unwrap_or(&base["automations"]);
        serde_json::from_value::<Vec<ObservedAutomation>>(list.clone())
            .unwrap_or_else(|e| panic!("{name}: automations: {e}"))
    });
    // The named global concurrency limit, when read: `prefect.limit` (null: none).
    let limit = reads.limit.as_ref().and_then(|_| {
        let l = prefect
            .get("limit")
            .unwrap_or_else(|| panic!("{name}: the planner reads the limit: give prefect.limit"));
        serde_json::from_value(l.clone()).unwrap_or_else(|e| panic!("{name}: limit: {e}"))
    });
    let observed = Observed {
        by_name,
        recorded_exists,
        related_automations,
        limit,
        holder,
    };
    let plan = plan::plan(&want, &state, &observed);
    // Planning is a function of its inputs: the same inputs give the same plan.
    assert_eq!(plan, plan::plan(&want, &state, &observed), "{name}");
    Outcome {
        reads: json!({
            "recorded": reads.recorded,
            "relatedAutomations": reads.related_automations,
            "limit": reads.limit,
        }),
        plan,
    }
}

fn cases() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(dir().join("cases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, load(&p))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn decision_table() {
    let base = load(&dir().join("base.yaml"));
    let cases = cases();
    assert!(cases.len() >= 15, "the decision table lost cases");
    let mut failures = Vec::new();
    for (name, case) in &cases {
        let out = run(&base, case, name);
        let expect = &case["expect"];
        let want_reads = expect.get("reads").cloned().unwrap_or(json!({}));
        let mut reads_expected =
            json!({"recorded": null, "relatedAutomations": null, "limit": null});
        merge(&mut reads_expected, &want_reads);
        if out.reads != reads_expected {
            failures.push(format!(
                "{name}: reads\n  expected {reads_expected}\n  got      {}",
                out.reads
            ));
        }
        let mut got = serde_json::to_value(&out.plan).unwrap();
        // Fingerprints are checked by name only where the case says `$any`.
        if let Some(Value::Object(rec)) = got.get_mut("recordIgnored") {
            for (k, v) in rec.iter_mut() {
                if expect["plan"]["recordIgnored"][k] == "$any" {
                    *v = json!("$any");
                }
            }
        }
        if got != expect["plan"] {
            failures.push(format!(
                "{name}: plan\n  expected {}\n  got      {got}",
                expect["plan"]
            ));
        }
        if let Some(text) = expect.get("text").and_then(Value::as_str) {
            if out.plan.to_string() != text {
                failures.push(format!(
                    "{name}: text\n  expected:\n{text}\n  got:\n{}",
                    out.plan
                ));
            }
        }
        if let Some(noop) = expect.get("noop").and_then(Value::as_bool) {
            if out.plan.is_noop() != noop {
                failures.push(format!("{name}: is_noop() is {}", out.plan.is_noop()));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// Every kind of decision the planner can make appears in at least one case.
#[test]
fn every_branch_has_a_case() {
    let base = load(&dir().join("base.yaml"));
    let mut seen = BTreeSet::new();
    for (name, case) in cases() {
        let plan = serde_json::to_value(run(&base, &case, &name).plan).unwrap();
        let deployment = &plan["deployment"];
        let retire = if deployment.get("retire").is_some() {
            "+retire"
        } else {
            ""
        };
        seen.insert(format!(
            "deployment:{}{retire}",
            deployment["action"].as_str().unwrap()
        ));
        for s in plan["schedules"].as_array().into_iter().flatten() {
            seen.insert(format!("schedule:{}", s["action"].as_str().unwrap()));
            if s.get("renamedFrom").is_some() {
                seen.insert("schedule:rename".into());
            }
        }
        if plan.get("fields").is_some() {
            seen.insert("fields".into());
        }
        let a = &plan["automations"];
        let deletes = a["delete"].as_array().is_some_and(|d| !d.is_empty());
        seen.insert(format!(
            "automations:{}{}",
            a["action"].as_str().unwrap(),
            if deletes { "+delete" } else { "" }
        ));
        if plan.get("readBack").is_some() {
            seen.insert("readBack".into());
        }
        if plan.get("drift").is_some() {
            seen.insert("drift".into());
        }
        if let Some(l) = plan.get("limit") {
            seen.insert(format!("limit:{}", l["action"].as_str().unwrap()));
        }
        for key in ["releaseOwnLimit", "detachSharedLimit", "deleteLimit"] {
            if plan.get(key).is_some() {
                seen.insert(key.into());
            }
        }
    }
    let all = [
        "deployment:update",
        "deployment:create",
        "deployment:create+retire",
        "deployment:resume",
        "deployment:resume+retire",
        "deployment:adopt",
        "deployment:conflict",
        "schedule:create",
        "schedule:update",
        "schedule:delete",
        "schedule:rename",
        "fields",
        "automations:unchanged",
        "automations:deleteLeftovers+delete",
        "automations:replace",
        "automations:replace+delete",
        "automations:adopt",
        "automations:restore",
        "readBack",
        "drift",
        "limit:keep",
        "limit:create",
        "limit:update",
        "limit:missing",
        "releaseOwnLimit",
        "detachSharedLimit",
        "deleteLimit",
    ];
    let missing: Vec<&str> = all.iter().copied().filter(|b| !seen.contains(*b)).collect();
    assert!(
        missing.is_empty(),
        "no case for {missing:?} (seen {seen:?})"
    );
}

/// The recorded base deployment is what Prefect returned for the base resource, so the
/// base case must plan nothing: the comparison tolerates every way Prefect rewrites
/// values (floats, DTSTART, anchors it picks, the global concurrency limit).
#[test]
fn base_is_in_sync() {
    let base = load(&dir().join("base.yaml"));
    let out = run(&base, &json!({}), "base");
    assert!(out.plan.is_noop(), "{}", out.plan);
    assert_eq!(out.plan.to_string(), "nightly/etl: no changes\n");
}
