//! The tool subcommands, each a thin shell over the core: `validate` runs
//! `manifests::check`; `diff` runs the controller's own observe and plan, and never
//! writes. Each returns the process exit status.

use std::process::ExitCode;

use serde_json::{json, Value};

use crate::cli::{ConvertArgs, DiffArgs, ExportArgs, ExportOutput, Output, ValidateArgs};
use crate::desired;
use crate::manifests::{self, Checked, Document};
use crate::plan::{self, SyncState};
use crate::prefect::{Auth, CallLog, PrefectClient};
use crate::reconcile::{execute, server, status};

/// `validate`: 0 when every PrefectDeployment is valid, 1 when any is not, 2 when a file
/// could not be read or parsed.
pub fn validate(args: &ValidateArgs) -> ExitCode {
    let (docs, read_errors) = manifests::load(&args.files);
    let results: Vec<(&Document, Result<Checked, String>)> = docs
        .iter()
        .map(|d| (d, manifests::check(&d.value)))
        .collect();
    let invalid = results.iter().filter(|(_, r)| r.is_err()).count();
    match args.output {
        Output::Text => {
            for e in &read_errors {
                eprintln!("{}", e.0);
            }
            for (d, r) in &results {
                match r {
                    Ok(_) => println!("{}: valid", d.label()),
                    Err(e) => println!("{}: {e}", d.label()),
                }
            }
            eprintln!(
                "{} PrefectDeployment(s) checked, {invalid} invalid",
                results.len()
            );
        }
        Output::Json => {
            let items: Vec<Value> = results
                .iter()
                .map(|(d, r)| {
                    json!({
                        "file": d.file,
                        "place": d.place,
                        "name": d.object_name(),
                        "valid": r.is_ok(),
                        "error": r.as_ref().err(),
                    })
                })
                .collect();
            let errors: Vec<&str> = read_errors.iter().map(|e| e.0.as_str()).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"results": items, "readErrors": errors}))
                    .expect("JSON")
            );
        }
    }
    if !read_errors.is_empty() {
        ExitCode::from(2)
    } else if invalid > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// One resource's diff.
struct Outcome {
    label: String,
    server: String,
    result: Result<(plan::Plan, Option<std::borrow::Cow<'static, str>>), String>,
}

/// `diff`: 0 no differences, 1 differences, 2 an error (an invalid manifest, an
/// unreachable server, a file that could not be read).
pub async fn diff(args: &DiffArgs) -> ExitCode {
    let (docs, read_errors) = manifests::load(&args.files);
    for e in &read_errors {
        eprintln!("{}", e.0);
    }
    let kube = if args.from_cluster {
        match kube::Client::try_default().await {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("--from-cluster: no Kubernetes configuration: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let http = crate::prefect::http_client();
    let mut outcomes = Vec::new();
    for d in &docs {
        outcomes.push(diff_one(d, args, kube.as_ref(), &http).await);
    }
    let mut changed = false;
    let mut failed = !read_errors.is_empty();
    match args.output {
        Output::Text => {
            for o in &outcomes {
                match &o.result {
                    Ok((p, note)) => {
                        changed |= !p.is_noop();
                        print!("{} [{}]\n{p}", o.label, o.server);
                        if let Some(n) = note {
                            println!("  note: {n}");
                        }
                    }
                    Err(e) => {
                        failed = true;
                        println!("{}: error: {e}", o.label);
                    }
                }
            }
        }
        Output::Json => {
            let items: Vec<Value> = outcomes
                .iter()
                .map(|o| match &o.result {
                    Ok((p, note)) => {
                        changed |= !p.is_noop();
                        json!({"resource": o.label, "server": o.server, "changes": !p.is_noop(), "plan": p, "note": note})
                    }
                    Err(e) => {
                        failed = true;
                        json!({"resource": o.label, "server": o.server, "error": e})
                    }
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&Value::Array(items)).expect("JSON")
            );
        }
    }
    if failed {
        ExitCode::from(2)
    } else if changed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

const NO_STATE_NOTE: &str = "without --from-cluster the resource's status is unknown: a deployment carrying an operator owner label is taken as this resource's, and its automations are assumed to match the triggers";

async fn diff_one(
    d: &Document,
    args: &DiffArgs,
    kube: Option<&kube::Client>,
    http: &reqwest::Client,
) -> Outcome {
    let checked = match manifests::check(&d.value) {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                label: d.label(),
                server: String::new(),
                result: Err(e),
            }
        }
    };
    let pd = &checked.resource;
    let ns = pd
        .metadata
        .namespace
        .clone()
        .or_else(|| kube.map(|k| k.default_namespace().to_string()))
        .unwrap_or_else(|| "default".into());
    let base = args
        .server_url
        .clone()
        .unwrap_or_else(|| server::base_url(&pd.spec.server, &ns));
    let result = async {
        let valid = checked.valid().map_err(|p| p.to_string())?;
        let (auth, live) = match kube {
            Some(k) => {
                let cache = server::CredentialCache::default();
                let auth =
                    server::credentials(k, &ns, &pd.spec.server, &Default::default(), &cache)
                        .await
                        .map_err(|e| e.to_string())?;
                let api: kube::Api<crate::api::PrefectDeployment> =
                    kube::Api::namespaced(k.clone(), &ns);
                let live = api
                    .get_opt(&checked.name())
                    .await
                    .map_err(|e| format!("reading the live object: {e}"))?;
                (auth, live)
            }
            None => (env_auth(), None),
        };
        let client = PrefectClient::new(
            http.clone(),
            &base,
            auth,
            std::sync::Arc::new(CallLog::default()),
        );
        let (uid, state, note, read) = match &live {
            // The controller's own inputs: its uid and what its status recorded.
            Some(obj) => {
                let mut state = status::state_of(obj.status.as_ref());
                let recorded = state.deployment_id.clone();
                let from = state.server.clone();
                let made = state.limit.as_ref().filter(|l| l.created);
                let limit = made
                    .map(|l| format!(", with the global concurrency limit {} it made there unless another resource names it", l.name))
                    .unwrap_or_default();
                let note = match (state.move_to(&base), recorded, from) {
                    (true, Some(id), Some(from)) => Some(std::borrow::Cow::Owned(format!(
                        "status records deployment {id} on {from}: applying makes the deployment on {base} and deletes that one{limit} (unless {base} is the same server and holds that very deployment, which is then kept)"
                    ))),
                    _ => None,
                };
                (
                    obj.metadata.uid.clone().unwrap_or_default(),
                    state,
                    note,
                    None,
                )
            }
            None => guess_state(&client, &valid, pd.metadata.uid.clone(), kube.is_some()).await?,
        };
        let want = desired::deployment(&valid, &uid);
        let mut observed = match read {
            // The guess already read the deployment by name.
            Some(found) => execute::observe_given(&client, &want, &state, found).await,
            None => execute::observe(&client, &want, &state).await,
        }
        .map_err(|e| e.to_string())?;
        // The controller lets one resource manage a deployment; the cluster says which.
        if let (Some(k), Some(found)) = (kube, &observed.by_name) {
            let me = live.as_ref().map_or(&pd.metadata, |o| &o.metadata);
            let me = kube::api::ObjectMeta {
                namespace: Some(ns.clone()),
                ..me.clone()
            };
            observed.holder = holder_in_cluster(k, &me, &found.id, &base).await?;
        }
        Ok((plan::plan(&want, &state, &observed), note))
    }
    .await;
    Outcome {
        label: d.label(),
        server: base,
        result,
    }
}

/// Another resource whose status records deployment `id` on server `base`, as the
/// controller's one-resource rule sees it. Reads every namespace, or only `me`'s when
/// the caller may not list them all.
async fn holder_in_cluster(
    k: &kube::Client,
    me: &kube::api::ObjectMeta,
    id: &str,
    base: &str,
) -> Result<Option<plan::Holder>, String> {
    use crate::api::PrefectDeployment;
    let lp = kube::api::ListParams::default();
    let all = kube::Api::<PrefectDeployment>::all(k.clone())
        .list(&lp)
        .await;
    let list = match all {
        Err(kube::Error::Api(e)) if e.code == 403 => {
            let ns = me.namespace.as_deref().unwrap_or_default();
            kube::Api::<PrefectDeployment>::namespaced(k.clone(), ns)
                .list(&lp)
                .await
        }
        other => other,
    }
    .map_err(|e| format!("listing PrefectDeployments: {e}"))?;
    let same =
        |o: &PrefectDeployment| o.metadata.namespace == me.namespace && o.metadata.name == me.name;
    Ok(list
        .items
        .iter()
        .filter(|o| !same(o) && o.metadata.deletion_timestamp.is_none())
        .find(|o| {
            o.status.as_ref().is_some_and(|s| {
                s.deployment_id.as_deref() == Some(id)
                    && s.server.as_deref().is_none_or(|s| s == base)
            })
        })
        .map(|o| plan::Holder {
            automations: o
                .status
                .as_ref()
                .and_then(|s| s.automation_ids.clone())
                .unwrap_or_default(),
            ..plan::Holder::new(&o.metadata, me)
        }))
}

/// What `diff` takes for the controller's inputs: the uid, the recorded state, a note
/// on how it was guessed, and the deployment read by name if the guess read it.
type Guess = (
    String,
    SyncState,
    Option<std::borrow::Cow<'static, str>>,
    Option<Option<crate::observed::ObservedDeployment>>,
);

/// Without the live object: a resource that does not exist yet (with the cluster
/// read) or an unknown one (without). A deployment of the name that carries an owner
/// label is taken as the resource's, with its automations assumed unchanged.
async fn guess_state(
    client: &PrefectClient,
    valid: &crate::validate::ValidSpec<'_>,
    uid: Option<String>,
    from_cluster: bool,
) -> Result<Guess, String> {
    if from_cluster {
        return Ok((uid.unwrap_or_default(), SyncState::default(), None, None));
    }
    let found = client
        .read_deployment_by_name(&valid.flow_name, &valid.name)
        .await
        .map_err(|e| e.to_string())?;
    let owner = found
        .as_ref()
        .and_then(|f| f.label(desired::OWNER_LABEL).map(str::to_string));
    match (found, owner) {
        (Some(found), Some(owner)) => {
            let uid = uid.unwrap_or(owner);
            let want = desired::deployment(valid, &uid);
            let state = SyncState {
                deployment_id: Some(found.id.clone()),
                flow_id: found.flow_id.clone(),
                triggers_hash: Some(want.triggers_hash(&found.id)),
                ..SyncState::default()
            };
            Ok((uid, state, Some(NO_STATE_NOTE.into()), Some(Some(found))))
        }
        (found, _) => Ok((
            uid.unwrap_or_default(),
            SyncState::default(),
            None,
            Some(found),
        )),
    }
}

/// Credentials as Prefect's own CLI reads them.
fn env_auth() -> Option<Auth> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    get("PREFECT_API_KEY")
        .map(Auth::Bearer)
        .or_else(|| get("PREFECT_API_AUTH_STRING").map(Auth::Basic))
}

/// The Prefect variables `text` names, read from the server one by one (a file names a
/// handful); those that do not exist are absent.
async fn read_variables(text: &str, server_url: &str) -> Result<crate::convert::Variables, String> {
    let names = crate::convert::variable_names(text)?;
    let client = PrefectClient::new(
        crate::prefect::http_client(),
        server_url.trim_end_matches('/'),
        env_auth(),
        std::sync::Arc::new(CallLog::default()),
    );
    let names: Vec<String> = names.into_iter().collect();
    client
        .variables(&names)
        .await
        .map_err(|e| format!("reading Prefect variables: {e}"))
}

/// `export`: 0 every selected deployment exported, 1 some could not be (each said on
/// stderr), 2 an error (the server, or nothing selected).
pub async fn export(args: &ExportArgs) -> ExitCode {
    use crate::export::{manifest, Credentials};
    let selected = !(args.names.is_empty()
        && args.flows.is_empty()
        && args.tags.is_empty()
        && args.work_pools.is_empty());
    if selected == args.all {
        eprintln!("export: select deployments with --name, --flow, --tag or --work-pool, or give --all (not both)");
        return ExitCode::from(2);
    }
    let base = args.server_url.trim_end_matches('/').to_string();
    let client = PrefectClient::new(
        crate::prefect::http_client(),
        &base,
        env_auth(),
        std::sync::Arc::new(CallLog::default()),
    );
    let credentials = match env_auth() {
        None => Credentials::None,
        Some(Auth::Bearer(_)) => Credentials::ApiKey,
        Some(Auth::Basic(_)) => Credentials::AuthString,
    };
    let deployments = match select(&client, args).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("export: {e}");
            return ExitCode::from(2);
        }
    };
    let mut manifests = Vec::new();
    let mut failed = false;
    let mut flow_names: std::collections::HashMap<String, String> = Default::default();
    for d in &deployments {
        let label = d
            .fields
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(&d.id)
            .to_string();
        let flow_id = d.flow_id.clone().unwrap_or_default();
        let flow = match flow_names.get(&flow_id) {
            Some(f) => f.clone(),
            None => match client.flow_name(&flow_id).await {
                Ok(Some(f)) => {
                    flow_names.insert(flow_id.clone(), f.clone());
                    f
                }
                Ok(None) => {
                    eprintln!("export: {label}: its flow {flow_id} does not exist");
                    failed = true;
                    continue;
                }
                Err(e) => {
                    eprintln!("export: {e}");
                    return ExitCode::from(2);
                }
            },
        };
        let automations = match client
            .automations_related_to(&desired::owner_resource(&d.id))
            .await
        {
            Ok(a) => a,
            Err(e) => {
                eprintln!("export: {e}");
                return ExitCode::from(2);
            }
        };
        match manifest(
            d,
            &flow,
            &automations,
            &base,
            args.namespace.as_deref(),
            credentials,
        ) {
            Ok(out) => {
                for n in &out.notes {
                    eprintln!("export: {flow}/{label}: {n}");
                }
                // The same checks as `validate`: what Prefect holds may be more than a
                // manifest can say (the manifest is still printed, to be fixed by hand).
                if let Err(e) = manifests::check(&out.manifest) {
                    eprintln!("export: {flow}/{label}: the manifest would be refused: {e}");
                    failed = true;
                }
                manifests.push(out.manifest);
            }
            Err(why) => {
                eprintln!("export: {flow}/{label}: not exported: {why}");
                failed = true;
            }
        }
    }
    match args.output {
        ExportOutput::Yaml => {
            for m in &manifests {
                print!("---\n{}", serde_yaml::to_string(m).expect("YAML"));
            }
        }
        ExportOutput::Json => {
            let list = json!({"apiVersion": "v1", "kind": "List", "items": manifests});
            println!("{}", serde_json::to_string_pretty(&list).expect("JSON"));
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The deployments the arguments select, each once, in a stable order.
async fn select(
    client: &PrefectClient,
    args: &ExportArgs,
) -> crate::Result<Vec<crate::observed::ObservedDeployment>> {
    let mut out = Vec::new();
    for n in &args.names {
        let Some((flow, name)) = n.split_once('/') else {
            return Err(crate::Error::InvalidSpec(format!(
                "--name {n:?}: expected FLOW/DEPLOYMENT"
            )));
        };
        match client.read_deployment_by_name(flow, name).await? {
            Some(d) => out.push(d),
            None => {
                return Err(crate::Error::InvalidSpec(format!(
                    "--name {n:?}: no such deployment"
                )))
            }
        }
    }
    let filtered = !(args.flows.is_empty() && args.tags.is_empty() && args.work_pools.is_empty());
    if filtered || args.all {
        let mut filter = json!({"sort": "NAME_ASC", "limit": 200});
        if !args.flows.is_empty() {
            filter["flows"] = json!({"name": {"any_": args.flows}});
        }
        if !args.tags.is_empty() {
            filter["deployments"] = json!({"tags": {"any_": args.tags}});
        }
        if !args.work_pools.is_empty() {
            filter["work_pools"] = json!({"name": {"any_": args.work_pools}});
        }
        let mut offset = 0;
        loop {
            filter["offset"] = json!(offset);
            let page = client.filter_deployments(&filter).await?;
            let n = page.len();
            out.extend(page);
            if n < 200 {
                break;
            }
            offset += n;
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|d| seen.insert(d.id.clone()));
    Ok(out)
}

/// `convert`: 0 converted, 1 something left out (unless `--allow-partial`), 2 an error.
pub async fn convert(args: &ConvertArgs) -> ExitCode {
    let file = args.file.display().to_string();
    let read = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(&args.file)
    };
    let text = match read {
        Ok(t) => t,
        Err(e) => {
            eprintln!("convert: {file}: {e}");
            return ExitCode::from(2);
        }
    };
    let variables = if args.resolve_variables {
        match read_variables(&text, &args.server_url).await {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("convert: {file}: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    // Variables whose name or value is not UTF-8 cannot be named in a prefect.yaml.
    let environment = args.resolve_env.then(|| {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    });
    let inputs = crate::convert::Inputs {
        variables,
        environment,
    };
    let converted = match crate::convert::convert(
        &text,
        &args.server_url,
        args.namespace.as_deref(),
        &inputs,
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("convert: {file}: {e}");
            return ExitCode::from(2);
        }
    };
    for l in &converted.left_out {
        eprintln!("convert: {file}: {l}");
    }
    // Every manifest passes the same checks as `validate` before it is printed.
    let mut invalid = false;
    for m in &converted.manifests {
        if let Err(e) = manifests::check(m) {
            eprintln!(
                "convert: {file}: {}: the manifest would be refused: {e}",
                m["metadata"]["name"].as_str().unwrap_or_default()
            );
            invalid = true;
        }
    }
    match args.output {
        ExportOutput::Yaml => {
            for m in &converted.manifests {
                print!("---\n{}", serde_yaml::to_string(m).expect("YAML"));
            }
        }
        ExportOutput::Json => {
            let list = json!({"apiVersion": "v1", "kind": "List", "items": converted.manifests});
            println!("{}", serde_json::to_string_pretty(&list).expect("JSON"));
        }
    }
    eprintln!(
        "convert: {file}: parameterOpenApiSchema is not in prefect.yaml (Prefect derives it from the flow's code); after a first `prefect deploy`, `prefect-operator export` carries it"
    );
    if invalid || (!converted.left_out.is_empty() && !args.allow_partial) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
