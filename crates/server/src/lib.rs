//! pier's HTTP front.
//!
//! A hyper server for the pull side of the registry API. Each request is routed to one configured
//! upstream and repository ([`routing`]), answered from the cache or through it ([`handlers`]),
//! and every failure becomes the registry's JSON error ([`response`]).

pub mod handlers;
mod origin;
pub mod response;
pub mod routing;
mod serve;

use std::sync::Arc;
use std::time::Duration;

use pier_cache::Cache;
use pier_upstream::Upstream;

pub use serve::{serve, ServerLimits};

/// One upstream as the front sees it: how clients name it and how fresh its tags must be.
pub struct UpstreamEntry {
    /// The registry host clients know it by (`docker.io`, `ghcr.io`).
    pub name: Arc<str>,
    pub client: Arc<Upstream>,
    /// Docker Hub's convention: `nginx` means `library/nginx`.
    pub library_prefix: bool,
    /// How long a tag is answered from cache before pier asks the upstream again.
    pub tag_ttl: Duration,
}

/// Everything a request needs: the upstreams and the cache.
pub struct Mirror {
    pub upstreams: Vec<UpstreamEntry>,
    /// Index in `upstreams` of the one that takes names no routing rule claims.
    pub default_upstream: usize,
    pub cache: Arc<Cache>,
}
