#!/usr/bin/env python3
"""What a FUSE client asks of S3 under fio: rate, ranged GETs, bytes fetched.

Starts SeaweedFS on 127.0.0.1 with a 1 GiB object, and a counting proxy in
front of it that can hold each request back a fixed delay (a per-request
latency, as benches/support/proxy.rs does). Each client is mounted on a fresh
mount, through the proxy, after the page cache is dropped, and read with fio;
printed per cell: fio's rate, bytes read, GETs and their range sizes, bytes
the server sent, the most requests in flight at once, the daemon's peak RSS
and CPU. Run as root (FUSE mounts, drop_caches). 127.0.0.1 only.

  scripts/rand-probe.py --fs bucketfs=target/release/bucketfs --fs s3fs \
      --delay 0 --delay 20 --workload rand256k --workload rand4k

--fs NAME=BINARY for a bucketfs binary (NAME starts with "bucketfs"; with
"posix" in it, the mount gets --posix-metadata), or s3fs.
--workload ls: `ls -l` of a directory of 10,000 small objects (uploaded
once), timed, with the requests the proxy counted (HEADs included). --delay direct mounts without the proxy (no request counts).
--fuse-log keeps bucketfs's FUSE request log and prints the READ sizes.
"""

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

LS_DIR, LS_ENTRIES = "dir10k", 10_000
AK, SK, BUCKET, KEY = "AKIABUCKETFSTEST", "bucketfs-test-secret-4f1c9e", "bench", "seq/big.bin"
SIZE = 1 << 30


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Proxy:
    """Relays TCP to the server; a request is client bytes after server bytes."""

    def __init__(self, upstream, delay_ms):
        self.upstream, self.delay = upstream, delay_ms / 1000.0
        self.reset()
        self.loop = asyncio.new_event_loop()
        self.port = None
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def reset(self):
        self.requests = []  # [method, path, range_len, start, end]
        self.down = 0

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)

        async def start():
            srv = await asyncio.start_server(self._conn, "127.0.0.1", 0)
            self.port = srv.sockets[0].getsockname()[1]
            ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def _conn(self, cr, cw):
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            cw.close()
            return
        state = {"server_spoke": True, "req": None}

        async def up():
            try:
                while True:
                    data = await cr.read(1 << 16)
                    if not data:
                        break
                    if state["server_spoke"] and re.match(rb"^[A-Z]+ \S+ HTTP/1", data):
                        state["server_spoke"] = False
                        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
                        line = head.split("\r\n")[0].split(" ")
                        m = re.search(r"(?im)^range:\s*bytes=(\d+)-(\d*)", head)
                        rlen = int(m.group(2)) - int(m.group(1)) + 1 if m and m.group(2) else None
                        req = [line[0], line[1], rlen, time.monotonic(), None]
                        self.requests.append(req)
                        state["req"] = req
                        if self.delay:
                            await asyncio.sleep(self.delay)
                    sw.write(data)
                    await sw.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    sw.write_eof()
                except (OSError, RuntimeError):
                    pass

        async def down():
            try:
                while True:
                    data = await sr.read(1 << 18)
                    if not data:
                        break
                    state["server_spoke"] = True
                    self.down += len(data)
                    if state["req"] is not None:
                        state["req"][4] = time.monotonic()
                    cw.write(data)
                    await cw.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                cw.close()

        await asyncio.gather(up(), down())
        sw.close()

    def snapshot(self):
        gets = [r for r in self.requests if r[0] == "GET" and r[2] is not None]
        hist = collections.Counter()
        for r in gets:
            n = r[2]
            b = next(lbl for lim, lbl in [(4096, "<=4K"), (8192, "<=8K"), (65536, "<=64K"), (131072, "<=128K"),
                                           (262144, "<=256K"), (393216, "<=384K"), (1 << 20, "<=1M"),
                                           (8 << 20, "<=8M"), (1 << 62, ">8M")] if n <= lim)
            hist[b] += 1
        # Most requests in flight at once: from the request's first byte to
        # the last byte of its answer.
        ev = []
        for r in self.requests:
            if r[4] is not None:
                ev += [(r[3], 1), (r[4], -1)]
        cur = peak = 0
        for _, d in sorted(ev):
            cur += d
            peak = max(peak, cur)
        other = collections.Counter(r[0] for r in self.requests if not (r[0] == "GET" and r[2] is not None))
        return {"gets": len(gets), "range_bytes": sum(r[2] for r in gets), "hist": dict(hist), "down": self.down,
                "inflight": peak, "other": dict(other)}


def s3_client(endpoint):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=AK, aws_secret_access_key=SK,
                        region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


def daemon_of(pid):
    todo = [pid]
    while todo:
        p = todo.pop(0)
        try:
            if any(os.readlink(f"/proc/{p}/fd/{fd}") == "/dev/fuse" for fd in os.listdir(f"/proc/{p}/fd")):
                return p
        except OSError:
            pass
        for t in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []:
            try:
                todo += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
            except OSError:
                pass
    return None


def cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def hwm_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0


def raw_cell(ep, proxy, w, d, runtime):
    """The same number of ranged GETs of the same size at random aligned
    offsets, one at a time, with boto3: what one request per read costs."""
    import random

    bs = {"rand256k": 256 << 10, "rand4k": 4 << 10, "seq1": 1 << 20}[w]
    total = {"rand256k": 256 << 20, "rand4k": 16 << 20, "seq1": 1 << 30}[w]
    s3 = s3_client(ep)
    s3.head_object(Bucket=BUCKET, Key=KEY)
    if proxy:
        proxy.reset()
    rng = random.Random(1)
    t0, n = time.monotonic(), 0
    while n < total and time.monotonic() - t0 < runtime:
        off = rng.randrange(SIZE // bs) * bs
        n += len(s3.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={off}-{off + bs - 1}")["Body"].read())
    wall = time.monotonic() - t0
    cell = {"workload": w, "delay": d, "fs": "raw-boto3-qd1", "MiB/s": round(n / wall / 2**20, 1),
            "read_MiB": n / 2**20, "wall_s": round(wall, 1)}
    if proxy:
        cell.update(proxy.snapshot())
        cell["fetched/read"] = round(cell["down"] / n, 2)
    return cell


FIO = {
    "rand256k": "--rw=randread --bs=256k --size=1G --io_size=256M --norandommap --randrepeat=1",
    "rand4k": "--rw=randread --bs=4k --size=1G --io_size=16M --norandommap --randrepeat=1",
    "seq1": "--rw=read --bs=1M --size=1G",
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fs", action="append", required=True)
    ap.add_argument("--delay", action="append", default=None)
    ap.add_argument("--workload", action="append", default=None)
    ap.add_argument("--runtime", type=int, default=30)
    ap.add_argument("--fuse-log", action="store_true")
    ap.add_argument("--json", help="append one JSON line per cell here")
    a = ap.parse_args()
    delays = a.delay or ["0"]
    workloads = a.workload or ["rand256k", "rand4k"]
    weed = os.environ.get("WEED") or shutil.which("weed") or os.path.join(sys.prefix, "bin", "weed")
    work = tempfile.mkdtemp(prefix="bucketfs-rand-")
    mnt = os.path.join(work, "mnt")
    os.makedirs(os.path.join(work, "data"))
    os.makedirs(mnt)
    P = free_ports(8)
    with open(f"{work}/s3.json", "w") as f:
        json.dump({"identities": [{"name": "admin", "credentials": [{"accessKey": AK, "secretKey": SK}],
                                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    weed_log = open(f"{work}/weed.log", "w")
    weedp = subprocess.Popen(
        [weed, "server", f"-dir={work}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={P[0]}",
         f"-master.port.grpc={P[1]}", f"-volume.port={P[2]}", f"-volume.port.grpc={P[3]}", f"-filer.port={P[4]}",
         f"-filer.port.grpc={P[5]}", "-s3", f"-s3.port={P[6]}", f"-s3.port.grpc={P[7]}", "-s3.port.iceberg=0",
         "-s3.port.lance=0", f"-s3.config={work}/s3.json", "-volume.max=500", "-master.volumeSizeLimitMB=512"],
        stdout=weed_log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{P[6]}"
    procs = []

    def cleanup(*_):
        subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
        for p in procs + [weedp]:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        s3 = s3_client(endpoint)
        for _ in range(180):
            try:
                s3.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                time.sleep(0.5)
        if "ls" in workloads:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda i: s3.put_object(Bucket=BUCKET, Key=f"{LS_DIR}/e{i:05d}", Body=f"{i}\n"),
                              range(LS_ENTRIES)))
        src = f"{work}/big.bin"
        with open(src, "wb") as f:
            for _ in range(SIZE >> 24):
                f.write(os.urandom(1 << 24))
        from boto3.s3.transfer import TransferConfig

        s3.upload_file(src, BUCKET, KEY, Config=TransferConfig(multipart_chunksize=64 << 20, max_concurrency=4))
        os.unlink(src)
        time.sleep(3)
        s3.get_object(Bucket=BUCKET, Key=KEY)["Body"].read()
        with open(f"{work}/ak", "w") as f:
            f.write(AK + "\n")
        with open(f"{work}/sk", "w") as f:
            f.write(SK + "\n")
        with open(f"{work}/passwd", "w") as f:
            f.write(f"{AK}:{SK}\n")
        os.chmod(f"{work}/passwd", 0o600)
        proxies = {d: Proxy(P[6], int(d)) for d in delays if d != "direct"}
        print(f"# SeaweedFS {endpoint}; proxies {[(d, p.port) for d, p in proxies.items()]}", flush=True)
        for w in workloads:
            for d in delays:
                for fs in a.fs:
                    name, _, binary = fs.partition("=")
                    proxy = proxies.get(d)
                    ep = f"http://127.0.0.1:{proxy.port}" if proxy else endpoint
                    if name == "raw":
                        cell = raw_cell(ep, proxy, w, d, a.runtime)
                        print(json.dumps(cell), flush=True)
                        if a.json:
                            with open(a.json, "a") as f:
                                f.write(json.dumps(cell) + "\n")
                        continue
                    subprocess.run(["sync"])
                    open("/proc/sys/vm/drop_caches", "w").write("3\n")
                    log = open(f"{work}/{name}.log", "w")
                    env = dict(os.environ)
                    if name.startswith("bucketfs"):
                        env["RUST_LOG"] = "fuser=debug,bucketfs=info" if a.fuse_log else "bucketfs=info"
                        cmd = [binary, "mount", BUCKET, mnt, "--endpoint-url", ep, "--access-key-file", f"{work}/ak",
                               "--secret-key-file", f"{work}/sk"]
                        if "posix" in name:
                            cmd.append("--posix-metadata")
                    else:
                        cmd = ["s3fs", BUCKET, mnt, "-f", "-o",
                               f"url={ep},use_path_request_style,passwd_file={work}/passwd,ro"]
                    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                    procs.append(p)
                    for _ in range(300):
                        if os.path.ismount(mnt) and os.path.exists(f"{mnt}/{KEY}"):
                            break
                        time.sleep(0.1)
                    dpid = daemon_of(p.pid)
                    if proxy:
                        proxy.reset()
                    c0 = cpu_s(dpid)
                    t0 = time.monotonic()
                    if w == "ls":
                        out = subprocess.run(f"timeout 600 ls -l {mnt}/{LS_DIR} | tail -n +2 | wc -l", shell=True,
                                             capture_output=True, text=True)
                    else:
                        out = subprocess.run(
                            ["timeout", str(a.runtime * 4 + 60), "fio", "--name", w, f"--filename={mnt}/{KEY}",
                             "--ioengine=psync", "--readonly", "--direct=0", "--numjobs=1", f"--runtime={a.runtime}",
                             "--output-format=json"] + FIO[w].split(), capture_output=True, text=True)
                    wall = time.monotonic() - t0
                    c1, hwm = cpu_s(dpid), hwm_mib(dpid)
                    snap = proxy.snapshot() if proxy else {}
                    try:
                        if w == "ls":
                            entries = int(out.stdout.strip() or 0)
                            rate, io = 0, 0
                            snap.update(entries=entries, entries_per_s=round(entries / wall))
                        else:
                            r = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["read"]
                            rate, io = r["bw_bytes"] / 2**20, r["io_bytes"]
                    except (ValueError, KeyError):
                        rate, io = 0, 0
                        print(out.stderr, file=sys.stderr)
                    subprocess.run(["umount", mnt], stderr=subprocess.DEVNULL)
                    p.terminate()
                    try:
                        p.wait(20)
                    except subprocess.TimeoutExpired:
                        p.kill()
                    subprocess.run(["umount", "-l", mnt], stderr=subprocess.DEVNULL)
                    log.close()
                    shutil.copy(f"{work}/{name}.log", f"/tmp/rand-probe-{name}-{w}-{d}.log")
                    cell = {"workload": w, "delay": d, "fs": name, "MiB/s": round(rate, 1), "read_MiB": io / 2**20,
                            "wall_s": round(wall, 1), "cpu_s": round(c1 - c0, 2), "peak_rss_MiB": round(hwm, 1), **snap}
                    if snap and io:
                        cell["fetched/read"] = round(snap["down"] / io, 2)
                    if a.fuse_log and name.startswith("bucketfs"):
                        sizes = collections.Counter()
                        for line in open(f"{work}/{name}.log"):
                            m = re.search(r"READ fh .*?offset (?:Ok\()?(\d+)\)?, size (\d+)", line) or \
                                re.search(r"Read\(.*?offset: (\d+), size: (\d+)", line)
                            if m:
                                sizes[int(m.group(2))] += 1
                        cell["fuse_reads"] = dict(sizes.most_common(8))
                        if not sizes:
                            cell["fuse_log_tail"] = open(f"{work}/{name}.log").read()[-600:]
                    print(json.dumps(cell), flush=True)
                    if a.json:
                        with open(a.json, "a") as f:
                            f.write(json.dumps(cell) + "\n")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
