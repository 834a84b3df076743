//! Which Prefect servers the operator may call and which Secrets it may read for a
//! resource. Whoever may create a PrefectDeployment chooses the URL and the Secret; the
//! operator's own network position and permissions do the rest, so a cluster can bound
//! both (`--allowed-server`, `--secret-label`). Pure.

use std::collections::BTreeMap;

/// The operator's access policy; the default allows everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Access {
    /// Empty: every server is allowed.
    pub allowed_servers: Vec<ServerPattern>,
    /// Set: only Secrets and ConfigMaps carrying this label are read for credentials.
    pub secret_label: Option<(String, String)>,
}

/// One `--allowed-server` value.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerPattern {
    /// `https://prefect.example.com/api`: that URL and any path below it.
    UrlPrefix(String),
    /// `prefect.infra.svc` (that host) or `*.example.com` (any host below it).
    Host(String),
}

impl std::str::FromStr for ServerPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an allowed server cannot be empty".into());
        }
        if s.contains("://") {
            let url = reqwest::Url::parse(s).map_err(|e| format!("{s:?}: {e}"))?;
            if url.host_str().is_none() {
                return Err(format!("{s:?} has no host"));
            }
            return Ok(ServerPattern::UrlPrefix(
                s.trim_end_matches('/').to_string(),
            ));
        }
        if s.contains('/') {
            return Err(format!(
                "{s:?}: give a URL with its scheme (https://host/api) or a host name (host, *.domain)"
            ));
        }
        Ok(ServerPattern::Host(s.to_ascii_lowercase()))
    }
}

impl ServerPattern {
    fn allows(&self, base: &str) -> bool {
        match self {
            // At a path boundary: `https://a/api` must not admit `https://a/api-evil`
            // nor `https://a.evil`.
            ServerPattern::UrlPrefix(p) => {
                base == p
                    || base
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            }
            ServerPattern::Host(h) => {
                let Some(host) = reqwest::Url::parse(base)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
                else {
                    return false;
                };
                match h.strip_prefix("*.") {
                    Some(domain) => host.ends_with(&format!(".{domain}")),
                    None => host == *h,
                }
            }
        }
    }
}

impl Access {
    /// Whether the operator may send requests to the Prefect API at `base`.
    pub fn server_allowed(&self, base: &str) -> bool {
        self.allowed_servers.is_empty() || self.allowed_servers.iter().any(|p| p.allows(base))
    }

    /// Whether a Secret or ConfigMap with these labels may be read for credentials.
    pub fn secret_allowed(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        match &self.secret_label {
            None => true,
            Some((k, v)) => labels.and_then(|l| l.get(k)) == Some(v),
        }
    }
}

/// Parses `KEY=VALUE` for `--secret-label`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE, e.g. prefect.io/credentials=true"))?;
    if k.trim().is_empty() {
        return Err(format!("{s:?}: the label key is empty"));
    }
    Ok((k.trim().to_string(), v.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(patterns: &[&str]) -> Access {
        Access {
            allowed_servers: patterns.iter().map(|p| p.parse().unwrap()).collect(),
            secret_label: None,
        }
    }

    #[test]
    fn servers() {
        let a = access(&[
            "https://api.prefect.cloud/api/accounts/abc",
            "prefect.infra.svc",
            "*.corp.example",
        ]);
        assert!(a.server_allowed("https://api.prefect.cloud/api/accounts/abc/workspaces/w"));
        assert!(a.server_allowed("https://api.prefect.cloud/api/accounts/abc"));
        assert!(!a.server_allowed("https://api.prefect.cloud/api/accounts/abcd/workspaces/w"));
        assert!(!a.server_allowed("https://api.prefect.cloud.evil/api/accounts/abc"));
        assert!(a.server_allowed("http://prefect.infra.svc:4200/api"));
        assert!(a.server_allowed("http://PREFECT.infra.svc:4200/api"));
        assert!(!a.server_allowed("http://prefect.infra.svc.evil:4200/api"));
        assert!(a.server_allowed("https://p.corp.example/api"));
        assert!(!a.server_allowed("https://corp.example.evil/api"));
        assert!(!a.server_allowed("http://169.254.169.254/latest"));
        assert!(access(&[]).server_allowed("http://anything/api"));
        assert!("a/b".parse::<ServerPattern>().is_err());
        assert!("".parse::<ServerPattern>().is_err());
    }

    #[test]
    fn secrets() {
        let a = Access {
            secret_label: Some(parse_label("prefect.io/credentials=true").unwrap()),
            ..Access::default()
        };
        let labels: BTreeMap<String, String> =
            [("prefect.io/credentials".to_string(), "true".to_string())].into();
        assert!(a.secret_allowed(Some(&labels)));
        assert!(!a.secret_allowed(None));
        assert!(!a.secret_allowed(Some(&BTreeMap::new())));
        assert!(Access::default().secret_allowed(None));
        assert!(parse_label("novalue").is_err());
    }
}
