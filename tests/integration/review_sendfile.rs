//! Hostile review of the sendfile path: warm blob files sent by the kernel on plain HTTP/1
//! connections, and the streaming path everywhere else (HTTP/2, TLS, peers asking with ranges).
//! Whatever the client or the connection, the bytes are the blob's, never placeholders (zeros).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pier_server::tls::{Tls, TlsFiles};
use pier_server::ServerOptions;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fake_upstream::{hex, Behaviour, FakeUpstream};
use crate::harness::{client, launch, settle, wait_stored, Pier, Setup, UpstreamSpec};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Bytes that differ from their neighbours and are never all zeros, so that placeholder bytes or
/// a shifted piece show. `salt` makes blobs of the same length differ.
fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i * 7 + i / 251) as u8 ^ salt | 1)
        .collect()
}

fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// pier (memory tier off, so warm blobs are files) in front of a fake upstream.
async fn pier_with(up: &FakeUpstream, setup: impl FnOnce(&mut Setup)) -> Pier {
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    s.upstreams = vec![UpstreamSpec::new("docker.io", up.url())];
    s.hosted_repositories = vec!["local/*".into()];
    s.allow_anonymous_push = true;
    setup(&mut s);
    launch(s).await
}

/// Adds `data` to the upstream and pulls it once through pier, so that it is a warm file.
async fn warm(pier: &Pier, up: &FakeUpstream, data: &[u8]) -> String {
    let digest = up.add_blob(data.to_vec());
    let r = client()
        .get(format!("{}/v2/app/blobs/{digest}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap() == data);
    settle(pier).await;
    assert!(wait_stored(pier, &digest).await);
    digest
}

/// Pushes `data` to hosted `repo` in one POST.
async fn push(pier: &Pier, repo: &str, data: &[u8]) -> String {
    let d = digest_of(data);
    let r = client()
        .post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", pier.url))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    d
}

fn addr(pier: &Pier) -> String {
    pier.url.trim_start_matches("http://").to_string()
}

/// Reads a response head, up to its blank line.
async fn read_head(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = conn.read(&mut byte).await.expect("read");
        assert_eq!(
            n,
            1,
            "connection ended in a head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).expect("head is text")
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads one response: its head and (unless `head_only`) its body as Content-Length says.
async fn read_response(conn: &mut TcpStream, head_only: bool) -> (String, Vec<u8>) {
    let head = read_head(conn).await;
    let len: usize = header(&head, "content-length")
        .map(|v| v.parse().expect("length"))
        .unwrap_or(0);
    let mut body = vec![0u8; if head_only { 0 } else { len }];
    conn.read_exact(&mut body).await.expect("whole body");
    (head, body)
}

fn status(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn warm_blobs_reach_http1_clients_whole_and_in_every_range() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = pier_with(&up, |_| {}).await;
    let n = 3 * (1 << 20) + 17;
    let data = pattern(n, 3);
    let digest = warm(&pier, &up, &data).await;
    let c = reqwest::Client::builder().http1_only().build().unwrap();
    let url = format!("{}/v2/app/blobs/{digest}", pier.url);
    for _ in 0..2 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.content_length(), Some(n as u64));
        assert!(r.bytes().await.unwrap() == data, "whole blob differs");
    }
    let ranges: Vec<(String, usize, usize)> = vec![
        ("bytes=0-0".into(), 0, 1),
        (format!("bytes={}-{}", n - 1, n - 1), n - 1, n),
        (format!("bytes={}-", n - 1), n - 1, n),
        ("bytes=-1".into(), n - 1, n),
        ("bytes=-100".into(), n - 100, n),
        (format!("bytes=-{}", n + 10), 0, n),
        ("bytes=1048575-1048576".into(), 1_048_575, 1_048_577),
        ("bytes=5-".into(), 5, n),
        (format!("bytes=2-{}", n + 1000), 2, n),
    ];
    for (range, a, b) in ranges {
        let r = c.get(&url).header("range", &range).send().await.unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            r.headers()["content-range"].to_str().unwrap(),
            format!("bytes {a}-{}/{n}", b - 1),
            "{range}"
        );
        assert!(
            r.bytes().await.unwrap() == data[a..b],
            "{range}: bytes differ"
        );
    }
    for range in [
        format!("bytes={n}-"),
        format!("bytes={}-{}", n + 5, n + 9),
        "bytes=-0".into(),
    ] {
        let r = c.get(&url).header("range", &range).send().await.unwrap();
        assert_eq!(r.status(), 416, "{range}");
        assert_eq!(
            r.headers()["content-range"].to_str().unwrap(),
            format!("bytes */{n}"),
            "{range}"
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "RANGE_INVALID");
    }
    for range in ["bytes=0-1,5-6", "bytes=5-1", "items=0-1"] {
        let r = c.get(&url).header("range", range).send().await.unwrap();
        assert_eq!(r.status(), 416, "{range}");
    }
    // The answers above came from the file on disk, not from a fill.
    assert!(pier.mirror.metrics.fills_in_flight.get() == 0);
}

/// One connection, every kind of answer pipelined in one write: HEADs (mirrored and hosted),
/// files whole and ranged, a manifest, a 404, a 416.
#[tokio::test]
async fn pipelined_heads_files_manifests_and_errors_stay_in_step() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = pier_with(&up, |_| {}).await;
    let mirrored = pattern((1 << 20) + 5000, 1);
    let hosted = pattern(300_000, 2);
    let m = warm(&pier, &up, &mirrored).await;
    let h = push(&pier, "local/app", &hosted).await;
    let manifest = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#;
    up.add_manifest("library/app", "1", OCI_MANIFEST, manifest);
    let missing = digest_of(b"nowhere");
    let host = addr(&pier);
    let mut conn = TcpStream::connect(&host).await.unwrap();
    let get = |method: &str, path: String, extra: &str| {
        format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\naccept: {OCI_MANIFEST}\r\n{extra}\r\n")
    };
    let requests = [
        get("HEAD", format!("/v2/app/blobs/{m}"), ""),
        get("GET", format!("/v2/app/blobs/{m}"), ""),
        get("HEAD", format!("/v2/local/app/blobs/{h}"), ""),
        get("GET", format!("/v2/local/app/blobs/{h}"), ""),
        get("GET", "/v2/app/manifests/1".into(), ""),
        get("GET", format!("/v2/app/blobs/{missing}"), ""),
        get(
            "GET",
            format!("/v2/app/blobs/{m}"),
            "range: bytes=1048570-1048580\r\n",
        ),
        get(
            "GET",
            format!("/v2/local/app/blobs/{h}"),
            "range: bytes=-7\r\n",
        ),
        get(
            "GET",
            format!("/v2/app/blobs/{m}"),
            "range: bytes=99999999-\r\n",
        ),
        get(
            "HEAD",
            format!("/v2/local/app/blobs/{h}"),
            "range: bytes=0-0\r\n",
        ),
        get("GET", format!("/v2/local/app/blobs/{h}"), ""),
    ]
    .concat();
    conn.write_all(requests.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut conn, true).await;
    assert_eq!(status(&head), 200);
    assert_eq!(
        header(&head, "content-length"),
        Some(&*mirrored.len().to_string())
    );
    let (head, body) = read_response(&mut conn, false).await;
    assert_eq!(status(&head), 200);
    assert!(body == mirrored, "mirrored blob differs");
    let (head, _) = read_response(&mut conn, true).await;
    assert_eq!(status(&head), 200);
    let (head, body) = read_response(&mut conn, false).await;
    assert_eq!(status(&head), 200);
    assert!(body == hosted, "hosted blob differs");
    let (head, body) = read_response(&mut conn, false).await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(body, manifest.as_bytes());
    let (head, _) = read_response(&mut conn, false).await;
    assert_eq!(status(&head), 404);
    let (head, body) = read_response(&mut conn, false).await;
    assert_eq!(status(&head), 206);
    assert!(body == mirrored[1_048_570..1_048_581]);
    let (head, body) = read_response(&mut conn, false).await;
    assert_eq!(status(&head), 206);
    assert!(body == hosted[hosted.len() - 7..]);
    let (head, _) = read_response(&mut conn, false).await;
    assert_eq!(status(&head), 416);
    let (head, _) = read_response(&mut conn, true).await;
    assert!(matches!(status(&head), 200 | 206), "{head}");
    let (head, body) = read_response(&mut conn, false).await;
    assert_eq!(status(&head), 200);
    assert!(body == hosted, "hosted blob differs at the end");
}

#[tokio::test]
async fn http_1_0_and_connection_close_clients_get_whole_warm_blobs() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = pier_with(&up, |_| {}).await;
    let data = pattern((1 << 20) + 999, 4);
    let d = warm(&pier, &up, &data).await;
    let host = addr(&pier);
    for request in [
        format!("GET /v2/app/blobs/{d} HTTP/1.0\r\n\r\n"),
        format!("GET /v2/app/blobs/{d} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"),
    ] {
        let mut conn = TcpStream::connect(&host).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut all))
            .await
            .expect("the server closes the connection")
            .unwrap();
        let at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(all[at..] == data[..], "{request}: body differs");
    }
}

/// A client that half-closes (shuts down its sending side) after its request, as `nc -N` or a
/// scripted HTTP/1.0 client does: it still waits for the answer. hyper's default
/// (`http1().half_close(false)`) closes the connection when it reads the EOF before the answer is
/// ready, so such a client gets nothing at all when the answer takes a moment (a blob is opened
/// on the blocking pool). Not the sendfile path's doing: the catalog, which has no file, loses
/// the same race.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = pier_with(&up, |_| {}).await;
    let data = pattern((1 << 20) + 999, 4);
    let d = warm(&pier, &up, &data).await;
    let host = addr(&pier);
    let mut failures = Vec::new();
    for path in [format!("/v2/app/blobs/{d}"), "/v2/_catalog".to_string()] {
        // Answered when the client does not half-close.
        let (code, _) = crate::harness::raw_get(&pier.url, &path).await;
        assert_eq!(code, 200, "{path}");
        for _ in 0..10 {
            let mut conn = TcpStream::connect(&host).await.unwrap();
            conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            conn.shutdown().await.unwrap();
            let mut all = Vec::new();
            let _ = conn.read_to_end(&mut all).await;
            if !all.starts_with(b"HTTP/1.1 200") {
                failures.push(path.clone());
            }
        }
    }
    assert!(failures.is_empty(), "no answer for {failures:?}");
}

/// HTTP/2 over plain TCP (prior knowledge) takes the streaming path: the blob's bytes, never
/// placeholders.
#[tokio::test]
async fn h2c_prior_knowledge_gets_the_blobs_bytes() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = pier_with(&up, |_| {}).await;
    let data = pattern(2 * (1 << 20) + 3, 5);
    let d = warm(&pier, &up, &data).await;
    let h = push(&pier, "local/app", &data[..400_000]).await;
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let url = format!("{}/v2/app/blobs/{d}", pier.url);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_2)
    );
    assert!(r.bytes().await.unwrap() == data, "h2c body differs");
    let r = c
        .get(&url)
        .header("range", "bytes=1048570-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert!(r.bytes().await.unwrap() == data[1_048_570..]);
    let r = c
        .get(format!("{}/v2/local/app/blobs/{h}", pier.url))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.unwrap() == data[..400_000]);
    // Several streams at once on the one connection.
    let gets = (0..4).map(|_| {
        let (c, url) = (c.clone(), url.clone());
        async move { c.get(url).send().await.unwrap().bytes().await.unwrap() }
    });
    for body in futures_util::future::join_all(gets).await {
        assert!(body == data);
    }
}

/// A CA and a server certificate for 127.0.0.1, as PEM files.
fn tls_material(dir: &std::path::Path) -> (TlsFiles, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (c, k) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (
        TlsFiles {
            cert: c,
            key: k,
            client_ca: None,
        },
        ca.pem(),
    )
}

/// TLS takes the streaming path, over HTTP/1.1 and HTTP/2 alike.
#[tokio::test]
async fn tls_clients_get_the_blobs_bytes_over_http1_and_http2() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pki = tempfile::tempdir().unwrap();
    let (files, ca) = tls_material(pki.path());
    let tls = Arc::new(Tls::load(files).unwrap());
    let pier = pier_with(&up, |s| {
        s.options = ServerOptions {
            tls: Some(tls),
            metrics_on_main: true,
            ..ServerOptions::default()
        };
    })
    .await;
    let https = pier.url.replace("http://", "https://");
    let data = pattern((1 << 20) + 4567, 6);
    let d = up.add_blob(data.clone());
    let builder = || {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
    };
    let url = format!("{https}/v2/app/blobs/{d}");
    // The first pull fills; then the file is warm.
    let r = builder().build().unwrap().get(&url).send().await.unwrap();
    assert!(r.bytes().await.unwrap() == data);
    settle(&pier).await;
    assert!(wait_stored(&pier, &d).await);
    for (client, version) in [
        (
            builder().http1_only().build().unwrap(),
            reqwest::Version::HTTP_11,
        ),
        (builder().build().unwrap(), reqwest::Version::HTTP_2),
    ] {
        let r = client.get(&url).send().await.unwrap();
        assert_eq!((r.status().as_u16(), r.version()), (200, version));
        assert!(
            r.bytes().await.unwrap() == data,
            "{version:?}: body differs"
        );
        let r = client
            .get(&url)
            .header("range", "bytes=-70000")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert!(r.bytes().await.unwrap() == data[data.len() - 70_000..]);
    }
}

fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

async fn served_from_disk(pier: &Pier) -> u64 {
    let text = client()
        .get(format!("{}/metrics", pier.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric(&text, r#"pier_served_bytes_total{source="disk"}"#)
}

/// Bytes sent with sendfile are counted once each, whole or ranged, and a HEAD counts none.
#[tokio::test]
async fn served_bytes_count_what_sendfile_sent() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = pier_with(&up, |_| {}).await;
    let n = 2 * (1 << 20) + 12_345;
    let data = pattern(n, 7);
    let d = warm(&pier, &up, &data).await;
    let c = reqwest::Client::builder().http1_only().build().unwrap();
    let url = format!("{}/v2/app/blobs/{d}", pier.url);
    let before = served_from_disk(&pier).await;
    assert!(c.get(&url).send().await.unwrap().bytes().await.unwrap() == data);
    let r = c
        .get(&url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 100);
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(served_from_disk(&pier).await - before, n as u64 + 100);
}

/// How long a cached manifest takes right after a blob on the same keep-alive connection:
/// `TCP_CORK` must be lifted once the blob's bytes left, or the manifest waits ~200 ms.
#[tokio::test]
async fn a_manifest_right_after_a_warm_blob_is_not_held_by_the_cork() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = pier_with(&up, |_| {}).await;
    let data = pattern(2 * (1 << 20) + 77, 8);
    let d = warm(&pier, &up, &data).await;
    let manifest = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#;
    up.add_manifest("library/app", "1", OCI_MANIFEST, manifest);
    let host = addr(&pier);
    let mut conn = TcpStream::connect(&host).await.unwrap();
    conn.set_nodelay(true).unwrap();
    let manifest_get = format!(
        "GET /v2/app/manifests/1 HTTP/1.1\r\nhost: {host}\r\naccept: {OCI_MANIFEST}\r\n\r\n"
    );
    // Once so that the manifest is cached.
    conn.write_all(manifest_get.as_bytes()).await.unwrap();
    read_response(&mut conn, false).await;
    let mut worst = Duration::ZERO;
    for range in [
        "",
        "range: bytes=0-0\r\n",
        "range: bytes=10-1048600\r\n",
        "range: bytes=-5\r\n",
    ] {
        for _ in 0..3 {
            conn.write_all(
                format!("GET /v2/app/blobs/{d} HTTP/1.1\r\nhost: {host}\r\n{range}\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let (head, _) = read_response(&mut conn, false).await;
            assert!(matches!(status(&head), 200 | 206));
            let started = Instant::now();
            conn.write_all(manifest_get.as_bytes()).await.unwrap();
            let (head, body) = read_response(&mut conn, false).await;
            assert_eq!(status(&head), 200);
            assert_eq!(body, manifest.as_bytes());
            worst = worst.max(started.elapsed());
        }
    }
    assert!(
        worst < Duration::from_millis(150),
        "a manifest after a blob took {worst:?}"
    );
}

/// Clients that leave in the middle of a warm blob (closing or resetting): the server carries on
/// and the next client of the blob gets it whole.
#[tokio::test]
async fn clients_leaving_mid_blob_leave_the_server_serving() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = pier_with(&up, |_| {}).await;
    let data = pattern(8 * (1 << 20), 9);
    let d = warm(&pier, &up, &data).await;
    let host = addr(&pier);
    for reset in [false, true, false, true] {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(8192).unwrap();
        let mut conn = socket.connect(host.parse().unwrap()).await.unwrap();
        conn.write_all(
            format!("GET /v2/app/blobs/{d} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut some = vec![0u8; 50_000];
        conn.read_exact(&mut some).await.unwrap();
        if reset {
            conn.set_zero_linger().unwrap();
        }
        drop(conn);
    }
    let c = reqwest::Client::builder().http1_only().build().unwrap();
    let r = c
        .get(format!("{}/v2/app/blobs/{d}", pier.url))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.unwrap() == data);
}

/// A hosted blob collected (its file unlinked) while a slow client is in the middle of it: the
/// open file still holds the bytes, and the client gets them all.
#[tokio::test]
async fn a_hosted_blob_collected_while_sent_is_sent_whole() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = pier_with(&up, |s| {
        s.hosted = pier_cache::HostedConfig {
            gc_grace: Duration::ZERO,
            ..pier_cache::HostedConfig::default()
        };
    })
    .await;
    // Larger than what the socket buffers hold, so that the file is still being sent.
    let data = pattern(24 * (1 << 20), 10);
    let d = push(&pier, "local/app", &data).await;
    let path = {
        let hex = d.trim_start_matches("sha256:");
        pier.dir
            .path()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
    };
    assert!(path.exists());
    let host = addr(&pier);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut conn = socket.connect(host.parse().unwrap()).await.unwrap();
    conn.write_all(
        format!("GET /v2/local/app/blobs/{d} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut conn).await;
    assert_eq!(status(&head), 200);
    let mut body = vec![0u8; 100_000];
    conn.read_exact(&mut body).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let report = pier.mirror.cache.collect_garbage().await.unwrap();
    assert!(
        !path.exists(),
        "gc removed the unreferenced blob: {report:?}"
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = vec![0u8; 1 << 16];
        while body.len() + rest.len() < data.len() {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection ended early");
            rest.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the rest of the blob");
    body.extend_from_slice(&rest);
    assert!(body == data, "the collected blob's bytes differ");
}

/// A region of two nodes without a shared store: nodes[0] asks, nodes[1] owns `repo` blobs it
/// ranks first.
async fn two_nodes(up: &FakeUpstream) -> Vec<Pier> {
    use pier_cache::region::{ClusterConfig, PeerSource, Region, RegionConfig};
    let listeners = [
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    ];
    let urls: Vec<String> = listeners
        .iter()
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    let mut nodes = Vec::new();
    for (listener, url) in listeners.into_iter().zip(&urls) {
        let (url, peers) = (url.clone(), urls.clone());
        let make = move |metrics: Arc<pier_metrics::Metrics>| {
            let config = RegionConfig {
                cluster: Some(ClusterConfig {
                    advertise: url,
                    peers: PeerSource::Static(peers),
                    secret: SECRET.into(),
                    timeout: Duration::from_millis(2000),
                    read_timeout: Duration::from_millis(2000),
                    ca_file: None,
                }),
                shared_store: None,
            };
            Region::new(&config, metrics).unwrap()
        };
        nodes.push(
            launch(Setup {
                upstreams: vec![UpstreamSpec::new("docker.io", up.url())],
                region: Some(Box::new(make)),
                listener: Some(listener),
                ..Setup::new(tempfile::tempdir().unwrap())
            })
            .await,
        );
    }
    nodes
}

const SECRET: &str = "review-region-secret-0123456789";

/// The owner of a blob sends it from its warm file (sendfile) to a peer that asks: the peer gets
/// the blob's bytes, verifies them and stores them; ranged peer requests get their bytes too.
#[tokio::test]
async fn peers_get_a_warm_owners_blob_whole_and_verified() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let nodes = two_nodes(&up).await;
    let (asker, owner) = (&nodes[0], &nodes[1]);
    let region = asker.mirror.cache.region().unwrap();
    let owner_node = pier_cache::region::Node::Peer(owner.url.clone());
    let (d, data) = (0u8..)
        .map(|salt| {
            let data = pattern(3 * (1 << 20) + 11, salt);
            (digest_of(&data), data)
        })
        .find(|(d, _)| region.owners(d)[0] == owner_node)
        .unwrap();
    up.add_blob_in("library/app", data.clone());
    // The owner pulls it itself first: warm there.
    let r = client()
        .get(format!("{}/v2/library/app/blobs/{d}", owner.url))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.unwrap() == data);
    settle(owner).await;
    assert!(wait_stored(owner, &d).await);
    let upstream_gets = up.count(&format!("GET /v2/library/app/blobs/{d}"));
    // The asker's pull comes from the owner, over the peer interface.
    let r = client()
        .get(format!("{}/v2/library/app/blobs/{d}", asker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.unwrap() == data,
        "the asker's client got other bytes"
    );
    settle(asker).await;
    assert!(
        wait_stored(asker, &d).await,
        "the asker did not keep the blob"
    );
    assert_eq!(
        up.count(&format!("GET /v2/library/app/blobs/{d}")),
        upstream_gets,
        "the asker went to the upstream instead of the owner"
    );
    let hex_part = d.trim_start_matches("sha256:");
    let stored = std::fs::read(
        asker
            .dir
            .path()
            .join("blobs/sha256")
            .join(&hex_part[..2])
            .join(hex_part),
    )
    .unwrap();
    assert!(stored == data, "the asker stored other bytes");
    // The peer interface itself, with ranges, over HTTP/1.
    let c = reqwest::Client::builder().http1_only().build().unwrap();
    let peer_url = format!(
        "{}/_pier/region/v1/blobs/{d}?upstream=docker.io&repo=library/app",
        owner.url
    );
    for (range, a, b) in [
        (None, 0, data.len()),
        (Some("bytes=1048576-"), 1 << 20, data.len()),
        (Some("bytes=3-3"), 3, 4),
    ] {
        let mut req = c.get(&peer_url).header("x-pier-region-secret", SECRET);
        if let Some(range) = range {
            req = req.header("range", range);
        }
        let r = req.send().await.unwrap();
        assert!(r.status().is_success(), "{range:?}: {}", r.status());
        assert!(
            r.bytes().await.unwrap() == data[a..b],
            "{range:?}: bytes differ"
        );
    }
}

/// Drops `path`'s pages from the page cache (they are clean: blob files are fsynced), so that
/// the next read of it waits for the disk.
fn evict_from_page_cache(path: &std::path::Path) {
    let f = std::fs::File::open(path).unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
}

/// Runs `fetch` on its own thread while sampling the state of thread `tid` of this process;
/// returns how many samples found it waiting for the disk (`D`), of how many, and the slowest
/// `GET /v2/` another client of `host` saw meanwhile.
fn disk_waits_of(
    tid: i32,
    host: String,
    fetch: impl FnOnce() + Send + 'static,
) -> (usize, usize, Duration) {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let client = std::thread::spawn(move || {
        fetch();
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let stop = done.clone();
    let pinger = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&host).unwrap();
        conn.set_nodelay(true).unwrap();
        let mut worst = Duration::ZERO;
        let mut buf = [0u8; 4096];
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let started = Instant::now();
            conn.write_all(format!("GET /v2/ HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes())
                .unwrap();
            let mut got = Vec::new();
            while !(got.ends_with(b"{}") || got.ends_with(b"}\n")) {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            worst = worst.max(started.elapsed());
            std::thread::sleep(Duration::from_millis(1));
        }
        worst
    });
    let stat = format!("/proc/self/task/{tid}/stat");
    let (mut waiting, mut samples) = (0, 0);
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        let text = std::fs::read_to_string(&stat).unwrap();
        let state = text.rsplit_once(") ").unwrap().1.chars().next().unwrap();
        samples += 1;
        if state == 'D' {
            waiting += 1;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    client.join().unwrap();
    (waiting, samples, pinger.join().unwrap())
}

/// The streaming reader reads on the runtime's thread only what is in the page cache
/// (`preadv2` with `RWF_NOWAIT`) and leaves disk reads to the blocking pool. `sendfile` reads
/// the file inside the system call, on the runtime's thread: a cold blob makes the worker wait
/// for the disk (on this VM about 5 ms per piece; far more on network or spinning disks), and
/// every other connection of that worker waits with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn cold_blob_files_are_not_read_from_disk_on_the_runtime_thread() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = pier_with(&up, |_| {}).await;
    let data = pattern(32 * (1 << 20), 11);
    let d = warm(&pier, &up, &data).await;
    let hex_part = d.trim_start_matches("sha256:").to_string();
    let path = pier
        .dir
        .path()
        .join("blobs/sha256")
        .join(&hex_part[..2])
        .join(&hex_part);
    // The one worker, which runs pier's connections.
    let worker = tokio::spawn(async { rustix::thread::gettid().as_raw_nonzero().get() })
        .await
        .unwrap();
    let len = data.len();
    // Control: HTTP/2 (the streaming path) of the cold file.
    evict_from_page_cache(&path);
    let url = format!("{}/v2/app/blobs/{d}", pier.url);
    let host = addr(&pier);
    let streamed = disk_waits_of(worker, host.clone(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .unwrap();
            let body = c.get(url).send().await.unwrap().bytes().await.unwrap();
            assert_eq!(body.len(), len);
        });
    });
    // HTTP/1 (sendfile) of the cold file.
    evict_from_page_cache(&path);
    let sent = disk_waits_of(worker, host.clone(), move || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&host).unwrap();
        conn.write_all(
            format!("GET /v2/app/blobs/{d} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut all = Vec::new();
        conn.read_to_end(&mut all).unwrap();
        assert!(all.len() > len);
    });
    eprintln!(
        "worker waiting for the disk (waiting, samples, slowest /v2/ meanwhile): \
         streamed {streamed:?}, sendfile {sent:?}"
    );
    // Before the blocking pool read cold pieces, sendfile had the worker waiting in 30-70% of
    // the samples; a stray metadata read may still show up once.
    assert!(
        streamed.0 * 20 <= streamed.1,
        "the streaming path made the worker wait"
    );
    assert!(
        sent.0 * 20 <= sent.1,
        "sendfile made the worker wait for the disk"
    );
}
