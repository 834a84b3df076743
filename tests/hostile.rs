//! Hostile specs through the pure pipeline (validate -> desired -> preview): no panic,
//! bounded memory, bounded work, and the verdict each input class should get.
//!
//! `tests/fixtures/hostile/` is the corpus: one spec per file, with the field a refusal
//! must name (or `accepted`). The default run replays it and a short, seeded run of the
//! generator below; a longer run is
//! `FUZZ_SECONDS=600 cargo test --release --test hostile -- --ignored --nocapture`,
//! which writes any input that fails into the corpus as `found-<hash>.json`.
//!
//! Memory is counted by a global allocator (bytes, not time, so the figure does not
//! depend on the machine's load); work by the preview's step budget. Wall time is only
//! printed, with a generous watchdog that catches a stall, not a slow machine.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use prefect_operator::api::PrefectDeploymentSpec;
use prefect_operator::desired;
use prefect_operator::preview::schedules_preview;
use prefect_operator::validate::validate;
use serde_json::{json, Value};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The allocation counters are process-wide: tests here take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Memory one resource's pass may take on top of its own spec.
const MAX_EXTRA_BYTES: usize = 8 << 20;
/// A stall, not a slow machine: the budgets keep a pass far below this (an unoptimized
/// build runs the regex and schedule code many times slower, hence its larger bound).
const WATCHDOG: Duration = Duration::from_secs(if cfg!(debug_assertions) { 30 } else { 5 });

struct Outcome {
    verdict: String,
    peak_extra: usize,
    elapsed: Duration,
}

/// Runs the pipeline the controller runs on one spec. Panics propagate to the caller.
fn pipeline(spec: &Value) -> Outcome {
    // The object arrives deserialized; what counts is the work on top of it.
    let parsed = serde_json::from_value::<PrefectDeploymentSpec>(spec.clone());
    let started = Instant::now();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let verdict = match parsed {
        Err(e) => format!("not a spec: {e}"),
        Ok(spec) => match validate(&spec, "hostile") {
            Err(p) => format!("refused {}: {}", p.field, p.message),
            Ok(valid) => {
                let want = desired::deployment(&valid, "uid");
                let body = want.create_body("flow");
                assert!(body.is_object());
                let automations = desired::automations(&spec.deployment, &valid.name, "id");
                desired::fingerprint(&automations);
                let (list, _) = schedules_preview(&valid.schedules, false, &[], &[], Utc::now());
                assert_eq!(list.len(), valid.schedules.len());
                let notes = list.iter().filter(|s| s.note.is_some()).count();
                let runs = list.iter().filter(|s| !s.next_runs.is_empty()).count();
                format!("accepted ({runs} with runs, {notes} with a note)")
            }
        },
    };
    Outcome {
        verdict,
        peak_extra: PEAK.load(Ordering::Relaxed).saturating_sub(base),
        elapsed: started.elapsed(),
    }
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile")
}

fn corpus() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            (name, serde_json::from_str(&text).unwrap())
        })
        .collect()
}

/// Checks bounds that hold for every input, known or generated.
fn bounded(name: &str, o: &Outcome) {
    assert!(
        o.peak_extra <= MAX_EXTRA_BYTES,
        "{name}: took {} KiB (limit {} KiB); {}",
        o.peak_extra / 1024,
        MAX_EXTRA_BYTES / 1024,
        o.verdict
    );
    assert!(
        o.elapsed < WATCHDOG,
        "{name}: took {:?}; {}",
        o.elapsed,
        o.verdict
    );
}

#[test]
fn corpus_is_refused_or_handled_within_bounds() {
    let _turn = serial();
    let entries = corpus();
    assert!(entries.len() >= 25, "corpus went missing");
    println!("{:<36} {:>9} {:>10}  verdict", "input", "ms", "peak KiB");
    for (name, entry) in &entries {
        let o = match catch_unwind(AssertUnwindSafe(|| pipeline(&entry["spec"]))) {
            Ok(o) => o,
            Err(_) => panic!("{name}: panicked"),
        };
        println!(
            "{name:<36} {:>9.1} {:>10}  {}",
            o.elapsed.as_secs_f64() * 1000.0,
            o.peak_extra / 1024,
            o.verdict
        );
        bounded(name, &o);
        // Files found by the fuzzer carry no expectation beyond the bounds.
        let Some(expect) = entry["expect"].as_str() else {
            continue;
        };
        if expect == "accepted" {
            assert!(o.verdict.starts_with("accepted"), "{name}: {}", o.verdict);
        } else {
            assert!(
                o.verdict.starts_with(&format!("refused {expect}: ")),
                "{name}: expected a refusal naming {expect}, got {}",
                o.verdict
            );
        }
    }
}

/// What the preview shows for the classes that used to panic or stall: runs where
/// the rule has them within reach, a note where it does not, never an empty list that
/// reads as "never".
#[test]
fn previews_of_hostile_schedules_say_what_they_can() {
    let _turn = serial();
    let mut entries = corpus();
    entries.retain(|(n, _)| n.starts_with("interval-") || n.starts_with("rrule-"));
    for (name, entry) in entries {
        let Ok(spec) = serde_json::from_value::<PrefectDeploymentSpec>(entry["spec"].clone())
        else {
            continue;
        };
        let Ok(valid) = validate(&spec, "hostile") else {
            continue;
        };
        let (list, _) = schedules_preview(&valid.schedules, false, &[], &[], Utc::now());
        for s in &list {
            let anchored = spec.deployment.schedules.as_ref().unwrap()[0]
                .anchor_date
                .is_some()
                || !name.starts_with("interval-");
            let ends = [
                "interval-huge-days",
                "interval-3e12",
                "interval-anchor-9999",
            ];
            if anchored && !ends.contains(&name.as_str()) && name != "rrule-never-fires" {
                assert!(s.next_runs.len() == 3 || s.note.is_some(), "{name}: {s:?}");
            }
        }
        match name.as_str() {
            // A daily series anchored in year 1 lands on the anchor's wall-clock time,
            // not on local mean time's seconds.
            "interval-year-1-dst-zone" => {
                for s in &list {
                    if let Some(t) = s.next_runs.first() {
                        assert!(t.contains("T00:00:00"), "{name}: {t}");
                    }
                }
            }
            "rrule-never-fires" => assert!(list[0].note.is_some(), "{name}: {:?}", list[0]),
            "interval-tenth-millisecond" => assert!(list[0].next_runs.is_empty()),
            "interval-iso-tenth-millisecond" | "rrule-secondly-exdate" | "rrule-300-secondly" => {
                assert_eq!(list[0].next_runs.len(), 3, "{name}: {:?}", list[0])
            }
            _ => {}
        }
    }
}

// ----------------------------------------------------------------------------------
// The generator: structured mutations of corpus specs with values from the classes the
// operator must survive.

struct Gen(fastrand::Rng);

impl Gen {
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.0.usize(..items.len())]
    }

    fn number(&mut self) -> Value {
        match self.0.u8(..8) {
            0 => json!(self.0.f64() * 10f64.powi(self.0.i32(-12..320))),
            1 => json!(-self.0.f64() * 1e6),
            2 => json!(self.0.i64(..)),
            3 => json!(0),
            4 => json!(self.0.u64(1..100_000)),
            5 => json!(1e-7 * self.0.f64()),
            6 => json!(86400 * self.0.i64(1..100_000_000)),
            _ => json!(self.0.f64() * 1e13),
        }
    }

    fn digits(&mut self) -> String {
        let n = self.0.usize(1..30);
        (0..n).map(|_| self.0.digit(10)).collect()
    }

    fn go_duration(&mut self) -> String {
        let terms = self.0.usize(1..4);
        (0..terms)
            .map(|_| {
                let unit = self.pick(&["ns", "us", "µs", "ms", "s", "m", "h", "d", ""]);
                format!("{}{unit}", self.digits())
            })
            .collect()
    }

    fn interval(&mut self) -> Value {
        match self.0.u8(..5) {
            0 => self.number(),
            1 => json!(format!("P{}D", self.digits())),
            2 => json!(format!("PT{}.{}S", self.digits(), self.digits())),
            3 => json!(format!(
                "{} days, {}:{}:{}",
                self.digits(),
                self.digits(),
                self.digits(),
                self.digits()
            )),
            _ => json!(self.go_duration()),
        }
    }

    fn anchor(&mut self) -> String {
        let year = match self.0.u8(..4) {
            0 => self.0.i32(-300_000..300_000),
            1 => self.0.i32(1..3),
            2 => self.0.i32(9998..10001),
            _ => self.0.i32(1800..2100),
        };
        let sign = if year < 0 {
            "-"
        } else if year > 9999 {
            "+"
        } else {
            ""
        };
        let offset = self.pick(&["Z", "+14:00", "-12:00", "+05:45", "", "+00:00"]);
        let second = self.pick(&["00", "59", "60", "30.123456"]);
        format!(
            "{sign}{:04}-{:02}-{:02}T{:02}:{:02}:{second}{offset}",
            year.unsigned_abs(),
            self.0.u8(1..13),
            self.0.u8(1..32),
            self.0.u8(0..24),
            self.0.u8(0..60)
        )
    }

    fn timezone(&mut self) -> &'static str {
        self.pick(&[
            "UTC",
            "America/New_York",
            "Asia/Tokyo",
            "Europe/Berlin",
            "Australia/Lord_Howe",
            "Pacific/Apia",
            "Asia/Kathmandu",
            "Mars/Olympus",
            "",
        ])
    }

    fn cron(&mut self) -> String {
        let tokens = [
            "*",
            "*/0",
            "*/1",
            "0",
            "59",
            "60",
            "L",
            "L5",
            "1#5",
            "5-1",
            "1-31/7",
            "feb",
            "sun",
            "?",
            "31",
            "29",
            "0,30",
            "@hourly",
            "@yearly",
            "@bogus",
            "-1",
            "99999999999",
        ];
        let n = self.0.usize(1..8);
        (0..n)
            .map(|_| self.pick(&tokens))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn rrule(&mut self) -> String {
        let mut lines = Vec::new();
        if self.0.bool() {
            lines.push(format!(
                "DTSTART:{:04}{:02}{:02}T{:02}0000",
                self.0.u32(1..10000),
                self.0.u8(1..13),
                self.0.u8(1..29),
                self.0.u8(0..24)
            ));
        }
        for _ in 0..self.0.usize(1..5) {
            let name = self.pick(&["RRULE", "RRULE", "EXRULE", "RDATE", "EXDATE"]);
            if name == "RDATE" || name == "EXDATE" {
                lines.push(format!("{name}:{:04}0101T000000", self.0.u32(1..10000)));
                continue;
            }
            let mut parts = vec![format!(
                "FREQ={}",
                self.pick(&[
                    "SECONDLY", "MINUTELY", "HOURLY", "DAILY", "WEEKLY", "MONTHLY", "YEARLY"
                ])
            )];
            for _ in 0..self.0.usize(0..4) {
                parts.push(
                    self.pick(&[
                        "INTERVAL=7",
                        "INTERVAL=65535",
                        "COUNT=4000000000",
                        "COUNT=3",
                        "UNTIL=20300101T000000",
                        "UNTIL=00010101T000000",
                        "BYMONTH=2",
                        "BYMONTHDAY=30",
                        "BYMONTHDAY=-1",
                        "BYHOUR=0",
                        "BYMINUTE=0",
                        "BYSECOND=0",
                        "BYSETPOS=-1",
                        "BYDAY=MO",
                        "BYDAY=+53MO",
                        "BYWEEKNO=53",
                        "BYYEARDAY=366",
                    ])
                    .to_string(),
                );
            }
            lines.push(format!("{name}:{}", parts.join(";")));
        }
        lines.join("\n")
    }

    fn schedule(&mut self, slug: usize) -> Value {
        let mut s = json!({"slug": format!("s{slug}")});
        match self.0.u8(..3) {
            0 => {
                s["interval"] = self.interval();
                if self.0.bool() {
                    s["anchor_date"] = json!(self.anchor());
                }
            }
            1 => s["cron"] = json!(self.cron()),
            _ => s["rrule"] = json!(self.rrule()),
        }
        if self.0.bool() {
            s["timezone"] = json!(self.timezone());
        }
        s
    }

    fn deep_value(&mut self, depth: usize) -> Value {
        let mut v = json!("leaf");
        for _ in 0..depth {
            v = if self.0.bool() {
                json!({"anyOf": [{"not": v}, {"type": "string", "pattern": "(?=.)(a*)*b"}]})
            } else {
                json!([v])
            };
        }
        v
    }

    fn mutate(&mut self, spec: &mut Value) {
        let d = &mut spec["deployment"];
        match self.0.u8(..6) {
            0 => spec["interval"] = json!(self.go_duration()),
            1 | 2 => {
                let n = self.0.usize(1..6);
                d["schedules"] = Value::Array((0..n).map(|i| self.schedule(i)).collect());
            }
            3 => {
                let depth = self.0.usize(1..60);
                d["parameterOpenApiSchema"] =
                    json!({"type": "object", "properties": {"p": self.deep_value(depth)}});
                d["parameters"] = json!({"p": "a".repeat(self.0.usize(0..5000))});
            }
            4 => d["entrypoint"] = json!(self.pick(&["a.py:b", ":", "a:1", "a.py:b.c", "x:"])),
            _ => {
                d["triggers"] = json!([{"type": self.pick(&["compound", "sequence", "metric", "event"]),
                    "within": self.number(), "require": self.number(), "posture": "Proactive",
                    "triggers": [{"expect": ["x"]}], "metric": {"name": "lateness", "operator": ">", "threshold": self.number()}}]);
            }
        }
    }
}

fn fuzz(seed: u64, until: impl Fn(usize) -> bool) {
    let _turn = serial();
    let corpus = corpus();
    let mut g = Gen(fastrand::Rng::with_seed(seed));
    let mut i = 0;
    while until(i) {
        let (_, entry) = &corpus[g.0.usize(..corpus.len())];
        let mut spec = entry["spec"].clone();
        for _ in 0..g.0.usize(1..4) {
            g.mutate(&mut spec);
        }
        let result = catch_unwind(AssertUnwindSafe(|| pipeline(&spec)));
        let failure = match &result {
            Err(_) => Some("panicked".to_string()),
            Ok(o) if o.peak_extra > MAX_EXTRA_BYTES || o.elapsed >= WATCHDOG => Some(format!(
                "{} KiB, {:?}: {}",
                o.peak_extra / 1024,
                o.elapsed,
                o.verdict
            )),
            Ok(_) => None,
        };
        if let Some(why) = failure {
            let text = serde_json::to_string(&json!({"why": why, "spec": spec})).unwrap();
            let name = format!("found-{seed}-{i}.json");
            std::fs::write(corpus_dir().join(&name), text + "\n").unwrap();
            panic!("seed {seed}, input {i}: {why}; saved as tests/fixtures/hostile/{name}");
        }
        i += 1;
    }
    println!("seed {seed}: {i} generated specs, no failure");
}

/// A short, fixed-seed run in every test run: deterministic, a few seconds.
#[test]
fn generated_specs_stay_within_bounds() {
    fuzz(20261126, |i| i < 300);
}

/// The longer run: `FUZZ_SECONDS=600 cargo test --release --test hostile -- --ignored`.
#[test]
#[ignore]
fn fuzz_for_a_while() {
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let end = Instant::now() + Duration::from_secs(seconds);
    fuzz(seed, |_| Instant::now() < end);
}

/// A spec may name any server, so the answer may be anyone's. One that never ends is cut
/// off at the client's bound with an error that says so, and reading it takes about that
/// bound in memory, not what the server sends (256 MiB here).
#[test]
fn an_endless_answer_from_a_server_is_cut_off() {
    use prefect_operator::prefect::{http_client, PrefectClient, MAX_RESPONSE_BYTES};
    use std::io::{Read, Write};
    let _turn = serial();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/api", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut request = [0u8; 4096];
                let _ = conn.read(&mut request);
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n";
                if conn.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b' '; 1 << 20];
                for _ in 0..256 {
                    if conn.write_all(&chunk).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = rt.block_on(async {
        let client = PrefectClient::new(http_client(), &base, None, Default::default());
        client.capabilities().await
    });
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    let message = result
        .expect_err("an endless answer was accepted")
        .to_string();
    assert!(message.contains("larger than 32 MiB"), "{message}");
    println!(
        "peak while reading: {:.1} MiB",
        peak as f64 / (1 << 20) as f64
    );
    assert!(
        peak < 2 * MAX_RESPONSE_BYTES,
        "reading the answer took {peak} bytes"
    );
}

/// A server that sends its headers at once and then drips its body, a byte at a time,
/// has not answered: the request ends at the client's timeout, is not tried again
/// within the pass, and puts the server in doubt (its passes take turns) just as
/// silence would, although it answered before.
#[test]
fn a_dripping_answer_counts_as_no_answer() {
    use prefect_operator::limit::Limits;
    use prefect_operator::prefect::PrefectClient;
    use std::io::{Read, Write};
    use std::sync::Arc;
    let _turn = serial();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/api", listener.local_addr().unwrap());
    let dripped = Arc::new(AtomicUsize::new(0));
    let counted = dripped.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let counted = counted.clone();
            std::thread::spawn(move || {
                let mut request = [0u8; 4096];
                let n = conn.read(&mut request).unwrap_or(0);
                let line = String::from_utf8_lossy(&request[..n]).to_string();
                if line.starts_with("GET /api/deployments/known ") {
                    let body = "{\"detail\":\"Deployment not found\"}";
                    let answer = format!(
                        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(answer.as_bytes());
                    return;
                }
                counted.fetch_add(1, Ordering::Relaxed);
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\nconnection: close\r\n\r\n";
                if conn.write_all(head.as_bytes()).is_err() {
                    return;
                }
                loop {
                    std::thread::sleep(Duration::from_millis(100));
                    if conn.write_all(b" ").is_err() {
                        return;
                    }
                }
            });
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let limits = Limits::new(8);
        let limit = limits.for_server(&base);
        let client =
            PrefectClient::new(http, &base, None, Default::default()).with_limit(limit.clone());
        assert!(client.read_deployment("known").await.unwrap().is_none());
        assert_eq!(limit.doubt(), None, "the server has answered");

        let err = client
            .read_deployment("dripping")
            .await
            .expect_err("a dripping answer was accepted");
        assert!(
            matches!(err, prefect_operator::Error::PrefectUnreachable(..)),
            "{err}"
        );
        assert!(err.to_string().contains("timed out"), "{err}");
        assert_eq!(
            dripped.load(Ordering::Relaxed),
            1,
            "tried once within the pass"
        );
        assert!(limit.doubt().is_some(), "the server is in doubt");
    });
}
