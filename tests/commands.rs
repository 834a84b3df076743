//! The tool commands as users run them: the binary, manifest files on disk, and for
//! `diff` a real Prefect server. `diff` must say "no changes" exactly when the
//! controller's next pass makes no Prefect write.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use prefect_operator::api::PrefectDeployment;
use prefect_operator::prefect::{http_client, CallLog, PrefectClient};
use prefect_operator::reconcile::execute::{self, SyncState};
use prefect_operator::validate::validate;
use serde_json::{json, Value};
use support::{create_pool, unique, PrefectServer};

const BIN: &str = env!("CARGO_BIN_EXE_prefect-operator");

/// Runs the binary; returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("PREFECT_API_KEY")
        .env_remove("PREFECT_API_AUTH_STRING")
        .output()
        .expect("run the binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn manifest(name: &str, server: &str, pool: &str, deployment: Value) -> Value {
    json!({
        "apiVersion": "prefect.io/v1",
        "kind": "PrefectDeployment",
        "metadata": {"name": name, "namespace": "team-a"},
        "spec": {
            "server": {"remoteApiUrl": server},
            "workPool": {"name": pool},
            "deployment": deployment,
        },
    })
}

fn write(dir: &Path, file: &str, docs: &[Value]) -> String {
    let text: Vec<String> = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect();
    let path = dir.join(file);
    std::fs::write(&path, text.join("---\n")).unwrap();
    path.display().to_string()
}

#[test]
fn validate_names_file_document_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = manifest(
        "good",
        "http://p/api",
        "w",
        json!({"entrypoint": "f.py:main"}),
    );
    let bad_cron = manifest(
        "bad",
        "http://p/api",
        "w",
        json!({"entrypoint": "f.py:main", "schedules": [{"slug": "a", "cron": "61 * * * *"}]}),
    );
    let other = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [bad_cron.clone()]});

    let ok = write(d, "ok.yaml", &[other.clone(), good.clone()]);
    let (code, out, _) = run(&["validate", "-f", &ok]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok.yaml: document 2 (team-a/good): valid"),
        "{out}"
    );

    std::fs::create_dir(d.join("nested")).unwrap();
    let listed = write(&d.join("nested"), "list.yaml", &[list]);
    let (code, out, _) = run(&["validate", "-f", d.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let line =
        format!("{listed}: document 1, items[0] (team-a/bad): spec.deployment.schedules[0].cron:");
    assert!(out.contains(&line), "{out}");

    let (code, out, _) = run(&["validate", "-f", &listed, "-o", "json"]);
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["results"][0]["valid"], json!(false));
    assert!(v["results"][0]["error"]
        .as_str()
        .unwrap()
        .starts_with("spec.deployment.schedules[0].cron"));

    std::fs::write(d.join("broken.yaml"), "a: [").unwrap();
    let (code, _, err) = run(&["validate", "-f", d.join("broken.yaml").to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("broken.yaml: document 1: not valid YAML"),
        "{err}"
    );
    let (code, _, err) = run(&["validate", "-f", d.join("missing.yaml").to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.yaml"), "{err}");
}

/// The controller's pass on a manifest: `state` carries what its status would keep.
/// Returns the number of Prefect writes it made.
async fn controller_pass(server: &str, object: &Value, state: &mut SyncState) -> u64 {
    let calls = Arc::new(CallLog::default());
    let client = PrefectClient::new(http_client(), server, None, calls.clone());
    let pd: PrefectDeployment = serde_json::from_value(object.clone()).unwrap();
    let valid = validate(&pd.spec, pd.metadata.name.as_deref().unwrap()).unwrap();
    execute::apply(&client, &valid, "uid-commands", state, &mut Vec::new())
        .await
        .unwrap();
    calls.writes()
}

fn updated(server: &PrefectServer, flow: &str, name: &str) -> Value {
    let (code, body) = server.get(&format!("/api/deployments/name/{flow}/{name}"));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["updated"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn diff_says_no_changes_exactly_when_the_controller_writes_nothing() {
    support::install_crypto();
    let server = PrefectServer::shared();
    let pool = create_pool(server);
    let dir = tempfile::tempdir().unwrap();
    let name = unique("diff");
    let mut object = manifest(
        &name,
        &server.url,
        &pool,
        json!({
            "entrypoint": "flows/etl.py:nightly",
            "description": "first",
            "schedules": [
                {"slug": "hourly", "interval": 3600},
                {"slug": "daily", "cron": "0 6 * * *", "timezone": "Europe/Berlin"},
            ],
            "triggers": [{"expect": ["prefect.flow-run.Completed"]}],
        }),
    );
    let file = |o: &Value| write(dir.path(), "pd.yaml", std::slice::from_ref(o));

    // Nothing in Prefect yet: a create.
    let (code, out, err) = run(&["diff", "-f", &file(&object)]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains(&format!("nightly/{name}: create")), "{out}");

    let mut state = SyncState::default();
    assert!(controller_pass(&server.url, &object, &mut state).await > 0);

    // Applied: diff and the controller agree there is nothing to do, and diff wrote
    // nothing either.
    let before = updated(server, "nightly", &name);
    let (code, out, err) = run(&["diff", "-f", &file(&object)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("nightly/{name}: no changes")),
        "{out}"
    );
    assert_eq!(
        updated(server, "nightly", &name),
        before,
        "diff never writes"
    );
    assert_eq!(controller_pass(&server.url, &object, &mut state).await, 0);
    // Counted from outside: one read by name answers it all (the state is guessed
    // from that same read), and nothing else is asked.
    let proxy = support::CountingProxy::start(server);
    let (code, out, err) = run(&["diff", "-f", &file(&object), "--server-url", &proxy.url]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        proxy.take(),
        vec![format!("GET /api/deployments/name/nightly/{name}")]
    );
    // `export` only reads too (its filter reads are POSTs that change nothing; this
    // one passes through the proxy with its body).
    let (code, out, err) = run(&["export", "--flow", "nightly", "--server-url", &proxy.url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("name: {name}")), "{out}");
    let asked = proxy.take();
    assert!(
        asked.contains(&"POST /api/deployments/filter".to_string()),
        "{asked:?}"
    );
    assert!(
        asked
            .iter()
            .all(|r| r.starts_with("GET ") || r.starts_with("POST ") && r.ends_with("/filter")),
        "{asked:?}"
    );

    // A spec change: diff shows it, the controller writes it, then both are quiet.
    object["spec"]["deployment"]["description"] = json!("second");
    object["spec"]["deployment"]["schedules"][1]["cron"] = json!("30 7 * * *");
    let (code, out, _) = run(&["diff", "-f", &file(&object)]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("description: \"first\" -> \"second\""),
        "{out}"
    );
    assert!(out.contains("schedule daily: update to"), "{out}");
    assert!(controller_pass(&server.url, &object, &mut state).await > 0);
    let (code, out, _) = run(&["diff", "-f", &file(&object)]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(controller_pass(&server.url, &object, &mut state).await, 0);

    // Drift made in Prefect: diff sees it too.
    let client = reqwest::Client::new();
    let id = state.deployment_id.clone().unwrap();
    let url = format!("{}/deployments/{id}", server.url);
    let body = json!({"paused": true});
    let (code, _) = support::prefect_call(&client, reqwest::Method::PATCH, &url, Some(&body)).await;
    assert_eq!(code, 204);
    let (code, out, _) = run(&["diff", "-f", &file(&object), "-o", "json"]);
    assert_eq!(code, 1, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v[0]["plan"]["fields"],
        json!([{"field": "paused", "from": true, "to": false}])
    );
    assert!(controller_pass(&server.url, &object, &mut state).await > 0);
    let (code, _, _) = run(&["diff", "-f", &file(&object)]);
    assert_eq!(code, 0);

    // --server-url overrides spec.server; an invalid manifest is an error (exit 2).
    object["spec"]["server"]["remoteApiUrl"] = json!("http://127.0.0.1:1/api");
    let (code, out, _) = run(&["diff", "-f", &file(&object), "--server-url", &server.url]);
    assert_eq!(code, 0, "{out}");
    object["spec"]["deployment"]["schedules"][0]["interval"] = json!(0);
    let (code, out, _) = run(&["diff", "-f", &file(&object), "--server-url", &server.url]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("error: spec.deployment.schedules[0].interval"),
        "{out}"
    );
}

/// Installed as `kubectl-prefect`, the binary is a kubectl plugin.
#[test]
fn works_as_a_kubectl_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("kubectl-prefect");
    std::fs::copy(BIN, &plugin).unwrap();
    let good = manifest(
        "good",
        "http://p/api",
        "w",
        json!({"entrypoint": "f.py:main"}),
    );
    let file = write(dir.path(), "pd.yaml", &[good]);
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("kubectl")
        .args(["prefect", "validate", "-f", &file])
        .env("PATH", path)
        .output()
        .expect("kubectl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("(team-a/good): valid"), "{text}");
}
