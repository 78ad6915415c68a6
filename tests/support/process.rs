//! Real processes under test: the Distribution registry (Debian's docker-registry), pier, skopeo.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// Waits until `GET http://addr/v2/` answers at all.
pub fn wait_http(addr: &str, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when dropped.
pub struct Running {
    pub child: Child,
    pub addr: String,
    /// pier's operations listener (metrics, health), for pier processes.
    pub ops: String,
}

impl Running {
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The CNCF Distribution registry on loopback, storing under `dir`, its access log in
/// `dir/registry.log` (see [`registry_requests`]).
pub fn registry(dir: &Path) -> Running {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let storage = dir.join("storage");
    std::fs::create_dir_all(&storage).expect("mkdir storage");
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            storage.display()
        ),
    )
    .expect("write registry config");
    let log = std::fs::File::create(dir.join("registry.log")).expect("create registry log");
    let log2 = log.try_clone().expect("clone log handle");
    let mut child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(log)
        .stderr(log2)
        .spawn()
        .expect("start docker-registry");
    wait_http(&addr, &mut child, "docker-registry");
    Running {
        child,
        addr,
        ops: String::new(),
    }
}

/// The `/v2/...` request paths a registry started with [`registry`] in `dir` has logged.
pub fn registry_requests(dir: &Path) -> Vec<String> {
    let log = std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
    log.lines()
        .filter_map(|l| {
            // access log lines: ... "GET /v2/org/tool/manifests/2.0 HTTP/1.1" ...
            let start = l.find("\"GET /v2/").or_else(|| l.find("\"HEAD /v2/"))?;
            let rest = &l[start + 1..];
            let end = rest.find(" HTTP/")?;
            Some(rest[..end].to_string())
        })
        .collect()
}

/// pier, started from the binary with `serve --listen <addr> --metrics-listen <ops>` and `args`.
/// Its log goes to `pier-test-<port>.log` in the temp directory.
pub fn pier(args: &[&str]) -> Running {
    pier_at(&format!("127.0.0.1:{}", free_port()), args)
}

/// pier listening on `addr`, chosen beforehand (nodes of a region name each other).
pub fn pier_at(addr: &str, args: &[&str]) -> Running {
    let addr = addr.to_string();
    let ops = format!("127.0.0.1:{}", free_port());
    let log = std::env::temp_dir().join(format!("pier-test-{}.log", addr.replace(':', "-")));
    let log_file = std::fs::File::create(&log).expect("create pier log");
    let mut child = Command::new(super::pier_bin())
        .args(["serve", "--listen", &addr, "--metrics-listen", &ops])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start pier");
    wait_http(&addr, &mut child, "pier");
    Running { child, addr, ops }
}

/// Pushes the image `tag` of an OCI layout to `dest` (`host:port/repo:tag`) with skopeo; `all`
/// pushes every platform of an index.
pub fn push_image(layout: &Path, tag: &str, dest: &str, all: bool) {
    let src = format!("oci:{}:{tag}", path_str(layout));
    let dst = format!("docker://{dest}");
    let mut args = vec!["copy", "--dest-tls-verify=false"];
    if all {
        args.push("--all");
    }
    args.extend([src.as_str(), dst.as_str()]);
    skopeo(&args);
}

/// Runs skopeo, panicking with its output when it fails.
pub fn skopeo(args: &[&str]) -> Output {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs skopeo, returning its output whatever the status.
pub fn skopeo_try(args: &[&str]) -> Output {
    Command::new("skopeo")
        .args(args)
        .output()
        .expect("run skopeo")
}

pub fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

pub fn tmp_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}
