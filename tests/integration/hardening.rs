//! TLS, connection limits and abuse: one test per protection, against a running pier.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use pier_server::limits::RateLimit;
use pier_server::tls::{Tls, TlsFiles};
use pier_server::ServerOptions;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, error_code, launch, Pier, Setup, UpstreamSpec};

/// A CA and a server certificate for 127.0.0.1 and localhost, written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pier test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        Pki {
            dir,
            ca_pem: ca.pem(),
            ca,
            ca_key,
        }
    }

    /// A certificate signed by this CA, written to `<name>.pem` and `<name>.key`.
    fn issue(&self, name: &str, sans: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn ca_file(&self) -> std::path::PathBuf {
        let p = self.dir.path().join("ca.pem");
        std::fs::write(&p, &self.ca_pem).unwrap();
        p
    }

    /// Whether a fresh client trusting only this CA (no session reuse) gets a 200 from `url`.
    async fn trusted_by(&self, url: &str) -> bool {
        let client = self.client().build().unwrap();
        client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    }

    fn client(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap())
    }
}

async fn pier_with(options: ServerOptions) -> (FakeUpstream, Pier) {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let mut setup = Setup::new(tempfile::tempdir().unwrap());
    setup.upstreams = vec![UpstreamSpec::new("docker.io", up.url())];
    setup.options = options;
    (up, launch(setup).await)
}

fn https(pier: &Pier) -> String {
    pier.url.replace("http://", "https://")
}

#[tokio::test]
async fn https_negotiates_http2_and_http1_by_alpn() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", &["127.0.0.1", "localhost"]);
    let tls = Arc::new(
        Tls::load(TlsFiles {
            cert,
            key,
            client_ca: None,
        })
        .unwrap(),
    );
    let (_up, pier) = pier_with(ServerOptions {
        tls: Some(tls),
        ..ServerOptions::default()
    })
    .await;
    let url = format!("{}/v2/", https(&pier));
    let r = pki
        .client()
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_2)
    );
    let r = pki
        .client()
        .http1_only()
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_11)
    );
    // Plain HTTP on the TLS port gets nothing useful, and an untrusting client refuses pier.
    assert!(client()
        .get(format!("{}/v2/", pier.url))
        .send()
        .await
        .is_err());
    assert!(reqwest::Client::new().get(&url).send().await.is_err());
}

#[tokio::test]
async fn certificate_is_reloaded_when_the_files_change() {
    let old = Pki::new();
    let (cert, key) = old.issue("server", &["127.0.0.1"]);
    let tls = Arc::new(
        Tls::load(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        })
        .unwrap(),
    );
    let watcher = tokio::spawn(tls.clone().watch(Duration::from_millis(100)));
    let (_up, pier) = pier_with(ServerOptions {
        tls: Some(tls),
        ..ServerOptions::default()
    })
    .await;
    let url = format!("{}/v2/", https(&pier));
    assert_eq!(
        old.client()
            .build()
            .unwrap()
            .get(&url)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // A new CA's certificate replaces the files; no restart.
    let new = Pki::new();
    let (c2, k2) = new.issue("server", &["127.0.0.1"]);
    tokio::time::sleep(Duration::from_millis(1100)).await; // a different mtime, even on coarse clocks
    std::fs::copy(&k2, &key).unwrap();
    std::fs::copy(&c2, &cert).unwrap();
    let mut reloaded = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if new.trusted_by(&url).await {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "the new certificate was not picked up");
    assert!(
        old.client()
            .build()
            .unwrap()
            .get(&url)
            .send()
            .await
            .is_err(),
        "still serving the old certificate"
    );
    watcher.abort();
}

#[tokio::test]
async fn client_certificates_are_required_with_a_client_ca() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", &["127.0.0.1"]);
    let (client_cert, client_key) = pki.issue("client", &["client"]);
    let tls = Arc::new(
        Tls::load(TlsFiles {
            cert,
            key,
            client_ca: Some(pki.ca_file()),
        })
        .unwrap(),
    );
    let (_up, pier) = pier_with(ServerOptions {
        tls: Some(tls),
        ..ServerOptions::default()
    })
    .await;
    let url = format!("{}/v2/", https(&pier));
    assert!(
        pki.client()
            .build()
            .unwrap()
            .get(&url)
            .send()
            .await
            .is_err(),
        "served a client without a certificate"
    );
    let mut identity = std::fs::read(&client_cert).unwrap();
    identity.extend(std::fs::read(&client_key).unwrap());
    let c = pki
        .client()
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .build()
        .unwrap();
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
    // A certificate from another CA is refused.
    let other = Pki::new();
    let (oc, ok) = other.issue("client", &["client"]);
    let mut identity = std::fs::read(&oc).unwrap();
    identity.extend(std::fs::read(&ok).unwrap());
    let c = pki
        .client()
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .build()
        .unwrap();
    assert!(c.get(&url).send().await.is_err());
}

/// Sends raw bytes on a fresh connection and returns what came back before the server closed
/// (or `None` if it still had not after `wait`).
fn raw(addr: &str, send: &[u8], wait: Duration) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(send).unwrap();
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
        // Closed with our request unread: a reset, which is closing too.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Some(String::from_utf8_lossy(&buf).into_owned())
        }
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_cut() {
    let options = ServerOptions {
        header_read_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let (_up, pier) = pier_with(options).await;
    let addr = pier.url.trim_start_matches("http://").to_string();
    let started = std::time::Instant::now();
    // Slow loris: a request line, then nothing.
    let got = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            raw(
                &addr,
                b"GET /v2/ HTTP/1.1\r\nHost: x\r\n",
                Duration::from_secs(5),
            )
        }
    })
    .await
    .unwrap();
    assert!(
        got.is_some(),
        "a connection sending headers slowly was kept open"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // Idle keep-alive: after one answer, silence closes the connection.
    let got = tokio::task::spawn_blocking(move || {
        raw(
            &addr,
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap();
    assert!(
        got.is_some_and(|t| t.starts_with("HTTP/1.1 200")),
        "idle connection kept open"
    );
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let options = ServerOptions {
        max_header_bytes: 8 * 1024,
        ..ServerOptions::default()
    };
    let (up, pier) = pier_with(options).await;
    let r = client()
        .get(format!("{}/v2/", pier.url))
        .header("x-big", "a".repeat(20_000))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(
            e.is_request() || e.is_connect() || e.to_string().contains("connection"),
            "{e}"
        ),
    }
    assert!(up.requests().is_empty());
    // Normal requests still work.
    assert_eq!(
        client()
            .get(format!("{}/v2/", pier.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed() {
    let (_up, pier) = pier_with(ServerOptions {
        max_connections: 2,
        ..ServerOptions::default()
    })
    .await;
    let addr = pier.url.trim_start_matches("http://").to_string();
    // Two connections held open, idle.
    let held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            raw(
                &addr,
                b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
                Duration::from_secs(3),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(got.as_deref(), Some(""), "a third connection was served");
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        client()
            .get(format!("{}/v2/", pier.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn clients_over_their_rate_get_429() {
    let options = ServerOptions {
        rate_limit: Some(RateLimit {
            per_second: 0.5,
            burst: 3.0,
        }),
        ..ServerOptions::default()
    };
    let (_up, pier) = pier_with(options).await;
    for _ in 0..3 {
        assert_eq!(
            client()
                .get(format!("{}/v2/", pier.url))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let r = client()
        .get(format!("{}/v2/", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "2");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_downloads_are_bounded_and_queued() {
    let up = FakeUpstream::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(30)),
        ..Behaviour::default()
    })
    .await;
    let mut setup = Setup::new(tempfile::tempdir().unwrap());
    setup.upstreams = vec![UpstreamSpec::new("docker.io", up.url())];
    setup.max_concurrent_fills = 1;
    setup.max_queued_fills = 1;
    let pier = launch(setup).await;
    let digests: Vec<String> = (0..3u8).map(|i| up.add_blob(vec![i; 300_000])).collect();
    let get = |d: &String| {
        let url = format!("{}/v2/app/blobs/{d}", pier.url);
        tokio::spawn(async move {
            let r = client().get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.bytes().await.map(|b| b.len()).unwrap_or(0))
        })
    };
    let first = get(&digests[0]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = get(&digests[1]); // queued behind the first
    tokio::time::sleep(Duration::from_millis(50)).await;
    let third = get(&digests[2]).await.unwrap(); // no room left
    assert_eq!(third.0, 429);
    assert_eq!(first.await.unwrap(), (200, 300_000));
    assert_eq!(second.await.unwrap(), (200, 300_000));
    // The queue really was a queue: two downloads, never both in flight at once.
    let log = up.requests();
    assert_eq!(
        log.iter()
            .filter(|l| l.starts_with("GET") && l.contains("/blobs/"))
            .count(),
        2,
        "{log:?}"
    );
    assert_eq!(
        up.state.blob_bodies.most(),
        1,
        "the queued download overlapped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_does_not_hold_back_the_fill() {
    let up = FakeUpstream::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(2)),
        ..Behaviour::default()
    })
    .await;
    let mut setup = Setup::new(tempfile::tempdir().unwrap());
    setup.upstreams = vec![UpstreamSpec::new("docker.io", up.url())];
    let pier = launch(setup).await;
    let body: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 249) as u8).collect();
    let digest = up.add_blob(body.clone());
    let url = format!("{}/v2/app/blobs/{digest}", pier.url);
    // A client that takes the headers and then reads nothing.
    let stalled = client().get(&url).send().await.unwrap();
    // Another client reads everything, and the fill completes, while the first still stalls.
    assert!(
        client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            == body
    );
    assert!(crate::harness::wait_stored(&pier, &digest).await);
    crate::harness::settle(&pier).await;
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_at_once() {
    let old = Pki::new();
    let (cert, key) = old.issue("server", &["127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mirror.yaml");
    std::fs::write(
        &config,
        format!("tls:\n  cert: {}\n  key: {}\nupstreams:\n  - name: docker.io\n    url: http://127.0.0.1:9\n", cert.display(), key.display()),
    )
    .unwrap();
    let cache = dir.path().join("cache");
    let (mut cmd, addr) = crate::harness::pier_binary(&[
        "--config",
        config.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let mut child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let url = format!("https://{addr}/v2/");
    let mut up = false;
    for _ in 0..200 {
        if old.client().build().unwrap().get(&url).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "pier did not start with TLS");
    let new = Pki::new();
    let (c2, k2) = new.issue("server", &["127.0.0.1"]);
    std::fs::copy(&k2, &key).unwrap();
    std::fs::copy(&c2, &cert).unwrap();
    let started = std::time::Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let mut reloaded = false;
    // Well before the 10 s file check: it is the signal that did it.
    while started.elapsed() < Duration::from_secs(3) {
        if new.trusted_by(&url).await {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alive = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(alive, "SIGHUP stopped pier");
    assert!(reloaded, "the certificate was not reloaded on SIGHUP");
}
