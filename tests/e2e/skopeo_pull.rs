//! skopeo pulls a generated two-platform image through pier from a real registry, then pulls it
//! again by tag with the registry stopped: pier serves the tag stale and every blob from disk.

use crate::support::image;
use crate::support::process::{path_str, pier, push_image, registry, skopeo};
use crate::support::require;

#[test]
fn skopeo_pulls_through_pier_and_again_with_upstream_down() {
    if !require(&["docker-registry", "skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    let index = image::two_platform_index(&layout, "1.0", &[300_000, 2_500_000]);

    let mut upstream = registry(&tmp.path().join("registry"));
    push_image(
        &layout,
        "1.0",
        &format!("{}/library/app:1.0", upstream.addr),
        true,
    );

    // tag_ttl 0: every pull by tag revalidates, so the second pull below has to fall back to
    // the cached tag when the upstream is gone.
    let cache = tmp.path().join("cache");
    let config = tmp.path().join("mirror.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  - name: docker.io\n    url: http://{}\n    tag_ttl: 0s\n",
            upstream.addr
        ),
    )
    .expect("write config");
    let mirror = pier(&[
        "--config",
        &path_str(&config),
        "--cache-dir",
        &path_str(&cache),
    ]);

    // Pull by tag through pier; the Docker Hub convention lets "app" stand for "library/app".
    let first = tmp.path().join("first");
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{}/app:1.0", mirror.addr),
        &format!("oci:{}:1.0", path_str(&first)),
    ]);
    let original = image::blobs(&layout);
    let pulled = image::blobs(&first);
    assert_eq!(
        original.keys().collect::<Vec<_>>(),
        pulled.keys().collect::<Vec<_>>(),
        "the pull through pier did not bring the same blobs (manifests included)"
    );
    assert!(original == pulled, "blob bytes differ");
    assert!(
        pulled.contains_key(index.top.digest.trim_start_matches("sha256:")),
        "index digest changed"
    );

    // The upstream goes away; the same pull must come entirely from pier's disk.
    upstream.stop();
    let second = tmp.path().join("second");
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{}/library/app:1.0", mirror.addr),
        &format!("oci:{}:1.0", path_str(&second)),
    ]);
    assert!(
        image::blobs(&second) == original,
        "offline pull differs from the original"
    );

    // The cache holds every blob under its digest, byte for byte.
    for (hex, bytes) in &original {
        let cached = std::fs::read(cache.join("blobs/sha256").join(&hex[..2]).join(hex))
            .expect("blob in cache");
        assert!(&cached == bytes, "cached {hex} differs");
    }
}
