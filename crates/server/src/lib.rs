//! pier's HTTP front.
//!
//! A hyper server for the pull side of the registry API. Each request is routed to one configured
//! upstream and repository ([`routing`]), answered from the cache or through it ([`handlers`]),
//! and every failure becomes the registry's JSON error ([`response`]). Peers of a region ask
//! for what this node owns through `region`.

pub mod admin;
pub mod auth;
pub mod handlers;
mod hosted;
pub mod limits;
mod ops;
mod region;
pub mod response;
pub mod routing;
mod search;
mod sendfile;
mod serve;
pub mod tls;
pub mod warm;

use std::sync::Arc;

use pier_cache::{Cache, Freshness};
use pier_metrics::Metrics;
use pier_upstream::{SearchEndpoint, Upstream};

pub use admin::serve_admin;
pub use handlers::Caller;
pub use ops::serve_ops;
pub use routing::{GlobError, HostedRepositories, RepositoryFilter, Route, Target};
pub use serve::{serve, ServerOptions};

/// One upstream as the front sees it: how clients name it, which of its repositories they may
/// pull, and how fresh its tags must be.
pub struct UpstreamEntry {
    /// The registry host clients know it by (`docker.io`, `ghcr.io`).
    pub name: Arc<str>,
    pub client: Arc<Upstream>,
    /// Docker Hub's convention: `nginx` means `library/nginx`.
    pub library_prefix: bool,
    /// How long its tags are answered from cache ([`Freshness::allows_cached`] decides).
    pub freshness: Freshness,
    /// Which repositories of this upstream clients may pull.
    pub access: RepositoryFilter,
    /// Its search endpoint (`upstreams[].search_url`), whose results `docker search` adds to
    /// pier's own; never asked when `None`.
    pub search: Option<Arc<SearchEndpoint>>,
}

impl UpstreamEntry {
    /// An entry with the defaults: [`Freshness::default`], every repository allowed, the
    /// `library/` prefix for docker.io only, no search endpoint.
    pub fn new(name: &str, client: Arc<Upstream>) -> Self {
        UpstreamEntry {
            name: name.into(),
            client,
            library_prefix: name == "docker.io",
            freshness: Freshness::default(),
            access: RepositoryFilter::default(),
            search: None,
        }
    }
}

/// Everything a request needs: the upstreams and the cache.
pub struct Mirror {
    pub upstreams: Vec<UpstreamEntry>,
    /// Index in `upstreams` of the one that takes names no routing rule claims.
    pub default_upstream: usize,
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    /// Repositories pushed to pier rather than mirrored (none unless configured).
    pub hosted: HostedRepositories,
}

impl Mirror {
    pub fn new(
        upstreams: Vec<UpstreamEntry>,
        default_upstream: usize,
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        assert!(
            default_upstream < upstreams.len(),
            "the default upstream must exist"
        );
        Mirror {
            upstreams,
            default_upstream,
            cache,
            metrics,
            hosted: HostedRepositories::default(),
        }
    }

    /// The mirror with these hosted repositories.
    pub fn with_hosted(mut self, hosted: HostedRepositories) -> Self {
        self.hosted = hosted;
        self
    }
}
