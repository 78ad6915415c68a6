//! mirror.yaml: the configuration file, its defaults and its validation.
//!
//! Every key is optional. Errors name the key (`upstreams[1].url`) and say what is wrong.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod region;
pub use region::{ClusterSection, SharedStoreSection};

/// The file pier reads when no `--config` is given.
pub const DEFAULT_FILE: &str = "mirror.yaml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the registry API listener.
    pub listen: SocketAddr,
    pub cache: CacheSection,
    pub log: LogSection,
    pub metrics: MetricsSection,
    pub admin: AdminSection,
    pub warm: WarmSection,
    pub tls: Option<TlsSection>,
    pub auth: Option<AuthSection>,
    pub limits: LimitsSection,
    pub upstreams: Vec<UpstreamSection>,
    /// The peers of this node in a region (off when absent).
    pub cluster: Option<ClusterSection>,
    /// The region's shared object store (off when absent).
    pub shared_store: Option<SharedStoreSection>,
    pub hosted: Option<HostedSection>,
}

/// Hosted repositories: pushed to pier, never looked up upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostedSection {
    /// Repository globs as clients name them (`team/**`, `local/*`). The first component must
    /// be a literal namespace: not a wildcard, not a registry host, not Docker Hub's `library`.
    pub repositories: Vec<String>,
    /// Disk budget for hosted content; 0 (the default) means no limit.
    #[serde(default = "no_size")]
    pub max_size: Size,
    /// Upload sessions that take no bytes for this long are removed.
    #[serde(default = "default_upload_expiry", deserialize_with = "duration")]
    pub upload_expiry: Duration,
    /// Upload sessions open at once on this node; a new one beyond gets 429 TOOMANYREQUESTS.
    #[serde(default = "default_max_uploads")]
    pub max_uploads: usize,
    /// Upload sessions one caller (a user; an anonymous client by its address) may hold open.
    #[serde(default = "default_max_uploads_per_client")]
    pub max_uploads_per_client: usize,
    /// Anonymous clients (everyone, without an `auth` section) may push and delete. For labs.
    #[serde(default)]
    pub allow_anonymous_push: bool,
    /// Garbage collection keeps hosted content used (uploaded, mounted) this recently, so that
    /// a push under way never loses a blob.
    #[serde(default = "default_gc_grace", deserialize_with = "duration")]
    pub gc_grace: Duration,
    /// How often garbage collection of hosted content runs; `0s`: only on demand (the admin
    /// API's `POST /admin/gc`, `pier gc`).
    #[serde(default = "default_gc_interval", deserialize_with = "duration")]
    pub gc_interval: Duration,
}

fn default_gc_grace() -> Duration {
    Duration::from_secs(30 * 60)
}

fn default_gc_interval() -> Duration {
    Duration::from_secs(3600)
}

fn no_size() -> Size {
    Size(0)
}

fn default_upload_expiry() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_uploads() -> usize {
    1000
}

fn default_max_uploads_per_client() -> usize {
    100
}

/// More open upload sessions than this is a typo: each is a directory and files on disk.
const MAX_UPLOAD_SESSIONS: usize = 1_000_000;

impl HostedSection {
    /// The repositories, compiled for the front.
    pub fn repositories(&self) -> Result<pier_server::HostedRepositories, pier_server::GlobError> {
        pier_server::HostedRepositories::new(&self.repositories, self.allow_anonymous_push)
    }
}

/// A per-user rule as written: a bare glob (pulls), or a glob with its actions.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RuleEntry {
    Pull(String),
    Actions {
        repository: String,
        actions: Vec<pier_server::auth::Action>,
    },
}

impl RuleEntry {
    pub fn rule(&self) -> pier_server::auth::Rule {
        match self {
            RuleEntry::Pull(p) => pier_server::auth::Rule::pull(p.clone()),
            RuleEntry::Actions {
                repository,
                actions,
            } => pier_server::auth::Rule {
                pattern: repository.clone(),
                actions: actions.clone(),
            },
        }
    }
}

/// HTTPS on the registry listener. Certificate and key are reloaded when the files change.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA; when set, clients must present a certificate it signed (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// Client authentication: users from an htpasswd file (bcrypt), Basic or the registry token flow.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub htpasswd: PathBuf,
    /// Pulls without credentials allowed.
    #[serde(default)]
    pub anonymous: bool,
    /// Lifetime of the tokens pier issues.
    #[serde(default = "default_token_ttl", deserialize_with = "duration")]
    pub token_ttl: Duration,
    /// Per user, what they may do where: a bare `<registry>/<repository>` glob allows pulls; a
    /// `{repository, actions: [pull, push, delete]}` entry allows those actions (push and
    /// delete on hosted repositories, named without a registry). Users not listed pull
    /// anything and push nothing.
    #[serde(default)]
    pub users: std::collections::HashMap<String, Vec<RuleEntry>>,
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(300)
}

/// Limits against abuse.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Longest wait for a request's headers or a TLS handshake; also the idle keep-alive limit.
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Largest request head.
    pub max_header_size: Size,
    /// Requests per second per client address (0: no limit), and the burst allowed.
    pub rate_limit_per_client: f64,
    pub rate_limit_burst: f64,
    /// Upstream blob downloads at once (0: no limit), and how many more misses may wait.
    pub max_concurrent_fills: usize,
    pub max_queued_fills: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_header_size: Size(64 * 1024),
            rate_limit_per_client: 0.0,
            rate_limit_burst: 200.0,
            max_concurrent_fills: 64,
            max_queued_fills: 4096,
        }
    }
}

/// Images pulled into the cache at start and on a schedule, before anyone asks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmSection {
    /// Image references as clients write them: `nginx:1.25`, `ghcr.io/org/app:v2`.
    pub images: Vec<String>,
    /// `os/arch[/variant]` of an index to fetch; all when empty.
    pub platforms: Vec<String>,
    /// Also warm each image's signatures, attestations and referrers.
    pub signatures: bool,
    /// How often to warm again (tags move).
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
}

impl WarmSection {
    /// The options every warm of the list uses.
    pub fn options(&self) -> pier_server::warm::WarmOptions {
        pier_server::warm::WarmOptions {
            platforms: self.platforms.clone(),
            signatures: self.signatures,
        }
    }
}

impl Default for WarmSection {
    fn default() -> Self {
        WarmSection {
            images: Vec::new(),
            platforms: Vec::new(),
            signatures: true,
            interval: Duration::from_secs(6 * 3600),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// The operations listener: `/metrics`, `/healthz`, `/readyz`. `null` turns it off.
    pub listen: Option<SocketAddr>,
    /// Also answer `/metrics` on the registry listener.
    pub on_main_listener: bool,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            on_main_listener: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    pub dir: PathBuf,
    /// Bytes the memory tier may hold.
    pub memory_size: Size,
    /// Largest object kept in memory.
    pub memory_object_size: Size,
    /// Failed attempts in a row before a blob download is given up.
    pub fill_retries: u32,
    /// Disk budget for verified content; 0 (the default) means no limit.
    pub max_size: Size,
    /// Fraction of max_size at which eviction starts.
    pub high_watermark: f64,
    /// Fraction of max_size eviction brings usage down to.
    pub low_watermark: f64,
    /// Objects not used for this long are removed (off when absent).
    #[serde(deserialize_with = "opt_duration")]
    pub max_age: Option<Duration>,
    /// How often access times are written back and the budget and age limit applied.
    #[serde(deserialize_with = "duration")]
    pub maintenance_interval: Duration,
}

/// The admin listener: cache statistics, purge, eviction. Off unless `listen` is set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub format: LogFormat,
    /// A tracing filter (`info`, `pier=debug`); `RUST_LOG` wins when set.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// The registry host clients know it by: `docker.io`, `ghcr.io`, `registry.example:5000`.
    pub name: String,
    /// Where pier fetches from. Defaults to `https://<name>` (`https://registry-1.docker.io` for docker.io).
    #[serde(default)]
    pub url: Option<String>,
    /// Takes names that no routing rule gives to another upstream. Defaults to the first upstream.
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// PEM file of CA certificates trusted in addition to the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long a tag is answered from cache before pier asks the upstream again.
    #[serde(default = "default_tag_ttl", deserialize_with = "duration")]
    pub tag_ttl: Duration,
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default = "default_read_timeout", deserialize_with = "duration")]
    pub read_timeout: Duration,
    /// `nginx` means `library/nginx`. Defaults to true for docker.io only.
    #[serde(default)]
    pub library_prefix: Option<bool>,
    /// A regular expression; tags matching it are never revalidated once cached.
    #[serde(default)]
    pub immutable_tags: Option<String>,
    /// With this many pulls or fewer left in the upstream's reported rate limit, cached tags are
    /// served without revalidation.
    #[serde(default = "default_rate_limit_reserve")]
    pub rate_limit_reserve: u64,
    /// Repository globs clients may pull (all when empty). `*` stays within a path component,
    /// `**` crosses them.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Repository globs clients may not pull; deny wins over allow.
    #[serde(default)]
    pub deny: Vec<String>,
    /// A search endpoint (`GET <search_url>/v1/search`; Docker Hub's is
    /// `https://index.docker.io`) whose results `docker search` adds to pier's own. Never
    /// contacted when unset (the default).
    #[serde(default)]
    pub search_url: Option<String>,
    /// Longest wait for the search endpoint; past it, pier answers its own results.
    #[serde(default = "default_search_timeout", deserialize_with = "duration")]
    pub search_timeout: Duration,
}

fn default_search_timeout() -> Duration {
    Duration::from_secs(3)
}

fn default_rate_limit_reserve() -> u64 {
    10
}

fn default_tag_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5000)),
            cache: CacheSection::default(),
            log: LogSection::default(),
            metrics: MetricsSection::default(),
            admin: AdminSection::default(),
            warm: WarmSection::default(),
            tls: None,
            auth: None,
            limits: LimitsSection::default(),
            upstreams: Vec::new(),
            cluster: None,
            shared_store: None,
            hosted: None,
        }
    }
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            dir: PathBuf::from("./data"),
            memory_size: Size(256 << 20),
            memory_object_size: Size(1 << 20),
            fill_retries: 3,
            max_size: Size(0),
            high_watermark: 0.95,
            low_watermark: 0.85,
            max_age: None,
            maintenance_interval: Duration::from_secs(60),
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl UpstreamSection {
    /// An upstream with every default, as `--upstream` makes when there is no file.
    pub fn named(name: &str) -> Self {
        UpstreamSection {
            name: name.into(),
            url: None,
            default: false,
            username: None,
            password: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            tag_ttl: default_tag_ttl(),
            connect_timeout: default_connect_timeout(),
            read_timeout: default_read_timeout(),
            library_prefix: None,
            immutable_tags: None,
            rate_limit_reserve: default_rate_limit_reserve(),
            allow: Vec::new(),
            deny: Vec::new(),
            search_url: None,
            search_timeout: default_search_timeout(),
        }
    }

    /// `allow` and `deny`, compiled.
    pub fn access(&self) -> Result<pier_server::RepositoryFilter, pier_server::GlobError> {
        pier_server::RepositoryFilter::new(&self.allow, &self.deny)
    }

    /// `immutable_tags`, compiled.
    pub fn immutable_tags_regex(&self) -> Result<Option<regex::Regex>, ConfigError> {
        self.immutable_tags
            .as_deref()
            .map(regex::Regex::new)
            .transpose()
            .map_err(|e| ConfigError::field("immutable_tags", e))
    }

    /// The URL pier fetches from.
    pub fn url(&self) -> String {
        match &self.url {
            Some(u) => u.clone(),
            None if self.name == "docker.io" => "https://registry-1.docker.io".into(),
            None => format!("https://{}", self.name),
        }
    }

    pub fn library_prefix(&self) -> bool {
        self.library_prefix.unwrap_or(self.name == "docker.io")
    }

    /// The password from wherever it is configured. Errors name the field.
    pub fn password(&self, field: &str) -> Result<Option<String>, ConfigError> {
        let sources = [
            self.password.is_some(),
            self.password_file.is_some(),
            self.password_env.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err(ConfigError::field(
                field,
                "give only one of password, password_file, password_env",
            ));
        }
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        if let Some(path) = &self.password_file {
            let p = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::field(
                    &format!("{field}.password_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            return Ok(Some(p.trim_end_matches(['\n', '\r']).to_string()));
        }
        if let Some(var) = &self.password_env {
            let p = std::env::var(var).map_err(|_| {
                ConfigError::field(
                    &format!("{field}.password_env"),
                    format!("environment variable {var} is not set"),
                )
            })?;
            return Ok(Some(p));
        }
        Ok(None)
    }
}

/// A byte size: an integer, or a string such as `256MiB`, `1.5GB`, `200GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    pub fn parse(s: &str) -> Result<Size, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = (&s[..split], s[split..].trim());
        let num: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (e.g. 512MiB, 2GB, 1048576)"))?;
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            _ => {
                return Err(format!(
                    "unknown size unit {unit:?} (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
                ))
            }
        };
        Ok(Size((num * mult as f64) as u64))
    }
}

// Parse inside a visitor, so that serde_yaml's error names the key it came from.
impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 512MiB, 2GB or 1048576")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Size, E> {
                Size::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as 30s, 5m or 1h")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Duration, E> {
            humantime::parse_duration(s)
                .map_err(|e| E::custom(format!("{s:?} is not a duration like 30s or 5m: {e}")))
        }
    }
    d.deserialize_str(V)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// A configuration problem, naming the field.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn field(field: &str, what: impl fmt::Display) -> Self {
        ConfigError(format!("{field}: {what}"))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads `path`, or `mirror.yaml` in the working directory, or uses the defaults when
    /// neither is given nor present.
    pub fn load(path: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let path = match path {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_FILE)).filter(|p| p.exists()),
        };
        let Some(path) = path else {
            return Ok((Config::default(), None));
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        let config =
            Config::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Ok((config, Some(path)))
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text).map_err(|e| ConfigError(e.to_string()))
    }

    /// Fills in what the file left out and checks what it said. Call after command-line overrides.
    pub fn finish(&mut self) -> Result<(), ConfigError> {
        if self.upstreams.is_empty() {
            self.upstreams.push(UpstreamSection::named("docker.io"));
        }
        let mut defaults = 0;
        for (i, u) in self.upstreams.iter().enumerate() {
            let field = format!("upstreams[{i}]");
            if !valid_registry_name(&u.name) {
                return Err(ConfigError::field(
                    &format!("{field}.name"),
                    format!("{:?} is not a registry host name (like docker.io, ghcr.io or registry.local:5000)", u.name),
                ));
            }
            if self.upstreams[..i].iter().any(|o| o.name == u.name) {
                return Err(ConfigError::field(
                    &format!("{field}.name"),
                    format!("{:?} is configured twice", u.name),
                ));
            }
            let url = u.url();
            let ok = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"))
                .is_some_and(|rest| !rest.is_empty());
            if !ok {
                return Err(ConfigError::field(
                    &format!("{field}.url"),
                    format!("{url:?} must start with http:// or https://"),
                ));
            }
            if u.username.is_none()
                && (u.password.is_some() || u.password_file.is_some() || u.password_env.is_some())
            {
                return Err(ConfigError::field(
                    &format!("{field}.username"),
                    "a password is set but no username",
                ));
            }
            if u.connect_timeout.is_zero() || u.read_timeout.is_zero() {
                return Err(ConfigError::field(
                    &field,
                    "timeouts must be greater than zero",
                ));
            }
            u.immutable_tags_regex().map_err(|e| {
                ConfigError::field(
                    &format!("{field}.immutable_tags"),
                    e.0.trim_start_matches("immutable_tags: "),
                )
            })?;
            u.access()
                .map_err(|e| ConfigError::field(&format!("{field}.allow/deny"), e))?;
            if let Some(url) = &u.search_url {
                check_search_url(url)
                    .map_err(|e| ConfigError::field(&format!("{field}.search_url"), e))?;
            }
            if u.search_timeout.is_zero() {
                return Err(ConfigError::field(
                    &format!("{field}.search_timeout"),
                    "must be greater than zero",
                ));
            }
            defaults += usize::from(u.default);
        }
        if defaults > 1 {
            return Err(ConfigError::field(
                "upstreams",
                "more than one upstream has default: true",
            ));
        }
        let (low, high) = (self.cache.low_watermark, self.cache.high_watermark);
        if !(0.0 < low && low < high && high <= 1.0) {
            return Err(ConfigError::field(
                "cache.low_watermark",
                format!("watermarks must satisfy 0 < low_watermark ({low}) < high_watermark ({high}) <= 1"),
            ));
        }
        let l = &self.limits;
        if l.header_read_timeout.is_zero() || l.max_connections == 0 || l.max_header_size.0 < 1024 {
            return Err(ConfigError::field(
                "limits",
                "header_read_timeout and max_connections must be positive, max_header_size at least 1KiB",
            ));
        }
        if l.rate_limit_per_client < 0.0
            || (l.rate_limit_per_client > 0.0 && l.rate_limit_burst < 1.0)
        {
            return Err(ConfigError::field(
                "limits.rate_limit_burst",
                "must be at least 1 when rate_limit_per_client is set",
            ));
        }
        if let Some(auth) = &self.auth {
            if auth.token_ttl.is_zero() {
                return Err(ConfigError::field(
                    "auth.token_ttl",
                    "must be greater than zero",
                ));
            }
        }
        if let Some(tls) = &self.tls {
            for (field, path) in [
                ("tls.cert", Some(&tls.cert)),
                ("tls.key", Some(&tls.key)),
                ("tls.client_ca", tls.client_ca.as_ref()),
            ] {
                if let Some(p) = path.filter(|p| !p.is_file()) {
                    return Err(ConfigError::field(
                        field,
                        format!("{} is not a readable file", p.display()),
                    ));
                }
            }
        }
        if self.warm.interval.is_zero() {
            return Err(ConfigError::field(
                "warm.interval",
                "must be greater than zero",
            ));
        }
        if self.cache.maintenance_interval.is_zero() {
            return Err(ConfigError::field(
                "cache.maintenance_interval",
                "must be greater than zero",
            ));
        }
        if let Some(c) = &self.cluster {
            c.check()?;
        }
        if let Some(s) = &self.shared_store {
            s.check()?;
        }
        self.check_hosted()?;
        if self.cache.memory_object_size.0 > self.cache.memory_size.0
            && self.cache.memory_size.0 > 0
        {
            return Err(ConfigError::field(
                "cache.memory_object_size",
                "is larger than cache.memory_size",
            ));
        }
        Ok(())
    }

    /// The region this node is part of, with its secrets read. Errors name the key.
    pub fn region(&self) -> Result<pier_cache::region::RegionConfig, ConfigError> {
        region::region_config(self.cluster.as_ref(), self.shared_store.as_ref())
    }

    /// Hosted globs must claim names no upstream is routed by: a name is hosted or mirrored,
    /// never both, whatever convention the client routes by.
    fn check_hosted(&self) -> Result<(), ConfigError> {
        let Some(h) = &self.hosted else {
            return Ok(());
        };
        if h.repositories.is_empty() {
            return Err(ConfigError::field(
                "hosted.repositories",
                "give at least one repository glob (e.g. team/**)",
            ));
        }
        let default = &self.upstreams[self.default_upstream()];
        for (i, pattern) in h.repositories.iter().enumerate() {
            let field = format!("hosted.repositories[{i}]");
            pier_server::HostedRepositories::new(std::slice::from_ref(pattern), false)
                .map_err(|e| ConfigError::field(&field, e))?;
            let first = pattern.split('/').next().unwrap_or_default();
            if first.is_empty() || first.contains(['*', '?', '[', ']', '{', '}', '\\']) {
                return Err(ConfigError::field(
                    &field,
                    format!("{pattern:?} must start with a literal namespace (team/**, not */**): a wildcard first component would claim names routed to upstreams"),
                ));
            }
            if first.contains(['.', ':']) || first == "localhost" {
                return Err(ConfigError::field(
                    &field,
                    format!("{pattern:?} starts with a registry host: such names are routed to upstreams by their first component"),
                ));
            }
            if first == "library" && default.library_prefix() {
                return Err(ConfigError::field(
                    &field,
                    format!("{pattern:?} overlaps Docker Hub's library/ names, which upstream {} serves (nginx means library/nginx)", default.name),
                ));
            }
            if h.repositories[..i].contains(pattern) {
                return Err(ConfigError::field(
                    &field,
                    format!("{pattern:?} is listed twice"),
                ));
            }
        }
        if h.upload_expiry.is_zero() {
            return Err(ConfigError::field(
                "hosted.upload_expiry",
                "must be greater than zero",
            ));
        }
        for (field, n) in [
            ("hosted.max_uploads", h.max_uploads),
            ("hosted.max_uploads_per_client", h.max_uploads_per_client),
        ] {
            if n == 0 || n > MAX_UPLOAD_SESSIONS {
                return Err(ConfigError::field(
                    field,
                    format!(
                        "{n} must be between 1 and {MAX_UPLOAD_SESSIONS} (open upload sessions)"
                    ),
                ));
            }
        }
        if h.max_uploads_per_client > h.max_uploads {
            return Err(ConfigError::field(
                "hosted.max_uploads_per_client",
                format!(
                    "{} is more than hosted.max_uploads ({}): one client could take every slot",
                    h.max_uploads_per_client, h.max_uploads
                ),
            ));
        }
        Ok(())
    }

    /// What is allowed but risky, for `check-config` and the log at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(h) = self.hosted.as_ref().filter(|h| h.allow_anonymous_push) {
            out.push(format!(
                "hosted.allow_anonymous_push is on: anyone who reaches pier may push to and delete from {}",
                h.repositories.join(", ")
            ));
        }
        if let (Some(h), Some(auth)) = (&self.hosted, &self.auth) {
            if h.allow_anonymous_push && !auth.anonymous {
                out.push(
                    "hosted.allow_anonymous_push has no effect: auth.anonymous is false".into(),
                );
            }
        }
        out
    }

    /// Index of the default upstream.
    pub fn default_upstream(&self) -> usize {
        self.upstreams.iter().position(|u| u.default).unwrap_or(0)
    }
}

/// A search endpoint's base URL: http(s) with a host, no credentials, no query.
fn check_search_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "{url:?} must start with http:// or https:// and name a host (like https://index.docker.io)"
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must hold no credentials: a search needs none".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "{url:?} must have no query: pier adds /v1/search?q=&n=&page="
        ));
    }
    Ok(())
}

/// A host name with an optional port: what clients put in front of an image name.
fn valid_registry_name(name: &str) -> bool {
    let (host, port) = match name.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (name, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    host_ok && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(Size::parse("256MiB"), Ok(Size(256 << 20)));
        assert_eq!(Size::parse("1.5GB"), Ok(Size(1_500_000_000)));
        assert_eq!(Size::parse("1024"), Ok(Size(1024)));
        assert!(Size::parse("12 parsecs").is_err());
        assert!(Size::parse("MiB").is_err());
    }

    #[test]
    fn defaults_without_file() {
        let mut c = Config::parse("").unwrap();
        c.finish().unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.upstreams[0].url(), "https://registry-1.docker.io");
        assert!(c.upstreams[0].library_prefix());
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse("upstreams:\n  - name: a.io\n    tag_ttl: soon\n").unwrap_err();
        assert!(e.0.contains("upstreams[0].tag_ttl"), "{e}");
        let e = Config::parse("cache:\n  memory_size: lots\n").unwrap_err();
        assert!(e.0.contains("cache.memory_size"), "{e}");
        let e = Config::parse("listen: nowhere\n").unwrap_err();
        assert!(e.0.contains("listen"), "{e}");
        let e = Config::parse("colour: blue\n").unwrap_err();
        assert!(e.0.contains("colour"), "{e}");
        let mut c = Config::parse("upstreams:\n  - name: a.io\n  - name: Bad_Name\n").unwrap();
        let e = c.finish().unwrap_err();
        assert!(e.0.starts_with("upstreams[1].name"), "{e}");
        let mut c =
            Config::parse("upstreams:\n  - name: a.io\n    immutable_tags: '^v(\\d+'\n").unwrap();
        let e = c.finish().unwrap_err();
        assert!(e.0.starts_with("upstreams[0].immutable_tags"), "{e}");
        let mut c = Config::parse("upstreams:\n  - name: a.io\n    url: ftp://x\n").unwrap();
        assert!(c.finish().unwrap_err().0.starts_with("upstreams[0].url"));
        // A search endpoint: unset by default, else an http(s) URL, named when bad.
        let mut c = Config::parse("").unwrap();
        c.finish().unwrap();
        assert!(c.upstreams[0].search_url.is_none());
        for bad in [
            "ftp://index",
            "index.docker.io",
            "https://u:p@index.docker.io",
            "https://x/?q=a",
        ] {
            let mut c = Config::parse(&format!(
                "upstreams:\n  - name: docker.io\n  - name: a.io\n    search_url: {bad:?}\n"
            ))
            .unwrap();
            let e = c.finish().unwrap_err();
            assert!(e.0.starts_with("upstreams[1].search_url:"), "{bad}: {e}");
        }
        let mut c = Config::parse(
            "upstreams:\n  - name: docker.io\n    search_url: https://index.docker.io\n    search_timeout: 2s\n",
        )
        .unwrap();
        c.finish().unwrap();
        assert_eq!(c.upstreams[0].search_timeout, Duration::from_secs(2));
        let mut c = Config::parse(
            "upstreams:\n  - name: docker.io\n    search_url: https://index.docker.io\n    search_timeout: 0s\n",
        )
        .unwrap();
        assert!(c
            .finish()
            .unwrap_err()
            .0
            .starts_with("upstreams[0].search_timeout"));
    }

    #[test]
    fn hosted_globs_must_not_overlap_upstream_routing() {
        let check = |yaml: &str| {
            let mut c = Config::parse(yaml).unwrap();
            c.finish()
        };
        let ok = "hosted:\n  repositories: [\"team/**\", \"local/*\"]\n  max_size: 10GiB\n";
        check(ok).unwrap();
        for (bad, why) in [
            ("[\"**\"]", "literal namespace"),
            ("[\"*/app\"]", "literal namespace"),
            ("[\"ghcr.io/**\"]", "registry host"),
            ("[\"localhost/x\"]", "registry host"),
            ("[\"library/*\"]", "library/"),
            ("[\"team/[\"]", "glob"),
            ("[\"a/*\", \"a/*\"]", "twice"),
            ("[]", "at least one"),
        ] {
            let e = check(&format!("hosted:\n  repositories: {bad}\n")).unwrap_err();
            assert!(e.0.starts_with("hosted.repositories"), "{bad}: {e}");
            assert!(e.0.contains(why), "{bad}: {e}");
        }
        // library/ is Docker Hub's only when the default upstream adds the prefix.
        check("upstreams:\n  - name: ghcr.io\nhosted:\n  repositories: [\"library/*\"]\n").unwrap();
        let c =
            Config::parse("hosted:\n  repositories: [\"lab/**\"]\n  allow_anonymous_push: true\n")
                .unwrap();
        assert!(c.warnings()[0].contains("allow_anonymous_push"));
        assert!(Config::parse(ok).unwrap().warnings().is_empty());
        let e =
            Config::parse("hosted:\n  repositories: [a/*]\n  upload_expiry: never\n").unwrap_err();
        assert!(e.0.contains("hosted.upload_expiry"), "{e}");
        // Upload session limits: 1000 and 100 unless set; 0, absurd or inverted named.
        let h = Config::parse(ok).unwrap().hosted.unwrap();
        assert_eq!((h.max_uploads, h.max_uploads_per_client), (1000, 100));
        for (keys, field) in [
            ("max_uploads: 0", "hosted.max_uploads:"),
            ("max_uploads: 5000000", "hosted.max_uploads:"),
            (
                "max_uploads_per_client: 0",
                "hosted.max_uploads_per_client:",
            ),
            (
                "max_uploads: 10\n  max_uploads_per_client: 20",
                "hosted.max_uploads_per_client:",
            ),
        ] {
            let e = check(&format!("hosted:\n  repositories: [a/*]\n  {keys}\n")).unwrap_err();
            assert!(e.0.starts_with(field), "{keys}: {e}");
        }
        let e = Config::parse("hosted:\n  repositories: [a/*]\n  max_uploads: -1\n").unwrap_err();
        assert!(e.0.contains("hosted.max_uploads"), "{e}");
        // Garbage collection: hourly, with half an hour's grace, unless set.
        let h = Config::parse(ok).unwrap().hosted.unwrap();
        assert_eq!(h.gc_interval, Duration::from_secs(3600));
        assert_eq!(h.gc_grace, Duration::from_secs(1800));
        let h =
            Config::parse("hosted:\n  repositories: [a/*]\n  gc_interval: 0s\n  gc_grace: 5m\n")
                .unwrap()
                .hosted
                .unwrap();
        assert!(h.gc_interval.is_zero());
        assert_eq!(h.gc_grace, Duration::from_secs(300));
    }

    #[test]
    fn user_rules_with_and_without_actions() {
        let c = Config::parse(
            "auth:\n  htpasswd: /x\n  users:\n    ci:\n      - docker.io/library/*\n      - repository: team/**\n        actions: [pull, push]\n",
        )
        .unwrap();
        let rules: Vec<_> = c.auth.unwrap().users["ci"]
            .iter()
            .map(RuleEntry::rule)
            .collect();
        assert_eq!(
            rules[0],
            pier_server::auth::Rule::pull("docker.io/library/*")
        );
        assert_eq!(rules[1].actions.len(), 2);
        assert!(Config::parse(
            "auth:\n  htpasswd: /x\n  users:\n    ci:\n      - repository: a\n        actions: [fly]\n"
        )
        .is_err());
    }

    #[test]
    fn registry_names() {
        for ok in [
            "docker.io",
            "ghcr.io",
            "localhost",
            "registry.local:5000",
            "127.0.0.1:5001",
        ] {
            assert!(valid_registry_name(ok), "{ok}");
        }
        for bad in ["", "Docker.io", "a..b", "a:0", "a:x", "a/b", "-a.io"] {
            assert!(!valid_registry_name(bad), "{bad}");
        }
    }
}
