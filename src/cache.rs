//! The controller's cache of resources, kept small: at 10,000 resources a decoded
//! `PrefectDeployment` costs about 8 KB (every parameter-schema object becomes a JSON
//! map), so the cache holds typed metadata plus the spec and status as compact JSON
//! text, and each pass decodes its own object. What other passes read from the cache
//! (the global concurrency limit a resource names, for conflict checks) is kept decoded.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::NamespaceResourceScope;
use kube::Resource;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::api::{
    GlobalConcurrencyLimit, PrefectDeployment, PrefectDeploymentSpec, PrefectDeploymentStatus,
    ServerSpec,
};
use crate::compact::{Compact, Dictionary};

/// A `PrefectDeployment` as the controller's cache holds it.
#[derive(Clone, Debug)]
pub struct Cached {
    pub metadata: ObjectMeta,
    /// `{"spec":...,"status":...}`, compressed.
    body: Compact,
    /// The named global concurrency limit the spec asks for, with the base URL of the
    /// server it lives on.
    limit: Option<Box<(String, GlobalConcurrencyLimit)>>,
}

/// The dictionary of every cached body.
static BODIES: Dictionary = Dictionary::new();

#[derive(Deserialize)]
struct Body {
    spec: PrefectDeploymentSpec,
    #[serde(default)]
    status: Option<PrefectDeploymentStatus>,
}

/// An object as the watch delivers it: the spec and status are kept as their text.
#[derive(Deserialize)]
struct Wire {
    metadata: ObjectMeta,
    spec: Box<RawValue>,
    #[serde(default)]
    status: Option<Box<RawValue>>,
}

/// The part of a spec other resources' passes read from the cache.
#[derive(Deserialize)]
struct LimitClaim {
    server: ServerSpec,
    deployment: LimitOnly,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LimitOnly {
    #[serde(default)]
    global_concurrency_limit: Option<GlobalConcurrencyLimit>,
}

/// Drops what nothing here reads and what is the bulk of many objects: managedFields
/// and kubectl's last-applied copy of the whole manifest.
fn slim(mut metadata: ObjectMeta) -> ObjectMeta {
    metadata.managed_fields = None;
    if let Some(a) = metadata.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    metadata
}

fn limit_of(
    server: &ServerSpec,
    limit: Option<GlobalConcurrencyLimit>,
    metadata: &ObjectMeta,
) -> Option<Box<(String, GlobalConcurrencyLimit)>> {
    limit.map(|g| {
        let ns = metadata.namespace.as_deref().unwrap_or_default();
        Box::new((crate::reconcile::server::base_url(server, ns), g))
    })
}

/// What a resource's status says it made, for `Cached::recorded`.
#[derive(Deserialize)]
struct RecordedBody {
    spec: ServerOnly,
    #[serde(default)]
    status: Option<PrefectDeploymentStatus>,
}

#[derive(Deserialize)]
struct ServerOnly {
    server: ServerSpec,
}

/// A resource whose status says its spec is applied: where, and what it made there.
pub struct Recorded {
    pub server: ServerSpec,
    pub deployment_id: String,
    pub automation_ids: Vec<String>,
}

impl Cached {
    /// What the status records, when it says this generation is applied (its next pass
    /// is a drift check); decodes the server and the status only.
    pub fn recorded(&self) -> Option<Recorded> {
        let text = self.body.text(&BODIES).ok()?;
        let RecordedBody { spec, status } = serde_json::from_str(&text).ok()?;
        let status = status?;
        let applied = crate::reconcile::status::applied(Some(&status), self.metadata.generation);
        Some(Recorded {
            server: spec.server,
            deployment_id: status.deployment_id.filter(|_| applied)?,
            automation_ids: status.automation_ids.unwrap_or_default(),
        })
    }

    /// The whole resource, decoded for a pass.
    pub fn decode(&self) -> Result<PrefectDeployment, serde_json::Error> {
        let text = self.body.text(&BODIES).map_err(serde::de::Error::custom)?;
        let Body { spec, status } = serde_json::from_str(&text)?;
        Ok(PrefectDeployment {
            metadata: self.metadata.clone(),
            spec,
            status,
        })
    }

    /// The global concurrency limit the spec names, and the base URL of its server.
    pub fn limit(&self) -> Option<(&str, &GlobalConcurrencyLimit)> {
        self.limit.as_deref().map(|(s, g)| (s.as_str(), g))
    }
}

/// Straight from the watch's JSON: the spec and status are copied as text, never built
/// as typed values (each watch event would otherwise build and drop a whole object).
/// Whether they decode is the pass's concern; the apiserver's schema admits only
/// objects that do (`tests/admission.rs`).
impl<'de> Deserialize<'de> for Cached {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(d)?;
        let mut body = String::with_capacity(wire.spec.get().len() + 32);
        body.push_str("{\"spec\":");
        body.push_str(wire.spec.get());
        if let Some(status) = &wire.status {
            body.push_str(",\"status\":");
            body.push_str(status.get());
        }
        body.push('}');
        // A spec whose server or limit does not decode claims no limit here; its own
        // pass reports what is wrong with it.
        let limit = serde_json::from_str::<LimitClaim>(wire.spec.get())
            .ok()
            .and_then(|c| {
                limit_of(
                    &c.server,
                    c.deployment.global_concurrency_limit,
                    &wire.metadata,
                )
            });
        Ok(Cached {
            metadata: slim(wire.metadata),
            body: Compact::new(&body, &BODIES),
            limit,
        })
    }
}

impl Resource for Cached {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        PrefectDeployment::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        PrefectDeployment::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        PrefectDeployment::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        PrefectDeployment::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_same(a: &PrefectDeployment, b: &PrefectDeployment) {
        assert_eq!(a.metadata, b.metadata);
        assert_eq!(a.spec, b.spec);
        assert_eq!(a.status, b.status);
    }

    /// The object as the watch would hand it to the cache.
    fn cache(pd: &PrefectDeployment) -> Cached {
        serde_json::from_str(&serde_json::to_string(pd).expect("encodes")).expect("reads")
    }

    fn fixture(yaml: &str) -> PrefectDeployment {
        serde_yaml::from_str(yaml).expect("fixture")
    }

    /// Every spec the hostile-input fixtures hold (those that decode), and the
    /// planner fixtures' resource, come back unchanged from the cache.
    #[test]
    fn decodes_to_the_object_it_was_made_from() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut n = 0;
        for entry in std::fs::read_dir(root.join("hostile")).expect("fixtures") {
            let text = std::fs::read_to_string(entry.expect("entry").path()).expect("read");
            let case: serde_json::Value = serde_json::from_str(&text).expect("json");
            let Ok(spec) = serde_json::from_value::<PrefectDeploymentSpec>(case["spec"].clone())
            else {
                continue;
            };
            let mut pd = PrefectDeployment::new("a", spec);
            pd.metadata.namespace = Some("team".into());
            let cached = cache(&pd);
            assert_same(&cached.decode().expect("decodes"), &pd);
            n += 1;
        }
        assert!(n > 10, "only {n} fixtures decoded");
        let base = std::fs::read_to_string(root.join("plan/base.yaml")).expect("read");
        let base: serde_yaml::Value = serde_yaml::from_str(&base).expect("yaml");
        let pd: PrefectDeployment =
            serde_yaml::from_value(base["resource"].clone()).expect("typed");
        assert_same(&cache(&pd).decode().expect("decodes"), &pd);
    }

    /// The watch's JSON (managedFields, kubectl's annotation, escapes, pretty-printed or
    /// not) gives the same cached object as the typed path.
    #[test]
    fn reads_the_watch_json_as_the_typed_path_does() {
        let pd = limited_with_status("d\"1\u{e9}");
        let mut wire = serde_json::to_value(&pd).expect("encodes");
        wire["metadata"]["managedFields"] = serde_json::json!([{"manager": "kubectl"}]);
        wire["metadata"]["annotations"] = serde_json::json!({
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
            "team": "a"
        });
        for text in [
            serde_json::to_string(&wire).expect("text"),
            serde_json::to_string_pretty(&wire).expect("text"),
        ] {
            let cached: Cached = serde_json::from_str(&text).expect("reads");
            let back = cached.decode().expect("decodes");
            assert_eq!(back.spec, pd.spec);
            assert_eq!(back.status, pd.status);
            assert!(back.metadata.managed_fields.is_none());
            let a = back.metadata.annotations.expect("annotations");
            assert_eq!(a.len(), 1, "{a:?}");
            let (server, g) = cached.limit().expect("limit");
            assert_eq!(g.name, "shared");
            assert_eq!(server, "http://prefect:4200/api");
        }
        // No status at all, and a null one.
        wire["status"] = serde_json::Value::Null;
        let cached: Cached = serde_json::from_str(&wire.to_string()).expect("reads");
        assert_eq!(cached.decode().expect("decodes").status, None);
        wire.as_object_mut().expect("object").remove("status");
        let cached: Cached = serde_json::from_str(&wire.to_string()).expect("reads");
        assert_eq!(cached.decode().expect("decodes").status, None);
    }

    /// What a start registers for a resource: only a status that says the resource's
    /// current generation is applied (its next pass is a drift check).
    #[test]
    fn recorded_only_where_this_generation_is_applied() {
        let condition = |status: &str| crate::api::Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: "Synced".into(),
            message: String::new(),
            last_transition_time: "2026-01-01T00:00:00Z".into(),
            observed_generation: Some(3),
        };
        let mut pd = limited_with_status("d1");
        pd.metadata.generation = Some(3);
        let status = pd.status.as_mut().expect("status");
        status.automation_ids = Some(vec!["a1".into(), "a2".into()]);
        status.observed_generation = Some(3);
        status.conditions = vec![condition("True")];
        let r = cache(&pd).recorded().expect("applied");
        assert_eq!(r.deployment_id, "d1");
        assert_eq!(r.automation_ids, ["a1", "a2"]);
        assert_eq!(
            r.server.remote_api_url.as_deref(),
            Some("http://prefect:4200/api")
        );

        let mut newer = pd.clone();
        newer.metadata.generation = Some(4);
        assert!(
            cache(&newer).recorded().is_none(),
            "a spec change is applied first"
        );
        let mut failing = pd.clone();
        failing.status.as_mut().expect("status").conditions = vec![condition("False")];
        assert!(cache(&failing).recorded().is_none());
        let mut fresh = pd.clone();
        fresh.status = None;
        assert!(cache(&fresh).recorded().is_none());
    }

    const LIMITED: &str = r#"
apiVersion: prefect.io/v1
kind: PrefectDeployment
metadata: {name: a, namespace: team}
spec:
  server: {remoteApiUrl: "http://prefect:4200/api"}
  workPool: {name: pool}
  deployment:
    entrypoint: flows.py:main
    globalConcurrencyLimit: {name: shared, limit: 3}
"#;

    /// A resource naming a global concurrency limit, with a deployment id in status.
    fn limited_with_status(deployment_id: &str) -> PrefectDeployment {
        let mut pd = fixture(LIMITED);
        pd.status = Some(PrefectDeploymentStatus {
            deployment_id: Some(deployment_id.into()),
            ..Default::default()
        });
        pd
    }

    #[test]
    fn keeps_status_and_the_limit_claim() {
        let pd = limited_with_status("d1");
        let cached = cache(&pd);
        assert_same(&cached.decode().expect("decodes"), &pd);
        let (server, g) = cached.limit().expect("limit kept");
        assert_eq!(g.name, "shared");
        assert_eq!(
            server,
            crate::reconcile::server::base_url(&pd.spec.server, "team")
        );
    }
}
