//! pier's Prometheus metrics.
//!
//! One [`Metrics`] per running pier, shared by `Arc` with the upstream clients, the cache and the
//! HTTP front, each of which records what it alone sees. Names follow Prometheus conventions
//! (base units, `_total` on counters) and labels stay low-cardinality: method, object kind,
//! status class, cache result, upstream name, outcome; never a repository, tag or digest.

use std::fmt;
use std::sync::OnceLock;

/// The counter type of [`Metrics`]' per-label handles, for callers that keep one.
pub use prometheus::IntCounter;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric pier exports.
pub struct Metrics {
    registry: Registry,
    /// `requests`, `cache_lookups` and `served_bytes` by the label values pier's front uses:
    /// counted per request, so resolved once instead of hashing labels each time.
    request_table: CounterTable,
    lookup_table: CounterTable,
    served_table: CounterTable,
    /// Requests answered, by `method`, `kind` (manifest, blob, tags, catalog, base, other) and `status` class.
    pub requests: IntCounterVec,
    /// Cache lookups by `result` (memory_hit, disk_hit, miss) and `kind` (manifest, blob).
    pub cache_lookups: IntCounterVec,
    /// Body bytes sent to clients, by `source` (memory, disk, upstream).
    pub served_bytes: IntCounterVec,
    /// Body bytes received from each `upstream`.
    pub upstream_bytes: IntCounterVec,
    /// Upstream requests by `upstream`, `kind` (manifest, manifest_head, blob, blob_head, tags,
    /// token, search) and `outcome` (ok, not_found, unauthorized, rate_limited, server_error, error).
    pub upstream_requests: IntCounterVec,
    /// Time until the upstream's response headers, by `upstream` and `kind`.
    pub upstream_duration: HistogramVec,
    /// Token fetches by `upstream` and `outcome`.
    pub token_fetches: IntCounterVec,
    /// Blob fills downloading now.
    pub fills_in_flight: IntGauge,
    /// Fills finished, by `outcome` (ok, failed).
    pub fills: IntCounterVec,
    /// Requests that joined a fill another request started.
    pub fill_joins: IntCounter,
    /// Broken downloads resumed with a Range request.
    pub fill_resumes: IntCounter,
    /// Cached answers served because the upstream was down, by `upstream` and `kind` (manifest, tags).
    pub stale_served: IntCounterVec,
    /// Tag revalidations by `upstream` and `result` (unchanged, changed, failed).
    pub tag_revalidations: IntCounterVec,
    /// Bytes of verified content in the disk store.
    pub disk_bytes: IntGauge,
    /// The disk budget (`cache.max_size`), 0 when unlimited.
    pub disk_budget_bytes: IntGauge,
    /// Objects removed to keep to the budget or age limit.
    pub evictions: IntCounter,
    /// Bytes of hosted content (pushed or mounted; never evicted), and held by uploads under way.
    pub hosted_bytes: IntGauge,
    pub hosted_upload_bytes: IntGauge,
    /// The hosted budget (`hosted.max_size`), 0 when unlimited.
    pub hosted_budget_bytes: IntGauge,
    /// Pushes to hosted repositories by `kind` (blob, manifest) and `outcome` (ok, invalid,
    /// budget, failed).
    pub hosted_pushes: IntCounterVec,
    /// Bytes received by pushes, by `outcome`: stored, or discarded (a chunk cut back, a digest
    /// mismatch, an upload cancelled or expired).
    pub hosted_received_bytes: IntCounterVec,
    /// Upload sessions open.
    pub hosted_uploads_in_progress: IntGauge,
    /// Garbage collections of hosted content, by `outcome` (ok, failed).
    pub gc_runs: IntCounterVec,
    /// Bytes garbage collection removed from disk.
    pub gc_freed_bytes: IntCounter,
    /// Objects garbage collection removed (`removed`) or handed back to the mirror's LRU
    /// (`unpinned`).
    pub gc_objects: IntCounterVec,
    /// Bytes and entries in the memory tier.
    pub memory_bytes: IntGauge,
    pub memory_entries: IntGauge,
    /// The last `ratelimit-remaining` each `upstream` reported.
    pub rate_limit_remaining: IntGaugeVec,
    /// Region lookups of a digest this node does not hold, by `result` (owner_hit,
    /// shared_store_hit, upstream).
    pub region_lookups: IntCounterVec,
    /// Requests to peers, by `outcome` (ok, not_found, refused, error, timeout).
    pub peer_requests: IntCounterVec,
    /// Time until a peer's response headers.
    pub peer_duration: Histogram,
    /// Peers currently taken as live (this node not counted).
    pub live_peers: IntGauge,
    /// Bytes read from and written to the shared store, by `direction` (read, written).
    pub shared_store_bytes: IntCounterVec,
    /// Failed shared-store operations, by `op` (get, put, head).
    pub shared_store_errors: IntCounterVec,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[allow(
    clippy::expect_used,
    reason = "metric definitions are constants: building and registering them cannot fail"
)]
fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

#[allow(
    clippy::expect_used,
    reason = "metric definitions are constants: building and registering them cannot fail"
)]
fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

#[allow(
    clippy::expect_used,
    reason = "metric definitions are constants: building and registering them cannot fail"
)]
fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric definition");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

impl Metrics {
    /// A fresh registry with every metric at zero. (The definitions are constants, so the
    /// `expect`s here cannot fail at run time.)
    #[allow(
        clippy::expect_used,
        reason = "metric definitions are constants: building and registering them cannot fail"
    )]
    pub fn new() -> Metrics {
        let r = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new("pier_build_info", "pier's version; always 1"),
            &["version"],
        )
        .expect("valid metric definition");
        r.register(Box::new(build_info.clone()))
            .expect("metric registered once");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "pier_upstream_request_duration_seconds",
                "Time until the upstream's response headers",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["upstream", "kind"],
        )
        .expect("valid metric definition");
        r.register(Box::new(upstream_duration.clone()))
            .expect("metric registered once");
        let rate_limit_remaining = IntGaugeVec::new(
            Opts::new(
                "pier_upstream_rate_limit_remaining",
                "The pull budget each upstream reported last (ratelimit-remaining)",
            ),
            &["upstream"],
        )
        .expect("valid metric definition");
        r.register(Box::new(rate_limit_remaining.clone()))
            .expect("metric registered once");
        let peer_duration = Histogram::with_opts(
            HistogramOpts::new(
                "pier_peer_request_duration_seconds",
                "Time until a peer's response headers",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid metric definition");
        r.register(Box::new(peer_duration.clone()))
            .expect("metric registered once");
        let requests = counter_vec(
            &r,
            "pier_http_requests_total",
            "Requests answered",
            &["method", "kind", "status"],
        );
        let cache_lookups = counter_vec(
            &r,
            "pier_cache_lookups_total",
            "Cache lookups by result (memory_hit, disk_hit, miss) and object kind",
            &["result", "kind"],
        );
        let served_bytes = counter_vec(
            &r,
            "pier_served_bytes_total",
            "Body bytes sent to clients, by source",
            &["source"],
        );
        Metrics {
            request_table: CounterTable::new(&requests, &[METHODS, REQUEST_KINDS, STATUS_CLASSES]),
            lookup_table: CounterTable::new(&cache_lookups, &[LOOKUP_RESULTS, LOOKUP_KINDS]),
            served_table: CounterTable::new(&served_bytes, &[SOURCES]),
            requests,
            cache_lookups,
            served_bytes,
            upstream_bytes: counter_vec(
                &r,
                "pier_upstream_received_bytes_total",
                "Body bytes received from each upstream",
                &["upstream"],
            ),
            upstream_requests: counter_vec(
                &r,
                "pier_upstream_requests_total",
                "Upstream requests by kind and outcome",
                &["upstream", "kind", "outcome"],
            ),
            upstream_duration,
            token_fetches: counter_vec(
                &r,
                "pier_upstream_token_fetches_total",
                "Bearer token fetches by outcome",
                &["upstream", "outcome"],
            ),
            fills_in_flight: gauge(&r, "pier_fills_in_flight", "Blob downloads in progress"),
            fills: counter_vec(
                &r,
                "pier_fills_total",
                "Blob downloads finished, by outcome",
                &["outcome"],
            ),
            fill_joins: counter(
                &r,
                "pier_fill_joins_total",
                "Requests that joined a download already in progress",
            ),
            fill_resumes: counter(
                &r,
                "pier_fill_resumes_total",
                "Broken downloads resumed with a Range request",
            ),
            stale_served: counter_vec(
                &r,
                "pier_stale_served_total",
                "Cached answers served because the upstream was down or rate-limiting",
                &["upstream", "kind"],
            ),
            tag_revalidations: counter_vec(
                &r,
                "pier_tag_revalidations_total",
                "Tag revalidations with the upstream, by result (unchanged, changed, failed)",
                &["upstream", "result"],
            ),
            disk_bytes: gauge(
                &r,
                "pier_disk_usage_bytes",
                "Bytes of verified content in the disk store",
            ),
            disk_budget_bytes: gauge(
                &r,
                "pier_disk_budget_bytes",
                "The disk budget; 0 when unlimited",
            ),
            hosted_bytes: gauge(
                &r,
                "pier_hosted_bytes",
                "Bytes of hosted content (pushed or mounted), never evicted",
            ),
            hosted_upload_bytes: gauge(
                &r,
                "pier_hosted_upload_bytes",
                "Bytes held by upload sessions under way",
            ),
            hosted_budget_bytes: gauge(
                &r,
                "pier_hosted_budget_bytes",
                "The hosted budget; 0 when unlimited",
            ),
            hosted_pushes: counter_vec(
                &r,
                "pier_hosted_pushes_total",
                "Blobs and manifests pushed to hosted repositories, by outcome",
                &["kind", "outcome"],
            ),
            hosted_received_bytes: counter_vec(
                &r,
                "pier_hosted_received_bytes_total",
                "Bytes pushed to hosted repositories, stored or discarded",
                &["outcome"],
            ),
            hosted_uploads_in_progress: gauge(
                &r,
                "pier_hosted_uploads_in_progress",
                "Upload sessions open",
            ),
            gc_runs: counter_vec(
                &r,
                "pier_gc_runs_total",
                "Garbage collections of hosted content, by outcome",
                &["outcome"],
            ),
            gc_freed_bytes: counter(
                &r,
                "pier_gc_freed_bytes_total",
                "Bytes garbage collection removed from disk",
            ),
            gc_objects: counter_vec(
                &r,
                "pier_gc_objects_total",
                "Objects garbage collection removed, or handed back to the mirror's LRU",
                &["action"],
            ),
            evictions: counter(
                &r,
                "pier_evictions_total",
                "Objects removed to keep to the disk budget or age limit",
            ),
            memory_bytes: gauge(
                &r,
                "pier_memory_tier_bytes",
                "Bytes held in the memory tier",
            ),
            memory_entries: gauge(
                &r,
                "pier_memory_tier_entries",
                "Objects held in the memory tier",
            ),
            rate_limit_remaining,
            region_lookups: counter_vec(
                &r,
                "pier_region_lookups_total",
                "Lookups of digests this node does not hold, by where they were found",
                &["result"],
            ),
            peer_requests: counter_vec(
                &r,
                "pier_peer_requests_total",
                "Requests to peer nodes, by outcome",
                &["outcome"],
            ),
            peer_duration,
            live_peers: gauge(&r, "pier_live_peers", "Peers taken as live"),
            shared_store_bytes: counter_vec(
                &r,
                "pier_shared_store_bytes_total",
                "Bytes read from and written to the shared store",
                &["direction"],
            ),
            shared_store_errors: counter_vec(
                &r,
                "pier_shared_store_errors_total",
                "Failed shared-store operations",
                &["op"],
            ),
            registry: r,
        }
    }

    /// The `requests` counter of `method`, `kind` and status `class`.
    pub fn request(&self, method: &str, kind: &str, class: &str) -> IntCounter {
        self.request_table.get(&[method, kind, class])
    }

    /// The `cache_lookups` counter of `result` and `kind`.
    pub fn cache_lookup(&self, result: &str, kind: &str) -> IntCounter {
        self.lookup_table.get(&[result, kind])
    }

    /// The `served_bytes` counter of `source`.
    pub fn served(&self, source: &str) -> IntCounter {
        self.served_table.get(&[source])
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The content type of [`Metrics::encode`]'s output.
    pub fn content_type() -> &'static str {
        "text/plain; version=0.0.4; charset=utf-8"
    }
}

/// The label values of the per-request counters, as the front uses them.
const METHODS: &[&str] = &["GET", "HEAD", "other"];
const REQUEST_KINDS: &[&str] = &[
    "manifest", "blob", "tags", "base", "catalog", "search", "other",
];
const STATUS_CLASSES: &[&str] = &["1xx", "2xx", "3xx", "4xx", "5xx"];
const LOOKUP_RESULTS: &[&str] = &["memory_hit", "disk_hit", "miss"];
const LOOKUP_KINDS: &[&str] = &["manifest", "blob"];
const SOURCES: &[&str] = &["memory", "disk", "upstream"];

/// The counters of a vector for every combination of known label values, each made on first
/// use (so /metrics shows only series that counted) and found by position afterwards. Values
/// outside the table go to the vector as usual.
struct CounterTable {
    vec: IntCounterVec,
    dims: Vec<&'static [&'static str]>,
    cells: Box<[OnceLock<IntCounter>]>,
}

impl CounterTable {
    fn new(vec: &IntCounterVec, dims: &[&'static [&'static str]]) -> Self {
        let size = dims.iter().map(|d| d.len()).product();
        CounterTable {
            vec: vec.clone(),
            dims: dims.to_vec(),
            cells: (0..size).map(|_| OnceLock::new()).collect(),
        }
    }

    fn get(&self, values: &[&str]) -> IntCounter {
        let mut cell = 0;
        for (dim, value) in self.dims.iter().zip(values) {
            match dim.iter().position(|v| v == value) {
                Some(i) => cell = cell * dim.len() + i,
                None => return self.vec.with_label_values(values),
            }
        }
        match self.cells.get(cell) {
            Some(c) if values.len() == self.dims.len() => {
                c.get_or_init(|| self.vec.with_label_values(values)).clone()
            }
            _ => self.vec.with_label_values(values),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_build_info_and_counters() {
        let m = Metrics::new();
        m.cache_lookups.with_label_values(&["miss", "blob"]).inc();
        let text = m.encode();
        assert!(text.contains("pier_build_info{version=\""), "{text}");
        assert!(
            text.contains("pier_cache_lookups_total{kind=\"blob\",result=\"miss\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn resolved_counters_are_the_vectors_series() {
        let m = Metrics::new();
        m.request("GET", "manifest", "2xx").inc();
        m.request("GET", "manifest", "2xx").inc();
        m.request("HEAD", "blob", "4xx").inc();
        // Outside the table: still counted, by the vector.
        m.request("GET", "unlisted", "2xx").inc();
        m.cache_lookup("disk_hit", "manifest").inc();
        m.served("disk").inc_by(7);
        let text = m.encode();
        for line in [
            "pier_http_requests_total{kind=\"manifest\",method=\"GET\",status=\"2xx\"} 2",
            "pier_http_requests_total{kind=\"blob\",method=\"HEAD\",status=\"4xx\"} 1",
            "pier_http_requests_total{kind=\"unlisted\",method=\"GET\",status=\"2xx\"} 1",
            "pier_cache_lookups_total{kind=\"manifest\",result=\"disk_hit\"} 1",
            "pier_served_bytes_total{source=\"disk\"} 7",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // Only what counted is shown: no series made ahead for the whole table.
        assert!(!text.contains("status=\"5xx\""), "{text}");
        assert_eq!(
            m.requests
                .with_label_values(&["GET", "manifest", "2xx"])
                .get(),
            2
        );
    }
}
