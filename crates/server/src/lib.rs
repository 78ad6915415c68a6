//! pier's HTTP front.
//!
//! A hyper server for the pull side of the registry API. Each request is routed to one configured
//! upstream and repository ([`routing`]), answered from the cache or through it ([`handlers`]),
//! and every failure becomes the registry's JSON error ([`response`]).

pub mod admin;
pub mod auth;
pub mod handlers;
pub mod limits;
mod ops;
mod origin;
pub mod response;
pub mod routing;
mod serve;
pub mod tls;
pub mod warm;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pier_cache::{Cache, SingleFlight};
use pier_metrics::Metrics;
use pier_upstream::{ManifestHead, Upstream, UpstreamError};
use regex::Regex;

pub use admin::serve_admin;
pub use ops::serve_ops;
pub use routing::RepositoryFilter;
pub use serve::{serve, ServerOptions};

/// One upstream as the front sees it: how clients name it and how fresh its tags must be.
pub struct UpstreamEntry {
    /// The registry host clients know it by (`docker.io`, `ghcr.io`).
    pub name: Arc<str>,
    pub client: Arc<Upstream>,
    /// Docker Hub's convention: `nginx` means `library/nginx`.
    pub library_prefix: bool,
    /// How long a tag is answered from cache before pier asks the upstream again.
    pub tag_ttl: Duration,
    /// Tags matching this (say `^v?\d+\.\d+\.\d+$`) are never revalidated once cached.
    pub immutable_tags: Option<Regex>,
    /// When the upstream reports this many pulls or fewer left (Docker Hub's
    /// `ratelimit-remaining`), cached tags are served without revalidation.
    pub rate_limit_reserve: u64,
    /// Which repositories of this upstream clients may pull.
    pub access: RepositoryFilter,
}

impl UpstreamEntry {
    /// An entry with the defaults: 5 minute tag TTL, no immutable tags, a reserve of 10 pulls,
    /// and the `library/` prefix for docker.io only.
    pub fn new(name: &str, client: Arc<Upstream>) -> Self {
        UpstreamEntry {
            name: name.into(),
            client,
            library_prefix: name == "docker.io",
            tag_ttl: Duration::from_secs(300),
            immutable_tags: None,
            rate_limit_reserve: 10,
            access: RepositoryFilter::default(),
        }
    }
}

/// A tag list as the upstream gave it, kept to answer briefly and while the upstream is down.
pub(crate) struct TagList {
    pub fetched: Instant,
    pub body: Bytes,
    pub link: Option<String>,
}

/// Everything a request needs: the upstreams and the cache.
pub struct Mirror {
    pub upstreams: Vec<UpstreamEntry>,
    /// Index in `upstreams` of the one that takes names no routing rule claims.
    pub default_upstream: usize,
    pub cache: Arc<Cache>,
    pub metrics: Arc<Metrics>,
    pub(crate) tag_lists: moka::future::Cache<String, Arc<TagList>>,
    /// Tag revalidations under way: concurrent requests for a tag past its TTL share one HEAD.
    pub(crate) revalidations: SingleFlight<String, Result<ManifestHead, UpstreamError>>,
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
            tag_lists: moka::future::Cache::new(10_000),
            revalidations: SingleFlight::default(),
        }
    }
}
