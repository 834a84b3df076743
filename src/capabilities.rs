//! Pure: what a Prefect server of a given version can hold. Prefect's request models
//! refuse unknown fields (422), so a field an older server does not know must not be
//! sent at all. Read once per server from `GET /admin/version`.
//!
//! Measured on the request models of the latest patch of 3.1, 3.2, 3.3, 3.4 and of 3.9.1:
//! schedule slugs and schedule parameters, and `parameter_openapi_schema` / `pull_steps`
//! in a PATCH, arrived in 3.2; `version_info` and `global_concurrency_limit_id` in 3.3.
//! `concurrency_options.grace_period_seconds` and the deployment events
//! (`prefect.deployment.updated` / `.deleted`) arrived in 3.7 (read in the 3.5 to 3.8
//! release files). A feature is assumed from the first patch of the minor where it was measured,
//! but for a trigger's `schedule_after`, which arrived in the patch 3.4.15 (read in the
//! 3.4.14 and 3.4.15 release files).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The version the server reported, when it reported one.
    pub version: Option<(u32, u32, u32)>,
    /// Schedules have `slug` and `parameters` (so they can be matched by slug).
    pub schedule_slugs: bool,
    /// `DeploymentUpdate` takes `parameter_openapi_schema` and `pull_steps`.
    pub update_schema_and_pull_steps: bool,
    /// Deployments take `version_info`.
    pub version_info: bool,
    /// Deployments take `global_concurrency_limit_id` (attach to a named limit).
    pub limit_id: bool,
    /// `concurrency_options` keeps `grace_period_seconds`.
    pub grace_period: bool,
    /// The event stream carries `prefect.deployment.updated` / `.deleted`.
    pub deployment_events: bool,
    /// A `run-deployment` action keeps `schedule_after`. An older server takes the field
    /// and drops it: its automations run the deployment at once.
    pub schedule_after: bool,
}

impl Capabilities {
    /// Everything this operator uses: Prefect Cloud, 3.9 and later, and a server whose
    /// version cannot be read.
    pub const LATEST: Capabilities = Capabilities {
        version: None,
        schedule_slugs: true,
        update_schema_and_pull_steps: true,
        version_info: true,
        limit_id: true,
        grace_period: true,
        deployment_events: true,
        schedule_after: true,
    };

    /// The capabilities of a server reporting `version` (`3.4.25`, `3.1.15.dev3`, ...).
    pub fn of(version: &str) -> Capabilities {
        let Some(v) = parse(version) else {
            return Capabilities::LATEST;
        };
        let minor = (v.0, v.1);
        Capabilities {
            version: Some(v),
            schedule_slugs: minor >= (3, 2),
            update_schema_and_pull_steps: minor >= (3, 2),
            version_info: minor >= (3, 3),
            limit_id: minor >= (3, 3),
            grace_period: minor >= (3, 7),
            deployment_events: minor >= (3, 7),
            schedule_after: v >= (3, 4, 15),
        }
    }

    /// The oldest version the operator supports.
    pub const OLDEST: (u32, u32, u32) = (3, 1, 0);

    /// Whether the server is older than the supported range.
    pub fn too_old(&self) -> bool {
        self.version.is_some_and(|v| v < Self::OLDEST)
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Some((a, b, c)) => write!(f, "Prefect {a}.{b}.{c}"),
            None => write!(f, "this Prefect server"),
        }
    }
}

/// `major.minor.patch` from a version string; anything after the patch number (a
/// pre-release or local part) is ignored.
fn parse(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.trim().trim_matches('"').split('.');
    let num = |p: Option<&str>| -> Option<u32> {
        let digits: String = p?.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let major = num(parts.next())?;
    let minor = num(parts.next())?;
    let patch = num(parts.next()).unwrap_or(0);
    Some((major, minor, patch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse("3.4.25"), Some((3, 4, 25)));
        assert_eq!(parse("\"3.1.15.dev3\""), Some((3, 1, 15)));
        assert_eq!(parse("3.2rc1"), Some((3, 2, 0)));
        assert_eq!(parse("unknown"), None);
        assert!(!Capabilities::of("3.1.15").schedule_slugs);
        assert!(Capabilities::of("3.2.15").schedule_slugs);
        assert!(!Capabilities::of("3.2.15").limit_id);
        assert!(Capabilities::of("3.3.7").limit_id);
        assert!(Capabilities::of("3.4.0").schedule_slugs);
        assert!(Capabilities::of("3.9.1").version_info);
        assert!(!Capabilities::of("3.4.25").grace_period);
        assert!(Capabilities::of("3.7.0").grace_period);
        assert!(!Capabilities::of("3.6.29").deployment_events);
        assert!(Capabilities::of("3.7.0").deployment_events);
        assert!(!Capabilities::of("3.4.14").schedule_after);
        assert!(Capabilities::of("3.4.15").schedule_after);
        assert!(Capabilities::of("3.5.0").schedule_after);
        assert_eq!(Capabilities::of("garbage"), Capabilities::LATEST);
        assert!(Capabilities::of("2.20.1").too_old());
        assert!(!Capabilities::of("3.1.0").too_old());
    }
}
