//! Real clients push to hosted repositories: skopeo pushes a generated two-platform image,
//! copies it to another hosted repository (cross-repository mounts) and pulls both back byte for
//! byte; podman logs in and pushes through the token flow, where an anonymous push is refused;
//! containerd pulls a pushed image back by tag and by digest.
//! The upstream is never running: hosted repositories need none.

use std::process::Command;

use crate::docker::{run, stdout, wait_for, Daemon};
use crate::support::image;
use crate::support::process::{path_str, pier, pier_at, push_image, skopeo, skopeo_try, Running};
use crate::support::{free_port, http_get, require};

/// pier's arguments for a hosted `team/**` that anyone may push to (`extra`: more `hosted:` keys),
/// mirroring `upstream` (an address nothing listens on when `None`), caching under `dir`.
fn hosting_args(dir: &std::path::Path, upstream: Option<&str>, extra: &str) -> Vec<String> {
    let upstream = upstream.map_or_else(|| format!("127.0.0.1:{}", free_port()), str::to_string);
    let config = dir.join("mirror.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  - name: docker.io\n    url: http://{upstream}\n\
             hosted:\n  repositories: [\"team/**\"]\n  allow_anonymous_push: true\n{extra}"
        ),
    )
    .expect("write config");
    vec![
        "--config".into(),
        path_str(&config),
        "--cache-dir".into(),
        path_str(&dir.join("cache")),
    ]
}

/// pier started with [`hosting_args`].
fn hosting_pier(dir: &std::path::Path, upstream: Option<&str>, extra: &str) -> Running {
    let args = hosting_args(dir, upstream, extra);
    pier(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn skopeo_pushes_to_a_hosted_repository_and_pulls_it_back() {
    if !require(&["skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    let index = image::two_platform_index(&layout, "1.0", &[300_000, 2_500_000]);
    let mirror = hosting_pier(tmp.path(), None, "");

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
    // By digest too, every platform.
    let by_digest = tmp.path().join("by-digest");
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{}/team/app@{top}", mirror.addr),
        &format!("oci:{}:1.0", path_str(&by_digest)),
    ]);
    assert!(
        image::blobs(&by_digest) == original,
        "pulled back by digest differs from what was pushed"
    );
}

#[test]
fn podman_logs_in_and_pushes_an_anonymous_client_may_not() {
    if !require(&["skopeo", "podman"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    let img = image::single_image(&layout, "1.0", &[200_000]);
    let hash = bcrypt::hash("ci-pw", 4).expect("bcrypt");
    std::fs::write(tmp.path().join("htpasswd"), format!("ci:{hash}\n")).expect("htpasswd");
    let config = tmp.path().join("mirror.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  - name: docker.io\n    url: http://127.0.0.1:{}\n\
             hosted:\n  repositories: [\"team/**\"]\n\
             auth:\n  htpasswd: {}\n  anonymous: true\n  users:\n    ci:\n\
             \x20     - repository: team/**\n        actions: [pull, push]\n",
            free_port(),
            path_str(&tmp.path().join("htpasswd")),
        ),
    )
    .expect("write config");
    let mirror = pier(&[
        "--config",
        &path_str(&config),
        "--cache-dir",
        &path_str(&tmp.path().join("cache")),
    ]);
    // Anonymous: pulls are on, pushes are not.
    let refused = skopeo_try(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:1.0", path_str(&layout)),
        &format!("docker://{}/team/podman:1.0", mirror.addr),
    ]);
    assert!(!refused.status.success(), "an anonymous push went through");

    let d = tmp.path().join("podman");
    std::fs::create_dir_all(&d).expect("podman dir");
    std::fs::write(d.join("auth.json"), "{}").expect("auth file");
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .args([
                "--root",
                &path_str(&d.join("root")),
                "--runroot",
                &path_str(&d.join("run")),
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
    // Into podman's storage (a pull from an OCI layout would name it after the path).
    skopeo(&[
        "copy",
        &format!("oci:{}:1.0", path_str(&layout)),
        &format!(
            "containers-storage:[vfs@{}+{}]localhost/app:1.0",
            path_str(&d.join("root")),
            path_str(&d.join("run"))
        ),
    ]);
    let local = "localhost/app:1.0";
    run(&mut podman(&[
        "login",
        "--tls-verify=false",
        "-u",
        "ci",
        "-p",
        "ci-pw",
        &mirror.addr,
    ]));
    let digest_file = d.join("pushed-digest");
    run(&mut podman(&[
        "push",
        "--tls-verify=false",
        "--digestfile",
        &path_str(&digest_file),
        local,
        &format!("{}/team/podman:1.0", mirror.addr),
    ]));
    // podman pulls it back by tag and by digest, its local copy gone first.
    let pushed = std::fs::read_to_string(&digest_file).expect("digest file");
    let by_digest = format!("{}/team/podman@{}", mirror.addr, pushed.trim());
    run(&mut podman(&["rmi", "-f", local]));
    run(&mut podman(&[
        "pull",
        "--tls-verify=false",
        &format!("{}/team/podman:1.0", mirror.addr),
    ]));
    run(&mut podman(&["pull", "--tls-verify=false", &by_digest]));
    let id = stdout(&run(&mut podman(&[
        "image", "inspect", "--format", "{{.Id}}", &by_digest,
    ])));
    let (_, pushed_config) = img.amd64();
    assert_eq!(
        id.trim(),
        pushed_config.digest.trim_start_matches("sha256:"),
        "podman pulled back another image"
    );
    // Anyone may pull it back (anonymous pulls are on): the same config, so the same image.
    let back = tmp.path().join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/team/podman:1.0", mirror.addr),
        &format!("oci:{}:1.0", path_str(&back)),
    ]);
    let (_, config_blob) = img.amd64();
    assert!(
        image::blobs(&back).contains_key(config_blob.digest.trim_start_matches("sha256:")),
        "the image pulled back has another config"
    );
}

/// containerd pulls a pushed two-platform image back from pier by tag and by digest (plain
/// HTTP, no mirror configuration: pier is the registry).
#[test]
fn containerd_pulls_a_hosted_image_by_tag_and_digest() {
    if !require(&["skopeo", "containerd", "ctr"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    let index = image::two_platform_index(&layout, "1.0", &[200_000, 900_000]);
    let mirror = hosting_pier(tmp.path(), None, "");
    push_image(
        &layout,
        "1.0",
        &format!("{}/team/app:1.0", mirror.addr),
        true,
    );

    let d = tmp.path().join("containerd");
    std::fs::create_dir_all(&d).expect("mkdir");
    let sock = d.join("containerd.sock");
    let cfg = d.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n",
            path_str(&d.join("root")),
            path_str(&d.join("state")),
            path_str(&sock)
        ),
    )
    .expect("config.toml");
    let log = std::fs::File::create(d.join("containerd.log")).expect("log");
    let _containerd = Daemon(
        Command::new("containerd")
            .args(["--config", &path_str(&cfg)])
            .stdout(std::process::Stdio::null())
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
    let by_tag = format!("{}/team/app:1.0", mirror.addr);
    let by_digest = format!("{}/team/app@{}", mirror.addr, index.top.digest);
    for reference in [&by_tag, &by_digest] {
        run(&mut ctr(&["images", "pull", "--plain-http", reference]));
    }
    let list = stdout(&run(&mut ctr(&["images", "ls"])));
    let tagged = list
        .lines()
        .find(|l| l.starts_with(&by_tag))
        .unwrap_or_else(|| panic!("{by_tag} not listed: {list}"));
    assert!(tagged.contains(&index.top.digest), "{list}");
    // Every blob containerd fetched verified against its digest; check it holds the content too.
    run(&mut ctr(&["images", "check"]));
}

/// One HTTP/1.1 exchange over a fresh connection: (status, head, body).
fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write head");
    s.write_all(body).expect("write body");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read answer");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head, buf[split + 4..].to_vec())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A chunked upload broken off mid-chunk and by a restart of pier resumes where the session
/// stood: the broken chunk is not half-kept, the status says where to go on, and the finished
/// blob is the one that was sent.
#[test]
fn a_chunked_upload_interrupted_and_resumed_after_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let args = hosting_args(tmp.path(), None, "");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut mirror = pier_at(&addr, &args);

    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let digest = format!("sha256:{}", image::sha256_hex(&data));
    let half = data.len() / 2;
    let (status, head, _) = exchange(&addr, "POST", "/v2/team/chunked/blobs/uploads/", &[], b"");
    assert_eq!(status, 202, "{head}");
    let location = header(&head, "location").expect("Location").to_string();
    let location = location
        .strip_prefix(&format!("http://{addr}"))
        .unwrap_or(&location)
        .to_string();
    let octets = ("Content-Type", "application/octet-stream".to_string());
    let (status, head, _) = exchange(
        &addr,
        "PATCH",
        &location,
        &[octets.clone(), ("Content-Range", format!("0-{}", half - 1))],
        &data[..half],
    );
    assert_eq!(status, 202, "{head}");
    // The client dies in the middle of the second chunk.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        write!(
            s,
            "PATCH {location} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Range: {half}-{}\r\nContent-Length: {}\r\n\r\n",
            data.len() - 1,
            data.len() - half
        )
        .expect("write head");
        s.write_all(&data[half..half + 100_000])
            .expect("write part");
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // And pier restarts.
    mirror.stop();
    let _mirror = pier_at(&addr, &args);
    let (status, head, _) = exchange(&addr, "GET", &location, &[], b"");
    assert_eq!(status, 204, "{head}");
    assert_eq!(
        header(&head, "range"),
        Some(format!("0-{}", half - 1).as_str()),
        "{head}"
    );
    let (status, head, _) = exchange(
        &addr,
        "PATCH",
        &location,
        &[
            octets,
            ("Content-Range", format!("{half}-{}", data.len() - 1)),
        ],
        &data[half..],
    );
    assert_eq!(status, 202, "{head}");
    let sep = if location.contains('?') { '&' } else { '?' };
    let (status, head, _) = exchange(
        &addr,
        "PUT",
        &format!("{location}{sep}digest={digest}"),
        &[],
        b"",
    );
    assert_eq!(status, 201, "{head}");
    assert_eq!(
        header(&head, "docker-content-digest"),
        Some(digest.as_str())
    );
    let (status, _, body) = exchange(
        &addr,
        "GET",
        &format!("/v2/team/chunked/blobs/{digest}"),
        &[],
        b"",
    );
    assert_eq!(status, 200);
    assert!(body == data, "the blob is not what was sent");
}

/// An image pulled through the mirror and then copied into a hosted repository by skopeo: its
/// layers are mounted from the mirrored repository, not uploaded again.
#[test]
fn layers_pulled_through_the_mirror_are_mounted_into_a_hosted_repository() {
    if !require(&["skopeo", "docker-registry"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    // Random layers: they compress to about their own size, far above what a config weighs.
    image::single_image(&layout, "1.0", &[400_000, 1_500_000]);
    let upstream = crate::support::process::registry(&tmp.path().join("registry"));
    push_image(
        &layout,
        "1.0",
        &format!("{}/library/app:1.0", upstream.addr),
        false,
    );
    let mirror = hosting_pier(tmp.path(), Some(&upstream.addr), "");
    let pulled = tmp.path().join("pulled");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/library/app:1.0", mirror.addr),
        &format!("oci:{}:1.0", path_str(&pulled)),
    ]);
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{}/library/app:1.0", mirror.addr),
        &format!("docker://{}/team/mounted:1.0", mirror.addr),
    ]);
    // The layers were mounted, not uploaded: the bytes pushed are fewer than the smaller layer's
    // (skopeo sends an image's small config blob without trying to reuse it).
    let (_, metrics) = http_get(&mirror.ops, "/metrics");
    let received: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("pier_hosted_received_bytes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        received < 100_000,
        "{received} bytes uploaded: the layers were not mounted"
    );
    let back = tmp.path().join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/team/mounted:1.0", mirror.addr),
        &format!("oci:{}:1.0", path_str(&back)),
    ]);
    assert!(image::blobs(&back) == image::blobs(&pulled));
}

/// A push past the hosted budget is refused with an error that names it, and leaves nothing
/// counted against the budget or listed.
#[test]
fn a_push_past_the_hosted_budget_is_refused_and_leaves_nothing() {
    if !require(&["skopeo"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    image::single_image(&layout, "1.0", &[1_500_000]);
    let mirror = hosting_pier(tmp.path(), None, "  max_size: 1MB\n");
    let out = skopeo_try(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:1.0", path_str(&layout)),
        &format!("docker://{}/team/big:1.0", mirror.addr),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a push past the budget went through");
    assert!(err.contains("hosted.max_size"), "{err}");
    let (_, metrics) = http_get(&mirror.ops, "/metrics");
    assert!(
        metrics.lines().any(|l| l == "pier_hosted_bytes 0"),
        "something was kept: {}",
        metrics
            .lines()
            .filter(|l| l.starts_with("pier_hosted"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let (status, _) = http_get(&mirror.addr, "/v2/team/big/manifests/1.0");
    assert_eq!(status, 404);
}
