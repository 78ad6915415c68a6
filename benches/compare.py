#!/usr/bin/env python3
"""Side by side, on this machine, in one run: pier, the CNCF Distribution registry in proxy mode,
and nginx serving the same blob files from disk, all in front of one real upstream (Debian's
docker-registry, loaded with generated blobs and an image).

Measures (each section can be run alone with --only):
  large     warm 200 MiB and 1 GiB blobs over 1 and 16 keep-alive connections (wrk): MiB/s, and
            the server's CPU seconds (user + system, /proc/PID/stat) per GiB served;
  small     warm small requests with 64 connections (wrk; ApacheBench for HEAD, which wrk
            mishandles): manifest GET and HEAD by tag and by digest, and a 1 KiB blob: requests
            per second and p99 latency;
  cold      N = 1, 10, 100 clients on one cold 100 MiB blob: upstream requests and bytes, time
            until the last client finishes; cold time to first byte, against direct from the
            upstream;
  fanin1000 1,000 clients at once on one cold blob (pier only): upstream GETs, bodies whose
            sha256 is the digest;
  thousand  1,000 connections (800 on a warm manifest by tag, 200 on a warm 16 MiB layer) for
            60 s against a pier of its own: requests/s, errors, p99, peak RSS (VmHWM) and the
            memory tier's bytes (from /metrics), CPU per GiB; nginx alongside;
and peak RSS (VmHWM) of each server over the other sections, then prints a markdown table with
the ratios pier/Distribution and pier/nginx.

Needs: docker-registry, nginx, wrk, apache2-utils, curl (Debian packages), and pier built with
`cargo build --release` (or PIER_BIN=path). Run as root (nginx reads the temporary directory as
root; the descriptor limit is raised for 1,000 connections):

    python3 benches/compare.py [--only large,thousand] [--large-mib 200,1024] [--wrk-seconds 8]
                               [--pin] [--repeat 3]

--pin puts the servers on CPU 0 and the load generators on CPU 1; --repeat N measures the large
and small sections N times, the contenders taking turns, and reports medians with the range of
the per-round pier/nginx ratios (on a shared machine one round can be off by 30% either way).

Everything listens on 127.0.0.1 and stops when the script ends.
"""

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIER = os.environ.get("PIER_BIN", os.path.join(ROOT, "target", "release", "pier"))
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MIB = 1024 * 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, name):
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{name} exited early; see its log")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{name} did not start")


# Command prefixes that pin the servers and the load generators to CPUs of their own (--pin).
PIN = {"server": [], "client": []}


class Server:
    def __init__(self, name, argv, port, log):
        self.name, self.port = name, port
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(PIN["server"] + argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(port, self.proc, name)

    def url(self, path=""):
        return f"http://127.0.0.1:{self.port}{path}"

    def peak_rss_mib(self):
        """VmHWM of the process and its children (nginx workers), summed."""
        pids = [self.proc.pid]
        try:
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
            pids += [int(p) for p in out.stdout.split()]
        except OSError:
            pass
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def pids(self):
        """The process and its children (nginx's workers)."""
        pids = [self.proc.pid]
        try:
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
            pids += [int(p) for p in out.stdout.split()]
        except OSError:
            pass
        return pids

    def cpu_seconds(self):
        """User + system CPU time of the process and its children so far (/proc/PID/stat)."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def request(port, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, r.getheader("Location"), data


def push_blob(port, repo, path):
    """Monolithic upload of a file as a blob; returns its digest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * MIB), b""):
            h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    status, location, _ = request(port, "POST", f"/v2/{repo}/blobs/uploads/")
    assert status == 202, status
    location = location.replace(f"http://127.0.0.1:{port}", "")
    sep = "&" if "?" in location else "?"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        status, _, body = request(port, "PUT", f"{location}{sep}digest={digest}", body=f,
                                  headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
    assert status == 201, (status, body)
    return digest


def start_upstream(tmp):
    """Debian's docker-registry (Distribution) on a free port, storing under `tmp`, its access log
    on (the cold sections count upstream requests in it)."""
    port = free_port()
    os.makedirs(f"{tmp}/upstream")
    with open(f"{tmp}/upstream.yml", "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
                f"storage:\n  filesystem:\n    rootdirectory: {tmp}/upstream\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    return Server("upstream", ["docker-registry", "serve", f"{tmp}/upstream.yml"], port, f"{tmp}/upstream.log")


def push_image(port, tmp, layer_digest, layer_size):
    """Pushes bench/app:1, an OCI image of a small config and the given layer (already pushed).
    Returns the manifest's bytes and digest."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    with open(f"{tmp}/config", "wb") as f:
        f.write(config)
    config_digest = push_blob(port, "bench/app", f"{tmp}/config")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}]}).encode()
    status, _, body = request(port, "PUT", "/v2/bench/app/manifests/1", body=manifest, headers={"Content-Type": OCI_MANIFEST})
    assert status == 201, (status, body)
    return manifest, "sha256:" + hashlib.sha256(manifest).hexdigest()


def random_file(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MIB)
            f.write(os.urandom(n))
            left -= n


def curl(url, headers=()):
    args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_starttransfer} %{time_total}"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(PIN["client"] + args + [url], capture_output=True, text=True).stdout.split()
    return int(out[0]), int(out[1]), float(out[2]), float(out[3])


def parallel_curl(url, n):
    """n concurrent downloads; returns (wall seconds, all complete)."""
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: curl(url), range(n)))
    return time.time() - start, results


def upstream_log(path):
    """(method, path, status, bytes) of each request in the upstream's access log."""
    rx = re.compile(r'"(GET|HEAD) (\S+) HTTP/[0-9.]+" (\d{3}) (\d+|-)')
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            m = rx.search(line)
            if m:
                out.append((m[1], m[2], int(m[3]), 0 if m[4] == "-" else int(m[4])))
    return out


def ab_head(url, seconds, accept):
    """HEAD load with ApacheBench (wrk waits for a body after a HEAD's Content-Length)."""
    args = ["ab", "-q", "-k", "-i", "-c", "64", "-t", str(seconds), "-n", "10000000", "-H", f"Accept: {accept}", url]
    out = subprocess.run(PIN["client"] + args, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", out)[1])
    p99 = float(re.search(r"\n\s+99%\s+(\d+)", out)[1])
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    return rps, p99, int(non2xx[1]) if non2xx else 0


def wrk(url, seconds, head=False, accept=None, tmp="."):
    if head:
        return ab_head(url, seconds, accept)
    args = ["wrk", "-t2", "-c64", f"-d{seconds}s", "--latency"]
    if accept:
        args += ["-H", f"Accept: {accept}"]
    out = subprocess.run(PIN["client"] + args + [url], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99[2]]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, float(p99[1]) * scale, int(non2xx[1]) if non2xx else 0


UNITS = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}


def wrk_run(url, conns, seconds, accept=None, threads=2, timeout="30s"):
    """wrk with `conns` connections: requests/s, p99 (ms), bytes read, requests, errors (socket
    errors and non-2xx answers)."""
    args = ["wrk", f"-t{min(threads, conns)}", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", timeout]
    if accept:
        args += ["-H", f"Accept: {accept}"]
    out = subprocess.run(PIN["client"] + args + [url], capture_output=True, text=True).stdout
    return parse_wrk(out)


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99[2]]
    done = re.search(r"(\d+) requests in [\d.]+\w+, ([\d.]+)(B|KB|MB|GB|TB) read", out)
    errors, detail = 0, {}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        detail = {k: int(sock[i + 1]) for i, k in enumerate(["connect", "read", "write", "timeout"])}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        detail["non2xx"] = int(non2xx[1])
    errors = sum(detail.values())
    mx = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    return {"rps": rps, "p99_ms": float(p99[1]) * scale, "bytes": float(done[2]) * UNITS[done[3]],
            "requests": int(done[1]), "errors": errors, "error_kinds": detail,
            "max_ms": float(mx[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[mx[2]] if mx else None}


def blob_throughput(srv, url, conns, seconds):
    """Warm blob downloads over `conns` keep-alive connections for `seconds`: MiB/s, and the
    server's CPU seconds (user + system, all its processes) per GiB served."""
    cpu0 = srv.cpu_seconds()
    r = wrk_run(url, conns, seconds)
    cpu = srv.cpu_seconds() - cpu0
    gib = r["bytes"] / 1024 ** 3
    return {"mib_s": r["bytes"] / MIB / seconds, "cpu_per_gib": cpu / gib if gib else float("nan"),
            "errors": r["errors"]}


def thousand_clients(srv, manifest_url, layer_url, seconds, accept, split=(800, 200)):
    """800 connections on a warm manifest by tag and 200 on a warm layer at once (two wrk
    processes). Returns the two wrk results."""
    def start(url, conns, accept_header):
        args = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "30s"]
        if accept_header:
            args += ["-H", f"Accept: {accept_header}"]
        return subprocess.Popen(PIN["client"] + args + [url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    m = start(manifest_url, split[0], accept)
    l = start(layer_url, split[1], None)
    return parse_wrk(m.communicate()[0]), parse_wrk(l.communicate()[0])


def get_and_hash(url):
    """GET a URL; (status, sha256 hex of the body, length)."""
    m = re.match(r"http://([^/:]+):(\d+)(/.*)", url)
    c = http.client.HTTPConnection(m[1], int(m[2]), timeout=600)
    try:
        c.request("GET", m[3])
        r = c.getresponse()
        h, n = hashlib.sha256(), 0
        while True:
            chunk = r.read(256 * 1024)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        return r.status, h.hexdigest(), n
    except OSError as e:
        return str(e), "", 0
    finally:
        c.close()


def metric(port, name):
    """A gauge or counter of pier's /metrics (summed over its labels)."""
    _, _, body = request(port, "GET", "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.split()[-1])
    return total


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"


SECTIONS = ["cold", "large", "small", "thousand", "fanin1000"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large-mib", default="200,1024", help="sizes of the warm large blobs (comma-separated)")
    ap.add_argument("--cold-mib", type=int, default=100, help="size of each cold fan-in blob")
    ap.add_argument("--wrk-seconds", type=int, default=8)
    ap.add_argument("--fan-in", default="1,10,100")
    ap.add_argument("--thousand-seconds", type=int, default=60, help="length of the 1,000-connection run")
    ap.add_argument("--thousand-split", default="800,200", help="connections on the manifest and on the layer")
    ap.add_argument("--layer-mib", type=int, default=16, help="size of the layer in the 1,000-connection run")
    ap.add_argument("--fan-in-clients", type=int, default=1000, help="clients on one cold blob (pier only)")
    ap.add_argument("--fan-in-mib", type=int, default=8, help="size of that cold blob")
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections to run: " + ",".join(SECTIONS))
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the large and small sections, contenders taking turns in each: the table "
                         "shows each figure's median and the range of the per-round pier/nginx ratios")
    ap.add_argument("--pin", action="store_true",
                    help="servers on CPU 0, load generators on CPU 1 (taskset): each side has one core of its own, "
                         "so ratios depend less on how the two share the machine")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if args.pin:
        if os.cpu_count() < 2 or not shutil.which("taskset"):
            sys.exit("--pin needs two CPUs and taskset (util-linux)")
        PIN["server"], PIN["client"] = ["taskset", "-c", "0"], ["taskset", "-c", "1"]
    for tool in ["docker-registry", "nginx", "wrk", "ab", "curl"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install docker-registry nginx wrk apache2-utils curl)")
    if not os.path.exists(PIER):
        sys.exit("build pier first: cargo build --release")
    # A thousand connections need a thousand descriptors in wrk and in each server.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        sys.exit(f"the descriptor limit ({hard}) is too low for 1,000 connections: raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fan_in = [int(n) for n in args.fan_in.split(",")] if "cold" in only else []
    large_sizes = [int(n) for n in args.large_mib.split(",")] if "large" in only else []
    tmp = tempfile.mkdtemp(prefix="pier-bench-")
    servers = []
    try:
        # --- the upstream, loaded ---
        upstream = start_upstream(tmp)
        up_port = upstream.port
        servers.append(upstream)
        print("loading the upstream...", file=sys.stderr)
        blobs = {}
        random_file(f"{tmp}/small", 1024)
        blobs["small"] = push_blob(up_port, "bench/app", f"{tmp}/small")
        for mib in large_sizes:
            random_file(f"{tmp}/large{mib}", mib * MIB)
            blobs[f"large{mib}"] = push_blob(up_port, "bench/app", f"{tmp}/large{mib}")
        random_file(f"{tmp}/layer", args.layer_mib * MIB)
        blobs["layer"] = push_blob(up_port, "bench/app", f"{tmp}/layer")
        cold = {}
        if "cold" in only:
            for who in ["pier", "distribution"]:
                for n in fan_in + ["ttfb"]:
                    random_file(f"{tmp}/cold", args.cold_mib * MIB)
                    cold[(who, n)] = push_blob(up_port, "bench/app", f"{tmp}/cold")
            random_file(f"{tmp}/cold", args.cold_mib * MIB)
            cold[("direct", "ttfb")] = push_blob(up_port, "bench/app", f"{tmp}/cold")
        if "fanin1000" in only:
            random_file(f"{tmp}/cold", args.fan_in_mib * MIB)
            cold["fanin1000"] = push_blob(up_port, "bench/app", f"{tmp}/cold")
        if os.path.exists(f"{tmp}/cold"):
            os.remove(f"{tmp}/cold")
        manifest, manifest_digest = push_image(up_port, tmp, blobs["small"], 1024)

        # --- the contenders ---
        def start_pier(name):
            port, metrics_port = free_port(), free_port()
            with open(f"{tmp}/{name}.yaml", "w") as f:
                f.write(f"cache:\n  dir: {tmp}/{name}-cache\nlog:\n  level: warn\nmetrics:\n  listen: 127.0.0.1:{metrics_port}\n"
                        f"upstreams:\n  - name: docker.io\n    url: http://127.0.0.1:{up_port}\n")
            srv = Server(name, [PIER, "serve", "--config", f"{tmp}/{name}.yaml", "--listen", f"127.0.0.1:{port}"],
                         port, f"{tmp}/{name}.log")
            srv.metrics_port = metrics_port
            servers.append(srv)
            return srv
        pier = start_pier("pier")
        dist_port = free_port()
        with open(f"{tmp}/proxy.yml", "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {tmp}/proxy-storage\n  cache:\n    blobdescriptor: inmemory\n"
                    f"http:\n  addr: 127.0.0.1:{dist_port}\nproxy:\n  remoteurl: http://127.0.0.1:{up_port}\n")
        dist = Server("distribution", ["docker-registry", "serve", f"{tmp}/proxy.yml"], dist_port, f"{tmp}/proxy.log")
        servers.append(dist)
        # nginx serves the same files: blobs by digest, the manifest by tag and by digest.
        os.makedirs(f"{tmp}/www/blobs")
        os.makedirs(f"{tmp}/www/manifests")
        for name in ["small", "layer"] + [f"large{mib}" for mib in large_sizes]:
            os.link(f"{tmp}/{name}", f"{tmp}/www/blobs/{blobs[name]}")
        for ref in ["1", manifest_digest]:
            with open(f"{tmp}/www/manifests/{ref}", "wb") as f:
                f.write(manifest)
        nginx_port = free_port()
        with open(f"{tmp}/nginx.conf", "w") as f:
            f.write(f"""daemon off;
user root;
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  server {{
    listen 127.0.0.1:{nginx_port} backlog=4096;
    root {tmp}/www;
    location ~ ^/v2/.+/blobs/(sha256:[0-9a-f]+)$ {{ default_type application/octet-stream; try_files /blobs/$1 =404; }}
    location ~ ^/v2/.+/manifests/(.+)$ {{ default_type {OCI_MANIFEST}; try_files /manifests/$1 =404; }}
  }}
}}
""")
        nginx = Server("nginx", ["nginx", "-c", f"{tmp}/nginx.conf"], nginx_port, f"{tmp}/nginx.log")
        servers.append(nginx)
        proxies = {"pier": pier, "distribution": dist}
        contenders = {"pier": pier, "distribution": dist, "nginx": nginx}
        results = {}

        # 3. cold fan-in (first, while every cold blob is cold)
        fan = {}
        for who, srv in proxies.items():
            for n in fan_in:
                digest = cold[(who, n)]
                before = len(upstream_log(f"{tmp}/upstream.log"))
                wall, res = parallel_curl(srv.url(f"/v2/bench/app/blobs/{digest}"), n)
                time.sleep(1)  # let the upstream's log catch up
                reqs = [r for r in upstream_log(f"{tmp}/upstream.log")[before:] if digest in r[1]]
                ok = sum(1 for r in res if r[0] == 200 and r[1] == args.cold_mib * MIB)
                fan[(who, n)] = (wall, sum(1 for r in reqs if r[0] == "GET"), sum(r[3] for r in reqs if r[0] == "GET") / MIB, ok)
        # 4. cold time to first byte
        ttfb = {}
        if "cold" in only:
            for who, srv in proxies.items():
                ttfb[who] = curl(srv.url(f"/v2/bench/app/blobs/{cold[(who, 'ttfb')]}"))[2]
            ttfb["direct"] = curl(upstream.url(f"/v2/bench/app/blobs/{cold[('direct', 'ttfb')]}"))[2]

        # 4b. many clients on one cold blob (pier only: Distribution makes one upstream request
        # per client, see the fan-in rows)
        many = None
        if "fanin1000" in only:
            digest = cold["fanin1000"]
            url = pier.url(f"/v2/bench/app/blobs/{digest}")
            before = len(upstream_log(f"{tmp}/upstream.log"))
            start = time.time()
            with concurrent.futures.ThreadPoolExecutor(args.fan_in_clients) as pool:
                res = list(pool.map(lambda _: get_and_hash(url), range(args.fan_in_clients)))
            wall = time.time() - start
            time.sleep(1)
            reqs = [r for r in upstream_log(f"{tmp}/upstream.log")[before:] if digest in r[1] and r[0] == "GET"]
            good = sum(1 for r in res if r[0] == 200 and "sha256:" + r[1] == digest and r[2] == args.fan_in_mib * MIB)
            many = (len(reqs), good, wall)
            results["fanin1000"] = many

        # 1. warm large blobs: throughput and the server's CPU per GiB
        rounds = range(max(1, args.repeat))
        large = {}
        for mib in large_sizes:
            for who, srv in contenders.items():
                curl(srv.url(f"/v2/bench/app/blobs/{blobs[f'large{mib}']}"))  # prime (a proxy caches it)
            time.sleep(1)
            for _ in rounds:
                for conns in [1, 16]:
                    for who, srv in contenders.items():
                        url = srv.url(f"/v2/bench/app/blobs/{blobs[f'large{mib}']}")
                        large.setdefault((mib, conns, who), []).append(
                            blob_throughput(srv, url, conns, args.wrk_seconds))
        results["large"] = {f"{m} MiB / {c} / {w}": v for (m, c, w), v in large.items()}

        # 2. warm small requests
        small_cases = [
            ("manifest GET by tag", "/v2/bench/app/manifests/1", False),
            ("manifest GET by digest", f"/v2/bench/app/manifests/{manifest_digest}", False),
            ("manifest HEAD by tag", "/v2/bench/app/manifests/1", True),
            ("manifest HEAD by digest", f"/v2/bench/app/manifests/{manifest_digest}", True),
            ("1 KiB blob GET", f"/v2/bench/app/blobs/{blobs['small']}", False),
        ] if "small" in only else []
        small = {}
        for case, path, head in small_cases:
            for who, srv in contenders.items():
                curl(srv.url(path), headers=[f"Accept: {OCI_MANIFEST}"])  # prime
        for _ in rounds:
            for case, path, head in small_cases:
                for who, srv in contenders.items():
                    small.setdefault((case, who), []).append(
                        wrk(srv.url(path), args.wrk_seconds, head=head, accept=OCI_MANIFEST, tmp=tmp))
        results["small"] = {f"{c} / {w}": v for (c, w), v in small.items()}

        rss = {who: srv.peak_rss_mib() for who, srv in contenders.items()}
        results["rss"] = rss

        # 5. a thousand connections: 800 on a warm manifest by tag, 200 on a warm layer. A pier
        # of its own, so that its peak RSS is this scenario's alone.
        thousand = {}
        if "thousand" in only:
            pier1k = start_pier("pier-1000")
            for who, srv in [("pier", pier1k), ("nginx", nginx)]:
                murl, lurl = srv.url("/v2/bench/app/manifests/1"), srv.url(f"/v2/bench/app/blobs/{blobs['layer']}")
                curl(murl, headers=[f"Accept: {OCI_MANIFEST}"])
                curl(lurl)
                time.sleep(1)
                cpu0 = srv.cpu_seconds()
                m, l = thousand_clients(srv, murl, lurl, args.thousand_seconds, OCI_MANIFEST,
                                        split=[int(n) for n in args.thousand_split.split(",")])
                cpu = srv.cpu_seconds() - cpu0
                tier = metric(srv.metrics_port, "pier_memory_tier_bytes") / MIB if who == "pier" else 0.0
                thousand[who] = {"manifest": m, "layer": l, "rss": srv.peak_rss_mib(), "tier_mib": tier,
                                 "cpu_per_gib": cpu / ((m["bytes"] + l["bytes"]) / 1024 ** 3)}
            results["thousand"] = thousand
        print(json.dumps(results), file=sys.stderr)

        # --- the table ---
        print(f"\n### pier vs Distribution {subprocess.run(['docker-registry', '--version'], capture_output=True, text=True).stdout.split()[-1]} (proxy) vs nginx\n")
        print(f"Machine: {os.cpu_count()} cores, {int(open('/proc/meminfo').readline().split()[1]) // 1024 // 1024} GiB; "
              f"clients (curl, wrk) run on the same cores as the servers.\n")
        repeated = args.repeat > 1
        if repeated:
            print(f"Each warm figure is the median of {args.repeat} rounds; the last column is the range of "
                  f"pier/nginx over the rounds (each round's pier against the same round's nginx).\n")
        print("| measurement | pier | Distribution | nginx | pier/Distribution | pier/nginx |" + (" pier/nginx per round |" if repeated else ""))
        print("|---|---|---|---|---|---|" + ("---|" if repeated else ""))

        def spread(p, n):
            """The per-round pier/nginx ratios' range, as a last column when rounds repeat."""
            if not repeated:
                return ""
            rs = sorted(a / b for a, b in zip(p, n) if b)
            return f" {rs[0]:.2f}x-{rs[-1]:.2f}x |" if rs else " - |"

        for mib in large_sizes:
            for conns in [1, 16]:
                runs = {w: large[(mib, conns, w)] for w in ["pier", "distribution", "nginx"]}
                p, d, n = ({k: median([r[k] for r in runs[w]]) for k in ["mib_s", "cpu_per_gib"]}
                           for w in ["pier", "distribution", "nginx"])
                errors = {w: sum(r["errors"] for r in runs[w]) for w in runs}
                errs = lambda w: f" ({errors[w]} errors)" if errors[w] else ""
                col = lambda k: spread([r[k] for r in runs["pier"]], [r[k] for r in runs["nginx"]])
                print(f"| warm {mib} MiB blob, {conns} conns (MiB/s) | {p['mib_s']:.0f}{errs('pier')} | {d['mib_s']:.0f}{errs('distribution')} | {n['mib_s']:.0f}{errs('nginx')} | {ratio(p['mib_s'], d['mib_s'])} | {ratio(p['mib_s'], n['mib_s'])} |{col('mib_s')}")
                print(f"| warm {mib} MiB blob, {conns} conns: server CPU s per GiB | {p['cpu_per_gib']:.3f} | {d['cpu_per_gib']:.3f} | {n['cpu_per_gib']:.3f} | {ratio(p['cpu_per_gib'], d['cpu_per_gib'])} | {ratio(p['cpu_per_gib'], n['cpu_per_gib'])} |{col('cpu_per_gib')}")
        for case, _, _ in small_cases:
            runs = {w: small[(case, w)] for w in ["pier", "distribution", "nginx"]}
            (pr, pl, pe), (dr, dl, de), (nr, nl, ne) = (
                (median([r[0] for r in runs[w]]), median([r[1] for r in runs[w]]), sum(r[2] for r in runs[w]))
                for w in ["pier", "distribution", "nginx"])
            errs = lambda e: f" ({e} non-2xx)" if e else ""
            col = lambda i: spread([r[i] for r in runs["pier"]], [r[i] for r in runs["nginx"]])
            print(f"| {case}, 64 conns (req/s) | {pr:.0f}{errs(pe)} | {dr:.0f}{errs(de)} | {nr:.0f}{errs(ne)} | {ratio(pr, dr)} | {ratio(pr, nr)} |{col(0)}")
            print(f"| {case}, p99 latency (ms) | {pl:.2f} | {dl:.2f} | {nl:.2f} | {ratio(pl, dl)} | {ratio(pl, nl)} |{col(1)}")
        for n in fan_in:
            (pw, pg, pb, pok), (dw, dg, db, dok) = fan[("pier", n)], fan[("distribution", n)]
            print(f"| cold {args.cold_mib} MiB, {n} clients: upstream GETs | {pg} | {dg} | - | {ratio(pg, dg)} | - |")
            print(f"| cold {args.cold_mib} MiB, {n} clients: upstream MiB | {pb:.0f} | {db:.0f} | - | {ratio(pb, db)} | - |")
            print(f"| cold {args.cold_mib} MiB, {n} clients: last client done (s), complete bodies | {pw:.2f}, {pok}/{n} | {dw:.2f}, {dok}/{n} | - | {ratio(pw, dw)} | - |")
        if ttfb:
            print(f"| cold time to first byte (ms; direct from upstream: {ttfb['direct'] * 1000:.1f}) | {ttfb['pier'] * 1000:.1f} | {ttfb['distribution'] * 1000:.1f} | - | {ratio(ttfb['pier'], ttfb['distribution'])} | - |")
        if many:
            print(f"| cold {args.fan_in_mib} MiB, {args.fan_in_clients} clients: upstream GETs, bodies with the right digest, last done (s) | {many[0]}, {many[1]}/{args.fan_in_clients}, {many[2]:.1f} | - | - | - | - |")
        print(f"| peak RSS over sections 1-4 (MiB) | {rss['pier']:.0f} | {rss['distribution']:.0f} | {rss['nginx']:.0f} | {ratio(rss['pier'], rss['distribution'])} | {ratio(rss['pier'], rss['nginx'])} |")
        if thousand:
            p, n = thousand["pier"], thousand["nginx"]
            for part, label in [("manifest", "800 conns on a manifest by tag"), ("layer", f"200 conns on a {args.layer_mib} MiB layer")]:
                pm, nm = p[part], n[part]
                print(f"| 1,000 conns, {label} (req/s; errors) | {pm['rps']:.0f}; {pm['errors']} | - | {nm['rps']:.0f}; {nm['errors']} | - | {ratio(pm['rps'], nm['rps'])} |")
                print(f"| 1,000 conns, {label}: p99 (ms) | {pm['p99_ms']:.1f} | - | {nm['p99_ms']:.1f} | - | {ratio(pm['p99_ms'], nm['p99_ms'])} |")
            print(f"| 1,000 conns for {args.thousand_seconds} s: peak RSS (MiB; pier's memory tier held {p['tier_mib']:.1f}) | {p['rss']:.0f} | - | {n['rss']:.0f} | - | {ratio(p['rss'], n['rss'])} |")
            print(f"| 1,000 conns: server CPU s per GiB | {p['cpu_per_gib']:.3f} | - | {n['cpu_per_gib']:.3f} | - | {ratio(p['cpu_per_gib'], n['cpu_per_gib'])} |")
        if not all(r["errors"] == 0 for runs in large.values() for r in runs):
            print("\nWARNING: some warm large-blob downloads failed", file=sys.stderr)
    finally:
        for s in reversed(servers):
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
