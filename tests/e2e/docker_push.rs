//! The Docker CLI and daemon against hosted repositories: `docker login`, `docker push` (with
//! cross-repository mounts), `docker search`, pulls back, and garbage collection run while a
//! push and a pull are under way.

use std::process::Command;

use crate::docker::{run, stdout, Dockerd, DOCKER};
use crate::support::image;
use crate::support::process::{path_str, pier, skopeo};
use crate::support::{free_port, http_get, require};

/// POSTs to pier's admin API; the status and body.
fn admin_post(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn docker_logs_in_pushes_searches_and_pulls_while_garbage_is_collected() {
    if !require(&["skopeo", "dockerd", "curl", DOCKER]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let hash = bcrypt::hash("ci-pw", 4).expect("bcrypt");
    std::fs::write(tmp.path().join("htpasswd"), format!("ci:{hash}\n")).expect("htpasswd");
    let config = tmp.path().join("mirror.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  - name: docker.io\n    url: http://127.0.0.1:{}\n\
             hosted:\n  repositories: [\"team/**\"]\n  gc_interval: 0s\n  gc_grace: 2m\n\
             auth:\n  htpasswd: {}\n  anonymous: true\n  users:\n    ci:\n\
             \x20     - repository: team/**\n        actions: [pull, push, delete]\n",
            free_port(),
            path_str(&tmp.path().join("htpasswd"))
        ),
    )
    .expect("write config");
    let admin = format!("127.0.0.1:{}", free_port());
    let mirror = pier(&[
        "--config",
        &path_str(&config),
        "--cache-dir",
        &path_str(&tmp.path().join("cache")),
        "--admin-listen",
        &admin,
    ]);
    let registry = mirror.addr.clone();

    // Two images loaded into the daemon from archives: a small one, and one with large layers
    // that takes a while to push.
    let archive = |name: &str, sizes: &[usize]| {
        let layout = tmp.path().join(name);
        image::single_image(&layout, "1.0", sizes);
        let tar = tmp.path().join(format!("{name}.tar"));
        skopeo(&[
            "copy",
            &format!("oci:{}:1.0", path_str(&layout)),
            &format!("docker-archive:{}:{name}:1.0", path_str(&tar)),
        ]);
        tar
    };
    let small = archive("small", &[300_000, 1_200_000]);
    let large = archive("large", &[40_000_000, 40_000_000]);
    let dockerd = Dockerd::start(
        &tmp.path().join("docker"),
        &["--insecure-registry", &registry],
    );
    let client_config = tmp.path().join("docker-client");
    let docker = |args: &[&str]| {
        let mut c = dockerd.docker(args);
        c.env("DOCKER_CONFIG", &client_config);
        c
    };
    for tar in [&small, &large] {
        run(&mut docker(&["load", "-i", &path_str(tar)]));
    }

    // An anonymous push is refused; after `docker login`, it goes through.
    let app = format!("{registry}/team/app:1.0");
    run(&mut docker(&["tag", "small:1.0", &app]));
    let refused = docker(&["push", &app]).output().expect("docker push");
    assert!(!refused.status.success(), "an anonymous push went through");
    let mut login = docker(&["login", "-u", "ci", "--password-stdin", &registry]);
    login
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = login.spawn().expect("docker login");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"ci-pw").expect("password");
    }
    let out = child.wait_with_output().expect("docker login");
    assert!(
        out.status.success(),
        "docker login failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(&mut docker(&["push", &app]));
    // The same layers under another name: mounted, not uploaded again.
    let copy = format!("{registry}/team/tools/app-copy:1.0");
    run(&mut docker(&["tag", "small:1.0", &copy]));
    run(&mut docker(&["push", &copy]));

    // docker search, through the daemon's v1 search.
    let found = stdout(&run(&mut docker(&[
        "search",
        "--format",
        "{{.Name}}",
        &format!("{registry}/app"),
    ])));
    let names: Vec<&str> = found.lines().collect();
    assert!(
        names.contains(&"team/app") && names.contains(&"team/tools/app-copy"),
        "docker search found {names:?}"
    );

    // Pulled back by tag and by digest, after the local copies are gone.
    let repo_digest = stdout(&run(&mut docker(&[
        "image",
        "inspect",
        "--format",
        "{{index .RepoDigests 0}}",
        &app,
    ])))
    .trim()
    .to_string();
    assert!(repo_digest.contains("@sha256:"), "{repo_digest}");
    run(&mut docker(&["rmi", &app, &copy]));
    run(&mut docker(&["pull", &app]));
    run(&mut docker(&["pull", &repo_digest]));

    // A large push and a pull run while garbage collection runs again and again: none of them
    // loses anything (the push's blobs are within the grace period, the pulled ones live).
    let big = format!("{registry}/team/big:1.0");
    run(&mut docker(&["tag", "large:1.0", &big]));
    run(&mut docker(&["rmi", &app]));
    let mut push = docker(&["push", &big])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("docker push");
    let mut pull = docker(&["pull", &copy])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("docker pull");
    let mut runs = 0;
    let (pushed, pulled) = loop {
        let (status, body) = admin_post(&admin, "/admin/gc");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"removed\": 0"), "{body}");
        runs += 1;
        match (
            push.try_wait().expect("push"),
            pull.try_wait().expect("pull"),
        ) {
            (Some(a), Some(b)) => break (a, b),
            _ => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    assert!(
        pushed.success(),
        "docker push during garbage collection failed"
    );
    assert!(
        pulled.success(),
        "docker pull during garbage collection failed"
    );
    assert!(runs > 1, "garbage collection ran {runs} times");
    run(&mut docker(&["rmi", &big]));
    run(&mut docker(&["pull", &big]));
    let (status, body) = http_get(&registry, "/v2/team/big/tags/list");
    assert_eq!(status, 200, "{body}");

    // A deleted image: its manifest and layers no other manifest names are collected once
    // unused for the grace period; here, through `pier gc` on the stopped directory with no
    // grace at all.
    let digest = stdout(&run(&mut docker(&[
        "image",
        "inspect",
        "--format",
        "{{index .RepoDigests 0}}",
        &big,
    ])));
    let digest = digest.rsplit('@').next().expect("a digest").to_string();
    let status = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "DELETE",
        ])
        .args(["-u", "ci:ci-pw"])
        .arg(format!("http://{registry}/v2/team/big/manifests/{digest}"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&status.stdout), "202");
    drop(mirror);
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .expect("config")
            .replace("gc_grace: 2m", "gc_grace: 0s"),
    )
    .expect("write config");
    let gc = Command::new(crate::support::pier_bin())
        .args(["gc", "--config", &path_str(&config)])
        .args(["--cache-dir", &path_str(&tmp.path().join("cache"))])
        .output()
        .expect("pier gc");
    let said = String::from_utf8_lossy(&gc.stdout).into_owned();
    assert!(gc.status.success(), "{said}");
    assert!(
        said.contains("hosted: removed 4 objects (1 manifests)"),
        "pier gc said: {said}"
    );
}
