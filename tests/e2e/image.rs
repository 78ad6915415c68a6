//! The container image of deploy/docker/Dockerfile: its builder stage is a Rust recent enough for
//! Cargo.toml's rust-version, and its last stage, the image operators run, is built by a real
//! dockerd and run as they would: as its own non-root user, on the host network, the cache a named
//! volume, pulled through with skopeo from a real registry, replaced by a new container on the
//! same volume that serves the same pull with the registry gone, healthy through its HEALTHCHECK.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::docker::{in_private_network, run, stdout, Dockerd, DOCKER};
use crate::support::image;
use crate::support::process::{path_str, push_image, registry, skopeo};
use crate::support::{pier_bin, require};

/// pier uses `File::try_lock`, stable since Rust 1.89.
const OLDEST_RUST: Version = Version(1, 89, 0);

const UID: u32 = 10001;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Version(u32, u32, u32);

impl Version {
    /// `1.89` or `1.89.1`; `None` for anything else.
    fn parse(text: &str) -> Option<Version> {
        let mut parts = text.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = parts.next().unwrap_or(Some(0))?;
        parts
            .next()
            .is_none()
            .then_some(Version(major, minor, patch))
    }
}

/// The `rust-version` of a Cargo.toml's `[workspace.package]` (or of its `[package]`, when that
/// states it itself).
fn cargo_rust_version(cargo_toml: &str) -> Option<Version> {
    let mut section = "";
    let mut found = None;
    for line in cargo_toml.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.starts_with('[') {
            section = line;
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.trim() == "rust-version"
            && (section == "[workspace.package]" || section == "[package]")
        {
            found = Some(Version::parse(
                value.trim().strip_prefix('"')?.strip_suffix('"')?,
            )?);
        }
    }
    found
}

/// The Rust version of a Dockerfile's builder stage, `FROM [registry/library/]rust:X.Y[.Z][-...]
/// AS build`.
fn dockerfile_builder_version(dockerfile: &str) -> Option<Version> {
    let from = dockerfile.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let is_build = words.len() >= 4
            && words[0].eq_ignore_ascii_case("FROM")
            && words[words.len() - 2].eq_ignore_ascii_case("AS")
            && words[words.len() - 1] == "build";
        is_build.then(|| {
            words[1..words.len() - 2]
                .iter()
                .find(|w| !w.starts_with("--"))
                .map(|w| w.to_string())
        })?
    })?;
    let image = from.split('@').next()?;
    let (name, tag) = image.rsplit_once(':')?;
    if name.rsplit('/').next() != Some("rust") {
        return None;
    }
    Version::parse(tag.split('-').next()?)
}

#[test]
fn version_parsers_read_what_the_files_say() {
    assert_eq!(
        dockerfile_builder_version("FROM rust:1.85-alpine AS build\nFROM scratch\n"),
        Some(Version(1, 85, 0))
    );
    assert_eq!(
        dockerfile_builder_version(
            "FROM --platform=$BUILDPLATFORM docker.io/library/rust:1.90.1-alpine3.22 as build"
        ),
        Some(Version(1, 90, 1))
    );
    // Not a pinned Rust: the check below must fail, not pass.
    assert_eq!(
        dockerfile_builder_version("FROM rust:alpine AS build"),
        None
    );
    assert_eq!(
        dockerfile_builder_version("FROM alpine:3.20 AS build"),
        None
    );
    assert_eq!(
        cargo_rust_version(
            "[package]\nrust-version.workspace = true\n[workspace.package]\nrust-version = \"1.88\" # x\n"
        ),
        Some(Version(1, 88, 0))
    );
    assert_eq!(
        cargo_rust_version("[dependencies]\nrust-version = \"9.0\"\n"),
        None
    );
    // The Dockerfile of issue 18 drifted: rust:1.85 against rust-version 1.89.
    assert!(Version(1, 85, 0) < OLDEST_RUST);
}

/// Cargo.toml states the oldest Rust that builds pier, every crate inherits it, and the
/// Dockerfile's builder is at least that.
#[test]
fn dockerfile_builder_is_at_least_rust_version() {
    let manifest = read(&repo("Cargo.toml"));
    let rust_version = cargo_rust_version(&manifest)
        .expect("Cargo.toml states rust-version in [workspace.package]");
    assert!(
        rust_version >= OLDEST_RUST,
        "rust-version {rust_version:?} is older than {OLDEST_RUST:?}, which File::try_lock needs"
    );
    let crates: Vec<PathBuf> = std::fs::read_dir(repo("crates"))
        .expect("crates/")
        .map(|e| e.expect("dir entry").path().join("Cargo.toml"))
        .filter(|p| p.is_file())
        .chain([repo("Cargo.toml")])
        .collect();
    assert!(crates.len() >= 6, "{crates:?}");
    for manifest in crates {
        assert!(
            read(&manifest).contains("\nrust-version.workspace = true\n"),
            "{} does not inherit the workspace's rust-version",
            manifest.display()
        );
    }
    let builder = dockerfile_builder_version(&read(&repo("deploy/docker/Dockerfile")))
        .expect("deploy/docker/Dockerfile has a `FROM rust:X.Y-alpine AS build` stage");
    assert!(
        builder >= rust_version,
        "the Dockerfile builds with Rust {builder:?}, older than Cargo.toml's rust-version {rust_version:?}"
    );
}

/// The files ldd says `binary` loads, the dynamic loader included; none for a static binary.
fn libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        assert!(
            text.contains("not a dynamic executable") || text.contains("statically linked"),
            "ldd {}: {text}{}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        return Vec::new();
    }
    // "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "\t/lib64/ld-linux-x86-64.so.2 (0x...)"
    let libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let path = l.split(" => ").last()?.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    assert!(
        libs.iter()
            .any(|l| l.to_string_lossy().contains("ld-linux")),
        "no dynamic loader in ldd's answer: {text}"
    );
    libs
}

/// Copies `from` (following symbolic links) to `to`, making its directory.
fn install(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
}

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            install(&entry.path(), &target);
        }
    }
}

/// The build context for `--build-arg PIER_SOURCE=prebuilt`: the repository's files the last
/// stage copies, and in prebuilt/ the pier cargo built for these tests with the libraries and
/// loader it needs, and the host's CA bundle.
fn build_context(ctx: &Path) {
    copy_tree(
        &repo("deploy/docker/rootfs"),
        &ctx.join("deploy/docker/rootfs"),
    );
    let root = ctx.join("prebuilt");
    install(&pier_bin(), &root.join("usr/local/bin/pier"));
    install(
        Path::new("/etc/ssl/certs/ca-certificates.crt"),
        &root.join("etc/ssl/certs/ca-certificates.crt"),
    );
    for lib in libraries(&pier_bin()) {
        install(&lib, &root.join(lib.strip_prefix("/").expect("absolute")));
    }
}

/// The image's configuration as `docker image inspect` shows it.
fn image_config(dockerd: &Dockerd, image: &str) -> serde_json::Value {
    let out =
        run(&mut dockerd.docker(&["image", "inspect", "--format", "{{json .Config}}", image]));
    serde_json::from_str(&stdout(&out)).expect("image config JSON")
}

/// Starts pier's image as operators would, on the host network (the private namespace this test
/// runs in) with the cache on the named volume, and its upstream the registry at `upstream`. The
/// only change to the image: the HEALTHCHECK's command runs every second instead of every 30.
fn start_pier(dockerd: &Dockerd, name: &str, image: &str, upstream: &str) {
    run(&mut dockerd.docker(&[
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--volume",
        "pier-cache:/var/lib/pier",
        "--env",
        &format!("PIER_UPSTREAM=http://{upstream}"),
        "--health-interval",
        "1s",
        image,
    ]));
}

/// Waits for the container's health check to pass; fails at once if it turns unhealthy or the
/// container stops.
fn wait_healthy(dockerd: &Dockerd, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = stdout(&run(&mut dockerd.docker(&[
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.Health.Status}}",
            name,
        ])));
        if state == "running healthy" {
            break;
        }
        if state != "running starting" || Instant::now() > deadline {
            let logs = dockerd
                .docker(&["logs", name])
                .output()
                .expect("docker logs");
            let health = dockerd
                .docker(&["inspect", "--format", "{{json .State.Health}}", name])
                .output()
                .expect("docker inspect");
            panic!(
                "{name} is {state}: health {}\nlogs:\n{}{}",
                String::from_utf8_lossy(&health.stdout),
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // What turned it healthy is the image's own command, pier probe, answering 0.
    let health: serde_json::Value = serde_json::from_str(&stdout(&run(&mut dockerd.docker(&[
        "inspect",
        "--format",
        "{{json .State.Health}}",
        name,
    ]))))
    .expect("health JSON");
    let last = health["Log"]
        .as_array()
        .and_then(|log| log.last())
        .expect("a health check ran");
    assert_eq!(last["ExitCode"], 0, "{health}");
}

/// Removes the containers when dropped (before the daemon stops: declare this after it), so that
/// no container outlives the test.
struct Containers<'a>(&'a Dockerd, &'static [&'static str]);

impl Drop for Containers<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .docker(&[&["rm", "--force", "--volumes"], self.1].concat())
            .output();
    }
}

#[test]
fn image_caches_on_its_volume_as_its_user_and_turns_healthy() {
    if !require(&[
        "docker-registry",
        "skopeo",
        "dockerd",
        DOCKER,
        "ldd",
        "unshare",
        "ip",
    ]) {
        return;
    }
    in_private_network(|| {
        let started = Instant::now();
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = tmp.path().join("src");
        image::two_platform_index(&layout, "1.0", &[200_000, 1_000_000]);
        let original = image::blobs(&layout);
        let mut upstream = registry(&tmp.path().join("registry"));
        push_image(
            &layout,
            "1.0",
            &format!("{}/library/app:1.0", upstream.addr),
            true,
        );

        let context = tmp.path().join("context");
        build_context(&context);
        let dockerd = Dockerd::start(&tmp.path().join("docker"), &[]);
        let _containers = Containers(&dockerd, &["pier-1", "pier-2"]);
        let image = "pier:test";
        run(&mut dockerd.docker(&[
            "build",
            "--file",
            &path_str(&repo("deploy/docker/Dockerfile")),
            "--build-arg",
            "PIER_SOURCE=prebuilt",
            "--tag",
            image,
            &path_str(&context),
        ]));
        eprintln!("image built after {:?}", started.elapsed());

        // The shape the Dockerfile gives the image.
        let config = image_config(&dockerd, image);
        assert_eq!(config["User"], "10001:10001", "{config}");
        assert_eq!(config["WorkingDir"], "/var/lib/pier", "{config}");
        assert_eq!(
            config["Entrypoint"],
            serde_json::json!(["/usr/local/bin/pier"])
        );
        assert_eq!(
            config["Cmd"],
            serde_json::json!(["serve", "--config", "/etc/pier/mirror.yaml"])
        );
        assert!(config["Volumes"]["/var/lib/pier"].is_object(), "{config}");
        for port in ["5000/tcp", "9090/tcp"] {
            assert!(config["ExposedPorts"][port].is_object(), "{config}");
        }
        assert_eq!(
            config["Healthcheck"]["Test"],
            serde_json::json!([
                "CMD",
                "/usr/local/bin/pier",
                "probe",
                "http://127.0.0.1:9090/readyz"
            ])
        );
        assert_eq!(config["Healthcheck"]["Interval"], 30_000_000_000u64);

        // Pull through the image's pier, on its default ports.
        start_pier(&dockerd, "pier-1", image, &upstream.addr);
        wait_healthy(&dockerd, "pier-1");
        let pull = |into: &str| {
            let dest = tmp.path().join(into);
            skopeo(&[
                "copy",
                "--all",
                "--src-tls-verify=false",
                "docker://127.0.0.1:5000/app:1.0",
                &format!("oci:{}:1.0", path_str(&dest)),
            ]);
            image::blobs(&dest)
        };
        let first = pull("first");
        assert!(first == original, "the pull through the image differs");

        // The cache is on the named volume, written by the image's user.
        let volume = PathBuf::from(stdout(&run(&mut dockerd.docker(&[
            "volume",
            "inspect",
            "--format",
            "{{.Mountpoint}}",
            "pier-cache",
        ]))));
        let meta = std::fs::metadata(&volume).expect("volume");
        assert_eq!(
            (meta.uid(), meta.gid()),
            (UID, UID),
            "volume not owned by the image's user"
        );
        for (hex, bytes) in &original {
            let path = volume.join("cache/blobs/sha256").join(&hex[..2]).join(hex);
            let cached = std::fs::read(&path).expect("blob in the volume's cache");
            assert!(&cached == bytes, "cached {hex} differs");
            assert_eq!(
                std::fs::metadata(&path).expect("blob").uid(),
                UID,
                "{hex} not written by the image's user"
            );
        }

        // The upstream goes away and a new container takes over the volume: it serves the same
        // pull from the cache the first one left there.
        upstream.stop();
        run(&mut dockerd.docker(&["rm", "--force", "pier-1"]));
        start_pier(&dockerd, "pier-2", image, &upstream.addr);
        wait_healthy(&dockerd, "pier-2");
        let second = pull("second");
        assert!(
            second == original,
            "the pull with the upstream stopped differs"
        );
        eprintln!("done after {:?}", started.elapsed());
    });
}
