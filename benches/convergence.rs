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
use prefect_operator::prefect::is_write;
use serde_json::{json, Value};
use support::{create_pool, http_get, unique, ControlPlane, PrefectServer};

const BIN: &str = env!("CARGO_BIN_EXE_prefect-operator");

/// The operator binary: this build's, or `BENCH_BIN` (for example the static musl
/// build `scripts/build-static.sh` makes, which the container image ships).
fn operator_bin() -> String {
    std::env::var("BENCH_BIN").unwrap_or_else(|_| BIN.to_string())
}
/// Parallel requests for the floor client: the operator's default limit of requests in
/// flight per server (`--max-requests-per-server`).
const CONCURRENCY: usize = 8;
/// The floor again at the operator's default number of parallel passes
/// (`--concurrency`), for comparison.
const PASSES: usize = 32;
/// Drift-check interval for the benchmark's operator, so one full resync fits in a run.
const RESYNC: &str = "60s";

/// The PostgreSQL instance of this run, with `BENCH_DB=postgres`.
fn postgres() -> Option<&'static support::Postgres> {
    static PG: std::sync::OnceLock<Option<support::Postgres>> = std::sync::OnceLock::new();
    PG.get_or_init(|| {
        (std::env::var("BENCH_DB").as_deref() == Ok("postgres")).then(support::Postgres::start)
    })
    .as_ref()
}

/// With `BENCH_PIN=1` the Prefect server gets CPU 0 to itself and everything else (the
/// control plane, the database, the operator, the clients) shares CPU 1, as when Prefect
/// and the Kubernetes control plane run on machines of their own.
fn pinned() -> bool {
    std::env::var("BENCH_PIN").as_deref() == Ok("1")
}

/// The Prefect server of a phase, on a fresh database: PostgreSQL with
/// `BENCH_DB=postgres` (production's database), else SQLite (Prefect's default).
fn start_prefect(services: bool) -> PrefectServer {
    placed(match postgres() {
        Some(pg) => PrefectServer::start_on_postgres(pg, services),
        None => PrefectServer::start_with(support::free_port(), None, services),
    })
}

/// `server`, moved onto its own CPU with `BENCH_PIN=1`.
fn placed(server: PrefectServer) -> PrefectServer {
    if pinned() {
        server.pin("0");
    }
    server
}

/// A fresh database that outlives the server using it (a new one in PostgreSQL, or a
/// SQLite file in `dir`), so a server started again on it finds everything.
fn durable_database(dir: &std::path::Path) -> String {
    match postgres() {
        Some(pg) => pg.fresh_database(),
        None => format!("sqlite+aiosqlite:///{}/prefect.db", dir.display()),
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
    if pinned() {
        // Before any thread or child exists: all of them inherit it.
        support::pin_tree(std::process::id(), "1");
    }
    support::install_crypto();
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    // Phases beyond the per-size rounds: the event stream cut, and a Prefect outage
    // during a cold start (at the largest size, at most 1000).
    let phases = std::env::var("BENCH_PHASES").unwrap_or_else(|_| "cut,outage".into());
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
        let cut = if phases.contains("cut") {
            Some(cut_round(cp, 100).await)
        } else {
            None
        };
        let outage = if phases.contains("outage") {
            let n = sizes.iter().copied().max().unwrap_or(100).min(1000);
            Some(outage_round(cp, n).await)
        } else {
            None
        };
        let size = std::fs::metadata(operator_bin())
            .map(|m| m.len())
            .unwrap_or(0);
        report(&rows, cut.as_ref(), outage.as_ref(), size);
    });
    if let Some(pg) = postgres() {
        pg.stop();
    }
}

struct Row {
    n: usize,
    services: bool,
    op_secs: f64,
    latency: (f64, f64, f64),
    /// Deployments the Python loop applied (`BENCH_COMPARE_MAX` caps it) and its seconds.
    python: (usize, f64),
    /// The same for the floor client: at 8 requests in flight just before the operator
    /// and again after Prefect's loop (the machine's speed drifts over a run), and at
    /// `PASSES`.
    floor_before: (usize, f64),
    floor: (usize, f64),
    floor_wide: (usize, f64),
    /// Prefect server CPU seconds spent on each client's deployments: the operator's
    /// cold start, Prefect's loop, the two floor runs at 8 together, the floor at
    /// `PASSES`.
    server_cpu: ServerCpu,
    /// CPU seconds of the apiserver and etcd during the operator's cold start.
    control_plane_cpu: f64,
    /// Requests the apiserver served during the operator's cold start.
    k8s_cold: BTreeMap<String, f64>,
    steady: Steady,
    /// The resync window after it.
    steady2: Steady,
    change_ms: f64,
    change_calls: BTreeMap<String, f64>,
    restart_secs: f64,
    restart_writes: u64,
    /// Prefect calls of the restarted operator until every resource was re-checked.
    restart_calls: BTreeMap<String, f64>,
    /// Kubernetes writes during the restart: (others, next-run refreshes).
    restart_k8s_writes: (usize, usize),
    repair: Repair,
    rss_mib: f64,
    cpu_secs: f64,
    cold_calls: BTreeMap<String, f64>,
    /// Cold-start comparisons again (`BENCH_REPEATS`), each on fresh databases.
    repeats: Vec<Cycle>,
}

/// One more comparison after the round's own: the operator's cold start, Prefect's loop,
/// then the floor at 8 (seconds each). The floor run just before it is the previous
/// cycle's (or the round's "after"), so each cold start has a floor run on either side.
struct Cycle {
    operator: f64,
    /// The operator's cold start with `BENCH_VARIANT`'s environment, if given.
    variant: Option<f64>,
    python: f64,
    floor_before: f64,
    floor_after: f64,
}

#[derive(Default)]
struct ServerCpu {
    operator: f64,
    python: f64,
    floor: f64,
    floor_wide: f64,
    /// Seconds during which some process of the machine waited for a CPU (Linux's
    /// pressure stall information), over the operator's cold start and over both floor
    /// runs at 8: the server's wait for a CPU, when it has to share one.
    operator_stall: f64,
    floor_stall: f64,
}

/// Seconds so far during which some task waited for a CPU (`/proc/pressure/cpu`);
/// NaN where the kernel does not report it.
fn cpu_stall_seconds() -> f64 {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|t| {
            let some = t.lines().find(|l| l.starts_with("some"))?;
            let total = some
                .split_whitespace()
                .find_map(|f| f.strip_prefix("total="))?;
            total.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |us| us / 1e6)
}

/// CPU seconds so far of every live process on the machine, summed by command name
/// (`/proc/*/stat`): where a phase's CPU went, the Prefect server and its database included.
fn cpu_by_command() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        if !entry
            .file_name()
            .to_str()
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        *out.entry(stat[open + 1..close].to_string()).or_default() +=
            (ticks(11) + ticks(12)) / 100.0;
    }
    out
}

/// The commands that used at least 0.1 CPU seconds between `before` and now, busiest
/// first, as "name 1.2 s" over `secs` of wall time.
fn cpu_breakdown(before: &BTreeMap<String, f64>, secs: f64) -> String {
    let mut used: Vec<(String, f64)> = diff(&cpu_by_command(), before)
        .into_iter()
        .filter(|(_, v)| *v >= 0.1)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = used.iter().map(|u| u.1).sum();
    let parts: Vec<String> = used.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
    format!(
        "{total:.1} s CPU in {secs:.1} s ({:.2} cores): {}",
        total / secs,
        parts.join(", ")
    )
}

/// The apiserver's request counts so far, by verb and resource (its own metrics).
fn apiserver_requests(cp: &ControlPlane) -> BTreeMap<String, f64> {
    let text = cp.kubectl_ok(&["get", "--raw", "/metrics"]);
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let (verb, resource, sub) = (label("verb"), label("resource"), label("subresource"));
        if verb == "WATCH" || resource.is_empty() {
            continue;
        }
        let key = match sub.as_str() {
            "" => format!("{verb} {resource}"),
            sub => format!("{verb} {resource}/{sub}"),
        };
        *out.entry(key).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// One comparison client's run: its seconds, and over the same span the Prefect
/// server's CPU seconds and the machine's CPU stall seconds.
struct Ran {
    secs: f64,
    server_cpu: f64,
    stall: f64,
}

struct Steady {
    secs: f64,
    calls: BTreeMap<String, f64>,
    k8s_writes: usize,
    /// Status writes of resources whose shown next run passed during the window: the
    /// preview refresh the operator does on purpose.
    preview_refreshes: usize,
}

/// Seconds from an out-of-band change in Prefect to its repair, one sample per change.
#[derive(Default)]
struct Repair {
    edits: Vec<f64>,
    deletes: Vec<f64>,
}

async fn round(cp: &ControlPlane, n: usize, services: bool) -> Row {
    eprintln!(
        "== N={n}, Prefect services {}",
        if services { "on" } else { "off" }
    );
    // The comparison loops can be capped (`BENCH_COMPARE_MAX`, 0 skips them): at
    // N=10000 Prefect's own loop alone takes about 20 minutes.
    let cap = std::env::var("BENCH_COMPARE_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(n, |max: usize| n.min(max));
    let before = if cap > 0 {
        let ran = floor_round(cap, services, CONCURRENCY).await;
        eprintln!("   floor of {cap} (before): {:.1} s", ran.secs);
        Some(ran)
    } else {
        None
    };
    let mut row = operator_round(cp, n, services).await;
    eprintln!("   operator: {:.1} s", row.op_secs);
    if let Some(before) = before {
        let python = python_round(cap, services);
        eprintln!("   python apply() of {cap}: {:.1} s", python.secs);
        let after = floor_round(cap, services, CONCURRENCY).await;
        eprintln!("   floor of {cap} (after): {:.1} s", after.secs);
        let wide = floor_round(cap, services, PASSES).await;
        eprintln!("   floor of {cap} at {PASSES}: {:.1} s", wide.secs);
        row.floor_before = (cap, before.secs);
        row.floor = (cap, after.secs);
        row.floor_wide = (cap, wide.secs);
        row.python = (cap, python.secs);
        let c = &mut row.server_cpu;
        c.floor = before.server_cpu + after.server_cpu;
        c.floor_stall = before.stall + after.stall;
        c.floor_wide = wide.server_cpu;
        c.python = python.server_cpu;
        // Machine speed drifts by more than the margins measured here, so the ratios
        // are taken again on fresh databases and reported with their median.
        let mut floor_before = after.secs;
        let variant = variant();
        for k in 1..repeats() {
            // The two settings take turns going first: each cycle's control plane holds
            // every earlier cycle's resources.
            let (operator, variant) = if variant.is_empty() {
                (cold_start_only(cp, cap, services, &[]).await, None)
            } else if k % 2 == 1 {
                let v = cold_start_only(cp, cap, services, &variant).await;
                (cold_start_only(cp, cap, services, &[]).await, Some(v))
            } else {
                let o = cold_start_only(cp, cap, services, &[]).await;
                (o, Some(cold_start_only(cp, cap, services, &variant).await))
            };
            let python = python_round(cap, services).secs;
            let floor_after = floor_round(cap, services, CONCURRENCY).await.secs;
            eprintln!(
                "   again: operator {operator:.1} s (variant {variant:?}), python apply() {python:.1} s, floor {floor_after:.1} s"
            );
            row.repeats.push(Cycle {
                operator,
                variant,
                python,
                floor_before,
                floor_after,
            });
            floor_before = floor_after;
        }
    }
    row
}

/// How many times the cold-start comparison runs at each size (`BENCH_REPEATS`, default 1).
fn repeats() -> usize {
    std::env::var("BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Environment for a second operator cold start in each repeated cycle
/// (`BENCH_VARIANT="NAME=value,..."`), to compare two settings on the same machine
/// minutes apart rather than runs apart.
fn variant() -> Vec<(String, String)> {
    std::env::var("BENCH_VARIANT")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// A fresh install's cold start of `n` resources against a fresh database, in seconds,
/// and nothing else; the operator gets `env` on top of this process's environment.
async fn cold_start_only(
    cp: &ControlPlane,
    n: usize,
    services: bool,
    env: &[(String, String)],
) -> f64 {
    let prefect = start_prefect(services);
    let (ns, api, _) = populate(cp, "again", &prefect, n).await;
    let op = OperatorProcess::start_with_env(cp, &ns, RESYNC, env);
    let started = Instant::now();
    wait_ready(&api, n, cold_limit(n)).await;
    let secs = started.elapsed().as_secs_f64();
    drop(op);
    secs
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
    /// The release binary watching `ns`, with `resync` between drift checks.
    fn start(cp: &ControlPlane, ns: &str, resync: &str) -> Self {
        Self::start_with_env(cp, ns, resync, &[])
    }

    fn start_with_env(cp: &ControlPlane, ns: &str, resync: &str, env: &[(String, String)]) -> Self {
        let port = support::free_port();
        let child = Command::new(operator_bin())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args([
                "run",
                &format!("--namespace={ns}"),
                &format!("--admin-addr=127.0.0.1:{port}"),
                &format!("--default-resync-interval={resync}"),
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

    /// The sum of a metric's series (0 when absent).
    fn metric(&self, name: &str) -> f64 {
        let text = http_get(self.port, "/metrics", None)
            .map(|(_, b)| b)
            .unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
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

    /// Resident memory now (MiB), for the progress lines.
    fn rss_now(&self) -> f64 {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
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

/// Requests that change something (`prefect::is_write`; the stream's probes are listed
/// with the calls, not counted here).
fn writes(calls: &BTreeMap<String, f64>) -> u64 {
    calls
        .iter()
        .filter(|(k, _)| k.split_once(' ').is_some_and(|(m, e)| is_write(m, e)))
        .map(|(_, v)| *v as u64)
        .sum()
}

/// One resource as a list shows it: its resourceVersion and its `status.nextRun`.
struct Shown {
    rv: String,
    next_run: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every resource of the namespace, from one list (two lists of 10,000 objects are
/// seconds apart, and a preview refreshed between them would be counted wrongly).
async fn shown(api: &Api<PrefectDeployment>) -> HashMap<String, Shown> {
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|o| {
            let next_run = o
                .status
                .and_then(|s| s.next_run)
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&chrono::Utc));
            let rv = o.metadata.resource_version.unwrap();
            (o.metadata.name.unwrap(), Shown { rv, next_run })
        })
        .collect()
}

/// Resources written between two lists: (other writes, next-run refreshes). A refresh
/// is a write to a resource whose shown next run had passed by `until`: the operator
/// rewrites such a preview on purpose.
fn status_writes(
    before: &HashMap<String, Shown>,
    after: &HashMap<String, Shown>,
    until: chrono::DateTime<chrono::Utc>,
) -> (usize, usize) {
    let mut counts = (0, 0);
    for (name, b) in before {
        if after.get(name).map(|a| &a.rv) == Some(&b.rv) {
            continue;
        }
        if b.next_run.is_some_and(|t| t <= until) {
            counts.1 += 1;
        } else {
            counts.0 += 1;
        }
    }
    counts
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        k if k % 2 == 1 => v[k / 2],
        k => (v[k / 2 - 1] + v[k / 2]) / 2.0,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

#[allow(clippy::type_complexity)]
/// Creates resources `0..n` for `prefect` (at most 16 at a time); when each was created.
async fn create_resources(
    api: &Api<PrefectDeployment>,
    ns: &str,
    url: &str,
    pool: &str,
    n: usize,
) -> HashMap<String, Instant> {
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let pd = manifest(i, ns, url, pool);
            async move {
                api.create(&PostParams::default(), &pd).await.unwrap();
                (format!("bench-{i}"), Instant::now())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// A new namespace holding resources `0..n` for `prefect` (their work pool created
/// first); when each resource was created.
async fn populate(
    cp: &ControlPlane,
    prefix: &str,
    prefect: &PrefectServer,
    n: usize,
) -> (String, Api<PrefectDeployment>, HashMap<String, Instant>) {
    let pool = create_pool(prefect);
    let ns = unique(prefix);
    cp.kubectl_ok(&["create", "namespace", &ns]);
    let api: Api<PrefectDeployment> = Api::namespaced(cp.client().await, &ns);
    let created = create_resources(&api, &ns, &prefect.url, &pool, n).await;
    (ns, api, created)
}

/// Waits until `n` resources of the namespace are Ready for their generation, and says
/// when each first was. A watch, not repeated lists: measuring must not load the
/// apiserver that the operator shares the machine with.
async fn wait_ready(
    api: &Api<PrefectDeployment>,
    n: usize,
    limit: Duration,
) -> HashMap<String, Instant> {
    use kube::runtime::watcher::{self, Event};
    use kube::runtime::WatchStreamExt;
    let events = watcher::watcher(api.clone(), watcher::Config::default()).default_backoff();
    futures::pin_mut!(events);
    let deadline = tokio::time::Instant::now() + limit;
    let mut ready = HashMap::new();
    while ready.len() < n {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(Ok(Event::Apply(o) | Event::InitApply(o)))) => {
                if is_ready(&o) {
                    ready
                        .entry(o.metadata.name.clone().unwrap())
                        .or_insert_with(Instant::now);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!("only {}/{n} Ready after {limit:?}", ready.len()),
        }
    }
    ready
}

/// Time allowed for a cold start of `n` resources.
fn cold_limit(n: usize) -> Duration {
    Duration::from_secs(600.max(n as u64 / 4))
}

async fn operator_round(cp: &ControlPlane, n: usize, services: bool) -> Row {
    let prefect = start_prefect(services);
    // Create the N resources first, then start the operator: a fresh install.
    let (ns, api, created) = populate(cp, "bench", &prefect, n).await;
    let (server0, cp0, stall0) = (prefect.cpu_seconds(), cp.cpu_seconds(), cpu_stall_seconds());
    let k8s0 = apiserver_requests(cp);
    let machine0 = cpu_by_command();
    let mut op = OperatorProcess::start(cp, &ns, RESYNC);
    let started = Instant::now();
    let ready_at = wait_ready(&api, n, cold_limit(n)).await;
    let op_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "   machine during the cold start: {}",
        cpu_breakdown(&machine0, op_secs)
    );
    let server_cpu = ServerCpu {
        operator: prefect.cpu_seconds() - server0,
        operator_stall: cpu_stall_seconds() - stall0,
        ..ServerCpu::default()
    };
    let control_plane_cpu = cp.cpu_seconds() - cp0;
    // The benchmark's own watch and metrics reads are in it too (a handful).
    let k8s_cold = diff(&apiserver_requests(cp), &k8s0);
    let cold_calls = op.calls();
    eprintln!(
        "   cold start: {op_secs:.1} s, RSS {:.1} MiB (peak {:.1}), limit decreases {}",
        op.rss_now(),
        op.cost().0,
        op.metric("prefect_operator_request_limit_decreases_total")
    );
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

    // Steady state: nothing changed; wait for every resource to be re-read once. Then a
    // second window: what the first one held only because it followed the cold start
    // (changes from its last minutes) is gone there.
    let steady = steady_window(&op, &api, n).await;
    eprintln!(
        "   steady state: RSS {:.1} MiB (peak {:.1})",
        op.rss_now(),
        op.cost().0
    );
    let steady2 = steady_window(&op, &api, n).await;

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

    // Restart: kill it, start again (now with an hour between drift checks, for the
    // repair phase below), wait until every resource was re-checked.
    let before = shown(&api).await;
    drop(op);
    op = OperatorProcess::start(cp, &ns, "1h");
    let t = Instant::now();
    while op.passes() < n as f64 {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "restart did not re-check everything"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restart_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "   restart: {restart_secs:.1} s, RSS {:.1} MiB (peak {:.1})",
        op.rss_now(),
        op.cost().0
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restart_calls = op.calls();
    let restart_writes = writes(&restart_calls);
    let restart_k8s_writes = status_writes(&before, &shown(&api).await, chrono::Utc::now());

    // Out-of-band changes in Prefect with a 1 h resync: only the event stream can
    // bring the repair within seconds.
    let repair = repair_round(&api, &prefect, &op, n).await;
    let second_cost = op.cost();
    Row {
        n,
        services,
        op_secs,
        latency,
        python: (0, 0.0),
        floor_before: (0, 0.0),
        floor: (0, 0.0),
        floor_wide: (0, 0.0),
        server_cpu,
        control_plane_cpu,
        k8s_cold,
        steady,
        steady2,
        change_ms,
        change_calls,
        restart_secs,
        restart_writes,
        restart_calls,
        restart_k8s_writes,
        repair,
        rss_mib: first_cost.0.max(second_cost.0),
        cpu_secs: first_cost.1 + second_cost.1,
        cold_calls,
        repeats: Vec::new(),
    }
}

/// One resync window with nothing changed: from now until every resource had a pass.
async fn steady_window(op: &OperatorProcess, api: &Api<PrefectDeployment>, n: usize) -> Steady {
    // Listed first: at N=10000 the list takes seconds, which the calls' window must
    // not include (it is reported as lasting from `t0`).
    let before = shown(api).await;
    let calls0 = op.calls();
    let passes0 = op.passes();
    let t0 = Instant::now();
    while op.passes() - passes0 < n as f64 {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "resync did not cover every resource"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (secs, calls) = (t0.elapsed().as_secs_f64(), diff(&op.calls(), &calls0));
    let (k8s_writes, preview_refreshes) =
        status_writes(&before, &shown(api).await, chrono::Utc::now());
    Steady {
        secs,
        calls,
        k8s_writes,
        preview_refreshes,
    }
}

/// Each resource's recorded deployment id.
async fn deployment_ids(api: &Api<PrefectDeployment>) -> HashMap<String, String> {
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| Some((o.metadata.name?, o.status?.deployment_id?)))
        .collect()
}

const EDITED: &str = "edited-out-of-band";

/// Tags an out-of-band edit gives a deployment (the resources declare others).
fn edit_body() -> Value {
    json!({"tags": [EDITED]})
}

/// Edits deployment `id` behind the operator's back, or deletes it.
async fn change_out_of_band(http: &reqwest::Client, prefect: &str, id: &str, delete: bool) {
    let url = format!("{prefect}/deployments/{id}");
    let (code, _) = if delete {
        support::prefect_call(http, reqwest::Method::DELETE, &url, None).await
    } else {
        support::prefect_call(http, reqwest::Method::PATCH, &url, Some(&edit_body())).await
    };
    assert!(code < 300, "out-of-band change of {id}: {code}");
}

/// Whether that change is undone: the edit no longer shows, or resource `name` records
/// a new deployment in place of the deleted `id`.
async fn repaired(
    api: &Api<PrefectDeployment>,
    http: &reqwest::Client,
    prefect: &str,
    (name, id): (&str, &str),
    delete: bool,
) -> bool {
    if delete {
        let o = api.get(name).await.unwrap();
        o.status
            .and_then(|s| s.deployment_id)
            .is_some_and(|now| now != id)
    } else {
        let (code, d) = support::prefect_get(http, &format!("{prefect}/deployments/{id}")).await;
        code == 200 && d["tags"] != json!([EDITED])
    }
}

/// Edits and deletes deployments in Prefect, one at a time, and measures how long each
/// takes to be put back.
async fn repair_round(
    api: &Api<PrefectDeployment>,
    prefect: &PrefectServer,
    op: &OperatorProcess,
    n: usize,
) -> Repair {
    let deadline = Instant::now() + Duration::from_secs(60);
    while op.metric("prefect_operator_event_streams_connected") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the operator's event stream did not connect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let http = reqwest::Client::new();
    let ids = deployment_ids(api).await;
    let samples = 20.min(n / 2);
    let mut repair = Repair::default();
    for k in 0..samples {
        let name = format!("bench-{}", k * n / samples);
        let id = &ids[&name];
        let delete = k % 2 == 1;
        let t = Instant::now();
        change_out_of_band(&http, &prefect.url, id, delete).await;
        while !repaired(api, &http, &prefect.url, (&name, id), delete).await {
            assert!(
                t.elapsed() < Duration::from_secs(600),
                "{name} was not repaired"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        if delete {
            repair.deletes.push(secs);
        } else {
            repair.edits.push(secs);
        }
    }
    repair
}

/// The stream cut: a server whose event stream never delivers
/// (`PREFECT_SERVER_EVENTS_STREAM_OUT_ENABLED=false`), resync 30 s. Out-of-band edits
/// and deletions must still be repaired within one interval (by the bulk reads).
struct Cut {
    n: usize,
    resync_secs: f64,
    repair: Repair,
    /// Seconds until each automation deleted in Prefect was made again.
    automations: Vec<f64>,
    calls_per_interval: f64,
    /// Reads of automations per interval with nothing changed: (bulk, one resource's).
    automation_reads: (f64, f64),
}

async fn cut_round(cp: &ControlPlane, n: usize) -> Cut {
    eprintln!("== event stream cut, N={n}");
    let dir = tempfile::tempdir().unwrap();
    let prefect = placed(PrefectServer::start_on_database(
        None,
        &durable_database(dir.path()),
        &[("PREFECT_SERVER_EVENTS_STREAM_OUT_ENABLED", "false")],
    ));
    let (ns, api, _) = populate(cp, "bench-cut", &prefect, n).await;
    let resync = 30.0;
    let op = OperatorProcess::start(cp, &ns, "30s");
    wait_ready(&api, n, cold_limit(n)).await;
    // Let the first drift checks register every deployment with the bulk reads.
    tokio::time::sleep(Duration::from_secs_f64(resync)).await;
    // Two quiet intervals: what checking the automations costs.
    let quiet = op.calls();
    let t_quiet = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(2.0 * resync)).await;
    let read = diff(&op.calls(), &quiet);
    let per_interval =
        |k: &str| read.get(k).copied().unwrap_or(0.0) * resync / t_quiet.elapsed().as_secs_f64();
    let automation_reads = (
        per_interval("POST automations_filter"),
        per_interval("GET automations_related_to"),
    );
    let ids = deployment_ids(&api).await;
    let http = reqwest::Client::new();
    let before = op.calls();
    let t_calls = Instant::now();

    // Five edits and five deletions at once.
    let picked: Vec<(String, String)> = (0..10)
        .map(|k| {
            let name = format!("bench-{}", k * n / 10);
            (name.clone(), ids[&name].clone())
        })
        .collect();
    let t = Instant::now();
    for (k, (_, id)) in picked.iter().enumerate() {
        change_out_of_band(&http, &prefect.url, id, k % 2 == 1).await;
    }
    let mut repair = Repair::default();
    let mut pending: Vec<(usize, &(String, String))> = picked.iter().enumerate().collect();
    while !pending.is_empty() {
        let mut left = Vec::new();
        for (k, (name, id)) in pending {
            let done = repaired(&api, &http, &prefect.url, (name, id), k % 2 == 1).await;
            match (done, k % 2 == 1) {
                (true, true) => repair.deletes.push(t.elapsed().as_secs_f64()),
                (true, false) => repair.edits.push(t.elapsed().as_secs_f64()),
                (false, _) => left.push((k, &picked[k])),
            }
        }
        pending = left;
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "not repaired without the stream"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bulk = diff(&op.calls(), &before)
        .get("POST deployments_filter")
        .copied()
        .unwrap_or(0.0);
    let calls_per_interval = bulk * resync / t_calls.elapsed().as_secs_f64();

    // Three automations deleted at once (every fourth resource has a trigger).
    let automations = automations_deleted_and_made_again(&api, &http, &prefect.url, n, 3).await;
    Cut {
        n,
        resync_secs: resync,
        repair,
        automations,
        calls_per_interval,
        automation_reads,
    }
}

/// Deletes the automation of `count` resources with a trigger through Prefect's API and
/// returns, for each, the seconds until its resource records one made in its place.
async fn automations_deleted_and_made_again(
    api: &Api<PrefectDeployment>,
    http: &reqwest::Client,
    prefect: &str,
    n: usize,
    count: usize,
) -> Vec<f64> {
    let automation_of = |o: &PrefectDeployment| {
        o.status
            .as_ref()
            .and_then(|s| s.automation_ids.clone())
            .and_then(|ids| ids.first().cloned())
    };
    let mut picked = Vec::new();
    for k in 0..count {
        // Spread over the fleet, on resources with a trigger (i a multiple of 4).
        let name = format!("bench-{}", (k * n / count + 2) / 4 * 4);
        let old = automation_of(&api.get(&name).await.unwrap()).expect("a trigger's automation");
        picked.push((name, old));
    }
    let t = Instant::now();
    for (_, old) in &picked {
        let url = format!("{prefect}/automations/{old}");
        let (code, _) = support::prefect_call(http, reqwest::Method::DELETE, &url, None).await;
        assert!(code < 300, "deleting automation {old}: {code}");
    }
    let mut took = Vec::new();
    let mut pending = picked;
    while !pending.is_empty() {
        let mut left = Vec::new();
        for (name, old) in pending {
            let now = automation_of(&api.get(&name).await.unwrap());
            if now.is_some_and(|a| a != old) {
                took.push(t.elapsed().as_secs_f64());
            } else {
                left.push((name, old));
            }
        }
        pending = left;
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "automations not made again without the stream"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    took
}

/// A Prefect outage of 60 s during a cold start.
struct Outage {
    n: usize,
    /// Resources Ready when the server went away.
    ready_before: usize,
    /// Seconds from the server's return to every resource Ready.
    converge_after: f64,
    deployments: usize,
    distinct_deployment_names: usize,
    automations: usize,
    distinct_automation_names: usize,
    /// Resources whose recorded deployment id is not a deployment of the server.
    dangling_ids: usize,
}

async fn outage_round(cp: &ControlPlane, n: usize) -> Outage {
    eprintln!("== Prefect outage of 60 s during a cold start, N={n}");
    let dir = tempfile::tempdir().unwrap();
    let db = durable_database(dir.path());
    let port = support::free_port();
    let prefect = placed(PrefectServer::start_on_database(Some(port), &db, &[]));
    let (ns, api, _) = populate(cp, "bench-outage", &prefect, n).await;
    let _op = OperatorProcess::start(cp, &ns, RESYNC);
    // Down in the middle of the work: once a quarter is Ready.
    let ready_before = wait_ready(&api, n / 4, cold_limit(n)).await.len();
    drop(prefect);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let prefect = placed(PrefectServer::start_on_database(Some(port), &db, &[]));
    let back = Instant::now();
    wait_ready(&api, n, cold_limit(n)).await;
    let converge_after = back.elapsed().as_secs_f64();

    let http = reqwest::Client::new();
    let names = |kind: &'static str| {
        let (http, base) = (http.clone(), prefect.url.clone());
        async move {
            let mut out: Vec<(String, String)> = Vec::new();
            loop {
                let body = json!({"limit": 200, "offset": out.len()});
                let (code, page) = support::prefect_call(
                    &http,
                    reqwest::Method::POST,
                    &format!("{base}/{kind}/filter"),
                    Some(&body),
                )
                .await;
                assert_eq!(code, 200, "{kind}/filter");
                let page = page.as_array().cloned().unwrap_or_default();
                let len = page.len();
                out.extend(page.into_iter().map(|d| {
                    (
                        d["id"].as_str().unwrap_or_default().to_string(),
                        d["name"].as_str().unwrap_or_default().to_string(),
                    )
                }));
                if len < 200 {
                    return out;
                }
            }
        }
    };
    let deployments = names("deployments").await;
    let automations = names("automations").await;
    let distinct = |v: &[(String, String)]| {
        v.iter()
            .map(|(_, n)| n.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let known: std::collections::HashSet<&str> =
        deployments.iter().map(|(id, _)| id.as_str()).collect();
    let dangling_ids = deployment_ids(&api)
        .await
        .values()
        .filter(|id| !known.contains(id.as_str()))
        .count();
    Outage {
        n,
        ready_before,
        converge_after,
        deployments: deployments.len(),
        distinct_deployment_names: distinct(&deployments),
        automations: automations.len(),
        distinct_automation_names: distinct(&automations),
        dangling_ids,
    }
}

/// Prefect's Python `RunnerDeployment.apply()` in a loop, on a fresh database.
/// Prefect's own loop applying `n` deployments (its seconds as it measures them).
fn python_round(n: usize, services: bool) -> Ran {
    let prefect = start_prefect(services);
    let pool = create_pool(&prefect);
    let python = support::assets().prefect_bin.with_file_name("python");
    let dir = tempfile::tempdir().unwrap();
    let (cpu0, stall0) = (prefect.cpu_seconds(), cpu_stall_seconds());
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
    Ran {
        secs: v["seconds"].as_f64().unwrap(),
        server_cpu: prefect.cpu_seconds() - cpu0,
        stall: cpu_stall_seconds() - stall0,
    }
}

/// The same create calls from a minimal keep-alive client, no logic in between.
async fn floor_round(n: usize, services: bool, parallel: usize) -> Ran {
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
    // Measured over the creates only, not the server's start.
    let (cpu0, stall0) = (prefect.cpu_seconds(), cpu_stall_seconds());
    let machine0 = cpu_by_command();
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
        .buffer_unordered(parallel)
        .collect::<Vec<()>>()
        .await;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "   machine during the floor at {parallel}: {}",
        cpu_breakdown(&machine0, secs)
    );
    Ran {
        secs,
        server_cpu: prefect.cpu_seconds() - cpu0,
        stall: cpu_stall_seconds() - stall0,
    }
}

/// `a / b` as a ratio, or "skipped" when `b` was not measured.
fn ratio(a: f64, b: f64) -> String {
    if b.is_nan() {
        "skipped".into()
    } else {
        format!("{:.2}x", a / b)
    }
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

fn summary(v: &[f64]) -> String {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    match v.last() {
        Some(max) => format!(
            "{:.2} / {:.2} / {:.2} (x{})",
            percentile(&v, 0.5),
            percentile(&v, 0.95),
            max,
            v.len()
        ),
        None => "none".into(),
    }
}

fn report(rows: &[Row], cut: Option<&Cut>, outage: Option<&Outage>, binary_size: u64) {
    println!();
    println!(
        "Prefect's database: {}{}",
        database(),
        if pinned() {
            "; the Prefect server alone on CPU 0, everything else on CPU 1"
        } else {
            ""
        }
    );
    println!("| N | Prefect services | operator res/s | latency p50 / p95 / max (s) | Python apply() res/s | floor res/s (8 in flight: before / after) | floor res/s ({PASSES}) | operator/floor (8) | operator/Python |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let op = r.n as f64 / r.op_secs;
        let rate = |(k, secs): (usize, f64)| match k {
            0 => ("skipped".to_string(), f64::NAN),
            k if k < r.n => (
                format!("{:.1} (first {k})", k as f64 / secs),
                k as f64 / secs,
            ),
            k => (format!("{:.1}", k as f64 / secs), k as f64 / secs),
        };
        let ((py_text, py), (fl_text, fl)) = (rate(r.python), rate(r.floor));
        let (before_text, before) = rate(r.floor_before);
        // Against both floor runs, one on each side of the operator's.
        let fl = (fl + before) / 2.0;
        let fl_text = format!("{before_text} / {fl_text}");
        let wide = rate(r.floor_wide).0;
        println!(
            "| {} | {} | {op:.1} | {:.1} / {:.1} / {:.1} | {py_text} | {fl_text} | {wide} | {} | {} |",
            r.n,
            if r.services { "on" } else { "off" },
            r.latency.0,
            r.latency.1,
            r.latency.2,
            ratio(op, fl),
            ratio(op, py)
        );
    }
    let repeated: Vec<&Row> = rows.iter().filter(|r| !r.repeats.is_empty()).collect();
    if !repeated.is_empty() {
        println!();
        println!("Cold-start comparison cycles on fresh databases (`BENCH_REPEATS`; cycle 1 is the one above), and the median ratio:");
        println!("| N | cycle | operator res/s | floor res/s (8 in flight: before / after) | Python apply() res/s | operator/floor (8) | operator/Python |");
        println!("|---|---|---|---|---|---|---|");
    }
    for r in repeated {
        let n = r.n as f64;
        let first = Cycle {
            operator: r.op_secs,
            variant: None,
            python: r.python.1,
            floor_before: r.floor_before.1,
            floor_after: r.floor.1,
        };
        let (mut to_floor, mut to_python) = (Vec::new(), Vec::new());
        for (i, c) in std::iter::once(&first).chain(&r.repeats).enumerate() {
            let (op, py) = (n / c.operator, n / c.python);
            let (fb, fa) = (n / c.floor_before, n / c.floor_after);
            to_floor.push(op / ((fb + fa) / 2.0));
            to_python.push(op / py);
            println!(
                "| {} | {} | {op:.1} | {fb:.1} / {fa:.1} | {py:.1} | {:.2}x | {:.2}x |",
                r.n,
                i + 1,
                to_floor[i],
                to_python[i]
            );
        }
        println!(
            "| {} | median of {} | | | | {:.2}x | {:.2}x |",
            r.n,
            to_floor.len(),
            median(&mut to_floor),
            median(&mut to_python)
        );
        let paired: Vec<&Cycle> = r.repeats.iter().filter(|c| c.variant.is_some()).collect();
        if !paired.is_empty() {
            println!();
            println!(
                "The same cycles' operator with `BENCH_VARIANT={}`:",
                std::env::var("BENCH_VARIANT").unwrap_or_default()
            );
            println!("| N | cycle | operator res/s | with the variant res/s | operator/floor | variant/floor | variant/operator |");
            println!("|---|---|---|---|---|---|---|");
            let (mut plain, mut with, mut gain) = (Vec::new(), Vec::new(), Vec::new());
            for (i, c) in paired.iter().enumerate() {
                let (op, v) = (n / c.operator, n / c.variant.unwrap_or(f64::NAN));
                let fl = (n / c.floor_before + n / c.floor_after) / 2.0;
                plain.push(op / fl);
                with.push(v / fl);
                gain.push(v / op);
                println!(
                    "| {} | {} | {op:.1} | {v:.1} | {:.2}x | {:.2}x | {:.2}x |",
                    r.n,
                    i + 2,
                    plain[i],
                    with[i],
                    gain[i]
                );
            }
            println!(
                "| {} | median of {} | | | {:.2}x | {:.2}x | {:.2}x |",
                r.n,
                gain.len(),
                median(&mut plain),
                median(&mut with),
                median(&mut gain)
            );
        }
    }
    println!();
    println!("Prefect server CPU per deployment (ms), and its share of one core while the client ran (the server is one Python process):");
    println!("| N | services | operator | floor (8 in flight) | floor ({PASSES}) | Python apply() | apiserver + etcd during the operator's cold start (share of one core) | some task waiting for a CPU: operator / floor (8) |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let per = |cpu: f64, (k, secs): (usize, f64), runs: f64| match k {
            0 => "skipped".to_string(),
            k => format!(
                "{:.1} ({:.0}%)",
                cpu * 1000.0 / (k as f64 * runs),
                100.0 * cpu / (secs * runs)
            ),
        };
        let c = &r.server_cpu;
        let both = (r.floor.0, (r.floor.1 + r.floor_before.1) / 2.0);
        let floor_stall = match both.0 {
            0 => "skipped".to_string(),
            _ => format!("{:.0}%", 100.0 * c.floor_stall / (2.0 * both.1)),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} s ({:.0}%) | {:.0}% / {floor_stall} of the time |",
            r.n,
            if r.services { "on" } else { "off" },
            per(c.operator, (r.n, r.op_secs), 1.0),
            per(c.floor, both, 2.0),
            per(c.floor_wide, r.floor_wide, 1.0),
            per(c.python, r.python, 1.0),
            r.control_plane_cpu,
            100.0 * r.control_plane_cpu / r.op_secs,
            100.0 * c.operator_stall / r.op_secs,
        );
    }
    for r in rows {
        println!(
            "N={} services={}: Kubernetes requests during the cold start, per resource: {:.2} ({})",
            r.n,
            r.services,
            r.k8s_cold.values().sum::<f64>() / r.n as f64,
            fmt_calls(&r.k8s_cold)
        );
    }
    println!();
    println!("| N | services | steady-state resync: Prefect calls | Prefect writes | K8s writes (+ next-run refreshes) | one cron change: ms | restart: s to re-check all | restart Prefect writes | restart K8s writes (+ next-run refreshes) | peak RSS MiB | CPU s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} (over {:.0} s) | {} | {} (+ {}) | {:.0} | {:.1} | {} | {} (+ {}) | {:.1} | {:.1} |",
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
            r.restart_k8s_writes.0,
            r.restart_k8s_writes.1,
            r.rss_mib,
            r.cpu_secs
        );
    }
    for r in rows {
        println!(
            "N={} services={}: second steady window: {} (over {:.0} s), Prefect writes {}, K8s writes {} (+ {})",
            r.n,
            r.services,
            fmt_calls(&r.steady2.calls),
            r.steady2.secs,
            writes(&r.steady2.calls),
            r.steady2.k8s_writes,
            r.steady2.preview_refreshes
        );
    }
    println!();
    println!("Out-of-band changes in Prefect, resync 1 h (event stream), seconds to repair p50 / p95 / max:");
    println!("| N | services | edits | deletions |");
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} |",
            r.n,
            if r.services { "on" } else { "off" },
            summary(&r.repair.edits),
            summary(&r.repair.deletes)
        );
    }
    if let Some(c) = cut {
        println!();
        println!(
            "Event stream cut (server never delivers events), N={}, resync {:.0} s: edits {}, deletions {} (s, p50 / p95 / max); bulk reads {:.1} per interval",
            c.n,
            c.resync_secs,
            summary(&c.repair.edits),
            summary(&c.repair.deletes),
            c.calls_per_interval
        );
        println!(
            "  automations ({} with triggers): per interval with nothing changed {:.1} bulk reads, {:.1} single reads; deleted automations made again after {} s (p50 / p95 / max)",
            c.n.div_ceil(4),
            c.automation_reads.0,
            c.automation_reads.1,
            summary(&c.automations)
        );
    }
    if let Some(o) = outage {
        println!();
        println!(
            "Prefect outage of 60 s during a cold start, N={}: {} Ready when it went down; all Ready {:.1} s after it returned; deployments {} ({} distinct names), automations {} ({} distinct names, {} expected), recorded ids not in Prefect: {}",
            o.n,
            o.ready_before,
            o.converge_after,
            o.deployments,
            o.distinct_deployment_names,
            o.automations,
            o.distinct_automation_names,
            o.n.div_ceil(4),
            o.dangling_ids
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
        println!(
            "N={} services={}: Prefect calls per deployment, cold start: {:.2} ({})",
            r.n,
            r.services,
            r.cold_calls.values().sum::<f64>() / r.n as f64,
            fmt_calls(&r.cold_calls)
        );
        println!(
            "N={} services={}: Prefect calls of the restart re-check: {}",
            r.n,
            r.services,
            fmt_calls(&r.restart_calls)
        );
    }
    println!(
        "operator binary: {} ({binary_size} bytes, {:.1} MiB)",
        if std::env::var("BENCH_BIN").is_ok() {
            "BENCH_BIN"
        } else {
            "this build (release profile)"
        },
        binary_size as f64 / 1048576.0
    );
}
