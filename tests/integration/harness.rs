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
        }
    }
}

pub struct Pier {
    pub url: String,
    pub mirror: Arc<Mirror>,
    pub dir: tempfile::TempDir,
    /// Dropping it stops the server.
    pub _stop: tokio::sync::oneshot::Sender<()>,
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
    let metrics = Arc::new(Metrics::new());
    let entries = upstreams
        .into_iter()
        .map(|u| {
            let client = Upstream::new(
                UpstreamConfig {
                    name: u.name.into(),
                    url: u.url,
                    credentials: u.credentials.map(|(user, pass)| Credentials {
                        username: user.into(),
                        password: pass.into(),
                    }),
                    ca_file: None,
                    connect_timeout: Duration::from_secs(2),
                    read_timeout: u.read_timeout,
                },
                metrics.clone(),
            )
            .expect("upstream client");
            let mut entry = UpstreamEntry::new(u.name, Arc::new(client));
            entry.tag_ttl = u.tag_ttl;
            entry.immutable_tags = u.immutable_tags;
            entry.rate_limit_reserve = u.rate_limit_reserve;
            entry.access =
                pier_server::RepositoryFilter::new(&u.allow, &u.deny).expect("valid globs");
            entry
        })
        .collect();
    let cache = Cache::open(
        CacheConfig {
            dir: dir.path().to_path_buf(),
            memory_size: memory.0,
            memory_object_size: memory.1,
            retry: RetryPolicy {
                attempts: 3,
                base_delay: Duration::from_millis(20),
            },
        },
        metrics.clone(),
    )
    .expect("open cache");
    let mirror = Arc::new(Mirror::new(entries, 0, Arc::new(cache), metrics));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind pier");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let m = mirror.clone();
    tokio::spawn(async move {
        let _ = pier_server::serve(
            listener,
            m,
            ServerOptions {
                metrics_on_main: true,
                ..ServerOptions::default()
            },
            async {
                let _ = stopped.await;
            },
        )
        .await;
    });
    Pier {
        url,
        mirror,
        dir,
        _stop: stop,
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
