//! What can go wrong talking to an upstream.

use std::fmt;

/// An upstream request that did not give what was asked. Messages never hold credentials or
/// tokens.
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
    RateLimited {
        /// The upstream's `Retry-After`, in seconds.
        retry_after: Option<u64>,
    },
    /// Any other unexpected status.
    #[error("upstream answered HTTP {0}")]
    Status(u16),
    /// Connection refused, reset, TLS failure, DNS, timeout: see [`TransportError::kind`].
    #[error("upstream unreachable: {0}")]
    Transport(TransportError),
    /// The upstream sent something that breaks the protocol (bad headers, oversized manifest, ...).
    #[error("invalid upstream response: {0}")]
    Invalid(String),
    /// The upstream's challenge names a token realm that the configured credentials must not go
    /// to: plain http on a host other than the upstream's. Nothing was sent there.
    #[error(
        "refusing to send credentials to token realm {realm:?}: not https and not the upstream's host"
    )]
    InsecureRealm {
        /// The realm as the challenge named it.
        realm: String,
    },
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

    /// The upstream did not answer in time (connect or read timeout): a gateway timeout rather
    /// than a refusal.
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Transport(t) if t.is_timeout())
    }

    /// Classifies a reqwest failure by what reqwest says it was, not by its message.
    pub(crate) fn from_reqwest(e: reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            TransportKind::Timeout
        } else if e.is_connect() {
            TransportKind::Connect
        } else {
            TransportKind::Other
        };
        // reqwest's Display names the URL; drop it anyway (no credentials are ever in our URLs,
        // but a token realm's query is not ours to log) and keep the chain of causes.
        let e = e.without_url();
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        UpstreamError::Transport(TransportError { kind, message })
    }
}

/// What kind of transport failure happened, for callers that answer them differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// No answer within the connect or read timeout.
    Timeout,
    /// The connection could not be made: refused, DNS, TLS handshake.
    Connect,
    /// Anything else: a connection reset, a body cut short.
    Other,
}

/// A transport failure: its [`TransportKind`] and a message for humans (never for matching).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportError {
    /// What kind of failure it was.
    pub kind: TransportKind,
    /// What happened, for logs and error bodies.
    pub message: String,
}

impl TransportError {
    /// A failure of the given kind.
    pub fn new(kind: TransportKind, message: impl Into<String>) -> Self {
        TransportError {
            kind,
            message: message.into(),
        }
    }

    /// Whether this was a timeout.
    pub fn is_timeout(&self) -> bool {
        self.kind == TransportKind::Timeout
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A message alone makes a failure of kind [`TransportKind::Other`], so that
/// `UpstreamError::Transport("connection reset".into())` reads as it always did.
impl From<&str> for TransportError {
    fn from(message: &str) -> Self {
        TransportError::new(TransportKind::Other, message)
    }
}

/// See the `From<&str>` impl.
impl From<String> for TransportError {
    fn from(message: String) -> Self {
        TransportError::new(TransportKind::Other, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_errors_keep_outage_and_retry_semantics() {
        let reset = UpstreamError::Transport("connection reset".into());
        assert!(reset.is_outage() && reset.is_retryable() && !reset.is_timeout());
        assert_eq!(reset.to_string(), "upstream unreachable: connection reset");
        let timeout = UpstreamError::Transport(TransportError::new(
            TransportKind::Timeout,
            "read timed out",
        ));
        assert!(timeout.is_outage() && timeout.is_retryable() && timeout.is_timeout());
        // A message that merely says "timed out" does not make a timeout.
        assert!(!UpstreamError::Transport("it timed out".into()).is_timeout());
    }

    #[test]
    fn insecure_realm_names_the_realm_and_is_not_an_outage() {
        let e = UpstreamError::InsecureRealm {
            realm: "http://other:1234/token".into(),
        };
        assert_eq!(
            e.to_string(),
            r#"refusing to send credentials to token realm "http://other:1234/token": not https and not the upstream's host"#
        );
        assert!(!e.is_outage() && !e.is_retryable() && !e.is_timeout());
    }
}

/// Why an upstream client could not be built from its configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// The URL does not parse, or is not http(s) with a host.
    #[error("invalid URL {url:?}: {message}")]
    Url { url: String, message: String },
    /// Credentials belong in `username` / `password`, where they are never logged.
    #[error("put credentials in username/password, not in the URL")]
    CredentialsInUrl,
    /// The extra CA file cannot be read or holds no PEM certificates.
    #[error("CA file {path}: {message}")]
    CaFile {
        path: std::path::PathBuf,
        message: String,
    },
    /// The HTTP client could not be built (TLS backend).
    #[error("cannot build HTTP client: {0}")]
    Client(String),
}
