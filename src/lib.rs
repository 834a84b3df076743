//! prefect-operator: reconciles `PrefectDeployment` resources into a Prefect server.
//!
//! The data goes through these steps, one module each:
//! `api` (the resource) -> `validate` (pure) -> `desired` (pure: the Prefect payloads)
//! -> `prefect` (HTTP client) -> `reconcile` (apply, status, finalizer); `preview` (pure)
//! computes the next runs that status shows; `schedule` (pure) is the time language
//! both validation and preview use.

pub mod admin;
pub mod api;
pub mod cli;
pub mod desired;
pub mod leader;
pub mod metrics;
pub mod observed;
pub mod plan;
pub mod prefect;
pub mod preview;
pub mod reconcile;
pub mod schedule;
pub mod telemetry;
pub mod validate;

use api::reason;

/// Every failure the operator can meet, each with a stable category used for the
/// condition reason, for events and (later) for metric labels. Messages are short and
/// never contain credentials or whole Prefect error bodies.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{0}")]
    SecretNotFound(String),
    #[error("Prefect API unreachable: {0}")]
    PrefectUnreachable(String),
    #[error("{0}")]
    WorkPoolNotFound(String),
    #[error("{0}")]
    PrefectRejected(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    AutomationFailed(String),
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    /// A bug: a panic caught at the reconcile boundary. Only this resource is affected.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The `Ready` condition reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => reason::INVALID_SPEC,
            Error::SecretNotFound(_) => reason::SECRET_NOT_FOUND,
            Error::PrefectUnreachable(_) => reason::PREFECT_UNREACHABLE,
            Error::WorkPoolNotFound(_) => reason::WORK_POOL_NOT_FOUND,
            Error::PrefectRejected(_) => reason::PREFECT_REJECTED,
            Error::Conflict(_) => reason::CONFLICT,
            Error::AutomationFailed(_) => reason::AUTOMATION_FAILED,
            Error::Kube(_) => reason::KUBERNETES_ERROR,
            Error::Internal(_) => reason::INTERNAL_ERROR,
        }
    }

    /// A bounded, snake_case category for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "invalid_spec",
            Error::SecretNotFound(_) => "secret_not_found",
            Error::PrefectUnreachable(_) => "prefect_unreachable",
            Error::WorkPoolNotFound(_) => "work_pool_not_found",
            Error::PrefectRejected(_) => "prefect_rejected",
            Error::Conflict(_) => "conflict",
            Error::AutomationFailed(_) => "automation_failed",
            Error::Kube(_) => "kubernetes",
            Error::Internal(_) => "internal",
        }
    }

    /// Whether retrying without a spec change can help. Invalid specs and name
    /// conflicts need a person; the rest may clear up on their own (a Secret appears, a
    /// server comes back, a work pool is created).
    pub fn needs_spec_change(&self) -> bool {
        matches!(self, Error::InvalidSpec(_))
    }
}
