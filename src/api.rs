//! The `PrefectDeployment` custom resource (prefect.io/v1).
//!
//! Field names follow the manifests of PrefectHQ's published operator (including its
//! snake_case schedule fields) so those manifests apply unchanged; our extensions use
//! Kubernetes camelCase. No field carries a schema `default`: defaults live in code, so
//! the apiserver never adds fields a GitOps tool would then see as drift.

// Several printcolumn(...) entries share `type_ = "string"`; that is not a mistake.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Finalizer name shared with PrefectHQ's operator, so resources it created are cleaned
/// up by this one as well.
pub const FINALIZER: &str = "prefect.io/deployment-cleanup";

/// Reasons used on the `Ready` condition. They are part of the API: tools (Argo CD
/// health checks, alerts) match on them.
pub mod reason {
    pub const SYNCED: &str = "Synced";

    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SERVER_NOT_ALLOWED: &str = "ServerNotAllowed";
    pub const SECRET_NOT_ALLOWED: &str = "SecretNotAllowed";
    pub const PREFECT_UNREACHABLE: &str = "PrefectUnreachable";
    pub const PREFECT_REJECTED: &str = "PrefectRejected";
    pub const PREFECT_UNAUTHORIZED: &str = "PrefectUnauthorized";
    pub const WORK_POOL_NOT_FOUND: &str = "WorkPoolNotFound";
    pub const CONFLICT: &str = "Conflict";
    pub const AUTOMATION_FAILED: &str = "AutomationFailed";
    pub const CONCURRENCY_LIMIT_MISSING: &str = "ConcurrencyLimitMissing";
    pub const CONCURRENCY_LIMIT_CONFLICT: &str = "ConcurrencyLimitConflict";

    pub const CLEANUP_FAILED: &str = "CleanupFailed";
    pub const KUBERNETES_ERROR: &str = "KubernetesError";
    /// A bug in the operator met while handling this resource; other resources are
    /// not affected, and the pass is retried with backoff.
    pub const INTERNAL_ERROR: &str = "InternalError";
}

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "prefect.io",
    version = "v1",
    kind = "PrefectDeployment",
    plural = "prefectdeployments",
    singular = "prefectdeployment",
    shortname = "pd",
    namespaced,
    status = "PrefectDeploymentStatus",
    doc = "A Prefect deployment declared as a Kubernetes resource: the operator creates and keeps it in step in a Prefect server, with its schedules and trigger automations.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the deployment is applied in Prefect as declared"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why the resource is (not) ready",
        priority = "1"
    ),
    printcolumn(
        name = "Deployment ID",
        type_ = "string",
        json_path = ".status.deploymentId",
        description = "The deployment's id in Prefect"
    ),
    printcolumn(
        name = "Next Run",
        type_ = "string",
        json_path = ".status.nextRun",
        description = "The earliest upcoming scheduled run"
    ),
    printcolumn(
        name = "Work Pool",
        type_ = "string",
        json_path = ".spec.workPool.name",
        description = "The work pool that runs the deployment"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PrefectDeploymentSpec {
    /// Which Prefect API to talk to, and how to authenticate.
    pub server: ServerSpec,
    /// The work pool (and optionally queue) whose workers run this deployment.
    pub work_pool: WorkPoolSpec,
    /// The Prefect deployment itself.
    pub deployment: DeploymentSpec,
    /// How often the operator re-reads the deployment from Prefect to repair changes made
    /// there by hand, as a duration such as `30s`, `5m` or `1h`. Defaults to the operator's
    /// --default-resync-interval; values under 10s are raised to 10s, values over 24h
    /// lowered to 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^(([0-9]+[.]?[0-9]*|[.][0-9]+)(ns|us|µs|ms|s|m|h))+$")
    )]
    pub interval: Option<String>,
    /// What happens in Prefect when this resource is deleted. `Delete` (the default)
    /// removes the deployment and the automations it owns; `Orphan` leaves them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "deletion_policy_schema")]
    pub deletion_policy: Option<DeletionPolicy>,
    /// Take over a deployment of the same name that already exists in Prefect but was not
    /// created for this resource (for example one made by `prefect deploy` or by another
    /// operator). Without it such a deployment is left alone and the resource reports
    /// Ready=False with reason Conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt_existing: Option<bool>,
    /// What a drift check does with differences made in Prefect (in its UI, say):
    /// `Correct` (default) puts the spec back; `Report` leaves them and reports them in
    /// a `Drifted` condition and an Event. A change of the spec is applied either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "drift_policy_schema")]
    pub drift_policy: Option<DriftPolicy>,
    /// Fields people may own in Prefect: set when the deployment is created, then
    /// neither written nor reported, except once after each change of the field in the
    /// spec. One of paused, schedules.active, concurrencyLimit, description, tags,
    /// jobVariables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 6))]
    pub ignore_fields: Option<Vec<IgnoredField>>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DriftPolicy {
    #[default]
    Correct,
    Report,
}

/// A field `ignoreFields` may name.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum IgnoredField {
    #[serde(rename = "paused")]
    Paused,
    #[serde(rename = "schedules.active")]
    SchedulesActive,
    #[serde(rename = "concurrencyLimit")]
    ConcurrencyLimit,
    #[serde(rename = "description")]
    Description,
    #[serde(rename = "tags")]
    Tags,
    #[serde(rename = "jobVariables")]
    JobVariables,
}

impl IgnoredField {
    /// The Prefect deployment field it stands for (None: per schedule).
    pub fn prefect_field(self) -> Option<&'static str> {
        match self {
            IgnoredField::Paused => Some("paused"),
            IgnoredField::SchedulesActive => None,
            IgnoredField::ConcurrencyLimit => Some("concurrency_limit"),
            IgnoredField::Description => Some("description"),
            IgnoredField::Tags => Some("tags"),
            IgnoredField::JobVariables => Some("job_variables"),
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Orphan,
}

/// Where the Prefect API is. Set `remoteApiUrl` for any reachable server; `accountId` and
/// `workspaceId` for Prefect Cloud; or `name` (and `namespace`) for a Prefect server
/// running in this cluster as a Service of that name on port 4200.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Base URL of the Prefect API, including its `/api` suffix, e.g.
    /// `http://prefect-server.prefect.svc:4200/api`. With accountId and workspaceId it
    /// defaults to Prefect Cloud's API.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "remoteApiUrl"
    )]
    #[schemars(length(max = 2048))]
    pub remote_api_url: Option<String>,
    /// Prefect Cloud account id.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "accountId")]
    #[schemars(length(max = 64))]
    pub account_id: Option<String>,
    /// Prefect Cloud workspace id.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "workspaceId"
    )]
    #[schemars(length(max = 64))]
    pub workspace_id: Option<String>,
    /// Name of an in-cluster Prefect server's Service (port 4200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub name: Option<String>,
    /// Namespace of that Service; defaults to this resource's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
    /// API key sent as a Bearer token (Prefect Cloud, or a server behind a proxy that
    /// expects one).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "apiKey")]
    pub api_key: Option<SecretValue>,
    /// `user:password` for HTTP basic auth, for self-hosted servers started with
    /// PREFECT_SERVER_API_AUTH_STRING.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "authString"
    )]
    pub auth_string: Option<SecretValue>,
}

/// A credential given inline (`value`) or read from a Secret or ConfigMap in this
/// resource's own namespace (`valueFrom`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretValue {
    /// The credential itself. Prefer valueFrom: an inline value is visible to anyone who
    /// can read the resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub value: Option<String>,
    /// Where to read the credential from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<ValueFrom>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValueFrom {
    /// A key of a Secret in this resource's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
    /// A key of a ConfigMap in this resource's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct KeyRef {
    /// Name of the Secret or ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub name: Option<String>,
    /// The key whose value is the credential.
    #[schemars(length(max = 253))]
    pub key: String,
    /// Accepted for compatibility; a credential that is referenced is always required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkPoolSpec {
    /// Name of the Prefect work pool. It must exist in Prefect.
    #[schemars(length(max = 256))]
    pub name: String,
    /// Accepted for compatibility with PrefectHQ's operator; not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
    /// Work queue within the pool; Prefect creates it when it does not exist yet.
    /// Defaults to the pool's default queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub work_queue: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(oldSelf.flow_name) || (has(self.flow_name) && self.flow_name == oldSelf.flow_name)",
        "message": "flow_name cannot be changed or removed once set: a Prefect deployment belongs to one flow (create a new resource for another flow)"
    },
    {
        "rule": "!has(self.concurrencyLimit) || !has(self.globalConcurrencyLimit)",
        "message": "set concurrencyLimit (this deployment's own limit) or globalConcurrencyLimit (a named limit shared with others), not both"
    }
]))]
pub struct DeploymentSpec {
    /// Name of the deployment in Prefect. Defaults to metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub name: Option<String>,
    /// Where the flow function is: `path/to/file.py:function` (or `module.path:function`).
    #[schemars(length(min = 3, max = 1024), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[^:]+:[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*$')",
        "message": "entrypoint must have the form path/to/file.py:function"
    }]))]
    pub entrypoint: String,
    /// Name of the flow in Prefect. Defaults to the function name from the entrypoint with
    /// `_` replaced by `-`, as Prefect names flows.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "flow_name")]
    #[schemars(length(min = 1, max = 256))]
    pub flow_name: Option<String>,
    /// Free-text description shown in the Prefect UI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub description: Option<String>,
    /// Tags for filtering deployments in Prefect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(max = 256)))]
    pub tags: Option<Vec<String>>,
    /// Key-value labels set on the deployment when it is created. Prefect's API cannot
    /// change labels afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Version of the code this deployment runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_info: Option<VersionInfo>,
    /// Working directory the flow runs from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub path: Option<String>,
    /// Steps a worker runs to fetch the flow's code (git_clone, pull_from_s3, ...), in
    /// Prefect's prefect.yaml form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "list_of_free_objects")]
    pub pull_steps: Option<Vec<Value>>,
    /// Default parameter values for runs of this deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub parameters: Option<Value>,
    /// JSON Schema of the flow's parameters, as Prefect stores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub parameter_open_api_schema: Option<Value>,
    /// Whether Prefect checks parameters against parameterOpenApiSchema. Prefect's
    /// default is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforce_parameter_schema: Option<bool>,
    /// Overrides of the work pool's base job template (image, env, resources, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub job_variables: Option<Value>,
    /// A paused deployment keeps its schedules but no new runs are scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// Maximum number of concurrent runs of this deployment. Removing the field removes
    /// the limit in Prefect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub concurrency_limit: Option<i64>,
    /// A named global concurrency limit in Prefect, shared by every deployment that
    /// names it (PrefectHQ's operator's form). The operator creates it when missing and
    /// keeps its settings in step; it deletes it only if this resource created it and
    /// no other resource names it. Not together with concurrencyLimit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_concurrency_limit: Option<GlobalConcurrencyLimit>,
    /// What happens to a run over `concurrencyLimit` (Prefect's `concurrency_options`).
    /// Removing it clears it in Prefect; it takes precedence over
    /// globalConcurrencyLimit.collisionStrategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_options: Option<ConcurrencyOptions>,
    /// When the deployment runs. Schedules are matched to Prefect's by slug, so editing
    /// one keeps the runs already scheduled by the others.
    // A map list keyed by slug: the apiserver itself refuses duplicate slugs (on every
    // version, without a CEL rule whose cost grows with the square of the list), and
    // server-side apply merges schedules by slug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["slug"]))]
    pub schedules: Option<Vec<Schedule>>,
    /// Events that start this deployment. Each trigger becomes one Prefect automation
    /// owned by the deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 50))]
    pub triggers: Option<Vec<Trigger>>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
pub struct VersionInfo {
    /// Kind of version, for example `git`.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    #[schemars(length(max = 256))]
    pub type_: Option<String>,
    /// The version string, for example a commit sha or a release tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub version: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConcurrencyOptions {
    /// ENQUEUE (the run waits for a slot) or CANCEL_NEW (the run is cancelled).
    pub collision_strategy: CollisionStrategy,
    /// Seconds a run's infrastructure may take to start before its slot is taken back
    /// (60 to 86400, as Prefect's server accepts); unset, the server's setting applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 86400))]
    pub grace_period_seconds: Option<i64>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum CollisionStrategy {
    #[default]
    #[serde(rename = "ENQUEUE")]
    Enqueue,
    #[serde(rename = "CANCEL_NEW")]
    CancelNew,
}

impl CollisionStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            CollisionStrategy::Enqueue => "ENQUEUE",
            CollisionStrategy::CancelNew => "CANCEL_NEW",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.slotDecayPerSecond) || self.slotDecayPerSecond.matches('^[0-9]+([.][0-9]+)?$')",
        "message": "slotDecayPerSecond must be a non-negative decimal number, such as \"0.5\""
    },
    {
        "rule": "!self.name.matches('[/%&<>]')",
        "message": "name cannot contain /, %, &, < or > (Prefect refuses them in names)"
    }
]))]
pub struct GlobalConcurrencyLimit {
    /// Name of the global concurrency limit in Prefect. The operator creates it when it
    /// is missing and attaches the deployment to it; deployments naming the same limit
    /// share its slots.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Number of concurrent runs allowed. Needed to create the limit; unset, the
    /// deployment attaches to an existing limit of that name and leaves its settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub limit: Option<i64>,
    /// Whether the limit is enforced (Prefect's default: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// ENQUEUE (wait for a slot) or CANCEL_NEW (cancel the new run); used when
    /// concurrencyOptions is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub collision_strategy: Option<String>,
    /// Slots released per second when the limit is used as a rate limit, as a decimal
    /// string (a string in PrefectHQ's operator's schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub slot_decay_per_second: Option<String>,
}

/// One schedule: exactly one of `interval`, `cron` or `rrule`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.interval) ? 1 : 0) + (has(self.cron) ? 1 : 0) + (has(self.rrule) ? 1 : 0) == 1",
        "message": "a schedule needs exactly one of interval, cron or rrule"
    },
    // An int-or-string value counts as up to 3 MiB in the cost estimate of apiservers
    // before 1.34 (they ignore its maxLength): string() or matches() on it would put
    // the CRD over the budget, so only operations whose cost does not grow with it.
    {
        "rule": "!has(self.interval) || (type(self.interval) == int ? self.interval > 0 : !self.interval.startsWith('-') && self.interval != '0')",
        "message": "interval must be a positive number of seconds (or an ISO 8601 duration such as PT1H)"
    },
    {
        "rule": "!has(self.anchor_date) || has(self.interval)",
        "message": "anchor_date is only for interval schedules"
    },
    {
        "rule": "!has(self.day_or) || has(self.cron)",
        "message": "day_or is only for cron schedules"
    }
]))]
pub struct Schedule {
    /// Identifies the schedule within the deployment; unique. The operator matches
    /// schedules to Prefect's by slug.
    #[schemars(length(min = 1, max = 256))]
    pub slug: String,
    /// Time between runs: seconds (greater than 0), or an ISO 8601 duration such as
    /// `PT1H30M` or `P1D`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "short_int_or_string")]
    pub interval: Option<Value>,
    /// For interval schedules: the instant runs are counted from (RFC 3339, e.g.
    /// `2024-01-01T00:00:00Z`). Without an offset it is read in the schedule's timezone.
    /// Defaults to the time Prefect first stores the schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub anchor_date: Option<String>,
    /// A five-field cron expression such as `0 9 * * 1-5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub cron: Option<String>,
    /// For cron schedules: when both day-of-month and day-of-week are restricted, run
    /// when either matches (true, the cron default) or only when both match (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day_or: Option<bool>,
    /// An RFC 5545 recurrence rule, e.g. `FREQ=WEEKLY;BYDAY=MO,WE;BYHOUR=8`. At most 6500
    /// characters, as in Prefect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 6500))]
    pub rrule: Option<String>,
    /// IANA time zone the schedule is read in, e.g. `Europe/Berlin`. Defaults to UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub timezone: Option<String>,
    /// An inactive schedule is kept but creates no runs. Defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// How many future runs Prefect keeps scheduled for this schedule (1 to 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 50))]
    pub max_scheduled_runs: Option<i64>,
    /// Parameter values for runs created by this schedule, merged over the deployment's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub parameters: Option<Value>,
    /// The slug this schedule had before: the schedule in Prefect is renamed in place,
    /// keeping its id and its scheduled runs, instead of deleted and created anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub replaces: Option<String>,
}

/// A trigger that starts the deployment. Event triggers fire on matching Prefect events;
/// compound and sequence triggers combine child triggers; metric triggers watch
/// deployment metrics (Prefect Cloud only).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.type) || !(self.type in ['compound', 'sequence']) || (has(self.within) && has(self.triggers) && size(self.triggers) > 0)",
        "message": "compound and sequence triggers need within and at least one child trigger"
    },
    {
        "rule": "!has(self.require) || (has(self.type) && self.type == 'compound')",
        "message": "require is only for compound triggers"
    },
    // Cheap on every apiserver, like the interval rule of Schedule: numeric strings by a
    // list (child triggers are at most 50) instead of a regex.
    {
        "rule": "!has(self.require) || (type(self.require) == int ? (self.require >= 1 && has(self.triggers) && self.require <= size(self.triggers)) : (self.require in ['any', 'all'] || (has(self.triggers) && self.require in ['1', '2', '3', '4', '5', '6', '7', '8', '9', '10', '11', '12', '13', '14', '15', '16', '17', '18', '19', '20', '21', '22', '23', '24', '25', '26', '27', '28', '29', '30', '31', '32', '33', '34', '35', '36', '37', '38', '39', '40', '41', '42', '43', '44', '45', '46', '47', '48', '49', '50'] && int(self.require) <= size(self.triggers))))",
        "message": "require must be any, all, or a number from 1 to the number of child triggers"
    },
    {
        "rule": "!has(self.posture) || self.posture != 'Proactive' || (has(self.within) && self.within >= 10)",
        "message": "a Proactive trigger needs within of at least 10 seconds"
    },
    {
        "rule": "has(self.type) && self.type == 'metric' ? has(self.metric) : !has(self.metric)",
        "message": "metric is required for metric triggers and only allowed on them"
    }
]))]
pub struct Trigger {
    /// Name of the automation. Defaults to `<deployment name>__automation_<n>`, n counting
    /// from 1 in list order, as Prefect's own client names them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub name: Option<String>,
    /// Description of the automation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub description: Option<String>,
    /// A disabled trigger's automation exists but does not fire. Defaults to true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Parameters for the runs this trigger starts. Values may use Prefect's templating,
    /// e.g. `{{ event.resource.id }}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub parameters: Option<Value>,
    /// Job variables for the runs this trigger starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_object")]
    pub job_variables: Option<Value>,
    /// Seconds to wait after the trigger fires before the run is scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub schedule_after: Option<i64>,
    #[serde(flatten)]
    pub condition: TriggerCondition,
    /// How many of the child triggers must fire (compound only): a number, `any` or `all`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "short_int_or_string")]
    pub require: Option<Value>,
    /// Child triggers of a compound or sequence trigger (event or metric triggers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 50), extend("x-kubernetes-validations" = [
        {
            "rule": "self.all(c, !has(c.type) || c.type in ['event', 'metric'])",
            "message": "child triggers must be event or metric triggers"
        },
        {
            "rule": "self.all(c, !has(c.posture) || c.posture != 'Proactive' || (has(c.within) && c.within >= 10))",
            "message": "a Proactive trigger needs within of at least 10 seconds"
        },
        {
            "rule": "self.all(c, has(c.type) && c.type == 'metric' ? has(c.metric) : !has(c.metric))",
            "message": "metric is required for metric triggers and only allowed on them"
        }
    ]))]
    pub triggers: Option<Vec<TriggerCondition>>,
}

/// The firing condition of a trigger; also the shape of a compound or sequence trigger's
/// children.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerCondition {
    /// `event` (default), `metric`, `compound` or `sequence`. Children may be `event` or
    /// `metric`.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    #[schemars(schema_with = "trigger_type_schema")]
    pub type_: Option<TriggerType>,
    /// Event triggers: `Reactive` fires when events arrive (default), `Proactive` when
    /// they do not arrive within `within` seconds. Metric triggers: `Metric` (their only
    /// posture, and the default; prefect.yaml files often spell it out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "posture_schema")]
    pub posture: Option<Posture>,
    /// Labels the event's resource must have, e.g. `{"prefect.resource.id": "prefect.flow-run.*"}`.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "match")]
    #[schemars(schema_with = "free_object")]
    pub match_: Option<Value>,
    /// Labels one of the event's related resources must have (an object, or a list of
    /// them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_value")]
    pub match_related: Option<Value>,
    /// Event names that must have been seen before this trigger counts events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(max = 1024)))]
    pub after: Option<Vec<String>>,
    /// Event names this trigger counts (or expects, when Proactive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(max = 1024)))]
    pub expect: Option<Vec<String>>,
    /// Resource labels to count events separately by, e.g. `prefect.resource.id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(max = 1024)))]
    pub for_each: Option<Vec<String>>,
    /// Number of events needed to fire. Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub threshold: Option<i64>,
    /// Window in seconds over which events are counted (event triggers) or all children
    /// must fire (compound and sequence). Proactive triggers need at least 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub within: Option<i64>,
    /// Metric triggers: the metric query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<MetricQuery>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TriggerType {
    Event,
    Metric,
    Compound,
    Sequence,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posture {
    Reactive,
    Proactive,
    Metric,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricQuery {
    /// `lateness`, `duration` or `successes`.
    #[schemars(length(max = 64))]
    pub name: String,
    /// Comparison with the threshold: `<`, `<=`, `>` or `>=`.
    #[schemars(length(max = 8))]
    pub operator: String,
    /// Value the metric is compared with.
    pub threshold: f64,
    /// Seconds of history the metric is computed over (at least 300). Defaults to 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 300))]
    pub range: Option<i64>,
    /// Seconds the comparison must hold before the trigger fires (at least 300).
    /// Defaults to 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 300))]
    pub firing_for: Option<i64>,
}

/// What the operator last saw and did. Only changes when something actually changed, so
/// writing it never re-triggers work.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrefectDeploymentStatus {
    /// Id of the deployment in Prefect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    /// Id of the deployment's flow in Prefect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_id: Option<String>,
    /// The metadata.generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current state; `Ready` says whether Prefect matches the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Ids of the automations the operator created for the triggers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub automation_ids: Option<Vec<String>>,
    /// Fingerprint of the automations last applied; triggers are only re-applied when it
    /// changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triggers_hash: Option<String>,
    /// The next runs of each schedule, as Prefect's scheduler creates them. Empty for an
    /// inactive schedule or a paused deployment. Refreshed once the first one has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedules: Option<Vec<ScheduleStatus>>,
    /// The earliest upcoming run of any schedule (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<String>,
    /// The last `reconcile.fluxcd.io/requestedAt` annotation value a pass handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// The flow run made for the last `prefect.io/run-requested-at` token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<LastRun>,
    /// For each field in spec.ignoreFields, a fingerprint of the spec's value last
    /// applied: a new value is applied once, then the field is left to people again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_ignored_fields: Option<std::collections::BTreeMap<String, String>>,
    /// The named global concurrency limit the deployment is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_concurrency_limit: Option<LimitRecord>,
    /// The Prefect API the ids above belong to. When spec.server names another one, the
    /// deployment is made there and the one recorded here is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub server: Option<String>,
    /// Deployments this resource replaced (a new name or flow, another server) that
    /// are not deleted yet; each pass tries again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub pending_deletions: Option<Vec<PendingDeletion>>,
}

/// A deployment the resource no longer describes, still to be deleted.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingDeletion {
    /// Its id in Prefect.
    #[schemars(length(max = 64))]
    pub deployment_id: String,
    /// The Prefect API it is on.
    #[schemars(length(max = 2048))]
    pub server: String,
    /// The named global concurrency limit this resource created on that server, deleted
    /// after the deployment unless another resource there names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<LimitRecord>,
}

/// The named global concurrency limit a deployment is attached to.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitRecord {
    #[schemars(length(max = 256))]
    pub name: String,
    /// Its id in Prefect.
    #[schemars(length(max = 64))]
    pub id: String,
    /// This resource created it, so it may delete it (when no other resource names it).
    #[serde(default)]
    pub created: bool,
}

/// A flow run requested through the `prefect.io/run-requested-at` annotation.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastRun {
    /// The annotation's value; a token creates at most one run.
    #[schemars(length(max = 256))]
    pub token: String,
    /// The flow run's id in Prefect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_run_id: Option<String>,
    /// When the operator created it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Why no run was made for this token (bad `prefect.io/run-parameters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Annotation asking for a pass now (Flux's convention; any new value works).
pub const RECONCILE_REQUESTED_AT: &str = "reconcile.fluxcd.io/requestedAt";
/// Annotation asking for one flow run; each new value (token) makes exactly one.
pub const RUN_REQUESTED_AT: &str = "prefect.io/run-requested-at";
/// Annotation with parameter overrides (a JSON object) for the requested run.
pub const RUN_PARAMETERS: &str = "prefect.io/run-parameters";

/// Upcoming runs of one schedule.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleStatus {
    /// The schedule's slug.
    pub slug: String,
    /// The next (up to) three fire times, RFC 3339 with the schedule zone's offset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub next_runs: Vec<String>,
    /// Why no runs are shown for a schedule that has some: its rule takes more steps to
    /// reach them than the preview allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A condition in the Kubernetes API convention.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One-word CamelCase reason.
    pub reason: String,
    /// Short human-readable explanation.
    pub message: String,
    /// When the status last changed.
    #[schemars(schema_with = "date_time")]
    pub last_transition_time: String,
    /// The metadata.generation this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// Enums of optional fields are written out by hand: the derived schema lists `null` as
// an allowed value, which kubectl's client-side validation rejects.
fn drift_policy_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["Correct", "Report"]})
}

fn deletion_policy_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["Delete", "Orphan"]})
}

fn trigger_type_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["event", "metric", "compound", "sequence"]})
}

fn posture_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "enum": ["Reactive", "Proactive", "Metric"]})
}

fn free_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn free_value(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"x-kubernetes-preserve-unknown-fields": true})
}

fn list_of_free_objects(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}})
}

/// A number or a short string. The bound keeps the cost of the CEL rules that read the
/// value within what the apiserver accepts.
fn short_int_or_string(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"x-kubernetes-int-or-string": true, "maxLength": 64})
}

fn date_time(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "format": "date-time"})
}

impl DeploymentSpec {
    /// The flow's name: `flow_name`, else Prefect's default, the entrypoint's function
    /// name with `_` replaced by `-`.
    pub fn flow_name(&self) -> String {
        if let Some(name) = &self.flow_name {
            return name.clone();
        }
        let func = self.entrypoint.rsplit(':').next().unwrap_or_default();
        let func = func.rsplit('.').next().unwrap_or(func);
        func.replace('_', "-")
    }
}

impl PrefectDeployment {
    /// The Prefect deployment name: spec.deployment.name, else metadata.name.
    pub fn deployment_name(&self) -> String {
        self.spec
            .deployment
            .name
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }

    pub fn deletion_policy(&self) -> DeletionPolicy {
        self.spec.deletion_policy.unwrap_or_default()
    }
}

/// The CRD as YAML: the content of `crds/prefectdeployments.prefect.io.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let mut crd = serde_json::to_value(PrefectDeployment::crd()).expect("CRD serializes");
    drop_nullable(&mut crd);
    format!(
        "# Generated by `prefect-operator crd`; do not edit by hand.\n---\n{}",
        serde_yaml::to_string(&crd).expect("CRD serializes")
    )
}

/// Removes `nullable: true`, which the derived schema puts on every optional field. The
/// apiserver drops null values of non-nullable fields anyway, and in the OpenAPI v2 it
/// publishes, a nullable field loses its type, so `kubectl explain` cannot show what is
/// inside it.
fn drop_nullable(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("nullable");
            map.values_mut().for_each(drop_nullable);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nullable),
        _ => {}
    }
}
