//! The accept loops: HTTP/1.1 and HTTP/2 on one listener, an access log line and the request
//! metrics per request, and a graceful stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use pier_cache::Source;
use pier_oci::{ErrorCode, RegistryError};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::auth::{self, Auth};
use crate::handlers::{self, Caller, Outcome};
use crate::limits::{RateLimit, RateLimiter};
use crate::response::{self, Body};
use crate::tls::Tls;
use crate::{ops, sendfile, Mirror};

/// How the front serves connections, and the limits that keep strangers from exhausting it.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Longest time to receive a request's headers, and to finish a TLS handshake (slow-loris
    /// protection). It also bounds how long an idle keep-alive connection is kept.
    pub header_read_timeout: Duration,
    /// How long a stop waits for requests in flight.
    pub shutdown_grace: Duration,
    /// Also answer `/metrics` on the registry listener.
    pub metrics_on_main: bool,
    /// HTTPS; plain HTTP when `None`.
    pub tls: Option<Arc<Tls>>,
    /// Connections served at once; further ones are closed at once.
    pub max_connections: usize,
    /// Largest request head (request line and headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Requests per second per client address; 429 beyond.
    pub rate_limit: Option<RateLimit>,
    /// Client authentication; when `None`, every pull is anonymous and Authorization headers
    /// are ignored.
    pub auth: Option<Arc<Auth>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            header_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            metrics_on_main: false,
            tls: None,
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            rate_limit: None,
            auth: None,
        }
    }
}

/// What a request's connection tells its handler.
#[derive(Clone)]
pub(crate) struct Connection {
    /// The client's address.
    pub peer: SocketAddr,
    /// Sends file answers with `sendfile`: on plain HTTP/1 connections only.
    pub files: Option<sendfile::Files>,
}

/// Serves the registry API on `listener` until `shutdown` resolves, then lets requests in flight
/// finish (up to the grace period).
pub async fn serve(
    listener: TcpListener,
    mirror: Arc<Mirror>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let metrics_on_main = options.metrics_on_main;
    let limiter = options.rate_limit.map(|l| Arc::new(RateLimiter::new(l)));
    let (auth, tls) = (options.auth.clone(), options.tls.is_some());
    let handler = move |req: Request<Incoming>, conn: Connection| {
        let (mirror, limiter, auth) = (mirror.clone(), limiter.clone(), auth.clone());
        async move {
            // The per-address limit is for clients: a peer's address carries every miss of a
            // whole node, and a peer refused would fetch from the upstream itself.
            let from_peer = crate::region::is_peer_request(req.uri().path())
                && crate::region::carries_secret(&mirror, &req);
            if let Some(Err(wait)) = limiter
                .as_ref()
                .filter(|_| !from_peer)
                .map(|l| l.check(conn.peer.ip()))
            {
                let e =
                    RegistryError::new(ErrorCode::TooManyRequests, "request rate limit reached")
                        .with_retry_after(Some(wait));
                mirror
                    .metrics
                    .request(
                        method_label(req.method()),
                        path_kind(req.uri().path()),
                        "4xx",
                    )
                    .inc();
                return response::error(&e, req.method() == Method::HEAD);
            }
            // Peers of the region prove themselves with the region's secret, not as clients.
            // (The caller is not consulted for them.)
            // The Docker daemon pings before a search, and reads nothing from the answer but
            // whether the registry stands alone: no credentials needed.
            if req.uri().path() == "/v1/_ping" {
                return answer(&mirror, req, &Caller::Anyone, conn, metrics_on_main).await;
            }
            if crate::region::is_peer_request(req.uri().path()) {
                return answer(&mirror, req, &Caller::Anyone, conn, metrics_on_main).await;
            }
            let caller = match &auth {
                None => Caller::Anyone,
                Some(auth) => {
                    if req.uri().path() == "/auth/token" {
                        return auth::token_endpoint(auth, &mirror, &req).await;
                    }
                    match auth::gate(auth, &mirror, &req, tls).await {
                        Ok(who) => Caller::Identified { auth, who },
                        Err(refused) => {
                            mirror
                                .metrics
                                .request(
                                    method_label(req.method()),
                                    path_kind(req.uri().path()),
                                    "4xx",
                                )
                                .inc();
                            return *refused;
                        }
                    }
                }
            };
            answer(&mirror, req, &caller, conn, metrics_on_main).await
        }
    };
    accept_loop(listener, &options, shutdown, handler).await
}

/// The accept loop shared by every listener.
pub(crate) async fn accept_loop<H, F>(
    listener: TcpListener,
    options: &ServerOptions,
    shutdown: impl Future<Output = ()>,
    handler: H,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>, Connection) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Bodies reach the socket as the frames they are, never copied into one buffer: the
        // sendfile path recognises its placeholders by address.
        .writev(true)
        // A client that shuts its side after the request (`nc -N`, some scripts) still gets
        // the answer.
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(options.header_read_timeout)
        .keep_alive_timeout(options.header_read_timeout);
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(options.max_connections));
    let acceptor = options.tls.as_ref().map(|t| t.acceptor());
    let handshake_timeout = options.header_read_timeout;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing a new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let (builder, acceptor) = (builder.clone(), acceptor.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let result = match acceptor {
                None => {
                    // Plain TCP: HTTP/1 responses may send blob files with `sendfile`.
                    let (socket, files) = sendfile::Socket::new(stream);
                    let service = service_fn(move |req: Request<Incoming>| {
                        let conn = Connection {
                            peer,
                            files: (req.version() < Version::HTTP_2).then(|| files.clone()),
                        };
                        // Boxed once here: hyper moves the request's future around, and the
                        // handler's is large.
                        let response = Box::pin(handler(req, conn));
                        async move { Ok::<_, std::convert::Infallible>(response.await) }
                    });
                    watcher
                        .watch(
                            builder
                                .serve_connection(TokioIo::new(socket), service)
                                .into_owned(),
                        )
                        .await
                }
                Some(acceptor) => {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let conn = Connection { peer, files: None };
                        let response = Box::pin(handler(req, conn));
                        async move { Ok::<_, std::convert::Infallible>(response.await) }
                    });
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            watcher
                                .watch(
                                    builder
                                        .serve_connection(TokioIo::new(tls), service)
                                        .into_owned(),
                                )
                                .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(options.shutdown_grace) => tracing::warn!("requests still in flight at shutdown"),
    }
    Ok(())
}

/// Answers one request of the registry listener, then counts it and writes its access log line.
async fn answer(
    mirror: &Mirror,
    req: Request<Incoming>,
    caller: &Caller<'_>,
    conn: Connection,
    metrics_on_main: bool,
) -> Response<Body> {
    // The access log's duration; no clock read per request when that log is off.
    let started =
        tracing::enabled!(target: "pier::access", tracing::Level::INFO).then(Instant::now);
    if metrics_on_main && req.uri().path() == "/metrics" {
        return ops::metrics(mirror).await;
    }
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let resp = if crate::region::is_peer_request(uri.path()) {
        crate::region::answer(mirror, &req).await
    } else {
        handlers::handle(mirror, req, caller, conn.peer.ip()).await
    };
    let outcome = resp.extensions().get::<Outcome>().cloned();
    let method_name = method_label(&method);
    let kind = outcome
        .as_ref()
        .map_or_else(|| path_kind(uri.path()), |o| o.kind);
    let status = resp.status().as_u16();
    let class = match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    mirror.metrics.request(method_name, kind, class).inc();
    if let Some(o) = outcome.as_ref().filter(|o| o.kind != "tags") {
        let result = match o.source {
            Source::Memory => "memory_hit",
            Source::Disk => "disk_hit",
            Source::Upstream { .. } => "miss",
        };
        mirror.metrics.cache_lookup(result, o.kind).inc();
    }
    // Body bytes are counted as they leave, so that a client that leaves early counts less: a
    // file's by the socket as `sendfile` sends them, any other body's as hyper takes each
    // frame. A body with nothing to send (a HEAD) counts none, but shows its series.
    let served = outcome
        .as_ref()
        .map(|o| {
            mirror.metrics.served(match o.source {
                Source::Memory => "memory",
                Source::Disk => "disk",
                Source::Upstream { .. } => "upstream",
            })
        })
        .filter(|_| !hyper::body::Body::is_end_stream(resp.body()));
    let resp = match &conn.files {
        Some(files) => files.send(resp, served.clone()),
        None => resp,
    };
    let resp = match served {
        Some(served) => resp.map(|body| {
            body.map_frame(move |frame| {
                if let Some(data) = frame.data_ref().filter(|d| !sendfile::is_placeholder(d)) {
                    served.inc_by(data.len() as u64);
                }
                frame
            })
            .boxed_unsync()
        }),
        None => resp,
    };
    let Some(started) = started else {
        return resp;
    };
    tracing::info!(
        target: "pier::access",
        method = %method,
        path = %uri.path_and_query().map_or(uri.path(), |p| p.as_str()),
        status,
        bytes = resp.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).unwrap_or("-"),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        cache = outcome.as_ref().map_or("-", |o| o.source.as_str()),
        upstream = outcome.as_ref().and_then(|o| o.upstream.as_deref()).unwrap_or("-"),
        peer = %conn.peer,
    );
    resp
}

/// The `method` label: GET, HEAD or other (methods come from strangers: keep the label bounded).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

/// The `kind` label of a request no handler described.
fn path_kind(path: &str) -> &'static str {
    match path {
        "/v2" | "/v2/" => "base",
        "/v2/_catalog" => "catalog",
        "/v1/search" => "search",
        p if p.contains("/manifests/") => "manifest",
        p if p.contains("/blobs/") => "blob",
        p if p.ends_with("/tags/list") => "tags",
        _ => "other",
    }
}
