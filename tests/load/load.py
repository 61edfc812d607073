#!/usr/bin/python3
"""Load test of 'nbdfs serve': N connections doing verified random I/O.

Each connection owns one region of the image and keeps a shadow copy of it:
it writes random data at random offsets and lengths (some with FUA), reads
ranges back and compares them with the shadow, trims and zeroes now and
then, and flushes.  At the end the server is stopped cleanly and the image
file must equal the shadows byte for byte: no error, no lost write.  The
server's peak RSS is read from /proc.

Usage: load.py [--connections 64] [--seconds 60] [--nbdfs PATH]
Prints one line of figures; exits 1 on any error or mismatch.
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import nbd

KiB, MiB = 1024, 1024 * 1024


def rss_kib(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def worker(uri, index, region, seconds, shadow, stats, errors):
    rnd = random.Random(index)
    base = index * region
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        deadline = time.monotonic() + seconds
        ops = 0
        while time.monotonic() < deadline:
            off = rnd.randrange(0, region - 512) // 512 * 512
            length = min(rnd.choice((512, 4 * KiB, 64 * KiB, 256 * KiB)), region - off)
            what = rnd.random()
            if what < 0.45:
                data = rnd.randbytes(length)
                h.pwrite(data, base + off, nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0)
                shadow[off:off + length] = data
            elif what < 0.9:
                got = h.pread(length, base + off)
                if got != shadow[off:off + length]:
                    errors.append("connection %d: read at %d differs" % (index, base + off))
                    return
            elif what < 0.95:
                h.zero(length, base + off)
                shadow[off:off + length] = bytes(length)
            else:
                h.flush()
            ops += 1
        h.flush()
        h.shutdown()
        stats[index] = ops
    except nbd.Error as e:
        errors.append("connection %d: %s" % (index, e))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--region", type=int, default=4 * MiB)
    ap.add_argument("--nbdfs", default=os.environ.get("NBDFS", "nbdfs"))
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="nbdfs-load-")
    img = os.path.join(tmp, "load.img")
    sock = os.path.join(tmp, "s.sock")
    size = args.connections * args.region
    with open(img, "wb") as f:
        f.truncate(size)
    srv = subprocess.Popen([args.nbdfs, "serve", "-U", sock, img])
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        uri = "nbd+unix:///?socket=" + sock
        shadows = [bytearray(args.region) for _ in range(args.connections)]
        stats, errors = [0] * args.connections, []
        threads = [threading.Thread(target=worker,
                                    args=(uri, i, args.region, args.seconds, shadows[i],
                                          stats, errors))
                   for i in range(args.connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + 120)
        hung = sum(t.is_alive() for t in threads)
        peak = rss_kib(srv.pid, "VmHWM")
        srv.send_signal(signal.SIGTERM)
        code = srv.wait(30)
        mismatches = 0
        with open(img, "rb") as f:
            for i in range(args.connections):
                if f.read(args.region) != shadows[i]:
                    mismatches += 1
        print("load: %d connections, %.0f s, %d operations (%.0f/s), %d errors, %d hung, "
              "%d regions lost writes, server peak RSS %.1f MiB, server exit %d"
              % (args.connections, args.seconds, sum(stats), sum(stats) / args.seconds,
                 len(errors), hung, mismatches, peak / 1024, code))
        for e in errors[:10]:
            print("  " + e)
        return 0 if not errors and not hung and not mismatches and code == 0 else 1
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        subprocess.run(["rm", "-rf", tmp])


sys.exit(main())
