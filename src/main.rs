use std::process::ExitCode;

use clap::Parser;
use prefect_operator::cli::{Cli, Command, RunArgs};
use prefect_operator::leader::LeaseConfig;
use prefect_operator::runtime::{self, RunOptions};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", prefect_operator::api::crd_yaml()),
        Command::Validate(args) => return prefect_operator::commands::validate(&args),
        Command::Convert(args) => return prefect_operator::commands::convert(&args),
        Command::Export(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            return prefect_operator::commands::export(&args).await;
        }
        Command::Diff(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            return prefect_operator::commands::diff(&args).await;
        }
        Command::Run(args) => {
            // kube and reqwest both use rustls: pick one crypto provider for the process.
            let _ = rustls::crypto::ring::default_provider().install_default();
            prefect_operator::telemetry::init(args.log_format);
            let kube = match kube::Client::try_default().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("prefect-operator: no Kubernetes configuration: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let leader_election = args.leader_election.then(|| {
                // One leader per shard.
                let lease = match &args.shard {
                    Some(key) => format!("{}-{key}", args.leader_election_lease),
                    None => args.leader_election_lease.clone(),
                };
                LeaseConfig::new(&args.lease_namespace(), &lease, &RunArgs::identity())
            });
            let opts = RunOptions {
                namespaces: args.namespace,
                concurrency: args.concurrency,
                max_requests_per_server: args.max_requests_per_server,
                default_resync: args.default_resync_interval,
                admin_addr: Some(args.admin_addr),
                leader_election,
                access: prefect_operator::access::Access {
                    allowed_servers: args.allowed_servers,
                    secret_label: args.secret_label,
                },
                shard: args.shard.clone(),
            };
            tracing::info!(
                namespaces = ?opts.namespaces,
                concurrency = opts.concurrency,
                max_requests_per_server = opts.max_requests_per_server,
                leader_election = opts.leader_election.is_some(),
                "starting"
            );
            if let Err(msg) = runtime::run(kube, opts).await {
                eprintln!("prefect-operator: {msg}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
