//! What can go wrong talking to an upstream.

/// An upstream request that did not give what was asked. Messages never hold credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// 404: the repository, tag or digest does not exist upstream.
    #[error("not found upstream")]
    NotFound,
    /// 401/403 even after answering the challenge.
    #[error("upstream refused access: {0}")]
    Unauthorized(String),
    /// 429, with the seconds of `Retry-After` when given.
    #[error("upstream rate limit reached")]
    RateLimited { retry_after: Option<u64> },
    /// Any other unexpected status.
    #[error("upstream answered HTTP {0}")]
    Status(u16),
    /// Connection refused, reset, TLS failure, DNS, timeout.
    #[error("upstream unreachable: {0}")]
    Transport(String),
    /// The upstream sent something that breaks the protocol (bad headers, oversized manifest, ...).
    #[error("invalid upstream response: {0}")]
    Invalid(String),
}

impl UpstreamError {
    /// An outage, as opposed to an answer: the object may well exist, the upstream just could not
    /// say so now. Cached content may be served in its place.
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Transport(_) | UpstreamError::RateLimited { .. } => true,
            UpstreamError::Status(s) => *s >= 500,
            _ => false,
        }
    }

    /// Worth retrying the same request (after a pause): the connection broke or the server erred.
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Transport(_) => true,
            UpstreamError::Status(s) => *s >= 500,
            _ => false,
        }
    }

    pub(crate) fn from_reqwest(e: reqwest::Error) -> Self {
        // reqwest's Display names the URL (no credentials are ever in our URLs) and the cause.
        let e = e.without_url();
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        UpstreamError::Transport(msg)
    }
}
