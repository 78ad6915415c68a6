//! What pier knows about an upstream's health: whether it is in an outage, and how much of its
//! pull budget (Docker Hub's rate limit) is left. Fed by every answer; read by the server to
//! decide whether to wait on the upstream or serve from the cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pier_metrics::Metrics;

use crate::error::UpstreamError;

/// How long an upstream counts as down after a failed request, unless it answers sooner.
pub const OUTAGE_HOLD: Duration = Duration::from_secs(10);

/// One upstream's health, as its answers show it.
pub(crate) struct Health {
    name: String,
    /// Set when a request failed for want of the upstream (unreachable, timeout, 5xx); cleared by
    /// the next answer. While set, cached tags are served without first waiting on the upstream.
    outage_until: Mutex<Option<Instant>>,
    /// Docker Hub's `ratelimit-remaining` as last seen; `u64::MAX` until seen.
    rate_limit_remaining: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Health {
    /// A healthy upstream with no known rate limit.
    pub(crate) fn new(name: String, metrics: Arc<Metrics>) -> Health {
        Health {
            name,
            outage_until: Mutex::new(None),
            rate_limit_remaining: AtomicU64::new(u64::MAX),
            metrics,
        }
    }

    /// Whether a request failed for want of the upstream within the last [`OUTAGE_HOLD`], with no
    /// answer since.
    pub(crate) fn in_outage(&self) -> bool {
        let until = *self.outage_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|u| Instant::now() < u)
    }

    /// Records how a request went: a retryable failure starts (or extends) an outage, anything
    /// else (an answer, even a 404) ends it.
    pub(crate) fn observe<T>(&self, result: &Result<T, UpstreamError>) {
        let outage = matches!(result, Err(e) if e.is_retryable());
        let mut until = self.outage_until.lock().unwrap_or_else(|p| p.into_inner());
        if outage {
            if until.is_none() {
                tracing::warn!(upstream = %self.name, "upstream unavailable");
            }
            *until = Some(Instant::now() + OUTAGE_HOLD);
        } else if until.take().is_some() {
            tracing::info!(upstream = %self.name, "upstream answering again");
        }
    }

    /// The pull budget the upstream reported last, if it ever did.
    pub(crate) fn rate_limit_remaining(&self) -> Option<u64> {
        Some(self.rate_limit_remaining.load(Ordering::Relaxed)).filter(|r| *r != u64::MAX)
    }

    /// Records the pull budget an answer reported.
    pub(crate) fn note_rate_limit(&self, remaining: u64) {
        // u64::MAX means "never seen"; an upstream claiming that much is as good as unlimited.
        let remaining = remaining.min(u64::MAX - 1);
        self.rate_limit_remaining
            .store(remaining, Ordering::Relaxed);
        self.metrics
            .rate_limit_remaining
            .with_label_values(&[&self.name])
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new("docker.io".into(), Arc::new(Metrics::new()))
    }

    #[test]
    fn retryable_failures_start_an_outage_and_answers_end_it() {
        let h = health();
        assert!(!h.in_outage());
        h.observe::<()>(&Err(UpstreamError::Transport("connection reset".into())));
        assert!(h.in_outage());
        // Any answer, even "not found", shows the upstream is back.
        h.observe::<()>(&Err(UpstreamError::NotFound));
        assert!(!h.in_outage());
        h.observe::<()>(&Err(UpstreamError::Status(503)));
        assert!(h.in_outage());
        h.observe(&Ok(()));
        assert!(!h.in_outage());
        // A refusal is an answer, not an outage.
        h.observe::<()>(&Err(UpstreamError::Unauthorized("HTTP 401".into())));
        assert!(!h.in_outage());
    }

    #[test]
    fn rate_limit_is_unknown_until_reported() {
        let h = health();
        assert_eq!(h.rate_limit_remaining(), None);
        h.note_rate_limit(76);
        assert_eq!(h.rate_limit_remaining(), Some(76));
        h.note_rate_limit(0);
        assert_eq!(h.rate_limit_remaining(), Some(0));
        h.note_rate_limit(u64::MAX);
        assert_eq!(h.rate_limit_remaining(), Some(u64::MAX - 1));
    }
}
