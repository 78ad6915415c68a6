//! A region of pier nodes on a real S3 server (SeaweedFS) in front of a real registry: one
//! upstream fetch per blob for the whole region, a new node with an empty disk serving what the
//! region holds (also with the upstream stopped), pulls surviving the shared store's loss, and
//! the peer interface closed to requests without the region's secret.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::support::image::{self, sha256_hex};
use crate::support::process::{
    path_str, pier_at, push_image, registry, registry_requests, skopeo, Running,
};
use crate::support::{free_port, http_get, require};

const ACCESS_KEY: &str = "pier-test";
const SECRET_KEY: &str = "pier-test-secret-key";
const BUCKET: &str = "region";
const CLUSTER_SECRET: &str = "a-region-secret-of-some-length";

/// SeaweedFS in one process (`weed mini`), S3 on its own port.
struct Seaweed {
    child: Child,
    s3: String,
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seaweed(dir: &Path) -> Seaweed {
    // A port picked here can be taken by someone else before weed binds it, and weed then exits
    // at once: try again with new ports.
    let mut last = String::new();
    for _ in 0..3 {
        match try_seaweed(dir) {
            Ok(s) => return s,
            Err(e) => last = e,
        }
    }
    panic!("SeaweedFS did not start: {last}");
}

fn try_seaweed(dir: &Path) -> Result<Seaweed, String> {
    std::fs::create_dir_all(dir).expect("mkdir seaweed");
    let s3 = format!("127.0.0.1:{}", free_port());
    let port = s3.rsplit(':').next().unwrap_or_default().to_string();
    let log_path = dir.join("weed.log");
    let log = std::fs::File::create(&log_path).expect("weed log");
    // Every port it opens chosen here, so that it collides with nothing else on the machine;
    // the Iceberg and Lance servers (fixed default ports) off.
    let mut args = vec![
        "mini".to_string(),
        format!("-dir={}", dir.display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        format!("-s3.port={port}"),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
    ];
    for flag in [
        "s3.port.grpc",
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "webdav.port",
        "admin.port",
        "admin.port.grpc",
        "metricsPort",
    ] {
        args.push(format!("-{flag}={}", free_port()));
    }
    let mut child = Command::new("weed")
        .args(&args)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start weed");
    // Up when a signed bucket creation succeeds.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            return Err(format!("weed exited with {status}: {tail:?}"));
        }
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
                "--user",
                &format!("{ACCESS_KEY}:{SECRET_KEY}"),
                "-X",
                "PUT",
                &format!("http://{s3}/{BUCKET}"),
            ])
            .output()
            .expect("run curl");
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        if code == "200" || code == "409" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SeaweedFS did not come up ({code})"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(Seaweed { child, s3 })
}

/// Keys under `prefix` in the bucket (a signed ListObjectsV2).
fn list_keys(s3: &str, prefix: &str) -> Vec<String> {
    let out = Command::new("curl")
        .args([
            "-s",
            "--aws-sigv4",
            "aws:amz:us-east-1:s3",
            "--user",
            &format!("{ACCESS_KEY}:{SECRET_KEY}"),
            // SigV4 signs the query as encoded: '/' must be %2F.
            &format!(
                "http://{s3}/{BUCKET}?list-type=2&prefix={}",
                prefix.replace('/', "%2F")
            ),
        ])
        .output()
        .expect("run curl");
    let xml = String::from_utf8_lossy(&out.stdout).to_string();
    xml.split("<Key>")
        .skip(1)
        .filter_map(|s| s.split("</Key>").next())
        .map(str::to_string)
        .collect()
}

/// The digest and size of the first layer of `img`, written in the OCI layout `layout`.
fn first_layer(layout: &Path, img: &image::Image) -> (String, u64) {
    let hex = img.top.digest.trim_start_matches("sha256:");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(hex)).expect("read manifest"),
    )
    .expect("manifest JSON");
    let layer = &manifest["layers"][0];
    (
        layer["digest"].as_str().expect("layer digest").to_string(),
        layer["size"].as_u64().expect("layer size"),
    )
}

/// Every object under the store's blob keys holds exactly the bytes of its digest: nothing
/// partial or wrong was ever completed there.
fn assert_store_holds_only_verified_blobs(s3: &str) {
    for key in list_keys(s3, "pier/blobs/sha256/") {
        let out = Command::new("curl")
            .args([
                "-s",
                "--aws-sigv4",
                "aws:amz:us-east-1:s3",
                "--user",
                &format!("{ACCESS_KEY}:{SECRET_KEY}"),
                &format!("http://{s3}/{BUCKET}/{key}"),
            ])
            .output()
            .expect("curl");
        let hex = key.rsplit('/').next().unwrap_or_default();
        assert_eq!(
            sha256_hex(&out.stdout),
            hex,
            "{key} holds a partial or wrong object"
        );
    }
}

/// A TCP proxy to `target` that sends answers at most `bytes_per_sec`: a slow upstream link.
fn slow_link(target: String, bytes_per_sec: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr").to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            let (mut c2, mut s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            let (mut client, mut server) = (client, server);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let mut buf = vec![0u8; bytes_per_sec / 20];
                loop {
                    match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if client.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// GET `path` from `addr` over HTTP/1.1: (status, sha256 hex of the body, body length).
fn get_hashed(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, u64) {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write request");
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line).expect("status line");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut chunked = false;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("header");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if line
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
        {
            chunked = true;
        }
    }
    assert!(!chunked, "blob answers carry a Content-Length");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).expect("read body");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    (status, format!("{:x}", hasher.finalize()), total)
}

struct Region {
    tmp: tempfile::TempDir,
    upstream: Running,
    link: String,
    s3: Seaweed,
    secret_file: PathBuf,
}

impl Region {
    /// A node of the region at `addr` with `peers`, caching under `name`.
    fn node(&self, name: &str, addr: &str, peers: &[&str]) -> Running {
        let config = self.tmp.path().join(format!("{name}.yaml"));
        let peers: Vec<String> = peers.iter().map(|p| format!("\"http://{p}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "upstreams:\n  - name: docker.io\n    url: http://{link}\n    tag_ttl: 1h\n\
                 cluster:\n  advertise: http://{addr}\n  peers: [{peers}]\n  secret_file: {secret}\n  peer_timeout: 5s\n\
                 shared_store:\n  endpoint: http://{s3}\n  bucket: {BUCKET}\n  prefix: pier/\n  \
                 access_key_id_env: PIER_TEST_S3_KEY\n  secret_access_key_env: PIER_TEST_S3_SECRET\n",
                link = self.link,
                peers = peers.join(", "),
                secret = self.secret_file.display(),
                s3 = self.s3.s3,
            ),
        )
        .expect("write config");
        std::env::set_var("PIER_TEST_S3_KEY", ACCESS_KEY);
        std::env::set_var("PIER_TEST_S3_SECRET", SECRET_KEY);
        let cache = self.tmp.path().join(name);
        pier_at(
            addr,
            &[
                "--config",
                &path_str(&config),
                "--cache-dir",
                &path_str(&cache),
            ],
        )
    }
}

fn blob_gets(registry_dir: &Path, digest: &str) -> usize {
    registry_requests(registry_dir)
        .iter()
        .filter(|r| r.starts_with("GET ") && r.ends_with(&format!("/blobs/{digest}")))
        .count()
}

#[test]
fn a_region_fetches_once_serves_new_nodes_offline_and_outlives_its_store() {
    if !require(&["docker-registry", "skopeo", "weed", "curl"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    // One big layer (the cold blob 30 clients ask for at once) and a small one.
    let img = image::single_image(&layout, "1.0", &[24 << 20, 200_000]);
    image::single_image(&tmp.path().join("src2"), "2.0", &[300_000]);
    let registry_dir = tmp.path().join("registry");
    let upstream = registry(&registry_dir);
    push_image(
        &layout,
        "1.0",
        &format!("{}/library/app:1.0", upstream.addr),
        false,
    );
    push_image(
        &tmp.path().join("src2"),
        "2.0",
        &format!("{}/library/other:2.0", upstream.addr),
        false,
    );
    // 12 MB/s: the 24 MiB layer takes about two seconds, so every client arrives mid-fill.
    let link = slow_link(upstream.addr.clone(), 12 << 20);
    let s3 = seaweed(&tmp.path().join("seaweed"));
    let secret_file = tmp.path().join("cluster-secret");
    std::fs::write(&secret_file, format!("{CLUSTER_SECRET}\n")).expect("secret");
    let region = Region {
        tmp,
        upstream,
        link,
        s3,
        secret_file,
    };
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let peers: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let nodes: Vec<Running> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| region.node(&format!("node{i}"), a, &peers))
        .collect();

    // 30 clients over the three nodes on the cold big layer: one upstream GET, 30 good bodies.
    let (digest, layer_size) = first_layer(&layout, &img);
    let want = digest.trim_start_matches("sha256:").to_string();
    let clients: Vec<_> = (0..30)
        .map(|i| {
            let addr = nodes[i % 3].addr.clone();
            let path = format!("/v2/library/app/blobs/{digest}");
            std::thread::spawn(move || get_hashed(&addr, &path, &[]))
        })
        .collect();
    for c in clients {
        let (status, hash, len) = c.join().expect("client thread");
        assert_eq!(status, 200);
        assert_eq!(len, layer_size);
        assert_eq!(hash, want, "a client got wrong bytes");
    }
    assert_eq!(
        blob_gets(&registry_dir, &digest),
        1,
        "the region fetched the layer more than once: {:?}",
        registry_requests(&registry_dir)
    );

    // The whole image through the region, so that every part of it is shared.
    let dir = region.tmp.path().to_path_buf();
    let oci = move |name: &str| format!("oci:{}", path_str(&dir.join(name)));
    for (i, node) in nodes.iter().enumerate() {
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}/library/app:1.0", node.addr),
            &oci(&format!("pulled-{i}")),
        ]);
    }
    // The tag was resolved by its owner for the region: one manifest GET upstream, and the
    // other nodes asked no upstream for any manifest.
    let tag_owner = owner_rank("docker.io/library/app:1.0", &peers)[0];
    let manifest_gets = registry_requests(&registry_dir)
        .iter()
        .filter(|r| r.starts_with("GET /v2/library/app/manifests/"))
        .count();
    assert_eq!(manifest_gets, 1, "{:?}", registry_requests(&registry_dir));
    for node in nodes.iter().filter(|n| n.addr != tag_owner) {
        let (_, metrics) = http_get(&node.ops, "/metrics");
        let asked: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                l.starts_with("pier_upstream_requests_total{") && l.contains("kind=\"manifest")
            })
            .collect();
        assert!(
            asked.is_empty(),
            "{} asked the upstream itself: {asked:?}",
            node.addr
        );
        assert!(
            metrics.contains("pier_region_lookups_total{result=\"owner_hit\"}"),
            "{} never asked an owner",
            node.addr
        );
    }
    // Uploads to the store run beside the fills: give them a moment to complete.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !list_keys(&region.s3.s3, "pier/blobs/")
        .iter()
        .any(|k| k.ends_with(&want))
    {
        assert!(
            Instant::now() < deadline,
            "the layer never reached the shared store"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));

    // A fourth node, empty disk, which no other node lists: the image with no upstream request.
    let before = registry_requests(&registry_dir).len();
    let fourth_addr = format!("127.0.0.1:{}", free_port());
    let mut fourth_peers = peers.clone();
    fourth_peers.push(&fourth_addr);
    let fourth = region.node("node3", &fourth_addr, &fourth_peers);
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/library/app:1.0", fourth.addr),
        &oci("pulled4"),
    ]);
    assert_eq!(
        registry_requests(&registry_dir).len(),
        before,
        "a new node went upstream for what the region holds: {:?}",
        &registry_requests(&registry_dir)[before..]
    );
    drop(fourth);

    // A peer request without the secret, or with another, is refused.
    let peer_path = format!("/_pier/region/v1/blobs/{digest}?upstream=docker.io&repo=library/app");
    let (status, _, _) = get_hashed(&nodes[0].addr, &peer_path, &[]);
    assert_eq!(status, 401, "a peer request without the secret was served");
    let (status, _, _) = get_hashed(
        &nodes[0].addr,
        &peer_path,
        &[("X-Pier-Region-Secret", "not-the-region-secret-at-all")],
    );
    assert_eq!(status, 401, "a peer request with a wrong secret was served");
    let (status, hash, _) = get_hashed(
        &nodes[0].addr,
        &peer_path,
        &[("X-Pier-Region-Secret", CLUSTER_SECRET)],
    );
    assert_eq!((status, hash.as_str()), (200, want.as_str()));

    // The shared store stopped: pulls go on through the local tiers and the upstream.
    let Region {
        tmp,
        mut upstream,
        link,
        s3,
        secret_file,
    } = region;
    drop(s3);
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/library/other:2.0", nodes[2].addr),
        &format!("oci:{}", path_str(&tmp.path().join("other-no-store"))),
    ]);
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/library/app:1.0", nodes[0].addr),
        &format!("oci:{}", path_str(&tmp.path().join("app-no-store"))),
    ]);

    // The store back (same data), the upstream stopped: a fifth node with an empty disk serves
    // the image by tag and by digest.
    let s3 = seaweed(&tmp.path().join("seaweed"));
    upstream.stop();
    let region = Region {
        tmp,
        upstream,
        link,
        s3,
        secret_file,
    };
    let fifth_addr = format!("127.0.0.1:{}", free_port());
    let fifth = region.node("node4", &fifth_addr, &[fifth_addr.as_str()]);
    // A HEAD for a layer the region holds, before this node has it: its size, from the store.
    let head = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-I",
            "-w",
            "%{http_code} %header{content-length}",
            &format!("http://{}/v2/library/app/blobs/{digest}", fifth.addr),
        ])
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&head.stdout),
        format!("200 {layer_size}"),
        "HEAD of a region-held layer with the upstream down"
    );
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/library/app:1.0", fifth.addr),
        &oci("offline-tag"),
    ]);
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/library/app@{}", fifth.addr, img.top.digest),
        &oci("offline-digest"),
    ]);
    // What it served is the image that was pushed.
    let pulled = image::blobs(&region.tmp.path().join("offline-tag"));
    assert!(
        pulled.contains_key(&want),
        "the big layer is missing offline"
    );
    assert_eq!(sha256_hex(&pulled[&want]), want);
    // Nothing partial or wrong under a blob key: every object's key is its content's digest.
    assert_store_holds_only_verified_blobs(&region.s3.s3);
    drop(nodes);
}

/// The region's owner ranking for `key`, as pier computes it (rendezvous hashing with SHA-256),
/// so that the test knows which node to kill.
fn owner_rank<'a>(key: &str, nodes: &[&'a str]) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> = nodes
        .iter()
        .map(|n| {
            let mut h = Sha256::new();
            h.update(format!("http://{n}").as_bytes());
            h.update([0]);
            h.update(key.as_bytes());
            let out = h.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&out[..8]);
            (u64::from_be_bytes(first), *n)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.into_iter().map(|(_, n)| n).collect()
}

#[test]
fn the_owner_killed_mid_fill_costs_a_fetch_not_a_pull() {
    if !require(&["docker-registry", "skopeo", "weed", "curl"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("src");
    let img = image::single_image(&layout, "1.0", &[32 << 20]);
    let registry_dir = tmp.path().join("registry");
    let upstream = registry(&registry_dir);
    push_image(
        &layout,
        "1.0",
        &format!("{}/library/big:1.0", upstream.addr),
        false,
    );
    let (digest, _) = first_layer(&layout, &img);
    let want = digest.trim_start_matches("sha256:").to_string();
    // 8 MB/s: the 32 MiB layer takes about four seconds.
    let link = slow_link(upstream.addr.clone(), 8 << 20);
    let s3 = seaweed(&tmp.path().join("seaweed"));
    let secret_file = tmp.path().join("cluster-secret");
    std::fs::write(&secret_file, CLUSTER_SECRET).expect("secret");
    let region = Region {
        tmp,
        upstream,
        link,
        s3,
        secret_file,
    };
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let peers: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let mut nodes: Vec<Running> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| region.node(&format!("node{i}"), a, &peers))
        .collect();
    let owner = owner_rank(&digest, &peers)[0].to_string();
    let others: Vec<String> = addrs.iter().filter(|a| **a != owner).cloned().collect();

    // Ten clients on each of the two other nodes; their nodes ask the owner.
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let addr = others[i % 2].clone();
            let path = format!("/v2/library/big/blobs/{digest}");
            std::thread::spawn(move || get_hashed(&addr, &path, &[]))
        })
        .collect();
    // The owner dies about a second into its four-second fill.
    std::thread::sleep(Duration::from_millis(1200));
    let victim = nodes
        .iter_mut()
        .find(|n| n.addr == owner)
        .expect("owner node");
    victim.stop(); // SIGKILL
    for c in clients {
        let (status, hash, _) = c.join().expect("client thread");
        assert_eq!(status, 200);
        assert_eq!(hash, want, "a client of a surviving node got wrong bytes");
    }
    let gets = blob_gets(&registry_dir, &digest);
    assert!(
        (1..=2).contains(&gets),
        "{gets} upstream GETs of the layer: the owner's, and at most one to finish it"
    );
    // The node that finished the fill from the upstream shares the whole verified blob.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !list_keys(&region.s3.s3, "pier/blobs/sha256/")
        .iter()
        .any(|k| k.ends_with(&want))
    {
        assert!(
            Instant::now() < deadline,
            "the layer finished after the owner died never reached the shared store"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The killed owner's upload was never completed: nothing but whole verified objects.
    assert_store_holds_only_verified_blobs(&region.s3.s3);
}
