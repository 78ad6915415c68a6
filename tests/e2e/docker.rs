//! A private Docker daemon for a test: all its state in a directory, its API on a socket there, no
//! bridge and no iptables rules; a private network namespace for tests that run containers on the
//! host network; and small helpers to run commands.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::support::process::path_str;

/// The Docker client of Debian's docker.io, the package that brings dockerd. It builds with
/// BuildKit by itself (DOCKER_BUILDKIT=1); newer clients need the buildx plugin for that, which
/// Debian 12 does not package, and a machine may put such a client first on PATH.
pub const DOCKER: &str = "/usr/bin/docker";

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A command's standard output, trimmed.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits up to a minute for `ready`.
pub fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A daemon stopped when dropped: SIGTERM, then SIGKILL if it is still there after 20 seconds.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // Our own child, not yet waited for: the pid is still its own.
        let pid = rustix::process::Pid::from_child(&self.0);
        if rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dockerd writes a few files outside its state directory, and mounts things inside it (the data
/// root onto itself, its network namespace under the exec root); undoes what it did (after the
/// daemon is gone: declare this before the daemon), so that the directory can be removed.
struct DockerLeftovers {
    created: Vec<&'static str>,
    dir: PathBuf,
}

impl DockerLeftovers {
    fn note(dir: PathBuf) -> Self {
        let created = ["/etc/docker/key.json", "/run/docker"]
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        DockerLeftovers { created, dir }
    }
}

impl Drop for DockerLeftovers {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        // Innermost first.
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(m)
                .stderr(Stdio::null())
                .status();
        }
        for p in &self.created {
            let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir_all(p));
        }
    }
}

/// One private dockerd at a time in this test binary: they share /etc/docker/key.json and
/// /run/docker, which the first one to stop would remove under the other.
static ONE_DOCKERD: Mutex<()> = Mutex::new(());

/// A private dockerd, stopped (and its leftovers outside `dir` removed) when dropped.
pub struct Dockerd {
    sock: String,
    // Dropped in this order: the daemon, then what it left, then the lock.
    _daemon: Daemon,
    _leftovers: DockerLeftovers,
    _one: MutexGuard<'static, ()>,
}

impl Dockerd {
    /// Starts dockerd with its state under `dir` (vfs storage: no overlay mounts needed) and
    /// `extra` flags, and waits until it answers.
    pub fn start(dir: &Path, extra: &[&str]) -> Dockerd {
        let one = ONE_DOCKERD
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::fs::create_dir_all(dir).expect("mkdir");
        let sock = format!("unix://{}", path_str(&dir.join("docker.sock")));
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("log");
        let leftovers = DockerLeftovers::note(dir.to_path_buf());
        let daemon = Daemon(
            Command::new("dockerd")
                .args([
                    "--data-root",
                    &path_str(&dir.join("root")),
                    "--exec-root",
                    &path_str(&dir.join("exec")),
                ])
                .args([
                    "--pidfile",
                    &path_str(&dir.join("dockerd.pid")),
                    "-H",
                    &sock,
                ])
                .args([
                    "--iptables=false",
                    "--ip6tables=false",
                    "--bridge=none",
                    "--storage-driver=vfs",
                ])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start dockerd"),
        );
        let d = Dockerd {
            sock,
            _daemon: daemon,
            _leftovers: leftovers,
            _one: one,
        };
        wait_for("dockerd", || {
            d.docker(&["info"])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        d
    }

    /// A `docker` command for this daemon, BuildKit on.
    pub fn docker(&self, args: &[&str]) -> Command {
        let mut c = Command::new(DOCKER);
        c.env("DOCKER_BUILDKIT", "1")
            .arg("-H")
            .arg(&self.sock)
            .args(args);
        c
    }
}

/// Runs `f` on a thread of its own in a new network namespace with only loopback, up. What `f`
/// starts (registries, dockerd and so containers on the host network, clients) shares that
/// namespace and no other: fixed ports such as the image's 5000 and 9090 collide with nothing,
/// and nothing started there can reach beyond the machine. Needs root, util-linux's `unshare` and
/// iproute2's `ip`.
pub fn in_private_network<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name("private network".into())
            .spawn_scoped(s, || {
                enter_private_network();
                f()
            })
            .expect("spawn a thread");
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread (only it: namespaces belong to threads) into a new network namespace,
/// made by `unshare --net` for a process that holds it until the thread is in, and brings its
/// loopback up.
fn enter_private_network() {
    let link = |path: &str| std::fs::read_link(path).ok();
    let ours = link("/proc/thread-self/ns/net").expect("this thread's network namespace");
    let mut holder = Command::new("unshare")
        .args(["--net", "sleep", "60"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start unshare");
    let ns = format!("/proc/{}/ns/net", holder.id());
    // unshare makes the namespace, then becomes sleep.
    let deadline = Instant::now() + Duration::from_secs(10);
    while link(&ns).is_none_or(|l| l == ours) {
        if let Ok(Some(status)) = holder.try_wait() {
            panic!("unshare --net exited with {status}");
        }
        assert!(Instant::now() < deadline, "unshare --net made no namespace");
        std::thread::sleep(Duration::from_millis(10));
    }
    let joined = std::fs::File::open(&ns).and_then(|fd| {
        rustix::thread::move_into_link_name_space(
            fd.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .map_err(std::io::Error::from)
    });
    let _ = holder.kill();
    let _ = holder.wait();
    joined.expect("setns into the new network namespace");
    run(Command::new("ip").args(["link", "set", "lo", "up"]));
}
