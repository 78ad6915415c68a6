//! Client authentication, for mirrors that serve only their own users.
//!
//! Users live in an htpasswd file (bcrypt hashes, as `htpasswd -B` writes them). A client may send
//! them as Basic credentials on every request, or follow the registry token flow: pier answers 401
//! with `WWW-Authenticate: Bearer realm="<pier>/auth/token",service="pier",scope=...`, the client
//! gets a short-lived token from `/auth/token` with its credentials, and sends it as Bearer. Tokens
//! are HMAC-SHA256 signed with a key drawn at start (a restart invalidates them; clients just ask
//! again) and name the repositories they were granted. Per-user rules limit what each user may
//! pull; anonymous pulls can be allowed.
//!
//! With authentication off (no `auth` section), pier ignores any Authorization header: the Docker
//! daemon offers its Docker Hub credentials to a mirror that never asked for them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::{Digest as _, Sha256};

/// How clients authenticate.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// htpasswd file with bcrypt entries.
    pub htpasswd: PathBuf,
    /// Pulls without credentials allowed.
    pub anonymous: bool,
    /// Lifetime of issued tokens.
    pub token_ttl: Duration,
    /// Per user, the `<registry>/<repository>` globs they may pull; users not listed may pull
    /// anything the upstream's own allow/deny lists permit.
    pub rules: HashMap<String, Vec<String>>,
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    User(String),
}

impl Identity {
    fn name(&self) -> &str {
        match self {
            Identity::Anonymous => "",
            Identity::User(u) => u,
        }
    }
}

/// What a request's credentials established.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// Nothing sent.
    None,
    /// Valid Basic credentials: any repository the user's rules allow.
    User(Identity),
    /// A valid token: the repositories (as the client named them) it was issued for.
    Token {
        who: Identity,
        repositories: Vec<String>,
    },
    /// Credentials that did not check out.
    Invalid,
}

type HmacSha256 = Hmac<Sha256>;

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    repos: Vec<String>,
}

/// The loaded users and the token key.
pub struct Auth {
    users: HashMap<String, String>,
    anonymous: bool,
    token_ttl: Duration,
    rules: HashMap<String, GlobSet>,
    key: [u8; 32],
    /// Basic credentials that verified recently: bcrypt is slow on purpose, pulls make many
    /// requests. Keyed by a hash of user and password.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("users", &self.users.len())
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

/// How long a verified password is remembered.
const VERIFIED_FOR: Duration = Duration::from_secs(300);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn parse_htpasswd(path: &Path) -> Result<HashMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("{} line {}: expected user:hash", path.display(), i + 1))?;
        if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
            return Err(format!(
                "{} line {}: user {user:?} has no bcrypt hash (create entries with htpasswd -B)",
                path.display(),
                i + 1
            ));
        }
        users.insert(user.to_string(), hash.to_string());
    }
    Ok(users)
}

impl Auth {
    /// Loads the htpasswd file and compiles the rules; errors name the problem.
    pub fn load(config: &AuthConfig) -> Result<Auth, String> {
        let users = parse_htpasswd(&config.htpasswd)?;
        let mut rules = HashMap::new();
        for (user, patterns) in &config.rules {
            let mut b = GlobSetBuilder::new();
            for p in patterns {
                b.add(
                    GlobBuilder::new(p)
                        .literal_separator(true)
                        .build()
                        .map_err(|e| format!("rule for {user}: {p:?} is not a glob: {e}"))?,
                );
            }
            rules.insert(user.clone(), b.build().map_err(|e| e.to_string())?);
        }
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| format!("no randomness for the token key: {e}"))?;
        Ok(Auth {
            users,
            anonymous: config.anonymous,
            token_ttl: config.token_ttl,
            rules,
            key,
            verified: Mutex::new(HashMap::new()),
        })
    }

    pub fn anonymous_allowed(&self) -> bool {
        self.anonymous
    }

    /// Checks a user's password against the htpasswd entry.
    fn check_password(&self, user: &str, password: &str) -> bool {
        let Some(hash) = self.users.get(user) else {
            return false;
        };
        let mut h = Sha256::new();
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        let fingerprint: [u8; 32] = h.finalize().into();
        {
            let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if verified
                .get(&fingerprint)
                .is_some_and(|at| at.elapsed() < VERIFIED_FOR)
            {
                return true;
            }
        }
        let ok = bcrypt::verify(password, hash).unwrap_or(false);
        if ok {
            let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if verified.len() > 10_000 {
                verified.retain(|_, at| at.elapsed() < VERIFIED_FOR);
            }
            verified.insert(fingerprint, Instant::now());
        }
        ok
    }

    /// What the request's `Authorization` header establishes.
    pub fn credentials(&self, headers: &HeaderMap) -> Credentials {
        let Some(value) = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Credentials::None;
        };
        if let Some(b64) = value
            .strip_prefix("Basic ")
            .or_else(|| value.strip_prefix("basic "))
        {
            let decoded = STANDARD
                .decode(b64.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok());
            return match decoded.as_deref().and_then(|d| d.split_once(':')) {
                Some((user, pass)) if self.check_password(user, pass) => {
                    Credentials::User(Identity::User(user.to_string()))
                }
                _ => Credentials::Invalid,
            };
        }
        if let Some(token) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        {
            return match self.verify_token(token.trim()) {
                Some(c) => Credentials::Token {
                    who: if c.sub.is_empty() {
                        Identity::Anonymous
                    } else {
                        Identity::User(c.sub)
                    },
                    repositories: c.repos,
                },
                None => Credentials::Invalid,
            };
        }
        Credentials::Invalid
    }

    /// Whether `who` may pull `<registry>/<repository>`.
    pub fn may_pull(&self, who: &Identity, registry: &str, repository: &str) -> bool {
        match self.rules.get(who.name()) {
            Some(globs) => globs.is_match(format!("{registry}/{repository}")),
            None => true,
        }
    }

    /// A signed token for `who`, naming `repositories`.
    pub fn issue_token(&self, who: &Identity, repositories: Vec<String>) -> (String, u64) {
        let claims = Claims {
            sub: who.name().to_string(),
            exp: now_secs() + self.token_ttl.as_secs(),
            repos: repositories,
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signature = URL_SAFE_NO_PAD.encode(self.sign(payload.as_bytes()));
        (format!("{payload}.{signature}"), self.token_ttl.as_secs())
    }

    fn sign(&self, data: &[u8]) -> Vec<u8> {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(data);
        mac.finalize().into_bytes().to_vec()
    }

    fn verify_token(&self, token: &str) -> Option<Claims> {
        let (payload, signature) = token.split_once('.')?;
        let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
        let mut mac = HmacSha256::new_from_slice(&self.key).ok()?;
        mac.update(payload.as_bytes());
        mac.verify_slice(&signature).ok()?;
        let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        (claims.exp > now_secs()).then_some(claims)
    }
}

/// Repository names a token request's `scope` parameters ask to pull
/// (`repository:<name>:pull`, repeated or space-separated).
pub fn requested_repositories(query: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("scope="))
        .flat_map(|v| {
            let v = v
                .replace("%3A", ":")
                .replace("%3a", ":")
                .replace("%2F", "/")
                .replace("%2f", "/")
                .replace('+', " ")
                .replace("%20", " ");
            v.split(' ').map(str::to_string).collect::<Vec<_>>()
        })
        .filter_map(|s| {
            let rest = s.strip_prefix("repository:")?;
            let (name, actions) = rest.rsplit_once(':')?;
            actions
                .split(',')
                .any(|a| a == "pull" || a == "*")
                .then(|| name.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(anonymous: bool) -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("secret", 4).unwrap();
        std::fs::write(
            dir.path().join("htpasswd"),
            format!("# users\nalice:{hash}\nbob:{hash}\n"),
        )
        .unwrap();
        let config = AuthConfig {
            htpasswd: dir.path().join("htpasswd"),
            anonymous,
            token_ttl: Duration::from_secs(60),
            rules: [("bob".to_string(), vec!["ghcr.io/bob/**".to_string()])].into(),
        };
        let a = Auth::load(&config).unwrap();
        (dir, a)
    }

    fn basic(user: &str, pass: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")))
                .parse()
                .unwrap(),
        );
        h
    }

    #[test]
    fn basic_credentials() {
        let (_d, a) = auth(false);
        assert!(
            matches!(a.credentials(&basic("alice", "secret")), Credentials::User(Identity::User(u)) if u == "alice")
        );
        assert!(matches!(
            a.credentials(&basic("alice", "wrong")),
            Credentials::Invalid
        ));
        assert!(matches!(
            a.credentials(&basic("mallory", "secret")),
            Credentials::Invalid
        ));
        assert!(matches!(
            a.credentials(&HeaderMap::new()),
            Credentials::None
        ));
    }

    #[test]
    fn tokens_are_signed_and_expire() {
        let (_d, a) = auth(false);
        let (token, _) = a.issue_token(
            &Identity::User("alice".into()),
            vec!["library/nginx".into()],
        );
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        assert!(
            matches!(a.credentials(&h), Credentials::Token { repositories, .. } if repositories == ["library/nginx"])
        );
        // Tampered payload: signature fails.
        let (payload, sig) = token.split_once('.').unwrap();
        let forged_claims = Claims {
            sub: "alice".into(),
            exp: now_secs() + 60,
            repos: vec!["*".into()],
        };
        let forged = format!(
            "{}.{sig}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged_claims).unwrap())
        );
        assert_ne!(payload, forged.split_once('.').unwrap().0);
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {forged}").parse().unwrap(),
        );
        assert!(matches!(a.credentials(&h), Credentials::Invalid));
        // Expired.
        let expired = Claims {
            sub: "alice".into(),
            exp: now_secs() - 1,
            repos: vec![],
        };
        let p = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&expired).unwrap());
        let t = format!("{p}.{}", URL_SAFE_NO_PAD.encode(a.sign(p.as_bytes())));
        assert!(a.verify_token(&t).is_none());
    }

    #[test]
    fn rules_and_scopes() {
        let (_d, a) = auth(true);
        assert!(a.may_pull(
            &Identity::User("alice".into()),
            "docker.io",
            "library/nginx"
        ));
        assert!(a.may_pull(&Identity::User("bob".into()), "ghcr.io", "bob/app"));
        assert!(!a.may_pull(&Identity::User("bob".into()), "docker.io", "library/nginx"));
        assert_eq!(
            requested_repositories("service=pier&scope=repository%3Alibrary%2Fnginx%3Apull&scope=repository:ghcr.io/o/a:pull,push&scope=repository:x:push"),
            vec!["library/nginx".to_string(), "ghcr.io/o/a".to_string()]
        );
    }

    #[test]
    fn htpasswd_without_bcrypt_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("h"), "carol:$apr1$abc$def\n").unwrap();
        let err = parse_htpasswd(&dir.path().join("h")).unwrap_err();
        assert!(err.contains("bcrypt") && err.contains("line 1"), "{err}");
    }
}

// ---- the HTTP side: challenges, the gate in front of the handlers, the token endpoint ----

use http::{header, Request, Response};
use pier_oci::{Endpoint, ErrorCode, RegistryError};

use crate::response::{self, Body};
use crate::Mirror;

/// The repository a registry request is about, as the client named it (`None` for `/v2/`, the
/// catalog, and paths that are not registry requests).
fn requested_name(path: &str) -> Option<String> {
    match Endpoint::parse(path).ok()? {
        Endpoint::Manifest { name, .. }
        | Endpoint::Blob { name, .. }
        | Endpoint::Referrers { name, .. }
        | Endpoint::TagsList { name } => Some(name),
        _ => None,
    }
}

fn realm<B>(req: &Request<B>, tls: bool) -> String {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".into());
    // The Host header comes from the client; keep only what can be part of a host[:port].
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(*c))
        .collect();
    format!("{}://{host}/auth/token", if tls { "https" } else { "http" })
}

fn challenge<B>(req: &Request<B>, tls: bool, name: Option<&str>, message: &str) -> Response<Body> {
    let head = req.method() == http::Method::HEAD;
    let mut resp = response::error(&RegistryError::new(ErrorCode::Unauthorized, message), head);
    let mut value = format!("Bearer realm=\"{}\",service=\"pier\"", realm(req, tls));
    if let Some(n) = name {
        value.push_str(&format!(",scope=\"repository:{n}:pull\""));
    }
    if let Ok(v) = value.parse() {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// Whether `who` may pull the repository a client named `name` (routed as the handlers would).
fn permitted(
    auth: &Auth,
    mirror: &Mirror,
    who: &Identity,
    name: &str,
    query: Option<&str>,
) -> bool {
    match mirror.route(name, query) {
        Ok(route) => auth.may_pull(who, &route.upstream.name, route.repo.as_str()),
        // A name that does not route gets its error from the handlers.
        Err(_) => true,
    }
}

/// The gate in front of the registry handlers: `Ok` lets the request through as that identity,
/// `Err` is the answer (401 with a challenge, or 403).
pub(crate) fn gate<B>(
    auth: &Auth,
    mirror: &Mirror,
    req: &Request<B>,
    tls: bool,
) -> Result<Identity, Box<Response<Body>>> {
    let name = requested_name(req.uri().path());
    let query = req.uri().query();
    let denied = |n: &str| {
        let e = RegistryError::new(
            ErrorCode::Denied,
            format!("you may not pull {n} through this mirror"),
        );
        Err(Box::new(response::error(
            &e,
            req.method() == http::Method::HEAD,
        )))
    };
    match auth.credentials(req.headers()) {
        Credentials::Invalid => Err(Box::new(challenge(
            req,
            tls,
            name.as_deref(),
            "invalid credentials",
        ))),
        Credentials::None if !auth.anonymous_allowed() => Err(Box::new(challenge(
            req,
            tls,
            name.as_deref(),
            "authentication required",
        ))),
        Credentials::None => match name {
            Some(n) if !permitted(auth, mirror, &Identity::Anonymous, &n, query) => {
                Err(Box::new(challenge(
                    req,
                    tls,
                    Some(&n),
                    "authentication required for this repository",
                )))
            }
            _ => Ok(Identity::Anonymous),
        },
        Credentials::User(who) => match name {
            Some(n) if !permitted(auth, mirror, &who, &n, query) => denied(&n),
            _ => Ok(who),
        },
        Credentials::Token { who, repositories } => match name {
            Some(n) if !repositories.contains(&n) => Err(Box::new(challenge(
                req,
                tls,
                Some(&n),
                "token not valid for this repository",
            ))),
            Some(n) if !permitted(auth, mirror, &who, &n, query) => denied(&n),
            _ => Ok(who),
        },
    }
}

/// `GET /auth/token?service=pier&scope=repository:<name>:pull`: a token for the repositories
/// asked for that the caller may pull (Basic credentials, or none when anonymous pulls are on).
pub(crate) fn token_endpoint<B>(auth: &Auth, mirror: &Mirror, req: &Request<B>) -> Response<Body> {
    let who = match auth.credentials(req.headers()) {
        Credentials::User(who) => who,
        Credentials::None if auth.anonymous_allowed() => Identity::Anonymous,
        _ => {
            let mut resp = response::error(
                &RegistryError::new(ErrorCode::Unauthorized, "valid credentials required"),
                false,
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Basic realm=\"pier\""),
            );
            return resp;
        }
    };
    let query = req.uri().query().unwrap_or("");
    let granted: Vec<String> = requested_repositories(query)
        .into_iter()
        .filter(|n| permitted(auth, mirror, &who, n, None))
        .collect();
    let (token, expires_in) = auth.issue_token(&who, granted);
    let issued_at = humantime_rfc3339(SystemTime::now());
    let body = serde_json::json!({ "token": token, "access_token": token, "expires_in": expires_in, "issued_at": issued_at });
    response::json(body.to_string(), false)
}

/// RFC 3339 UTC timestamp, seconds precision.
fn humantime_rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
