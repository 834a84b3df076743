//! Resolving `spec.server` to a base URL and credentials. Credentials are read only
//! from the resource's own namespace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;

use crate::access::Access;
use crate::api::{SecretValue, ServerSpec};
use crate::prefect::Auth;
use crate::{Error, Result};

pub const CLOUD_API: &str = "https://api.prefect.cloud/api";
/// Port of an in-cluster Prefect server's Service.
const IN_CLUSTER_PORT: u16 = 4200;

/// The Prefect API base URL the spec points at (pure).
pub fn base_url(s: &ServerSpec, resource_namespace: &str) -> String {
    if let (Some(account), Some(workspace)) = (&s.account_id, &s.workspace_id) {
        let base = s
            .remote_api_url
            .as_deref()
            .unwrap_or(CLOUD_API)
            .trim_end_matches('/');
        if base.contains("/accounts/") {
            return base.to_string();
        }
        return format!("{base}/accounts/{account}/workspaces/{workspace}");
    }
    if let Some(url) = &s.remote_api_url {
        return url.trim_end_matches('/').to_string();
    }
    let name = s.name.as_deref().unwrap_or_default();
    let ns = s.namespace.as_deref().unwrap_or(resource_namespace);
    format!("http://{name}.{ns}.svc:{IN_CLUSTER_PORT}/api")
}

/// How long a credential read from a Secret or ConfigMap is used before it is read
/// again. A server refusing it (401/403) drops it sooner: `CredentialCache::forget`.
const CREDENTIAL_TTL: Duration = Duration::from_secs(120);
/// Longer values are read every time rather than kept: real keys are a few dozen
/// bytes, and a namespace must not fill the operator's memory with megabyte Secrets.
const CREDENTIAL_MAX_KEPT: usize = 4096;
/// Past this many sources (or twice as many as were left the last time), ones not in
/// use and no longer fresh are dropped.
const CREDENTIAL_SOURCES: usize = 1024;

/// Credentials read from Secrets and ConfigMaps, per namespace, object and key. Without
/// it every pass reads its Secret: a thousand resources sharing one API key made a
/// thousand GETs each resync. Only values that passed the label check are kept; errors
/// are not kept, so a Secret created or labelled later is seen on the next retry.
#[derive(Default)]
pub struct CredentialCache {
    sources: Mutex<Sources>,
}

#[derive(Default)]
struct Sources {
    held: HashMap<Source, Slot>,
    /// Pruned when `held` reaches this (at least `CREDENTIAL_SOURCES`): a scan per
    /// doubling, not per new source, where many are fresh at once.
    prune_at: usize,
}

/// (namespace, kind, name, key)
type Source = (String, &'static str, String, String);
/// One read at a time per source: passes that miss together make one GET.
type Slot = Arc<tokio::sync::Mutex<Option<(Instant, String)>>>;

impl CredentialCache {
    fn slot(&self, source: &Source) -> Slot {
        let mut sources = self.sources.lock().expect("credential cache lock");
        let Sources { held, prune_at } = &mut *sources;
        if held.len() >= (*prune_at).max(CREDENTIAL_SOURCES) && !held.contains_key(source) {
            held.retain(|_, slot| match slot.try_lock() {
                Ok(kept) => kept
                    .as_ref()
                    .is_some_and(|(at, _)| at.elapsed() < CREDENTIAL_TTL),
                Err(_) => true,
            });
            *prune_at = 2 * held.len();
        }
        held.entry(source.clone()).or_default().clone()
    }

    /// Drops what `s` reads in `namespace`, so the next pass reads it anew (the server
    /// refused it: the Secret may have been rotated since it was read).
    pub fn forget(&self, namespace: &str, s: &ServerSpec) {
        let mut sources = self.sources.lock().expect("credential cache lock");
        for v in [&s.api_key, &s.auth_string].into_iter().flatten() {
            if let Some((kind, name, key)) = source_of(v) {
                sources
                    .held
                    .remove(&(namespace.to_string(), kind, name, key));
            }
        }
    }
}

fn source_of(v: &SecretValue) -> Option<(&'static str, String, String)> {
    let from = v.value_from.as_ref()?;
    let (kind, r) = match (&from.secret_key_ref, &from.config_map_key_ref) {
        (Some(r), _) => ("Secret", r),
        (None, Some(r)) => ("ConfigMap", r),
        (None, None) => return None,
    };
    Some((kind, r.name.clone().unwrap_or_default(), r.key.clone()))
}

/// The credentials `s` names, read from the resource's namespace (or `cache`). Only
/// Secrets and ConfigMaps that `access` allows are read.
pub async fn credentials(
    kube: &kube::Client,
    namespace: &str,
    s: &ServerSpec,
    access: &Access,
    cache: &CredentialCache,
) -> Result<Option<Auth>> {
    let read = |v, field| cached(kube, namespace, v, field, access, cache);
    if let Some(key) = &s.api_key {
        return Ok(Some(Auth::Bearer(read(key, "spec.server.apiKey").await?)));
    }
    if let Some(auth) = &s.auth_string {
        let value = read(auth, "spec.server.authString").await?;
        if !value.contains(':') {
            // The Secret, not the spec, needs fixing: keep retrying until it is.
            return Err(Error::SecretNotFound(
                "spec.server.authString: the referenced value must have the form user:password"
                    .into(),
            ));
        }
        return Ok(Some(Auth::Basic(value)));
    }
    Ok(None)
}

async fn cached(
    kube: &kube::Client,
    namespace: &str,
    v: &SecretValue,
    field: &str,
    access: &Access,
    cache: &CredentialCache,
) -> Result<String> {
    let Some((kind, name, key)) = v.value.is_none().then(|| source_of(v)).flatten() else {
        return read(kube, namespace, v, field, access).await;
    };
    let slot = cache.slot(&(namespace.to_string(), kind, name, key));
    let mut held = slot.lock().await;
    if let Some((at, value)) = held.as_ref() {
        if at.elapsed() < CREDENTIAL_TTL {
            return Ok(value.clone());
        }
    }
    *held = None;
    let value = read(kube, namespace, v, field, access).await?;
    if value.len() <= CREDENTIAL_MAX_KEPT {
        *held = Some((Instant::now(), value.clone()));
    }
    Ok(value)
}

async fn read(
    kube: &kube::Client,
    namespace: &str,
    v: &SecretValue,
    field: &str,
    access: &Access,
) -> Result<String> {
    if let Some(value) = &v.value {
        return Ok(value.clone());
    }
    let from = v
        .value_from
        .as_ref()
        .ok_or_else(|| Error::InvalidSpec(format!("{field}: set value or valueFrom")))?;
    let (kind, r) = match (&from.secret_key_ref, &from.config_map_key_ref) {
        (Some(r), _) => ("Secret", r),
        (None, Some(r)) => ("ConfigMap", r),
        (None, None) => {
            return Err(Error::InvalidSpec(format!(
                "{field}.valueFrom: set secretKeyRef or configMapKeyRef"
            )))
        }
    };
    let name = r.name.as_deref().unwrap_or_default();
    let not_found = || {
        Error::SecretNotFound(format!(
            "{field}: {kind} {name:?} not found in namespace {namespace:?}"
        ))
    };
    let value = if kind == "Secret" {
        let secret = Api::<Secret>::namespaced(kube.clone(), namespace)
            .get_opt(name)
            .await?
            .ok_or_else(not_found)?;
        check_label(access, secret.metadata.labels.as_ref(), field, kind, name)?;
        secret
            .data
            .and_then(|d| {
                d.get(&r.key)
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            })
            .or_else(|| secret.string_data.and_then(|d| d.get(&r.key).cloned()))
    } else {
        let cm = Api::<ConfigMap>::namespaced(kube.clone(), namespace)
            .get_opt(name)
            .await?
            .ok_or_else(not_found)?;
        check_label(access, cm.metadata.labels.as_ref(), field, kind, name)?;
        cm.data.and_then(|d| d.get(&r.key).cloned())
    };
    match value {
        // A trailing newline is almost always an accident of `echo ... | kubectl create`.
        Some(v) if !v.trim().is_empty() => Ok(v.trim_end_matches(['\n', '\r']).to_string()),
        _ => Err(Error::SecretNotFound(format!(
            "{field}: {kind} {name:?} has no key {:?} (or it is empty)",
            r.key
        ))),
    }
}

fn check_label(
    access: &Access,
    labels: Option<&std::collections::BTreeMap<String, String>>,
    field: &str,
    kind: &str,
    name: &str,
) -> Result<()> {
    match &access.secret_label {
        Some((k, v)) if !access.secret_allowed(labels) => Err(Error::SecretNotAllowed(format!(
            "{field}: {kind} {name:?} does not carry the label {k}={v}; this operator reads credentials only from {kind}s labelled so (kubectl label {} {name} {k}={v})",
            kind.to_ascii_lowercase()
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(i: usize) -> Source {
        ("ns".into(), "Secret", format!("s{i}"), "key".into())
    }

    #[tokio::test]
    async fn kept_credentials_are_bounded_and_forgotten() {
        let cache = CredentialCache::default();
        let fresh = cache.slot(&source(0));
        *fresh.lock().await = Some((Instant::now(), "admin:pass".into()));
        let busy = cache.slot(&source(1));
        let _reading = busy.lock().await;
        for i in 2..CREDENTIAL_SOURCES {
            cache.slot(&source(i));
        }
        // Full: the next new source drops the ones that hold nothing fresh, but not
        // a fresh value or a read in progress.
        cache.slot(&source(CREDENTIAL_SOURCES));
        let held: Vec<Source> = cache.sources.lock().unwrap().held.keys().cloned().collect();
        assert_eq!(held.len(), 3, "{held:?}");
        for kept in [source(0), source(1), source(CREDENTIAL_SOURCES)] {
            assert!(held.contains(&kept), "{kept:?}");
        }
        // A refused credential is dropped for the spec that named it.
        let spec: ServerSpec = serde_json::from_value(serde_json::json!({
            "authString": {"valueFrom": {"secretKeyRef": {"name": "s0", "key": "key"}}}
        }))
        .unwrap();
        cache.forget("other", &spec);
        assert!(cache.sources.lock().unwrap().held.contains_key(&source(0)));
        cache.forget("ns", &spec);
        assert!(!cache.sources.lock().unwrap().held.contains_key(&source(0)));
    }

    #[test]
    fn urls() {
        let s = ServerSpec {
            remote_api_url: Some("http://h:4200/api/".into()),
            ..Default::default()
        };
        assert_eq!(base_url(&s, "ns"), "http://h:4200/api");
        let s = ServerSpec {
            account_id: Some("a".into()),
            workspace_id: Some("w".into()),
            ..Default::default()
        };
        assert_eq!(
            base_url(&s, "ns"),
            "https://api.prefect.cloud/api/accounts/a/workspaces/w"
        );
        let s = ServerSpec {
            name: Some("prefect".into()),
            ..Default::default()
        };
        assert_eq!(base_url(&s, "team"), "http://prefect.team.svc:4200/api");
        let s = ServerSpec {
            name: Some("prefect".into()),
            namespace: Some("infra".into()),
            ..Default::default()
        };
        assert_eq!(base_url(&s, "team"), "http://prefect.infra.svc:4200/api");
    }
}
