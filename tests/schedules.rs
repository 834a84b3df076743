//! The next-run preview against Prefect's own scheduler: a real Prefect 3.9.1 server
//! with its scheduler service on creates the runs of deployments the operator applied,
//! and their expected start times must be exactly the times the preview shows. The
//! schedules are chosen so their runs cross daylight-saving changes (a skipped and a
//! repeated local hour, for cron, rrule and interval alike).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prefect_operator::api::PrefectDeploymentSpec;
use prefect_operator::prefect::{http_client, CallLog, PrefectClient};
use prefect_operator::preview::schedules_preview;
use prefect_operator::reconcile::execute::{self, SyncState};
use prefect_operator::validate::validate;
use serde_json::{json, Value};
use support::{unique, PrefectServer};

struct Case {
    what: &'static str,
    schedule: Value,
    paused: bool,
}

fn cases() -> Vec<Case> {
    let case = |what, schedule| Case {
        what,
        schedule,
        paused: false,
    };
    vec![
        // Second Sunday of March at 02:30 in New York: a skipped time every year.
        case(
            "cron in the spring-forward gap",
            json!({"slug": "s", "cron": "30 2 8-14 3 0", "day_or": false, "timezone": "America/New_York"}),
        ),
        // First Sunday of November at 01:30: a repeated time every year.
        case(
            "cron in the fall-back overlap",
            json!({"slug": "s", "cron": "30 1 1-7 11 0", "day_or": false, "timezone": "America/New_York"}),
        ),
        case(
            "weekday cron in Berlin",
            json!({"slug": "s", "cron": "15 9 * * 1-5", "timezone": "Europe/Berlin"}),
        ),
        case(
            "rrule in the spring-forward gap",
            json!({"slug": "s", "rrule": "FREQ=YEARLY;BYMONTH=3;BYDAY=2SU;BYHOUR=2;BYMINUTE=30", "timezone": "America/New_York"}),
        ),
        // Prefect relabels DTSTART with the schedule's zone, keeping its wall-clock time.
        case(
            "rrule with a DTSTART in another zone",
            json!({"slug": "s", "rrule": "DTSTART;TZID=Europe/Berlin:20260301T083000\nRRULE:FREQ=MONTHLY;BYMONTHDAY=15", "timezone": "Asia/Tokyo"}),
        ),
        // 120 days from January: the runs cross both changes and keep 09:00 local.
        case(
            "whole-day interval across DST",
            json!({"slug": "s", "interval": "P120D", "anchor_date": "2026-01-10T09:00:00", "timezone": "America/New_York"}),
        ),
        // Under a day: elapsed time, whatever the clocks do.
        case(
            "five-hour interval",
            json!({"slug": "s", "interval": 18000, "anchor_date": "2026-11-01T01:30:00-04:00", "timezone": "America/New_York"}),
        ),
        // No anchor: Prefect anchors it when storing it; the preview must use that.
        case(
            "interval anchored by Prefect",
            json!({"slug": "s", "interval": "PT4H", "timezone": "Europe/London"}),
        ),
        case(
            "inactive schedule",
            json!({"slug": "s", "cron": "* * * * *", "active": false}),
        ),
        Case {
            what: "paused deployment",
            schedule: json!({"slug": "s", "cron": "* * * * *"}),
            paused: true,
        },
    ]
}

fn instants(times: &[String]) -> Vec<DateTime<Utc>> {
    times
        .iter()
        .map(|t| DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_matches_the_runs_prefects_scheduler_creates() {
    support::install_crypto();
    // Scheduler every 2 s; three runs per schedule however far ahead they are (the
    // DST-day schedules fire once a year).
    let server = tokio::task::spawn_blocking(|| {
        PrefectServer::start_with_settings(&[
            ("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "2"),
            ("PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS", "3"),
            ("PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS", "3"),
            (
                "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_SCHEDULED_TIME",
                "P1500D",
            ),
        ])
    })
    .await
    .unwrap();
    let pool = support::create_pool(&server);
    let client = PrefectClient::new(
        http_client(),
        &server.url,
        None,
        Arc::new(CallLog::default()),
    );
    let raw = reqwest::Client::new();

    // Apply every case the way the operator does, and take the preview it would show.
    let mut applied = Vec::new();
    for case in cases() {
        let spec: PrefectDeploymentSpec = serde_json::from_value(json!({
            "server": {"remoteApiUrl": server.url},
            "workPool": {"name": pool},
            "deployment": {
                "entrypoint": "flows/sched.py:sched",
                "paused": case.paused,
                "schedules": [case.schedule],
            },
        }))
        .unwrap();
        let name = unique("sched");
        let mut state = SyncState::default();
        let valid = validate(&spec, &name).unwrap_or_else(|p| panic!("{}: {p}", case.what));
        execute::apply(&client, &valid, "uid", &mut state, &mut Vec::new())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.what));
        let (preview, _) = schedules_preview(
            &valid.schedules,
            case.paused,
            &state.schedules_seen,
            &[],
            Utc::now(),
        );
        applied.push((
            case,
            state.deployment_id.unwrap(),
            preview[0].next_runs.clone(),
        ));
    }

    // Wait until the scheduler has planned every schedule that should have runs.
    let runs_of = |id: String| {
        let raw = raw.clone();
        let url = format!("{}/flow_runs/filter", server.url);
        async move {
            let body =
                json!({"deployments": {"id": {"any_": [id]}}, "sort": "EXPECTED_START_TIME_ASC"});
            let (code, runs) =
                support::prefect_call(&raw, reqwest::Method::POST, &url, Some(&body)).await;
            if code != 200 {
                return None;
            }
            let runs: Vec<Value> = serde_json::from_value(runs).unwrap();
            Some(
                runs.iter()
                    .map(|r| r["expected_start_time"].as_str().unwrap().to_string())
                    .collect::<Vec<_>>(),
            )
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut compared = 0;
    for (case, id, preview) in &applied {
        let expected = if preview.is_empty() { 0 } else { 3 };
        if expected == 0 {
            // These come last: the scheduler has planned the others by now; give it two
            // more loops to (wrongly) plan these.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let actual = loop {
            let runs = runs_of(id.clone()).await.unwrap_or_default();
            if runs.len() >= expected {
                break runs;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the scheduler created {} run(s) in time, expected {expected}",
                case.what,
                runs.len()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        if case.paused || case.schedule.get("active") == Some(&json!(false)) {
            assert!(preview.is_empty(), "{}: preview {preview:?}", case.what);
            assert!(
                actual.is_empty(),
                "{}: Prefect scheduled {actual:?}",
                case.what
            );
            continue;
        }
        let mut actual = instants(&actual);
        actual.sort();
        actual.truncate(3);
        assert_eq!(
            instants(preview),
            actual,
            "{}: preview {preview:?} vs Prefect's runs",
            case.what
        );
        compared += 1;
    }
    assert_eq!(compared, 8);
}

/// A slug renamed with `replaces` keeps the schedule's id, and its runs stay planned at
/// the same times. (Prefect 3.9 deletes a deployment's future auto-scheduled runs on any
/// update, a rename included, and its scheduler makes them again at its next loop: the
/// run ids change, the times do not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_slug_keeps_schedule_id_and_scheduled_runs() {
    support::install_crypto();
    let server = tokio::task::spawn_blocking(|| {
        PrefectServer::start_with_settings(&[
            ("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "2"),
            ("PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS", "3"),
            ("PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS", "3"),
        ])
    })
    .await
    .unwrap();
    let pool = support::create_pool(&server);
    let client = PrefectClient::new(
        http_client(),
        &server.url,
        None,
        Arc::new(CallLog::default()),
    );
    let raw = reqwest::Client::new();
    let spec = |schedule: Value| -> PrefectDeploymentSpec {
        serde_json::from_value(json!({
            "server": {"remoteApiUrl": server.url},
            "workPool": {"name": pool},
            "deployment": {"entrypoint": "flows/sched.py:sched", "schedules": [schedule]},
        }))
        .unwrap()
    };
    let name = unique("rename");
    let mut state = SyncState::default();
    let first =
        spec(json!({"slug": "old", "interval": 3600, "anchor_date": "2026-01-01T00:00:00Z"}));
    let valid = validate(&first, &name).unwrap();
    execute::apply(&client, &valid, "uid", &mut state, &mut Vec::new())
        .await
        .unwrap();
    let id = state.deployment_id.clone().unwrap();

    let runs = |raw: reqwest::Client, url: String, id: String| async move {
        let body =
            json!({"deployments": {"id": {"any_": [id]}}, "sort": "EXPECTED_START_TIME_ASC"});
        let url = format!("{url}/flow_runs/filter");
        let (code, list) =
            support::prefect_call(&raw, reqwest::Method::POST, &url, Some(&body)).await;
        assert_eq!(code, 200, "{list}");
        let list: Vec<Value> = serde_json::from_value(list).unwrap();
        let mut times: Vec<DateTime<Utc>> = list
            .iter()
            .map(|r| {
                DateTime::parse_from_rfc3339(r["expected_start_time"].as_str().unwrap())
                    .unwrap()
                    .with_timezone(&Utc)
            })
            .collect();
        times.sort();
        times
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let before = loop {
        let ids = runs(raw.clone(), server.url.clone(), id.clone()).await;
        if ids.len() >= 3 {
            break ids;
        }
        assert!(Instant::now() < deadline, "the scheduler made no runs");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let schedule_id = |d: &Value| d["schedules"][0]["id"].clone();
    let (_, d) = support::prefect_get(&raw, &format!("{}/deployments/{id}", server.url)).await;
    let sid = schedule_id(&d);

    let renamed = spec(
        json!({"slug": "new", "replaces": "old", "interval": 3600, "anchor_date": "2026-01-01T00:00:00Z"}),
    );
    let valid = validate(&renamed, &name).unwrap();
    let mut changes = Vec::new();
    execute::apply(&client, &valid, "uid", &mut state, &mut changes)
        .await
        .unwrap();
    assert_eq!(
        changes,
        vec![execute::Change::SchedulesChanged {
            created: vec![],
            updated: vec!["new (renamed from old)".into()],
            deleted: vec![],
        }]
    );
    let (_, d) = support::prefect_get(&raw, &format!("{}/deployments/{id}", server.url)).await;
    assert_eq!(d["schedules"].as_array().unwrap().len(), 1);
    assert_eq!(schedule_id(&d), sid, "same schedule");
    assert_eq!(d["schedules"][0]["slug"], json!("new"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let times = runs(raw.clone(), server.url.clone(), id.clone()).await;
        if times.len() >= before.len() {
            break times;
        }
        assert!(
            Instant::now() < deadline,
            "the scheduler made no runs after the rename"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Runs whose time passed meanwhile are not re-planned; compare the future ones.
    let now = Utc::now();
    let before: Vec<_> = before.into_iter().filter(|t| *t > now).collect();
    let after: Vec<_> = after
        .into_iter()
        .filter(|t| *t > now)
        .take(before.len())
        .collect();
    assert!(!before.is_empty());
    assert_eq!(
        after, before,
        "runs planned at the same times after the rename"
    );
    // And the rename is stable.
    let mut changes = Vec::new();
    execute::apply(&client, &valid, "uid", &mut state, &mut changes)
        .await
        .unwrap();
    assert!(changes.is_empty(), "{changes:?}");
}
