//! The Prefect side of reconciling, against a real Prefect 3.9.1 server: every client
//! call, and `sync::apply` / `sync::delete` through create, no-op, updates, drift,
//! conflicts and deletion. Assertions read Prefect back with plain HTTP.

mod support;

use std::sync::Arc;
use std::time::Duration;

use prefect_operator::api::PrefectDeploymentSpec;
use prefect_operator::prefect::{http_client, Auth, CallLog, PrefectClient};
use prefect_operator::reconcile::execute::{self, Change, SyncState};
use prefect_operator::validate::validate;
use prefect_operator::Error;
use serde_json::{json, Value};
use support::{unique, PrefectServer};

struct Env {
    url: String,
    raw: reqwest::Client,
    calls: Arc<CallLog>,
    client: PrefectClient,
}

impl Env {
    async fn new() -> Env {
        support::install_crypto();
        let server = PrefectServer::shared();
        let calls = Arc::new(CallLog::default());
        let client = PrefectClient::new(http_client(), &server.url, None, calls.clone());
        Env {
            url: server.url.clone(),
            raw: reqwest::Client::new(),
            calls,
            client,
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        support::prefect_get(&self.raw, &format!("{}{path}", self.url)).await
    }

    /// POST with plain reqwest, retrying the 503s SQLite gives under parallel load.
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        support::prefect_call(&self.raw, reqwest::Method::POST, &url, Some(&body)).await
    }

    /// PATCH or DELETE behind the operator's back, retrying as `post` does.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> u16 {
        let url = format!("{}{path}", self.url);
        support::prefect_call(&self.raw, method, &url, body.as_ref())
            .await
            .0
    }

    async fn work_pool(&self) -> String {
        support::create_pool(PrefectServer::shared())
    }

    async fn deployment(&self, id: &str) -> Option<Value> {
        match self.get(&format!("/deployments/{id}")).await {
            (200, v) => Some(v),
            (404, _) => None,
            (c, v) => panic!("unexpected {c}: {v}"),
        }
    }

    async fn schedules(&self, deployment_id: &str) -> Vec<Value> {
        match self
            .get(&format!("/deployments/{deployment_id}/schedules"))
            .await
        {
            (200, Value::Array(list)) => list,
            (c, v) => panic!("unexpected {c}: {v}"),
        }
    }

    async fn automation_exists(&self, id: &str) -> bool {
        self.get(&format!("/automations/{id}")).await.0 == 200
    }

    /// A deployment with one trigger, applied: its spec, name, owner uid and state.
    async fn applied_with_a_trigger(
        &self,
        prefix: &str,
    ) -> (PrefectDeploymentSpec, String, String, SyncState) {
        let pool = self.work_pool().await;
        let (name, uid) = (unique(prefix), unique("uid"));
        let spec = self.spec(
            &pool,
            json!({"entrypoint": "flows/a.py:run", "triggers": [{"expect": ["a.b"]}]}),
        );
        let mut state = SyncState::default();
        self.apply(&spec, &name, &uid, &mut state).await.0.unwrap();
        (spec, name, uid, state)
    }

    /// Whether the server's automation filter takes ids, as its own OpenAPI document
    /// says (3.9 does; 3.4 and older do not).
    async fn automations_by_id(&self) -> bool {
        let (code, doc) = self.get("/openapi.json").await;
        assert_eq!(code, 200);
        doc["components"]["schemas"]["AutomationFilter"]["properties"]
            .get("id")
            .is_some()
    }

    /// Whether the server keeps schedule slugs (Prefect 3.2 and later).
    async fn slugs(&self) -> bool {
        self.client.capabilities().await.unwrap().schedule_slugs
    }

    /// A schedule body for a request a test makes itself: without `slug` and
    /// `parameters` for a server that does not know them (it would refuse the request).
    async fn schedule_body(&self, mut body: Value) -> Value {
        if !self.slugs().await {
            let o = body.as_object_mut().unwrap();
            o.remove("slug");
            o.remove("parameters");
        }
        body
    }

    fn spec(&self, pool: &str, deployment: Value) -> PrefectDeploymentSpec {
        serde_json::from_value(json!({
            "server": {"remoteApiUrl": self.url},
            "workPool": {"name": pool},
            "deployment": deployment,
        }))
        .unwrap()
    }

    /// Runs one pass; returns the changes and the calls it made, by "METHOD endpoint".
    async fn apply(
        &self,
        spec: &PrefectDeploymentSpec,
        name: &str,
        uid: &str,
        state: &mut SyncState,
    ) -> (Result<(), Error>, Vec<Change>, Vec<String>) {
        self.apply_from(spec, name, uid, state, None).await
    }

    /// `apply`, planning first against `snapshot` as a drift check from a bulk read does.
    async fn apply_from(
        &self,
        spec: &PrefectDeploymentSpec,
        name: &str,
        uid: &str,
        state: &mut SyncState,
        snapshot: Option<execute::Snapshot>,
    ) -> (Result<(), Error>, Vec<Change>, Vec<String>) {
        let before = self.calls.snapshot();
        let mut changes = Vec::new();
        let r = match validate(spec, name) {
            Ok(valid) => {
                let client = &self.client;
                execute::apply_from(client, &valid, uid, state, &mut changes, snapshot, &|_| {
                    None
                })
                .await
            }
            Err(p) => Err(Error::InvalidSpec(p.to_string())),
        };
        let after = self.calls.snapshot();
        let mut made = Vec::new();
        for ((m, e), n) in &after {
            let prev = before.get(&(m.clone(), *e)).copied().unwrap_or(0);
            for _ in prev..*n {
                made.push(format!("{m} {e}"));
            }
        }
        (r, changes, made)
    }
}

/// Schedule ids by slug; by what the schedule says (`cron 0 6 * * *`) where the server
/// keeps no slugs.
fn schedule_ids(d: &Value) -> std::collections::BTreeMap<String, String> {
    d["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let key = match s["slug"].as_str() {
                Some(slug) => slug.to_string(),
                None => ["interval", "cron", "rrule"]
                    .iter()
                    .find(|k| !s["schedule"][**k].is_null())
                    .map(|k| format!("{k} {}", s["schedule"][*k]).replace('"', ""))
                    .unwrap(),
            };
            (key, s["id"].as_str().unwrap().to_string())
        })
        .collect()
}

#[tokio::test]
async fn client_calls_against_real_server() {
    let env = Env::new().await;
    let c = &env.client;
    let pool = env.work_pool().await;
    let flow = unique("flow");
    let f1 = c.upsert_flow(&flow).await.unwrap();
    assert_eq!(
        c.upsert_flow(&flow).await.unwrap(),
        f1,
        "flow upsert is idempotent"
    );
    let name = unique("dep");
    assert!(c
        .read_deployment_by_name(&flow, &name)
        .await
        .unwrap()
        .is_none());
    let first = env
        .schedule_body(json!({"schedule": {"interval": 600, "timezone": "UTC"}, "slug": "a", "active": true, "parameters": {}}))
        .await;
    let id = c
        .create_deployment(
            // Prefect 3.1 enforces a parameter schema by default, and with none refuses
            // every later PATCH.
            &json!({"name": name, "flow_id": f1, "work_pool_name": pool, "schedules": [first],
                    "enforce_parameter_schema": false}),
        )
        .await
        .unwrap();
    let by_name = c
        .read_deployment_by_name(&flow, &name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_name.id, id);
    assert_eq!(
        c.read_deployment(&id).await.unwrap().unwrap().fields["name"],
        json!(name)
    );

    c.update_deployment(&id, &json!({"description": "hello"}))
        .await
        .unwrap();
    let err = c
        .update_deployment(&id, &json!({"work_pool_name": "no-such-pool"}))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WorkPoolNotFound(_)), "{err:?}");
    assert!(err.to_string().contains("no-such-pool"), "{err}");
    assert_eq!(
        env.deployment(&id).await.unwrap()["description"],
        json!("hello")
    );

    let scheds = env.schedules(&id).await;
    assert_eq!(scheds.len(), 1);
    let sid = scheds[0]["id"].as_str().unwrap().to_string();
    let a = env
        .schedule_body(json!({"schedule": {"interval": 1200, "timezone": "UTC"}, "slug": "a"}))
        .await;
    c.update_schedule(&id, &sid, &a).await.unwrap();
    let b = env
        .schedule_body(json!({"schedule": {"cron": "0 1 * * *", "timezone": "UTC"}, "slug": "b"}))
        .await;
    c.create_schedules(&id, &[b]).await.unwrap();
    let scheds = env.schedules(&id).await;
    assert_eq!(scheds.len(), 2);
    let a = scheds
        .iter()
        .find(|s| s["schedule"]["interval"].as_f64() == Some(1200.0))
        .unwrap();
    assert_eq!(a["id"], json!(sid), "in-place schedule update keeps the id");
    assert_eq!(a["schedule"]["interval"].as_f64(), Some(1200.0));
    c.delete_schedule(&id, &sid).await.unwrap();
    assert_eq!(env.schedules(&id).await.len(), 1);

    let owner = format!("prefect.deployment.{id}");
    let aid = c
        .create_automation(&json!({"name": "t", "trigger": {"type": "event", "expect": ["x"], "posture": "Reactive", "threshold": 1, "within": 0},
            "actions": [{"type": "run-deployment", "source": "selected", "deployment_id": id}], "owner_resource": owner}))
        .await
        .unwrap();
    assert!(env.automation_exists(&aid).await);
    c.delete_owned_automations(&owner).await.unwrap();
    assert!(!env.automation_exists(&aid).await);
    c.delete_owned_automations(&owner).await.unwrap();

    // A flow run per idempotency key: asking again returns the same run.
    let run = c.create_flow_run(&id, &json!({}), "key-1").await.unwrap();
    assert_eq!(
        c.create_flow_run(&id, &json!({}), "key-1").await.unwrap(),
        run
    );
    assert_ne!(
        c.create_flow_run(&id, &json!({}), "key-2").await.unwrap(),
        run
    );

    assert!(c.delete_deployment(&id).await.unwrap());
    assert!(
        !c.delete_deployment(&id).await.unwrap(),
        "a second delete finds it gone"
    );
    assert!(c.read_deployment(&id).await.unwrap().is_none());

    // Errors are specific and short.
    let err = c
        .create_deployment(
            &json!({"name": unique("d"), "flow_id": f1, "work_pool_name": "no-such-pool"}),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::WorkPoolNotFound(_)), "{err:?}");
    let err = c
        .create_deployment(&json!({"name": unique("d"), "flow_id": f1, "schedules": [{"schedule": {"cron": "61 * * * *"}}]}))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PrefectRejected(_)), "{err:?}");
    assert!(err.to_string().len() <= 400, "{err}");
    let dead = PrefectClient::new(
        http_client(),
        &format!("http://127.0.0.1:{}/api", support::free_port()),
        None,
        Arc::default(),
    );
    assert!(matches!(
        dead.upsert_flow("f").await.unwrap_err(),
        Error::PrefectUnreachable(..)
    ));
}

#[tokio::test]
async fn create_noop_update_and_drift() {
    let env = Env::new().await;
    let pool = env.work_pool().await;
    let name = unique("etl");
    let uid = unique("uid");
    let mut spec = env.spec(&pool, json!({
        "entrypoint": "flows/etl.py:nightly_etl",
        "description": "first",
        "tags": ["a", "b"],
        "parameters": {"day": "today"},
        "parameterOpenApiSchema": {"type": "object", "properties": {"day": {"type": "string"}}},
        "jobVariables": {"env": {"A": "1"}},
        "versionInfo": {"type": "git", "version": "abc123"},
        "concurrencyLimit": 2,
        "labels": {"team": "data"},
        "pullSteps": [{"prefect.deployments.steps.git_clone": {"repository": "https://example.invalid/r.git"}}],
        "schedules": [
            {"slug": "hourly", "interval": 3600, "anchor_date": "2024-01-01T00:00:00Z", "timezone": "Europe/Berlin"},
            {"slug": "daily", "cron": "0 6 * * *", "timezone": "America/New_York", "day_or": false},
            {"slug": "weekly", "rrule": "FREQ=WEEKLY;BYDAY=MO", "active": false, "max_scheduled_runs": 5},
        ],
    }));
    let mut state = SyncState::default();
    let (r, changes, _) = env.apply(&spec, &name, &uid, &mut state).await;
    r.unwrap();
    assert!(matches!(changes[0], Change::Created { .. }), "{changes:?}");
    let id = state.deployment_id.clone().unwrap();
    let d = env.deployment(&id).await.unwrap();
    assert_eq!(d["name"], json!(name));
    assert_eq!(d["description"], json!("first"));
    assert_eq!(d["tags"], json!(["a", "b"]));
    assert_eq!(d["parameters"], json!({"day": "today"}));
    assert_eq!(d["job_variables"], json!({"env": {"A": "1"}}));
    // Prefect 3 keeps a deployment's limit as a global concurrency limit.
    assert_eq!(d["global_concurrency_limit"]["limit"], json!(2));
    assert_eq!(d["entrypoint"], json!("flows/etl.py:nightly_etl"));
    assert_eq!(d["work_pool_name"], json!(pool));
    assert_eq!(d["labels"]["team"], json!("data"));
    assert_eq!(d["flow_id"], json!(state.flow_id.clone().unwrap()));
    let (_, flow) = env
        .get(&format!("/flows/{}", d["flow_id"].as_str().unwrap()))
        .await;
    assert_eq!(
        flow["name"],
        json!("nightly-etl"),
        "default flow name from the function"
    );
    assert_eq!(d["schedules"].as_array().unwrap().len(), 3);
    let ids = schedule_ids(&d);
    // What an older server cannot hold is named, not silently dropped.
    let caps = env.client.capabilities().await.unwrap();
    let lost = state.unsupported.clone().unwrap_or_default();
    assert_eq!(!caps.version_info, lost.contains("versionInfo"), "{lost}");
    assert_eq!(
        !caps.update_schema_and_pull_steps,
        lost.contains("pullSteps (set at creation only)"),
        "{lost}"
    );

    // Nothing changed: one read, no writes.
    let (r, changes, made) = env.apply(&spec, &name, &uid, &mut state).await;
    r.unwrap();
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(made, vec!["GET deployment_by_name"]);

    // One field: one PATCH naming just that field.
    spec.deployment.description = Some("second".into());
    let (r, changes, made) = env.apply(&spec, &name, &uid, &mut state).await;
    r.unwrap();
    assert_eq!(
        changes,
        vec![Change::Updated {
            fields: vec!["description".into()]
        }]
    );
    assert_eq!(made, vec!["GET deployment_by_name", "PATCH deployment"]);
    assert_eq!(
        env.deployment(&id).await.unwrap()["description"],
        json!("second")
    );

    // Removing the concurrency limit clears it in Prefect.
    spec.deployment.concurrency_limit = None;
    env.apply(&spec, &name, &uid, &mut state).await.0.unwrap();
    assert_eq!(
        env.deployment(&id).await.unwrap()["global_concurrency_limit"],
        json!(null)
    );

    // Schedules: change one, add one, remove one; the untouched keeps its id.
    let scheds = spec.deployment.schedules.as_mut().unwrap();
    scheds[1].cron = Some("30 7 * * *".into());
    scheds.remove(2);
    scheds.push(serde_json::from_value(json!({"slug": "extra", "interval": 900})).unwrap());
    let (r, changes, made) = env.apply(&spec, &name, &uid, &mut state).await;
    r.unwrap();
    assert!(
        !made.iter().any(|m| m == "POST deployments"),
        "never the upsert: {made:?}"
    );
    let d = env.deployment(&id).await.unwrap();
    let after = schedule_ids(&d);
    if env.slugs().await {
        assert_eq!(
            changes,
            vec![Change::SchedulesChanged {
                created: vec!["extra".into()],
                updated: vec!["daily".into()],
                deleted: vec!["weekly".into()]
            }]
        );
        assert_eq!(
            after["hourly"], ids["hourly"],
            "untouched schedule keeps its id"
        );
        assert_eq!(
            after["daily"], ids["daily"],
            "edited schedule is updated in place"
        );
        assert!(!after.contains_key("weekly"));
    } else {
        // Without slugs a schedule is known by what it says: an edited one is a new one.
        assert_eq!(
            changes,
            vec![Change::SchedulesChanged {
                created: vec!["daily".into(), "extra".into()],
                updated: vec![],
                deleted: vec!["(no slug)".into(), "(no slug)".into()]
            }]
        );
        assert_eq!(
            after["interval 3600.0"], ids["interval 3600.0"],
            "untouched schedule keeps its id"
        );
        assert_eq!(after.len(), 3, "{after:?}");
        assert!(after.contains_key("interval 900.0"), "{after:?}");
    }
    let daily = d["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| !s["schedule"]["cron"].is_null())
        .unwrap();
    assert_eq!(daily["schedule"]["cron"], json!("30 7 * * *"));
    assert_eq!(daily["schedule"]["day_or"], json!(false));
    // And it is stable again.
    let (_, changes, made) = env.apply(&spec, &name, &uid, &mut state).await;
    assert!(changes.is_empty(), "{changes:?} {made:?}");

    // Drift: an edit made in Prefect is put back.
    let code = env
        .call(
            reqwest::Method::PATCH,
            &format!("/deployments/{id}"),
            Some(json!({"description": "by hand", "paused": true})),
        )
        .await;
    assert_eq!(code, 204);
    let (r, changes, _) = env.apply(&spec, &name, &uid, &mut state).await;
    r.unwrap();
    assert_eq!(
        changes,
        vec![Change::Updated {
            fields: vec!["description".into(), "paused".into()]
        }]
    );
    let d = env.deployment(&id).await.unwrap();
    assert_eq!(
        (d["description"].clone(), d["paused"].clone()),
        (json!("second"), json!(false))
    );

    // Drift: deleted in Prefect, created again (new id).
    let code = env
        .call(reqwest::Method::DELETE, &format!("/deployments/{id}"), None)
        .await;
    assert_eq!(code, 204);
    let (r, changes, _) = env.apply(&spec, &name, &uid, &mut state).await;
    r.unwrap();
    let new_id = state.deployment_id.clone().unwrap();
    assert_ne!(new_id, id);
    assert_eq!(
        changes[0],
        Change::Created {
            id: new_id.clone(),
            automations: 0
        }
    );
    assert_eq!(
        env.deployment(&new_id).await.unwrap()["schedules"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Status lost after a create (interrupted pass): recognised as ours, not a conflict.
    let mut fresh = SyncState::default();
    let (r, changes, _) = env.apply(&spec, &name, &uid, &mut fresh).await;
    r.unwrap();
    assert_eq!(fresh.deployment_id.as_deref(), Some(new_id.as_str()));
    assert!(
        !changes
            .iter()
            .any(|c| matches!(c, Change::Adopted { .. } | Change::Created { .. })),
        "{changes:?}"
    );

    // Renaming the deployment creates the new one and removes the old.
    let renamed = unique("etl-renamed");
    let (r, changes, _) = env.apply(&spec, &renamed, &uid, &mut state).await;
    r.unwrap();
    assert!(
        matches!(&changes[0], Change::Replaced { old_id, .. } if *old_id == new_id),
        "{changes:?}"
    );
    assert!(env.deployment(&new_id).await.is_none());
    let (code, _) = env
        .get(&format!("/deployments/name/nightly-etl/{renamed}"))
        .await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn triggers_are_applied_only_when_changed() {
    let env = Env::new().await;
    let pool = env.work_pool().await;
    let name = unique("triggered");
    let uid = unique("uid");
    let mut spec = env.spec(&pool, json!({
        "entrypoint": "flows/a.py:run",
        "triggers": [
            {"expect": ["prefect.flow-run.Completed"], "match": {"prefect.resource.id": "prefect.flow-run.*"}, "parameters": {"x": 1}, "scheduleAfter": 300},
            {"name": "compound", "type": "compound", "require": "any", "within": 60, "triggers": [
                {"expect": ["a.b"]}, {"expect": ["c.d"], "posture": "Reactive"}
            ]},
            {"name": "sequence", "type": "sequence", "within": 120, "triggers": [{"expect": ["e.f"]}, {"expect": ["g.h"]}]},
            {"name": "quiet", "posture": "Proactive", "expect": ["heartbeat"], "within": 600, "enabled": false},
        ],
    }));
    let mut state = SyncState::default();
    let (r, changes, _) = env.apply(&spec, &name, &uid, &mut state).await;
    r.unwrap();
    let id = state.deployment_id.clone().unwrap();
    assert_eq!(state.automation_ids.len(), 4);
    // One Event says both.
    assert_eq!(
        changes,
        vec![Change::Created {
            id: id.clone(),
            automations: 4
        }]
    );
    let (_, first) = env
        .get(&format!("/automations/{}", state.automation_ids[0]))
        .await;
    assert_eq!(first["name"], json!(format!("{name}__automation_1")));
    assert_eq!(first["actions"][0]["deployment_id"], json!(id));
    assert_eq!(first["actions"][0]["parameters"], json!({"x": 1}));
    // A server before 3.4.15 drops the delay: said so, and not taken for drift below.
    let lost = state.unsupported.clone().unwrap_or_default();
    if env.client.capabilities().await.unwrap().schedule_after {
        assert_eq!(first["actions"][0]["schedule_after"], json!(300.0));
        assert!(!lost.contains("scheduleAfter"), "{lost}");
    } else {
        assert!(
            first["actions"][0].get("schedule_after").is_none(),
            "{first}"
        );
        assert!(lost.contains("triggers[0].scheduleAfter"), "{lost}");
    }
    let (_, compound) = env
        .get(&format!("/automations/{}", state.automation_ids[1]))
        .await;
    assert_eq!(compound["trigger"]["type"], json!("compound"));
    assert_eq!(compound["trigger"]["require"], json!("any"));
    assert_eq!(compound["trigger"]["triggers"].as_array().unwrap().len(), 2);
    let (_, quiet) = env
        .get(&format!("/automations/{}", state.automation_ids[3]))
        .await;
    assert_eq!(quiet["enabled"], json!(false));
    assert_eq!(quiet["trigger"]["posture"], json!("Proactive"));

    // Unchanged: not a single automation call, also for an operator that restarted and
    // knows only what status recorded.
    let (r, _, made) = env.apply(&spec, &name, &uid, &mut state).await;
    r.unwrap();
    assert!(!made.iter().any(|m| m.contains("automation")), "{made:?}");
    let mut restarted = SyncState {
        deployment_id: state.deployment_id.clone(),
        flow_id: state.flow_id.clone(),
        automation_ids: state.automation_ids.clone(),
        triggers_hash: state.triggers_hash.clone(),
        ..SyncState::default()
    };
    let (r, _, made) = env.apply(&spec, &name, &uid, &mut restarted).await;
    r.unwrap();
    assert!(!made.iter().any(|m| m.contains("automation")), "{made:?}");

    // Changed: the new set is created first, then the old one deleted by its ids.
    let old_ids = state.automation_ids.clone();
    spec.deployment.triggers.as_mut().unwrap().truncate(1);
    spec.deployment.triggers.as_mut().unwrap()[0].parameters = Some(json!({"x": 2}));
    let (r, changes, _) = env.apply(&spec, &name, &uid, &mut state).await;
    r.unwrap();
    let made = env.calls.recent();
    let first_delete = made.iter().position(|m| m == "DELETE automation").unwrap();
    let last_create = made.iter().rposition(|m| m == "POST automations").unwrap();
    assert!(last_create < first_delete, "create first: {made:?}");
    assert!(!made.iter().any(|m| m.contains("owned_by")), "{made:?}");
    assert!(
        changes.contains(&Change::AutomationsReplaced { count: 1 }),
        "{changes:?}"
    );
    for old in &old_ids {
        assert!(!env.automation_exists(old).await);
    }
    assert_eq!(state.automation_ids.len(), 1);
    let (_, a) = env
        .get(&format!("/automations/{}", state.automation_ids[0]))
        .await;
    assert_eq!(a["actions"][0]["parameters"], json!({"x": 2}));

    // A metric trigger is Prefect Cloud only. The new set is created before the old one
    // goes: the event trigger made first is taken back, the old automation keeps
    // working, the deployment itself is still applied, and the message says why.
    let working = state.automation_ids.clone();
    let working_hash = state.triggers_hash.clone();
    spec.deployment.triggers = Some(vec![
        serde_json::from_value(json!({"expect": ["y"]})).unwrap(),
        serde_json::from_value(json!({
            "type": "metric", "metric": {"name": "lateness", "operator": ">", "threshold": 60}
        }))
        .unwrap(),
    ]);
    spec.deployment.description = Some("still applied".into());
    let (r, _, made) = env.apply(&spec, &name, &uid, &mut state).await;
    match &r {
        Err(Error::AutomationFailed(m)) => {
            assert!(
                m.starts_with(
                    "spec.deployment.triggers[1]: metric triggers exist only on Prefect Cloud"
                ),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        env.deployment(&id).await.unwrap()["description"],
        json!("still applied")
    );
    assert_eq!(
        state.automation_ids, working,
        "the working set is still recorded"
    );
    assert_eq!(state.triggers_hash, working_hash);
    assert!(
        env.automation_exists(&working[0]).await,
        "the working automation survives"
    );
    assert!(made.contains(&"DELETE automation".to_string()), "{made:?}");
    let (_, related) = env
        .get(&format!("/automations/related-to/prefect.deployment.{id}"))
        .await;
    assert_eq!(
        related.as_array().unwrap().len(),
        1,
        "nothing of the refused set is left: {related}"
    );

    // Deletion removes the automations and the deployment; a second delete is a no-op.
    spec.deployment.triggers = Some(vec![
        serde_json::from_value(json!({"expect": ["x"]})).unwrap()
    ]);
    env.apply(&spec, &name, &uid, &mut state).await.0.unwrap();
    let aid = state.automation_ids[0].clone();
    let deleted = execute::delete(&env.client, &spec, &name, &uid, &state)
        .await
        .unwrap();
    assert_eq!(deleted.as_deref(), Some(id.as_str()));
    assert!(env.deployment(&id).await.is_none());
    assert!(!env.automation_exists(&aid).await);
    execute::delete(&env.client, &spec, &name, &uid, &state)
        .await
        .unwrap();
}

/// A drift check that planned from the bulk snapshot and finds an automation gone reads
/// the deployment again before writing, but not the automations it has just read; it
/// makes the automation again and sends no deletion for the id Prefect no longer has.
#[tokio::test]
async fn a_deleted_automation_found_from_the_snapshot_is_read_once() {
    let env = Env::new().await;
    let (spec, name, uid, mut state) = env.applied_with_a_trigger("snapshot-automation").await;
    let id = state.deployment_id.clone().unwrap();
    let gone = state.automation_ids[0].clone();
    let path = format!("/automations/{gone}");
    assert_eq!(env.call(reqwest::Method::DELETE, &path, None).await, 204);

    let deployment = env.client.read_deployment(&id).await.unwrap().unwrap();
    state.check_automations = true;
    let snapshot = execute::Snapshot {
        deployment,
        automations: None,
    };
    let (r, changes, made) = env
        .apply_from(&spec, &name, &uid, &mut state, Some(snapshot))
        .await;
    r.unwrap();
    let times = |call: &str| made.iter().filter(|m| *m == call).count();
    assert_eq!(times("GET automations_related_to"), 1, "{made:?}");
    assert_eq!(
        times("GET deployment_by_name"),
        1,
        "read before writing: {made:?}"
    );
    assert_eq!(times("POST automations"), 1, "{made:?}");
    assert_eq!(times("DELETE automation"), 0, "already gone: {made:?}");
    assert!(
        matches!(&changes[..], [Change::AutomationsRestored { .. }]),
        "{changes:?}"
    );
    assert_eq!(state.automation_ids.len(), 1);
    assert_ne!(state.automation_ids[0], gone);
    assert!(env.automation_exists(&state.automation_ids[0]).await);
}

#[tokio::test]
async fn conflict_and_adoption() {
    let env = Env::new().await;
    let pool = env.work_pool().await;
    let name = unique("taken");
    // Someone else's deployment of the same flow and name.
    let flow_id = env.client.upsert_flow("job").await.unwrap();
    let keep = env
        .schedule_body(json!({"schedule": {"interval": 60}, "slug": "keep"}))
        .await;
    let (code, theirs) = env
        .post(
            "/deployments/",
            json!({"name": name, "flow_id": flow_id, "description": "theirs", "schedules": [keep]}),
        )
        .await;
    assert_eq!(code, 201);
    let theirs_id = theirs["id"].as_str().unwrap().to_string();

    let mut spec = env.spec(
        &pool,
        json!({"entrypoint": "j.py:job", "description": "ours",
        "schedules": [{"slug": "keep", "interval": 60}]}),
    );
    let mut state = SyncState::default();
    let (r, _, made) = env.apply(&spec, &name, "uid-1", &mut state).await;
    assert!(
        matches!(&r, Err(Error::Conflict(m)) if m.contains("adoptExisting")),
        "{r:?}"
    );
    assert!(
        made.iter().all(|m| m.starts_with("GET")),
        "a conflict writes nothing: {made:?}"
    );
    assert_eq!(
        env.deployment(&theirs_id).await.unwrap()["description"],
        json!("theirs")
    );

    // Their tool (Prefect's own apply() does this) gave the deployment an automation.
    let (code, their_automation) = env
        .post(
            "/automations/",
            json!({"name": "theirs", "trigger": {"type": "event", "expect": ["x"], "posture": "Reactive", "threshold": 1, "within": 0},
                "actions": [{"type": "run-deployment", "source": "selected", "deployment_id": theirs_id}],
                "owner_resource": format!("prefect.deployment.{theirs_id}")}),
        )
        .await;
    assert_eq!(code, 201);
    let their_automation = their_automation["id"].as_str().unwrap().to_string();

    spec.adopt_existing = Some(true);
    spec.deployment.triggers = Some(vec![
        serde_json::from_value(json!({"expect": ["ours"]})).unwrap()
    ]);
    let (r, changes, _) = env.apply(&spec, &name, "uid-1", &mut state).await;
    r.unwrap();
    assert!(
        !env.automation_exists(&their_automation).await,
        "the automation made for the deployment by another tool is replaced"
    );
    assert_eq!(state.automation_ids.len(), 1);
    assert!(env.automation_exists(&state.automation_ids[0]).await);
    assert_eq!(
        changes[0],
        Change::Adopted {
            id: theirs_id.clone()
        }
    );
    let d = env.deployment(&theirs_id).await.unwrap();
    assert_eq!(d["description"], json!("ours"));
    assert_eq!(
        d["schedules"].as_array().unwrap().len(),
        1,
        "adoption keeps matching schedules"
    );
}

#[tokio::test]
async fn basic_auth_server() {
    support::install_crypto();
    let server = PrefectServer::start(Some("admin:s3cret"));
    let calls = Arc::new(CallLog::default());
    let anon = PrefectClient::new(http_client(), &server.url, None, calls.clone());
    let err = anon.upsert_flow("f").await.unwrap_err();
    assert!(
        matches!(err, Error::PrefectUnauthorized(ref m) if m.contains("401")),
        "{err:?}"
    );
    assert_eq!(err.reason(), "PrefectUnauthorized");
    let wrong = PrefectClient::new(
        http_client(),
        &server.url,
        Some(Auth::Basic("admin:nope".into())),
        calls.clone(),
    );
    let err = wrong.upsert_flow("f").await.unwrap_err();
    assert!(matches!(err, Error::PrefectUnauthorized(_)), "{err:?}");
    let authed = PrefectClient::new(
        http_client(),
        &server.url,
        Some(Auth::Basic("admin:s3cret".into())),
        calls,
    );
    authed.upsert_flow("f").await.unwrap();
}

/// A 2xx answer that is not JSON (a URL pointing at Prefect's UI, or a proxy's page) is
/// an error naming the endpoint, never an empty value. A real Prefect API cannot be made
/// to answer this way, so a one-shot local responder plays the misconfigured URL.
#[tokio::test]
async fn a_success_that_is_not_json_is_an_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    support::install_crypto();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let page = "<!doctype html><html><body>Prefect</body></html>";
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = sock.write_all(answer.as_bytes()).await;
        }
    });
    let c = PrefectClient::new(
        http_client(),
        &format!("http://{addr}"),
        None,
        Arc::default(),
    );
    let err = c.read_deployment_by_name("f", "d").await.unwrap_err();
    assert!(matches!(err, Error::PrefectRejected(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("GET deployment_by_name"), "{text}");
    assert!(text.contains("not JSON"), "{text}");
}

/// `concurrencyOptions`: set, kept without writes, changed, and cleared when removed.
#[tokio::test]
async fn concurrency_options_set_and_cleared() {
    let env = Env::new().await;
    let pool = env.work_pool().await;
    let name = unique("conc");
    let uid = unique("uid");
    let mut state = SyncState::default();
    let mut spec = env.spec(
        &pool,
        json!({"entrypoint": "flows/c.py:conc", "concurrencyLimit": 2,
               "concurrencyOptions": {"collisionStrategy": "CANCEL_NEW", "gracePeriodSeconds": 120}}),
    );
    env.apply(&spec, &name, &uid, &mut state).await.0.unwrap();
    let id = state.deployment_id.clone().unwrap();
    let d = env.deployment(&id).await.unwrap();
    // Servers before 3.7 have no grace period: it is left out, and said so.
    if env.client.capabilities().await.unwrap().grace_period {
        assert_eq!(
            d["concurrency_options"],
            json!({"collision_strategy": "CANCEL_NEW", "grace_period_seconds": 120})
        );
        assert_eq!(state.unsupported, None);
    } else {
        assert_eq!(
            d["concurrency_options"],
            json!({"collision_strategy": "CANCEL_NEW"})
        );
        let lost = state.unsupported.clone().unwrap_or_default();
        assert!(
            lost.contains("concurrencyOptions.gracePeriodSeconds"),
            "{lost}"
        );
    }
    let (r, changes, made) = env.apply(&spec, &name, &uid, &mut state).await;
    r.unwrap();
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(made, vec!["GET deployment_by_name"]);

    spec.deployment.concurrency_options = None;
    let (r, changes, _) = env.apply(&spec, &name, &uid, &mut state).await;
    r.unwrap();
    assert_eq!(
        changes,
        vec![Change::Updated {
            fields: vec!["concurrency_options".into()]
        }]
    );
    let d = env.deployment(&id).await.unwrap();
    assert_eq!(d["concurrency_options"], json!(null));
    let (_, changes, _) = env.apply(&spec, &name, &uid, &mut state).await;
    assert!(changes.is_empty(), "{changes:?}");
}

/// Flow ids are cached per server and flow name: a second deployment of a known flow
/// makes no `POST /flows/`; a flow deleted in Prefect is noticed and made again.
#[tokio::test]
async fn flow_ids_are_cached_and_a_deleted_flow_is_recreated() {
    let env = Env::new().await;
    let pool = env.work_pool().await;
    let cache = Arc::new(prefect_operator::prefect::FlowCache::default());
    let calls = Arc::new(CallLog::default());
    let server = PrefectServer::shared();
    let client = PrefectClient::new(http_client(), &server.url, None, calls.clone())
        .with_flow_cache(cache.clone());
    let flow = unique("shared_flow").replace('-', "_");
    let apply = |name: String| {
        let client = client.clone();
        let spec = env.spec(&pool, json!({"entrypoint": format!("flows/f.py:{flow}")}));
        async move {
            let valid = validate(&spec, &name).unwrap();
            let mut state = SyncState::default();
            execute::apply(&client, &valid, "uid", &mut state, &mut Vec::new())
                .await
                .unwrap();
            state
        }
    };
    let flows_posted = || calls.count("POST", "flows");
    let a = apply(unique("a")).await;
    assert_eq!(flows_posted(), 1);
    let b = apply(unique("b")).await;
    assert_eq!(
        flows_posted(),
        1,
        "the second deployment of the flow reuses its id"
    );
    assert_eq!(a.flow_id, b.flow_id);

    // Deleted in Prefect (with its deployments): the next create notices.
    let flow_id = a.flow_id.clone().unwrap();
    let code = env
        .call(reqwest::Method::DELETE, &format!("/flows/{flow_id}"), None)
        .await;
    assert_eq!(code, 204);
    let c = apply(unique("c")).await;
    assert_eq!(flows_posted(), 2);
    assert_ne!(c.flow_id, a.flow_id);
    let (code, _) = env.get(&format!("/flows/{}", c.flow_id.unwrap())).await;
    assert_eq!(code, 200);
}

/// When a server answers 503, the requests in flight to it are halved for every client
/// sharing the limit, and the request itself still succeeds on retry. A real server's
/// 503s come only under load, so a local responder plays the overloaded server.
#[tokio::test]
async fn an_overloaded_server_halves_the_requests_in_flight() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    support::install_crypto();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let (status, body) = if n == 0 {
                ("503 Service Unavailable", "{\"detail\":\"busy\"}")
            } else {
                ("200 OK", "{\"id\":\"flow-1\"}")
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(answer.as_bytes()).await;
        }
    });
    let limits = prefect_operator::limit::Limits::new(8);
    let base = format!("http://{addr}/api");
    let limit = limits.for_server(&base);
    let client =
        PrefectClient::new(http_client(), &base, None, Arc::default()).with_limit(limit.clone());
    assert_eq!(client.upsert_flow("f").await.unwrap(), "flow-1");
    assert_eq!(seen.load(Ordering::SeqCst), 2, "one 503, then the retry");
    assert_eq!(limit.current(), 4);
    assert_eq!(
        limits.for_server(&base).current(),
        4,
        "shared by the server's clients"
    );
    assert_eq!(
        limits.for_server("http://other/api").current(),
        8,
        "per server"
    );
}

/// `globalConcurrencyLimit`: the named limit is created once and shared; settings are
/// kept in step; moving a deployment from its own limit onto the named one, and deleting
/// a deployment attached to it, never deletes the shared limit (Prefect deletes the
/// limit a deployment is attached to along with it, or when sent concurrency_limit
/// null); the resource that created it deletes it when it lets go of it.
#[tokio::test]
async fn named_global_concurrency_limit_shared_and_released() {
    let env = Env::new().await;
    let pool = env.work_pool().await;
    let limit_name = unique("shared-limit");
    let read_limit = |name: String| {
        let env = &env;
        async move {
            match env.get(&format!("/v2/concurrency_limits/{name}")).await {
                (200, v) => Some(v),
                (404, _) => None,
                (c, v) => panic!("unexpected {c}: {v}"),
            }
        }
    };
    let gcl =
        |limit: i64| json!({"name": limit_name, "limit": limit, "collisionStrategy": "CANCEL_NEW"});

    // A creates the limit and is attached to it.
    let (a_name, a_uid, mut a) = (unique("gcl-a"), unique("uid"), SyncState::default());
    let mut a_spec = env.spec(
        &pool,
        json!({"entrypoint": "flows/g.py:gcl", "globalConcurrencyLimit": gcl(3)}),
    );
    let (r, changes, _) = env.apply(&a_spec, &a_name, &a_uid, &mut a).await;
    r.unwrap();
    if !env.client.capabilities().await.unwrap().limit_id {
        // Before 3.3 a deployment cannot be attached to a named limit: it gets a limit
        // of its own with the declared value, and the resource says so.
        let d = env
            .deployment(a.deployment_id.as_ref().unwrap())
            .await
            .unwrap();
        assert_eq!(d["global_concurrency_limit"]["limit"], json!(3));
        assert!(read_limit(limit_name.clone()).await.is_none());
        let lost = a.unsupported.clone().unwrap_or_default();
        assert!(lost.contains("globalConcurrencyLimit"), "{lost}");
        let (r, changes, _) = env.apply(&a_spec, &a_name, &a_uid, &mut a).await;
        r.unwrap();
        assert!(changes.is_empty(), "{changes:?}");
        return;
    }
    assert!(changes.contains(&Change::LimitCreated {
        name: limit_name.clone()
    }));
    let limit = read_limit(limit_name.clone()).await.expect("limit created");
    assert_eq!(limit["limit"], json!(3));
    let limit_id = limit["id"].as_str().unwrap().to_string();
    let a_id = a.deployment_id.clone().unwrap();
    let d = env.deployment(&a_id).await.unwrap();
    assert_eq!(d["global_concurrency_limit"]["id"], json!(limit_id));
    assert_eq!(
        d["concurrency_options"]["collision_strategy"],
        json!("CANCEL_NEW")
    );
    let record = a.limit.clone().unwrap();
    assert_eq!(
        (record.id.as_str(), record.created),
        (limit_id.as_str(), true)
    );
    // In step: one read, no writes.
    let (r, changes, made) = env.apply(&a_spec, &a_name, &a_uid, &mut a).await;
    r.unwrap();
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(made, vec!["GET deployment_by_name"]);

    // B starts with its own limit, then names the shared one: its own limit goes, the
    // shared one stays, and B is attached to it without creating anything.
    let (b_name, b_uid, mut b) = (unique("gcl-b"), unique("uid"), SyncState::default());
    let mut b_spec = env.spec(
        &pool,
        json!({"entrypoint": "flows/g.py:gcl", "concurrencyLimit": 2}),
    );
    env.apply(&b_spec, &b_name, &b_uid, &mut b).await.0.unwrap();
    let b_id = b.deployment_id.clone().unwrap();
    let own = format!("deployment:{b_id}");
    assert!(read_limit(own.clone()).await.is_some());
    b_spec.deployment.concurrency_limit = None;
    b_spec.deployment.global_concurrency_limit = Some(serde_json::from_value(gcl(3)).unwrap());
    let (r, changes, made) = env.apply(&b_spec, &b_name, &b_uid, &mut b).await;
    r.unwrap();
    assert!(
        !made.contains(&"POST concurrency_limits".to_string()),
        "{made:?}"
    );
    assert!(
        changes
            .iter()
            .all(|c| !matches!(c, Change::LimitCreated { .. })),
        "{changes:?}"
    );
    assert!(read_limit(own).await.is_none(), "B's own limit is gone");
    let shared = read_limit(limit_name.clone())
        .await
        .expect("the shared limit stays");
    assert_eq!(shared["id"], json!(limit_id));
    let d = env.deployment(&b_id).await.unwrap();
    assert_eq!(d["global_concurrency_limit"]["id"], json!(limit_id));
    assert_eq!(b.limit.as_ref().map(|l| l.created), Some(false));

    // A changes the settings: the limit follows, and both stay attached.
    a_spec.deployment.global_concurrency_limit = Some(
        serde_json::from_value(
            json!({"name": limit_name, "limit": 5, "active": false, "slotDecayPerSecond": "0.5"}),
        )
        .unwrap(),
    );
    let (r, changes, _) = env.apply(&a_spec, &a_name, &a_uid, &mut a).await;
    r.unwrap();
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::LimitUpdated { fields, .. } if fields.len() == 3)),
        "{changes:?}"
    );
    let shared = read_limit(limit_name.clone()).await.unwrap();
    assert_eq!(
        (
            &shared["limit"],
            &shared["active"],
            &shared["slot_decay_per_second"]
        ),
        (&json!(5), &json!(false), &json!(0.5))
    );
    // Changed in Prefect by hand: put back.
    let code = env
        .call(
            reqwest::Method::PATCH,
            &format!("/v2/concurrency_limits/{limit_id}"),
            Some(json!({"limit": 9})),
        )
        .await;
    assert_eq!(code, 204);
    let (r, changes, _) = env.apply(&a_spec, &a_name, &a_uid, &mut a).await;
    r.unwrap();
    assert_eq!(
        changes,
        vec![Change::LimitUpdated {
            name: limit_name.clone(),
            fields: vec!["limit".into()]
        }]
    );

    // B's deployment deleted: the shared limit survives it.
    execute::delete(&env.client, &b_spec, &b_name, &b_uid, &b)
        .await
        .unwrap();
    assert!(env.deployment(&b_id).await.is_none());
    assert!(read_limit(limit_name.clone()).await.is_some());

    // A goes back to a limit of its own: detached, its own limit made, and the shared
    // limit (which A created, and nothing else names now) deleted.
    a_spec.deployment.global_concurrency_limit = None;
    a_spec.deployment.concurrency_limit = Some(1);
    let (r, changes, _) = env.apply(&a_spec, &a_name, &a_uid, &mut a).await;
    r.unwrap();
    assert!(
        changes.contains(&Change::LimitDeleted {
            name: limit_name.clone()
        }),
        "{changes:?}"
    );
    assert!(read_limit(limit_name.clone()).await.is_none());
    let d = env.deployment(&a_id).await.unwrap();
    assert_eq!(
        (
            &d["global_concurrency_limit"]["name"],
            &d["global_concurrency_limit"]["limit"]
        ),
        (&json!(format!("deployment:{a_id}")), &json!(1))
    );
    assert_eq!(a.limit, None);
    let (r, changes, _) = env.apply(&a_spec, &a_name, &a_uid, &mut a).await;
    r.unwrap();
    assert!(changes.is_empty(), "{changes:?}");

    // A limit named without `limit` to create it with, and none in Prefect: a clear
    // error, and nothing written.
    let (c_name, c_uid, mut c) = (unique("gcl-c"), unique("uid"), SyncState::default());
    let c_spec = env.spec(
        &pool,
        json!({"entrypoint": "flows/g.py:gcl", "globalConcurrencyLimit": {"name": unique("nowhere")}}),
    );
    let (r, _, made) = env.apply(&c_spec, &c_name, &c_uid, &mut c).await;
    let e = r.unwrap_err();
    assert_eq!(e.reason(), "ConcurrencyLimitMissing", "{e}");
    assert!(made.iter().all(|m| m.starts_with("GET")), "{made:?}");
}

/// The event stream of a server with basic auth: it authenticates with the auth
/// string, and an edit and a deletion of a watched deployment each trigger its resource;
/// an edit of an unwatched one does not.
#[tokio::test]
async fn event_stream_with_basic_auth_triggers_watched_resources() {
    use futures::StreamExt;
    use prefect_operator::metrics::Metrics;
    use prefect_operator::prefect_events::EventStreams;
    support::install_crypto();
    let server = PrefectServer::start(Some("admin:s3cret"));
    let auth = Auth::Basic("admin:s3cret".into());
    let calls = Arc::new(CallLog::default());
    let client = PrefectClient::new(
        http_client(),
        &server.url,
        Some(auth.clone()),
        calls.clone(),
    );
    let flow = client.upsert_flow("watched").await.unwrap();
    let create = |name: &str| {
        let client = client.clone();
        let body = json!({"name": name, "flow_id": flow, "enforce_parameter_schema": false});
        async move { client.create_deployment(&body).await.unwrap() }
    };
    let (watched, other) = (create("watched").await, create("other").await);

    let streams = Arc::new(EventStreams::new(Arc::new(Metrics::new(
        calls.durations.clone(),
    ))));
    let mut triggers = Box::pin(streams.subscribe());
    let who = kube::runtime::reflector::ObjectRef::new("watched").within("team");
    let caps = client.capabilities().await.unwrap();
    let base = client.base_url().to_string();
    let every = Duration::from_secs(60);
    let following = streams.watch(&base, &caps, Some(auth), &watched, &[], who.clone(), every);
    // Before 3.7 Prefect announces no deployment changes: nothing to follow, the
    // resync alone finds them.
    assert_eq!(following, caps.deployment_events);
    if !following {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(streams.connected(), 0);
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while streams.connected() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "no event stream");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    client
        .update_deployment(&other, &json!({"description": "not watched"}))
        .await
        .unwrap();
    client
        .update_deployment(&watched, &json!({"description": "edited"}))
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(20), triggers.next()).await;
    assert_eq!(next.expect("a trigger").unwrap(), who);
    assert!(streams.take_changed(&who));
    assert!(!streams.take_changed(&who), "taken once");

    client.delete_deployment(&watched).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(20), triggers.next()).await;
    assert_eq!(next.expect("a trigger").unwrap(), who);
    // Nothing about the unwatched deployment came through.
    let more = tokio::time::timeout(Duration::from_secs(2), triggers.next()).await;
    assert!(more.is_err(), "unexpected trigger: {more:?}");
}

/// The ownership guard's reads by name, coalesced: lookups asked together go out as one
/// `POST /deployments/filter` per flow and get the answer a GET by name would give; a
/// lone lookup is the GET itself; a server that cannot be reached fails each lookup with
/// its own error.
#[tokio::test]
async fn lookups_by_name_are_coalesced_per_flow() {
    use prefect_operator::lookup::Lookups;
    let env = Env::new().await;
    let lookups = Arc::new(Lookups::default());
    let client = env.client.clone().with_lookups(lookups.clone());
    let (flow_a, flow_b) = (unique("lookup-a"), unique("lookup-b"));
    let ids = {
        let mut ids = std::collections::HashMap::new();
        for (flow, name) in [(&flow_a, "one"), (&flow_a, "two"), (&flow_b, "one")] {
            let flow_id = client.upsert_flow(flow).await.unwrap();
            let body = json!({"name": name, "flow_id": flow_id, "enforce_parameter_schema": false});
            ids.insert(
                (flow.clone(), name),
                client.create_deployment(&body).await.unwrap(),
            );
        }
        ids
    };
    let asked: Vec<(String, &str)> = vec![
        (flow_a.clone(), "one"),
        (flow_a.clone(), "two"),
        (flow_a.clone(), "absent"),
        (flow_a.clone(), "one"),
        (flow_b.clone(), "one"),
        (flow_b.clone(), "two"),
    ];
    let before = env.calls.snapshot();
    // All asked in the same poll: the read for them starts only after every one queued.
    let answers = futures::future::join_all(
        asked
            .iter()
            .map(|(flow, name)| client.deployment_by_name(flow, name)),
    )
    .await;
    let made = |before: &std::collections::BTreeMap<(String, &'static str), u64>| {
        let after = env.calls.snapshot();
        after
            .iter()
            .filter_map(|((m, e), n)| {
                let d = n - before.get(&(m.clone(), *e)).copied().unwrap_or(0);
                (d > 0).then(|| format!("{m} {e} x{d}"))
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(made(&before), vec!["POST deployments_filter x2"]);
    for ((flow, name), answer) in asked.iter().zip(answers) {
        let got = answer.unwrap().map(|d| d.id);
        assert_eq!(
            got.as_ref(),
            ids.get(&(flow.clone(), *name)),
            "{flow}/{name}"
        );
        // The same answer as the plain GET by name.
        let direct = env
            .client
            .read_deployment_by_name(flow, name)
            .await
            .unwrap()
            .map(|d| d.id);
        assert_eq!(got, direct, "{flow}/{name}");
    }

    // A lone lookup is the GET by name.
    let before = env.calls.snapshot();
    let found = client.deployment_by_name(&flow_b, "one").await.unwrap();
    assert_eq!(
        found.map(|d| d.id),
        ids.get(&(flow_b.clone(), "one")).cloned()
    );
    assert_eq!(made(&before), vec!["GET deployment_by_name x1"]);

    // Created after the last lookup: the next one sees it (no answer is kept).
    let flow_id = client.upsert_flow(&flow_a).await.unwrap();
    let body = json!({"name": "absent", "flow_id": flow_id, "enforce_parameter_schema": false});
    let late = client.create_deployment(&body).await.unwrap();
    let both = futures::future::join_all([
        client.deployment_by_name(&flow_a, "absent"),
        client.deployment_by_name(&flow_a, "two"),
    ])
    .await;
    assert_eq!(
        both[0].as_ref().unwrap().as_ref().map(|d| &d.id),
        Some(&late)
    );

    // Nothing listening: every lookup fails with the unreachable server's error.
    let port = support::free_port();
    let down = PrefectClient::new(
        http_client(),
        &format!("http://127.0.0.1:{port}/api"),
        None,
        Arc::new(CallLog::default()),
    )
    .with_lookups(lookups);
    let failed = futures::future::join_all([
        down.deployment_by_name("f", "a"),
        down.deployment_by_name("f", "b"),
    ])
    .await;
    for r in failed {
        assert!(matches!(r, Err(Error::PrefectUnreachable(..))), "{r:?}");
    }
}

/// Prefect Cloud's event stream takes the API key in its auth message, as Prefect's own
/// `PrefectCloudEventSubscriber` sends it. Cloud cannot run here, so a local websocket
/// endpoint stands in for it: it speaks only the `prefect` subprotocol, accepts only the
/// key, checks the filter, and then announces an update of the watched deployment.
#[tokio::test]
// The handshake callback's error type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
async fn event_stream_authenticates_with_a_cloud_api_key() {
    use futures::{SinkExt, StreamExt};
    use prefect_operator::capabilities::Capabilities;
    use prefect_operator::metrics::Metrics;
    use prefect_operator::prefect_events::EventStreams;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::Message;

    const KEY: &str = "pnu_0123456789abcdef";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Value>();
    // Probe events posted over HTTP, to be sent back through the stream.
    let (posted_tx, mut posted) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let (ws_tx, ws_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ws_tx = Some(ws_tx);
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 5];
            tcp.peek(&mut head).await.unwrap();
            if &head == b"POST " {
                let posted_tx = posted_tx.clone();
                tokio::spawn(async move {
                    if let Some(events) = read_post(&mut tcp, KEY).await {
                        for e in events.as_array().into_iter().flatten() {
                            let _ = posted_tx.send(e.clone());
                        }
                    }
                });
            } else if let Some(tx) = ws_tx.take() {
                let _ = tx.send(tcp);
            }
        }
    });
    tokio::spawn(async move {
        let tcp = ws_rx.await.unwrap();
        let mut path = String::new();
        let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, mut resp: Response| {
            path = req.uri().path().to_string();
            let offered = req
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            assert_eq!(offered, "prefect");
            resp.headers_mut()
                .insert("sec-websocket-protocol", "prefect".parse().unwrap());
            Ok(resp)
        });
        let mut ws = ws.await.unwrap();
        assert_eq!(path, "/api/accounts/a/workspaces/w/events/out");
        let text = |m: Message| serde_json::from_str::<Value>(m.to_text().unwrap()).unwrap();
        let auth = text(ws.next().await.unwrap().unwrap());
        let _ = seen_tx.send(auth.clone());
        if auth != json!({"type": "auth", "token": KEY}) {
            let refused = json!({"type": "auth_failure", "reason": "bad key"});
            ws.send(Message::text(refused.to_string())).await.unwrap();
            return;
        }
        ws.send(Message::text(json!({"type": "auth_success"}).to_string()))
            .await
            .unwrap();
        let filter = text(ws.next().await.unwrap().unwrap());
        let _ = seen_tx.send(filter);
        let event = json!({"type": "event", "event": {
            "occurred": chrono::Utc::now().to_rfc3339(),
            "event": "prefect.deployment.updated",
            "resource": {"prefect.resource.id": "prefect.deployment.d-1"},
            "id": "e-1",
        }});
        ws.send(Message::text(event.to_string())).await.unwrap();
        // Echo what is posted, until the client goes.
        loop {
            tokio::select! {
                e = posted.recv() => {
                    let Some(e) = e else { break };
                    let echo = json!({"type": "event", "event": e});
                    if ws.send(Message::text(echo.to_string())).await.is_err() {
                        break;
                    }
                }
                m = ws.next() => if !matches!(m, Some(Ok(_))) { break },
            }
        }
    });

    let calls = Arc::new(CallLog::default());
    let streams = Arc::new(EventStreams::new(Arc::new(Metrics::new(
        calls.durations.clone(),
    ))));
    let mut triggers = Box::pin(streams.subscribe());
    let who = kube::runtime::reflector::ObjectRef::new("cloud").within("team");
    let base = format!("http://127.0.0.1:{port}/api/accounts/a/workspaces/w");
    let key = Some(Auth::Bearer(KEY.into()));
    let every = Duration::from_secs(60);
    assert!(streams.watch(
        &base,
        &Capabilities::LATEST,
        key,
        "d-1",
        &[],
        who.clone(),
        every
    ));

    let within = Duration::from_secs(20);
    let auth = tokio::time::timeout(within, seen.recv()).await.unwrap();
    assert_eq!(auth, Some(json!({"type": "auth", "token": KEY})));
    let filter = tokio::time::timeout(within, seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(filter["type"], "filter");
    // Only the events that start a pass, not the creations the operator makes itself.
    assert_eq!(
        filter["filter"]["event"]["name"],
        json!([
            "prefect.deployment.updated",
            "prefect.deployment.deleted",
            "prefect.automation.updated",
            "prefect.automation.deleted",
            "prefect-operator.stream.probe"
        ])
    );
    assert_eq!(
        filter["filter"]["resource"]["id_prefix"],
        json!([
            "prefect.deployment.",
            "prefect.automation.",
            "prefect-operator.stream."
        ])
    );
    let next = tokio::time::timeout(within, triggers.next()).await;
    assert_eq!(next.expect("a trigger").unwrap(), who);
    // Up once the probe, posted with the same key, came back through the stream.
    let deadline = tokio::time::Instant::now() + within;
    while streams.connected() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the probe never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads one HTTP request from `tcp` and answers it: 204 with the JSON body returned when
/// it carries bearer `key`, 401 otherwise.
async fn read_post(tcp: &mut tokio::net::TcpStream, key: &str) -> Option<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
    };
    let length: usize = header("content-length")?.parse().ok()?;
    while buf.len() < end + length {
        let n = tcp.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let authorized = header("authorization") == Some(format!("bearer {}", key.to_lowercase()));
    let status = if authorized {
        "204 No Content"
    } else {
        "401 Unauthorized"
    };
    let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    tcp.write_all(answer.as_bytes()).await.ok()?;
    authorized.then(|| serde_json::from_slice(&buf[end..end + length]).ok())?
}

/// Drift checks plan against a bulk snapshot of the managed deployments. One registered
/// after the snapshot was read is read into it with every other one waiting, in one
/// request, rather than each check reading its own; a deployment gone from Prefect is
/// reported by the next full read.
#[tokio::test]
async fn snapshots_read_late_registrations_together() {
    use kube::runtime::reflector::ObjectRef;
    use prefect_operator::api::PrefectDeployment;
    use prefect_operator::snapshot::Snapshots;
    let env = Env::new().await;
    let flow = unique("snapshot");
    let flow_id = env.client.upsert_flow(&flow).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..6 {
        let body =
            json!({"name": format!("d{i}"), "flow_id": flow_id, "enforce_parameter_schema": false});
        ids.push(env.client.create_deployment(&body).await.unwrap());
    }
    let who = |i: usize| ObjectRef::<PrefectDeployment>::new(&format!("r{i}")).within("ns");
    let snapshots = Snapshots::default();
    let filters = || {
        env.calls
            .snapshot()
            .get(&("POST".to_string(), "deployments_filter"))
            .copied()
            .unwrap_or(0)
    };
    let hour = Duration::from_secs(3600);
    let look = |i: usize, max_age: Duration| {
        let (snapshots, client, id) = (&snapshots, &env.client, ids[i].clone());
        async move {
            let mut changed = Vec::new();
            let found = snapshots
                .lookup(client, &id, max_age, |c| changed = c)
                .await
                .unwrap();
            (found.map(|d| d.id), changed)
        }
    };

    for (i, id) in ids.iter().enumerate().take(2) {
        snapshots.register(&env.client, id, who(i));
    }
    let before = filters();
    assert_eq!(look(0, hour).await.0.as_ref(), Some(&ids[0]));
    assert_eq!(look(1, hour).await.0.as_ref(), Some(&ids[1]));
    assert_eq!(filters() - before, 1, "one full read answers both");

    // Registered after that read, while it is still fresh.
    for (i, id) in ids.iter().enumerate().skip(2) {
        snapshots.register(&env.client, id, who(i));
    }
    let before = filters();
    for (i, id) in ids.iter().enumerate().skip(2) {
        assert_eq!(look(i, hour).await.0.as_ref(), Some(id), "d{i}");
    }
    assert_eq!(filters() - before, 1, "one read for the four late ones");
    let before = filters();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(look(i, hour).await.0.as_ref(), Some(id), "d{i}");
    }
    assert_eq!(filters(), before, "all answered from the snapshot");

    // Never registered: no answer and no request.
    let stranger = env
        .client
        .create_deployment(
            &json!({"name": "stranger", "flow_id": flow_id, "enforce_parameter_schema": false}),
        )
        .await
        .unwrap();
    let found = snapshots
        .lookup(&env.client, &stranger, hour, |_| {})
        .await
        .unwrap();
    assert!(found.is_none());
    assert_eq!(filters(), before);

    // Deleted behind the operator's back; a late one (read in with the others) counts
    // too. The next full read names both resources, and not the one asking.
    for gone in [&ids[4], &ids[0]] {
        let path = format!("/deployments/{gone}");
        assert_eq!(env.call(reqwest::Method::DELETE, &path, None).await, 204);
    }
    let (found, mut changed) = look(5, Duration::ZERO).await;
    assert_eq!(found.as_ref(), Some(&ids[5]));
    changed.sort_by_key(|t| t.name.clone());
    assert_eq!(changed, vec![who(0), who(4)]);
    assert_eq!(
        look(4, hour).await.0,
        None,
        "gone: read directly by the caller"
    );
}

/// The automations triggers made are read in bulk by id: one read answers every
/// resource, a fresh snapshot answers without a request, and a re-read names the
/// resources whose automations were edited or deleted in Prefect (each once).
#[tokio::test]
async fn automations_are_read_in_bulk_by_id() {
    use kube::runtime::reflector::ObjectRef;
    use prefect_operator::api::PrefectDeployment;
    use prefect_operator::snapshot::Snapshots;
    let env = Env::new().await;
    let pool = env.work_pool().await;
    let who = |i: usize| ObjectRef::<PrefectDeployment>::new(&format!("r{i}")).within("ns");
    let spec = env.spec(
        &pool,
        json!({"entrypoint": "flows/b.py:bulk",
            "triggers": [{"expect": ["a.one"]}, {"expect": ["a.two"]}]}),
    );
    let mut states = Vec::new();
    for _ in 0..3 {
        let mut state = SyncState::default();
        let name = unique("bulk-automations");
        env.apply(&spec, &name, &unique("uid"), &mut state)
            .await
            .0
            .unwrap();
        assert_eq!(state.automation_ids.len(), 2);
        states.push(state);
    }
    let snapshots = Snapshots::default();
    for (i, s) in states.iter().enumerate() {
        snapshots.register_automations(&env.client, &who(i), &s.automation_ids);
    }
    let filters = || env.calls.count("POST", "automations_filter");
    let hour = Duration::from_secs(3600);
    let look = |i: usize, max_age: Duration| {
        let (snapshots, client, ids) = (&snapshots, &env.client, states[i].automation_ids.clone());
        async move {
            let mut changed = Vec::new();
            let found = snapshots
                .lookup_automations(client, &ids, max_age, |c| changed = c)
                .await
                .unwrap();
            (
                found.map(|f| f.into_iter().map(|a| a.id).collect::<Vec<_>>()),
                changed,
            )
        }
    };
    let before = filters();
    if !env.automations_by_id().await {
        // The server refuses the filter: asked once, then never again.
        for i in 0..states.len() {
            assert_eq!(look(i, hour).await.0, None);
            assert!(!snapshots.automations_in_bulk(&env.client));
        }
        assert_eq!(filters() - before, 1);
        return;
    }
    for (i, s) in states.iter().enumerate() {
        assert_eq!(look(i, hour).await.0.as_ref(), Some(&s.automation_ids));
    }
    assert_eq!(filters() - before, 1, "one read answers all three");
    assert!(snapshots.automations_in_bulk(&env.client));

    // Both automations of r1 edited, one of r2 deleted, behind the operator's back.
    for a in &states[1].automation_ids {
        let path = format!("/automations/{a}");
        let body = json!({"enabled": false});
        assert_eq!(
            env.call(reqwest::Method::PATCH, &path, Some(body)).await,
            204
        );
    }
    let path = format!("/automations/{}", states[2].automation_ids[0]);
    assert_eq!(env.call(reqwest::Method::DELETE, &path, None).await, 204);
    let (found, mut changed) = look(0, Duration::ZERO).await;
    assert_eq!(found.as_ref(), Some(&states[0].automation_ids));
    changed.sort_by_key(|t| t.name.clone());
    assert_eq!(changed, vec![who(1), who(2)], "each resource named once");
    assert_eq!(look(2, hour).await.0, None, "one is gone: read directly");

    // A resource whose set changed keeps only its new ids.
    let fewer = &states[1].automation_ids[..1];
    snapshots.register_automations(&env.client, &who(1), fewer);
    let before = filters();
    let (_, changed) = look(0, Duration::ZERO).await;
    assert!(changed.is_empty(), "{changed:?}");
    let mut changed = Vec::new();
    let found = snapshots
        .lookup_automations(&env.client, &states[1].automation_ids, hour, |c| {
            changed = c
        })
        .await
        .unwrap();
    assert!(found.is_none(), "the dropped id is no longer read");
    assert_eq!(filters() - before, 1);
}

/// A drift check that finds the deployment and its automations in the snapshot as they
/// should be makes no request at all; an automation edited in Prefect is read directly
/// before it is put back.
#[tokio::test]
async fn automations_from_the_snapshot_are_checked_without_a_request() {
    let env = Env::new().await;
    let (spec, name, uid, mut state) = env.applied_with_a_trigger("snapshot-automations").await;
    let id = state.deployment_id.clone().unwrap();
    let aid = state.automation_ids[0].clone();
    state.check_automations = true;
    let snapshot = || async {
        execute::Snapshot {
            deployment: env.client.read_deployment(&id).await.unwrap().unwrap(),
            automations: env
                .client
                .read_automations(std::slice::from_ref(&aid))
                .await
                .unwrap(),
        }
    };
    let taken = snapshot().await;
    let by_id = env.automations_by_id().await;
    let expected = by_id.then_some(1);
    assert_eq!(taken.automations.as_ref().map(Vec::len), expected);
    let (r, changes, made) = env
        .apply_from(&spec, &name, &uid, &mut state, Some(taken))
        .await;
    r.unwrap();
    if by_id {
        assert!(made.is_empty(), "{made:?}");
    } else {
        // Without the snapshot's automations, the check reads them itself.
        assert_eq!(made, vec!["GET automations_related_to"]);
    }
    assert!(changes.is_empty(), "{changes:?}");

    let path = format!("/automations/{aid}");
    let edit = json!({"enabled": false});
    assert_eq!(
        env.call(reqwest::Method::PATCH, &path, Some(edit)).await,
        204
    );
    let taken = snapshot().await;
    let (r, changes, made) = env
        .apply_from(&spec, &name, &uid, &mut state, Some(taken))
        .await;
    r.unwrap();
    let times = |call: &str| made.iter().filter(|m| *m == call).count();
    assert_eq!(times("GET automations_related_to"), 1, "{made:?}");
    assert_eq!(times("GET deployment_by_name"), 1, "{made:?}");
    assert!(
        matches!(&changes[..], [Change::AutomationsRestored { .. }]),
        "{changes:?}"
    );
    let (code, a) = env
        .get(&format!("/automations/{}", state.automation_ids[0]))
        .await;
    assert_eq!(code, 200);
    assert_eq!(a["enabled"], json!(true));
}
