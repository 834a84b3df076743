//! Resolving `spec.server` to a base URL and credentials. Credentials are read only
//! from the resource's own namespace.

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

/// The credentials `s` names, read from the resource's namespace. Only Secrets and
/// ConfigMaps that `access` allows are read.
pub async fn credentials(
    kube: &kube::Client,
    namespace: &str,
    s: &ServerSpec,
    access: &Access,
) -> Result<Option<Auth>> {
    if let Some(key) = &s.api_key {
        return Ok(Some(Auth::Bearer(
            read(kube, namespace, key, "spec.server.apiKey", access).await?,
        )));
    }
    if let Some(auth) = &s.auth_string {
        let value = read(kube, namespace, auth, "spec.server.authString", access).await?;
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
