//! `pier warm` fills the cache from a real registry so that pulls succeed with the registry gone:
//! directly on a stopped cache directory, and through a running pier's admin API.

use std::process::Command;

use crate::support::image;
use crate::support::process::{path_str, pier, push_image, registry, skopeo};
use crate::support::{free_port, require};

fn pier_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(crate::support::pier_bin())
        .args(args)
        .output()
        .expect("run pier");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn cached(cache: &std::path::Path, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    cache
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists()
}

#[test]
fn warm_a_stopped_cache_then_pull_with_the_upstream_down() {
    if !require(&["docker-registry", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    let img = image::two_platform_index(&layout, "1.0", &[150_000, 600_000]);
    let mut upstream = registry(&tmp.path().join("registry"));
    push_image(
        &layout,
        "1.0",
        &format!("{}/library/app:1.0", upstream.addr),
        true,
    );
    let cache = tmp.path().join("cache");
    let config = tmp.path().join("mirror.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  - name: docker.io\n    url: http://{}\n    tag_ttl: 0s\n",
            upstream.addr
        ),
    )
    .expect("config");
    let dir_args = [
        "--config",
        &path_str(&config),
        "--cache-dir",
        &path_str(&cache),
    ];

    let (ok, text) = pier_cli(&[&["warm"][..], &dir_args, &["app:1.0"]].concat());
    assert!(ok, "{text}");
    assert!(
        text.contains("app:1.0: 3 manifests, 6 blobs (0 of these already cached)"),
        "{text}"
    );
    for (_, m, c) in &img.platforms {
        assert!(cached(&cache, &m.digest) && cached(&cache, &c.digest));
    }
    // Again: everything is there already.
    let (ok, text) = pier_cli(&[&["warm"][..], &dir_args, &["app:1.0"]].concat());
    assert!(
        ok && text.contains("(9 of these already cached), 0.0 MiB fetched"),
        "{text}"
    );
    // Something that does not exist fails, with a non-zero exit.
    let (ok, text) = pier_cli(&[&["warm"][..], &dir_args, &["app:9.9"]].concat());
    assert!(!ok && text.contains("1 failed"), "{text}");

    upstream.stop();
    let mirror = pier(&[
        "--config",
        &path_str(&config),
        "--cache-dir",
        &path_str(&cache),
    ]);
    let out = tmp.path().join("out");
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{}/library/app:1.0", mirror.addr),
        &format!("oci:{}:1.0", path_str(&out)),
    ]);
    assert!(
        image::blobs(&out) == image::blobs(&layout),
        "the offline pull differs"
    );
}

#[test]
fn warm_through_the_admin_api_one_platform() {
    if !require(&["docker-registry", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    let img = image::two_platform_index(&layout, "1.0", &[100_000]);
    let mut upstream = registry(&tmp.path().join("registry"));
    push_image(
        &layout,
        "1.0",
        &format!("{}/library/app:1.0", upstream.addr),
        true,
    );
    let cache = tmp.path().join("cache");
    let admin = format!("127.0.0.1:{}", free_port());
    let mirror = pier(&[
        "--cache-dir",
        &path_str(&cache),
        "--upstream",
        &format!("http://{}", upstream.addr),
        "--admin-listen",
        &admin,
    ]);
    let (ok, text) = pier_cli(&[
        "warm",
        "--admin",
        &format!("http://{admin}"),
        "--platform",
        "linux/arm64",
        "library/app:1.0",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("2 manifests, 2 blobs"), "{text}");
    let arm = img
        .platforms
        .iter()
        .find(|(a, _, _)| a == "arm64")
        .expect("arm64");
    let amd = img
        .platforms
        .iter()
        .find(|(a, _, _)| a == "amd64")
        .expect("amd64");
    assert!(cached(&cache, &arm.2.digest), "arm64 config not warmed");
    assert!(
        !cached(&cache, &amd.2.digest),
        "amd64 was warmed although not asked for"
    );

    upstream.stop();
    let out = tmp.path().join("out");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--override-arch",
        "arm64",
        "--override-os",
        "linux",
        &format!("docker://{}/library/app:1.0", mirror.addr),
        &format!("oci:{}:1.0", path_str(&out)),
    ]);
    let pulled = image::blobs(&out);
    assert!(pulled.contains_key(arm.1.digest.trim_start_matches("sha256:")));
}
