//! The deployment files pass their tools' checks: `systemd-analyze verify` on the unit,
//! kubernetes-validate (schemas of Kubernetes 1.37) on the manifests, hadolint on the Dockerfile,
//! `docker-compose config` on the compose file, and `pier check-config` on every example
//! configuration, including the ones inside ConfigMaps and the image's. The image itself is built
//! and run in image.rs.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;

use crate::support::require;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run tool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn systemd_unit_verifies() {
    if !require(&["systemd-analyze"]) {
        return;
    }
    // The unit runs /usr/local/bin/pier; verify checks that the binary exists, so point it at
    // the one just built and change nothing else.
    let unit = std::fs::read_to_string(deploy("systemd/pier.service")).expect("unit");
    assert!(
        unit.contains("ProtectSystem=strict")
            && unit.contains("NoNewPrivileges=yes")
            && unit.contains("StateDirectory=pier")
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join("pier.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/pier",
            crate::support::pier_bin().to_str().expect("utf-8"),
        ),
    )
    .expect("write");
    let (ok, text) = run(Command::new("systemd-analyze").arg("verify").arg(&copy));
    assert!(
        ok && !text.contains("pier.service:"),
        "systemd-analyze verify: {text}"
    );
}

#[test]
fn kubernetes_manifests_validate() {
    if !require(&["kubernetes-validate"]) {
        return;
    }
    for file in [
        "namespace.yaml",
        "regional-mirror.yaml",
        "regional-cluster.yaml",
        "node-local-daemonset.yaml",
    ] {
        let (ok, text) = run(Command::new("kubernetes-validate")
            .arg("--strict")
            .arg(deploy(&format!("kubernetes/{file}"))));
        assert!(
            ok && !text.contains("ERROR") && text.contains("passed"),
            "{file}: {text}"
        );
    }
    // The ServiceMonitor is a CRD kubernetes-validate has no schema for: check its shape.
    let sm: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy("kubernetes/servicemonitor.yaml")).expect("read"),
    )
    .expect("YAML");
    assert_eq!(sm["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(sm["kind"].as_str(), Some("ServiceMonitor"));
    assert_eq!(sm["spec"]["endpoints"][0]["port"].as_str(), Some("metrics"));
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"].as_str(),
        Some("pier")
    );
}

#[test]
fn dockerfile_lints() {
    if !require(&["hadolint"]) {
        return;
    }
    let (ok, text) = run(Command::new("hadolint").arg(deploy("docker/Dockerfile")));
    assert!(ok, "hadolint: {text}");
}

/// Every `mirror.yaml` shipped, standalone or inside a ConfigMap, passes `pier check-config`.
#[test]
fn example_configurations_check() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut configs: Vec<(String, String)> = Vec::new();
    for file in [
        "systemd/mirror.yaml",
        "compose/mirror.yaml",
        "docker/rootfs/etc/pier/mirror.yaml",
    ] {
        configs.push((
            file.into(),
            std::fs::read_to_string(deploy(file)).expect("read"),
        ));
    }
    configs.push((
        "mirror.yaml".into(),
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("mirror.yaml"))
            .expect("read"),
    ));
    for file in [
        "kubernetes/regional-mirror.yaml",
        "kubernetes/regional-cluster.yaml",
        "kubernetes/node-local-daemonset.yaml",
    ] {
        let text = std::fs::read_to_string(deploy(file)).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).expect("YAML");
            if let Some(config) = v["data"]["mirror.yaml"].as_str() {
                configs.push((format!("{file} ConfigMap"), config.to_string()));
            }
        }
    }
    assert_eq!(configs.len(), 7);
    for (name, text) in configs {
        let path = tmp.path().join("check.yaml");
        std::fs::write(&path, &text).expect("write");
        let (ok, out) = run(Command::new(crate::support::pier_bin())
            .env("DOCKERHUB_TOKEN", "x")
            // What the regional cluster's pods get from the downward API and their Secrets.
            .env("POD_IP", "10.0.0.7")
            .env("PIER_CLUSTER_SECRET", "a-secret-of-at-least-16-characters")
            .env("AWS_ACCESS_KEY_ID", "key")
            .env("AWS_SECRET_ACCESS_KEY", "secret")
            .arg("check-config")
            .arg(&path));
        assert!(ok, "{name}: {out}");
    }
}

/// The file's shape, and that every file it mounts or builds from exists in the repository.
#[test]
fn compose_file_refers_to_files_that_exist() {
    let path = deploy("compose/docker-compose.yml");
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).expect("read")).expect("YAML");
    let base = path.parent().expect("dir");
    for service in ["pier", "prometheus", "grafana"] {
        assert!(
            compose["services"][service].is_mapping(),
            "service {service} missing"
        );
    }
    let build = &compose["services"]["pier"]["build"];
    let context = base.join(build["context"].as_str().expect("context"));
    assert!(context
        .join(build["dockerfile"].as_str().expect("dockerfile"))
        .is_file());
    let mut mounts = 0;
    for (_, service) in compose["services"].as_mapping().expect("services") {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume
                .as_str()
                .expect("short volume syntax")
                .split(':')
                .next()
                .expect("source");
            if source.starts_with('.') {
                assert!(
                    base.join(source).exists(),
                    "{source} is mounted but does not exist"
                );
                mounts += 1;
            }
        }
    }
    assert!(
        mounts >= 5,
        "expected the config, alerts and dashboard mounts"
    );
}

/// Compose itself reads the file: `docker-compose config` (Debian's docker-compose) validates it
/// against the Compose schema and prints it resolved, the services and paths it would use. It needs
/// no daemon.
#[test]
fn compose_file_passes_docker_compose_config() {
    if !require(&["docker-compose"]) {
        return;
    }
    let path = deploy("compose/docker-compose.yml");
    let config = |file: &Path| {
        run(Command::new("docker-compose")
            .arg("--file")
            .arg(file)
            .arg("config"))
    };
    let (ok, text) = config(&path);
    assert!(ok, "docker-compose config: {text}");
    let resolved: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML from compose");
    let services: Vec<&str> = resolved["services"]
        .as_mapping()
        .expect("services")
        .keys()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(services, ["grafana", "pier", "prometheus"], "{text}");
    let pier = &resolved["services"]["pier"];
    let context = Path::new(pier["build"]["context"].as_str().expect("build context"));
    assert_eq!(
        context.canonicalize().expect("context"),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .canonicalize()
            .expect("repository"),
        "the image is built from the repository's root"
    );
    assert_eq!(pier["build"]["dockerfile"], "deploy/docker/Dockerfile");
    let volumes: Vec<&str> = pier["volumes"]
        .as_sequence()
        .expect("pier's volumes")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        volumes.contains(&"pier-cache:/var/lib/pier:rw"),
        "the cache is the image's volume: {volumes:?}"
    );
    assert!(resolved["volumes"]["pier-cache"].is_mapping(), "{text}");

    // And it does reject what is wrong: a misspelt key, a service depending on one not there; the
    // same file unchanged at the same place passes.
    let tmp = tempfile::tempdir().expect("tempdir");
    let original = std::fs::read_to_string(&path).expect("read");
    let copy = tmp.path().join("docker-compose.yml");
    std::fs::write(&copy, &original).expect("write");
    let (ok, text) = config(&copy);
    assert!(ok, "docker-compose config on a copy: {text}");
    for (what, from, to, named) in [
        (
            "misspelt key",
            "    restart: unless-stopped",
            "    restrat: unless-stopped",
            "'restrat'",
        ),
        (
            "unknown dependency",
            "depends_on: [pier]",
            "depends_on: [pierr]",
            "'pierr'",
        ),
    ] {
        assert!(original.contains(from), "{from}");
        std::fs::write(&copy, original.replace(from, to)).expect("write");
        let (ok, text) = config(&copy);
        assert!(
            !ok && text.contains(named),
            "docker-compose config accepted a {what}: {text}"
        );
    }
}
