//! How fast the operator converges, side by side with Prefect's own
//! `RunnerDeployment.apply()` loop and with the server's floor (the same HTTP calls from a
//! minimal keep-alive client), on the same machine in the same run.
//!
//! `cargo bench --bench convergence` (sizes from BENCH_SIZES, default "100,1000";
//! `BENCH_DB=postgres` for a PostgreSQL-backed Prefect, SQLite otherwise; each phase
//! gets a fresh database).
//! Prints figures; asserts nothing about speed (shared machines are noisy).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use prefect_operator::api::PrefectDeployment;
use serde_json::{json, Value};
use support::{create_pool, http_get, unique, ControlPlane, PrefectServer};

const BIN: &str = env!("CARGO_BIN_EXE_prefect-operator");
/// Parallel requests for the floor client; the operator's default concurrency.
const CONCURRENCY: usize = 8;
/// Drift-check interval for the benchmark's operator, so one full resync fits in a run.
const RESYNC: &str = "60s";

/// The Prefect server of a phase, on a fresh database: PostgreSQL with
/// `BENCH_DB=postgres` (production's database), else SQLite (Prefect's default).
fn start_prefect(services: bool) -> PrefectServer {
    static PG: std::sync::OnceLock<Option<support::Postgres>> = std::sync::OnceLock::new();
    let pg = PG.get_or_init(|| {
        (std::env::var("BENCH_DB").as_deref() == Ok("postgres")).then(support::Postgres::start)
    });
    match pg {
        Some(pg) => PrefectServer::start_on_postgres(pg, services),
        None => PrefectServer::start_with(support::free_port(), None, services),
    }
}

fn database() -> &'static str {
    match std::env::var("BENCH_DB").as_deref() {
        Ok("postgres") => "PostgreSQL 15",
        _ => "SQLite",
    }
}

fn main() {
    // `cargo test --all-targets` also builds and runs benches; only `cargo bench` runs it.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    support::install_crypto();
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cp = ControlPlane::shared();
        let mut rows = Vec::new();
        for &n in &sizes {
            rows.push(round(cp, n, false).await);
        }
        if sizes.contains(&100) {
            rows.push(round(cp, 100, true).await);
        }
        let size = std::fs::metadata(BIN).map(|m| m.len()).unwrap_or(0);
        report(&rows, size);
    });
}

struct Row {
    n: usize,
    services: bool,
    op_secs: f64,
    latency: (f64, f64, f64),
    python_secs: f64,
    floor_secs: f64,
    steady: Steady,
    change_ms: f64,
    change_calls: BTreeMap<String, f64>,
    restart_secs: f64,
    restart_writes: u64,
    restart_k8s_writes: usize,
    rss_mib: f64,
    cpu_secs: f64,
}

struct Steady {
    secs: f64,
    calls: BTreeMap<String, f64>,
    k8s_writes: usize,
    /// Status writes of resources whose shown next run passed during the window: the
    /// preview refresh the operator does on purpose.
    preview_refreshes: usize,
}

async fn round(cp: &ControlPlane, n: usize, services: bool) -> Row {
    eprintln!(
        "== N={n}, Prefect services {}",
        if services { "on" } else { "off" }
    );
    let (op_secs, latency, steady, change_ms, change_calls, restart, cost) =
        operator_round(cp, n, services).await;
    eprintln!("   operator: {op_secs:.1} s");
    let python_secs = python_round(n, services);
    eprintln!("   python apply(): {python_secs:.1} s");
    let floor_secs = floor_round(n, services).await;
    eprintln!("   floor: {floor_secs:.1} s");
    Row {
        n,
        services,
        op_secs,
        latency,
        python_secs,
        floor_secs,
        steady,
        change_ms,
        change_calls,
        restart_secs: restart.0,
        restart_writes: restart.1,
        restart_k8s_writes: restart.2,
        rss_mib: cost.0,
        cpu_secs: cost.1,
    }
}

fn manifest(i: usize, ns: &str, url: &str, pool: &str) -> PrefectDeployment {
    let mut deployment = json!({
        "entrypoint": "flows/bench.py:bench_flow",
        "tags": ["bench", format!("group-{}", i % 10)],
        "parameters": {"index": i, "label": "bench"},
        "parameterOpenApiSchema": {"type": "object", "properties": {"index": {"type": "integer"}, "label": {"type": "string"}}},
        "schedules": [{"slug": "hourly", "cron": format!("{} * * * *", i % 60)}],
    });
    if i.is_multiple_of(4) {
        deployment["triggers"] = json!([{"expect": ["bench.event"]}]);
    }
    serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1", "kind": "PrefectDeployment",
        "metadata": {"name": format!("bench-{i}"), "namespace": ns},
        "spec": {"server": {"remoteApiUrl": url}, "workPool": {"name": pool}, "deployment": deployment},
    }))
    .unwrap()
}

fn is_ready(o: &PrefectDeployment) -> bool {
    let Some(s) = &o.status else { return false };
    s.observed_generation == o.metadata.generation
        && s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

struct OperatorProcess {
    child: Child,
    port: u16,
}

impl OperatorProcess {
    fn start(cp: &ControlPlane, ns: &str) -> Self {
        let port = support::free_port();
        let child = Command::new(BIN)
            .args([
                "run",
                &format!("--namespace={ns}"),
                &format!("--admin-addr=127.0.0.1:{port}"),
                &format!("--default-resync-interval={RESYNC}"),
            ])
            .env("KUBECONFIG", &cp.kubeconfig)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let op = OperatorProcess { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(port, "/livez", None).is_none() {
            assert!(Instant::now() < deadline, "operator did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        op
    }

    /// Reconcile passes that ended well, from the operator's own metric. A drift check
    /// may read Prefect in bulk, so passes, not reads, say every resource was looked at.
    fn passes(&self) -> f64 {
        let text = http_get(self.port, "/metrics", None)
            .map(|(_, b)| b)
            .unwrap_or_default();
        text.lines()
            .filter(|l| {
                l.starts_with("prefect_operator_reconciles_total{") && l.contains("result=\"ok\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Prefect request counts by "METHOD endpoint".
    fn calls(&self) -> BTreeMap<String, f64> {
        let text = http_get(self.port, "/metrics", None)
            .map(|(_, b)| b)
            .unwrap_or_default();
        let mut out = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| l.starts_with("prefect_operator_prefect_request_duration_seconds_count{"))
        {
            let label = |k: &str| -> String {
                let start = line
                    .find(&format!("{k}=\""))
                    .map(|i| i + k.len() + 2)
                    .unwrap_or(0);
                line[start..].split('"').next().unwrap_or("").to_string()
            };
            let value: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *out.entry(format!("{} {}", label("method"), label("endpoint")))
                .or_default() += value;
        }
        out
    }

    /// Where a reconcile's time goes: mean duration of each kind of Prefect request and
    /// of a whole reconcile pass, in milliseconds, with counts.
    fn profile(&self) -> Vec<(String, f64, f64)> {
        let text = http_get(self.port, "/metrics", None)
            .map(|(_, b)| b)
            .unwrap_or_default();
        let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for line in text.lines() {
            let (series, value) = match line.rsplit_once(' ') {
                Some((s, v)) => (s, v.parse::<f64>().unwrap_or(0.0)),
                None => continue,
            };
            let key_of = |s: &str| -> Option<(String, bool)> {
                let (name, labels) = s.split_once('{').unwrap_or((s, ""));
                let is_sum = name.ends_with("_sum");
                if !(is_sum || name.ends_with("_count")) {
                    return None;
                }
                let base = name.trim_end_matches("_sum").trim_end_matches("_count");
                let label = |k: &str| {
                    labels
                        .split(&format!("{k}=\""))
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .unwrap_or("")
                        .to_string()
                };
                match base {
                    "prefect_operator_prefect_request_duration_seconds" => {
                        Some((format!("{} {}", label("method"), label("endpoint")), is_sum))
                    }
                    "prefect_operator_reconcile_duration_seconds" => {
                        Some(("reconcile pass".into(), is_sum))
                    }
                    _ => None,
                }
            };
            if let Some((key, is_sum)) = key_of(series) {
                let e = sums.entry(key).or_default();
                if is_sum {
                    e.0 += value;
                } else {
                    e.1 += value;
                }
            }
        }
        sums.into_iter()
            .filter(|(_, (_, c))| *c > 0.0)
            .map(|(k, (s, c))| (k, s / c * 1000.0, c))
            .collect()
    }

    /// Peak RSS (MiB) and CPU seconds so far.
    fn cost(&self) -> (f64, f64) {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hwm_kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which is in parentheses): utime is 14th, stime 15th.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let clk = 100.0; // USER_HZ on Linux
        (hwm_kb / 1024.0, (ticks(11) + ticks(12)) / clk)
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn diff(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// Requests that change something: everything but GETs and the bulk read (a POST).
fn writes(calls: &BTreeMap<String, f64>) -> u64 {
    calls
        .iter()
        .filter(|(k, _)| !k.starts_with("GET ") && k.as_str() != "POST deployments_filter")
        .map(|(_, v)| *v as u64)
        .sum()
}

async fn resource_versions(api: &Api<PrefectDeployment>) -> HashMap<String, String> {
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|o| {
            (
                o.metadata.name.unwrap(),
                o.metadata.resource_version.unwrap(),
            )
        })
        .collect()
}

/// Each resource's `status.nextRun`, as an instant.
async fn shown_next_runs(
    api: &Api<PrefectDeployment>,
) -> HashMap<String, Option<chrono::DateTime<chrono::Utc>>> {
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|o| {
            let t = o
                .status
                .and_then(|s| s.next_run)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&chrono::Utc));
            (o.metadata.name.unwrap(), t)
        })
        .collect()
}

fn changed(a: &HashMap<String, String>, b: &HashMap<String, String>) -> usize {
    a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).count()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

#[allow(clippy::type_complexity)]
async fn operator_round(
    cp: &ControlPlane,
    n: usize,
    services: bool,
) -> (
    f64,
    (f64, f64, f64),
    Steady,
    f64,
    BTreeMap<String, f64>,
    (f64, u64, usize),
    (f64, f64),
) {
    let prefect = start_prefect(services);
    let pool = create_pool(&prefect);
    let kube = cp.client().await;
    let ns = unique("bench");
    cp.kubectl_ok(&["create", "namespace", &ns]);
    let api: Api<PrefectDeployment> = Api::namespaced(kube.clone(), &ns);

    // Create the N resources first, then start the operator: a fresh install.
    let created: HashMap<String, Instant> = stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let pd = manifest(i, &ns, &prefect.url, &pool);
            async move {
                api.create(&PostParams::default(), &pd).await.unwrap();
                (format!("bench-{i}"), Instant::now())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;

    let mut op = OperatorProcess::start(cp, &ns);
    let started = Instant::now();
    let mut ready_at: HashMap<String, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while ready_at.len() < n {
        for o in api.list(&ListParams::default()).await.unwrap().items {
            let name = o.metadata.name.clone().unwrap();
            if is_ready(&o) && !ready_at.contains_key(&name) {
                ready_at.insert(name, Instant::now());
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {}/{n} Ready after 10 min",
            ready_at.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let op_secs = started.elapsed().as_secs_f64();
    eprintln!("   cold convergence profile (mean ms, count):");
    for (what, mean_ms, count) in op.profile() {
        eprintln!("     {what:<32} {mean_ms:>8.1} ms  x{count}");
    }
    let mut lat: Vec<f64> = ready_at
        .iter()
        .map(|(k, t)| t.duration_since(created[k]).as_secs_f64())
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let latency = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.95),
        *lat.last().unwrap(),
    );

    // Steady state: nothing changed; wait for every resource to be re-read once.
    let calls0 = op.calls();
    let passes0 = op.passes();
    let rv0 = resource_versions(&api).await;
    let shown_at_start = shown_next_runs(&api).await;
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(300);
    while op.passes() - passes0 < n as f64 {
        assert!(
            Instant::now() < deadline,
            "resync did not cover every resource"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let shown0 = shown_at_start;
    let rv1 = resource_versions(&api).await;
    let ended = chrono::Utc::now();
    let due: Vec<&String> = shown0
        .iter()
        .filter(|(_, t)| t.is_some_and(|t| t <= ended))
        .map(|(k, _)| k)
        .collect();
    let refreshed = rv1
        .iter()
        .filter(|(k, v)| rv0.get(*k) != Some(*v) && due.contains(k))
        .count();
    let steady = Steady {
        secs: t0.elapsed().as_secs_f64(),
        calls: diff(&op.calls(), &calls0),
        k8s_writes: changed(&rv0, &rv1) - refreshed,
        preview_refreshes: refreshed,
    };

    // One change: a new cron on one resource.
    let before = op.calls();
    let t = Instant::now();
    let patch =
        json!({"spec": {"deployment": {"schedules": [{"slug": "hourly", "cron": "17 3 * * *"}]}}});
    api.patch("bench-1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    loop {
        let o = api.get("bench-1").await.unwrap();
        if is_ready(&o) && o.metadata.generation == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let change_ms = t.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let change_calls = diff(&op.calls(), &before);
    let first_cost = op.cost();

    // Restart: kill it, start again, wait until every resource was re-checked.
    let rv0 = resource_versions(&api).await;
    drop(op);
    op = OperatorProcess::start(cp, &ns);
    let t = Instant::now();
    while op.passes() < n as f64 {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "restart did not re-check everything"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restart_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restart = (
        restart_secs,
        writes(&op.calls()),
        changed(&rv0, &resource_versions(&api).await),
    );
    let second_cost = op.cost();
    let cost = (
        first_cost.0.max(second_cost.0),
        first_cost.1 + second_cost.1,
    );
    (
        op_secs,
        latency,
        steady,
        change_ms,
        change_calls,
        restart,
        cost,
    )
}

/// Prefect's Python `RunnerDeployment.apply()` in a loop, on a fresh database.
fn python_round(n: usize, services: bool) -> f64 {
    let prefect = start_prefect(services);
    let pool = create_pool(&prefect);
    let python = support::assets().prefect_bin.with_file_name("python");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/python_apply.py"
        ))
        .arg(n.to_string())
        .arg(&pool)
        .env("PREFECT_API_URL", &prefect.url)
        .env("PREFECT_HOME", dir.path())
        .env("PREFECT_LOGGING_LEVEL", "ERROR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python apply loop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let v: Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("unexpected output: {line}"));
    v["seconds"].as_f64().unwrap()
}

/// The same create calls from a minimal keep-alive client, no logic in between.
async fn floor_round(n: usize, services: bool) -> f64 {
    let prefect = start_prefect(services);
    let pool = create_pool(&prefect);
    let http = reqwest::Client::new();
    let url = Arc::new(prefect.url.clone());
    let post = |path: String, body: Value| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            // Retry what any client must: 503s and reset connections.
            loop {
                match http.post(format!("{url}{path}")).json(&body).send().await {
                    Ok(r) if r.status().as_u16() != 503 => {
                        assert!(r.status().is_success(), "{path}: {}", r.status());
                        return r.json::<Value>().await.unwrap();
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    };
    let started = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let pool = pool.clone();
            let post = &post;
            async move {
                let flow = post("/flows/".into(), json!({"name": "bench-flow"})).await;
                let dep = post(
                    "/deployments/".into(),
                    json!({
                        "name": format!("bench-{i}"), "flow_id": flow["id"], "work_pool_name": pool,
                        "entrypoint": "flows/bench.py:bench_flow", "tags": ["bench", format!("group-{}", i % 10)],
                        "parameters": {"index": i, "label": "bench"}, "enforce_parameter_schema": true,
                        "parameter_openapi_schema": {"type": "object", "properties": {"index": {"type": "integer"}, "label": {"type": "string"}}},
                        "schedules": [{"schedule": {"cron": format!("{} * * * *", i % 60), "timezone": "UTC"}, "slug": "hourly"}],
                    }),
                )
                .await;
                if i.is_multiple_of(4) {
                    let id = dep["id"].as_str().unwrap();
                    post(
                        "/automations/".into(),
                        json!({"name": format!("bench-{i}__automation_1"), "trigger": {"type": "event", "expect": ["bench.event"], "posture": "Reactive", "threshold": 1, "within": 0},
                               "actions": [{"type": "run-deployment", "source": "selected", "deployment_id": id}], "owner_resource": format!("prefect.deployment.{id}")}),
                    )
                    .await;
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    started.elapsed().as_secs_f64()
}

fn fmt_calls(calls: &BTreeMap<String, f64>) -> String {
    if calls.is_empty() {
        return "none".into();
    }
    calls
        .iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(rows: &[Row], binary_size: u64) {
    println!();
    println!("Prefect's database: {}", database());
    println!("| N | Prefect services | operator res/s | latency p50 / p95 / max (s) | Python apply() res/s | floor res/s | operator/floor | operator/Python |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (op, py, fl) = (
            r.n as f64 / r.op_secs,
            r.n as f64 / r.python_secs,
            r.n as f64 / r.floor_secs,
        );
        println!(
            "| {} | {} | {op:.1} | {:.1} / {:.1} / {:.1} | {py:.1} | {fl:.1} | {:.2}x | {:.2}x |",
            r.n,
            if r.services { "on" } else { "off" },
            r.latency.0,
            r.latency.1,
            r.latency.2,
            op / fl,
            op / py
        );
    }
    println!();
    println!("| N | services | steady-state resync: Prefect calls | Prefect writes | K8s writes (+ next-run refreshes) | one cron change: ms | restart: s to re-check all | restart Prefect writes | restart K8s writes | peak RSS MiB | CPU s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} (over {:.0} s) | {} | {} (+ {}) | {:.0} | {:.1} | {} | {} | {:.1} | {:.1} |",
            r.n,
            if r.services { "on" } else { "off" },
            fmt_calls(&r.steady.calls),
            r.steady.secs,
            writes(&r.steady.calls),
            r.steady.k8s_writes,
            r.steady.preview_refreshes,
            r.change_ms,
            r.restart_secs,
            r.restart_writes,
            r.restart_k8s_writes,
            r.rss_mib,
            r.cpu_secs
        );
    }
    println!();
    for r in rows {
        println!(
            "N={} services={}: Prefect calls for one cron change: {}",
            r.n,
            r.services,
            fmt_calls(&r.change_calls)
        );
    }
    println!(
        "release binary: {binary_size} bytes ({:.1} MiB)",
        binary_size as f64 / 1048576.0
    );
}
