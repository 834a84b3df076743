//! End to end on local defaults: a local control plane (kube-apiserver + etcd) and a
//! Prefect server from the test assets, the CRD installed with kubectl, the operator
//! running, `examples/` applied; then prints what Kubernetes and Prefect show.
//!
//! `cargo run --example demo` (or `scripts/demo.sh`). With `--keep` it stays up and
//! prints a KUBECONFIG to explore with; Ctrl-C stops everything.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use prefect_operator::runtime::{self, RunOptions};
use serde_json::{json, Value};

#[tokio::main]
async fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    support::install_crypto();
    prefect_operator::telemetry::init(prefect_operator::telemetry::LogFormat::Text);

    eprintln!("==> starting kube-apiserver + etcd");
    let cp = support::ControlPlane::shared();
    eprintln!("==> starting Prefect 3.9.1 on 127.0.0.1:4200 (the address examples/ use)");
    let prefect = support::PrefectServer::start_on(4200, None);

    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/work_pools/", prefect.url))
        .json(&json!({"name": "local-process", "type": "process"}))
        .send()
        .await
        .expect("create work pool");
    assert!(
        r.status().is_success() || r.status().as_u16() == 409,
        "work pool: {}",
        r.status()
    );

    eprintln!("==> running the operator");
    let kube = cp.client().await;
    tokio::spawn(async move {
        let opts = RunOptions {
            namespaces: vec![],
            concurrency: 32,
            max_requests_per_server: 8,
            max_kube_writes: None,
            default_resync: Duration::from_secs(300),
            admin_addr: None,
            leader_election: None,
            access: Default::default(),
            shard: None,
        };
        if let Err(e) = runtime::run(kube, opts).await {
            eprintln!("operator stopped: {e}");
            std::process::exit(1);
        }
    });

    eprintln!("==> kubectl apply -f examples/");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/");
    println!("{}", cp.kubectl_ok(&["apply", "-f", examples]));
    let wait = cp.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pd",
        "--all",
        "-A",
        "--timeout=120s",
    ]);
    println!(
        "\n$ kubectl get pd -A -o wide\n{}",
        cp.kubectl_ok(&["get", "pd", "-A", "-o", "wide"])
    );

    let r = http
        .post(format!("{}/deployments/filter", prefect.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let deployments: Value = r.json().await.unwrap();
    println!("Deployments as Prefect sees them ({}):", prefect.url);
    for d in deployments.as_array().into_iter().flatten() {
        println!(
            "- {} (id {}), work pool {}, paused {}",
            d["name"].as_str().unwrap_or(""),
            d["id"].as_str().unwrap_or(""),
            d["work_pool_name"],
            d["paused"]
        );
        for s in d["schedules"].as_array().into_iter().flatten() {
            println!(
                "    schedule {}: {} (active {})",
                s["slug"].as_str().unwrap_or(""),
                s["schedule"],
                s["active"]
            );
        }
    }
    let automations: Value = http
        .post(format!("{}/automations/filter", prefect.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for a in automations.as_array().into_iter().flatten() {
        println!(
            "- automation {:?} -> {}",
            a["name"].as_str().unwrap_or(""),
            a["actions"][0]["deployment_id"]
        );
    }
    if !wait.0 {
        eprintln!("not every PrefectDeployment became Ready: {}", wait.2);
        std::process::exit(1);
    }
    if keep {
        println!(
            "\nexport KUBECONFIG={}\nPrefect API: {}\nCtrl-C to stop.",
            cp.kubeconfig.display(),
            prefect.url
        );
        tokio::signal::ctrl_c().await.ok();
    }
}
