#!/usr/bin/env python3
"""User-space instructions pier executes per warm small request, counted by valgrind's callgrind.

Unlike requests per second, the count does not move with the load of the machine (a run repeats
to within about 1%), so it shows what a change to the request path costs or saves even on a
shared machine. It counts pier's own instructions only (the kernel's work for the socket is not
in it: see compare.py for whole-system figures).

One run starts a real upstream (Debian's docker-registry) with an image, warms a pier's cache,
then for each case starts pier under callgrind, sends 200 requests to settle it, zeroes the
counters, sends N requests with ApacheBench (8 keep-alive connections) and reads the total.

Needs: docker-registry, valgrind, apache2-utils, curl, and pier built with `cargo build --release`
(or PIER_BIN=path):

    python3 benches/instructions.py [--requests 3000]
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as c  # noqa: E402  (the upstream and pier helpers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    for tool in ["docker-registry", "valgrind", "callgrind_control", "ab", "curl"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install docker-registry valgrind apache2-utils curl)")
    if not os.path.exists(c.PIER):
        sys.exit("build pier first: cargo build --release")
    tmp = tempfile.mkdtemp(prefix="pier-instructions-")
    servers = []
    try:
        upstream = c.start_upstream(tmp)
        servers.append(upstream)
        up_port = upstream.port
        c.random_file(f"{tmp}/small", 1024)
        small = c.push_blob(up_port, "bench/app", f"{tmp}/small")
        _, manifest_digest = c.push_image(up_port, tmp, small, 1024)

        port, metrics_port = c.free_port(), c.free_port()
        with open(f"{tmp}/pier.yaml", "w") as f:
            f.write(f"cache:\n  dir: {tmp}/cache\nlog:\n  level: warn\nmetrics:\n  listen: 127.0.0.1:{metrics_port}\n"
                    f"upstreams:\n  - name: docker.io\n    url: http://127.0.0.1:{up_port}\n")
        argv = [c.PIER, "serve", "--config", f"{tmp}/pier.yaml", "--listen", f"127.0.0.1:{port}"]
        cases = [
            ("manifest HEAD by tag", "/v2/bench/app/manifests/1", True),
            ("manifest GET by tag", "/v2/bench/app/manifests/1", False),
            ("manifest HEAD by digest", f"/v2/bench/app/manifests/{manifest_digest}", True),
            ("manifest GET by digest", f"/v2/bench/app/manifests/{manifest_digest}", False),
            ("1 KiB blob GET", f"/v2/bench/app/blobs/{small}", False),
        ]
        # Warm the cache (manifests and the blob on disk) with a plain run.
        warm = c.Server("pier", argv, port, f"{tmp}/pier.log")
        for _, path, _ in cases:
            c.curl(warm.url(path), headers=[f"Accept: {c.OCI_MANIFEST}"])
        warm.stop()

        def ab(url, n, head, conns):
            flags = ["-i"] if head else []
            out = subprocess.run(["ab", "-q", "-k", *flags, "-c", str(conns), "-n", str(n), "-H", f"Accept: {c.OCI_MANIFEST}", url],
                                 capture_output=True, text=True).stdout
            assert "Non-2xx" not in out, out
            assert f"Complete requests:      {n}" in out, out

        print("\n| request (warm) | instructions per request |\n|---|---|")
        for name, path, head in cases:
            out = f"{tmp}/callgrind.out"
            proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            c.wait_port(port, proc, "pier under valgrind")
            url = f"http://127.0.0.1:{port}{path}"
            ab(url, 200, head, 4)
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
            ab(url, args.requests, head, 8)
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
            time.sleep(1)
            dumps = sorted(glob.glob(f"{out}.*"), key=os.path.getmtime)
            total = None
            with open(dumps[-1]) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        total = int(line.split()[1])
                        break
            proc.terminate()
            proc.wait(30)
            for d in glob.glob(f"{out}*"):
                os.remove(d)
            print(f"| {name} | {total // args.requests} |")
    finally:
        for s in reversed(servers):
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
