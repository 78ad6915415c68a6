//! Which upstream and repository a request is for.
//!
//! Three conventions share one listener:
//! - `?ns=<registry>`: containerd's hosts.toml mirrors (and Docker's containerd image store);
//! - a first path component naming a configured registry, `/v2/ghcr.io/org/app/...`: what
//!   podman and CRI-O send for a mirror location `mirror:5000/ghcr.io`;
//! - anything else goes to the default upstream: the Docker daemon's `registry-mirrors`.
//!
//! A registry that is not configured is refused by name; no request leaves pier for it.
//!
//! Before any of that, a name matching a hosted glob is a hosted repository ([`Target::Hosted`]):
//! pier answers it from what was pushed, and no upstream is ever asked for it, whatever `ns`
//! says (so an upstream image can never shadow a pushed one).

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use pier_oci::{ErrorCode, Query, RegistryError, RepositoryName};

use crate::{Mirror, UpstreamEntry};

/// A request's upstream and the repository name to ask it for.
pub struct Route<'a> {
    pub upstream: &'a UpstreamEntry,
    pub repo: RepositoryName,
    /// Asked by a peer of the region that took this node as the owner.
    pub from_peer: bool,
}

/// What a request's repository is: pushed to pier, or mirrored from an upstream.
pub enum Target<'a> {
    Hosted(RepositoryName),
    Mirrored(Route<'a>),
}

/// Which repositories are hosted, and whether anonymous clients may push to them.
#[derive(Debug, Default)]
pub struct HostedRepositories {
    globs: Option<GlobSet>,
    /// Anonymous clients (and, with client authentication off, everyone) may push and delete.
    pub allow_anonymous_push: bool,
}

impl HostedRepositories {
    /// Hosted repositories matching `patterns` (`team/**`, `local/*`); none when empty.
    pub fn new(patterns: &[String], allow_anonymous_push: bool) -> Result<Self, GlobError> {
        Ok(HostedRepositories {
            globs: glob_set(patterns)?,
            allow_anonymous_push,
        })
    }

    /// Whether any repository is hosted.
    pub fn is_configured(&self) -> bool {
        self.globs.is_some()
    }

    /// Whether `repo` (as the client names it) is hosted.
    pub fn contains(&self, repo: &str) -> bool {
        self.globs.as_ref().is_some_and(|g| g.is_match(repo))
    }
}

impl Route<'_> {
    /// The repository as the cache knows it.
    pub fn at(&self) -> pier_cache::RepoRef<'_> {
        pier_cache::RepoRef {
            upstream: &self.upstream.name,
            client: &self.upstream.client,
            freshness: &self.upstream.freshness,
            repo: &self.repo,
            from_peer: self.from_peer,
        }
    }
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

/// The `ns` parameter of a query string (decoded), if any.
fn ns_param(query: Option<&str>) -> Option<String> {
    Query::parse_opt(query).get("ns").map(str::to_string)
}

impl Mirror {
    /// The upstream named `name` (any Docker Hub alias finds `docker.io`).
    pub fn upstream_named(&self, name: &str) -> Option<&UpstreamEntry> {
        let name = canonical_registry(name);
        self.upstreams.iter().find(|u| &*u.name == name)
    }

    /// What a raw repository name from the path is: hosted, or routed to an upstream.
    pub fn target(&self, raw_name: &str, query: Option<&str>) -> Result<Target<'_>, RegistryError> {
        if self.hosted.contains(raw_name) {
            let repo = RepositoryName::parse(raw_name).map_err(|e| {
                RegistryError::new(
                    ErrorCode::NameInvalid,
                    format!("invalid repository name: {e}"),
                )
            })?;
            return Ok(Target::Hosted(repo));
        }
        self.route(raw_name, query).map(Target::Mirrored)
    }

    /// Routes a raw repository name from the path, with the request's query string. A hosted
    /// name is refused: no upstream is ever asked for one.
    pub fn route(&self, raw_name: &str, query: Option<&str>) -> Result<Route<'_>, RegistryError> {
        if self.hosted.contains(raw_name) {
            return Err(match RepositoryName::parse(raw_name) {
                Err(e) => RegistryError::new(
                    ErrorCode::NameInvalid,
                    format!("invalid repository name: {e}"),
                ),
                Ok(_) => RegistryError::new(
                    ErrorCode::NameUnknown,
                    "this is a hosted repository: no upstream serves it",
                ),
            });
        }
        let (upstream, name) = match raw_name.split_once('/') {
            Some((first, rest)) if looks_like_registry(first) => match self.upstream_named(first) {
                Some(u) => (u, rest),
                None => return Err(not_configured(first)),
            },
            _ => match ns_param(query) {
                Some(ns) => (
                    self.upstream_named(&ns)
                        .ok_or_else(|| not_configured(&ns))?,
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
        if !upstream.access.permits(&repo) {
            return Err(RegistryError::new(
                ErrorCode::Denied,
                format!("{}/{repo} is not allowed on this mirror", upstream.name),
            ));
        }
        Ok(Route {
            upstream,
            repo,
            from_peer: false,
        })
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

/// A repository pattern that is not a glob.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{pattern:?} is not a glob pattern: {message}")]
pub struct GlobError {
    pub pattern: String,
    pub message: String,
}

/// Repository globs (`*` within a component, `**` across), or `None` when there are none.
fn glob_set(patterns: &[String]) -> Result<Option<GlobSet>, GlobError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let glob: Glob = GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .map_err(|e| GlobError {
                pattern: p.clone(),
                message: e.kind().to_string(),
            })?;
        b.add(glob);
    }
    b.build().map(Some).map_err(|e| GlobError {
        pattern: patterns.join(" "),
        message: e.to_string(),
    })
}

/// Allow and deny lists of repository globs for one upstream, checked before anything else.
///
/// `*` matches within one path component (`library/*`), `**` across components (`myorg/**`).
/// A repository is permitted when it matches no deny pattern and, if there is an allow list, at
/// least one allow pattern. Patterns apply to the name as the upstream knows it
/// (`library/nginx`, not `nginx`).
#[derive(Debug, Default)]
pub struct RepositoryFilter {
    allow: Option<GlobSet>,
    deny: Option<GlobSet>,
}

impl RepositoryFilter {
    /// Builds the filter; the error names the bad pattern.
    pub fn new(allow: &[String], deny: &[String]) -> Result<Self, GlobError> {
        Ok(RepositoryFilter {
            allow: glob_set(allow)?,
            deny: glob_set(deny)?,
        })
    }

    /// Whether clients may pull `repo`.
    pub fn permits(&self, repo: &RepositoryName) -> bool {
        let name = repo.as_str();
        !self.deny.as_ref().is_some_and(|d| d.is_match(name))
            && self.allow.as_ref().is_none_or(|a| a.is_match(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> RepositoryName {
        RepositoryName::parse(s).expect("valid name")
    }

    #[test]
    fn ns_parameter_is_decoded_and_matched_by_whole_key() {
        assert_eq!(ns_param(Some("ns=ghcr.io")).as_deref(), Some("ghcr.io"));
        assert_eq!(
            ns_param(Some("n=1&ns=registry.example%3A5000&ns=other")).as_deref(),
            Some("registry.example:5000")
        );
        assert_eq!(ns_param(Some("nsx=ghcr.io")), None);
        assert_eq!(ns_param(Some("")), None);
        assert_eq!(ns_param(None), None);
    }

    #[test]
    fn hosted_globs() {
        let h = HostedRepositories::new(&["team/**".into(), "local/*".into()], false).unwrap();
        assert!(h.contains("team/app") && h.contains("team/a/b") && h.contains("local/x"));
        assert!(!h.contains("local/x/y") && !h.contains("library/nginx") && !h.contains("team"));
        assert!(!HostedRepositories::default().contains("team/app"));
    }

    #[test]
    fn allow_and_deny() {
        let f = RepositoryFilter::new(
            &["library/*".into(), "myorg/**".into()],
            &["library/evil".into(), "myorg/secret/**".into()],
        )
        .unwrap();
        assert!(f.permits(&name("library/nginx")));
        assert!(!f.permits(&name("library/nginx/sub")), "* must not cross /");
        assert!(f.permits(&name("myorg/team/app")));
        assert!(!f.permits(&name("library/evil")));
        assert!(!f.permits(&name("myorg/secret/x")));
        assert!(!f.permits(&name("other/app")));
        assert!(RepositoryFilter::default().permits(&name("any/thing")));
        let deny_only = RepositoryFilter::new(&[], &["bad/*".into()]).unwrap();
        assert!(deny_only.permits(&name("good/x")) && !deny_only.permits(&name("bad/x")));
        assert_eq!(
            RepositoryFilter::new(&["a/[".into()], &[])
                .unwrap_err()
                .pattern,
            "a/["
        );
    }
}
