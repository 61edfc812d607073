"""Hostile clients for any NBD server on a unix socket, shared by the hardening
tests and the benchmark: slow readers, block-status floods, and a normal
client whose read latency is what they must not spoil."""
import os
import random
import sys
import threading
import time

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "protocol"))
import rawclient as rc  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20


def rss_mib(pid):
    """PID's resident set now, in MiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class RssSampler(threading.Thread):
    """The peak RSS of PID, sampled every 50 ms until stop()."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, rss_mib(pid), threading.Event()

    def run(self):
        while not self.done.wait(0.05):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except (OSError, AssertionError):
                return            # the process is gone: the caller will say why

    def stop(self):
        self.done.set()
        self.join(5)
        return self.peak


class SlowReaders:
    """N clients that each queue 64 READs of 1 MiB within the first DATA_SIZE
    bytes, then take their replies at about 1.25 MiB/s (64 KiB every 50 ms),
    so the server never sees them stuck, until stop()."""

    def __init__(self, sock, n, data_size):
        self.stop_event = threading.Event()
        self.clients = []
        self.threads = [threading.Thread(target=self.run, args=(sock, i, data_size),
                                         daemon=True) for i in range(n)]
        for th in self.threads:
            th.start()

    def run(self, sock, i, data_size):
        c = rc.RawClient(sock)
        self.clients.append(c)
        try:
            c.connect(rc.STRUCTURED)
            rnd = random.Random(i)
            for _ in range(64):
                c.request(rc.CMD_READ, rnd.randrange(0, data_size // MiB - 1) * MiB, MiB)
            while not self.stop_event.is_set():
                if not c.sock.recv(64 * KiB):
                    return
                time.sleep(0.05)
        except (OSError, rc.Closed, AssertionError):
            return

    def stop(self):
        self.stop_event.set()
        for c in list(self.clients):
            c.close()
        for th in self.threads:
            th.join(5)


def block_status_flood(sock, contexts, requests, length, mode=rc.EXTENDED):
    """A client that selects CONTEXTS (in MODE: extended headers, or structured
    replies for servers without them), sends REQUESTS block-status requests
    over [0, LENGTH) and never reads a reply."""
    c = rc.RawClient(sock)
    ids = c.connect(mode, contexts=contexts)
    if len(ids) != len(contexts):
        c.close()
        raise AssertionError("the server selected %d of %d contexts" % (len(ids), len(contexts)))
    for _ in range(requests):
        c.request(rc.CMD_BLOCK_STATUS, 0, length)
    return c


def read_latencies(uri, seconds, data_size):
    """4 KiB reads at random offsets of the first DATA_SIZE bytes for SECONDS:
    their latencies in seconds, sorted."""
    h = nbd.NBD()
    h.connect_uri(uri)
    out = []
    rnd = random.Random(99)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        off = rnd.randrange(0, data_size // 4096) * 4096
        start = time.monotonic()
        if len(h.pread(4096, off)) != 4096:
            raise AssertionError("short read")
        out.append(time.monotonic() - start)
    h.shutdown()
    return sorted(out)


def write_every_other_block(uri, size, block):
    """Write BLOCK bytes at every other BLOCK of [0, SIZE) through URI: as many
    data runs (and, with bitmaps of that granularity, dirty runs) as possible."""
    h = nbd.NBD()
    h.connect_uri(uri)
    buf = nbd.Buffer.from_bytearray(bytearray(b"\xaa" * block))
    for off in range(0, size, 2 * block):
        h.aio_pwrite(buf, off)
        while h.aio_in_flight() >= 64:
            h.poll(-1)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
    h.shutdown()
