//! pier in-process, wired the way the binary wires it, on a loopback port.

use std::sync::Arc;
use std::time::Duration;

use pier_cache::{Cache, CacheConfig, RetryPolicy};
use pier_metrics::Metrics;
use pier_server::{Mirror, ServerOptions, UpstreamEntry};
use pier_upstream::{Credentials, Upstream, UpstreamConfig};

/// One upstream as a test configures it.
pub struct UpstreamSpec {
    pub name: &'static str,
    pub url: String,
    pub credentials: Option<(&'static str, &'static str)>,
    pub tag_ttl: Duration,
    pub read_timeout: Duration,
    pub immutable_tags: Option<regex::Regex>,
    pub rate_limit_reserve: u64,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    /// Its search endpoint (`upstreams[].search_url`) and how long to wait for it.
    pub search_url: Option<String>,
    pub search_timeout: Duration,
}

impl UpstreamSpec {
    pub fn new(name: &'static str, url: String) -> Self {
        UpstreamSpec {
            name,
            url,
            credentials: None,
            tag_ttl: Duration::from_secs(300),
            read_timeout: Duration::from_secs(5),
            immutable_tags: None,
            rate_limit_reserve: 10,
            allow: Vec::new(),
            deny: Vec::new(),
            search_url: None,
            search_timeout: Duration::from_secs(3),
        }
    }
}

pub struct Pier {
    pub url: String,
    /// The admin API.
    pub admin: String,
    pub mirror: Arc<Mirror>,
    pub dir: tempfile::TempDir,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    maintenance: tokio::task::JoinHandle<()>,
}

impl Pier {
    /// Stops the listeners and the maintenance task, waits until the cache directory is free,
    /// and hands it back.
    pub async fn stop(self) -> tempfile::TempDir {
        let Pier {
            stop,
            tasks,
            maintenance,
            dir,
            mirror,
            ..
        } = self;
        let _ = stop.send(true);
        for t in tasks {
            let _ = t.await;
        }
        maintenance.abort();
        let _ = maintenance.await;
        // Connection tasks let go of the mirror a moment after the listener stops, and fills in
        // progress hold the cache until they finish.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (Arc::strong_count(&mirror) > 1 || Arc::strong_count(&mirror.cache) > 1)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(mirror);
        dir
    }
}

/// Starts pier with these upstreams (the first is the default) and memory tier settings.
pub async fn start(upstreams: Vec<UpstreamSpec>, memory: (u64, u64)) -> Pier {
    let dir = tempfile::tempdir().expect("tempdir");
    start_in(upstreams, memory, dir).await
}

pub async fn start_in(
    upstreams: Vec<UpstreamSpec>,
    memory: (u64, u64),
    dir: tempfile::TempDir,
) -> Pier {
    start_with(upstreams, memory, pier_cache::Budget::default(), dir).await
}

/// Starts pier with a disk budget, in `dir`.
pub async fn start_with(
    upstreams: Vec<UpstreamSpec>,
    memory: (u64, u64),
    budget: pier_cache::Budget,
    dir: tempfile::TempDir,
) -> Pier {
    launch(Setup {
        upstreams,
        memory,
        budget,
        ..Setup::new(dir)
    })
    .await
}

/// Everything a test may set.
pub struct Setup {
    pub upstreams: Vec<UpstreamSpec>,
    pub memory: (u64, u64),
    pub budget: pier_cache::Budget,
    pub dir: tempfile::TempDir,
    pub options: ServerOptions,
    pub max_concurrent_fills: usize,
    pub max_queued_fills: usize,
    /// Hosted content's budget and upload expiry.
    pub hosted: pier_cache::HostedConfig,
    /// Hosted repository globs, and whether anonymous clients may push.
    pub hosted_repositories: Vec<String>,
    pub allow_anonymous_push: bool,
    /// Makes the node part of a region (given the node's metrics).
    pub region: Option<RegionMaker>,
    /// A listener bound beforehand (a region's nodes must know each other's addresses).
    pub listener: Option<tokio::net::TcpListener>,
}

/// Builds a node's region from its metrics.
pub type RegionMaker = Box<dyn FnOnce(Arc<Metrics>) -> pier_cache::region::Region + Send>;

impl Setup {
    pub fn new(dir: tempfile::TempDir) -> Self {
        Setup {
            upstreams: Vec::new(),
            memory: (0, 0),
            budget: pier_cache::Budget::default(),
            dir,
            options: ServerOptions {
                metrics_on_main: true,
                ..ServerOptions::default()
            },
            max_concurrent_fills: 0,
            max_queued_fills: 0,
            hosted: pier_cache::HostedConfig::default(),
            hosted_repositories: Vec::new(),
            allow_anonymous_push: false,
            region: None,
            listener: None,
        }
    }
}

pub async fn launch(setup: Setup) -> Pier {
    let Setup {
        upstreams,
        memory,
        budget,
        dir,
        options,
        max_concurrent_fills,
        max_queued_fills,
        hosted,
        hosted_repositories,
        allow_anonymous_push,
        region,
        listener,
    } = setup;
    let metrics = Arc::new(Metrics::new());
    let entries = upstreams
        .into_iter()
        .map(|u| {
            let config = UpstreamConfig {
                name: u.name.into(),
                url: u.url,
                credentials: u.credentials.map(|(user, pass)| Credentials {
                    username: user.into(),
                    password: pass.into(),
                }),
                ca_file: None,
                connect_timeout: Duration::from_secs(2),
                read_timeout: u.read_timeout,
            };
            let client = Upstream::new(config, metrics.clone()).expect("upstream client");
            let mut entry = UpstreamEntry::new(u.name, Arc::new(client));
            entry.freshness.tag_ttl = u.tag_ttl;
            entry.freshness.immutable_tags = u.immutable_tags;
            entry.freshness.rate_limit_reserve = u.rate_limit_reserve;
            entry.access =
                pier_server::RepositoryFilter::new(&u.allow, &u.deny).expect("valid globs");
            entry.search = u.search_url.map(|url| {
                Arc::new(
                    pier_upstream::SearchEndpoint::new(
                        u.name,
                        &url,
                        None,
                        u.search_timeout,
                        metrics.clone(),
                    )
                    .expect("search endpoint"),
                )
            });
            entry
        })
        .collect();
    let cache_config = CacheConfig {
        dir: dir.path().to_path_buf(),
        memory_size: memory.0,
        memory_object_size: memory.1,
        retry: RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(20),
        },
        budget,
        max_concurrent_fills,
        max_queued_fills,
        hosted,
    };
    let mut cache = Cache::open(cache_config, metrics.clone()).expect("open cache");
    if let Some(make) = region {
        let region = Arc::new(make(metrics.clone()));
        region.start().await;
        cache = cache.with_region(region);
    }
    let cache = Arc::new(cache);
    let hosted_repositories =
        pier_server::HostedRepositories::new(&hosted_repositories, allow_anonymous_push)
            .expect("valid hosted globs");
    let mirror =
        Arc::new(Mirror::new(entries, 0, cache.clone(), metrics).with_hosted(hosted_repositories));
    let listener = match listener {
        Some(l) => l,
        None => tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind pier"),
    };
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind admin");
    let admin = format!("http://{}", admin_listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (m, rx) = (mirror.clone(), stopped.clone());
    let server = tokio::spawn(async move {
        let _ = pier_server::serve(listener, m, options, until(rx)).await;
    });
    let (m, rx) = (mirror.clone(), stopped);
    let admin_task = tokio::spawn(async move {
        let _ = pier_server::serve_admin(admin_listener, m, until(rx)).await;
    });
    // Only woken by fills past the high watermark in tests.
    let maintenance = tokio::spawn(cache.run_maintenance(Duration::from_secs(3600)));
    Pier {
        url,
        admin,
        mirror,
        dir,
        stop,
        tasks: vec![server, admin_task],
        maintenance,
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// The `code` of the first error in a registry JSON error body.
pub async fn error_code(resp: reqwest::Response) -> String {
    let v: serde_json::Value = resp.json().await.expect("JSON error body");
    v["errors"][0]["code"]
        .as_str()
        .expect("errors[0].code")
        .to_string()
}

/// A GET sent as raw bytes, so that no client library normalises the path (`..`, `%2e`).
pub async fn raw_get(base_url: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base_url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits (up to 5 s) until the blob is committed to pier's store: clients finish once the bytes
/// verified, a moment before the commit.
pub async fn wait_stored(pier: &Pier, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    let path = pier
        .dir
        .path()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    for _ in 0..500 {
        if path.exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Waits (up to 5 s) until no fill is in flight: every download committed or failed.
pub async fn settle(pier: &Pier) {
    for _ in 0..500 {
        if pier.mirror.metrics.fills_in_flight.get() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fills still in flight after 5 s");
}

/// The pier binary, ready to `serve` on a free loopback port with `args` after it; the caller
/// adds the environment and output it wants. Returns the command and the registry address.
pub fn pier_binary(args: &[&str]) -> (std::process::Command, std::net::SocketAddr) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pier"));
    cmd.args(["serve", "--listen", &addr.to_string()])
        .args(args);
    (cmd, addr)
}
