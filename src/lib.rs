//! prefect-operator: reconciles `PrefectDeployment` resources into a Prefect server.
//!
//! Data goes through these steps, one module each; all but the last two are pure:
//! `api` (the resource) -> `validate` (a `ValidSpec`, every piece parsed once)
//! -> `desired` (the Prefect payloads) -> `plan` (desired + recorded state + `observed`
//! Prefect answers -> the calls to make) -> `reconcile::execute` (reads for the plan,
//! then performs it through the `prefect` client) -> `reconcile::status`.
//! `schedule` is the time language validation and `preview` (the next runs shown in
//! status) share. `runtime` wires the process: admin endpoints, leader election, one
//! controller per namespace.

pub mod access;
pub mod admin;
pub mod api;
pub mod cache;
pub mod capabilities;
pub mod cli;
pub mod commands;
pub mod compact;
pub mod convert;
pub mod desired;
pub mod export;
pub mod leader;
pub mod limit;
pub mod lookup;
pub mod manifests;
pub mod metrics;
pub mod observed;
pub mod plan;
pub mod prefect;
pub mod prefect_events;
pub mod preview;
pub mod reconcile;
pub mod runtime;
pub mod schedule;
pub mod snapshot;
pub mod telemetry;
pub mod validate;

use api::reason;

/// Every failure the operator can meet. Messages are short (they become a condition
/// message and an Event) and never contain credentials or whole Prefect error bodies;
/// the underlying error, where there is one, stays reachable as `source()` for logs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{0}")]
    SecretNotFound(String),
    /// The spec names a server outside `--allowed-server`; no request is made.
    #[error("{0}")]
    ServerNotAllowed(String),
    /// The credentials Secret lacks the `--secret-label` label; it is not read.
    #[error("{0}")]
    SecretNotAllowed(String),
    #[error("Prefect API unreachable: {0}")]
    PrefectUnreachable(String, #[source] Option<reqwest::Error>),
    #[error("{0}")]
    WorkPoolNotFound(String),
    #[error("{0}")]
    PrefectRejected(String),
    /// The server refused the credentials (401 or 403).
    #[error("{0}")]
    PrefectUnauthorized(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    AutomationFailed(String),
    /// The named global concurrency limit does not exist and the spec cannot make it.
    #[error("{0}")]
    ConcurrencyLimitMissing(String),
    /// Resources naming the same global concurrency limit declare different settings.
    #[error("{0}")]
    ConcurrencyLimitConflict(String),
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    /// A bug: a panic caught at the reconcile boundary. Only this resource is affected.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How an error is reported and whether retrying can help.
pub struct Kind {
    /// The `Ready` condition reason and Event reason.
    pub reason: &'static str,
    /// A bounded, snake_case label for metrics and logs.
    pub category: &'static str,
    /// Retrying without a new generation of the spec cannot help.
    pub needs_spec_change: bool,
    /// Only a person can move it on (a spec change, or a change in Prefect): reported
    /// as kstatus `Stalled`. Otherwise it is `Reconciling` while retries go on.
    pub stalls: bool,
}

impl Error {
    /// The one definition of each error's reason, category and retry behaviour.
    ///
    /// Only an invalid spec, or a server the operator may not call, waits for a spec
    /// change (a new `--allowed-server` list restarts the operator, which then looks at
    /// every resource again). Everything else is retried with backoff, because it can
    /// clear up without anyone touching the resource: a Secret is created or labelled,
    /// the server comes back, a work pool is made, and a `Conflict` ends when the other
    /// deployment of that name is deleted.
    pub fn kind(&self) -> Kind {
        // (reason, category, waits for a spec change, stalls)
        let (reason, category, needs_spec_change, stalls) = match self {
            Error::InvalidSpec(_) => (reason::INVALID_SPEC, "invalid_spec", true, true),
            Error::SecretNotFound(_) => {
                (reason::SECRET_NOT_FOUND, "secret_not_found", false, false)
            }
            Error::ServerNotAllowed(_) => {
                (reason::SERVER_NOT_ALLOWED, "server_not_allowed", true, true)
            }
            // Labelling the Secret fixes it without a spec change: retried.
            Error::SecretNotAllowed(_) => (
                reason::SECRET_NOT_ALLOWED,
                "secret_not_allowed",
                false,
                true,
            ),
            Error::PrefectUnreachable(..) => (
                reason::PREFECT_UNREACHABLE,
                "prefect_unreachable",
                false,
                false,
            ),
            Error::WorkPoolNotFound(_) => (
                reason::WORK_POOL_NOT_FOUND,
                "work_pool_not_found",
                false,
                false,
            ),
            // A 4xx answer or one Prefect's API never gives: retrying the same request
            // cannot fix it.
            Error::PrefectRejected(_) => {
                (reason::PREFECT_REJECTED, "prefect_rejected", false, true)
            }
            // The Secret, not the spec, needs fixing (or the key its access): retried,
            // and the next pass reads the credentials anew.
            Error::PrefectUnauthorized(_) => (
                reason::PREFECT_UNAUTHORIZED,
                "prefect_unauthorized",
                false,
                true,
            ),
            Error::Conflict(_) => (reason::CONFLICT, "conflict", false, true),
            Error::AutomationFailed(_) => {
                (reason::AUTOMATION_FAILED, "automation_failed", false, true)
            }
            // Someone may create the limit in Prefect: retried.
            Error::ConcurrencyLimitMissing(_) => (
                reason::CONCURRENCY_LIMIT_MISSING,
                "concurrency_limit_missing",
                false,
                true,
            ),
            // Ends when one of the resources changes its spec (maybe the other one).
            Error::ConcurrencyLimitConflict(_) => (
                reason::CONCURRENCY_LIMIT_CONFLICT,
                "concurrency_limit_conflict",
                false,
                true,
            ),
            Error::Kube(_) => (reason::KUBERNETES_ERROR, "kubernetes", false, false),
            Error::Internal(_) => (reason::INTERNAL_ERROR, "internal", false, false),
        };
        Kind {
            reason,
            category,
            needs_spec_change,
            stalls,
        }
    }

    /// The `Ready` condition reason for this error.
    pub fn reason(&self) -> &'static str {
        self.kind().reason
    }

    /// A bounded, snake_case category for metrics and logs.
    pub fn category(&self) -> &'static str {
        self.kind().category
    }

    /// Whether retrying without a spec change can help (see `kind`).
    pub fn needs_spec_change(&self) -> bool {
        self.kind().needs_spec_change
    }

    /// The message followed by every underlying cause, for logs.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            let text = s.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            src = s.source();
        }
        out
    }
}
