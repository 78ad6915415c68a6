//! Which upstream and repository a request is for.
//!
//! Three conventions share one listener:
//! - `?ns=<registry>`: containerd's hosts.toml mirrors (and Docker's containerd image store);
//! - a first path component naming a configured registry, `/v2/ghcr.io/org/app/...`: what
//!   podman and CRI-O send for a mirror location `mirror:5000/ghcr.io`;
//! - anything else goes to the default upstream: the Docker daemon's `registry-mirrors`.
//!
//! A registry that is not configured is refused by name; no request leaves pier for it.

use pier_oci::{ErrorCode, RegistryError, RepositoryName};

use crate::{Mirror, UpstreamEntry};

/// A request's upstream and the repository name to ask it for.
pub struct Route<'a> {
    pub upstream: &'a UpstreamEntry,
    pub repo: RepositoryName,
}

/// Docker Hub goes by several host names; clients may send any of them.
fn canonical_registry(name: &str) -> &str {
    match name {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io",
        other => other,
    }
}

/// Looks like a registry host rather than a namespace: Docker's own rule (a dot, a port or
/// `localhost`). Docker Hub namespaces never contain a dot.
fn looks_like_registry(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// The `ns` parameter of a query string, if any.
fn ns_param(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|kv| kv.strip_prefix("ns="))
}

impl Mirror {
    /// The upstream named `name` (any Docker Hub alias finds `docker.io`).
    pub fn upstream_named(&self, name: &str) -> Option<&UpstreamEntry> {
        let name = canonical_registry(name);
        self.upstreams.iter().find(|u| &*u.name == name)
    }

    /// Routes a raw repository name from the path, with the request's query string.
    pub fn route(&self, raw_name: &str, query: Option<&str>) -> Result<Route<'_>, RegistryError> {
        let (upstream, name) = match raw_name.split_once('/') {
            Some((first, rest)) if looks_like_registry(first) => match self.upstream_named(first) {
                Some(u) => (u, rest),
                None => return Err(not_configured(first)),
            },
            _ => match ns_param(query) {
                Some(ns) => (
                    self.upstream_named(ns).ok_or_else(|| not_configured(ns))?,
                    raw_name,
                ),
                None => (&self.upstreams[self.default_upstream], raw_name),
            },
        };
        let repo = RepositoryName::parse(name).map_err(|e| {
            RegistryError::new(
                ErrorCode::NameInvalid,
                format!("invalid repository name: {e}"),
            )
        })?;
        let repo = if upstream.library_prefix {
            repo.with_library_prefix()
        } else {
            repo
        };
        Ok(Route { upstream, repo })
    }
}

fn not_configured(registry: &str) -> RegistryError {
    // The name is echoed back only when it is printable and short: it came from a stranger.
    let shown: String = registry
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(100)
        .collect();
    RegistryError::new(
        ErrorCode::NameUnknown,
        format!("registry {shown:?} is not configured on this mirror"),
    )
}
