//! Client authentication, for mirrors that serve only their own users.
//!
//! Users live in an htpasswd file (bcrypt hashes, as `htpasswd -B` writes them). A client may send
//! them as Basic credentials on every request, or follow the registry token flow: pier answers 401
//! with `WWW-Authenticate: Bearer realm="<pier>/auth/token",service="pier",scope=...`, the client
//! gets a short-lived token from `/auth/token` with its credentials, and sends it as Bearer. Tokens
//! are HMAC-SHA256 signed with a key drawn at start (a restart invalidates them; clients just ask
//! again) and name the repositories they were granted, per action. Per-user rules limit what
//! each user may pull, push and delete; anonymous pulls can be allowed. Push and delete apply to
//! hosted repositories only, and need a user whose rules grant them (anonymous clients: only
//! with `hosted.allow_anonymous_push`).
//!
//! With authentication off (no `auth` section), pier ignores any Authorization header: the Docker
//! daemon offers its Docker Hub credentials to a mirror that never asked for them.
//!
//! bcrypt is slow on purpose (tens of milliseconds a check), so it never runs on the async
//! workers: each check runs on the blocking pool, at most one per CPU at once. Outcomes are
//! remembered by a keyed fingerprint of user and password: a pair that verified for five minutes
//! (a pull makes many requests), a pair that failed for thirty seconds (a client retrying a wrong
//! password costs one check, not one per request). A check that finds every CPU's turn taken
//! waits for one, in order of arrival, with at most [`WAITING_PER_CPU`] per CPU waiting; past
//! that, a request with credentials that are not remembered is answered 429 `TOOMANYREQUESTS`
//! with `Retry-After: 1`. So under a flood of different wrong passwords a user is asked to retry
//! rather than told that their password is wrong, and users whose credentials are remembered,
//! token holders and anonymous pulls are not held up at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;
use tokio::sync::Semaphore;

/// How clients authenticate.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// htpasswd file with bcrypt entries.
    pub htpasswd: PathBuf,
    /// Pulls without credentials allowed.
    pub anonymous: bool,
    /// Lifetime of issued tokens.
    pub token_ttl: Duration,
    /// Per user, what they may do where: `<registry>/<repository>` globs for mirrored
    /// repositories, `<repository>` globs for hosted ones. Users not listed may pull anything
    /// the upstream's own allow/deny lists permit, and push and delete nothing.
    pub rules: HashMap<String, Vec<Rule>>,
}

/// What a client does to a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    /// The action a request is: anything on an upload session is part of a push (its status and
    /// its cancelling included, as Distribution has it); else GET and HEAD pull, DELETE deletes,
    /// the rest push.
    pub fn of<B>(req: &Request<B>) -> Action {
        if matches!(
            pier_oci::Endpoint::parse(req.uri().path()),
            Ok(pier_oci::Endpoint::Upload { .. })
        ) {
            return Action::Push;
        }
        match *req.method() {
            http::Method::GET | http::Method::HEAD => Action::Pull,
            http::Method::DELETE => Action::Delete,
            _ => Action::Push,
        }
    }

    /// The actions of a token scope that ask for this one (`*` asks for all).
    fn named_in(self, actions: &str) -> bool {
        let name = match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        };
        actions.split(',').any(|a| a == name || a == "*")
    }
}

/// One per-user rule: repositories matching `pattern` allow `actions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub pattern: String,
    pub actions: Vec<Action>,
}

impl Rule {
    /// A rule that allows pulls only (what a bare pattern in a rule file means).
    pub fn pull(pattern: impl Into<String>) -> Rule {
        Rule {
            pattern: pattern.into(),
            actions: vec![Action::Pull],
        }
    }
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
    /// A valid token: the repositories (as the client named them) it was issued for, per
    /// action.
    Token { who: Identity, grants: Grants },
    /// Credentials that did not check out.
    Invalid,
    /// Basic credentials that could not be checked now: too many password checks are running
    /// and waiting. Answered with 429 and `Retry-After`, not as wrong credentials.
    Busy,
}

/// What a password check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PasswordCheck {
    Valid,
    Invalid,
    /// Too many checks running and waiting: not checked.
    Busy,
}

type HmacSha256 = Hmac<Sha256>;

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    /// Repositories it may pull.
    repos: Vec<String>,
    /// Repositories it may push to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    push: Vec<String>,
    /// Repositories it may delete from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    delete: Vec<String>,
}

/// The repositories a token was granted, per action.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    pub pull: Vec<String>,
    pub push: Vec<String>,
    pub delete: Vec<String>,
}

impl Grants {
    /// Whether the token lets `action` at `repository` (as the client named it).
    pub fn allows(&self, action: Action, repository: &str) -> bool {
        let list = match action {
            Action::Pull => &self.pull,
            Action::Push => &self.push,
            Action::Delete => &self.delete,
        };
        list.iter().any(|r| r == repository)
    }
}

/// One user's rules, compiled: the globs allowing each action.
struct UserRules {
    pull: GlobSet,
    push: GlobSet,
    delete: GlobSet,
}

/// The loaded users and the token key.
pub struct Auth {
    users: HashMap<String, String>,
    anonymous: bool,
    token_ttl: Duration,
    rules: HashMap<String, UserRules>,
    key: [u8; 32],
    /// Basic credentials that verified recently: bcrypt is slow on purpose, pulls make many
    /// requests. Keyed by a fingerprint of user and password.
    verified: Arc<Remembered>,
    /// Basic credentials that failed recently, so that retrying them costs no bcrypt.
    rejected: Arc<Remembered>,
    /// bcrypt checks running at once, on the blocking pool.
    running: Arc<Semaphore>,
    /// bcrypt checks running or waiting for their turn; beyond, requests are told to retry.
    admitted: Arc<Semaphore>,
    /// bcrypt checks run since start.
    bcrypt_runs: Arc<AtomicU64>,
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

/// How long a wrong password is remembered.
const REJECTED_FOR: Duration = Duration::from_secs(30);

/// Most user and password pairs remembered, verified and rejected each.
const REMEMBERED_MAX: usize = 10_000;

/// Password checks that may wait for a turn, per CPU (one check runs per CPU at once).
pub const WAITING_PER_CPU: usize = 32;

/// A keyed fingerprint of a user and password pair.
type Fingerprint = [u8; 32];

/// Fingerprints seen recently, each for `ttl`, at most `max` of them (past that, the oldest
/// goes).
struct Remembered {
    ttl: Duration,
    max: usize,
    seen: Mutex<HashMap<Fingerprint, Instant>>,
}

impl Remembered {
    fn new(ttl: Duration, max: usize) -> Self {
        Remembered {
            ttl,
            max,
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn contains(&self, fingerprint: &Fingerprint) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(fingerprint)
            .is_some_and(|at| at.elapsed() < self.ttl)
    }

    fn insert(&self, fingerprint: Fingerprint) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= self.max && !seen.contains_key(&fingerprint) {
            seen.retain(|_, at| at.elapsed() < self.ttl);
            if seen.len() >= self.max {
                let oldest = seen.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k);
                if let Some(oldest) = oldest {
                    seen.remove(&oldest);
                }
            }
        }
        seen.insert(fingerprint, Instant::now());
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why users and rules could not be loaded. Each names the file or the rule.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: expected user:hash")]
    Line { path: PathBuf, line: usize },
    #[error(
        "{path} line {line}: user {user:?} has no bcrypt hash (create entries with htpasswd -B)"
    )]
    NotBcrypt {
        path: PathBuf,
        line: usize,
        user: String,
    },
    #[error("rule for {user}: {pattern:?} is not a glob: {message}")]
    Rule {
        user: String,
        pattern: String,
        message: String,
    },
    #[error("no randomness for the token key: {0}")]
    Random(String),
}

fn parse_htpasswd(path: &Path) -> Result<HashMap<String, String>, AuthSetupError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthSetupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line.split_once(':').ok_or_else(|| AuthSetupError::Line {
            path: path.to_path_buf(),
            line: i + 1,
        })?;
        if !(hash.starts_with("$2y$") || hash.starts_with("$2b$") || hash.starts_with("$2a$")) {
            return Err(AuthSetupError::NotBcrypt {
                path: path.to_path_buf(),
                line: i + 1,
                user: user.to_string(),
            });
        }
        users.insert(user.to_string(), hash.to_string());
    }
    Ok(users)
}

impl Auth {
    /// Loads the htpasswd file and compiles the rules; errors name the problem.
    pub fn load(config: &AuthConfig) -> Result<Auth, AuthSetupError> {
        let users = parse_htpasswd(&config.htpasswd)?;
        let mut rules = HashMap::new();
        for (user, user_rules) in &config.rules {
            let rule_error = |pattern: &str, message: String| AuthSetupError::Rule {
                user: user.clone(),
                pattern: pattern.to_string(),
                message,
            };
            let set = |action: Action| -> Result<GlobSet, AuthSetupError> {
                let mut b = GlobSetBuilder::new();
                let patterns: Vec<&str> = user_rules
                    .iter()
                    .filter(|r| r.actions.contains(&action))
                    .map(|r| r.pattern.as_str())
                    .collect();
                for p in &patterns {
                    b.add(
                        GlobBuilder::new(p)
                            .literal_separator(true)
                            .build()
                            .map_err(|e| rule_error(p, e.kind().to_string()))?,
                    );
                }
                b.build()
                    .map_err(|e| rule_error(&patterns.join(" "), e.to_string()))
            };
            rules.insert(
                user.clone(),
                UserRules {
                    pull: set(Action::Pull)?,
                    push: set(Action::Push)?,
                    delete: set(Action::Delete)?,
                },
            );
        }
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| AuthSetupError::Random(e.to_string()))?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Auth {
            users,
            anonymous: config.anonymous,
            token_ttl: config.token_ttl,
            rules,
            key,
            verified: Arc::new(Remembered::new(VERIFIED_FOR, REMEMBERED_MAX)),
            rejected: Arc::new(Remembered::new(REJECTED_FOR, REMEMBERED_MAX)),
            running: Arc::new(Semaphore::new(cpus)),
            admitted: Arc::new(Semaphore::new(cpus * (1 + WAITING_PER_CPU))),
            bcrypt_runs: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Whether pulls without credentials are allowed.
    pub fn anonymous_allowed(&self) -> bool {
        self.anonymous
    }

    /// How many bcrypt checks ran since start (remembered outcomes need none).
    pub fn password_checks(&self) -> u64 {
        self.bcrypt_runs.load(Ordering::Relaxed)
    }

    /// The fingerprint a pair is remembered by: keyed with the token key, so that what is kept
    /// in memory is no plain hash of a password.
    fn fingerprint(&self, user: &str, password: &str) -> Fingerprint {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(user.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The remembered outcome for a pair, if any.
    fn remembered(&self, fingerprint: &Fingerprint) -> Option<PasswordCheck> {
        if self.verified.contains(fingerprint) {
            Some(PasswordCheck::Valid)
        } else if self.rejected.contains(fingerprint) {
            Some(PasswordCheck::Invalid)
        } else {
            None
        }
    }

    /// Checks a user's password against the htpasswd entry: a remembered outcome, or bcrypt on
    /// the blocking pool when a turn is free (see the module documentation).
    async fn check_password(&self, user: &str, password: &str) -> PasswordCheck {
        let Some(hash) = self.users.get(user) else {
            return PasswordCheck::Invalid;
        };
        let fingerprint = self.fingerprint(user, password);
        if let Some(known) = self.remembered(&fingerprint) {
            return known;
        }
        let Ok(admitted) = self.admitted.clone().try_acquire_owned() else {
            return PasswordCheck::Busy;
        };
        // The semaphores are never closed.
        let Ok(running) = self.running.clone().acquire_owned().await else {
            return PasswordCheck::Busy;
        };
        // A request with the same pair may have been checked while this one waited.
        if let Some(known) = self.remembered(&fingerprint) {
            return known;
        }
        let (password, hash) = (password.to_string(), hash.clone());
        let (verified, rejected) = (self.verified.clone(), self.rejected.clone());
        let runs = self.bcrypt_runs.clone();
        let check = tokio::task::spawn_blocking(move || {
            // Held until bcrypt is done, even when the client hangs up meanwhile: the limit is
            // on bcrypt work, not on requests.
            let _turn = (admitted, running);
            runs.fetch_add(1, Ordering::Relaxed);
            let ok = bcrypt::verify(&password, &hash).unwrap_or(false);
            if ok {
                verified.insert(fingerprint);
            } else {
                rejected.insert(fingerprint);
            }
            ok
        });
        match check.await {
            Ok(true) => PasswordCheck::Valid,
            // A panic in bcrypt or a runtime shutting down lets no one in either.
            Ok(false) | Err(_) => PasswordCheck::Invalid,
        }
    }

    /// What the request's `Authorization` header establishes. Basic credentials not seen
    /// recently are checked with bcrypt on the blocking pool.
    pub async fn credentials(&self, headers: &HeaderMap) -> Credentials {
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
            let Some((user, pass)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
                return Credentials::Invalid;
            };
            return match self.check_password(user, pass).await {
                PasswordCheck::Valid => Credentials::User(Identity::User(user.to_string())),
                PasswordCheck::Invalid => Credentials::Invalid,
                PasswordCheck::Busy => Credentials::Busy,
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
                    grants: Grants {
                        pull: c.repos,
                        push: c.push,
                        delete: c.delete,
                    },
                },
                None => Credentials::Invalid,
            };
        }
        Credentials::Invalid
    }

    /// Whether `who` may pull `<registry>/<repository>`.
    pub fn may_pull(&self, who: &Identity, registry: &str, repository: &str) -> bool {
        self.may(who, Action::Pull, &format!("{registry}/{repository}"))
    }

    /// Whether `who`'s rules allow `action` on `key` (`<registry>/<repository>` for a mirrored
    /// repository, `<repository>` for a hosted one). Users without rules may pull anything and
    /// push or delete nothing.
    pub fn may(&self, who: &Identity, action: Action, key: &str) -> bool {
        match self.rules.get(who.name()) {
            Some(rules) => match action {
                Action::Pull => rules.pull.is_match(key),
                Action::Push => rules.push.is_match(key),
                Action::Delete => rules.delete.is_match(key),
            },
            None => action == Action::Pull,
        }
    }

    /// A signed token for `who`, naming the repositories granted.
    pub fn issue_token(&self, who: &Identity, grants: Grants) -> (String, u64) {
        let claims = Claims {
            sub: who.name().to_string(),
            exp: now_secs() + self.token_ttl.as_secs(),
            repos: grants.pull,
            push: grants.push,
            delete: grants.delete,
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
    requested_scopes(query)
        .into_iter()
        .filter(|(_, actions)| Action::Pull.named_in(actions))
        .map(|(name, _)| name)
        .collect()
}

/// Every `repository:<name>:<actions>` scope a token request asks for.
fn requested_scopes(query: &str) -> Vec<(String, String)> {
    Query::parse(query)
        .all("scope")
        .flat_map(|v| v.split(' '))
        .filter_map(|s| {
            let rest = s.strip_prefix("repository:")?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some((name.to_string(), actions.to_string()))
        })
        .collect()
}

// ---- the HTTP side: challenges, the gate in front of the handlers, the token endpoint ----

use http::{header, Request, Response};
use pier_oci::{Endpoint, ErrorCode, Query, RegistryError};

use crate::handlers::Caller;
use crate::response::{self, Body};
use crate::routing::Target;
use crate::Mirror;

/// The action a token must grant for a request: writes to a mirrored repository need only a
/// pull grant to reach the handlers, which refuse them as unsupported.
fn gate_action(mirror: &Mirror, name: &str, query: Option<&str>, action: Action) -> Action {
    match mirror.target(name, query) {
        Ok(Target::Hosted(_)) => action,
        _ => Action::Pull,
    }
}

/// The repository a registry request is about, as the client named it (`None` for `/v2/`, the
/// catalog, and paths that are not registry requests).
fn requested_name(path: &str) -> Option<String> {
    match Endpoint::parse(path).ok()? {
        Endpoint::Manifest { name, .. }
        | Endpoint::Blob { name, .. }
        | Endpoint::Referrers { name, .. }
        | Endpoint::Upload { name, .. }
        | Endpoint::TagsList { name } => Some(name),
        _ => None,
    }
}

/// Whether a path is the API's base, `/v2/`.
fn is_base(path: &str) -> bool {
    matches!(Endpoint::parse(path), Ok(Endpoint::Base))
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
    // A client routed by `?ns=` (containerd) gets it back in the realm, so that the token
    // endpoint routes the scope's repository as the request was routed.
    let ns = Query::parse_opt(req.uri().query())
        .get("ns")
        .map(|ns| {
            let q = form_urlencoded::Serializer::new(String::new())
                .append_pair("ns", ns)
                .finish();
            format!("?{q}")
        })
        .unwrap_or_default();
    format!(
        "{}://{host}/auth/token{ns}",
        if tls { "https" } else { "http" }
    )
}

fn challenge<B>(req: &Request<B>, tls: bool, name: Option<&str>, message: &str) -> Response<Body> {
    let head = req.method() == http::Method::HEAD;
    let mut resp = response::error(&RegistryError::new(ErrorCode::Unauthorized, message), head);
    let mut value = format!("Bearer realm=\"{}\",service=\"pier\"", realm(req, tls));
    if let Some(n) = name {
        // What the request needs, as Distribution asks it: a push also reads what it pushes.
        let actions = match Action::of(req) {
            Action::Pull => "pull",
            Action::Push => "pull,push",
            Action::Delete => "delete",
        };
        value.push_str(&format!(",scope=\"repository:{n}:{actions}\""));
    }
    if let Ok(v) = value.parse() {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// The answer to Basic credentials that could not be checked now.
fn busy<B>(req: &Request<B>) -> Response<Body> {
    let e = RegistryError::new(
        ErrorCode::TooManyRequests,
        "too many password checks at once; retry shortly",
    )
    .with_retry_after(Some(1));
    response::error(&e, req.method() == http::Method::HEAD)
}

/// Whether `who` may do `action` to the repository a client named `name` (routed as the
/// handlers would). Writes to a mirrored repository are let through to be refused as
/// unsupported by the handlers: a read-only mirror, not a permission.
fn permitted(
    auth: &Auth,
    mirror: &Mirror,
    who: &Identity,
    name: &str,
    query: Option<&str>,
    action: Action,
) -> bool {
    match mirror.target(name, query) {
        Ok(target @ Target::Hosted(_)) => Caller::Identified {
            auth,
            who: who.clone(),
        }
        .may(mirror, action, &target),
        Ok(Target::Mirrored(route)) => {
            auth.may_pull(who, &route.upstream.name, route.repo.as_str())
        }
        // A name that does not route gets its error from the handlers.
        Err(_) => true,
    }
}

/// The gate in front of the registry handlers: `Ok` lets the request through as that identity,
/// `Err` is the answer (401 with a challenge, 403, or 429 when Basic credentials cannot be
/// checked now).
pub(crate) async fn gate<B>(
    auth: &Auth,
    mirror: &Mirror,
    req: &Request<B>,
    tls: bool,
) -> Result<Identity, Box<Response<Body>>> {
    let name = requested_name(req.uri().path());
    let query = req.uri().query();
    let action = Action::of(req);
    let denied = |n: &str| {
        let verb = match action {
            Action::Pull => "pull",
            Action::Push => "push to",
            Action::Delete => "delete from",
        };
        let e = RegistryError::new(
            ErrorCode::Denied,
            format!("you may not {verb} {n} on this mirror"),
        );
        Err(Box::new(response::error(
            &e,
            req.method() == http::Method::HEAD,
        )))
    };
    match auth.credentials(req.headers()).await {
        Credentials::Invalid => Err(Box::new(challenge(
            req,
            tls,
            name.as_deref(),
            "invalid credentials",
        ))),
        Credentials::Busy => Err(Box::new(busy(req))),
        Credentials::None if !auth.anonymous_allowed() => Err(Box::new(challenge(
            req,
            tls,
            name.as_deref(),
            "authentication required",
        ))),
        // Clients learn from the `/v2/` ping whether to authenticate at all (podman and Docker
        // send no credentials to a registry whose ping answered 200, and so could never push).
        // With hosted repositories, the ping challenges anonymous clients as Docker Hub does;
        // those without credentials get an anonymous token and pull as before.
        Credentials::None if mirror.hosted.is_configured() && is_base(req.uri().path()) => {
            Err(Box::new(challenge(
                req,
                tls,
                None,
                "authenticate, or ask for an anonymous token",
            )))
        }
        Credentials::None => match name {
            Some(n) if !permitted(auth, mirror, &Identity::Anonymous, &n, query, action) => {
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
            Some(n) if !permitted(auth, mirror, &who, &n, query, action) => denied(&n),
            _ => Ok(who),
        },
        Credentials::Token { who, grants } => match name {
            // A token for pulls taken to a push: the client asks for one with push (Docker
            // does so on this challenge). Writes to mirrored repositories are refused later.
            Some(n) if !grants.allows(gate_action(mirror, &n, query, action), &n) => Err(Box::new(
                challenge(req, tls, Some(&n), "token not valid for this repository"),
            )),
            Some(n) if !permitted(auth, mirror, &who, &n, query, action) => denied(&n),
            _ => Ok(who),
        },
    }
}

/// `GET /auth/token?service=pier&scope=repository:<name>:pull`: a token for the repositories
/// asked for that the caller may pull (Basic credentials, or none when anonymous pulls are on).
pub(crate) async fn token_endpoint<B>(
    auth: &Auth,
    mirror: &Mirror,
    req: &Request<B>,
) -> Response<Body> {
    let who = match auth.credentials(req.headers()).await {
        Credentials::User(who) => who,
        Credentials::None if auth.anonymous_allowed() => Identity::Anonymous,
        Credentials::Busy => return busy(req),
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
    // Routed as the request that drew the challenge was (its `ns` comes back in the realm).
    let mut grants = Grants::default();
    for (name, actions) in requested_scopes(query) {
        for action in [Action::Pull, Action::Push, Action::Delete] {
            if !action.named_in(&actions) {
                continue;
            }
            // Only hosted repositories take writes; a token never grants one elsewhere.
            let hosted = matches!(mirror.target(&name, Some(query)), Ok(Target::Hosted(_)));
            if (action == Action::Pull || hosted)
                && permitted(auth, mirror, &who, &name, Some(query), action)
            {
                let list = match action {
                    Action::Pull => &mut grants.pull,
                    Action::Push => &mut grants.push,
                    Action::Delete => &mut grants.delete,
                };
                list.push(name.clone());
            }
        }
    }
    let (token, expires_in) = auth.issue_token(&who, grants);
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
            rules: [
                ("bob".to_string(), vec![Rule::pull("ghcr.io/bob/**")]),
                (
                    "carol".to_string(),
                    vec![
                        Rule::pull("docker.io/**"),
                        Rule {
                            pattern: "team/**".into(),
                            actions: vec![Action::Pull, Action::Push],
                        },
                    ],
                ),
            ]
            .into(),
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

    #[tokio::test]
    async fn basic_credentials() {
        let (_d, a) = auth(false);
        assert!(
            matches!(a.credentials(&basic("alice", "secret")).await, Credentials::User(Identity::User(u)) if u == "alice")
        );
        assert!(matches!(
            a.credentials(&basic("alice", "wrong")).await,
            Credentials::Invalid
        ));
        assert!(matches!(
            a.credentials(&basic("mallory", "secret")).await,
            Credentials::Invalid
        ));
        assert!(matches!(
            a.credentials(&basic("alice", "no colon")).await,
            Credentials::Invalid
        ));
        assert!(matches!(
            a.credentials(&HeaderMap::new()).await,
            Credentials::None
        ));
    }

    #[tokio::test]
    async fn a_wrong_password_checked_twice_runs_bcrypt_once() {
        let (_d, a) = auth(false);
        for _ in 0..2 {
            assert_eq!(
                a.check_password("alice", "wrong").await,
                PasswordCheck::Invalid
            );
        }
        assert_eq!(a.password_checks(), 1);
        // Right passwords are remembered too, apart from wrong ones.
        for _ in 0..2 {
            assert_eq!(
                a.check_password("alice", "secret").await,
                PasswordCheck::Valid
            );
        }
        assert_eq!(a.password_checks(), 2);
        // The same wrong password is another pair for another user.
        assert_eq!(
            a.check_password("bob", "wrong").await,
            PasswordCheck::Invalid
        );
        assert_eq!(a.password_checks(), 3);
        // Unknown users cost no bcrypt at all.
        assert_eq!(
            a.check_password("mallory", "wrong").await,
            PasswordCheck::Invalid
        );
        assert_eq!(a.password_checks(), 3);
    }

    #[tokio::test]
    async fn concurrent_checks_of_one_wrong_password_run_bcrypt_once() {
        let (_d, mut a) = auth(false);
        // One check at a time: the others wait, then find the outcome remembered.
        a.running = Arc::new(Semaphore::new(1));
        let a = Arc::new(a);
        let checks: Vec<_> = (0..10)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move { a.check_password("alice", "wrong").await })
            })
            .collect();
        for c in checks {
            assert_eq!(c.await.unwrap(), PasswordCheck::Invalid);
        }
        assert_eq!(a.password_checks(), 1);
    }

    #[tokio::test]
    async fn past_the_waiting_room_checks_are_busy_but_remembered_pairs_are_not() {
        let (_d, a) = auth(false);
        assert_eq!(
            a.check_password("alice", "secret").await,
            PasswordCheck::Valid
        );
        assert_eq!(
            a.check_password("alice", "wrong").await,
            PasswordCheck::Invalid
        );
        // Every turn taken, as by a flood of different wrong passwords.
        let all = u32::try_from(a.admitted.available_permits()).unwrap();
        let taken = a.admitted.clone().acquire_many_owned(all).await.unwrap();
        assert_eq!(a.check_password("bob", "secret").await, PasswordCheck::Busy);
        assert!(matches!(
            a.credentials(&basic("bob", "secret")).await,
            Credentials::Busy
        ));
        // Remembered outcomes need no turn.
        assert_eq!(
            a.check_password("alice", "secret").await,
            PasswordCheck::Valid
        );
        assert_eq!(
            a.check_password("alice", "wrong").await,
            PasswordCheck::Invalid
        );
        assert_eq!(a.password_checks(), 2);
        drop(taken);
        assert_eq!(
            a.check_password("bob", "secret").await,
            PasswordCheck::Valid
        );
    }

    #[tokio::test]
    async fn a_client_hanging_up_keeps_the_turn_until_bcrypt_is_done() {
        let (_d, mut a) = auth(false);
        a.running = Arc::new(Semaphore::new(1));
        let a = Arc::new(a);
        let check = {
            let a = a.clone();
            tokio::spawn(async move { a.check_password("alice", "wrong").await })
        };
        // Wait until bcrypt runs (its turn taken), then drop the request.
        while a.running.available_permits() == 1 {
            tokio::task::yield_now().await;
        }
        check.abort();
        let _ = check.await;
        // The turn is given back only once bcrypt finished, and its outcome is remembered.
        let _turn = a.running.clone().acquire_owned().await.unwrap();
        assert_eq!(a.password_checks(), 1);
        assert!(a.rejected.contains(&a.fingerprint("alice", "wrong")));
    }

    #[test]
    fn remembered_pairs_expire_and_are_bounded() {
        let r = Remembered::new(Duration::from_secs(60), 3);
        for i in 0..5u8 {
            r.insert([i; 32]);
        }
        assert_eq!(r.len(), 3);
        // The oldest went first.
        assert!(!r.contains(&[0; 32]) && !r.contains(&[1; 32]));
        assert!((2..5u8).all(|i| r.contains(&[i; 32])));
        let expired = Remembered::new(Duration::ZERO, 3);
        expired.insert([7; 32]);
        assert!(!expired.contains(&[7; 32]));
    }

    #[tokio::test]
    async fn tokens_are_signed_and_expire() {
        let (_d, a) = auth(false);
        let (token, _) = a.issue_token(
            &Identity::User("alice".into()),
            Grants {
                pull: vec!["library/nginx".into()],
                ..Grants::default()
            },
        );
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        assert!(
            matches!(a.credentials(&h).await, Credentials::Token { grants, .. } if grants.pull == ["library/nginx"] && grants.push.is_empty())
        );
        // Tampered payload: signature fails.
        let (payload, sig) = token.split_once('.').unwrap();
        let forged_claims = Claims {
            sub: "alice".into(),
            exp: now_secs() + 60,
            repos: vec!["*".into()],
            push: vec![],
            delete: vec![],
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
        assert!(matches!(a.credentials(&h).await, Credentials::Invalid));
        // Expired.
        let expired = Claims {
            sub: "alice".into(),
            exp: now_secs() - 1,
            repos: vec![],
            push: vec![],
            delete: vec![],
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
        // Actions: carol pushes to team/**; bob and unlisted alice push nowhere.
        let carol = Identity::User("carol".into());
        assert!(a.may(&carol, Action::Push, "team/app") && a.may(&carol, Action::Pull, "team/app"));
        assert!(!a.may(&carol, Action::Delete, "team/app"));
        assert!(!a.may(&carol, Action::Push, "docker.io/library/nginx"));
        assert!(!a.may(&Identity::User("alice".into()), Action::Push, "team/app"));
        assert!(a.may(&Identity::User("alice".into()), Action::Pull, "team/app"));
        assert!(!a.may(&Identity::Anonymous, Action::Push, "team/app"));
        assert_eq!(
            requested_repositories("service=pier&scope=repository%3Alibrary%2Fnginx%3Apull&scope=repository:ghcr.io/o/a:pull,push&scope=repository:x:push"),
            vec!["library/nginx".to_string(), "ghcr.io/o/a".to_string()]
        );
        // Several scopes in one parameter, space-separated (`+` or `%20`), and `*` actions.
        assert_eq!(
            requested_repositories(
                "scope=repository:a:pull+repository:b:pull%20repository%3Ac%3A%2A&scope=registry:catalog:*"
            ),
            ["a", "b", "c"]
        );
        assert!(requested_repositories("scopes=repository:a:pull&x").is_empty());
    }

    #[test]
    fn htpasswd_without_bcrypt_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("h"), "carol:$apr1$abc$def\n").unwrap();
        let err = parse_htpasswd(&dir.path().join("h")).unwrap_err();
        assert!(
            matches!(&err, AuthSetupError::NotBcrypt { line: 1, user, .. } if user == "carol"),
            "{err}"
        );
        assert!(err.to_string().contains("htpasswd -B"), "{err}");
    }
}
