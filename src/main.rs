use std::process::ExitCode;

use clap::Parser;
use prefect_operator::cli::{Cli, Command, RunArgs};
use prefect_operator::leader::LeaseConfig;
use prefect_operator::runtime::{self, RunOptions};

/// Threads for CPU-bound work (next-run previews, parameter checks): enough to keep it off
/// the async workers, few enough that the heap is not spread over one allocator arena
/// per thread.
const MAX_BLOCKING_THREADS: usize = 8;

fn main() -> ExitCode {
    few_allocator_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .expect("the async runtime starts")
        .block_on(run())
}

/// glibc gives threads that allocate at the same time arenas of their own (up to eight
/// per core) and seldom hands their free memory back, so the heap of a busy operator
/// grows with its thread count rather than with its resources. The static musl build
/// (the container image) has no such arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn few_allocator_arenas() {
    // SAFETY: only sets an allocator parameter, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn few_allocator_arenas() {}

/// glibc hands freed memory back to the system only from the top of its heap. A
/// long-running operator frees in the middle all the time (every watch event replaces a
/// cached object, every pass drops its payloads), so without this its resident size
/// follows the busiest moment it ever had rather than what it holds now. The static
/// musl build (the container image) returns free pages by itself.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_free_memory_periodically() {
    let spawned = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_secs(10));
            // SAFETY: malloc_trim only returns free pages to the system.
            unsafe {
                libc::malloc_trim(0);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the thread that returns free memory");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_free_memory_periodically() {}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print!("{}", prefect_operator::api::crd_yaml()),
        Command::Validate(args) => return prefect_operator::commands::validate(&args),
        Command::Convert(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            return prefect_operator::commands::convert(&args).await;
        }
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
            return_free_memory_periodically();
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
                max_kube_writes: (args.max_kube_writes > 0).then_some(args.max_kube_writes),
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
