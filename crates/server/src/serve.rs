//! The accept loop: HTTP/1.1 and HTTP/2 on one listener, an access log line per request, and a
//! graceful stop.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::handlers::{self, Outcome};
use crate::Mirror;

/// Connection limits of the front.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    /// Longest time to receive a request's headers (slow-loris protection).
    pub header_read_timeout: Duration,
    /// How long a stop waits for requests in flight.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves the registry API on `listener` until `shutdown` resolves, then lets requests in flight
/// finish (up to the grace period).
pub async fn serve(
    listener: TcpListener,
    mirror: Arc<Mirror>,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
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
        let _ = stream.set_nodelay(true);
        let mirror = mirror.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let mirror = mirror.clone();
            async move { Ok::<_, std::convert::Infallible>(logged(&mirror, req, peer).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => tracing::warn!("requests still in flight at shutdown"),
    }
    Ok(())
}

async fn logged(
    mirror: &Mirror,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> hyper::Response<crate::response::Body> {
    let started = Instant::now();
    let resp = handlers::handle(mirror, &req).await;
    let outcome = resp.extensions().get::<Outcome>().cloned();
    tracing::info!(
        target: "pier::access",
        method = %req.method(),
        path = %req.uri().path(),
        status = resp.status().as_u16(),
        bytes = resp.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).unwrap_or("-"),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        cache = outcome.as_ref().map_or("-", |o| o.cache),
        upstream = outcome.as_ref().and_then(|o| o.upstream.as_deref()).unwrap_or("-"),
        %peer,
    );
    resp
}
