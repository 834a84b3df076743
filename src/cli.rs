//! Command line: every flag of `run` can also be set by an environment variable.

use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "prefect-operator",
    version,
    about = "Keeps Prefect deployments in step with PrefectDeployment resources"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller (kube config: in-cluster, else KUBECONFIG or ~/.kube/config).
    Run(RunArgs),
    /// Print the PrefectDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Check manifests offline, as the apiserver and the controller would.
    #[command(
        after_help = "Example:\n  prefect-operator validate -f deploy/ -f extra.yaml\n\nExit status: 0 all valid, 1 any invalid, 2 a file could not be read."
    )]
    Validate(ValidateArgs),
    /// Show what applying manifests would change in Prefect (reads only).
    #[command(
        after_help = "Example:\n  PREFECT_API_KEY=... prefect-operator diff -f deploy/ --server-url http://localhost:4200/api\n  prefect-operator diff -f deploy/ --from-cluster\n\nExit status: 0 no differences, 1 differences, 2 an error."
    )]
    Diff(DiffArgs),
    /// Write PrefectDeployment manifests for deployments that exist in Prefect.
    #[command(
        after_help = "Example:\n  PREFECT_API_URL=http://localhost:4200/api prefect-operator export --flow etl --namespace data > etl.yaml\n  prefect-operator export --all -o json\n\nExit status: 0 all exported, 1 some could not be (said on stderr), 2 an error."
    )]
    Export(ExportArgs),
    /// Turn the deployments of a prefect.yaml into PrefectDeployment manifests.
    #[command(
        after_help = "Example:\n  prefect-operator convert prefect.yaml --server-url http://prefect.infra.svc:4200/api --namespace data > deploy.yaml\n\nExit status: 0 converted, 1 something was left out (said on stderr; --allow-partial makes it 0), 2 an error."
    )]
    Convert(ConvertArgs),
}

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The prefect.yaml file (`-` for stdin).
    pub file: std::path::PathBuf,
    /// Prefect API URL the manifests point at (default: PREFECT_API_URL).
    #[arg(long, env = "PREFECT_API_URL")]
    pub server_url: String,
    /// metadata.namespace of the manifests.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Exit 0 even when something had to be left out.
    #[arg(long)]
    pub allow_partial: bool,
    /// Fill in `{{ prefect.variables.NAME }}` with the variables' values on the server
    /// (--server-url; PREFECT_API_KEY or PREFECT_API_AUTH_STRING), as `prefect deploy`
    /// does. Without it such fields are left out and reported.
    #[arg(long)]
    pub resolve_variables: bool,
    /// Fill in `{{ $NAME }}` (and `{{ NAME }}` where NAME is set) from this command's
    /// environment, as `prefect deploy` does from the environment it runs in. Without it
    /// such fields are left out and reported.
    #[arg(long)]
    pub resolve_env: bool,
    /// yaml: multi-document YAML; json: one List.
    #[arg(short = 'o', long, value_enum, default_value = "yaml")]
    pub output: ExportOutput,
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Prefect API URL (default: PREFECT_API_URL, as Prefect's CLI reads it).
    #[arg(long, env = "PREFECT_API_URL")]
    pub server_url: String,
    /// Deployments by FLOW/DEPLOYMENT name (repeatable).
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// Every deployment of these flows (repeatable).
    #[arg(long = "flow")]
    pub flows: Vec<String>,
    /// Deployments carrying any of these tags (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Deployments in these work pools (repeatable).
    #[arg(long = "work-pool")]
    pub work_pools: Vec<String>,
    /// Every deployment on the server.
    #[arg(long)]
    pub all: bool,
    /// metadata.namespace of the manifests.
    #[arg(long)]
    pub namespace: Option<String>,
    /// yaml: multi-document YAML; json: one List.
    #[arg(short = 'o', long, value_enum, default_value = "yaml")]
    pub output: ExportOutput,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportOutput {
    Yaml,
    Json,
}

/// Output format of the tool commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Manifest files or directories (searched for .yaml, .yml, .json); `-` for stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<std::path::PathBuf>,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// Manifest files or directories (searched for .yaml, .yml, .json); `-` for stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<std::path::PathBuf>,
    /// Prefect API URL to compare against, instead of each manifest's spec.server.
    #[arg(long)]
    pub server_url: Option<String>,
    /// Read each manifest's credentials from the Secrets it names and its live object
    /// (uid, status) through the current kubeconfig, for the controller's exact plan.
    /// Without it, credentials come from PREFECT_API_KEY or PREFECT_API_AUTH_STRING.
    #[arg(long)]
    pub from_cluster: bool,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Watch only these namespaces, comma-separated (default: all namespaces).
    #[arg(long, env = "PREFECT_OPERATOR_NAMESPACE", value_delimiter = ',')]
    pub namespace: Vec<String>,
    /// How many resources are reconciled in parallel. A pass spends about half its time
    /// on Kubernetes (finalizer, status, events) and waiting for its guard read, so this
    /// is several times the number of requests a Prefect server is sent at once.
    #[arg(long, env = "PREFECT_OPERATOR_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// At most this many requests in flight to one Prefect server (fewer while it
    /// answers 429/503 or slows down), however many passes run.
    #[arg(long, env = "PREFECT_OPERATOR_MAX_REQUESTS_PER_SERVER", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_requests_per_server: u16,
    /// At most this many Kubernetes writes (finalizers, status, Events) in flight at
    /// once; 0 for no limit. A cold start of thousands of resources otherwise sends the
    /// apiserver one write per pass at once, in bursts.
    #[arg(long, env = "PREFECT_OPERATOR_MAX_KUBE_WRITES", default_value_t = 0)]
    pub max_kube_writes: u16,
    /// How often each resource is compared with Prefect to repair drift, unless its
    /// spec.interval says otherwise (e.g. 30s, 5m, 1h).
    #[arg(long, env = "PREFECT_OPERATOR_DEFAULT_RESYNC_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub default_resync_interval: Duration,
    /// Log format.
    #[arg(
        long,
        env = "PREFECT_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Address of the /livez, /readyz and /metrics server.
    #[arg(
        long,
        env = "PREFECT_OPERATOR_ADMIN_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub admin_addr: std::net::SocketAddr,
    /// Reconcile only while holding a Lease, so several replicas can run safely.
    #[arg(
        long,
        env = "PREFECT_OPERATOR_LEADER_ELECTION",
        default_value_t = false
    )]
    pub leader_election: bool,
    /// Namespace of the Lease (default: POD_NAMESPACE, else `default`).
    #[arg(long, env = "PREFECT_OPERATOR_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(
        long,
        env = "PREFECT_OPERATOR_LEADER_ELECTION_LEASE",
        default_value = "prefect-operator"
    )]
    pub leader_election_lease: String,
    /// Prefect servers the operator may call, repeatable or comma-separated: a URL
    /// prefix (https://prefect.example.com/api) or a host (prefect.infra.svc,
    /// *.example.com). Default: every server, with a warning at start-up.
    #[arg(
        long = "allowed-server",
        env = "PREFECT_OPERATOR_ALLOWED_SERVERS",
        value_delimiter = ','
    )]
    pub allowed_servers: Vec<crate::access::ServerPattern>,
    /// Handle only PrefectDeployments labelled sharding.fluxcd.io/key=KEY (Flux's
    /// convention); without it, only those without that label. The Lease name gets the
    /// key as a suffix, so each shard elects its own leader.
    #[arg(long, env = "PREFECT_OPERATOR_SHARD")]
    pub shard: Option<String>,
    /// Read credentials only from Secrets (and ConfigMaps) carrying this label, e.g.
    /// prefect.io/credentials=true. Default: any Secret in the resource's namespace.
    #[arg(long, env = "PREFECT_OPERATOR_SECRET_LABEL", value_parser = crate::access::parse_label)]
    pub secret_label: Option<(String, String)>,
}

impl RunArgs {
    /// This replica's identity in the Lease: the pod name where known.
    pub fn identity() -> String {
        let host = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "prefect-operator".into());
        format!("{host}-{}", std::process::id())
    }

    pub fn lease_namespace(&self) -> String {
        self.leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into())
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = crate::validate::parse_go_duration(s)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let cli = Cli::try_parse_from(["prefect-operator", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run expected")
        };
        assert_eq!(args.concurrency, 32);
        assert_eq!(args.max_requests_per_server, 8);
        assert_eq!(args.default_resync_interval, Duration::from_secs(300));
        assert_eq!(args.log_format, LogFormat::Text);
        assert!(Cli::try_parse_from(["prefect-operator", "run", "--concurrency", "0"]).is_err());
    }
}
