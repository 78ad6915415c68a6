#!/usr/bin/env python3
"""Side by side, on this machine, in one run: pier, the CNCF Distribution registry in proxy mode,
and nginx serving the same blob files from disk, all in front of one real upstream (Debian's
docker-registry, loaded with generated blobs and an image).

Measures
  1. warm large blob: throughput with 1 and 16 concurrent clients (curl);
  2. warm small requests with 64 connections (wrk; ApacheBench for HEAD, which wrk mishandles):
     manifest GET and HEAD by tag and by digest, and a 1 KiB blob: requests per second and p99
     latency;
  3. cold fan-in: N = 1, 10, 100 clients on one cold 100 MiB blob: upstream requests and bytes,
     time until the last client finishes;
  4. cold time to first byte through each proxy, against direct from the upstream;
  5. peak RSS (VmHWM) of each server over 1-4;
and prints a markdown table with the ratios pier/Distribution and pier/nginx.

Needs: docker-registry, nginx, wrk, apache2-utils, curl (Debian packages), and pier built with
`cargo build --release`. Run as root (nginx reads the temporary directory as root):

    python3 benches/compare.py [--large-mib 1024] [--wrk-seconds 8]

Everything listens on 127.0.0.1 and stops when the script ends.
"""

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIER = os.path.join(ROOT, "target", "release", "pier")
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


class Server:
    def __init__(self, name, argv, port, log):
        self.name, self.port = name, port
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
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
    out = subprocess.run(args + [url], capture_output=True, text=True).stdout.split()
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
    out = subprocess.run(args, capture_output=True, text=True).stdout
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
    out = subprocess.run(args + [url], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99[2]]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, float(p99[1]) * scale, int(non2xx[1]) if non2xx else 0


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large-mib", type=int, default=1024, help="size of the warm large blob")
    ap.add_argument("--cold-mib", type=int, default=100, help="size of each cold fan-in blob")
    ap.add_argument("--wrk-seconds", type=int, default=8)
    ap.add_argument("--fan-in", default="1,10,100")
    args = ap.parse_args()
    for tool in ["docker-registry", "nginx", "wrk", "ab", "curl"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install docker-registry nginx wrk apache2-utils curl)")
    if not os.path.exists(PIER):
        sys.exit("build pier first: cargo build --release")
    fan_in = [int(n) for n in args.fan_in.split(",")]
    tmp = tempfile.mkdtemp(prefix="pier-bench-")
    servers = []
    try:
        # --- the upstream, loaded ---
        up_port = free_port()
        os.makedirs(f"{tmp}/upstream")
        with open(f"{tmp}/upstream.yml", "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {tmp}/upstream\n"
                    f"http:\n  addr: 127.0.0.1:{up_port}\n")
        upstream = Server("upstream", ["docker-registry", "serve", f"{tmp}/upstream.yml"], up_port, f"{tmp}/upstream.log")
        servers.append(upstream)
        print(f"loading the upstream ({args.large_mib} MiB + {(2 * len(fan_in) + 2) * args.cold_mib} MiB of blobs)...", file=sys.stderr)
        blobs = {}
        random_file(f"{tmp}/small", 1024)
        blobs["small"] = push_blob(up_port, "bench/app", f"{tmp}/small")
        random_file(f"{tmp}/large", args.large_mib * MIB)
        blobs["large"] = push_blob(up_port, "bench/app", f"{tmp}/large")
        cold = {}
        for who in ["pier", "distribution"]:
            for n in fan_in + ["ttfb"]:
                random_file(f"{tmp}/cold", args.cold_mib * MIB)
                cold[(who, n)] = push_blob(up_port, "bench/app", f"{tmp}/cold")
        random_file(f"{tmp}/cold", args.cold_mib * MIB)
        cold[("direct", "ttfb")] = push_blob(up_port, "bench/app", f"{tmp}/cold")
        os.remove(f"{tmp}/cold")
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        with open(f"{tmp}/config", "wb") as f:
            f.write(config)
        config_digest = push_blob(up_port, "bench/app", f"{tmp}/config")
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
                               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blobs["small"], "size": 1024}]}).encode()
        status, _, body = request(up_port, "PUT", "/v2/bench/app/manifests/1", body=manifest, headers={"Content-Type": OCI_MANIFEST})
        assert status == 201, (status, body)
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()

        # --- the contenders ---
        pier_port = free_port()
        with open(f"{tmp}/mirror.yaml", "w") as f:
            f.write(f"cache:\n  dir: {tmp}/pier-cache\nlog:\n  level: warn\nmetrics:\n  listen: null\n"
                    f"upstreams:\n  - name: docker.io\n    url: http://127.0.0.1:{up_port}\n")
        pier = Server("pier", [PIER, "serve", "--config", f"{tmp}/mirror.yaml", "--listen", f"127.0.0.1:{pier_port}"],
                      pier_port, f"{tmp}/pier.log")
        servers.append(pier)
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
        for name in ["small", "large"]:
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
events {{ worker_connections 1024; }}
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
    listen 127.0.0.1:{nginx_port};
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
        rows = []

        # 3. cold fan-in (first, while every cold blob is cold)
        fan = {}
        for who, srv in proxies.items():
            for n in fan_in:
                digest = cold[(who, n)]
                before = len(upstream_log(f"{tmp}/upstream.log"))
                wall, results = parallel_curl(srv.url(f"/v2/bench/app/blobs/{digest}"), n)
                time.sleep(1)  # let the upstream's log catch up
                reqs = [r for r in upstream_log(f"{tmp}/upstream.log")[before:] if digest in r[1]]
                ok = sum(1 for r in results if r[0] == 200 and r[1] == args.cold_mib * MIB)
                fan[(who, n)] = (wall, sum(1 for r in reqs if r[0] == "GET"), sum(r[3] for r in reqs if r[0] == "GET") / MIB, ok)
        # 4. cold time to first byte
        ttfb = {}
        for who, srv in proxies.items():
            ttfb[who] = curl(srv.url(f"/v2/bench/app/blobs/{cold[(who, 'ttfb')]}"))[2]
        ttfb["direct"] = curl(upstream.url(f"/v2/bench/app/blobs/{cold[('direct', 'ttfb')]}"))[2]

        # 1. warm large blob
        large = {}
        for who, srv in contenders.items():
            url = srv.url(f"/v2/bench/app/blobs/{blobs['large']}")
            curl(url)  # prime (a proxy caches it)
            time.sleep(1)
            one = curl(url)
            wall16, res16 = parallel_curl(url, 16)
            total16 = sum(r[1] for r in res16)
            large[who] = (one[1] / one[3] / MIB, total16 / wall16 / MIB, one[0] == 200 and all(r[0] == 200 for r in res16))

        # 2. warm small requests
        small_cases = [
            ("manifest GET by tag", "/v2/bench/app/manifests/1", False),
            ("manifest GET by digest", f"/v2/bench/app/manifests/{manifest_digest}", False),
            ("manifest HEAD by tag", "/v2/bench/app/manifests/1", True),
            ("manifest HEAD by digest", f"/v2/bench/app/manifests/{manifest_digest}", True),
            ("1 KiB blob GET", f"/v2/bench/app/blobs/{blobs['small']}", False),
        ]
        small = {}
        for case, path, head in small_cases:
            for who, srv in contenders.items():
                curl(srv.url(path), headers=[f"Accept: {OCI_MANIFEST}"])  # prime
                small[(case, who)] = wrk(srv.url(path), args.wrk_seconds, head=head, accept=OCI_MANIFEST, tmp=tmp)

        rss = {who: srv.peak_rss_mib() for who, srv in contenders.items()}
        print(json.dumps({"large": large, "small": {f"{c} / {w}": v for (c, w), v in small.items()},
                          "fan_in": {f"{w} / {n}": v for (w, n), v in fan.items()}, "ttfb": ttfb, "rss": rss}),
              file=sys.stderr)

        # --- the table ---
        print(f"\n### pier vs Distribution {subprocess.run(['docker-registry', '--version'], capture_output=True, text=True).stdout.split()[-1]} (proxy) vs nginx\n")
        print(f"Machine: {os.cpu_count()} cores, {int(open('/proc/meminfo').readline().split()[1]) // 1024 // 1024} GiB; "
              f"clients (curl, wrk) run on the same cores as the servers.\n")
        print("| measurement | pier | Distribution | nginx | pier/Distribution | pier/nginx |")
        print("|---|---|---|---|---|---|")
        for i, label in enumerate(["1 client", "16 clients"]):
            p, d, n = (large[w][i] for w in ["pier", "distribution", "nginx"])
            print(f"| warm {args.large_mib} MiB blob, {label} (MiB/s) | {p:.0f} | {d:.0f} | {n:.0f} | {ratio(p, d)} | {ratio(p, n)} |")
        for case, _, _ in small_cases:
            (pr, pl, pe), (dr, dl, de), (nr, nl, ne) = (small[(case, w)] for w in ["pier", "distribution", "nginx"])
            errs = lambda e: f" ({e} non-2xx)" if e else ""
            print(f"| {case}, 64 conns (req/s) | {pr:.0f}{errs(pe)} | {dr:.0f}{errs(de)} | {nr:.0f}{errs(ne)} | {ratio(pr, dr)} | {ratio(pr, nr)} |")
            print(f"| {case}, p99 latency (ms) | {pl:.2f} | {dl:.2f} | {nl:.2f} | {ratio(pl, dl)} | {ratio(pl, nl)} |")
        for n in fan_in:
            (pw, pg, pb, pok), (dw, dg, db, dok) = fan[("pier", n)], fan[("distribution", n)]
            print(f"| cold {args.cold_mib} MiB, {n} clients: upstream GETs | {pg} | {dg} | - | {ratio(pg, dg)} | - |")
            print(f"| cold {args.cold_mib} MiB, {n} clients: upstream MiB | {pb:.0f} | {db:.0f} | - | {ratio(pb, db)} | - |")
            print(f"| cold {args.cold_mib} MiB, {n} clients: last client done (s), complete bodies | {pw:.2f}, {pok}/{n} | {dw:.2f}, {dok}/{n} | - | {ratio(pw, dw)} | - |")
        print(f"| cold time to first byte (ms; direct from upstream: {ttfb['direct'] * 1000:.1f}) | {ttfb['pier'] * 1000:.1f} | {ttfb['distribution'] * 1000:.1f} | - | {ratio(ttfb['pier'], ttfb['distribution'])} | - |")
        print(f"| peak RSS over the run (MiB) | {rss['pier']:.0f} | {rss['distribution']:.0f} | {rss['nginx']:.0f} | {ratio(rss['pier'], rss['distribution'])} | {ratio(rss['pier'], rss['nginx'])} |")
        if not all(large[w][2] for w in contenders):
            print("\nWARNING: some warm large-blob downloads did not answer 200", file=sys.stderr)
    finally:
        for s in reversed(servers):
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
