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
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PREFECT_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// How many resources are reconciled in parallel.
    #[arg(long, env = "PREFECT_OPERATOR_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
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
        assert_eq!(args.concurrency, 8);
        assert_eq!(args.default_resync_interval, Duration::from_secs(300));
        assert_eq!(args.log_format, LogFormat::Text);
        assert!(Cli::try_parse_from(["prefect-operator", "run", "--concurrency", "0"]).is_err());
    }
}
