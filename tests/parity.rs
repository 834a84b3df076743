//! Validation parity with Prefect: every case of tests/fixtures/parity.yaml is sent to a
//! real Prefect 3.9.1 server (in a deployment create) and to the operator's validator.
//! Both verdicts must be the ones the table records; they differ only in the cases the
//! table marks as deliberate, each with its reason.

mod support;

use std::sync::Arc;

use prefect_operator::api::PrefectDeploymentSpec;
use prefect_operator::prefect::{http_client, CallLog, PrefectClient};
use prefect_operator::validate::validate;
use serde_json::{json, Map, Value};
use support::{unique, PrefectServer};

const SCHEDULE_FIELDS: [&str; 6] = [
    "cron",
    "day_or",
    "rrule",
    "interval",
    "anchor_date",
    "timezone",
];

fn verdict(accepted: bool) -> &'static str {
    if accepted {
        "accept"
    } else {
        "reject"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_prefect_agree_on_what_is_valid() {
    support::install_crypto();
    let table: Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/parity.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    let cases = table["cases"].as_array().unwrap();
    assert!(cases.len() >= 80, "{} cases", cases.len());

    let server = PrefectServer::shared();
    let client = PrefectClient::new(
        http_client(),
        &server.url,
        None,
        Arc::new(CallLog::default()),
    );
    let flow_id = client.upsert_flow("parity").await.unwrap();
    let raw = reqwest::Client::new();

    let mut failures = Vec::new();
    let mut deliberate = 0;
    for case in cases {
        let schema = case.get("schema").unwrap_or(&table["schema"]);
        let schedule: Map<String, Value> = SCHEDULE_FIELDS
            .iter()
            .filter_map(|k| case.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        let is_parameter_case = case.get("parameters").is_some();

        // Prefect's verdict: the raw values in a deployment create.
        let mut body = json!({"name": unique("parity"), "flow_id": flow_id});
        if is_parameter_case {
            body["parameters"] = case["parameters"].clone();
            body["parameter_openapi_schema"] = schema.clone();
            body["enforce_parameter_schema"] = json!(true);
            if let Some(p) = case.get("schedule_parameters") {
                body["schedules"] =
                    json!([{"schedule": {"interval": 3600}, "parameters": p, "active": true}]);
            }
        } else {
            body["schedules"] = json!([{"schedule": schedule, "active": true}]);
        }
        let mut attempts = 0;
        let prefect: &str = loop {
            attempts += 1;
            // After a 500 the server drops the kept-alive connection; a retry gets a new one.
            let r = match raw
                .post(format!("{}/deployments/", server.url))
                .json(&body)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) if attempts < 5 => {
                    eprintln!("retrying after {e}");
                    continue;
                }
                Err(e) => panic!("{case}: {e}"),
            };
            match r.status().as_u16() {
                200 | 201 => break "accept",
                422 => break "reject",
                // Not a verdict but a crash; the operator must refuse such input.
                500 => break "error",
                503 if attempts < 20 => {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await
                }
                other => panic!(
                    "{case}: Prefect answered {other}: {}",
                    r.text().await.unwrap()
                ),
            }
        };

        // The operator's verdict on the same values in a PrefectDeployment.
        let mut deployment = json!({"entrypoint": "flows/p.py:parity"});
        if is_parameter_case {
            deployment["parameters"] = case["parameters"].clone();
            deployment["parameterOpenApiSchema"] = schema.clone();
            if let Some(p) = case.get("schedule_parameters") {
                deployment["schedules"] = json!([{"slug": "s", "interval": 3600, "parameters": p}]);
            }
        } else {
            let mut s = schedule.clone();
            s.insert("slug".into(), json!("s"));
            deployment["schedules"] = json!([s]);
        }
        let spec: PrefectDeploymentSpec = serde_json::from_value(json!({
            "server": {"remoteApiUrl": server.url},
            "workPool": {"name": "pool"},
            "deployment": deployment,
        }))
        .unwrap();
        let ours = validate(&spec, "parity");

        let want_prefect = case["prefect"].as_str().unwrap();
        let default_ours = if want_prefect == "error" {
            "reject"
        } else {
            want_prefect
        };
        let want_ours = case
            .get("ours")
            .and_then(Value::as_str)
            .unwrap_or(default_ours);
        if want_ours != default_ours {
            deliberate += 1;
            assert!(
                case.get("why").is_some(),
                "{case}: a deliberate difference needs a why"
            );
        }
        if prefect != want_prefect {
            failures.push(format!("{case}: Prefect says {prefect}"));
        }
        if verdict(ours.is_ok()) != want_ours {
            failures.push(format!(
                "{case}: operator says {} ({:?})",
                verdict(ours.is_ok()),
                ours.err()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreement(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    println!("{} cases, {deliberate} deliberate differences", cases.len());
}
