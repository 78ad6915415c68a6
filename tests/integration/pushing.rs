//! What the hosted-repository tests share: a pier hosting `team/**` and `local/*` in front of a
//! fake upstream, users with per-action rules, and pushing blobs and manifests as a user.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pier_oci::Digest;
use pier_server::auth::{Action, Auth, AuthConfig, Rule};
use pier_server::ServerOptions;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, launch, Pier, Setup, UpstreamSpec};

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// pier mirroring `up` as docker.io (with `deny`), hosting `team/**` and `local/*`.
pub(crate) async fn start(
    up: &FakeUpstream,
    auth: Option<Arc<Auth>>,
    hosted: pier_cache::HostedConfig,
    deny: Vec<String>,
    dir: Option<tempfile::TempDir>,
) -> Pier {
    let mut s = Setup::new(dir.unwrap_or_else(|| tempfile::tempdir().unwrap()));
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.deny = deny;
    s.upstreams = vec![spec];
    s.hosted_repositories = vec!["team/**".into(), "local/*".into()];
    s.allow_anonymous_push = auth.is_none();
    s.hosted = hosted;
    s.options = ServerOptions {
        auth,
        metrics_on_main: true,
        ..ServerOptions::default()
    };
    launch(s).await
}

pub(crate) fn rule(pattern: &str, actions: &[Action]) -> Rule {
    Rule {
        pattern: pattern.into(),
        actions: actions.to_vec(),
    }
}

/// Users (password `pw`): alice pushes and deletes `team/**` and pulls docker.io; carol pushes
/// `local/*` and pulls only `docker.io/library/*`; dave pushes only `team/a`; erin only pulls
/// `team/**`; bob has no rules (pulls anything, pushes nothing).
pub(crate) fn users(dir: &std::path::Path) -> Arc<Auth> {
    let hash = bcrypt::hash("pw", 4).unwrap();
    let names = ["alice", "bob", "carol", "dave", "erin"];
    let lines: String = names.iter().map(|n| format!("{n}:{hash}\n")).collect();
    std::fs::write(dir.join("htpasswd"), lines).unwrap();
    let all = [Action::Pull, Action::Push, Action::Delete];
    Arc::new(
        Auth::load(&AuthConfig {
            htpasswd: dir.join("htpasswd"),
            anonymous: true,
            token_ttl: Duration::from_secs(60),
            rules: HashMap::from([
                (
                    "alice".to_string(),
                    vec![Rule::pull("docker.io/**"), rule("team/**", &all)],
                ),
                (
                    "carol".to_string(),
                    vec![
                        Rule::pull("docker.io/library/*"),
                        rule("local/*", &[Action::Pull, Action::Push]),
                    ],
                ),
                (
                    "dave".to_string(),
                    vec![rule("team/a", &[Action::Pull, Action::Push])],
                ),
                ("erin".to_string(), vec![rule("team/**", &[Action::Pull])]),
            ]),
        })
        .unwrap(),
    )
}

pub(crate) fn digest_of(data: &[u8]) -> String {
    Digest::sha256_of(data).to_string()
}

pub(crate) fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
        .to_string()
}

pub(crate) fn as_user(req: reqwest::RequestBuilder, user: Option<&str>) -> reqwest::RequestBuilder {
    match user {
        Some(u) => req.basic_auth(u, Some("pw")),
        None => req,
    }
}

/// Pushes a blob in one request as `user`; returns its digest.
pub(crate) async fn push_blob(pier: &Pier, user: Option<&str>, repo: &str, data: &[u8]) -> String {
    let d = digest_of(data);
    let r = as_user(
        client().post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", pier.url)),
        user,
    )
    .body(data.to_vec())
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 201, "{repo}: {:?}", r.text().await);
    d
}

pub(crate) fn image_manifest(config: &str, layers: &[&str]) -> String {
    let layers: Vec<String> = layers
        .iter()
        .map(|l| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{l}","size":1}}"#))
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{}]}}"#,
        layers.join(",")
    )
}

pub(crate) async fn put_manifest(
    pier: &Pier,
    user: Option<&str>,
    repo: &str,
    reference: &str,
    content_type: &str,
    body: &str,
) -> reqwest::Response {
    as_user(
        client().put(format!("{}/v2/{repo}/manifests/{reference}", pier.url)),
        user,
    )
    .header("content-type", content_type)
    .body(body.to_string())
    .send()
    .await
    .unwrap()
}

pub(crate) fn blob_file(pier: &Pier, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    pier.dir
        .path()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
}

/// [`start`] with the users of [`users`] and nothing else set: the directory holding their
/// passwords, the upstream and pier.
pub(crate) async fn start_with_users() -> (tempfile::TempDir, FakeUpstream, Pier) {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(
        &up,
        Some(users(dir.path())),
        Default::default(),
        vec![],
        None,
    )
    .await;
    (dir, up, pier)
}

/// The bytes an upload session (named by its `Location`) holds so far, on disk.
pub(crate) fn upload_data(pier: &Pier, location: &str) -> std::path::PathBuf {
    let session = location.rsplit('/').next().unwrap();
    pier.dir.path().join("uploads").join(session).join("data")
}

/// How many upload sessions exist on disk.
pub(crate) fn upload_dirs(pier: &Pier) -> usize {
    std::fs::read_dir(pier.dir.path().join("uploads"))
        .unwrap()
        .count()
}
