//! The operations listener: `/metrics` for Prometheus, and health endpoints for probes.
//!
//! It is a separate listener (default 127.0.0.1:9090) so that metrics need not be exposed where
//! registry clients connect.

use std::future::Future;
use std::sync::Arc;

use http::{header, Response, StatusCode};
use pier_metrics::Metrics;
use tokio::net::TcpListener;

use crate::response::{self, Body};
use crate::serve::{accept_loop, ServerOptions};
use crate::Mirror;

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve_ops(
    listener: TcpListener,
    mirror: Arc<Mirror>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let handler = move |req: hyper::Request<hyper::body::Incoming>, _conn| {
        let mirror = mirror.clone();
        async move {
            match req.uri().path() {
                "/metrics" => metrics(&mirror).await,
                "/healthz" => health(&mirror, false).await,
                "/readyz" => health(&mirror, true).await,
                _ => plain(
                    StatusCode::NOT_FOUND,
                    "not found: try /metrics, /healthz or /readyz\n",
                ),
            }
        }
    };
    accept_loop(listener, &ServerOptions::default(), shutdown, handler).await
}

/// The metrics in Prometheus' text format.
pub(crate) async fn metrics(mirror: &Mirror) -> Response<Body> {
    mirror.cache.update_gauges().await;
    let text = mirror.metrics.encode();
    response::built(
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, Metrics::content_type())
            .header(header::CONTENT_LENGTH, text.len())
            .body(response::full(text)),
        false,
    )
}

/// Liveness: the process answers. Readiness: the cache directory takes writes.
pub(crate) async fn health(mirror: &Mirror, ready: bool) -> Response<Body> {
    if !ready {
        return plain(StatusCode::OK, "ok\n");
    }
    match mirror.cache.check_writable().await {
        Ok(()) => plain(StatusCode::OK, "ready\n"),
        Err(e) => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cache directory not writable: {e}\n"),
        ),
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    response::built(
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(response::full(text.to_string())),
        false,
    )
}
