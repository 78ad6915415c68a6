//! From a checked [`Config`] to a running [`Mirror`]: upstream clients, cache, metrics.

use std::sync::Arc;

use pier_cache::region::Region;
use pier_cache::{Budget, Cache, CacheConfig, RetryPolicy};
use pier_metrics::Metrics;
use pier_server::auth::{Auth, AuthConfig};
use pier_server::limits::RateLimit;
use pier_server::tls::{Tls, TlsFiles};
use pier_server::{HostedRepositories, Mirror, ServerOptions, UpstreamEntry};
use pier_upstream::{Credentials, SearchEndpoint, Upstream, UpstreamConfig};

use crate::config::{Config, UpstreamSection};

/// The client for one configured upstream. Errors say what is wrong, without the field prefix.
pub fn upstream_client(
    u: &UpstreamSection,
    index: usize,
    metrics: Arc<Metrics>,
) -> Result<Upstream, String> {
    let password = u
        .password(&format!("upstreams[{index}]"))
        .map_err(|e| e.0)?;
    let credentials = u.username.as_ref().map(|username| Credentials {
        username: username.clone(),
        password: password.unwrap_or_default(),
    });
    let config = UpstreamConfig {
        name: u.name.clone(),
        url: u.url(),
        credentials,
        ca_file: u.ca_file.clone(),
        connect_timeout: u.connect_timeout,
        read_timeout: u.read_timeout,
    };
    Upstream::new(config, metrics).map_err(|e| e.to_string())
}

/// The search endpoint of one configured upstream, if it has one. Errors say what is wrong,
/// without the field prefix.
pub fn search_endpoint(
    u: &UpstreamSection,
    metrics: Arc<Metrics>,
) -> Result<Option<Arc<SearchEndpoint>>, String> {
    let Some(url) = &u.search_url else {
        return Ok(None);
    };
    SearchEndpoint::new(
        &u.name,
        url,
        u.ca_file.as_deref(),
        u.search_timeout,
        metrics,
    )
    .map(|s| Some(Arc::new(s)))
    .map_err(|e| e.to_string())
}

/// Builds the mirror: opens (and locks) the cache directory and builds every upstream client.
/// No request leaves pier here.
pub fn mirror(config: &Config) -> Result<Arc<Mirror>, String> {
    let metrics = Arc::new(Metrics::new());
    let mut upstreams = Vec::new();
    for (i, u) in config.upstreams.iter().enumerate() {
        let client =
            upstream_client(u, i, metrics.clone()).map_err(|e| format!("upstreams[{i}]: {e}"))?;
        let mut entry = UpstreamEntry::new(&u.name, Arc::new(client));
        entry.library_prefix = u.library_prefix();
        entry.freshness.tag_ttl = u.tag_ttl;
        entry.freshness.immutable_tags = u.immutable_tags_regex().map_err(|e| e.to_string())?;
        entry.freshness.rate_limit_reserve = u.rate_limit_reserve;
        entry.access = u.access().map_err(|e| e.to_string())?;
        entry.search = search_endpoint(u, metrics.clone())
            .map_err(|e| format!("upstreams[{i}].search_url: {e}"))?;
        upstreams.push(entry);
    }
    let c = &config.cache;
    let cache_config = CacheConfig {
        dir: c.dir.clone(),
        memory_size: c.memory_size.0,
        memory_object_size: c.memory_object_size.0,
        retry: RetryPolicy {
            attempts: c.fill_retries,
            ..RetryPolicy::default()
        },
        budget: Budget {
            max_size: c.max_size.0,
            high_watermark: c.high_watermark,
            low_watermark: c.low_watermark,
            max_age: c.max_age,
        },
        max_concurrent_fills: config.limits.max_concurrent_fills,
        max_queued_fills: config.limits.max_queued_fills,
        hosted: config
            .hosted
            .as_ref()
            .map(|h| pier_cache::HostedConfig {
                max_size: h.max_size.0,
                upload_expiry: h.upload_expiry,
                max_uploads: h.max_uploads,
                max_uploads_per_client: h.max_uploads_per_client,
                gc_grace: h.gc_grace,
            })
            .unwrap_or_default(),
    };
    let hosted = match &config.hosted {
        Some(h) => h
            .repositories()
            .map_err(|e| format!("hosted.repositories: {e}"))?,
        None => HostedRepositories::default(),
    };
    let mut cache = Cache::open(cache_config, metrics.clone())
        .map_err(|e| format!("cannot open cache directory {}: {e}", c.dir.display()))?;
    if config.cluster.is_some() || config.shared_store.is_some() {
        let region = config.region().map_err(|e| e.to_string())?;
        let region = Region::new(&region, metrics.clone()).map_err(|e| e.to_string())?;
        cache = cache.with_region(Arc::new(region));
    }
    Ok(Arc::new(
        Mirror::new(
            upstreams,
            config.default_upstream(),
            Arc::new(cache),
            metrics,
        )
        .with_hosted(hosted),
    ))
}

/// How the registry listener serves: TLS (loaded and checked here), limits, metrics.
pub fn server_options(config: &Config) -> Result<ServerOptions, String> {
    let l = &config.limits;
    let tls = match &config.tls {
        Some(t) => Some(Arc::new(
            Tls::load(TlsFiles {
                cert: t.cert.clone(),
                key: t.key.clone(),
                client_ca: t.client_ca.clone(),
            })
            .map_err(|e| format!("tls: {e}"))?,
        )),
        None => None,
    };
    let auth = match &config.auth {
        Some(a) => Some(Arc::new(
            Auth::load(&AuthConfig {
                htpasswd: a.htpasswd.clone(),
                anonymous: a.anonymous,
                token_ttl: a.token_ttl,
                rules: a
                    .users
                    .iter()
                    .map(|(user, rules)| (user.clone(), rules.iter().map(|r| r.rule()).collect()))
                    .collect(),
            })
            .map_err(|e| format!("auth: {e}"))?,
        )),
        None => None,
    };
    Ok(ServerOptions {
        auth,
        header_read_timeout: l.header_read_timeout,
        metrics_on_main: config.metrics.on_main_listener,
        tls,
        max_connections: l.max_connections,
        max_header_bytes: usize::try_from(l.max_header_size.0).unwrap_or(usize::MAX),
        rate_limit: (l.rate_limit_per_client > 0.0).then_some(RateLimit {
            per_second: l.rate_limit_per_client,
            burst: l.rate_limit_burst,
        }),
        ..ServerOptions::default()
    })
}
