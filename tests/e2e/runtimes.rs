//! The real runtimes pull through pier, each with its own mirror configuration: the Docker daemon
//! (`registry-mirrors`), containerd (`hosts.toml`, `?ns=`) and podman (`registries.conf`, path
//! prefix). Two real registries stand for docker.io and ghcr.io; each must see requests for its
//! own images only. The daemons run as root with all their state in a temporary directory.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::docker::{run, stdout, wait_for, Daemon, Dockerd, DOCKER};
use crate::support::image::{self, Image};
use crate::support::process::{path_str, pier, push_image, registry, registry_requests, Running};
use crate::support::require;

/// Two registries loaded with one image each, and pier in front of both.
struct Scenario {
    tmp: tempfile::TempDir,
    _hub: Running,
    _ghcr: Running,
    pier: Running,
    /// docker.io/library/app:1.0, an index over amd64 and arm64.
    app: Image,
    /// ghcr.io/org/tool:2.0, a single amd64 image.
    tool: Image,
    /// Requests the registries had logged once loaded (skopeo's pushes).
    pushed: (usize, usize),
}

impl Scenario {
    fn new() -> Scenario {
        let tmp = tempfile::tempdir().expect("tempdir");
        let hub = registry(&tmp.path().join("hub"));
        let ghcr = registry(&tmp.path().join("ghcr"));
        let app = image::two_platform_index(&tmp.path().join("app"), "1.0", &[200_000, 1_000_000]);
        let tool = image::single_image(&tmp.path().join("tool"), "2.0", &[300_000]);
        push_image(
            &tmp.path().join("app"),
            "1.0",
            &format!("{}/library/app:1.0", hub.addr),
            true,
        );
        push_image(
            &tmp.path().join("tool"),
            "2.0",
            &format!("{}/org/tool:2.0", ghcr.addr),
            false,
        );
        let config = tmp.path().join("mirror.yaml");
        std::fs::write(
            &config,
            format!(
                "upstreams:\n  - name: docker.io\n    url: http://{}\n  - name: ghcr.io\n    url: http://{}\n",
                hub.addr, ghcr.addr
            ),
        )
        .expect("write mirror.yaml");
        let pier = pier(&[
            "--config",
            &path_str(&config),
            "--cache-dir",
            &path_str(&tmp.path().join("cache")),
        ]);
        let pushed = (
            registry_requests(&tmp.path().join("hub")).len(),
            registry_requests(&tmp.path().join("ghcr")).len(),
        );
        Scenario {
            tmp,
            _hub: hub,
            _ghcr: ghcr,
            pier,
            app,
            tool,
            pushed,
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    /// Each registry was asked only about its own repository.
    fn assert_upstreams_kept_apart(&self, expect_tool: bool) {
        let hub = registry_requests(&self.tmp.path().join("hub")).split_off(self.pushed.0);
        let ghcr = registry_requests(&self.tmp.path().join("ghcr")).split_off(self.pushed.1);
        let under = |reqs: &[String], repo: &str| {
            reqs.iter()
                .filter(|r| r.contains(&format!("/v2/{repo}/")))
                .count()
        };
        assert!(
            under(&hub, "library/app") > 0,
            "docker.io never reached: {hub:?}"
        );
        assert_eq!(
            under(&hub, "org/tool"),
            0,
            "docker.io was asked for ghcr.io's image: {hub:?}"
        );
        assert_eq!(
            under(&ghcr, "library/app"),
            0,
            "ghcr.io was asked for docker.io's image: {ghcr:?}"
        );
        if expect_tool {
            assert!(
                under(&ghcr, "org/tool") > 0,
                "ghcr.io never reached: {ghcr:?}"
            );
        } else {
            assert!(ghcr.is_empty(), "ghcr.io reached: {ghcr:?}");
        }
    }
}

#[test]
fn docker_daemon_pulls_through_registry_mirrors() {
    if !require(&["docker-registry", "skopeo", "dockerd", DOCKER]) {
        return;
    }
    let s = Scenario::new();
    let dockerd = Dockerd::start(
        &s.dir("docker"),
        &[
            "--registry-mirror",
            &format!("http://{}", s.pier.addr),
            "--insecure-registry",
            &s.pier.addr,
        ],
    );
    let docker = |args: &[&str]| dockerd.docker(args);
    run(&mut docker(&["pull", "app:1.0"]));
    let (_, config) = s.app.amd64();
    let id = stdout(&run(&mut docker(&[
        "image", "inspect", "--format", "{{.Id}}", "app:1.0",
    ])));
    assert_eq!(
        id, config.digest,
        "the image's config is not the one pushed"
    );
    s.assert_upstreams_kept_apart(false);
}

#[test]
fn containerd_pulls_through_hosts_toml() {
    if !require(&["docker-registry", "skopeo", "containerd", "ctr"]) {
        return;
    }
    let s = Scenario::new();
    let d = s.dir("containerd");
    let sock = d.join("containerd.sock");
    let config = d.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n",
            path_str(&d.join("root")),
            path_str(&d.join("state")),
            path_str(&sock)
        ),
    )
    .expect("config.toml");
    for (registry, server) in [
        ("docker.io", "https://registry-1.docker.io"),
        ("ghcr.io", "https://ghcr.io"),
    ] {
        let dir = d.join("certs.d").join(registry);
        std::fs::create_dir_all(&dir).expect("mkdir certs.d");
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"{server}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                s.pier.addr
            ),
        )
        .expect("hosts.toml");
    }
    let log = std::fs::File::create(d.join("containerd.log")).expect("log");
    let _containerd = Daemon(
        Command::new("containerd")
            .args(["--config", &path_str(&config)])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd"),
    );
    let ctr = |args: &[&str]| {
        let mut c = Command::new("ctr");
        c.args(["-a", &path_str(&sock)]).args(args);
        c
    };
    wait_for("containerd", || {
        ctr(&["version"]).output().is_ok_and(|o| o.status.success())
    });
    let hosts = path_str(&d.join("certs.d"));
    run(&mut ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        &hosts,
        "docker.io/library/app:1.0",
    ]));
    run(&mut ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        &hosts,
        "ghcr.io/org/tool:2.0",
    ]));
    let list = stdout(&run(&mut ctr(&["images", "ls"])));
    let digest_of = |name: &str| {
        list.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("sha256:")))
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        digest_of("docker.io/library/app:1.0"),
        s.app.top.digest,
        "{list}"
    );
    assert_eq!(
        digest_of("ghcr.io/org/tool:2.0"),
        s.tool.top.digest,
        "{list}"
    );
    // Every blob containerd fetched verified against its digest; check it holds the content too.
    run(&mut ctr(&["images", "check"]));
    s.assert_upstreams_kept_apart(true);
}

#[test]
fn podman_pulls_through_registries_conf() {
    if !require(&["docker-registry", "skopeo", "podman"]) {
        return;
    }
    let s = Scenario::new();
    let d = s.dir("podman");
    let conf = d.join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"registry-1.docker.io\"\n[[registry.mirror]]\nlocation = \"{0}/docker.io\"\ninsecure = true\n\n\
             [[registry]]\nprefix = \"ghcr.io\"\nlocation = \"ghcr.io\"\n[[registry.mirror]]\nlocation = \"{0}/ghcr.io\"\ninsecure = true\n",
            s.pier.addr
        ),
    )
    .expect("registries.conf");
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_REGISTRIES_CONF", &conf)
            .args([
                "--root",
                &path_str(&d.join("root")),
                "--runroot",
                &path_str(&d.join("run")),
            ])
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args);
        c
    };
    run(&mut podman(&["pull", "docker.io/library/app:1.0"]));
    run(&mut podman(&["pull", "ghcr.io/org/tool:2.0"]));
    let (_, app_config) = s.app.amd64();
    let (_, tool_config) = s.tool.amd64();
    let id = |name: &str| {
        stdout(&run(&mut podman(&[
            "image", "inspect", "--format", "{{.Id}}", name,
        ])))
    };
    assert_eq!(
        format!("sha256:{}", id("docker.io/library/app:1.0")),
        app_config.digest
    );
    assert_eq!(
        format!("sha256:{}", id("ghcr.io/org/tool:2.0")),
        tool_config.digest
    );
    s.assert_upstreams_kept_apart(true);
}
