//! The whole operator against a real kube-apiserver + etcd and a real Prefect server:
//! the CRD from `crds/` installed with kubectl, the controller running in-process,
//! resources applied with kubectl and kube-rs.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use prefect_operator::access::{parse_label, Access};
use prefect_operator::api::{
    PrefectDeployment, FINALIZER, RECONCILE_REQUESTED_AT, RUN_PARAMETERS, RUN_REQUESTED_AT,
};
use prefect_operator::metrics::ReconcileLabels;
use prefect_operator::reconcile::{self, Context};
use serde_json::{json, Value};
use support::{unique, ControlPlane, PrefectServer};

struct Env {
    cp: &'static ControlPlane,
    prefect: &'static PrefectServer,
    kube: kube::Client,
    ns: String,
    api: Api<PrefectDeployment>,
    ctx: Arc<Context>,
    raw: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A namespace of its own for one test.
async fn new_namespace(kube: &kube::Client) -> String {
    let ns = unique("ns");
    Api::<Namespace>::all(kube.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    ns
}

impl Env {
    /// A fresh namespace with a work pool in Prefect and an operator watching it.
    async fn new(resync: Duration) -> (Env, String) {
        Env::with_access(resync, Access::default()).await
    }

    /// Like `new`, with the operator's access policy.
    async fn with_access(resync: Duration, access: Access) -> (Env, String) {
        if std::env::var_os("RUST_LOG").is_some() {
            prefect_operator::telemetry::init(prefect_operator::telemetry::LogFormat::Text);
        }
        let cp = ControlPlane::shared();
        let prefect = PrefectServer::shared();
        let kube = cp.client().await;
        let ns = new_namespace(&kube).await;
        let api: Api<PrefectDeployment> = Api::namespaced(kube.clone(), &ns);
        let ctx = Arc::new(Context::new(kube.clone(), resync).with_access(access));
        let task = tokio::spawn(reconcile::controller(api.clone(), ctx.clone(), 4));
        let raw = reqwest::Client::new();
        let pool = support::create_pool(prefect);
        (
            Env {
                cp,
                prefect,
                kube,
                ns,
                api,
                ctx,
                raw,
                task,
            },
            pool,
        )
    }

    async fn prefect_get(&self, path: &str) -> (u16, Value) {
        support::prefect_get(&self.raw, &format!("{}{path}", self.prefect.url)).await
    }

    /// Runs `diff --from-cluster` on `manifest` through the test cluster's kubeconfig:
    /// (exit code, stdout and stderr).
    fn diff_from_cluster(&self, manifest: &str) -> (i32, String) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pd.yaml");
        std::fs::write(&file, manifest).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefect-operator"))
            .args(["diff", "--from-cluster", "-f", file.to_str().unwrap()])
            .env("KUBECONFIG", &self.cp.kubeconfig)
            .env_remove("PREFECT_API_KEY")
            .env_remove("PREFECT_API_AUTH_STRING")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// Creates resource `name` with `spec` on the shared server's `pool`, and waits
    /// until it is Ready.
    async fn create_ready(&self, pool: &str, name: &str, spec: Value) -> PrefectDeployment {
        let pd = resource(self, pool, name, spec);
        self.api.create(&PostParams::default(), &pd).await.unwrap();
        self.wait_for(name, "ready", is_ready).await
    }

    /// Waits until the operator follows a Prefect event stream (30 s at most).
    async fn wait_for_stream(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.ctx.metrics.event_streams.get() < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the event stream did not connect"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls the resource until `pred` holds (60 s at most).
    async fn wait_for(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&PrefectDeployment) -> bool,
    ) -> PrefectDeployment {
        self.wait_up_to(Duration::from_secs(60), name, what, pred)
            .await
    }

    /// Polls the resource until `pred` holds (`limit` at most).
    async fn wait_up_to(
        &self,
        limit: Duration,
        name: &str,
        what: &str,
        pred: impl Fn(&PrefectDeployment) -> bool,
    ) -> PrefectDeployment {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let obj = self.api.get_opt(name).await.unwrap();
            if let Some(o) = &obj {
                if pred(o) {
                    return o.clone();
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; last seen: {:#?}",
                    obj.map(|o| o.status)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls the resource until `Ready` has `reason`; the resource and the message.
    async fn wait_for_reason(&self, name: &str, reason: &str) -> (PrefectDeployment, String) {
        let obj = self
            .wait_for(name, reason, |o| ready(o).is_some_and(|r| r.1 == reason))
            .await;
        let message = ready(&obj).map(|r| r.2).unwrap_or_default();
        (obj, message)
    }

    /// Asks for a pass now (`reconcile.fluxcd.io/requestedAt: token`) and waits until a
    /// pass has answered it.
    /// `kubectl annotate --overwrite` of the resource with `key=value` pairs.
    fn annotate(&self, name: &str, pairs: &[&str]) {
        let mut args = vec!["annotate", "--overwrite", "pd", "-n", &self.ns, name];
        args.extend_from_slice(pairs);
        self.cp.kubectl_ok(&args);
    }

    async fn reconcile_now(&self, name: &str, token: &str) -> PrefectDeployment {
        self.annotate(name, &[&format!("{RECONCILE_REQUESTED_AT}={token}")]);
        self.wait_for(name, "the requested pass", |o| {
            o.status
                .as_ref()
                .and_then(|s| s.last_handled_reconcile_at.as_deref())
                == Some(token)
        })
        .await
    }

    /// The status code of GET `path` on another Prefect server.
    async fn code_on(&self, server: &PrefectServer, path: &str) -> u16 {
        support::prefect_get(&self.raw, &format!("{}{path}", server.url))
            .await
            .0
    }

    /// Deletes the resources `names` and waits until each is gone.
    async fn delete_all(&self, names: &[&str]) {
        for name in names {
            self.api
                .delete(name, &DeleteParams::default())
                .await
                .unwrap();
            self.wait_gone(name).await;
        }
    }

    async fn wait_gone(&self, name: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.api.get_opt(name).await.unwrap().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} was not deleted"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn events(&self, name: &str) -> Vec<(String, String, String)> {
        let out = self
            .cp
            .kubectl_ok(&["get", "events", "-n", &self.ns, "-o", "json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["involvedObject"]["name"] == name)
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or("").into(),
                    e["reason"].as_str().unwrap_or("").into(),
                    e["message"].as_str().unwrap_or("").into(),
                )
            })
            .collect()
    }
}

/// Argo CD's view of the live object: runs the repo's health check on `kubectl get -o
/// yaml` output (kept under target/argocd-captures/ as fixtures for tests/argocd.rs).
fn argocd_health(env: &Env, name: &str, capture_as: &str) -> (String, String) {
    let yaml = env
        .cp
        .kubectl_ok(&["get", "pd", "-n", &env.ns, name, "-o", "yaml"]);
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = std::path::Path::new(root).join("target/argocd-captures");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{capture_as}.yaml"));
    std::fs::write(&path, &yaml).unwrap();
    support::argocd_health("lua5.4", &path)
}

/// A PrefectDeployment against the shared Prefect server and `pool`, with `spec` merged
/// over the server and work pool.
fn resource(env: &Env, pool: &str, name: &str, spec: Value) -> PrefectDeployment {
    let mut full = json!({"server": {"remoteApiUrl": env.prefect.url}, "workPool": {"name": pool}});
    for (k, v) in spec.as_object().unwrap() {
        full[k] = v.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1", "kind": "PrefectDeployment",
        "metadata": {"name": name}, "spec": full,
    }))
    .unwrap()
}

fn ready(o: &PrefectDeployment) -> Option<(String, String, String)> {
    o.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn kstatus_of(o: &PrefectDeployment) -> &'static str {
    support::kstatus(&serde_json::to_value(o).unwrap())
}

fn is_ready(o: &PrefectDeployment) -> bool {
    ready(o).is_some_and(|r| r.0 == "True")
        && o.status.as_ref().and_then(|s| s.observed_generation) == o.metadata.generation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_manifest_applied_with_kubectl() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let name = unique("etl");
    // Only fields of PrefectHQ's published schema, in its spelling.
    let manifest = |cron: &str| {
        format!(
            r#"apiVersion: prefect.io/v1
kind: PrefectDeployment
metadata:
  name: {name}
  namespace: {ns}
spec:
  server:
    remoteApiUrl: {url}
  workPool:
    name: {pool}
    workQueue: critical
  deployment:
    entrypoint: flows/etl.py:run_etl
    flow_name: etl-flow
    description: Nightly ETL
    tags: [etl, nightly]
    labels:
      team: data
    versionInfo:
      type: git
      version: 1a2b3c
    path: /opt/flows
    pullSteps:
      - prefect.deployments.steps.set_working_directory:
          directory: /opt/flows
    parameters:
      source: s3://bucket/in
      retries: 3
    parameterOpenApiSchema:
      type: object
      properties:
        source: {{type: string}}
        retries: {{type: integer}}
    enforceParameterSchema: true
    jobVariables:
      env:
        LOG_LEVEL: info
    paused: false
    concurrencyLimit: 1
    schedules:
      - slug: nightly
        cron: "{cron}"
        timezone: Europe/Berlin
        day_or: true
        active: true
      - slug: every-ten-minutes
        interval: 600
        anchor_date: "2024-01-01T00:00:00Z"
        timezone: UTC
        max_scheduled_runs: 10
      - slug: mondays
        rrule: "FREQ=WEEKLY;BYDAY=MO;BYHOUR=9;BYMINUTE=0"
        timezone: America/New_York
  interval: 5m
"#,
            ns = env.ns,
            url = env.prefect.url,
        )
    };
    let (ok, _, err) = env
        .cp
        .kubectl_stdin(&["apply", "-f", "-"], Some(&manifest("0 2 * * *")));
    assert!(ok, "kubectl apply: {err}");
    let obj = env.wait_for(&name, "Ready", is_ready).await;
    let (_, reason, _) = ready(&obj).unwrap();
    assert_eq!(reason, "Synced");
    assert_eq!(argocd_health(&env, &name, "healthy-ready").0, "Healthy");
    assert_eq!(kstatus_of(&obj), "Current");
    assert!(obj.finalizers().contains(&FINALIZER.to_string()));
    let status = obj.status.clone().unwrap();
    let id = status
        .deployment_id
        .clone()
        .expect("deploymentId in status");

    let (code, d) = env
        .prefect_get(&format!("/deployments/name/etl-flow/{name}"))
        .await;
    assert_eq!(code, 200, "{d}");
    assert_eq!(d["id"], json!(id));
    assert_eq!(d["flow_id"], json!(status.flow_id.clone().unwrap()));
    assert_eq!(d["work_queue_name"], json!("critical"));
    assert_eq!(
        d["parameters"],
        json!({"source": "s3://bucket/in", "retries": 3})
    );
    assert_eq!(d["enforce_parameter_schema"], json!(true));
    assert_eq!(d["version"], json!("1a2b3c"));
    assert_eq!(d["path"], json!("/opt/flows"));
    let scheds = d["schedules"].as_array().unwrap();
    assert_eq!(scheds.len(), 3);
    let nightly_id = scheds.iter().find(|s| s["slug"] == "nightly").unwrap()["id"].clone();
    let ten = scheds
        .iter()
        .find(|s| s["slug"] == "every-ten-minutes")
        .unwrap();
    assert_eq!(ten["max_scheduled_runs"], json!(10));
    assert!(env
        .events(&name)
        .iter()
        .any(|(t, r, _)| t == "Normal" && r == "Created"));

    // kubectl wait works on the Ready condition.
    env.cp.kubectl_ok(&[
        "wait",
        "-n",
        &env.ns,
        "--for=condition=Ready",
        &format!("pd/{name}"),
        "--timeout=30s",
    ]);
    let table = env.cp.kubectl_ok(&["get", "pd", "-n", &env.ns]);
    assert!(
        table.contains(&id) && table.contains(&pool) && table.contains("True"),
        "{table}"
    );

    // Status previews the next three runs of each schedule, in its zone, and the
    // earliest of all is a column of `kubectl get`.
    let preview = status.schedules.clone().expect("schedules in status");
    assert_eq!(preview.len(), 3, "{preview:?}");
    for p in &preview {
        assert_eq!(p.next_runs.len(), 3, "{p:?}");
    }
    let nightly_runs = &preview
        .iter()
        .find(|p| p.slug == "nightly")
        .unwrap()
        .next_runs;
    assert!(
        nightly_runs
            .iter()
            .all(|t| t.contains("T02:00:00+01:00") || t.contains("T02:00:00+02:00")),
        "{nightly_runs:?}"
    );
    let instant = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap();
    let earliest = preview
        .iter()
        .map(|p| instant(&p.next_runs[0]))
        .min()
        .unwrap();
    let next_run = status.next_run.clone().expect("nextRun in status");
    assert_eq!(instant(&next_run), earliest);
    assert!(
        table.contains("NEXT RUN") && table.contains(&next_run),
        "{table}"
    );

    // Change the cron with kubectl: the schedule is updated in place.
    let (ok, _, err) = env
        .cp
        .kubectl_stdin(&["apply", "-f", "-"], Some(&manifest("30 3 * * *")));
    assert!(ok, "{err}");
    let obj = env
        .wait_for(&name, "generation 2 Ready", |o| {
            is_ready(o) && o.metadata.generation == Some(2)
        })
        .await;
    let preview = obj.status.unwrap().schedules.unwrap();
    let nightly_runs = &preview
        .iter()
        .find(|p| p.slug == "nightly")
        .unwrap()
        .next_runs;
    assert!(
        nightly_runs.iter().all(|t| t.contains("T03:30:00+0")),
        "the preview follows the new cron: {nightly_runs:?}"
    );
    let (_, d) = env.prefect_get(&format!("/deployments/{id}")).await;
    let nightly = d["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["slug"] == "nightly")
        .unwrap()
        .clone();
    assert_eq!(nightly["schedule"]["cron"], json!("30 3 * * *"));
    assert_eq!(nightly["id"], nightly_id);

    // The operator never writes spec, labels or annotations: a re-apply is a no-op.
    let (ok, out, err) = env
        .cp
        .kubectl_stdin(&["diff", "-f", "-"], Some(&manifest("30 3 * * *")));
    assert!(ok, "kubectl diff shows changes: {out}{err}");

    // Delete: the deployment goes from Prefect, then the resource goes.
    env.cp.kubectl_ok(&[
        "delete",
        "pd",
        "-n",
        &env.ns,
        &name,
        "--wait=true",
        "--timeout=60s",
    ]);
    env.wait_gone(&name).await;
    assert_eq!(env.prefect_get(&format!("/deployments/{id}")).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_spec_is_reported_and_not_sent() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let name = unique("bad");
    let pd = resource(
        &env,
        &pool,
        &name,
        json!({
            "deployment": {"entrypoint": "f.py:flow_fn", "schedules": [
                {"slug": "ok", "interval": 60},
                {"slug": "typo", "cron": "0 0 9 * * *"}
            ]}
        }),
    );
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env
        .wait_for(&name, "InvalidSpec", |o| {
            ready(o).is_some_and(|r| r.1 == "InvalidSpec")
        })
        .await;
    let (status, _, message) = ready(&obj).unwrap();
    assert_eq!(status, "False");
    assert!(
        message.starts_with("spec.deployment.schedules[1].cron:"),
        "{message}"
    );
    assert!(message.contains("6 fields"), "{message}");
    assert_eq!(
        argocd_health(&env, &name, "degraded-invalid-spec").0,
        "Degraded"
    );
    assert_eq!(kstatus_of(&env.api.get(&name).await.unwrap()), "Failed");
    assert_eq!(
        env.prefect_get(&format!("/deployments/name/flow-fn/{name}"))
            .await
            .0,
        404,
        "nothing sent to Prefect"
    );
    assert!(env
        .events(&name)
        .iter()
        .any(|(t, r, _)| t == "Warning" && r == "InvalidSpec"));

    // Fixing the spec makes it Ready.
    let patch = json!({"spec": {"deployment": {"schedules": [{"slug": "ok", "interval": 60}, {"slug": "typo", "cron": "0 9 * * *"}]}}});
    env.api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let obj = env.wait_for(&name, "Ready after fix", is_ready).await;
    let id = obj.status.unwrap().deployment_id.unwrap();
    let (code, before) = env.prefect_get(&format!("/deployments/{id}")).await;
    assert_eq!(code, 200);

    // Breaking a working resource (a cron that can never fire, which Prefect would
    // accept) leaves the deployment in Prefect exactly as it was.
    let patch = json!({"spec": {"deployment": {"schedules": [{"slug": "ok", "interval": 60}, {"slug": "typo", "cron": "0 0 31 2 *"}]}}});
    env.api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let obj = env
        .wait_for(&name, "InvalidSpec again", |o| {
            ready(o).is_some_and(|r| r.1 == "InvalidSpec") && o.metadata.generation == Some(3)
        })
        .await;
    let (_, _, message) = ready(&obj).unwrap();
    assert!(
        message.starts_with("spec.deployment.schedules[1].cron:")
            && message.contains("never fires"),
        "{message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
    let (_, after) = env.prefect_get(&format!("/deployments/{id}")).await;
    assert_eq!(after["schedules"], before["schedules"]);
    assert_eq!(after["updated"], before["updated"], "not written at all");
    let kept = obj.status.unwrap().schedules.unwrap();
    let typo = &kept.iter().find(|p| p.slug == "typo").unwrap().next_runs;
    assert!(
        !typo.is_empty() && typo.iter().all(|t| t.contains("T09:00:00")),
        "the preview of what still runs is kept: {typo:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_then_created() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let name = unique("auth");
    let pd = resource(
        &env,
        &pool,
        &name,
        json!({
            "server": {"remoteApiUrl": env.prefect.url, "authString": {"valueFrom": {"secretKeyRef": {"name": "prefect-auth", "key": "auth"}}}},
            "deployment": {"entrypoint": "f.py:secured"}
        }),
    );
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let (obj, message) = env.wait_for_reason(&name, "SecretNotFound").await;
    assert!(
        message.contains(r#"Secret "prefect-auth" not found"#),
        "{message}"
    );
    // Retried until the Secret appears: in progress, not failed.
    assert_eq!(
        argocd_health(&env, &name, "progressing-secret-not-found").0,
        "Progressing"
    );
    assert_eq!(kstatus_of(&obj), "InProgress");

    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "prefect-auth"}, "stringData": {"auth": "admin:pass\n"}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(env.kube.clone(), &env.ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    env.wait_for(&name, "Ready once the Secret exists", is_ready)
        .await;
}

/// Credentials are read once and kept, not read from the Secret on every pass; a server
/// that refuses them makes the next pass read them anew, so a fixed (or rotated) Secret
/// is used on the next retry rather than when the kept value expires (two minutes,
/// longer than this test waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_read_again() {
    let (env, _) = Env::new(Duration::from_secs(300)).await;
    let secured = PrefectServer::start(Some("admin:s3cret"));
    let pool = unique("pool");
    let made = env
        .raw
        .post(format!("{}/work_pools/", secured.url))
        .basic_auth("admin", Some("s3cret"))
        .json(&json!({"name": pool, "type": "process"}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status().as_u16(), 201);
    let secrets = Api::<Secret>::namespaced(env.kube.clone(), &env.ns);
    let secret = |auth: &str| -> Secret {
        serde_json::from_value(
            json!({"metadata": {"name": "rotated"}, "stringData": {"auth": auth}}),
        )
        .unwrap()
    };
    secrets
        .create(&PostParams::default(), &secret("admin:old"))
        .await
        .unwrap();
    let name = unique("rotated");
    let pd = resource(
        &env,
        &pool,
        &name,
        json!({
            "server": {"remoteApiUrl": secured.url, "authString": {"valueFrom": {"secretKeyRef": {"name": "rotated", "key": "auth"}}}},
            "deployment": {"entrypoint": "f.py:secured"}
        }),
    );
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let (obj, message) = env.wait_for_reason(&name, "PrefectUnauthorized").await;
    assert!(message.contains("401"), "{message}");
    assert!(
        !message.contains("admin:old"),
        "no credentials in status: {message}"
    );
    assert_eq!(kstatus_of(&obj), "Failed");

    secrets
        .replace("rotated", &PostParams::default(), &secret("admin:s3cret"))
        .await
        .unwrap();
    env.wait_for(&name, "Ready with the new Secret", is_ready)
        .await;

    // Kept: with the Secret gone, a pass asked for now still has the credentials.
    secrets
        .delete("rotated", &DeleteParams::default())
        .await
        .unwrap();
    let obj = env.reconcile_now(&name, "after-delete").await;
    assert!(is_ready(&obj), "{:?}", ready(&obj));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_orphan_policy_and_unreachable_cleanup() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let name = unique("orphan");
    let pd = resource(
        &env,
        &pool,
        &name,
        json!({
            "deletionPolicy": "Orphan",
            "deployment": {"entrypoint": "f.py:kept", "triggers": [
                {"expect": ["prefect.flow-run.Failed"]},
                {"type": "compound", "require": 2, "within": 300, "triggers": [{"expect": ["a"]}, {"expect": ["b"]}]}
            ]}
        }),
    );
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env.wait_for(&name, "Ready", is_ready).await;
    let status = obj.status.unwrap();
    let id = status.deployment_id.unwrap();
    let automations = status.automation_ids.unwrap();
    assert_eq!(automations.len(), 2);
    for a in &automations {
        let (code, body) = env.prefect_get(&format!("/automations/{a}")).await;
        assert_eq!(code, 200);
        assert_eq!(body["actions"][0]["deployment_id"], json!(id));
    }
    env.api
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone(&name).await;
    assert_eq!(
        env.prefect_get(&format!("/deployments/{id}")).await.0,
        200,
        "Orphan leaves the deployment"
    );
    assert_eq!(
        env.prefect_get(&format!("/automations/{}", automations[0]))
            .await
            .0,
        200
    );

    // Prefect unreachable at deletion: the finalizer stays and the resource says why.
    let dead = unique("dead");
    let mut pd = resource(
        &env,
        &pool,
        &dead,
        json!({
            "server": {"remoteApiUrl": format!("http://127.0.0.1:{}/api", support::free_port())},
            "deployment": {"entrypoint": "f.py:never"}
        }),
    );
    pd.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env
        .wait_for(&dead, "PrefectUnreachable", |o| {
            ready(o).is_some_and(|r| r.1 == "PrefectUnreachable")
        })
        .await;
    assert_eq!(
        argocd_health(&env, &dead, "progressing-unreachable").0,
        "Progressing"
    );
    assert_eq!(kstatus_of(&obj), "InProgress");
    env.api
        .delete(&dead, &DeleteParams::default())
        .await
        .unwrap();
    let obj = env
        .wait_for(&dead, "CleanupFailed", |o| {
            ready(o).is_some_and(|r| r.1 == "CleanupFailed")
        })
        .await;
    assert!(obj.finalizers().contains(&FINALIZER.to_string()));
    // Switching to Orphan lets it go.
    let (health, message) = argocd_health(&env, &dead, "progressing-deleting");
    assert_eq!(health, "Progressing");
    assert!(message.starts_with("Being deleted"), "{message}");
    env.api
        .patch(
            &dead,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"deletionPolicy": "Orphan"}})),
        )
        .await
        .unwrap();
    env.wait_gone(&dead).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_writes_nothing() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let name = unique("steady");
    let pd = resource(
        &env,
        &pool,
        &name,
        json!({
            "interval": "10s",
            "deployment": {"entrypoint": "f.py:steady", "parameters": {"a": 1},
                // A run that cannot fall inside the window: a next run that passes
                // rewrites the preview, which is a status write by design.
                "schedules": [{"slug": "s", "cron": "0 3 1 1 *"}],
                "triggers": [{"expect": ["x.y"]}]}
        }),
    );
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env.wait_for(&name, "Ready", is_ready).await;
    let rv = obj.resource_version();
    let writes = env.ctx.calls.writes();
    // A drift check reads the deployment directly or through the bulk snapshot.
    let reads = |ctx: &Context| {
        let calls = ctx.calls.snapshot();
        let n = |m: &str, e: &'static str| calls.get(&(m.to_string(), e)).copied().unwrap_or(0);
        n("GET", "deployment_by_name") + n("POST", "deployments_filter")
    };
    let reads_before = reads(&env.ctx);
    // Long enough for at least one resync (10 s, +-10% jitter).
    tokio::time::sleep(Duration::from_secs(14)).await;
    assert!(
        reads(&env.ctx) > reads_before,
        "a resync compared with Prefect"
    );
    assert_eq!(
        env.ctx.calls.writes(),
        writes,
        "no Prefect writes in steady state: {:?}",
        env.ctx.calls.snapshot()
    );
    assert_eq!(
        env.api.get(&name).await.unwrap().resource_version(),
        rv,
        "no status writes in steady state"
    );

    // Drift made in Prefect is repaired by the resync.
    let id = obj.status.unwrap().deployment_id.unwrap();
    let (code, _) = support::prefect_call(
        &env.raw,
        reqwest::Method::PATCH,
        &format!("{}/deployments/{id}", env.prefect.url),
        Some(&json!({"parameters": {"a": 2}})),
    )
    .await;
    assert_eq!(code, 204);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, d) = env.prefect_get(&format!("/deployments/{id}")).await;
        if d["parameters"] == json!({"a": 1}) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "drift not repaired: {}",
            d["parameters"]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `kubectl explain` output for a path of the CRD, waiting for the apiserver to publish
/// a new CRD's OpenAPI (a moment after it is established).
async fn explain(cp: &ControlPlane, path: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out, err) = cp.kubectl(&["explain", path]);
        if ok {
            return out;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "kubectl explain {path}: {err}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `kubectl explain PATH` lists each field with words of its description.
async fn assert_explained(cp: &ControlPlane, path: &str, fields: &[(&str, &str)]) {
    let out = explain(cp, path).await;
    for (field, words) in fields {
        let at = out
            .find(&format!("{field}\t"))
            .or_else(|| out.find(&format!("{field} ")));
        assert!(
            at.is_some(),
            "{path}.{field} missing from kubectl explain:\n{out}"
        );
        assert!(
            out.contains(words),
            "description of {path}.{field} ({words:?}) missing:\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_explain_describes_every_schedule_field() {
    let cp = ControlPlane::shared();
    assert_explained(
        cp,
        "prefectdeployment.spec.deployment.schedules",
        &[
            ("slug", "unique"),
            ("interval", "Time between runs"),
            ("anchor_date", "RFC 3339"),
            ("cron", "five-field cron"),
            ("day_or", "day-of-week"),
            ("rrule", "RFC 5545"),
            ("timezone", "IANA time zone"),
            ("active", "inactive schedule"),
            ("max_scheduled_runs", "1 to 50"),
            ("parameters", "Parameter values"),
            ("replaces", "keeping its id"),
        ],
    )
    .await;
}

/// The fields of this round's Prefect features are described where users look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_explain_describes_policies_and_concurrency() {
    let cp = ControlPlane::shared();
    assert_explained(
        cp,
        "prefectdeployment.spec",
        &[
            ("driftPolicy", "Report"),
            ("ignoreFields", "Fields people may own in Prefect"),
            ("adoptExisting", "Take over a deployment"),
        ],
    )
    .await;
    assert_explained(
        cp,
        "prefectdeployment.spec.deployment",
        &[
            ("concurrencyLimit", "concurrent runs"),
            ("concurrencyOptions", "concurrency_options"),
            ("globalConcurrencyLimit", "named global concurrency limit"),
        ],
    )
    .await;
    assert_explained(
        cp,
        "prefectdeployment.spec.deployment.globalConcurrencyLimit",
        &[
            ("name", "global concurrency limit in Prefect"),
            ("limit", "Needed to create the limit"),
            ("active", "enforced"),
            ("slotDecayPerSecond", "rate limit"),
            ("collisionStrategy", "CANCEL_NEW"),
        ],
    )
    .await;
    assert_explained(
        cp,
        "prefectdeployment.spec.deployment.concurrencyOptions",
        &[
            ("collisionStrategy", "ENQUEUE"),
            ("gracePeriodSeconds", "60 to 86400"),
        ],
    )
    .await;
}

/// Runs an Argo CD action script (`argocd/actions/<script>.lua`) on the live object;
/// returns its output: the changed object for an action, "name state" lines for
/// discovery.
fn argocd_action(env: &Env, name: &str, script: &str) -> String {
    let yaml = env
        .cp
        .kubectl_ok(&["get", "pd", "-n", &env.ns, name, "-o", "yaml"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("obj.yaml");
    std::fs::write(&path, &yaml).unwrap();
    support::argocd_lua("lua5.4", "action.lua", &format!("actions/{script}"), &path)
}

/// The JSON merge patch from `live` to `result`, as Argo CD applies an action's
/// result. Lua has one kind of empty table, so `{}` and `[]` count as equal.
fn merge_patch(live: &Value, result: &Value) -> Option<Value> {
    let empty = |v: &Value| {
        v.as_object().is_some_and(|o| o.is_empty()) || v.as_array().is_some_and(|a| a.is_empty())
    };
    match (live, result) {
        (Value::Object(a), Value::Object(b)) => {
            let mut out = serde_json::Map::new();
            for (k, bv) in b {
                match a.get(k) {
                    Some(av) => {
                        if let Some(p) = merge_patch(av, bv) {
                            out.insert(k.clone(), p);
                        }
                    }
                    None => {
                        out.insert(k.clone(), bv.clone());
                    }
                }
            }
            for k in a.keys() {
                if !b.contains_key(k) {
                    out.insert(k.clone(), Value::Null);
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        (a, b) if a == b || (empty(a) && empty(b)) => None,
        (_, b) => Some(b.clone()),
    }
}

/// Runs an action and applies its result the way Argo CD does (a merge patch of what
/// the script changed).
fn apply_action(env: &Env, name: &str, script: &str) {
    let live: Value = serde_json::from_str(
        &env.cp
            .kubectl_ok(&["get", "pd", "-n", &env.ns, name, "-o", "json"]),
    )
    .unwrap();
    let result: Value = serde_yaml::from_str(&argocd_action(env, name, script)).unwrap();
    let mut patch = merge_patch(&live["spec"], &result["spec"])
        .map(|p| json!({"spec": p}))
        .unwrap_or(json!({}));
    if let Some(a) = merge_patch(
        &live["metadata"]["annotations"],
        &result["metadata"]["annotations"],
    ) {
        patch["metadata"] = json!({"annotations": a});
    }
    assert_ne!(patch, json!({}), "{script} changed nothing");
    env.cp.kubectl_ok(&[
        "patch",
        "pd",
        "-n",
        &env.ns,
        name,
        "--type",
        "merge",
        "-p",
        &patch.to_string(),
    ]);
}

async fn flow_runs_of(env: &Env, deployment_id: &str) -> Vec<Value> {
    let (code, runs) = support::prefect_call(
        &env.raw,
        reqwest::Method::POST,
        &format!("{}/flow_runs/filter", env.prefect.url),
        Some(&json!({"deployments": {"id": {"any_": [deployment_id]}}})),
    )
    .await;
    assert_eq!(code, 200, "{runs}");
    serde_json::from_value(runs).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_reconcile_run_pause_resume() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let name = unique("act");
    let pd = resource(
        &env,
        &pool,
        &name,
        json!({"deployment": {
            "entrypoint": "flows/etl.py:nightly",
            "parameters": {"rows": 10, "source": "s3://in"},
            "parameterOpenApiSchema": {"type": "object", "properties": {
                "rows": {"type": "integer"}, "source": {"type": "string"}}},
            "schedules": [{"slug": "hourly", "interval": 3600}],
        }}),
    );
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env.wait_for(&name, "Ready", is_ready).await;
    let id = obj.status.unwrap().deployment_id.unwrap();

    // Discovery: pause offered, resume not (it is not paused).
    let offered = argocd_action(&env, &name, "discovery");
    assert_eq!(
        offered,
        "pause enabled\nreconcile enabled\nresume disabled\nrun-now enabled\n"
    );

    // Reconcile now: answered by a pass, recorded in status.
    apply_action(&env, &name, "reconcile");
    let live = env.api.get(&name).await.unwrap();
    let asked = live.annotations()[RECONCILE_REQUESTED_AT].clone();
    env.wait_for(&name, "lastHandledReconcileAt", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.last_handled_reconcile_at.clone())
            == Some(asked.clone())
    })
    .await;

    // Run now, with a parameter override: exactly one flow run, with the merged
    // parameters, recorded in status.
    env.annotate(&name, &[r#"prefect.io/run-parameters={"rows": 5}"#]);
    apply_action(&env, &name, "run-now");
    let obj = env
        .wait_for(&name, "lastRun", |o| {
            o.status
                .as_ref()
                .and_then(|s| s.last_run.as_ref())
                .is_some_and(|r| r.flow_run_id.is_some())
        })
        .await;
    let run = obj.status.unwrap().last_run.unwrap();
    let runs = flow_runs_of(&env, &id).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["id"], json!(run.flow_run_id.clone().unwrap()));
    assert_eq!(
        runs[0]["parameters"],
        json!({"rows": 5, "source": "s3://in"})
    );

    // Further passes with the same token make no second run.
    env.reconcile_now(&name, "again").await;
    assert_eq!(flow_runs_of(&env, &id).await.len(), 1);

    // A run request whose parameters break the schema: refused, said so, no run, and
    // the deployment stays Ready.
    env.annotate(
        &name,
        &[
            r#"prefect.io/run-parameters={"rows": "many"}"#,
            &format!("{RUN_REQUESTED_AT}=bad-params"),
        ],
    );
    let obj = env
        .wait_for(&name, "refused run", |o| {
            o.status
                .as_ref()
                .and_then(|s| s.last_run.as_ref())
                .is_some_and(|r| r.token == "bad-params")
        })
        .await;
    let run = obj.status.clone().unwrap().last_run.unwrap();
    assert!(run.flow_run_id.is_none());
    assert!(
        run.error
            .as_deref()
            .unwrap()
            .contains("prefect.io/run-parameters"),
        "{run:?}"
    );
    assert!(is_ready(&obj));
    assert_eq!(flow_runs_of(&env, &id).await.len(), 1);

    // Pause and resume: the deployment in Prefect follows; discovery flips.
    apply_action(&env, &name, "pause");
    env.wait_for(&name, "paused applied", |o| {
        is_ready(o) && o.spec.deployment.paused == Some(true)
    })
    .await;
    let (_, d) = env.prefect_get(&format!("/deployments/{id}")).await;
    assert_eq!(d["paused"], json!(true));
    assert!(argocd_action(&env, &name, "discovery").contains("resume enabled"));
    apply_action(&env, &name, "resume");
    env.wait_for(&name, "resumed applied", |o| {
        is_ready(o) && o.spec.deployment.paused == Some(false)
    })
    .await;
    let (_, d) = env.prefect_get(&format!("/deployments/{id}")).await;
    assert_eq!(d["paused"], json!(false));
}

/// Action annotations the status copies: an empty one (server-side apply on some
/// apiservers, 1.20 here, turns "" into null, which the status schema refuses, so it
/// kept the whole status from being written) and a run token longer than status keeps
/// (it was asked for again on every pass). An empty `prefect.io/run-parameters` means
/// no overrides (it was refused as not JSON).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_or_long_action_annotations_are_answered_once() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let name = unique("empty");
    let mut pd = resource(
        &env,
        &pool,
        &name,
        json!({"deployment": {"entrypoint": "flows/etl.py:nightly"}}),
    );
    pd.metadata.annotations = Some(
        [
            (RECONCILE_REQUESTED_AT.to_string(), String::new()),
            (RUN_REQUESTED_AT.to_string(), String::new()),
        ]
        .into(),
    );
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env.wait_for(&name, "Ready", is_ready).await;
    let status = obj.status.unwrap();
    let id = status.deployment_id.clone().unwrap();
    // An empty request asks for nothing: no run, nothing recorded as handled.
    assert_eq!(status.last_handled_reconcile_at, None);
    assert!(status.last_run.is_none(), "{:?}", status.last_run);
    assert!(flow_runs_of(&env, &id).await.is_empty());
    // A real request after it is answered as usual, once, even with a token longer
    // than status keeps (it is recorded shortened, and still matches on later passes).
    let token = format!("now-{}", "x".repeat(400));
    // An empty parameters annotation means no overrides.
    env.annotate(
        &name,
        &[
            &format!("{RUN_REQUESTED_AT}={token}"),
            &format!("{RUN_PARAMETERS}="),
        ],
    );
    env.wait_for(&name, "lastRun", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.last_run.as_ref())
            .is_some_and(|r| r.token.starts_with("now-") && r.flow_run_id.is_some())
    })
    .await;
    let asked = env.ctx.calls.count("POST", "create_flow_run");
    env.reconcile_now(&name, "again").await;
    env.reconcile_now(&name, "and again").await;
    assert_eq!(flow_runs_of(&env, &id).await.len(), 1);
    // Not asked again either (Prefect's idempotency key would hide a second ask).
    assert_eq!(env.ctx.calls.count("POST", "create_flow_run"), asked);
}

/// `--allowed-server` and `--secret-label`: a resource pointing elsewhere is stalled
/// without a single request; a Secret without the label is not read until labelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_policy_servers_and_secret_labels() {
    let prefect = PrefectServer::shared();
    let port = prefect.port;
    let access = Access {
        allowed_servers: vec![format!("http://127.0.0.1:{port}/api").parse().unwrap()],
        secret_label: Some(parse_label("prefect.io/credentials=true").unwrap()),
    };
    let (env, pool) = Env::with_access(Duration::from_secs(300), access).await;

    // A server outside the list: stalled, and no request went anywhere.
    let name = unique("elsewhere");
    let mut pd = resource(
        &env,
        &pool,
        &name,
        json!({"deployment": {"entrypoint": "f.py:main"}}),
    );
    pd.spec.server.remote_api_url = Some(format!("http://127.0.0.1:{port}/api-other"));
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env
        .wait_for(&name, "ServerNotAllowed", |o| {
            ready(o).is_some_and(|r| r.1 == "ServerNotAllowed")
        })
        .await;
    assert_eq!(kstatus_of(&obj), "Failed");
    assert!(
        env.ctx.calls.snapshot().is_empty(),
        "{:?}",
        env.ctx.calls.snapshot()
    );
    // Deleting it does not wait for a cleanup the operator may not do.
    env.api
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone(&name).await;
    assert!(env.ctx.calls.snapshot().is_empty());

    // An allowed server, credentials in a Secret without the label: not read.
    let name = unique("label");
    let secret = "prefect-creds";
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": secret},
        "stringData": {"key": "not-used-by-an-open-server"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.kube.clone(), &env.ns)
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
    let pd = resource(
        &env,
        &pool,
        &name,
        json!({
            "server": {"remoteApiUrl": env.prefect.url, "apiKey": {"valueFrom": {"secretKeyRef": {"name": secret, "key": "key"}}}},
            "deployment": {"entrypoint": "f.py:main"},
        }),
    );
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let (obj, message) = env.wait_for_reason(&name, "SecretNotAllowed").await;
    assert!(message.contains("prefect.io/credentials=true"), "{message}");
    assert_eq!(kstatus_of(&obj), "Failed");
    assert!(env.ctx.calls.snapshot().is_empty());

    // Labelled: read on the next retry, and applied.
    env.cp.kubectl_ok(&[
        "label",
        "secret",
        "-n",
        &env.ns,
        secret,
        "prefect.io/credentials=true",
    ]);
    env.wait_for(&name, "Ready after labelling", is_ready).await;
}

/// driftPolicy Report leaves changes made in Prefect and reports them; ignoreFields
/// leaves a field to people until the spec changes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_policy_report_and_ignored_fields() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let patch_prefect = |id: String, body: Value| {
        let raw = env.raw.clone();
        let url = env.prefect.url.clone();
        async move {
            let url = format!("{url}/deployments/{id}");
            let (code, _) =
                support::prefect_call(&raw, reqwest::Method::PATCH, &url, Some(&body)).await;
            assert_eq!(code, 204);
        }
    };
    let drifted = |o: &PrefectDeployment| {
        o.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Drifted"))
            .map(|c| (c.status.clone(), c.message.clone()))
    };

    // Report: a pause made in Prefect stays, and is reported once asked to look.
    let name = unique("report");
    let pd = resource(
        &env,
        &pool,
        &name,
        json!({"driftPolicy": "Report", "deployment": {"entrypoint": "f.py:main", "description": "from git"}}),
    );
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env.wait_for(&name, "Ready", is_ready).await;
    assert_eq!(drifted(&obj).unwrap().0, "False");
    let id = obj.status.unwrap().deployment_id.unwrap();
    patch_prefect(id.clone(), json!({"paused": true})).await;
    env.reconcile_now(&name, "look").await;
    let obj = env
        .wait_for(&name, "Drifted", |o| {
            drifted(o).is_some_and(|d| d.0 == "True")
        })
        .await;
    assert!(
        drifted(&obj).unwrap().1.contains("paused"),
        "{:?}",
        drifted(&obj)
    );
    assert!(is_ready(&obj));
    assert_eq!(kstatus_of(&obj), "Current");
    let (_, d) = env.prefect_get(&format!("/deployments/{id}")).await;
    assert_eq!(d["paused"], json!(true), "left in place");
    assert!(env
        .events(&name)
        .iter()
        .any(|e| e.1 == "DriftDetected" && e.2.contains("paused")));
    // A spec change is applied (and with it the spec's paused: false).
    env.cp.kubectl_ok(&[
        "patch",
        "pd",
        "-n",
        &env.ns,
        &name,
        "--type",
        "merge",
        "-p",
        r#"{"spec": {"deployment": {"description": "changed in git"}}}"#,
    ]);
    let obj = env
        .wait_for(&name, "spec change applied", |o| {
            is_ready(o) && drifted(o).is_some_and(|d| d.0 == "False")
        })
        .await;
    let (_, d) = env.prefect_get(&format!("/deployments/{id}")).await;
    assert_eq!(
        (d["description"].clone(), d["paused"].clone()),
        (json!("changed in git"), json!(false))
    );
    drop(obj);

    // ignoreFields [paused]: a pause in the UI survives drift checks.
    let name = unique("ignore");
    let pd = resource(
        &env,
        &pool,
        &name,
        json!({"ignoreFields": ["paused"], "deployment": {"entrypoint": "f.py:main", "description": "a"}}),
    );
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env.wait_for(&name, "Ready", is_ready).await;
    let id = obj.status.unwrap().deployment_id.unwrap();
    patch_prefect(id.clone(), json!({"paused": true, "description": "b"})).await;
    env.reconcile_now(&name, "look").await;
    let (_, d) = env.prefect_get(&format!("/deployments/{id}")).await;
    assert_eq!(
        d["paused"],
        json!(true),
        "the ignored field is left to people"
    );
    assert_eq!(d["description"], json!("a"), "other drift is corrected");
    // The spec changes the field: applied once, then left to people again.
    patch_prefect(id.clone(), json!({"paused": false})).await;
    env.cp.kubectl_ok(&[
        "patch",
        "pd",
        "-n",
        &env.ns,
        &name,
        "--type",
        "merge",
        "-p",
        r#"{"spec": {"deployment": {"paused": true, "description": "c"}}}"#,
    ]);
    env.wait_for(&name, "applied", |o| {
        is_ready(o)
            && o.status.as_ref().and_then(|s| s.observed_generation) == o.metadata.generation
            && o.spec.deployment.description.as_deref() == Some("c")
    })
    .await;
    let (_, d) = env.prefect_get(&format!("/deployments/{id}")).await;
    assert_eq!(
        d["paused"],
        json!(true),
        "a changed spec value is applied once"
    );
    patch_prefect(id.clone(), json!({"paused": false})).await;
    env.reconcile_now(&name, "again").await;
    let (_, d) = env.prefect_get(&format!("/deployments/{id}")).await;
    assert_eq!(d["paused"], json!(false), "then left to people again");
}

/// With Kubernetes writes one at a time (`--max-kube-writes=1`) every write a resource
/// needs still happens: finalizer, status and Event on the way in, the finalizer's
/// removal on the way out, with several passes competing for the one slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_writes_one_at_a_time_still_converge_and_clean_up() {
    let (mut env, pool) = Env::new(Duration::from_secs(300)).await;
    env.task.abort();
    env.ctx = Arc::new(
        Context::new(env.kube.clone(), Duration::from_secs(300)).with_kube_write_limit(Some(1)),
    );
    env.task = tokio::spawn(reconcile::controller(env.api.clone(), env.ctx.clone(), 4));
    let names: Vec<String> = (0..6).map(|_| unique("turns")).collect();
    for (i, name) in names.iter().enumerate() {
        let mut deployment = json!({"entrypoint": "f.py:turns"});
        if i % 2 == 0 {
            deployment["triggers"] = json!([{"expect": ["prefect.flow-run.Failed"]}]);
        }
        let pd = resource(&env, &pool, name, json!({"deployment": deployment}));
        env.api.create(&PostParams::default(), &pd).await.unwrap();
    }
    let mut ids = Vec::new();
    for name in &names {
        let obj = env.wait_for(name, "Ready", is_ready).await;
        assert!(obj.finalizers().iter().any(|f| f == FINALIZER), "{name}");
        ids.push(obj.status.unwrap().deployment_id.unwrap());
        let events = env.events(name);
        assert!(
            events.iter().any(|(_, reason, _)| reason == "Created"),
            "{name}: {events:?}"
        );
    }
    for name in &names {
        env.api
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for (name, id) in names.iter().zip(&ids) {
        env.wait_gone(name).await;
        let (code, _) = env.prefect_get(&format!("/deployments/{id}")).await;
        assert_eq!(code, 404, "{name}'s deployment is deleted with it");
    }
}

/// Drift checks of many resources on one server read their deployments in bulk: far
/// fewer requests than one read per resource, and none of them a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_checks_read_in_bulk() {
    let (mut env, pool) = Env::new(Duration::from_secs(300)).await;
    let names: Vec<String> = (0..8).map(|_| unique("bulk")).collect();
    for (i, name) in names.iter().enumerate() {
        let mut deployment = json!({"entrypoint": "f.py:bulk"});
        if i % 2 == 0 {
            deployment["triggers"] = json!([{"expect": ["prefect.flow-run.Failed"]}]);
        }
        let pd = resource(
            &env,
            &pool,
            name,
            json!({"interval": "10s", "deployment": deployment}),
        );
        env.api.create(&PostParams::default(), &pd).await.unwrap();
    }
    for name in &names {
        env.wait_for(name, "Ready", is_ready).await;
    }
    // The operator restarts: it cannot know what changed in Prefect while it was away.
    env.task.abort();
    env.ctx = Arc::new(Context::new(env.kube.clone(), Duration::from_secs(300)));
    // One pass at a time: each would otherwise read its own page.
    env.task = tokio::spawn(reconcile::controller(env.api.clone(), env.ctx.clone(), 1));
    let count = |m: &str, e: &str| env.ctx.calls.count(m, e);
    let by_name = count("GET", "deployment_by_name");
    let related = count("GET", "automations_related_to");
    let writes = env.ctx.calls.writes();
    // The restart's own checks (the resync comes 9 s later at the soonest) read what
    // every status records together: one page of each kind, though the passes come
    // one at a time.
    let passes = env.ctx.metrics.reconciles.get_or_create(&ReconcileLabels {
        result: "ok",
        category: "",
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while passes.get() < names.len() as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restart's checks did not end"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (first, first_automations) = (
        count("POST", "deployments_filter"),
        count("POST", "automations_filter"),
    );
    assert!(first <= 2, "{first} reads of 8 deployments");
    assert!(
        first_automations <= 2,
        "{first_automations} reads of 4 automations"
    );
    // The first pass and two resync rounds (10 s, +-10% jitter). The first checks the
    // automations too: no stream told of changes made while the operator was away.
    tokio::time::sleep(Duration::from_secs(23)).await;
    let bulk = count("POST", "deployments_filter");
    let direct = count("GET", "deployment_by_name") - by_name;
    let automations = count("POST", "automations_filter");
    let automations_direct = count("GET", "automations_related_to") - related;
    eprintln!(
        "drift checks of {} resources after a restart: {bulk} bulk reads, {direct} direct reads; automations: {automations} bulk, {automations_direct} direct",
        names.len()
    );
    assert!(bulk >= 1, "drift checks used the bulk read");
    assert!(
        bulk + direct < 2 * names.len() as u64,
        "{bulk} bulk + {direct} direct reads for {} drift checks",
        2 * names.len()
    );
    assert_eq!(
        automations_direct, 0,
        "every automation was in the bulk read"
    );
    assert!(
        (1..=names.len() as u64 / 2).contains(&automations),
        "{automations} bulk reads for the automations of {} resources",
        names.len() / 2
    );
    assert_eq!(env.ctx.calls.writes(), writes);
}

/// `export` round trip: deployments made by Prefect's own `RunnerDeployment.apply()`,
/// exported, applied with kubectl and reconciled: no Prefect write, and the same
/// schedule ids and automation ids as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_round_trip_changes_nothing() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let suffix = unique("x").replace('-', "");
    let python = support::assets().prefect_bin.with_file_name("python");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/export/apply_with_prefect.py"
    );
    let out = std::process::Command::new(&python)
        .args([script, &pool, &suffix])
        .env("PREFECT_API_URL", &env.prefect.url)
        .env("PREFECT_HOME", tempfile::tempdir().unwrap().path())
        .output()
        .expect("the test venv's python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(ids.len(), 2);

    // What Prefect holds before: schedule ids by slug, automation ids.
    let snapshot = |env: &Env, ids: Vec<String>| {
        let raw = env.raw.clone();
        let url = env.prefect.url.clone();
        async move {
            let mut schedules = std::collections::BTreeMap::new();
            let mut automations = std::collections::BTreeSet::new();
            for id in &ids {
                let (_, d) = support::prefect_get(&raw, &format!("{url}/deployments/{id}")).await;
                for s in d["schedules"].as_array().unwrap() {
                    schedules.insert(
                        format!("{id}/{}", s["slug"].as_str().unwrap()),
                        s["id"].as_str().unwrap().to_string(),
                    );
                }
                let (_, list) = support::prefect_get(
                    &raw,
                    &format!("{url}/automations/related-to/prefect.deployment.{id}"),
                )
                .await;
                for a in list.as_array().unwrap() {
                    automations.insert(a["id"].as_str().unwrap().to_string());
                }
            }
            (schedules, automations)
        }
    };
    let before = snapshot(&env, ids.clone()).await;
    assert_eq!(before.0.len(), 5);
    assert_eq!(before.1.len(), 2);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefect-operator"))
        .args([
            "export",
            "--server-url",
            &env.prefect.url,
            "--flow",
            &format!("etl_{suffix}"),
            "--namespace",
            &env.ns,
        ])
        .env_remove("PREFECT_API_KEY")
        .env_remove("PREFECT_API_AUTH_STRING")
        .output()
        .unwrap();
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A fraction of a second does not fit int-or-string's integer: written as a string.
    assert!(
        yaml.contains("interval: '90.5'"),
        "the fractional interval: {yaml}"
    );
    let writes_before = env.ctx.calls.writes();
    let (ok, _, err) = env.cp.kubectl_stdin(&["apply", "-f", "-"], Some(&yaml));
    assert!(ok, "kubectl apply: {err}\n{yaml}");
    for name in [format!("nightly-{suffix}"), format!("hourly-{suffix}")] {
        let obj = env.wait_for(&name, "Ready", is_ready).await;
        assert!(
            ids.contains(obj.status.as_ref().unwrap().deployment_id.as_ref().unwrap()),
            "adopted, not created"
        );
    }
    assert_eq!(
        env.ctx.calls.writes(),
        writes_before,
        "no Prefect write: {:?}\n{:?}\n{yaml}",
        env.ctx.calls.snapshot(),
        [
            env.events(&format!("nightly-{suffix}")),
            env.events(&format!("hourly-{suffix}"))
        ]
    );
    assert_eq!(
        snapshot(&env, ids).await,
        before,
        "same schedule and automation ids"
    );
}

/// `convert` against Prefect's own reading of the same prefect.yaml: `prefect deploy
/// --all` into one server, convert + kubectl apply + reconcile into another, and the
/// deployments agree field by field (the parameter schema aside: prefect.yaml has none,
/// Prefect derives it from the flow's code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_matches_prefect_deploy() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let other = tokio::task::spawn_blocking(|| PrefectServer::start(None))
        .await
        .unwrap();
    support::create_pool_named(&other, &pool);
    let suffix = unique("c").replace('-', "");
    let dir = tempfile::tempdir().unwrap();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/convert");
    let text = std::fs::read_to_string(format!("{fixtures}/prefect.yaml"))
        .unwrap()
        .replace("POOL", &pool)
        .replace("SUFFIX", &suffix);
    std::fs::write(dir.path().join("prefect.yaml"), &text).unwrap();
    // The variables the file names, on both servers: each side reads its own.
    for server in [&other.url, &env.prefect.url] {
        for (name, value) in [
            ("rows", json!(20)),
            ("bucket", json!("warehouse")),
            ("team", json!("data")),
            ("tag", json!("1.4")),
            ("ratio", json!(1e-5)),
            ("big", json!(1e20)),
            ("flag", json!(true)),
        ] {
            let body = json!({"name": format!("{name}_{suffix}"), "value": value});
            let (code, v) = support::prefect_call(
                &env.raw,
                reqwest::Method::POST,
                &format!("{server}/variables/"),
                Some(&body),
            )
            .await;
            assert_eq!(code, 201, "{v}");
        }
    }
    std::fs::create_dir(dir.path().join("flows")).unwrap();
    std::fs::copy(
        format!("{fixtures}/flows/etl.py"),
        dir.path().join("flows/etl.py"),
    )
    .unwrap();

    // The environment both commands fill placeholders from.
    let environment = [
        (format!("WAREHOUSE_{suffix}"), "warehouse-eu".to_string()),
        (format!("STAGE_{suffix}"), "stage-prod".to_string()),
        (format!("VERSION_{suffix}"), "7.2".to_string()),
    ];

    // Prefect's reading, into the other server.
    let prefect_cli = &support::assets().prefect_bin;
    let out = std::process::Command::new(prefect_cli)
        .args(["--no-prompt", "deploy", "--all"])
        .current_dir(dir.path())
        .env("PREFECT_API_URL", &other.url)
        .env("PREFECT_HOME", dir.path().join("home"))
        .envs(environment.clone())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prefect deploy: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Ours, into the shared one.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefect-operator"))
        .args(["convert", dir.path().join("prefect.yaml").to_str().unwrap()])
        .args(["--server-url", &env.prefect.url, "--namespace", &env.ns])
        .args(["--resolve-variables", "--resolve-env"])
        .envs(environment)
        .output()
        .unwrap();
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, _, err) = env.cp.kubectl_stdin(&["apply", "-f", "-"], Some(&yaml));
    assert!(ok, "{err}\n{yaml}");

    let raw = env.raw.clone();
    let read = |url: String| {
        let raw = raw.clone();
        async move {
            let (code, d) = support::prefect_get(&raw, &url).await;
            assert_eq!(code, 200, "{url}: {d}");
            d
        }
    };
    for (flow, name) in [
        ("etl", format!("nightly-{suffix}")),
        ("hourly", format!("hourly-{suffix}")),
    ] {
        env.wait_for(&name, "Ready", is_ready).await;
        let theirs = read(format!("{}/deployments/name/{flow}/{name}", other.url)).await;
        // Prefect filled in the variables (the comparison below is not of two blanks).
        if flow == "etl" {
            assert_eq!(
                theirs["parameters"],
                json!({"rows": 20, "source": "s3://warehouse/in"})
            );
            assert_eq!(theirs["description"], json!("Loads the warehouse-eu"));
            assert_eq!(theirs["tags"], json!(["etl", "nightly", "stage-prod"]));
        } else {
            assert_eq!(theirs["version"], json!("7.2"));
            assert_eq!(
                theirs["tags"],
                json!(["data", "team-data", "r1e-05-b1e+20-True"])
            );
            assert_eq!(theirs["job_variables"], json!({"image": "etl:1.4"}));
        }
        let ours = read(format!(
            "{}/deployments/name/{flow}/{name}",
            env.prefect.url
        ))
        .await;
        for field in [
            "description",
            "version",
            "tags",
            "parameters",
            "job_variables",
            "paused",
            "work_queue_name",
            "pull_steps",
            "entrypoint",
        ] {
            // Without a description, `prefect deploy` stores the flow's docstring, and
            // for a flow without one the text "None": neither is in prefect.yaml.
            if field == "description" && theirs[field] == json!("None") {
                assert_eq!(ours[field], Value::Null, "{name}: {field}");
                continue;
            }
            assert_eq!(ours[field], theirs[field], "{name}: {field}");
        }
        assert_eq!(
            ours["global_concurrency_limit"]["limit"], theirs["global_concurrency_limit"]["limit"],
            "{name}: concurrency limit"
        );
        // Schedules: the same definitions, activity and parameters (a schedule without
        // a slug in prefect.yaml gets one in the manifest).
        let schedules = |d: &Value| -> Vec<Value> {
            let mut list: Vec<Value> = d["schedules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let mut sched = s["schedule"].clone();
                    if let Some(i) = sched["interval"].as_f64() {
                        sched["interval"] = json!(i);
                    }
                    // No zone is UTC, as Prefect's scheduler reads it.
                    if sched["timezone"].is_null() {
                        sched["timezone"] = json!("UTC");
                    }
                    json!({"schedule": sched, "active": s["active"], "parameters": s["parameters"]})
                })
                .collect();
            list.sort_by_key(|v| v.to_string());
            list
        };
        assert_eq!(schedules(&ours), schedules(&theirs), "{name}: schedules");
        // Automations: the same triggers and actions.
        let automations = |base: String, id: String| async move {
            let list = read(format!(
                "{base}/automations/related-to/prefect.deployment.{id}"
            ))
            .await;
            let mut out: Vec<Value> = list
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| {
                        let mut trigger = a["trigger"].clone();
                        trigger.as_object_mut().unwrap().remove("id");
                        let mut action = a["actions"][0].clone();
                        action.as_object_mut().unwrap().remove("deployment_id");
                        json!({"name": a["name"], "enabled": a["enabled"], "trigger": trigger, "action": action})
                    })
                    .collect();
            out.sort_by_key(|v| v.to_string());
            out
        };
        let theirs_a = automations(
            other.url.clone(),
            theirs["id"].as_str().unwrap().to_string(),
        )
        .await;
        let ours_a = automations(
            env.prefect.url.clone(),
            ours["id"].as_str().unwrap().to_string(),
        )
        .await;
        assert_eq!(ours_a, theirs_a, "{name}: automations");
    }

    // A variable the server does not have: its field is left out and said, exit 1.
    let missing = format!(
        "deployments:\n  - name: m-{suffix}\n    entrypoint: flows/etl.py:hourly\n    work_pool: {{name: {pool}}}\n    tags: [\"{{{{ prefect.variables.absent_{suffix} }}}}\"]\n"
    );
    std::fs::write(dir.path().join("missing.yaml"), &missing).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefect-operator"))
        .args(["convert", dir.path().join("missing.yaml").to_str().unwrap()])
        .args(["--server-url", &env.prefect.url, "--resolve-variables"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "deployments[0].tags[0]: Prefect variable \"absent_{suffix}\" does not exist on the server"
        )),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("name: m-{suffix}")) && !stdout.contains("tags"),
        "{stdout}"
    );
}

/// `diff --from-cluster`: the live object's uid and status and the Secret it names are
/// read through the kubeconfig, so the plan is the controller's own: "no changes" once
/// it is applied, the change once the manifest differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_from_cluster_uses_the_live_status_and_secret() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let name = unique("diffc");
    // Basic auth against a server that does not need it is accepted: the Secret is
    // read, which is what this shows.
    env.cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "prefect-auth",
        "-n",
        &env.ns,
        "--from-literal=auth=user:pass",
    ]);
    let manifest = |description: &str| {
        format!(
            "apiVersion: prefect.io/v1\nkind: PrefectDeployment\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  server:\n    remoteApiUrl: {url}\n    authString:\n      valueFrom:\n        secretKeyRef: {{name: prefect-auth, key: auth}}\n  workPool:\n    name: {pool}\n  deployment:\n    entrypoint: f.py:main\n    description: {description}\n    triggers:\n      - expect: [a.b]\n",
            ns = env.ns,
            url = env.prefect.url,
        )
    };
    let (ok, _, err) = env
        .cp
        .kubectl_stdin(&["apply", "-f", "-"], Some(&manifest("one")));
    assert!(ok, "{err}");
    env.wait_for(&name, "Ready", is_ready).await;
    let diff = |text: String| env.diff_from_cluster(&text);
    let (code, out) = diff(manifest("one"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(": no changes"), "{out}");
    assert!(!out.contains("note:"), "the live status is known: {out}");
    let (code, out) = diff(manifest("two"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(r#"description: "one" -> "two""#), "{out}");
    // A Secret that is not there is an error, as for the controller.
    env.cp
        .kubectl_ok(&["delete", "secret", "-n", &env.ns, "prefect-auth"]);
    let (code, out) = diff(manifest("one"));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("prefect-auth"), "{out}");
}

/// Resources naming one global concurrency limit: the first creates it; one declaring
/// other settings is refused with a condition (and the limit is not fought over); the
/// creator's deletion leaves the limit to the resource still naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_global_concurrency_limit_between_resources() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let limit_name = unique("team-limit");
    let spec = |limit: i64| {
        json!({"deployment": {"entrypoint": "flows/s.py:shared",
            "globalConcurrencyLimit": {"name": limit_name, "limit": limit}}})
    };
    let limit_path = format!("/v2/concurrency_limits/{limit_name}");
    let read_limit = || env.prefect_get(&limit_path);

    env.api
        .create(
            &PostParams::default(),
            &resource(&env, &pool, "first", spec(2)),
        )
        .await
        .unwrap();
    let first = env.wait_for("first", "first ready", is_ready).await;
    let record = first.status.unwrap().global_concurrency_limit.unwrap();
    assert!(record.created, "{record:?}");
    let (code, limit) = read_limit().await;
    assert_eq!((code, &limit["limit"]), (200, &json!(2)));

    // Other settings for the same limit: refused, nothing written to the limit.
    env.api
        .create(
            &PostParams::default(),
            &resource(&env, &pool, "second", spec(3)),
        )
        .await
        .unwrap();
    let second = env
        .wait_for("second", "the conflict", |o| {
            ready(o).is_some_and(|r| r.1 == "ConcurrencyLimitConflict")
        })
        .await;
    let (_, _, message) = ready(&second).unwrap();
    assert!(
        message.contains("first"),
        "names the other resource: {message}"
    );
    assert_eq!(
        kstatus_of(&second),
        "Failed",
        "stalled until a spec changes"
    );
    assert_eq!(read_limit().await.1["limit"], json!(2));

    // Agreeing settings: attached to the same limit, not its creator.
    env.api
        .patch(
            "second",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec(2)})),
        )
        .await
        .unwrap();
    let second = env.wait_for("second", "second ready", is_ready).await;
    let status = second.status.unwrap();
    let record = status.global_concurrency_limit.unwrap();
    assert!(!record.created);
    assert_eq!(record.id, limit["id"].as_str().unwrap());
    let second_id = status.deployment_id.unwrap();

    // The creator goes while "second" still names the limit: the limit stays, and
    // "second" stays attached to it.
    env.api
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("first").await;
    let (code, after) = read_limit().await;
    assert_eq!((code, &after["id"]), (200, &limit["id"]));
    let (_, d) = env.prefect_get(&format!("/deployments/{second_id}")).await;
    assert_eq!(d["global_concurrency_limit"]["id"], limit["id"]);

    // "second" did not create it: its deletion leaves the limit too.
    env.api
        .delete("second", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("second").await;
    assert_eq!(read_limit().await.0, 200);
    let url = format!("{}/v2/concurrency_limits/{limit_name}", env.prefect.url);
    support::prefect_call(&env.raw, reqwest::Method::DELETE, &url, None).await;
}

/// One deployment, one resource: a second resource naming the same deployment does not
/// take it over, not even with adoptExisting, and one whose status records it (taken
/// over before the operator checked this) stops writing to it. Two writers would undo
/// each other's changes on every pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_is_managed_by_one_resource() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let shared = unique("shared");
    let spec = |description: &str| {
        json!({"adoptExisting": true, "deployment": {"name": shared,
            "entrypoint": "flows/s.py:shared", "description": description}})
    };
    let first = env.create_ready(&pool, "first", spec("first's")).await;
    let first_status = first.status.clone().unwrap();
    let id = first_status.deployment_id.clone().unwrap();
    let path = format!("/deployments/{id}");
    let (_, before) = env.prefect_get(&path).await;
    let holder = format!("{}/first", env.ns);

    env.api
        .create(
            &PostParams::default(),
            &resource(&env, &pool, "second", spec("second's")),
        )
        .await
        .unwrap();
    let (_, message) = env.wait_for_reason("second", "Conflict").await;
    assert!(message.contains(&holder), "names the holder: {message}");
    let (_, after) = env.prefect_get(&path).await;
    assert_eq!(after["description"], "first's");
    assert_eq!(after["updated"], before["updated"], "second wrote nothing");
    // `diff --from-cluster` plans as the controller does: the conflict, not an update,
    // for second's manifest, and for one not applied yet.
    for name in ["second", "third"] {
        let mut manifest = serde_json::to_value(resource(&env, &pool, name, spec(name))).unwrap();
        manifest["metadata"]["namespace"] = json!(env.ns);
        let (code, out) = env.diff_from_cluster(&manifest.to_string());
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!(
                "conflict: Prefect deployment {id} is managed by PrefectDeployment {holder}"
            )),
            "{name}: {out}"
        );
    }

    // "second" records the deployment as if it had taken it over, with an automation
    // it made for it: its next pass stops instead of writing its description over
    // first's, and lets go of the deployment, deleting that automation (else each
    // trigger would start two runs).
    let automation = json!({
        "name": "second's trigger", "enabled": true,
        "trigger": {"type": "event", "posture": "Reactive", "expect": ["x.y"],
            "threshold": 1, "within": 0},
        "actions": [{"type": "run-deployment", "source": "selected", "deployment_id": id}],
        "owner_resource": format!("prefect.deployment.{id}"),
    });
    let url = format!("{}/automations/", env.prefect.url);
    let (code, made) =
        support::prefect_call(&env.raw, reqwest::Method::POST, &url, Some(&automation)).await;
    assert_eq!(code, 201, "{made}");
    let seconds_automation = made["id"].as_str().unwrap().to_string();
    let second = env.api.get("second").await.unwrap();
    let generation = second.metadata.generation.unwrap();
    let claim = json!({"status": {
        "deploymentId": id,
        "flowId": first_status.flow_id,
        "automationIds": [seconds_automation],
        "observedGeneration": generation,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Synced",
            "message": "recorded by hand", "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": generation}],
    }});
    // Written as the operator writes status (an earlier version of it made the claim),
    // so its later writes may drop what it no longer records.
    let claim = json!({"apiVersion": "prefect.io/v1", "kind": "PrefectDeployment",
        "status": claim["status"]});
    env.api
        .patch_status(
            "second",
            &PatchParams::apply("prefect-operator").force(),
            &Patch::Apply(claim),
        )
        .await
        .unwrap();
    let (_, message) = env.wait_for_reason("second", "Conflict").await;
    assert!(message.contains(&holder), "names the holder: {message}");
    let second = env
        .wait_for("second", "second lets go", |o| {
            o.status.as_ref().is_some_and(|s| s.deployment_id.is_none())
        })
        .await;
    assert_eq!(second.status.unwrap().automation_ids, None);
    let automation_path = format!("/automations/{seconds_automation}");
    assert_eq!(env.prefect_get(&automation_path).await.0, 404);
    let first = env.reconcile_now("first", "after-the-claim").await;
    assert!(is_ready(&first), "first keeps it: {:?}", first.status);
    let (_, after) = env.prefect_get(&path).await;
    assert_eq!(after["description"], "first's");
    assert_eq!(after["updated"], before["updated"], "nobody wrote to it");

    // Once "first" and its deployment are gone, "second" makes its own (woken by the
    // deletion, not left to its backoff).
    env.api
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("first").await;
    assert_eq!(env.prefect_get(&path).await.0, 404);
    let second = env.wait_for("second", "second ready", is_ready).await;
    let own = second.status.unwrap().deployment_id.unwrap();
    assert_ne!(own, id);
    let (_, made) = env.prefect_get(&format!("/deployments/{own}")).await;
    assert_eq!(made["description"], "second's");
    env.api
        .delete("second", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("second").await;
}

/// An operator with `resync` between drift checks, and resource `name` with `spec`
/// created against a Prefect server of `version` (started for the test).
async fn on_version(
    resync: Duration,
    version: &str,
    name: &str,
    spec: Value,
) -> (Env, PrefectServer) {
    let (env, _) = Env::new(resync).await;
    let server = PrefectServer::start_version(version);
    let pool = support::create_pool(&server);
    let mut pd = resource(&env, &pool, name, spec);
    pd.spec.server.remote_api_url = Some(server.url.clone());
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    (env, server)
}

/// Against a Prefect 3.1 server: the deployment is applied without the fields 3.1
/// refuses, the resource says which settings that server cannot hold (condition and
/// Event), and a drift check afterwards writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_prefect_server_gets_what_it_can_hold() {
    let name = "on-3-1";
    let (env, older) = on_version(
        Duration::from_secs(300),
        "3.1.15",
        name,
        json!({"deployment": {
            "entrypoint": "flows/o.py:older",
            "versionInfo": {"type": "git", "version": "abc"},
            "globalConcurrencyLimit": {"name": unique("limit"), "limit": 2},
            "schedules": [
                {"slug": "hourly", "interval": 3600, "parameters": {"x": 1}},
                {"slug": "daily", "cron": "0 6 * * *"},
            ],
        }}),
    )
    .await;
    let obj = env.wait_for(name, "ready", is_ready).await;
    let (_, _, message) = ready(&obj).unwrap();
    for lost in [
        "Prefect 3.1.15 cannot hold",
        "versionInfo",
        "schedules[].parameters",
        "globalConcurrencyLimit",
    ] {
        assert!(message.contains(lost), "{lost} not named: {message}");
    }
    assert!(env
        .events(name)
        .iter()
        .any(|e| e.0 == "Warning" && e.1 == "UnsupportedByServer" && e.2.contains("versionInfo")));
    let id = obj.status.unwrap().deployment_id.unwrap();
    let url = format!("{}/deployments/{id}", older.url);
    let (code, d) = support::prefect_get(&env.raw, &url).await;
    assert_eq!(code, 200);
    assert_eq!(d["schedules"].as_array().unwrap().len(), 2);
    assert_eq!(d["global_concurrency_limit"]["limit"], json!(2));

    // A drift check finds everything in place: no write to Prefect.
    let writes = env.ctx.calls.writes();
    env.reconcile_now(name, "check").await;
    assert_eq!(env.ctx.calls.writes(), writes);
}

/// With an hour between drift checks, an edit and a deletion made in Prefect are
/// repaired at once: Prefect's event stream triggers the pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_in_prefect_are_repaired_from_its_event_stream() {
    let (env, pool) = Env::new(Duration::from_secs(3600)).await;
    let name = "event-driven";
    let spec = json!({"deployment": {"entrypoint": "flows/e.py:events", "description": "declared",
        "schedules": [{"slug": "hourly", "interval": 3600}]}});
    let obj = env.create_ready(&pool, name, spec).await;
    let id = obj.status.unwrap().deployment_id.unwrap();
    env.wait_for_stream().await;
    // The passes read the server's version before the stream connected; once it
    // delivers, the stream reads it once more, and from then on each probe that comes
    // back keeps that read (instead of a read every ten minutes).
    let versions = || env.ctx.calls.count("GET", "admin_version");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while versions() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream did not read the version"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Edited in Prefect: put back without waiting for the resync.
    let url = format!("{}/deployments/{id}", env.prefect.url);
    let body = json!({"description": "by hand", "paused": true});
    let (code, _) =
        support::prefect_call(&env.raw, reqwest::Method::PATCH, &url, Some(&body)).await;
    assert_eq!(code, 204);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, d) = env.prefect_get(&format!("/deployments/{id}")).await;
        if d["description"] == json!("declared") && d["paused"] == json!(false) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edit was not repaired: {d}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Deleted in Prefect: created again.
    let (code, _) = support::prefect_call(&env.raw, reqwest::Method::DELETE, &url, None).await;
    assert_eq!(code, 204);
    let obj = env
        .wait_for(name, "a new deployment", |o| {
            o.status
                .as_ref()
                .and_then(|s| s.deployment_id.as_deref())
                .is_some_and(|d| d != id)
        })
        .await;
    let new_id = obj.status.unwrap().deployment_id.unwrap();
    let (code, d) = env.prefect_get(&format!("/deployments/{new_id}")).await;
    assert_eq!(code, 200);
    assert_eq!(d["description"], json!("declared"));
    assert_eq!(versions(), 2, "the version was read again");
}

/// With an hour between drift checks, a trigger automation deleted or edited in Prefect
/// is put back at once (Prefect's event stream triggers the pass), the others are left
/// as they are, and the resource says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automations_changed_in_prefect_are_restored_from_its_event_stream() {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    let (env, pool) = Env::new(Duration::from_secs(3600)).await;
    let name = "automation-events";
    let spec = json!({"deployment": {"entrypoint": "flows/a.py:autos", "triggers": [
        {"name": "on-done", "expect": ["prefect.flow-run.Completed"]},
        {"name": "on-fail", "expect": ["prefect.flow-run.Failed"]}]}});
    let obj = env.create_ready(&pool, name, spec).await;
    let status = obj.status.unwrap();
    let id = status.deployment_id.unwrap();
    let first = status.automation_ids.unwrap();
    assert_eq!(first.len(), 2);
    env.wait_for_stream().await;
    let env = &env;
    let automation =
        |aid: String| async move { env.prefect_get(&format!("/automations/{aid}")).await };
    let ids_of = |o: &PrefectDeployment| {
        o.status
            .as_ref()
            .and_then(|s| s.automation_ids.clone())
            .unwrap_or_default()
    };

    // Status's automation ids once the one at `i` is no longer `old`.
    let replaced = |i: usize, old: String, what: &'static str| async move {
        let obj = env
            .wait_for(name, what, |o| {
                let ids = ids_of(o);
                ids.len() == 2 && ids[i] != old
            })
            .await;
        ids_of(&obj)
    };

    // Deleted in Prefect: made again; the other one is kept as it is.
    let url = format!("{}/automations/{}", env.prefect.url, first[0]);
    let (code, _) = support::prefect_call(&env.raw, reqwest::Method::DELETE, &url, None).await;
    assert_eq!(code, 204);
    let second = replaced(0, first[0].clone(), "the deleted automation made again").await;
    assert_eq!(second[1], first[1], "the untouched automation was replaced");
    let (code, a) = automation(second[0].clone()).await;
    assert_eq!(code, 200);
    assert_eq!(a["name"], "on-done");
    assert_eq!(a["enabled"], true);
    assert_eq!(a["actions"][0]["deployment_id"], json!(id));

    // Switched off in Prefect: made again as the spec says, the edited one deleted.
    let url = format!("{}/automations/{}", env.prefect.url, second[1]);
    let body = json!({"enabled": false});
    let (code, _) =
        support::prefect_call(&env.raw, reqwest::Method::PATCH, &url, Some(&body)).await;
    assert_eq!(code, 204);
    let third = replaced(1, second[1].clone(), "the edited automation made again").await;
    assert_eq!(third[0], second[0]);
    let (code, a) = automation(third[1].clone()).await;
    assert_eq!(code, 200);
    assert_eq!(
        (a["name"].as_str(), a["enabled"].as_bool()),
        (Some("on-fail"), Some(true))
    );
    assert_eq!(automation(second[1].clone()).await.0, 404);
    // Exactly the two recorded automations run the deployment: nothing doubled.
    let (_, related) = env
        .prefect_get(&format!("/automations/related-to/prefect.deployment.{id}"))
        .await;
    let mut running: Vec<String> = related
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    running.sort();
    let mut want = third.clone();
    want.sort();
    assert_eq!(running, want);

    let notes: Vec<String> = Api::<K8sEvent>::namespaced(env.kube.clone(), &env.ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("AutomationsRestored"))
        .filter_map(|e| e.note)
        .collect();
    assert!(
        notes.iter().any(|n| n.ends_with(": on-done"))
            && notes.iter().any(|n| n.ends_with(": on-fail")),
        "{notes:?}"
    );
}

/// Where no event stream reports automation changes (Prefect before 3.7 announces none),
/// the drift check reads the resource's automations itself: one deleted in Prefect is
/// back within an interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automations_are_checked_on_the_resync_without_a_stream() {
    let name = "no-stream";
    let (env, older) = on_version(
        Duration::from_secs(10),
        "3.4.25",
        name,
        json!({"deployment": {"entrypoint": "flows/n.py:nostream",
            "triggers": [{"expect": ["prefect.flow-run.Completed"]}]}}),
    )
    .await;
    let obj = env.wait_for(name, "ready", is_ready).await;
    let first = obj.status.unwrap().automation_ids.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(env.ctx.metrics.event_streams.get(), 0);

    let a = delete_and_see_it_made_again(&env, name, &older.url, &first[0]).await;
    assert_eq!(
        a["trigger"]["expect"],
        json!(["prefect.flow-run.Completed"])
    );
    // 3.4 cannot filter automations by id: asked once, then each check reads its own.
    assert!(env.ctx.calls.count("POST", "automations_filter") <= 1);
    assert!(env.ctx.calls.count("GET", "automations_related_to") >= 1);
}

/// An event recorder writing into a namespace of its own.
async fn event_recorder() -> (
    kube::Client,
    String,
    prefect_operator::reconcile::events::Recorder,
) {
    let kube = ControlPlane::shared().client().await;
    let ns = new_namespace(&kube).await;
    let recorder =
        prefect_operator::reconcile::events::Recorder::new(kube.clone(), "prefect-operator");
    (kube, ns, recorder)
}

/// A reference to a PrefectDeployment, as events carry it.
fn regarding(ns: &str, name: &str, uid: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("prefect.io/v1".into()),
        kind: Some("PrefectDeployment".into()),
        namespace: Some(ns.into()),
        name: Some(name.into()),
        uid: Some(uid.into()),
        ..Default::default()
    }
}

/// The Event API's limits hold for any resource: a name of 253 characters (the most
/// Kubernetes allows) and a note of 1000 characters of three bytes each (the API counts
/// at most 1024 bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_about_long_names_and_long_texts_are_accepted() {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use prefect_operator::reconcile::events::{Event, EventType};
    let (kube, ns, recorder) = event_recorder().await;
    let name = "a".repeat(253);
    let about = regarding(&ns, &name, "0b0e3c1a-0000-4000-8000-000000000002");
    let note = "数".repeat(1000);
    let ev = Event {
        type_: EventType::Warning,
        reason: "InvalidSpec",
        note: &note,
        action: "Sync",
    };
    recorder.publish(&ev, &about).await.unwrap();
    // Again: the same event's series.
    recorder.publish(&ev, &about).await.unwrap();
    let events = Api::<K8sEvent>::namespaced(kube.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(e.regarding.as_ref().unwrap().name.as_deref(), Some(&*name));
    let kept = e.note.clone().unwrap();
    assert!(kept.len() <= 1024 && kept.starts_with("数数数"), "{kept}");
    assert!(kept.ends_with('…'), "{kept}");
}

/// A repeat of an event on the same object adds to the first one's series instead of
/// adding an object; a changed message is an event of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_events_form_a_series() {
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use prefect_operator::reconcile::events::{Event, EventType};
    let cp = ControlPlane::shared();
    let (kube, ns, recorder) = event_recorder().await;
    let about = |rv: &str| ObjectReference {
        resource_version: Some(rv.into()),
        ..regarding(&ns, "etl", "0b0e3c1a-0000-4000-8000-000000000001")
    };
    let ev = |note| Event {
        type_: EventType::Warning,
        reason: "PrefectUnreachable",
        note,
        action: "Sync",
    };
    recorder.publish(&ev("down"), &about("1")).await.unwrap();
    // The object's version moved (a status write), the event is the same.
    recorder.publish(&ev("down"), &about("2")).await.unwrap();
    recorder.publish(&ev("down"), &about("3")).await.unwrap();
    recorder.publish(&ev("refused"), &about("4")).await.unwrap();

    let events = Api::<K8sEvent>::namespaced(kube.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    let mut seen: Vec<(String, i32, String)> = events
        .iter()
        .map(|e| {
            (
                e.note.clone().unwrap_or_default(),
                e.series.as_ref().map_or(1, |s| s.count),
                e.regarding
                    .as_ref()
                    .and_then(|r| r.name.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("down".to_string(), 3, "etl".to_string()),
            ("refused".to_string(), 1, "etl".to_string())
        ]
    );
    // kubectl shows the series count.
    let out = cp.kubectl_ok(&["get", "events", "-n", &ns, "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let down = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["message"] == "down")
        .expect("the repeated event");
    assert_eq!(down["series"]["count"], json!(3), "{down}");
    assert_eq!(down["type"], json!("Warning"));
    assert_eq!(down["reason"], json!("PrefectUnreachable"));
}

/// A spec may name a server that accepts connections and never answers. Its passes
/// take turns (at most three of the four workers here: one trying it, two turns), so
/// resources on a server that answers are applied meanwhile, and the waiting ones say
/// what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_does_not_hold_up_the_others() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let spec = |f: &str| json!({"deployment": {"entrypoint": format!("flows/s.py:{f}")}});
    env.create_ready(&pool, "before", spec("before")).await;
    // Connections complete in the kernel's backlog; nothing ever reads or answers them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}/api", silent.local_addr().unwrap());
    for i in 0..6 {
        let mut pd = resource(&env, &pool, &format!("silent-{i}"), spec("silent"));
        pd.spec.server.remote_api_url = Some(silent_url.clone());
        env.api.create(&PostParams::default(), &pd).await.unwrap();
    }
    for i in 0..6 {
        env.wait_for(&format!("silent-{i}"), "a pass started", |o| {
            o.finalizers()
                .iter()
                .any(|f| f == "prefect.io/deployment-cleanup")
        })
        .await;
    }
    // Without turns the silent server's passes would hold all four workers for minutes
    // (longer than `create_ready` waits).
    env.create_ready(&pool, "after", spec("after")).await;
    // The silent ones say why they are not Ready: no answer, with the server named. The
    // two holding turns wait out a request timeout first; the others are told at once.
    let address = silent.local_addr().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut told = 0;
        for i in 0..6 {
            let o = env.api.get(&format!("silent-{i}")).await.unwrap();
            assert!(!is_ready(&o), "silent-{i} is Ready");
            if let Some((status, reason, message)) = ready(&o) {
                if reason == "PrefectUnreachable" {
                    assert_eq!(status, "False");
                    assert!(message.contains(&address), "{message}");
                    told += 1;
                }
            }
        }
        if told >= 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {told} of the silent server's resources say why"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(silent);
}

/// A server started with its event stream switched off accepts a subscription and
/// never delivers. The operator reads that setting, does not count the stream as up,
/// says so in `prefect_operator_event_streams_down`, and reads automations on each
/// drift check instead: one deleted in Prefect is made again within an interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_event_stream_is_switched_off_is_checked_on_the_resync() {
    let (env, _) = Env::new(Duration::from_secs(10)).await;
    let off = PrefectServer::start_with_settings(&[(
        "PREFECT_SERVER_EVENTS_STREAM_OUT_ENABLED",
        "false",
    )]);
    let pool = support::create_pool(&off);
    let first = ready_with_a_trigger_on(&env, &pool, "stream-off", &off.url).await;
    // The stream's task reads the setting on its own; wait for that read.
    wait_for_call(
        &env,
        "GET",
        "admin_settings",
        "the server's settings were not read",
    )
    .await;
    checked_on_the_resync(&env, "stream-off", &off.url, &first).await;
}

/// Two API replicas on one database with no message broker between them, behind one
/// address: the event stream reaches one replica and everything else the other, so the
/// stream connects and authenticates but never delivers. The operator does not count it
/// as up (the probe event it posts never comes back) and reads automations on each drift
/// check instead: one deleted in Prefect is made again within an interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_delivers_nothing_is_not_trusted() {
    let (env, _) = Env::new(Duration::from_secs(10)).await;
    let db = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite+aiosqlite:///{}",
        db.path().join("prefect.db").display()
    );
    let api = PrefectServer::start_on_database(None, &url, &[]);
    let stream = PrefectServer::start_on_database(None, &url, &[]);
    let front = support::SplitFront::start(&api, &stream);
    let pool = support::create_pool(&api);
    let first = ready_with_a_trigger_on(&env, &pool, "stream-deaf", &front.url).await;
    // The stream's task posts its probe on its own; wait for that.
    wait_for_call(&env, "POST", "events", "no probe event was posted").await;
    checked_on_the_resync(&env, "stream-deaf", &api.url, &first).await;
}

/// An automation deleted in Prefect while the event stream was away is made again on the
/// first drift check after the stream is back: a server that keeps no events replays
/// nothing to the new subscription, so what the resource knew from before the drop is
/// read again (once) instead of being taken as covered by the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automations_changed_while_the_stream_was_away_are_read_once_it_is_back() {
    let resync = Duration::from_secs(20);
    let (env, pool) = Env::new(resync).await;
    let gate = support::StreamGate::start(env.prefect);
    let name = "stream-away";
    let first = ready_with_a_trigger_on(&env, &pool, name, &gate.url).await;
    env.wait_for_stream().await;
    // Right after a drift check (it reads the deployments in bulk), so the next one is
    // an interval away and comes after the stream is back.
    let reads = env.ctx.calls.count("POST", "deployments_filter");
    let deadline = tokio::time::Instant::now() + resync * 2;
    while env.ctx.calls.count("POST", "deployments_filter") == reads {
        assert!(tokio::time::Instant::now() < deadline, "no drift check ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.ctx.calls.count("POST", "automations_filter"), 0);
    gate.cut();
    wait_for_streams(&env, 0, "the cut stream still counts as up").await;
    delete_automation(&env, &env.prefect.url, &first).await;
    gate.restore();
    wait_for_streams(&env, 1, "the stream did not come back").await;
    made_again(&env, name, &env.prefect.url, &first).await;
    // Found by the drift check's bulk read of the automations, with the stream up.
    assert_eq!(env.ctx.calls.count("POST", "automations_filter"), 1);
    assert_eq!(env.ctx.metrics.event_streams.get(), 1);
}

/// Waits (30 s at most) until `n` event streams count as up.
async fn wait_for_streams(env: &Env, n: i64, failure: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.ctx.metrics.event_streams.get() != n {
        assert!(tokio::time::Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The one server's stream counts as down, and automation `first` of resource `name`,
/// deleted through the API at `base`, is made again by a drift check's bulk read.
async fn checked_on_the_resync(env: &Env, name: &str, base: &str, first: &str) {
    assert_eq!(env.ctx.metrics.event_streams.get(), 0);
    assert_eq!(env.ctx.metrics.event_streams_down.get(), 1);
    delete_and_see_it_made_again(env, name, base, first).await;
    assert!(
        env.ctx.calls.count("POST", "automations_filter") >= 1,
        "the checks used the bulk read"
    );
    assert_eq!(env.ctx.metrics.event_streams.get(), 0);
}

/// Creates resource `name` with one trigger, on the Prefect server at `url` (its work
/// pool `pool` there), waits until it is Ready and returns its automation's id.
async fn ready_with_a_trigger_on(env: &Env, pool: &str, name: &str, url: &str) -> String {
    let mut pd = resource(
        env,
        pool,
        name,
        json!({"deployment": {"entrypoint": format!("flows/{name}.py:main"),
            "triggers": [{"expect": ["prefect.flow-run.Completed"]}]}}),
    );
    pd.spec.server.remote_api_url = Some(url.to_string());
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env.wait_for(name, "ready", is_ready).await;
    let ids = obj.status.unwrap().automation_ids.unwrap();
    assert_eq!(ids.len(), 1);
    ids[0].clone()
}

/// Waits (30 s at most) until the operator has made request `method endpoint` once.
async fn wait_for_call(env: &Env, method: &str, endpoint: &'static str, failure: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.ctx.calls.count(method, endpoint) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes automation `old` of resource `name` through the API of the server at `base`,
/// waits until the resource records a new one in its place, and returns it as Prefect
/// has it.
async fn delete_and_see_it_made_again(env: &Env, name: &str, base: &str, old: &str) -> Value {
    delete_automation(env, base, old).await;
    made_again(env, name, base, old).await
}

/// Deletes automation `old` through the API of the server at `base`.
async fn delete_automation(env: &Env, base: &str, old: &str) {
    let url = format!("{base}/automations/{old}");
    let (code, _) = support::prefect_call(&env.raw, reqwest::Method::DELETE, &url, None).await;
    assert_eq!(code, 204);
}

/// Waits until resource `name` records a new automation in place of the deleted `old`,
/// and returns it as the server at `base` has it.
async fn made_again(env: &Env, name: &str, base: &str, old: &str) -> Value {
    let obj = env
        .wait_for(name, "the deleted automation made again", |o| {
            o.status
                .as_ref()
                .and_then(|s| s.automation_ids.clone())
                .is_some_and(|ids| ids.len() == 1 && ids[0] != old)
        })
        .await;
    let now = obj.status.unwrap().automation_ids.unwrap();
    let (code, a) = support::prefect_get(&env.raw, &format!("{base}/automations/{}", now[0])).await;
    assert_eq!(code, 200);
    a
}

/// The deployment, automation and named limit a resource `made` on server `old` (their
/// ids) are all gone there.
async fn gone_from(env: &Env, old: &PrefectServer, made: &(String, String, String)) {
    let (id, automation, limit) = made;
    for path in [
        format!("/deployments/{id}"),
        format!("/automations/{automation}"),
        format!("/v2/concurrency_limits/{limit}"),
    ] {
        assert_eq!(env.code_on(old, &path).await, 404, "{path}");
    }
}

/// Pointing spec.server at another Prefect server moves the deployment: it is made on
/// the new server and the one on the old server is deleted with its automations, so
/// two servers never run the same schedules. An old server that does not answer keeps
/// its deployment listed in status (`pendingDeletions`, said in the Ready message)
/// until it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_server_takes_the_deployment_over_from_the_old_one() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let old = PrefectServer::start(None);
    support::create_pool_named(&old, &pool);
    let gate = support::StreamGate::whole(&old);
    // Each with a named limit of its own, which it creates and so takes along.
    let on_old = |name: &str| {
        let mut pd = resource(
            &env,
            &pool,
            name,
            json!({"deployment": {"entrypoint": format!("flows/{name}.py:main"),
                "triggers": [{"expect": ["prefect.flow-run.Completed"]}],
                "globalConcurrencyLimit": {"name": unique(name), "limit": 2}}}),
        );
        pd.spec.server.remote_api_url = Some(gate.url.clone());
        pd
    };
    let mut made = Vec::new();
    for name in ["moved", "moved-later"] {
        env.api
            .create(&PostParams::default(), &on_old(name))
            .await
            .unwrap();
        let obj = env
            .wait_for(name, "ready on the old server", is_ready)
            .await;
        let status = obj.status.unwrap();
        assert_eq!(status.server.as_deref(), Some(gate.url.as_str()));
        let limit = status.global_concurrency_limit.unwrap();
        assert!(limit.created);
        made.push((
            status.deployment_id.unwrap(),
            status.automation_ids.unwrap()[0].clone(),
            limit.id,
        ));
    }
    let to_new = json!({"spec": {"server": {"remoteApiUrl": env.prefect.url}}});
    let move_to_new = |name: &'static str| {
        let patch = to_new.clone();
        let api = env.api.clone();
        async move {
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .unwrap();
        }
    };
    let moved_to_new = |o: &PrefectDeployment| {
        is_ready(o) && o.status.as_ref().and_then(|s| s.server.as_deref()) == Some(&env.prefect.url)
    };

    // The old server answers: its deployment and automation go at once.
    move_to_new("moved").await;
    let obj = env
        .wait_for("moved", "ready on the new server", moved_to_new)
        .await;
    let status = obj.status.unwrap();
    let old_id = &made[0].0;
    let new_id = status.deployment_id.clone().unwrap();
    let new_limit = status.global_concurrency_limit.clone().unwrap();
    assert!(new_limit.created);
    assert_eq!(
        env.prefect_get(&format!("/v2/concurrency_limits/{}", new_limit.id))
            .await
            .0,
        200
    );
    assert_ne!(&new_id, old_id);
    assert_eq!(
        env.prefect_get(&format!("/deployments/{new_id}")).await.0,
        200
    );
    let new_automation = &status.automation_ids.unwrap()[0];
    assert_eq!(
        env.prefect_get(&format!("/automations/{new_automation}"))
            .await
            .0,
        200
    );
    assert_eq!(status.pending_deletions, None);
    gone_from(&env, &old, &made[0]).await;
    assert!(env.events("moved").iter().any(|e| e.1 == "Deleted"
        && e.2.contains(old_id.as_str())
        && e.2.contains("global concurrency limit")
        && e.2.contains("spec.server named before")));

    // `diff --from-cluster` says what the move will delete.
    let mut manifest = serde_json::to_value(on_old("moved-later")).unwrap();
    manifest["metadata"]["namespace"] = json!(env.ns);
    manifest["spec"]["server"]["remoteApiUrl"] = json!(env.prefect.url);
    let (code, out) = env.diff_from_cluster(&manifest.to_string());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "status records deployment {} on {}",
            made[1].0, gate.url
        )) && out.contains("global concurrency limit"),
        "{out}"
    );

    // The old server is down: the deployment still moves, and the old one waits.
    gate.cut();
    move_to_new("moved-later").await;
    let obj = env
        .wait_for("moved-later", "ready on the new server", moved_to_new)
        .await;
    let (old_id, _, old_limit) = &made[1];
    let (_, _, message) = ready(&obj).unwrap();
    assert!(
        message.contains("not deleted yet") && message.contains(old_id.as_str()),
        "{message}"
    );
    let pending = obj.status.unwrap().pending_deletions.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (&pending[0].deployment_id, &pending[0].server),
        (old_id, &gate.url)
    );
    assert_eq!(
        pending[0].limit.as_ref().map(|l| &l.id),
        Some(old_limit),
        "the limit it made there waits with it"
    );
    assert!(env
        .events("moved-later")
        .iter()
        .any(|e| e.0 == "Warning" && e.1 == "CleanupPending"));
    assert_eq!(
        env.code_on(&old, &format!("/deployments/{old_id}")).await,
        200
    );

    // Back up: the next pass deletes it.
    gate.restore();
    env.reconcile_now("moved-later", "old-server-back").await;
    let obj = env
        .wait_for("moved-later", "the old deployment deleted", |o| {
            o.status
                .as_ref()
                .is_some_and(|s| s.pending_deletions.is_none())
        })
        .await;
    assert!(is_ready(&obj));
    let (_, _, message) = ready(&obj).unwrap();
    assert!(!message.contains("not deleted yet"), "{message}");
    gone_from(&env, &old, &made[1]).await;

    // Another URL of the same server (here a second front to it): the deployment found
    // there is the one recorded, so it is kept, not deleted as the old server's.
    let alias = support::StreamGate::whole(env.prefect);
    let to_alias = json!({"spec": {"server": {"remoteApiUrl": alias.url}}});
    env.api
        .patch("moved", &PatchParams::default(), &Patch::Merge(to_alias))
        .await
        .unwrap();
    let obj = env
        .wait_for("moved", "ready through the alias", |o| {
            is_ready(o) && o.status.as_ref().and_then(|s| s.server.as_deref()) == Some(&alias.url)
        })
        .await;
    let status = obj.status.unwrap();
    assert_eq!(status.deployment_id.as_deref(), Some(new_id.as_str()));
    assert_eq!(status.pending_deletions, None);
    // Its automation is taken as it is, not made a second time.
    assert_eq!(status.automation_ids, Some(vec![new_automation.clone()]));
    assert_eq!(
        env.prefect_get(&format!("/deployments/{new_id}")).await.0,
        200
    );
    assert_eq!(
        env.prefect_get(&format!("/automations/{new_automation}"))
            .await
            .0,
        200
    );
    assert_eq!(
        env.prefect_get(&format!("/v2/concurrency_limits/{}", new_limit.id))
            .await
            .0,
        200,
        "its limit stays too"
    );

    env.delete_all(&["moved", "moved-later"]).await;
}

/// An old server that is gone for good: removing its entry from
/// `status.pendingDeletions` (the README's way out) makes the operator give up on it.
/// The entry does not come back, the resource reads as plainly Ready, and deleting the
/// resource no longer waits for that server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_deletion_removed_from_status_is_given_up() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let old = PrefectServer::start(None);
    support::create_pool_named(&old, &pool);
    let gate = support::StreamGate::whole(&old);
    let name = "abandoned";
    let mut pd = resource(
        &env,
        &pool,
        name,
        json!({"deployment": {"entrypoint": "flows/abandoned.py:main"}}),
    );
    pd.spec.server.remote_api_url = Some(gate.url.clone());
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env
        .wait_for(name, "ready on the old server", is_ready)
        .await;
    let old_id = obj.status.unwrap().deployment_id.unwrap();

    // The old server goes away for good, then the resource moves.
    gate.cut();
    let to_new = json!({"spec": {"server": {"remoteApiUrl": env.prefect.url}}});
    env.api
        .patch(name, &PatchParams::default(), &Patch::Merge(to_new))
        .await
        .unwrap();
    let obj = env
        .wait_for(name, "moved with the old one pending", |o| {
            is_ready(o)
                && o.status
                    .as_ref()
                    .is_some_and(|s| s.pending_deletions.is_some())
        })
        .await;
    let new_id = obj.status.unwrap().deployment_id.unwrap();

    env.cp.kubectl_ok(&[
        "patch",
        "pd",
        name,
        "-n",
        &env.ns,
        "--subresource=status",
        "--type=json",
        "-p",
        r#"[{"op": "remove", "path": "/status/pendingDeletions"}]"#,
    ]);
    for token in ["given-up", "given-up-again"] {
        let obj = env.reconcile_now(name, token).await;
        let status = obj.status.as_ref().unwrap();
        assert_eq!(status.pending_deletions, None, "the entry came back");
        assert_eq!(status.deployment_id.as_deref(), Some(new_id.as_str()));
        let (ready_status, _, message) = ready(&obj).unwrap();
        assert_eq!(ready_status, "True");
        assert!(!message.contains("not deleted yet"), "{message}");
    }
    // Left in the old server for people, who said so.
    assert_eq!(
        env.code_on(&old, &format!("/deployments/{old_id}")).await,
        200
    );

    // Deleting the resource deletes the current deployment and waits for nothing else.
    env.delete_all(&[name]).await;
    assert_eq!(
        env.prefect_get(&format!("/deployments/{new_id}")).await.0,
        404
    );
}

/// Deleting a resource whose status still records its deployment on the server
/// spec.server named before (the move could not reach the new server) deletes it
/// there: the finalizer waits for the new server, then removes what is pending on the
/// old one, and nothing is left in either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_cleans_up_the_server_spec_server_named_before() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let old = PrefectServer::start(None);
    support::create_pool_named(&old, &pool);
    let new = support::StreamGate::whole(env.prefect);
    let name = "leaving";
    let mut pd = resource(
        &env,
        &pool,
        name,
        json!({"deployment": {"entrypoint": "flows/leaving.py:main",
            "triggers": [{"expect": ["prefect.flow-run.Completed"]}]}}),
    );
    pd.spec.server.remote_api_url = Some(old.url.clone());
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env
        .wait_for(name, "ready on the old server", is_ready)
        .await;
    let status = obj.status.unwrap();
    let id = status.deployment_id.unwrap();
    let automation = status.automation_ids.unwrap()[0].clone();

    // The new server does not answer: the move waits, the old deployment stays, and
    // status lists it as still to delete.
    new.cut();
    let to_new = json!({"spec": {"server": {"remoteApiUrl": new.url}}});
    env.api
        .patch(name, &PatchParams::default(), &Patch::Merge(to_new))
        .await
        .unwrap();
    let obj = env
        .wait_for(name, "the move recorded", |o| {
            o.status.as_ref().is_some_and(|s| {
                s.server.as_deref() == Some(new.url.as_str())
                    && s.pending_deletions.as_ref().is_some_and(|p| p.len() == 1)
            })
        })
        .await;
    assert_eq!(ready(&obj).unwrap().1, "PrefectUnreachable");
    let pending = &obj.status.unwrap().pending_deletions.unwrap()[0];
    assert_eq!((&pending.deployment_id, &pending.server), (&id, &old.url));
    assert_eq!(
        env.code_on(&old, &format!("/deployments/{id}")).await,
        200,
        "still running"
    );

    // Deleted meanwhile: the finalizer waits for the new server, then cleans up both.
    env.api
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    env.wait_for(name, "the cleanup waiting", |o| {
        ready(o).is_some_and(|r| r.1 == "CleanupFailed")
    })
    .await;
    assert_eq!(env.code_on(&old, &format!("/deployments/{id}")).await, 200);
    new.restore();
    // A new annotation wakes the finalizer at once instead of after its backoff.
    env.annotate(name, &[&format!("{RECONCILE_REQUESTED_AT}=server-back")]);
    env.wait_gone(name).await;
    assert_eq!(env.code_on(&old, &format!("/deployments/{id}")).await, 404);
    assert_eq!(
        env.code_on(&old, &format!("/automations/{automation}"))
            .await,
        404
    );
}

/// A stream that stays connected but goes deaf is found by its probe, and then every
/// resource that relied on it is checked at once: an automation deleted meanwhile is
/// made again then, not at the resource's next drift check (an hour away here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_gone_deaf_has_its_resources_checked_at_once() {
    let (env, _) = Env::new(Duration::from_secs(3600)).await;
    let server = PrefectServer::start(None);
    let pool = support::create_pool(&server);
    let gate = support::StreamGate::muting(&server);
    // A resource checked every 10 s has the stream probed that often (it has no
    // triggers, so its own checks read no automations). First, so that the stream
    // starts with that interval.
    let mut quick = resource(
        &env,
        &pool,
        "checked-often",
        json!({"interval": "10s", "deployment": {"entrypoint": "flows/q.py:quick"}}),
    );
    quick.spec.server.remote_api_url = Some(gate.url.clone());
    env.api
        .create(&PostParams::default(), &quick)
        .await
        .unwrap();
    env.wait_for("checked-often", "ready", is_ready).await;
    let first = ready_with_a_trigger_on(&env, &pool, "relies-on-stream", &gate.url).await;
    env.wait_for_stream().await;

    // Deaf from now on; the automation is deleted while the stream still counts as up.
    gate.cut();
    delete_automation(&env, &server.url, &first).await;
    // Found deaf within an interval and the probe's wait (30 s); then checked at once.
    let obj = env
        .wait_up_to(
            Duration::from_secs(120),
            "relies-on-stream",
            "the deleted automation made again",
            |o| {
                o.status
                    .as_ref()
                    .and_then(|s| s.automation_ids.clone())
                    .is_some_and(|ids| ids.len() == 1 && ids[0] != first)
            },
        )
        .await;
    let made = &obj.status.unwrap().automation_ids.unwrap()[0];
    let url = format!("{}/automations/{made}", server.url);
    assert_eq!(support::prefect_get(&env.raw, &url).await.0, 200);
    assert_eq!(env.ctx.metrics.event_streams.get(), 0, "the stream is down");
}

/// A rename whose old deployment the server will not delete: the new deployment is made
/// and recorded, the old one is kept in `status.pendingDeletions` (and the resource is
/// not Ready, since Prefect still runs its schedules), and the first pass once the
/// server deletes again removes it. Nothing is forgotten in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_keeps_the_old_deployment_pending_until_it_is_deleted() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let proxy = support::CountingProxy::start(env.prefect);
    let mut pd = resource(
        &env,
        &pool,
        "renamed",
        json!({"deployment": {"name": unique("before"), "entrypoint": "flows/renamed.py:main"}}),
    );
    pd.spec.server.remote_api_url = Some(proxy.url.clone());
    env.api.create(&PostParams::default(), &pd).await.unwrap();
    let obj = env.wait_for("renamed", "ready", is_ready).await;
    let old_id = obj.status.unwrap().deployment_id.unwrap();

    proxy.refuse("DELETE /api/deployments/");
    let rename = json!({"spec": {"deployment": {"name": unique("after")}}});
    env.api
        .patch("renamed", &PatchParams::default(), &Patch::Merge(rename))
        .await
        .unwrap();
    let obj = env
        .wait_for(
            "renamed",
            "the new deployment made, the old one pending",
            |o| {
                let Some(s) = &o.status else { return false };
                ready(o).is_some_and(|r| r.0 == "False")
                    && s.deployment_id.as_ref().is_some_and(|id| *id != old_id)
                    && s.pending_deletions.is_some()
            },
        )
        .await;
    let status = obj.status.unwrap();
    let new_id = status.deployment_id.unwrap();
    let pending = status.pending_deletions.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (&pending[0].deployment_id, &pending[0].server),
        (&old_id, &proxy.url)
    );
    for id in [&old_id, &new_id] {
        assert_eq!(env.prefect_get(&format!("/deployments/{id}")).await.0, 200);
    }

    proxy.allow();
    env.reconcile_now("renamed", "deletes-again").await;
    let obj = env
        .wait_for("renamed", "the old deployment deleted", |o| {
            is_ready(o)
                && o.status
                    .as_ref()
                    .is_some_and(|s| s.pending_deletions.is_none())
        })
        .await;
    let status = obj.status.unwrap();
    assert_eq!(status.deployment_id.as_deref(), Some(new_id.as_str()));
    assert_eq!(
        env.prefect_get(&format!("/deployments/{old_id}")).await.0,
        404
    );
    assert_eq!(
        env.prefect_get(&format!("/deployments/{new_id}")).await.0,
        200
    );
    assert!(env
        .events("renamed")
        .iter()
        .any(|e| e.1 == "Deleted" && e.2.contains(old_id.as_str())));

    env.api
        .delete("renamed", &DeleteParams::default())
        .await
        .unwrap();
    env.wait_gone("renamed").await;
    assert_eq!(
        env.prefect_get(&format!("/deployments/{new_id}")).await.0,
        404
    );
}

/// A named limit the moved resource made on the old server stays there while another
/// resource of the operator names it on that server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_another_resource_names_stays_on_the_old_server() {
    let (env, pool) = Env::new(Duration::from_secs(300)).await;
    let old = PrefectServer::start(None);
    support::create_pool_named(&old, &pool);
    let limit = unique("shared-limit");
    let mut ids = Vec::new();
    for name in ["leaves", "stays"] {
        let mut pd = resource(
            &env,
            &pool,
            name,
            json!({"deployment": {"entrypoint": format!("flows/{name}.py:main"),
                "globalConcurrencyLimit": {"name": limit, "limit": 2}}}),
        );
        pd.spec.server.remote_api_url = Some(old.url.clone());
        env.api.create(&PostParams::default(), &pd).await.unwrap();
        let status = env.wait_for(name, "ready", is_ready).await.status.unwrap();
        let record = status.global_concurrency_limit.unwrap();
        ids.push((status.deployment_id.unwrap(), record.id, record.created));
    }
    let (old_id, limit_id, created) = ids[0].clone();
    assert!(created, "the first one made the limit");
    assert_eq!(ids[1].1, limit_id, "the second attached to it");

    let to_new = json!({"spec": {"server": {"remoteApiUrl": env.prefect.url}}});
    env.api
        .patch("leaves", &PatchParams::default(), &Patch::Merge(to_new))
        .await
        .unwrap();
    env.wait_for("leaves", "moved, nothing pending", |o| {
        is_ready(o)
            && o.status.as_ref().is_some_and(|s| {
                s.server.as_deref() == Some(env.prefect.url.as_str())
                    && s.pending_deletions.is_none()
            })
    })
    .await;
    assert_eq!(
        env.code_on(&old, &format!("/deployments/{old_id}")).await,
        404
    );
    assert_eq!(
        env.code_on(&old, &format!("/v2/concurrency_limits/{limit_id}"))
            .await,
        200,
        "\"stays\" still names it there"
    );
    let events = env.events("leaves");
    assert!(
        !events
            .iter()
            .any(|e| e.1 == "Deleted" && e.2.contains("global concurrency limit")),
        "{events:?}"
    );

    env.delete_all(&["leaves", "stays"]).await;
}
