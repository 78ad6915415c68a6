//! The auth session with one upstream: the one place that holds its credentials, remembers which
//! scheme it challenged with, keeps its Bearer tokens and decides what `Authorization` a request
//! carries.
//!
//! The flow, per request: send what [`AuthSession::up_front`] gives (nothing until the upstream
//! has challenged once); on a 401, ask [`AuthSession::answer`] for what to retry with, and retry
//! once. A Bearer token the upstream refused is dropped before a new one is fetched, so a rotated
//! signing key costs one token fetch rather than every pull until the old token expires.

mod challenge;
mod realm;
mod tokens;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use pier_metrics::Metrics;
use pier_oci::RepositoryName;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url};

pub use challenge::Challenge;
use realm::token_endpoint;
use tokens::{TokenKey, Tokens};

use crate::error::UpstreamError;
use crate::wire;

/// Username and password for an upstream. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The account name.
    pub username: String,
    /// The password or access token; only ever sent as Basic to the upstream or its token realm.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ username: {:?}, password: <redacted> }}",
            self.username
        )
    }
}

/// An `Authorization` value and where it came from, so that a refused one can be forgotten.
/// Deliberately not `Debug`: it holds a secret.
pub(crate) enum Authorization {
    /// The configured credentials.
    Basic(HeaderValue),
    /// A token from the cache under `key`.
    Bearer {
        key: TokenKey,
        token: String,
        value: HeaderValue,
    },
}

impl Authorization {
    /// The header value to send (marked sensitive).
    pub(crate) fn header_value(&self) -> &HeaderValue {
        match self {
            Authorization::Basic(v) => v,
            Authorization::Bearer { value, .. } => value,
        }
    }
}

/// The token endpoint's answer.
#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Everything pier knows about authenticating to one upstream.
pub(crate) struct AuthSession {
    name: String,
    /// The configured upstream URL: the origin credentials were configured for.
    upstream: Url,
    credentials: Option<Credentials>,
    http: reqwest::Client,
    /// The scheme this upstream challenged with last, so the next request authenticates up front
    /// instead of collecting a 401 first.
    scheme: Mutex<Option<Challenge>>,
    tokens: Tokens,
    metrics: Arc<Metrics>,
}

impl AuthSession {
    /// A session that has not been challenged yet.
    pub(crate) fn new(
        name: String,
        upstream: Url,
        credentials: Option<Credentials>,
        http: reqwest::Client,
        metrics: Arc<Metrics>,
    ) -> AuthSession {
        AuthSession {
            name,
            upstream,
            credentials,
            http,
            scheme: Mutex::new(None),
            tokens: Tokens::default(),
            metrics,
        }
    }

    /// What to send with a first attempt at a request for `repo`: an answer to the scheme the
    /// upstream challenged with last (a cached or new token, or Basic), or nothing before any
    /// challenge.
    pub(crate) async fn up_front(
        &self,
        repo: &RepositoryName,
    ) -> Result<Option<Authorization>, UpstreamError> {
        let known = self
            .scheme
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match known {
            Some(challenge) => self.authorization(&challenge, repo).await,
            None => Ok(None),
        }
    }

    /// Answers a 401 on a request for `repo` that carried `rejected`: what to send on the one
    /// retry, or `None` when there is nothing new to offer (the 401 stands).
    pub(crate) async fn answer(
        &self,
        headers: &HeaderMap,
        repo: &RepositoryName,
        rejected: Option<&Authorization>,
    ) -> Result<Option<Authorization>, UpstreamError> {
        let challenge = headers
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(Challenge::parse)
            .ok_or_else(|| UpstreamError::Unauthorized("401 without a usable challenge".into()))?;
        // The upstream refused this token (a rotated signing key, a revocation): never hand it
        // out again, whatever its expiry says.
        if let Some(Authorization::Bearer { key, token, .. }) = rejected {
            self.tokens.discard(key, token);
        }
        let auth = self.authorization(&challenge, repo).await?.ok_or_else(|| {
            UpstreamError::Unauthorized(
                "upstream asks for credentials and none are configured".into(),
            )
        })?;
        *self.scheme.lock().unwrap_or_else(|p| p.into_inner()) = Some(challenge);
        // The very value just refused would only be refused again.
        if rejected.is_some_and(|r| r.header_value() == auth.header_value()) {
            return Ok(None);
        }
        Ok(Some(auth))
    }

    /// The `Authorization` answering `challenge` for `repo`: a cached or new token, or Basic
    /// (`None` when Basic is asked for and no credentials are configured).
    async fn authorization(
        &self,
        challenge: &Challenge,
        repo: &RepositoryName,
    ) -> Result<Option<Authorization>, UpstreamError> {
        let (realm, service) = match challenge {
            Challenge::Basic => return Ok(self.credentials.as_ref().map(basic)),
            Challenge::Bearer { realm, service, .. } => (realm, service),
        };
        // Checked before the cache, so a refused realm fails every time, not only the first.
        let endpoint = token_endpoint(realm, &self.upstream, self.credentials.is_some())?;
        // Pier only pulls, and asks for exactly that, whatever scope the challenge named.
        let key = TokenKey {
            realm: realm.clone(),
            service: service.clone(),
            scope: format!("repository:{repo}:pull"),
        };
        let token = self
            .tokens
            .get_or_fetch(&key, || self.fetch_token(endpoint, &key))
            .await?;
        let value = bearer(&token)?;
        Ok(Some(Authorization::Bearer { key, token, value }))
    }

    /// One request to the token endpoint, counted and logged (never the token).
    async fn fetch_token(
        &self,
        endpoint: Url,
        key: &TokenKey,
    ) -> Result<(String, Duration), UpstreamError> {
        let result = self.request_token(endpoint, key).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .token_fetches
            .with_label_values(&[&self.name, outcome])
            .inc();
        match &result {
            Ok(_) => {
                tracing::debug!(upstream = %self.name, scope = %key.scope, "fetched upstream token")
            }
            Err(e) => tracing::warn!(upstream = %self.name, error = %e, "token fetch failed"),
        }
        result
    }

    async fn request_token(
        &self,
        mut endpoint: Url,
        key: &TokenKey,
    ) -> Result<(String, Duration), UpstreamError> {
        {
            let mut q = endpoint.query_pairs_mut();
            if let Some(s) = &key.service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", &key.scope);
        }
        let mut req = self.http.get(endpoint);
        if let Some(c) = &self.credentials {
            req = req.header(header::AUTHORIZATION, basic_value(c));
        }
        let resp = req.send().await.map_err(UpstreamError::from_reqwest)?;
        match resp.status() {
            s if s.is_success() => {}
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                return Err(UpstreamError::Unauthorized(format!(
                    "token endpoint answered {}",
                    s.as_u16()
                )))
            }
            s => wire::check_status(s, resp.headers())?,
        }
        let body: TokenResponse = resp.json().await.map_err(|_| {
            UpstreamError::Invalid("token endpoint answered something other than token JSON".into())
        })?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                UpstreamError::Invalid("token endpoint answered without a token".into())
            })?;
        // Refuse it here rather than cache something no request can carry.
        bearer(&token)?;
        // The spec's default lifetime is 60 s when expires_in is missing.
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
        Ok((token, lifetime))
    }
}

/// `Bearer <token>`, marked sensitive so that it is never logged.
fn bearer(token: &str) -> Result<HeaderValue, UpstreamError> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| UpstreamError::Invalid("token endpoint returned an unusable token".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

fn basic(c: &Credentials) -> Authorization {
    Authorization::Basic(basic_value(c))
}

/// `Basic base64(user:password)`, marked sensitive so that it is never logged.
fn basic_value(c: &Credentials) -> HeaderValue {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
    // Base64 is always a valid header value; the fallback only keeps this free of unwrap.
    let mut v = HeaderValue::from_str(&format!("Basic {encoded}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    v.set_sensitive(true);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_is_standard_base64_and_sensitive() {
        let v = basic_value(&Credentials {
            username: "user".into(),
            password: "pass".into(),
        });
        assert_eq!(v, "Basic dXNlcjpwYXNz");
        assert!(v.is_sensitive());
        let v = basic_value(&Credentials {
            username: "a".into(),
            password: "".into(),
        });
        assert_eq!(v, "Basic YTo=");
    }

    #[test]
    fn bearer_refuses_tokens_that_cannot_be_a_header() {
        assert!(bearer("abc.def").is_ok_and(|v| v.is_sensitive()));
        assert!(matches!(
            bearer("line\nbreak"),
            Err(UpstreamError::Invalid(_))
        ));
    }

    #[test]
    fn credentials_debug_is_redacted() {
        let c = Credentials {
            username: "u".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
