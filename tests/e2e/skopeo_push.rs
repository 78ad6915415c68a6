//! skopeo pushes a generated two-platform image into a hosted repository of pier, copies it to
//! another hosted repository (cross-repository mounts), and pulls both back byte for byte; the
//! upstream is never running: hosted repositories need none.

use crate::support::image;
use crate::support::process::{path_str, pier, push_image, skopeo};
use crate::support::{free_port, http_get, require};

#[test]
fn skopeo_pushes_to_a_hosted_repository_and_pulls_it_back() {
    if !require(&["skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    let index = image::two_platform_index(&layout, "1.0", &[300_000, 2_500_000]);
    let config = tmp.path().join("mirror.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  - name: docker.io\n    url: http://127.0.0.1:{}\n\
             hosted:\n  repositories: [\"team/**\"]\n  allow_anonymous_push: true\n",
            free_port()
        ),
    )
    .expect("write config");
    let cache = tmp.path().join("cache");
    let mirror = pier(&[
        "--config",
        &path_str(&config),
        "--cache-dir",
        &path_str(&cache),
    ]);

    push_image(
        &layout,
        "1.0",
        &format!("{}/team/app:1.0", mirror.addr),
        true,
    );
    // Registry to registry: skopeo mounts the blobs it knows pier has.
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{}/team/app:1.0", mirror.addr),
        &format!("docker://{}/team/copy:1.0", mirror.addr),
    ]);
    let original = image::blobs(&layout);
    for repo in ["team/app", "team/copy"] {
        let back = tmp.path().join(repo.replace('/', "-"));
        skopeo(&[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{}/{repo}:1.0", mirror.addr),
            &format!("oci:{}:1.0", path_str(&back)),
        ]);
        assert!(
            image::blobs(&back) == original,
            "{repo}: pulled back differs from what was pushed"
        );
    }
    let (status, body) = http_get(&mirror.addr, "/v2/team/app/tags/list");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"1.0\""), "{body}");
    let (_, body) = http_get(&mirror.addr, "/v2/_catalog");
    assert!(
        body.contains("team/app") && body.contains("team/copy"),
        "{body}"
    );
    let top = index.top.digest.clone();
    let (status, _) = http_get(&mirror.addr, &format!("/v2/team/copy/manifests/{top}"));
    assert_eq!(status, 200);
}
