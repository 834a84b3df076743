//! The operator as users run it: the real binary as a separate process, installed with
//! the real Helm chart's RBAC, with leader election, against the real apiserver and
//! Prefect. Covers what only shows at that level: permissions, hand-over between
//! replicas, metrics and probes, secrets kept out of logs, the missing-CRD message.

mod support;

use clap::Parser;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prefect_operator::prefect::is_write;
use serde_json::{json, Value};
use support::{create_pool, http_get, merge_patch, unique, ControlPlane, PrefectServer};

const BIN: &str = env!("CARGO_BIN_EXE_prefect-operator");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/prefect-operator");

fn helm() -> PathBuf {
    support::assets().helm.clone()
}

fn helm_run(args: &[&str]) -> String {
    let out = Command::new(helm()).args(args).output().expect("helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `helm template` output as a list of objects.
fn template(set: &[&str]) -> Vec<Value> {
    let mut args = vec!["template", "rel", CHART, "--namespace", "ops"];
    for s in set {
        args.push("--set");
        args.push(s);
    }
    let text = helm_run(&args);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// What `helm template` says when it refuses the values (it must refuse them).
fn refused(chart: &str, set: &[&str]) -> String {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "rel", chart]);
    for v in set {
        cmd.args(["--set", v]);
    }
    let out = cmd.output().expect("helm");
    assert!(!out.status.success(), "helm accepted {set:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn of_kind<'a>(objs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| o["kind"] == kind).collect()
}

fn container(objs: &[Value]) -> Value {
    of_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0].clone()
}

fn args(objs: &[Value]) -> Vec<String> {
    container(objs)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// Every key of values.yaml, as dotted paths to its leaves (maps the chart passes
/// through to Kubernetes, such as `resources`, count as leaves).
fn value_paths(v: &Value, schema: &Value, prefix: &str, out: &mut Vec<String>) {
    let nested = schema["additionalProperties"] == json!(false);
    match v.as_object() {
        Some(map) if nested => {
            for (k, child) in map {
                let path = format!("{prefix}{k}");
                let sub = &schema["properties"][k];
                assert!(
                    !sub.is_null(),
                    "values.yaml has {path}, the schema does not"
                );
                value_paths(child, sub, &format!("{path}."), out);
            }
        }
        _ => out.push(prefix.trim_end_matches('.').to_string()),
    }
}

#[test]
fn chart_values_are_checked_before_anything_is_rendered() {
    // The schema describes every value the chart documents, and nothing else.
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{CHART}/values.schema.json")).unwrap(),
    )
    .unwrap();
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{CHART}/values.yaml")).unwrap())
            .unwrap();
    let mut paths = Vec::new();
    value_paths(&values, &schema, "", &mut paths);
    assert!(paths.len() > 30, "{paths:?}");
    let documented: Vec<&str> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "global")
        .collect();
    for k in documented {
        assert!(!values[k].is_null(), "{k} is not in values.yaml");
    }

    // A misspelt or malformed value stops the install, naming the value.
    for (set, named) in [
        ("concurrancy=64", "concurrancy"),
        ("image.pullpolicy=Always", "pullpolicy"),
        ("metrics.serviceMonitor.intervall=1m", "intervall"),
        ("concurrency=0", "concurrency"),
        ("maxRequestsPerServer=many", "maxRequestsPerServer"),
        ("maxKubeWrites=-1", "maxKubeWrites"),
        ("logFormat=yaml", "logFormat"),
        ("adminPort=70000", "adminPort"),
        ("shards={Team-A}", "shards"),
        ("watchNamespaces={Team_A}", "watchNamespaces"),
        ("defaultResyncInterval=5min", "defaultResyncInterval"),
        ("secretLabel=prefect.io/credentials", "secretLabel"),
        ("leaderElection.enabled=maybe", "leaderElection.enabled"),
        (
            "podDisruptionBudget.enabled=yes please",
            "podDisruptionBudget.enabled",
        ),
        ("proxy.https=proxy.corp:3128", "proxy.https"),
        ("image.digest=0123abcd", "image.digest"),
        ("caBundle.key=", "caBundle.key"),
    ] {
        let err = refused(CHART, &[set]);
        assert!(err.contains(named), "{set}: {err}");
    }

    // Every value set to something other than its default still renders, and what
    // the binary is given it accepts.
    let objs = template(&[
        "replicaCount=3",
        "image.repository=registry.example.com/prefect-operator",
        "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "image.tag=1.2.3",
        "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "image.pullPolicy=Always",
        "imagePullSecrets[0].name=pull",
        "nameOverride=po",
        "serviceAccount.create=false",
        "serviceAccount.name=robot",
        "serviceAccount.annotations.team=data",
        "watchNamespaces={team-a,team-b}",
        "leaderElection.enabled=true",
        "leaderElection.leaseName=po-lease",
        "shards={a,b}",
        "concurrency=64",
        "maxRequestsPerServer=4",
        "maxKubeWrites=3",
        "defaultResyncInterval=1h30m",
        "logFormat=text",
        "logLevel=prefect_operator=debug",
        "allowedServers={https://prefect.example.com/api}",
        "secretLabel=prefect.io/credentials=true",
        "adminPort=9090",
        "podAnnotations.a=b",
        "podLabels.c=d",
        "nodeSelector.disk=ssd",
        "tolerations[0].key=dedicated",
        "tolerations[0].operator=Exists",
        "priorityClassName=high",
        "podDisruptionBudget.enabled=false",
        "metrics.service.enabled=false",
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.interval=15s",
        "metrics.serviceMonitor.labels.release=prom",
        "networkPolicy.enabled=true",
        "networkPolicy.metricsFrom[0].podSelector.matchLabels.app=prometheus",
        "metrics.prometheusRule.enabled=true",
        "metrics.prometheusRule.labels.release=prom",
        "metrics.prometheusRule.alertLabels.team=data",
        "rbac.aggregateToDefaultRoles=false",
        "caBundle.secret=corp-ca",
        "caBundle.key=bundle.pem",
        "proxy.https=http://proxy.corp:3128",
        "proxy.http=http://proxy.corp:3128",
        "proxy.noProxy=.corp.example\\,10.0.0.0/8",
    ]);
    assert_eq!(of_kind(&objs, "Deployment").len(), 3);
    // A digest pins the image, whatever the tag says.
    assert_eq!(
        container(&objs)["image"],
        json!("registry.example.com/prefect-operator@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    );
    let a = args(&objs);
    assert!(
        a.contains(&"--default-resync-interval=1h30m".to_string()),
        "{a:?}"
    );
    prefect_operator::cli::Cli::try_parse_from(
        std::iter::once("prefect-operator".to_string()).chain(a.iter().cloned()),
    )
    .unwrap();

    // Used as a subchart: the parent's `global` values are allowed, its misspellings
    // in this chart's section are not.
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("platform");
    std::fs::create_dir_all(parent.join("charts")).unwrap();
    std::fs::write(
        parent.join("Chart.yaml"),
        "apiVersion: v2\nname: platform\nversion: 0.1.0\n",
    )
    .unwrap();
    let copied = Command::new("cp")
        .arg("-r")
        .arg(CHART)
        .arg(parent.join("charts"))
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::write(
        parent.join("values.yaml"),
        "global:\n  imageRegistry: registry.example.com\nprefect-operator:\n  concurrency: 4\n",
    )
    .unwrap();
    let parent = parent.to_str().unwrap();
    let text = helm_run(&["template", "rel", parent]);
    assert!(text.contains("--concurrency=4"), "{text}");
    let err = refused(parent, &["prefect-operator.concurency=4"]);
    assert!(err.contains("concurency"), "{err}");
}

/// The chart's alert rules as rendered (release `rel` in `ops`), as a Prometheus rules
/// file.
fn alert_rules(extra: &[&str]) -> Value {
    let mut set = vec![
        "metrics.prometheusRule.enabled=true",
        "metrics.serviceMonitor.enabled=true",
    ];
    set.extend_from_slice(extra);
    let objs = template(&set);
    let rules = of_kind(&objs, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    json!({"groups": rules[0]["spec"]["groups"]})
}

/// The operator's metric names an alert rule reads.
fn metrics_in_rules(rules: &Value) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            // Label names (in `by (...)` and `{...}`) are not metric names.
            let mut expr = String::new();
            let mut skip = None;
            for c in rule["expr"].as_str().unwrap().chars() {
                match skip {
                    Some(end) if c == end => skip = None,
                    Some(_) => {}
                    None if c == '{' => {
                        skip = Some('}');
                        expr.push('#');
                    }
                    None if c == '(' && expr.trim_end().ends_with(" by") => {
                        skip = Some(')');
                        expr.push('#');
                    }
                    None => expr.push(c),
                }
            }
            let mut rest = expr.as_str();
            while let Some(at) = rest.find("prefect_operator_") {
                let tail = &rest[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.push(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new(&support::assets().promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The alerts, run by Prometheus's own rule engine (promtool) over series shaped like
/// what the operator exports: each fires when it should, with the text it should,
/// and stays quiet otherwise.
#[test]
fn chart_alerts_fire_when_they_should() {
    // Without the ServiceMonitor there is no job label to look for: no operator-down alert.
    let objs = template(&["metrics.prometheusRule.enabled=true"]);
    let text = serde_json::to_string(&of_kind(&objs, "PrometheusRule")[0]).unwrap();
    assert!(text.contains("PrefectOperatorNoLeader") && !text.contains("PrefectOperatorDown"));
    assert!(of_kind(&template(&[]), "PrometheusRule").is_empty());
    // The ServiceMonitor carries the shard label the no-leader alert groups by.
    let sm = of_kind(
        &template(&["metrics.serviceMonitor.enabled=true"]),
        "ServiceMonitor",
    )[0]
    .clone();
    assert_eq!(
        sm["spec"]["podTargetLabels"],
        json!(["prefect-operator.io/shard"])
    );

    let dir = tempfile::tempdir().unwrap();
    let rules = alert_rules(&["metrics.prometheusRule.alertLabels.team=data"]);
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&rules).unwrap(),
    )
    .unwrap();
    let checked = promtool(&["check", "rules", "rules.yaml"], dir.path());
    assert!(checked.contains("5 rules found"), "{checked}");

    let job = r#"job="rel-prefect-operator",namespace="ops""#;
    let quiet = r#"job="other-prefect-operator",namespace="quiet""#;
    // Each alert: none at `quiet`, one at `firing` with these labels and text.
    let quiet_then_firing = |alert: &str,
                             quiet: &str,
                             firing: &str,
                             labels: Value,
                             summary: &str,
                             description: &str| {
        let mut all = json!({"job": "rel-prefect-operator", "namespace": "ops", "team": "data"});
        merge_patch(&mut all, &labels);
        vec![
            json!({"eval_time": quiet, "alertname": alert, "exp_alerts": []}),
            json!({"eval_time": firing, "alertname": alert, "exp_alerts": [{
                "exp_labels": all,
                "exp_annotations": {"summary": summary, "description": description},
            }]}),
        ]
    };
    let cases: Vec<Value> = [
        quiet_then_firing("PrefectDeploymentsNotReady", "10m", "20m", json!({"severity": "warning"}),
            "PrefectDeployments are not Ready",
            "2 PrefectDeployment(s) of the operator in ops have been Ready=False for 15 minutes. `kubectl get pd -A -o wide` shows which, with the reason; their Warning events say more."),
        quiet_then_firing("PrefectRequestsFailing", "8m", "30m", json!({"severity": "warning"}),
            "Prefect servers do not answer the operator",
            "50% of the requests the operator in ops sends to Prefect got no answer or a 5xx over the last 5 minutes. prefect_operator_prefect_request_duration_seconds_count by endpoint and code shows which calls fail."),
        quiet_then_firing("PrefectEventStreamsDown", "10m", "20m", json!({"severity": "info"}),
            "Changes made in Prefect are found only by the resync",
            "The operator in ops has had no working event stream from 1 Prefect server(s) for 15 minutes, so drift there is repaired at the next resync instead of at once. The operator's log says why."),
        quiet_then_firing("PrefectOperatorNoLeader", "3m", "10m", json!({"severity": "critical", "prefect_operator_io_shard": "a"}),
            "No operator replica is reconciling",
            "No replica of the operator in ops (shard a) has held the leader lease for 5 minutes: its PrefectDeployments are not reconciled."),
        quiet_then_firing("PrefectOperatorDown", "8m", "15m", json!({"severity": "critical"}),
            "The operator is down",
            "No pod of rel-prefect-operator in ops has answered a metrics scrape for 5 minutes: PrefectDeployments are not reconciled."),
    ]
    .concat();
    let tests = json!({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": format!(r#"prefect_operator_resources{{ready="True",{job},pod="u-0"}}"#), "values": "5x40"},
                {"series": format!(r#"prefect_operator_resources{{ready="False",{job},pod="u-0"}}"#), "values": "0 0 2x40"},
                {"series": format!(r#"prefect_operator_resources{{ready="False",{quiet},pod="q-0"}}"#), "values": "0x40"},
                {"series": format!(r#"prefect_operator_prefect_request_duration_seconds_count{{method="POST",endpoint="deployments",code="201",{job},pod="u-0"}}"#), "values": "0+10x40"},
                {"series": format!(r#"prefect_operator_prefect_request_duration_seconds_count{{method="POST",endpoint="deployments",code="0",{job},pod="u-0"}}"#), "values": "0x10 10+10x30"},
                {"series": format!(r#"prefect_operator_prefect_request_duration_seconds_count{{method="POST",endpoint="deployments",code="201",{quiet},pod="q-0"}}"#), "values": "0+10x40"},
                {"series": format!(r#"prefect_operator_prefect_request_duration_seconds_count{{method="POST",endpoint="deployments",code="429",{quiet},pod="q-0"}}"#), "values": "0+1x40"},
                {"series": format!(r#"prefect_operator_event_streams_down{{{job},pod="u-0"}}"#), "values": "1x40"},
                {"series": format!(r#"prefect_operator_event_streams_down{{{quiet},pod="q-0"}}"#), "values": "0x40"},
                {"series": format!(r#"prefect_operator_leader{{{job},prefect_operator_io_shard="unsharded",pod="u-0"}}"#), "values": "1x40"},
                {"series": format!(r#"prefect_operator_leader{{{job},prefect_operator_io_shard="unsharded",pod="u-1"}}"#), "values": "0x40"},
                {"series": format!(r#"prefect_operator_leader{{{job},prefect_operator_io_shard="a",pod="a-0"}}"#), "values": "0x40"},
                {"series": format!(r#"prefect_operator_leader{{{job},prefect_operator_io_shard="a",pod="a-1"}}"#), "values": "0x40"},
                {"series": format!(r#"up{{{job},pod="u-0"}}"#), "values": "1x5 0x35"},
            ],
            "alert_rule_test": cases,
        }],
    });
    std::fs::write(
        dir.path().join("tests.yaml"),
        serde_yaml::to_string(&tests).unwrap(),
    )
    .unwrap();
    promtool(&["test", "rules", "tests.yaml"], dir.path());
}

/// What `helm install` prints: where to look, the CRD upgrade step, and a warning
/// while the operator may call any server.
#[test]
fn chart_install_notes_say_what_to_do_next() {
    // Helm asks the cluster for its version even for a client-side dry run.
    let kubeconfig = ControlPlane::shared()
        .kubeconfig
        .to_str()
        .unwrap()
        .to_string();
    let notes = |set: &[&str]| {
        let mut args = vec![
            "install",
            "rel",
            CHART,
            "--namespace",
            "ops",
            "--dry-run=client",
            "--kubeconfig",
            &kubeconfig,
        ];
        for s in set {
            args.extend(["--set", s]);
        }
        let out = helm_run(&args);
        out.split_once("NOTES:")
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| panic!("no notes in {out}"))
    };
    let open = notes(&[]);
    assert!(open.contains("in every namespace"), "{open}");
    assert!(open.contains("WARNING: allowedServers is empty"), "{open}");
    assert!(
        open.contains("kubectl apply --validate=false -f crds/prefectdeployments.prefect.io.yaml"),
        "{open}"
    );
    let closed = notes(&[
        "allowedServers={https://prefect.example.com/api}",
        "watchNamespaces={team-a,team-b}",
        "shards={a}",
    ]);
    assert!(!closed.contains("WARNING"), "{closed}");
    assert!(
        closed.contains("in team-a, team-b (plus one operator per shard key: a)"),
        "{closed}"
    );
}

#[test]
fn chart_keeps_one_operator_pod_through_node_drains() {
    // One replica: no budget, as it would block every drain.
    assert!(of_kind(&template(&[]), "PodDisruptionBudget").is_empty());
    assert!(of_kind(&template(&["shards={a}"]), "PodDisruptionBudget").is_empty());
    // Several: one per Deployment, selecting exactly that Deployment's pods.
    let objs = template(&["replicaCount=2", "shards={a,b}"]);
    let pdbs = of_kind(&objs, "PodDisruptionBudget");
    let deployments = of_kind(&objs, "Deployment");
    assert_eq!(pdbs.len(), deployments.len());
    assert_eq!(deployments.len(), 3);
    let selects = |pdb: &Value, d: &Value| {
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        pdb["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v)
    };
    for d in &deployments {
        let mine: Vec<_> = pdbs.iter().filter(|p| selects(p, d)).collect();
        assert_eq!(mine.len(), 1, "{}", d["metadata"]["name"]);
        assert_eq!(mine[0]["spec"]["minAvailable"], json!(1));
        assert_eq!(mine[0]["apiVersion"], json!("policy/v1"));
    }
    let off = template(&["replicaCount=2", "podDisruptionBudget.enabled=false"]);
    assert!(of_kind(&off, "PodDisruptionBudget").is_empty());
}

#[test]
fn chart_lints_and_renders_secure_defaults() {
    helm_run(&["lint", CHART]);
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{CHART}/Chart.yaml")).unwrap())
            .unwrap();
    let objs = template(&[]);

    let c = container(&objs);
    assert_eq!(
        c["image"],
        json!(format!(
            "prefect-operator:{}",
            chart["appVersion"].as_str().unwrap()
        )),
        "tag defaults to appVersion"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], json!(false));
    assert_eq!(sc["readOnlyRootFilesystem"], json!(true));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let pod = &of_kind(&objs, "Deployment")[0]["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], json!(true));
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        json!("RuntimeDefault")
    );
    assert!(
        c["resources"]["requests"]["memory"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], json!("/livez"));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], json!("/readyz"));
    assert!(
        !args(&objs)
            .iter()
            .any(|a| a.starts_with("--leader-election")),
        "one replica: no election"
    );
    let mut cluster_roles: Vec<&str> = of_kind(&objs, "ClusterRole")
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    cluster_roles.sort();
    // The operator's own, and what people may do (added to view, edit and admin).
    assert_eq!(
        cluster_roles,
        [
            "rel-prefect-operator",
            "rel-prefect-operator-edit",
            "rel-prefect-operator-view"
        ]
    );
    assert!(of_kind(&objs, "Role").is_empty());
    assert_eq!(of_kind(&objs, "Service").len(), 1);

    // No rule anywhere lists or watches Secrets; they are only read by name.
    for o in objs
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        for rule in o["rules"].as_array().unwrap() {
            let res = rule["resources"].as_array().unwrap();
            if res.iter().any(|r| r == "secrets") {
                assert_eq!(rule["verbs"], json!(["get"]), "{rule}");
            }
        }
    }

    // The access policy, rendered into arguments the binary accepts.
    let objs = template(&[
        "allowedServers={https://prefect.example.com/api,*.infra.svc}",
        "secretLabel=prefect.io/credentials=true",
    ]);
    let a = args(&objs);
    for want in [
        "--allowed-server=https://prefect.example.com/api",
        "--allowed-server=*.infra.svc",
        "--secret-label=prefect.io/credentials=true",
    ] {
        assert!(a.iter().any(|x| x == want), "{want} in {a:?}");
    }
    let cli = prefect_operator::cli::Cli::try_parse_from(
        std::iter::once("prefect-operator".to_string()).chain(a.iter().cloned()),
    )
    .unwrap();
    let prefect_operator::cli::Command::Run(run) = cli.command else {
        panic!("run expected")
    };
    assert_eq!(run.allowed_servers.len(), 2);
    assert_eq!(
        run.secret_label,
        Some(("prefect.io/credentials".to_string(), "true".to_string()))
    );

    // Shards: one more Deployment per key, each with its own selector and --shard.
    let objs = template(&["shards={a}"]);
    let deployments = of_kind(&objs, "Deployment");
    assert_eq!(deployments.len(), 2);
    let shard_args: Vec<String> = deployments[1]["spec"]["template"]["spec"]["containers"][0]
        ["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert!(
        shard_args.contains(&"--shard=a".to_string()),
        "{shard_args:?}"
    );
    assert!(!args(&objs).iter().any(|a| a.starts_with("--shard")));
    assert_ne!(
        deployments[0]["spec"]["selector"],
        deployments[1]["spec"]["selector"]
    );

    let objs = template(&["replicaCount=2"]);
    let a = args(&objs);
    assert!(a.contains(&"--leader-election".to_string()), "{a:?}");
    assert!(
        a.contains(&"--leader-election-namespace=ops".to_string()),
        "{a:?}"
    );
    let roles = of_kind(&objs, "Role");
    assert_eq!(roles.len(), 1);
    assert!(roles[0]["rules"].to_string().contains("leases"));

    let objs = template(&["watchNamespaces={team-a,team-b}"]);
    assert!(
        of_kind(&objs, "ClusterRole").is_empty() && of_kind(&objs, "ClusterRoleBinding").is_empty(),
        "namespaced mode has no cluster-wide RBAC"
    );
    // Unless asked for: the roles for people are ClusterRoles, but grant the operator nothing.
    let forced = template(&[
        "watchNamespaces={team-a}",
        "rbac.aggregateToDefaultRoles=true",
    ]);
    assert_eq!(of_kind(&forced, "ClusterRole").len(), 2);
    assert!(of_kind(&forced, "ClusterRoleBinding").is_empty());
    let roles = of_kind(&objs, "Role");
    let namespaces: Vec<&str> = roles
        .iter()
        .map(|r| r["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(namespaces, vec!["team-a", "team-b"]);
    assert_eq!(of_kind(&objs, "RoleBinding").len(), 2);
    assert!(args(&objs).contains(&"--namespace=team-a,team-b".to_string()));
    // The same rules, from one definition.
    let cluster = template(&[]);
    assert_eq!(
        roles[0]["rules"],
        of_kind(&cluster, "ClusterRole")[0]["rules"]
    );

    let objs = template(&[
        "metrics.serviceMonitor.enabled=true",
        "networkPolicy.enabled=true",
        "image.tag=1.2.3",
    ]);
    assert_eq!(of_kind(&objs, "ServiceMonitor").len(), 1);
    assert_eq!(of_kind(&objs, "NetworkPolicy").len(), 1);
    assert_eq!(container(&objs)["image"], json!("prefect-operator:1.2.3"));

    let chart_crd =
        std::fs::read_to_string(format!("{CHART}/crds/prefectdeployments.prefect.io.yaml"))
            .unwrap();
    let crd = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/prefectdeployments.prefect.io.yaml"
    ))
    .unwrap();
    assert!(chart_crd == crd, "charts/prefect-operator/crds/ must be a copy of crds/: cp crds/*.yaml charts/prefect-operator/crds/");
}

/// The operator binary running as a separate process, killed on drop.
struct Operator {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Operator {
    fn start(kubeconfig: &Path, extra: &[&str], rust_log: &str) -> Operator {
        Self::start_with_env(kubeconfig, extra, rust_log, &[])
    }

    fn start_with_env(
        kubeconfig: &Path,
        extra: &[&str],
        rust_log: &str,
        env: &[(&str, &Path)],
    ) -> Operator {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("operator.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .arg("run")
            // The OS picks the admin port and the operator logs it: no race with other
            // processes for a port chosen in advance.
            .arg("--admin-addr=127.0.0.1:0")
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", rust_log)
            .env_remove("PREFECT_OPERATOR_NAMESPACE")
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Operator {
            child,
            log,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin port the operator reported binding (0 until it has).
    fn port(&self) -> u16 {
        let logs = self.logs();
        let Some(line) = logs.lines().find(|l| l.contains("serving /livez")) else {
            return 0;
        };
        // Text or JSON format, with or without colour codes around the field name.
        let at = line.find("127.0.0.1:").map(|i| i + "127.0.0.1:".len());
        at.map(|i| {
            line[i..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
    }

    fn metrics(&self) -> String {
        http_get(self.port(), "/metrics", None)
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Sum of a metric's samples whose line contains every filter.
    fn metric_sum(&self, name: &str, filters: &[&str]) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name) && filters.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn is_leader(&self) -> bool {
        self.metrics()
            .lines()
            .any(|l| l == "prefect_operator_leader 1")
    }

    /// Prefect requests that change something, made by this process
    /// (`prefect::is_write`). Counted from one read of the metrics: the stream posts its
    /// probes on its own, and one between two reads would be counted in one only.
    fn prefect_writes(&self) -> f64 {
        let label = |line: &str, key: &str| -> String {
            let at = format!("{key}=\"");
            line.split_once(&at)
                .and_then(|(_, rest)| rest.split('"').next())
                .unwrap_or_default()
                .to_string()
        };
        self.metrics()
            .lines()
            .filter(|l| l.starts_with("prefect_operator_prefect_request_duration_seconds_count"))
            .filter(|l| is_write(&label(l, "method"), &label(l, "endpoint")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn wait_until(&mut self, what: &str, timeout: Duration, f: impl Fn(&Operator) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "operator exited ({status}) while waiting for {what}:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "operator did not exit:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A kubeconfig for a ServiceAccount, with a token from the TokenRequest API.
fn kubeconfig_for(cp: &ControlPlane, namespace: &str, sa: &str) -> PathBuf {
    let token = cp.kubectl_ok(&["create", "token", sa, "-n", namespace, "--duration=1h"]);
    let admin = std::fs::read_to_string(&cp.kubeconfig).unwrap();
    let text = admin.replace("token: admin-token", &format!("token: {}", token.trim()));
    let path = cp.dir.path().join(format!("kubeconfig-{namespace}-{sa}"));
    std::fs::write(&path, text).unwrap();
    path
}

fn pd_manifest(
    name: &str,
    ns: &str,
    prefect: &PrefectServer,
    pool: &str,
    server_extra: &str,
    description: &str,
) -> String {
    format!(
        r#"apiVersion: prefect.io/v1
kind: PrefectDeployment
metadata:
  name: {name}
  namespace: {ns}
spec:
  server:
    remoteApiUrl: {url}
{server_extra}
  workPool:
    name: {pool}
  deployment:
    entrypoint: flows/x.py:{fn_name}
    description: "{description}"
    schedules:
      - slug: hourly
        cron: "0 * * * *"
    triggers:
      - expect: [example.event]
"#,
        url = prefect.url,
        fn_name = name.replace('-', "_"),
    )
}

/// The Ready condition of a PrefectDeployment as `kubectl get -o json` shows it.
fn ready_condition(v: &Value) -> Option<&Value> {
    v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
}

fn wait_ready(cp: &ControlPlane, ns: &str, name: &str, generation: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out, _) = cp.kubectl(&["get", "pd", "-n", ns, name, "-o", "json"]);
        if ok {
            let v: Value = serde_json::from_str(&out).unwrap();
            let ready = ready_condition(&v).is_some_and(|c| c["status"] == "True");
            if ready && v["status"]["observedGeneration"] == json!(generation) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{ns}/{name} not Ready at generation {generation}: {}",
                v["status"]
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn chart_rbac_is_exactly_enough() {
    let cp = ControlPlane::shared();
    let prefect = PrefectServer::shared();
    let pool = create_pool(prefect);
    let ops = unique("ops");
    // Two replicas: the chart turns leader election on and grants the Lease.
    helm_run(&[
        "install",
        "rbac",
        CHART,
        "--namespace",
        &ops,
        "--create-namespace",
        "--set",
        "replicaCount=2",
        "--kubeconfig",
        cp.kubeconfig.to_str().unwrap(),
    ]);
    // With two replicas a PodDisruptionBudget keeps one through drains; this 1.20
    // apiserver has only policy/v1beta1, which the chart picks from discovery.
    let pdbs: Value =
        serde_json::from_str(&cp.kubectl_ok(&["get", "pdb", "-n", &ops, "-o", "json"])).unwrap();
    let pdbs = pdbs["items"].as_array().unwrap();
    assert_eq!(pdbs.len(), 1, "{pdbs:?}");
    assert_eq!(pdbs[0]["spec"]["minAvailable"], json!(1));
    let sa = "rbac-prefect-operator";
    let kubeconfig = kubeconfig_for(cp, &ops, sa);

    let mut op = Operator::start(
        &kubeconfig,
        &[
            "--leader-election",
            &format!("--leader-election-namespace={ops}"),
        ],
        "info",
    );
    op.wait_until("leadership", Duration::from_secs(30), |o| o.is_leader());
    op.wait_until("/readyz", Duration::from_secs(30), |o| {
        http_get(o.port(), "/readyz", None).is_some_and(|(c, _)| c == 200)
    });
    assert_eq!(
        http_get(op.port(), "/livez", None).map(|(c, _)| c),
        Some(200)
    );

    let ns = unique("work");
    cp.kubectl_ok(&["create", "namespace", &ns]);
    cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "prefect-auth",
        "-n",
        &ns,
        "--from-literal=auth=user:pass",
    ]);
    let name = "rbac-cycle";
    let auth =
        "    authString:\n      valueFrom:\n        secretKeyRef: {name: prefect-auth, key: auth}";
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&pd_manifest(name, &ns, prefect, &pool, auth, "one")),
    );
    assert!(ok, "{err}");
    let v = wait_ready(cp, &ns, name, 1);
    let id = v["status"]["deploymentId"].as_str().unwrap().to_string();
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&pd_manifest(name, &ns, prefect, &pool, auth, "two")),
    );
    assert!(ok, "{err}");
    wait_ready(cp, &ns, name, 2);
    let events = cp.kubectl_ok(&["get", "events", "-n", &ns, "-o", "json"]);
    assert!(
        events.contains("Created Prefect deployment"),
        "events were recorded with the chart's RBAC"
    );
    cp.kubectl_ok(&["delete", "pd", "-n", &ns, name, "--timeout=60s"]);
    let (code, _) = prefect.get(&format!("/api/deployments/{id}"));
    assert_eq!(code, 404, "deleted from Prefect");
    let logs = op.logs();
    assert!(
        !logs.contains("forbidden") && !logs.contains("Forbidden"),
        "no permission errors:\n{logs}"
    );
    assert!(
        op.metric_sum("prefect_operator_reconciles_total", &["result=\"ok\""]) >= 3.0,
        "{}",
        op.metrics()
    );
    // Every series the chart's alerts read is one this operator exports.
    let exported = op.metrics();
    let read = metrics_in_rules(&alert_rules(&[]));
    assert_eq!(read.len(), 4, "{read:?}");
    for name in read {
        assert!(
            exported
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "the alerts read {name}, which the operator does not export:\n{exported}"
        );
    }
    assert!(
        exported.contains("prefect_operator_resources{ready=\"False\"}"),
        "{exported}"
    );
    drop(op);

    // The same binary without the chart's RBAC fails at once, saying why.
    cp.kubectl_ok(&["create", "serviceaccount", "no-rbac", "-n", &ops]);
    let bare = kubeconfig_for(cp, &ops, "no-rbac");
    let mut op = Operator::start(&bare, &[], "info");
    let status = op.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let logs = op.logs();
    assert!(
        logs.contains("not allowed to list PrefectDeployments") && logs.contains("RBAC"),
        "{logs}"
    );
}

#[test]
fn leader_hand_over_without_double_writes() {
    let cp = ControlPlane::shared();
    let prefect = PrefectServer::shared();
    let pool = create_pool(prefect);
    let ns = unique("ha");
    cp.kubectl_ok(&["create", "namespace", &ns]);
    let lease = format!("--leader-election-lease={}", unique("lease"));
    let le = [
        "--leader-election",
        "--leader-election-namespace=default",
        lease.as_str(),
    ];
    let ns_arg = format!("--namespace={ns}");
    let args: Vec<&str> = le.iter().copied().chain([ns_arg.as_str()]).collect();
    let mut a = Operator::start(&cp.kubeconfig, &args, "info");
    a.wait_until("first replica leads", Duration::from_secs(30), |o| {
        o.is_leader()
    });
    let mut b = Operator::start(&cp.kubeconfig, &args, "info");
    b.wait_until("standby ready", Duration::from_secs(30), |o| {
        http_get(o.port(), "/readyz", None).is_some_and(|(c, _)| c == 200)
    });
    assert!(!b.is_leader());

    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&pd_manifest("first", &ns, prefect, &pool, "", "first one")),
    );
    assert!(ok, "{err}");
    wait_ready(cp, &ns, "first", 1);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        b.metric_sum("prefect_operator_reconciles_total", &[]),
        0.0,
        "the standby does not reconcile"
    );
    assert_eq!(b.prefect_writes(), 0.0);
    assert!(a.prefect_writes() > 0.0);

    // Kill the leader without letting it release the lease: the standby must wait for
    // it to expire (15 s), then take over.
    let killed = Instant::now();
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    b.wait_until("take-over", Duration::from_secs(25), |o| o.is_leader());
    let took = killed.elapsed();
    println!("take-over after {:.1} s", took.as_secs_f64());
    // The new leader re-checks the existing resource: reads only.
    b.wait_until(
        "first resync by the new leader",
        Duration::from_secs(20),
        |o| o.metric_sum("prefect_operator_reconciles_total", &["result=\"ok\""]) >= 1.0,
    );
    assert_eq!(
        b.prefect_writes(),
        0.0,
        "no Prefect writes for an unchanged resource after hand-over:\n{}",
        b.metrics()
    );

    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&pd_manifest(
            "second",
            &ns,
            prefect,
            &pool,
            "",
            "second one",
        )),
    );
    assert!(ok, "{err}");
    wait_ready(cp, &ns, "second", 1);
    assert!(b.prefect_writes() > 0.0);
}

#[test]
fn secrets_never_reach_logs_events_or_status() {
    let cp = ControlPlane::shared();
    let prefect = PrefectServer::shared();
    let pool = create_pool(prefect);
    let ns = unique("sec");
    cp.kubectl_ok(&["create", "namespace", &ns]);
    let api_key = "pnu_TOPSECRET_inline_4242";
    let password = "TOPSECRET-password-9898";
    cp.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "creds",
        "-n",
        &ns,
        &format!("--from-literal=auth=admin:{password}"),
    ]);
    let mut op = Operator::start(
        &cp.kubeconfig,
        &[&format!("--namespace={ns}"), "--log-format=json"],
        "debug",
    );
    let inline = format!("    apiKey:\n      value: {api_key}");
    let from_secret =
        "    authString:\n      valueFrom:\n        secretKeyRef: {name: creds, key: auth}"
            .to_string();
    for (name, extra) in [("inline-key", inline), ("secret-auth", from_secret)] {
        let (ok, _, err) = cp.kubectl_stdin(
            &["apply", "-f", "-"],
            Some(&pd_manifest(name, &ns, prefect, &pool, &extra, "s")),
        );
        assert!(ok, "{err}");
        wait_ready(cp, &ns, name, 1);
    }
    // A failure path too: a Secret key that does not exist.
    let missing =
        "    authString:\n      valueFrom:\n        secretKeyRef: {name: creds, key: nope}";
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&pd_manifest(
            "missing-key",
            &ns,
            prefect,
            &pool,
            missing,
            "s",
        )),
    );
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_secs(3));
    op.wait_until("some debug logs", Duration::from_secs(10), |o| {
        o.logs().lines().count() > 5
    });

    let logs = op.logs();
    let events = cp.kubectl_ok(&["get", "events", "-n", &ns, "-o", "json"]);
    let statuses = cp.kubectl_ok(&["get", "pd", "-n", &ns, "-o", "jsonpath={.items[*].status}"]);
    assert!(statuses.contains("SecretNotFound"), "{statuses}");
    for secret in [api_key, password] {
        assert!(!logs.contains(secret), "secret in logs");
        assert!(!events.contains(secret), "secret in events");
        assert!(!statuses.contains(secret), "secret in status");
    }
    // JSON logs are one object per line.
    for line in logs.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}

#[test]
fn missing_crd_and_crd_upgrade() {
    // A control plane of its own, without the CRD.
    let cp = ControlPlane::start();
    let mut op = Operator::start(&cp.kubeconfig, &[], "info");
    let status = op.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let logs = op.logs();
    assert!(
        logs.contains("CRD")
            && logs.contains(
                "kubectl apply --validate=false -f crds/prefectdeployments.prefect.io.yaml"
            ),
        "{logs}"
    );

    // An older CRD (today's without the fields added since: deletionPolicy,
    // adoptExisting, status.triggersHash), then the current one over it, then again.
    let ours = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/prefectdeployments.prefect.io.yaml"
    );
    let mut old: Value = serde_yaml::from_str(&std::fs::read_to_string(ours).unwrap()).unwrap();
    let schema = &mut old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
    schema["spec"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("deletionPolicy");
    schema["spec"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("adoptExisting");
    schema["status"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("triggersHash");
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "--validate=false", "-f", "-"],
        Some(&serde_json::to_string(&old).unwrap()),
    );
    assert!(ok, "{err}");
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/prefectdeployments.prefect.io",
        "--timeout=60s",
    ]);
    cp.kubectl_ok(&["apply", "--validate=false", "-f", ours]);
    cp.kubectl_ok(&["apply", "--validate=false", "-f", ours]);
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/prefectdeployments.prefect.io",
        "--timeout=60s",
    ]);
    let served = cp.kubectl_ok(&["get", "crd", "prefectdeployments.prefect.io", "-o", "jsonpath={.spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.deletionPolicy.enum}"]);
    assert!(
        served.contains("Orphan"),
        "our schema is served after the upgrade: {served}"
    );
}

/// People bound to Kubernetes' `edit` role in a namespace manage PrefectDeployments
/// there, those bound to `view` read them, and neither writes status. The apiserver
/// here runs without a controller manager, which is what merges labelled ClusterRoles
/// into `view`/`edit`/`admin`; so the test checks that those built-in roles select the
/// chart's labels, then binds the chart's roles as the aggregation would and acts as
/// each user through the real authorizer.
#[test]
fn chart_lets_namespace_users_manage_prefect_deployments() {
    let cp = ControlPlane::shared();
    let ops = unique("ops-users");
    helm_run(&[
        "install",
        "users",
        CHART,
        "--namespace",
        &ops,
        "--create-namespace",
        "--skip-crds",
        "--kubeconfig",
        cp.kubeconfig.to_str().unwrap(),
    ]);
    for (builtin, ours) in [
        ("view", "users-prefect-operator-view"),
        ("edit", "users-prefect-operator-edit"),
        ("admin", "users-prefect-operator-edit"),
    ] {
        let role: Value =
            serde_json::from_str(&cp.kubectl_ok(&["get", "clusterrole", builtin, "-o", "json"]))
                .unwrap();
        let ours: Value =
            serde_json::from_str(&cp.kubectl_ok(&["get", "clusterrole", ours, "-o", "json"]))
                .unwrap();
        let labels = &ours["metadata"]["labels"];
        let selected = role["aggregationRule"]["clusterRoleSelectors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|sel| {
                sel["matchLabels"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| &labels[k] == v)
            });
        assert!(
            selected,
            "{builtin} does not take in {}",
            ours["metadata"]["name"]
        );
    }

    let team = unique("team-users");
    cp.kubectl_ok(&["create", "namespace", &team]);
    for (user, roles) in [
        (
            "editor",
            &["users-prefect-operator-view", "users-prefect-operator-edit"][..],
        ),
        ("viewer", &["users-prefect-operator-view"][..]),
    ] {
        cp.kubectl_ok(&["create", "serviceaccount", user, "-n", &team]);
        for role in roles {
            cp.kubectl_ok(&[
                "create",
                "rolebinding",
                &format!("{user}-{role}"),
                "-n",
                &team,
                &format!("--clusterrole={role}"),
                &format!("--serviceaccount={team}:{user}"),
            ]);
        }
    }
    let as_user = |user: &str| format!("--as=system:serviceaccount:{team}:{user}");
    let manifest = format!(
        "apiVersion: prefect.io/v1\nkind: PrefectDeployment\nmetadata: {{name: by-hand, namespace: {team}}}\n\
         spec:\n  server: {{remoteApiUrl: 'http://prefect.invalid/api'}}\n  workPool: {{name: pool}}\n\
         \x20 deployment: {{entrypoint: 'flows/a.py:main'}}\n"
    );
    let denied = |out: (bool, String, String)| !out.0 && out.2.contains("forbidden");

    // view: reads, and nothing else.
    assert!(denied(cp.kubectl_stdin(
        &["apply", "-f", "-", &as_user("viewer")],
        Some(&manifest)
    )));
    // edit: creates, changes and deletes; reads through view.
    let (ok, _, err) = cp.kubectl_stdin(&["apply", "-f", "-", &as_user("editor")], Some(&manifest));
    assert!(ok, "{err}");
    for user in ["editor", "viewer"] {
        let (ok, _, err) = cp.kubectl(&["get", "pd", "by-hand", "-n", &team, &as_user(user)]);
        assert!(ok, "{user}: {err}");
        let (ok, _, err) = cp.kubectl(&[
            "get",
            "pd",
            "-n",
            &team,
            "--watch-only",
            "--request-timeout=1s",
            &as_user(user),
        ]);
        assert!(ok || !err.contains("forbidden"), "{user} may watch: {err}");
    }
    let (ok, _, err) = cp.kubectl(&[
        "label",
        "pd",
        "by-hand",
        "-n",
        &team,
        "team=data",
        &as_user("editor"),
    ]);
    assert!(ok, "{err}");
    assert!(denied(cp.kubectl(&[
        "label",
        "pd",
        "by-hand",
        "-n",
        &team,
        "team=ml",
        "--overwrite",
        &as_user("viewer"),
    ])));
    // Status is the operator's, for both.
    for user in ["editor", "viewer"] {
        assert!(
            denied(cp.kubectl(&[
                "patch",
                "pd",
                "by-hand",
                "-n",
                &team,
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"deploymentId":"forged"}}"#,
                &as_user(user),
            ])),
            "{user} wrote status"
        );
    }
    assert!(denied(cp.kubectl(&[
        "delete",
        "pd",
        "by-hand",
        "-n",
        &team,
        &as_user("viewer")
    ])));
    let (ok, _, err) = cp.kubectl(&[
        "delete",
        "pd",
        "by-hand",
        "-n",
        &team,
        "--wait=false",
        &as_user("editor"),
    ]);
    assert!(ok, "{err}");

    // Turned off, the chart adds nothing to the built-in roles.
    let objs = template(&["rbac.aggregateToDefaultRoles=false"]);
    assert!(of_kind(&objs, "ClusterRole")
        .iter()
        .all(|r| r["metadata"]["labels"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("rbac.authorization.k8s.io/aggregate"))));
    assert_eq!(of_kind(&objs, "ClusterRole").len(), 1);
}

/// What the chart's caBundle gives the container, for `front`'s CA: its environment,
/// with the mounted bundle stood in for by `bundle`, a directory holding the CA.
fn ca_bundle_env(front: &support::TlsFront, bundle: &Path) -> Vec<(String, PathBuf)> {
    let objs = template(&["caBundle.configMap=prefect-ca"]);
    let c = container(&objs);
    let mount = c["volumeMounts"][0]["mountPath"]
        .as_str()
        .unwrap()
        .to_string();
    let pod = &of_kind(&objs, "Deployment")[0]["spec"]["template"]["spec"];
    let volume = &pod["volumes"][0];
    assert_eq!(volume["name"], c["volumeMounts"][0]["name"]);
    assert_eq!(volume["configMap"]["name"], json!("prefect-ca"));
    let file = volume["configMap"]["items"][0]["path"].as_str().unwrap();
    std::fs::copy(&front.ca_file, bundle.join(file)).unwrap();
    let env: Vec<(String, PathBuf)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap().starts_with("SSL_CERT"))
        .map(|e| {
            let value = e["value"].as_str().unwrap();
            let value = value.replace(&mount, bundle.to_str().unwrap());
            (
                e["name"].as_str().unwrap().to_string(),
                PathBuf::from(value),
            )
        })
        .collect();
    assert_eq!(env.len(), 2, "{env:?}");
    assert!(env.contains(&(
        "SSL_CERT_FILE".to_string(),
        PathBuf::from("/etc/ssl/certs/ca-certificates.crt")
    )));
    env
}

/// Applies a PrefectDeployment `name` in a new namespace whose server is `url` (a front
/// to the shared Prefect server); returns the namespace.
fn apply_behind(cp: &ControlPlane, prefect: &PrefectServer, name: &str, url: &str) -> String {
    let pool = create_pool(prefect);
    let ns = unique(name);
    cp.kubectl_ok(&["create", "namespace", &ns]);
    let manifest = pd_manifest(name, &ns, prefect, &pool, "", name).replace(&prefect.url, url);
    let (ok, _, err) = cp.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest));
    assert!(ok, "{err}");
    ns
}

/// With `op` running: `name` becomes Ready with its deployment and automation in
/// Prefect, the event stream connects, and deleting the resource deletes them.
fn applied_streamed_deleted(
    cp: &ControlPlane,
    prefect: &PrefectServer,
    op: &mut Operator,
    ns: &str,
    name: &str,
) {
    let v = wait_ready(cp, ns, name, 1);
    let id = v["status"]["deploymentId"].as_str().unwrap().to_string();
    assert_eq!(prefect.get(&format!("/api/deployments/{id}")).0, 200);
    let automation = v["status"]["automationIds"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        prefect.get(&format!("/api/automations/{automation}")).0,
        200
    );
    op.wait_until("the event stream", Duration::from_secs(60), |o| {
        o.metric_sum("prefect_operator_event_streams_connected", &[]) >= 1.0
    });
    cp.kubectl_ok(&["delete", "pd", "-n", ns, name, "--timeout=60s"]);
    assert_eq!(prefect.get(&format!("/api/deployments/{id}")).0, 404);
}

/// Behind an egress proxy that only tunnels (CONNECT), with the Prefect server known
/// by a name only the proxy resolves: given HTTPS_PROXY (the chart's `proxy.https`),
/// the operator's API calls and its event stream both go through the proxy, and so
/// does its Kubernetes client when it runs from a kubeconfig.
#[test]
fn a_prefect_server_reached_through_an_http_proxy() {
    let cp = ControlPlane::shared();
    let prefect = PrefectServer::shared();
    let front = support::TlsFront::start(prefect);
    let proxy = support::ConnectProxy::start();
    let name = "via-proxy";
    let url = format!("https://prefect.invalid:{}/api", front.port);
    let ns = apply_behind(cp, prefect, name, &url);

    // The chart's proxy values, as the container gets them.
    let objs = template(&["proxy.https=http://proxy.corp:3128", "proxy.noProxy=.svc"]);
    let given: Vec<(String, String)> = container(&objs)["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"].as_str().unwrap().ends_with("PROXY"))
        .map(|e| {
            (
                e["name"].as_str().unwrap().into(),
                e["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        given,
        [
            (
                "HTTPS_PROXY".to_string(),
                "http://proxy.corp:3128".to_string()
            ),
            ("NO_PROXY".to_string(), ".svc".to_string())
        ]
    );

    let bundle = tempfile::tempdir().unwrap();
    let mut env = ca_bundle_env(&front, bundle.path());
    env.push(("HTTPS_PROXY".into(), PathBuf::from(&proxy.url)));
    let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (k.as_str(), v.as_path())).collect();
    let mut op = Operator::start_with_env(
        &cp.kubeconfig,
        &[&format!("--namespace={ns}")],
        "info",
        &env,
    );
    // prefect.invalid resolves nowhere else: what reached it came through the proxy.
    applied_streamed_deleted(cp, prefect, &mut op, &ns, name);
    let tunnels = proxy.tunnels();
    let to_prefect = format!("prefect.invalid:{}", front.port);
    assert!(
        tunnels.iter().filter(|t| **t == to_prefect).count() >= 2,
        "API calls and the stream: {tunnels:?}"
    );
    let apiserver = cp.url.trim_start_matches("https://");
    assert!(tunnels.iter().any(|t| t == apiserver), "{tunnels:?}");
}

/// A Prefect server whose certificate comes from an internal CA. Without that CA the
/// operator says the certificate is not trusted and how to trust it; given it the way
/// the chart's `caBundle` gives it (the same environment, the bundle as a directory),
/// the deployment is applied over HTTPS and the event stream connects over WSS. The
/// image's public roots stay listed beside the bundle.
#[test]
fn a_prefect_server_behind_a_private_ca() {
    let cp = ControlPlane::shared();
    let prefect = PrefectServer::shared();
    let front = support::TlsFront::start(prefect);
    let name = "behind-ca";
    let ns = apply_behind(cp, prefect, name, &front.url);
    let only_here = format!("--namespace={ns}");

    let op = Operator::start(&cp.kubeconfig, &[&only_here], "info");
    let deadline = Instant::now() + Duration::from_secs(60);
    let message = loop {
        let out = cp.kubectl_ok(&["get", "pd", "-n", &ns, name, "-o", "json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        if let Some(c) = ready_condition(&v).filter(|c| c["status"] == "False") {
            break c["message"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no Ready=False: {}", v["status"]);
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        message.contains("certificate")
            && message.contains("UnknownIssuer")
            && message.contains("caBundle"),
        "{message}"
    );
    drop(op);

    let bundle = tempfile::tempdir().unwrap();
    let env = ca_bundle_env(&front, bundle.path());
    let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (k.as_str(), v.as_path())).collect();
    let mut op = Operator::start_with_env(&cp.kubeconfig, &[&only_here], "info", &env);
    applied_streamed_deleted(cp, prefect, &mut op, &ns, name);
}

#[test]
fn chart_namespaced_mode_rbac_is_enough() {
    let cp = ControlPlane::shared();
    let prefect = PrefectServer::shared();
    let pool = create_pool(prefect);
    let ops = unique("ops-ns");
    let team = unique("team");
    cp.kubectl_ok(&["create", "namespace", &team]);
    let watch = format!("watchNamespaces={{{team}}}");
    helm_run(&[
        "install",
        "scoped",
        CHART,
        "--namespace",
        &ops,
        "--create-namespace",
        "--skip-crds",
        "--set",
        &watch,
        "--kubeconfig",
        cp.kubeconfig.to_str().unwrap(),
    ]);
    // Only namespaced RBAC was installed.
    let (_, bindings, _) = cp.kubectl(&["get", "clusterrolebinding", "scoped-prefect-operator"]);
    assert!(
        bindings.is_empty(),
        "namespaced mode must not create cluster-wide bindings"
    );
    let kubeconfig = kubeconfig_for(cp, &ops, "scoped-prefect-operator");

    let mut op = Operator::start(&kubeconfig, &[&format!("--namespace={team}")], "info");
    op.wait_until("/readyz", Duration::from_secs(30), |o| {
        http_get(o.port(), "/readyz", None).is_some_and(|(c, _)| c == 200)
    });
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&pd_manifest(
            "scoped-cycle",
            &team,
            prefect,
            &pool,
            "",
            "scoped",
        )),
    );
    assert!(ok, "{err}");
    let v = wait_ready(cp, &team, "scoped-cycle", 1);
    let id = v["status"]["deploymentId"].as_str().unwrap().to_string();
    cp.kubectl_ok(&["delete", "pd", "-n", &team, "scoped-cycle", "--timeout=60s"]);
    assert_eq!(prefect.get(&format!("/api/deployments/{id}")).0, 404);
    let logs = op.logs();
    assert!(
        !logs.contains("forbidden") && !logs.contains("Forbidden"),
        "{logs}"
    );
    drop(op);

    // The same identity may not watch a namespace the chart was not told about.
    let other = unique("other");
    cp.kubectl_ok(&["create", "namespace", &other]);
    let mut op = Operator::start(&kubeconfig, &[&format!("--namespace={other}")], "info");
    assert!(!op.wait_exit(Duration::from_secs(30)).success());
    assert!(
        op.logs().contains("not allowed to list PrefectDeployments"),
        "{}",
        op.logs()
    );
}

/// Hostile manifests from the corpus (`tests/fixtures/hostile/`), applied with kubectl to
/// the real apiserver while the operator runs: each is refused by the apiserver or
/// reported on its own resource, the process stays up throughout, and a good resource
/// applied after them becomes Ready.
#[test]
fn hostile_manifests_do_not_stop_the_operator() {
    let cp = ControlPlane::shared();
    let prefect = PrefectServer::shared();
    let pool = create_pool(prefect);
    let ns = unique("hostile");
    cp.kubectl_ok(&["create", "namespace", &ns]);
    let mut op = Operator::start(&cp.kubeconfig, &[&format!("--namespace={ns}")], "info");

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hostile");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let manifests: Vec<(String, Value)> = files
        .iter()
        .map(|p| {
            let entry: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            (name, entry["spec"].clone())
        })
        .collect();
    let (mut refused, mut accepted) = (Vec::new(), Vec::new());
    for (name, mut spec) in manifests {
        spec["server"] = json!({"remoteApiUrl": prefect.url});
        spec["workPool"] = json!({"name": pool});
        let pd = json!({
            "apiVersion": "prefect.io/v1",
            "kind": "PrefectDeployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        });
        let (ok, _, err) = cp.kubectl_stdin(&["create", "-f", "-"], Some(&pd.to_string()));
        if ok {
            accepted.push(name);
        } else {
            assert!(
                err.contains("Invalid value") || err.contains("invalid"),
                "{name}: {err}"
            );
            refused.push(name);
        }
    }
    println!("refused by the apiserver: {refused:?}");
    assert!(
        refused.contains(&"rrule-too-long".to_string()),
        "{refused:?}"
    );

    // Every accepted one gets an honest Ready condition of its own.
    let deadline = Instant::now() + Duration::from_secs(120);
    for name in &accepted {
        loop {
            let (ok, out, _) = cp.kubectl(&["get", "pd", "-n", &ns, name, "-o", "json"]);
            let v: Value = if ok {
                serde_json::from_str(&out).unwrap()
            } else {
                json!({})
            };
            if let Some(c) = ready_condition(&v) {
                assert!(
                    c["status"] == "True" || !c["reason"].as_str().unwrap_or("").is_empty(),
                    "{name}: {c}"
                );
                if name.starts_with("resync-") || name == "interval-below-microsecond" {
                    assert_eq!(c["reason"], "InvalidSpec", "{name}: {c}");
                }
                break;
            }
            if let Ok(Some(status)) = op.child.try_wait() {
                panic!("operator exited ({status}) on {name}:\n{}", op.logs());
            }
            assert!(
                Instant::now() < deadline,
                "{name}: no Ready condition:\n{}",
                op.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    // And the operator still serves everyone else.
    let (ok, _, err) = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&pd_manifest(
            "good-after-hostile",
            &ns,
            prefect,
            &pool,
            "",
            "fine",
        )),
    );
    assert!(ok, "{err}");
    wait_ready(cp, &ns, "good-after-hostile", 1);
    assert!(op.child.try_wait().unwrap().is_none(), "{}", op.logs());
    assert!(!op.logs().contains("panicked"), "{}", op.logs());
}

/// Two operators, one for shard `a` and one for the unlabelled resources: each handles
/// only its own, and a resource moved between shards is taken over without a write.
#[test]
fn shards_split_the_resources() {
    let cp = ControlPlane::shared();
    let prefect = PrefectServer::shared();
    let pool = create_pool(prefect);
    let ns = unique("shard");
    cp.kubectl_ok(&["create", "namespace", &ns]);
    let ns_arg = format!("--namespace={ns}");
    let mut plain = Operator::start(&cp.kubeconfig, &[ns_arg.as_str()], "info");
    let mut sharded = Operator::start(&cp.kubeconfig, &[ns_arg.as_str(), "--shard=a"], "info");
    for op in [&mut plain, &mut sharded] {
        op.wait_until("/readyz", Duration::from_secs(30), |o| {
            http_get(o.port(), "/readyz", None).is_some_and(|(c, _)| c == 200)
        });
    }
    let labelled = pd_manifest("in-a", &ns, prefect, &pool, "", "one").replace(
        &format!("  namespace: {ns}\n"),
        &format!("  namespace: {ns}\n  labels:\n    sharding.fluxcd.io/key: a\n"),
    );
    for manifest in [
        labelled,
        pd_manifest("unlabelled", &ns, prefect, &pool, "", "one"),
    ] {
        let (ok, _, err) = cp.kubectl_stdin(&["apply", "-f", "-"], Some(&manifest));
        assert!(ok, "{err}");
    }
    wait_ready(cp, &ns, "in-a", 1);
    wait_ready(cp, &ns, "unlabelled", 1);
    let ready = |op: &Operator| op.metric_sum("prefect_operator_resources", &["ready=\"True\""]);
    plain.wait_until("one resource each", Duration::from_secs(30), |o| {
        ready(o) == 1.0
    });
    sharded.wait_until("one resource each", Duration::from_secs(30), |o| {
        ready(o) == 1.0
    });
    assert!(
        sharded.logs().contains("sharding.fluxcd.io/key=a"),
        "{}",
        sharded.logs()
    );

    // Moved to the unsharded operator: it takes the resource over with reads only.
    let writes_before = plain.prefect_writes();
    cp.kubectl_ok(&["label", "pd", "-n", &ns, "in-a", "sharding.fluxcd.io/key-"]);
    plain.wait_until("the moved resource", Duration::from_secs(30), |o| {
        ready(o) == 2.0
    });
    wait_ready(cp, &ns, "in-a", 1);
    assert_eq!(
        plain.prefect_writes(),
        writes_before,
        "no duplicate writes:\n{}",
        plain.metrics()
    );
}
