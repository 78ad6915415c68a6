#!/usr/bin/env python3
"""Push throughput, on this machine, in one run: pier hosting `team/**` (anonymous push on)
against the CNCF Distribution registry (Debian's docker-registry, filesystem storage), both on
127.0.0.1, each in a temporary directory.

Measures, with http.client over plain HTTP, one request after another on one keep-alive
connection (reopened if the server closes it), timing from the first request to the 201:
  monolithic  a random blob (1 GiB by default) pushed as POST /v2/<repo>/blobs/uploads/ (202),
              then one PUT <Location>?digest= with the whole blob as body (201): MiB/s;
  single-post the same blob as one POST /v2/<repo>/blobs/uploads/?digest= with the body (the
              spec's single-request upload); a server that answers 202 (it ignored the body and
              opened a session) is reported as not supporting it;
  chunked     the same size of other random bytes as POST, then one PATCH per 8 MiB piece
              (Content-Range: <first>-<last>, Content-Type: application/octet-stream), following
              each answer's Location, then PUT <Location>?digest= with no body (201): MiB/s;
  manifests   100 small OCI manifests pushed by tag one after another (PUT
              /v2/<repo>/manifests/t<i>), each naming its own small config blob and one small
              layer pushed beforehand (not timed): manifests per second over the PUTs' time.
After each push (outside the timing) it checks that HEAD of the blob's digest (GET, body hashed,
for the small blobs) answers 200 with the right size, and for each manifest that GET by tag
answers 200 with the pushed bytes and digest. Prints a markdown table with pier/Distribution.

    cargo build --release
    python3 benches/push.py [--blob-mib 1024] [--chunk-mib 8] [--manifests 100] [--repeat 1]
    PIER_BIN=/path/to/pier python3 benches/push.py

Needs docker-registry (Debian package). Everything listens on 127.0.0.1 and stops when the
script ends; the temporary directories are removed.
"""

import argparse
import datetime
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIER = os.environ.get("PIER_BIN", os.path.join(ROOT, "target", "release", "pier"))
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
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
        self.log_path = log
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(port, self.proc, name)

    def cpu_seconds(self):
        """User + system CPU time of the server so far (/proc/PID/stat)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Client:
    """One keep-alive connection; reopened when the server closed it."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def request(self, method, path, body=None, headers=None):
        """(status, headers dict (lower-case names), body bytes)."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600,
                                                       blocksize=MIB)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A keep-alive connection the server closed between requests: retry once on a
                # new one (only before any answer was read, so nothing was half-done).
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            if r.will_close:
                self.conn.close()
                self.conn = None
            return r.status, hdrs, data

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None


def local_path(location, port):
    """A Location header (absolute URL or path) as a path for this server."""
    u = urllib.parse.urlsplit(location)
    if u.netloc and u.netloc != f"127.0.0.1:{port}" and u.netloc != f"localhost:{port}":
        raise AssertionError(f"Location points elsewhere: {location}")
    return u.path + (f"?{u.query}" if u.query else "")


def with_query(path, query):
    return path + ("&" if "?" in path else "?") + query


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def expect(status, want, what, body=b""):
    if status != want:
        raise AssertionError(f"{what}: HTTP {status}, wanted {want}: {body[:300]!r}")


# --- the pushes ---

def push_monolithic(c, repo, data, digest):
    """POST, then one PUT ?digest= with the whole blob. Seconds from the POST to the 201."""
    t0 = time.perf_counter()
    st, h, b = c.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    expect(st, 202, "POST upload", b)
    loc = local_path(h["location"], c.port)
    st, h, b = c.request("PUT", with_query(loc, f"digest={digest}"), body=data,
                         headers={"Content-Length": str(len(data)),
                                  "Content-Type": "application/octet-stream"})
    t = time.perf_counter() - t0
    expect(st, 201, "PUT ?digest= with the blob", b)
    return t


def push_single_post(port, repo, data, digest):
    """One POST ?digest= with the blob, on a connection of its own. (seconds, status, body): 201
    when the server took it. A server that answers before reading the body and closes the
    connection (Distribution) breaks the send; its answer is read all the same."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600, blocksize=MIB)
    t0 = time.perf_counter()
    try:
        c.request("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", body=data,
                  headers={"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"})
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        r = c.getresponse()
        st, b = r.status, r.read()
    except (OSError, http.client.HTTPException) as e:
        st, b = f"no answer ({e.__class__.__name__})", b""
    t = time.perf_counter() - t0
    c.close()
    return t, st, b


def push_chunked(c, repo, data, digest, chunk):
    """POST, PATCH per piece with Content-Range, PUT ?digest= with no body."""
    view = memoryview(data)
    t0 = time.perf_counter()
    st, h, b = c.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    expect(st, 202, "POST upload", b)
    loc = local_path(h["location"], c.port)
    for first in range(0, len(data), chunk):
        piece = view[first:first + chunk]
        last = first + len(piece) - 1
        st, h, b = c.request("PATCH", loc, body=piece,
                             headers={"Content-Length": str(len(piece)),
                                      "Content-Range": f"{first}-{last}",
                                      "Content-Type": "application/octet-stream"})
        expect(st, 202, f"PATCH {first}-{last}", b)
        rng = h.get("range")
        if rng != f"0-{last}":
            raise AssertionError(f"PATCH {first}-{last}: Range {rng!r}, wanted 0-{last}")
        loc = local_path(h["location"], c.port)
    st, h, b = c.request("PUT", with_query(loc, f"digest={digest}"), headers={"Content-Length": "0"})
    t = time.perf_counter() - t0
    expect(st, 201, "PUT ?digest= (end of chunked upload)", b)
    return t


def check_blob_head(c, repo, digest, size):
    st, h, _ = c.request("HEAD", f"/v2/{repo}/blobs/{digest}")
    expect(st, 200, f"HEAD blob {digest[:19]}")
    if int(h.get("content-length", -1)) != size:
        raise AssertionError(f"HEAD blob {digest}: Content-Length {h.get('content-length')}, wanted {size}")


def check_blob_get(c, repo, digest, size):
    st, _, b = c.request("GET", f"/v2/{repo}/blobs/{digest}")
    expect(st, 200, f"GET blob {digest[:19]}", b)
    if len(b) != size or digest_of(b) != digest:
        raise AssertionError(f"GET blob {digest}: {len(b)} bytes, digest {digest_of(b)}")


def small_image(i):
    """(config bytes, layer bytes) of the i-th small image."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": [f"BENCH={i}"]},
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = os.urandom(1024)
    return config, layer


def manifest_for(config, layer, i):
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": len(layer)}],
        "annotations": {"bench.index": str(i)},
    }, separators=(",", ":")).encode()


def push_small_blob(c, repo, data):
    digest = digest_of(data)
    push_monolithic(c, repo, data, digest)
    check_blob_get(c, repo, digest, len(data))
    return digest


# --- the run ---

LOADS = []


def sample_load():
    with open("/proc/loadavg") as f:
        LOADS.append(float(f.read().split()[0]))


def measure(srv, big, big_digest, big2, big2_digest, args, images):
    """All measurements against one server; returns a dict of figures."""
    out = {}
    size = len(big)
    c = Client(srv.port)
    mono, single, chunked = [], [], []
    cpu = {"mono": 0.0, "chunked": 0.0}
    for r in range(args.repeat):
        repo = f"team/bench-mono-{r}"
        sample_load()
        cpu0 = srv.cpu_seconds()
        mono.append(push_monolithic(c, repo, big, big_digest))
        cpu["mono"] += srv.cpu_seconds() - cpu0
        check_blob_head(c, repo, big_digest, size)
        sample_load()
        repo = f"team/bench-chunked-{r}"
        cpu0 = srv.cpu_seconds()
        chunked.append(push_chunked(c, repo, big2, big2_digest, args.chunk_mib * MIB))
        cpu["chunked"] += srv.cpu_seconds() - cpu0
        check_blob_head(c, repo, big2_digest, len(big2))
        sample_load()
        repo = f"team/bench-single-{r}"
        t, st, body = push_single_post(srv.port, repo, big, big_digest)
        if st == 201:
            check_blob_head(c, repo, big_digest, size)
            single.append(t)
        else:
            out["single_status"] = st
        sample_load()
    out["mono"] = [size / MIB / t for t in mono]
    out["chunked"] = [len(big2) / MIB / t for t in chunked]
    out["single"] = [size / MIB / t for t in single]
    out["cpu_per_gib"] = {k: v / (args.repeat * size / 1024 ** 3) for k, v in cpu.items()}

    # Manifests: blobs first (not timed), then the PUTs one after another.
    repo = "team/bench-manifests"
    for config, layer, _ in images:
        push_small_blob(c, repo, config)
        push_small_blob(c, repo, layer)
    sample_load()
    total = 0.0
    cpu0 = srv.cpu_seconds()
    for i, (_, _, manifest) in enumerate(images):
        tag = f"t{i}"
        t0 = time.perf_counter()
        st, h, b = c.request("PUT", f"/v2/{repo}/manifests/{tag}", body=manifest,
                             headers={"Content-Type": OCI_MANIFEST, "Content-Length": str(len(manifest))})
        total += time.perf_counter() - t0
        expect(st, 201, f"PUT manifest {tag}", b)
        want = digest_of(manifest)
        if h.get("docker-content-digest") != want:
            raise AssertionError(f"PUT manifest {tag}: Docker-Content-Digest {h.get('docker-content-digest')}, wanted {want}")
        st, h, b = c.request("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
        expect(st, 200, f"GET manifest {tag}", b)
        if b != manifest or h.get("docker-content-digest") != want:
            raise AssertionError(f"GET manifest {tag}: other bytes or digest ({h.get('docker-content-digest')})")
    sample_load()
    out["manifests_per_s"] = len(images) / total
    out["manifests_cpu_ms"] = (srv.cpu_seconds() - cpu0) * 1000 / len(images)  # with the checking GETs
    c.close()
    return out


def start_pier(tmp):
    port, ops = free_port(), free_port()
    os.makedirs(f"{tmp}/pier-cache")
    with open(f"{tmp}/pier.yaml", "w") as f:
        f.write(f"cache:\n  dir: {tmp}/pier-cache\nlog:\n  level: info\n"
                f"hosted:\n  repositories: [\"team/**\"]\n  allow_anonymous_push: true\n")
    return Server("pier", [PIER, "serve", "--config", f"{tmp}/pier.yaml", "--listen", f"127.0.0.1:{port}",
                           "--metrics-listen", f"127.0.0.1:{ops}"], port, f"{tmp}/pier.log")


def start_distribution(tmp):
    """Debian's default /etc/docker/registry/config.yml, storage in tmp, on 127.0.0.1, and
    without its htpasswd auth (which points at a directory and would refuse every push)."""
    port = free_port()
    os.makedirs(f"{tmp}/distribution")
    with open(f"{tmp}/distribution.yml", "w") as f:
        f.write("version: 0.1\nlog:\n  fields:\n    service: registry\n"
                "storage:\n  cache:\n    blobdescriptor: inmemory\n"
                f"  filesystem:\n    rootdirectory: {tmp}/distribution\n  delete:\n    enabled: true\n"
                f"http:\n  addr: 127.0.0.1:{port}\n  headers:\n    X-Content-Type-Options: [nosniff]\n"
                "health:\n  storagedriver:\n    enabled: true\n    interval: 10s\n    threshold: 3\n")
    return Server("distribution", ["docker-registry", "serve", f"{tmp}/distribution.yml"], port,
                  f"{tmp}/distribution.log")


def fmt_runs(v):
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.0f}"
    return f"{sorted(v)[len(v) // 2]:.0f} ({min(v):.0f}-{max(v):.0f})"


def median(v):
    return sorted(v)[len(v) // 2] if v else None


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blob-mib", type=int, default=1024, help="size of the large blob")
    ap.add_argument("--chunk-mib", type=int, default=8, help="PATCH piece size of the chunked push")
    ap.add_argument("--manifests", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1, help="large-blob pushes per server (median shown)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args()
    if not shutil.which("docker-registry"):
        sys.exit("docker-registry is not installed (apt-get install docker-registry)")
    if not os.path.exists(PIER):
        sys.exit("build pier first: cargo build --release (or set PIER_BIN)")

    print(f"generating 2 x {args.blob_mib} MiB of random bytes...", file=sys.stderr)
    size = args.blob_mib * MIB
    big = b"".join(os.urandom(16 * MIB) for _ in range(size // (16 * MIB))) + os.urandom(size % (16 * MIB))
    big2 = b"".join(os.urandom(16 * MIB) for _ in range(size // (16 * MIB))) + os.urandom(size % (16 * MIB))
    big_digest, big2_digest = digest_of(big), digest_of(big2)
    images = []
    for i in range(args.manifests):
        config, layer = small_image(i)
        images.append((config, layer, manifest_for(config, layer, i)))

    tmp = tempfile.mkdtemp(prefix="pier-pushbench-")
    results = {}
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        # One server at a time, so that neither shares the cores with the other.
        for name, start in [("pier", start_pier), ("distribution", start_distribution)]:
            print(f"measuring {name}...", file=sys.stderr)
            srv = start(tmp)
            try:
                results[name] = measure(srv, big, big_digest, big2, big2_digest, args, images)
            except Exception:
                print(f"{name} failed; its log is {srv.log_path}", file=sys.stderr)
                args.keep = True
                raise
            finally:
                srv.stop()
            print(f"  {results[name]}", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    p, d = results["pier"], results["distribution"]
    version = subprocess.run(["docker-registry", "--version"], capture_output=True, text=True).stdout.split()[-1]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    pier_rev = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True).stdout.strip()
    mib = args.blob_mib
    def unsupported(r):
        st = r.get("single_status")
        return "-" if st is None else f"not taken (HTTP {st})" if isinstance(st, int) else f"not taken ({st})"
    rows = [
        (f"{mib} MiB blob, POST then one PUT ?digest= with the body (MiB/s)",
         fmt_runs(p["mono"]), fmt_runs(d["mono"]), ratio(median(p["mono"]), median(d["mono"]))),
        (f"{mib} MiB blob, chunked: POST, {-(-size // (args.chunk_mib * MIB))} PATCHes of {args.chunk_mib} MiB, PUT ?digest= (MiB/s)",
         fmt_runs(p["chunked"]), fmt_runs(d["chunked"]), ratio(median(p["chunked"]), median(d["chunked"]))),
        (f"{mib} MiB blob, one POST ?digest= with the body (MiB/s)",
         fmt_runs(p["single"]) if p["single"] else unsupported(p),
         fmt_runs(d["single"]) if d["single"] else unsupported(d),
         ratio(median(p["single"]), median(d["single"]))),
        (f"{mib} MiB blob, POST then PUT: server CPU s per GiB",
         f"{p['cpu_per_gib']['mono']:.2f}", f"{d['cpu_per_gib']['mono']:.2f}",
         ratio(p['cpu_per_gib']['mono'], d['cpu_per_gib']['mono'])),
        (f"{mib} MiB blob, chunked: server CPU s per GiB",
         f"{p['cpu_per_gib']['chunked']:.2f}", f"{d['cpu_per_gib']['chunked']:.2f}",
         ratio(p['cpu_per_gib']['chunked'], d['cpu_per_gib']['chunked'])),
        (f"{args.manifests} small manifests by tag, one after another (manifests/s)",
         f"{p['manifests_per_s']:.0f}", f"{d['manifests_per_s']:.0f}",
         ratio(p["manifests_per_s"], d["manifests_per_s"])),
        ("manifests: server CPU ms per manifest (PUT and the checking GET)",
         f"{p['manifests_cpu_ms']:.2f}", f"{d['manifests_cpu_ms']:.2f}",
         ratio(p["manifests_cpu_ms"], d["manifests_cpu_ms"])),
    ]
    print(f"\n### Hosted pushes: {mib} MiB blob, {args.chunk_mib} MiB chunks, {args.manifests} manifests\n")
    print(f"Measured {started:%Y-%m-%d} on {os.cpu_count()} cores ({cpu}); pier at \"{pier_rev}\", "
          f"Distribution {version}; load average (1 min, /proc/loadavg) during the run "
          f"{min(LOADS):.2f} to {max(LOADS):.2f}"
          + (" (the machine was shared with other work)" if max(LOADS) > 1 else "") + ".\n")
    print("| push | pier | Distribution | pier/Distribution |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
