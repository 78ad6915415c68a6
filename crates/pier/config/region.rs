//! `cluster:` and `shared_store:`: the region this node is part of.

use std::path::PathBuf;
use std::time::Duration;

use pier_cache::region::{ClusterConfig, PeerSource, RegionConfig, SharedStoreConfig};
use serde::Deserialize;

use super::{duration, ConfigError};

/// This node's peers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's base URL as peers reach it: `http://10.0.0.1:5000`. `${VAR}` is replaced by
    /// the environment variable (`http://${POD_IP}:5000` on Kubernetes).
    pub advertise: String,
    /// Peers' base URLs (this node's own may be listed too).
    #[serde(default)]
    pub peers: Vec<String>,
    /// Or: a DNS name whose addresses are the peers (a Kubernetes headless Service), reached
    /// with the scheme and port of `advertise`.
    #[serde(default)]
    pub peers_dns: Option<String>,
    /// How often `peers_dns` is resolved again.
    #[serde(default = "default_dns_interval", deserialize_with = "duration")]
    pub dns_interval: Duration,
    /// The region's shared secret, which peer requests carry: from a file or an environment
    /// variable, never in this file.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Longest wait for a peer to accept a connection; a peer that does not is skipped.
    #[serde(default = "default_peer_timeout", deserialize_with = "duration")]
    pub peer_timeout: Duration,
    /// Longest wait for a connected peer's answer and between its body's chunks: longer, as a
    /// live owner may be waiting on a slow upstream (giving up on it costs a second fetch).
    #[serde(default = "default_peer_read_timeout", deserialize_with = "duration")]
    pub peer_read_timeout: Duration,
    /// Extra CA certificates (PEM) for peers served over https.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_dns_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_peer_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_peer_read_timeout() -> Duration {
    Duration::from_secs(30)
}

/// An S3-compatible bucket shared by the region's nodes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedStoreSection {
    /// `https://s3.eu-west-1.amazonaws.com`, `http://seaweedfs:8333`, ...
    pub endpoint: String,
    pub bucket: String,
    /// Prepended to every key.
    #[serde(default)]
    pub prefix: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// `endpoint/bucket/key` (most self-hosted stores) rather than `bucket.endpoint/key`.
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Where the credentials come from: environment variables (by default the usual AWS
    /// ones) or files. They are never logged.
    #[serde(default = "default_key_env")]
    pub access_key_id_env: String,
    #[serde(default = "default_secret_env")]
    pub secret_access_key_env: String,
    #[serde(default)]
    pub access_key_id_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_true() -> bool {
    true
}
fn default_key_env() -> String {
    "AWS_ACCESS_KEY_ID".into()
}
fn default_secret_env() -> String {
    "AWS_SECRET_ACCESS_KEY".into()
}

/// `http(s)://host:port` without a path; `None` if `url` is not that.
fn base_url(url: &str) -> Option<(&str, &str, Option<u16>)> {
    let (scheme, rest) = url.split_once("://")?;
    if !matches!(scheme, "http" | "https") {
        return None;
    }
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let port = match rest.rsplit_once(':') {
        Some((host, p)) if !host.ends_with(']') || rest.starts_with('[') => Some(p.parse().ok()?),
        _ => None,
    };
    Some((scheme, rest, port))
}

/// `${VAR}` replaced by the environment variable.
fn expand(field: &str, text: &str) -> Result<String, ConfigError> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return Err(ConfigError::field(field, "unclosed ${"));
        };
        let var = &rest[start + 2..start + end];
        let value = std::env::var(var).map_err(|_| {
            ConfigError::field(field, format!("environment variable {var} is not set"))
        })?;
        out.push_str(&value);
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A secret from a file (trailing newline dropped) or an environment variable.
fn secret(field: &str, file: Option<&PathBuf>, env: Option<&str>) -> Result<String, ConfigError> {
    let value = match (file, env) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| {
                ConfigError::field(
                    &format!("{field}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            ConfigError::field(
                &format!("{field}_env"),
                format!("environment variable {var} is not set"),
            )
        })?,
        (None, None) => {
            return Err(ConfigError::field(
                field,
                "give a _file or an _env to read it from",
            ))
        }
    };
    if value.is_empty() {
        return Err(ConfigError::field(field, "is empty"));
    }
    Ok(value)
}

impl ClusterSection {
    /// What can be checked without the environment.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.peers.is_empty() == self.peers_dns.is_none() {
            return Err(ConfigError::field(
                "cluster.peers",
                "give either peers (a list of base URLs) or peers_dns (a DNS name), not both or neither",
            ));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if base_url(p).is_none() {
                return Err(ConfigError::field(
                    &format!("cluster.peers[{i}]"),
                    format!("{p:?} is not a base URL like http://10.0.0.2:5000"),
                ));
            }
        }
        if self.secret_file.is_some() && self.secret_env.is_some() {
            return Err(ConfigError::field(
                "cluster.secret",
                "give only one of secret_file, secret_env",
            ));
        }
        if self.secret_file.is_none() && self.secret_env.is_none() {
            return Err(ConfigError::field(
                "cluster.secret",
                "peer requests need a shared secret: set secret_file or secret_env",
            ));
        }
        if self.peer_timeout.is_zero()
            || self.peer_read_timeout.is_zero()
            || self.dns_interval.is_zero()
        {
            return Err(ConfigError::field(
                "cluster.peer_timeout",
                "peer_timeout, peer_read_timeout and dns_interval must be greater than zero",
            ));
        }
        Ok(())
    }

    fn resolve(&self) -> Result<ClusterConfig, ConfigError> {
        let advertise = expand("cluster.advertise", &self.advertise)?;
        let Some((scheme, _, port)) = base_url(&advertise) else {
            return Err(ConfigError::field(
                "cluster.advertise",
                format!("{advertise:?} is not a base URL like http://10.0.0.1:5000"),
            ));
        };
        let peers = match &self.peers_dns {
            Some(name) => PeerSource::Dns {
                name: name.clone(),
                port: port.unwrap_or(if scheme == "https" { 443 } else { 80 }),
                scheme: scheme.to_string(),
                interval: self.dns_interval,
            },
            None => PeerSource::Static(self.peers.clone()),
        };
        let secret = secret(
            "cluster.secret",
            self.secret_file.as_ref(),
            self.secret_env.as_deref(),
        )?;
        if secret.len() < 16 {
            return Err(ConfigError::field(
                "cluster.secret",
                "is shorter than 16 characters",
            ));
        }
        Ok(ClusterConfig {
            advertise,
            peers,
            secret,
            timeout: self.peer_timeout,
            read_timeout: self.peer_read_timeout,
            ca_file: self.ca_file.clone(),
        })
    }
}

impl SharedStoreSection {
    /// What can be checked without the environment.
    pub fn check(&self) -> Result<(), ConfigError> {
        if base_url(&self.endpoint).is_none() {
            return Err(ConfigError::field(
                "shared_store.endpoint",
                format!(
                    "{:?} is not a URL like https://s3.example:9000",
                    self.endpoint
                ),
            ));
        }
        let b = &self.bucket;
        let valid = (3..=63).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
        if !valid {
            return Err(ConfigError::field(
                "shared_store.bucket",
                format!("{b:?} is not a bucket name (3 to 63 lowercase letters, digits, '-', '.')"),
            ));
        }
        Ok(())
    }

    fn resolve(&self) -> Result<SharedStoreConfig, ConfigError> {
        Ok(SharedStoreConfig {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            access_key_id: secret(
                "shared_store.access_key_id",
                self.access_key_id_file.as_ref(),
                Some(&self.access_key_id_env),
            )?,
            secret_access_key: secret(
                "shared_store.secret_access_key",
                self.secret_access_key_file.as_ref(),
                Some(&self.secret_access_key_env),
            )?,
        })
    }
}

/// The region, with secrets and credentials read: errors name the key.
pub fn region_config(
    cluster: Option<&ClusterSection>,
    shared: Option<&SharedStoreSection>,
) -> Result<RegionConfig, ConfigError> {
    Ok(RegionConfig {
        cluster: cluster.map(ClusterSection::resolve).transpose()?,
        shared_store: shared.map(SharedStoreSection::resolve).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("http://10.0.0.1:5000"),
            Some(("http", "10.0.0.1:5000", Some(5000)))
        );
        assert_eq!(
            base_url("https://pier-0.pier/"),
            Some(("https", "pier-0.pier", None))
        );
        assert!(base_url("10.0.0.1:5000").is_none());
        assert!(base_url("http://a:5000/path").is_none());
        assert!(base_url("http://user@a:5000").is_none());
        assert!(base_url("http://a:port").is_none());
    }

    fn finish(yaml: &str) -> Result<super::super::Config, ConfigError> {
        let mut c = super::super::Config::parse(yaml)?;
        c.finish()?;
        c.region()?;
        Ok(c)
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("cluster:\n  advertise: http://a:5000\n  secret_env: PIER_TEST_SECRET_1\n", "cluster.peers"),
            (
                "cluster:\n  advertise: http://a:5000\n  peers: [http://b:5000]\n  peers_dns: pier\n  secret_env: PIER_TEST_SECRET_1\n",
                "cluster.peers",
            ),
            ("cluster:\n  advertise: http://a:5000\n  peers: [b:5000]\n  secret_env: PIER_TEST_SECRET_1\n", "cluster.peers[0]"),
            ("cluster:\n  advertise: http://a:5000\n  peers: [http://b:5000]\n", "cluster.secret"),
            ("cluster:\n  advertise: a:5000\n  peers: [http://b:5000]\n  secret_env: PIER_TEST_SECRET_1\n", "cluster.advertise"),
            ("cluster:\n  advertise: http://a:5000\n  peers: [http://b:5000]\n  secret_env: PIER_TEST_UNSET_SECRET\n", "cluster.secret_env"),
            ("cluster:\n  advertise: http://a:5000\n  peers: [http://b:5000]\n  secret_env: PIER_TEST_SHORT_SECRET\n", "cluster.secret"),
            ("shared_store:\n  endpoint: s3.example\n  bucket: pier\n", "shared_store.endpoint"),
            ("shared_store:\n  endpoint: http://s3:8333\n  bucket: Pier_Bucket\n", "shared_store.bucket"),
            (
                "shared_store:\n  endpoint: http://s3:8333\n  bucket: pier\n  access_key_id_env: PIER_TEST_UNSET_KEY\n",
                "shared_store.access_key_id_env",
            ),
            ("shared_store:\n  endpoint: http://s3:8333\n  buckett: pier\n", "buckett"),
        ];
        std::env::set_var("PIER_TEST_SECRET_1", "a-secret-long-enough-for-the-region");
        std::env::set_var("PIER_TEST_SHORT_SECRET", "short");
        for (yaml, key) in cases {
            let e = finish(yaml)
                .err()
                .unwrap_or_else(|| panic!("accepted: {yaml}"));
            assert!(e.0.contains(key), "{yaml}: {e} does not name {key}");
        }
        std::env::set_var("PIER_TEST_S3_KEY_1", "k");
        std::env::set_var("PIER_TEST_S3_SECRET_1", "s");
        let ok = finish(
            "cluster:\n  advertise: http://a:5000\n  peers: [http://a:5000, http://b:5000]\n  secret_env: PIER_TEST_SECRET_1\n\
             shared_store:\n  endpoint: http://s3:8333\n  bucket: pier-region\n  access_key_id_env: PIER_TEST_S3_KEY_1\n  secret_access_key_env: PIER_TEST_S3_SECRET_1\n",
        )
        .expect("a good region");
        let region = ok.region().expect("region");
        assert_eq!(region.cluster.map(|c| c.secret.len()), Some(35));
        assert_eq!(
            region.shared_store.map(|s| s.access_key_id),
            Some("k".to_string())
        );
    }

    #[test]
    fn expands_environment_variables() {
        std::env::set_var("PIER_TEST_POD_IP", "10.1.2.3");
        assert_eq!(
            expand("f", "http://${PIER_TEST_POD_IP}:5000").unwrap(),
            "http://10.1.2.3:5000"
        );
        let e = expand("cluster.advertise", "http://${PIER_TEST_UNSET_VAR}:5000").unwrap_err();
        assert!(
            e.0.contains("cluster.advertise") && e.0.contains("PIER_TEST_UNSET_VAR"),
            "{e}"
        );
    }
}
