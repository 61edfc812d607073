#!/usr/bin/python3
"""'nbdfs serve' against hostile clients, a hostile directory and a hostile
system: slow readers beside a normal client (latency and memory), floods of
block-status requests, threads refused by RLIMIT_NPROC, symlinks planted
beside the image, corrupt sidecars, a kernel without RWF_DSYNC, time limits
at their edges, keepalive, idle clients and block devices.  Figures are
printed so a run shows what the bounds are."""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import nbd

import hostile
import nbdfs_test as t
from hostile import rc
from nbdfs_test import NBDFS, run

KiB, MiB = 1 << 10, 1 << 20
# The longest another client may wait on a server under attack.  Alone on this
# machine the worst read takes 10-20 ms, even under ASan (a server with no
# bounds: 6 s); the bound leaves room for a sanitized suite run in parallel.
STALL_BOUND = 2.0
SEEDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz", "seeds",
                     "sidecar")


def report(what, **figures):
    print("  %s: %s" % (what, ", ".join("%s %s" % kv for kv in figures.items())),
          file=sys.stderr, flush=True)


class SlowClientsTest(t.TestCase):

    def setUp(self):
        super().setUp()
        # Under AddressSanitizer, freed memory waits in a quarantine (256 MiB by
        # default): keep it small, so what is measured is what the server holds.
        old = os.environ.get("ASAN_OPTIONS")
        os.environ["ASAN_OPTIONS"] = (old + ":" if old else "") + "quarantine_size_mb=4"
        self.addCleanup(lambda: os.environ.__setitem__("ASAN_OPTIONS", old) if old is not None
                        else os.environ.pop("ASAN_OPTIONS", None))

    def data_image(self, size):
        path = self.path("disk.img")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        return path

    def test_slow_readers_stall_nobody_and_stay_bounded(self):
        image = self.data_image(64 * MiB)
        srv = self.start_nbdfs([image])
        base = hostile.rss_mib(srv.proc.pid)
        sampler = hostile.RssSampler(srv.proc.pid)
        sampler.start()
        slow = hostile.SlowReaders(srv.sock, 20, 64 * MiB)
        time.sleep(2)                 # every slow client has filled what it may
        try:
            latencies = hostile.read_latencies(srv.uri(), 5, 64 * MiB)
        finally:
            peak = sampler.stop()
            slow.stop()
        report("4 KiB reads beside 20 slow readers", reads=len(latencies),
               median_ms="%.2f" % (latencies[len(latencies) // 2] * 1000),
               p99_ms="%.2f" % (latencies[len(latencies) * 99 // 100] * 1000),
               worst_ms="%.1f" % (latencies[-1] * 1000),
               server_rss_mib="%.0f (base %.0f)" % (peak, base))
        self.assertLess(latencies[-1], STALL_BOUND, "a 4 KiB read waited behind slow readers")
        # --max-buffered is 256 MiB by default: the slow readers cannot make it hold more.
        self.assertLess(peak - base, 256 + 32)

    def test_block_status_floods_stay_bounded(self):
        size, gran = 512 * MiB, 4 * KiB
        image = t.make_image(self.path("disk.img"), size)
        bitmaps = ["b%d" % i for i in range(8)]
        for name in bitmaps:
            run([NBDFS, "bitmap", "add", "-g", str(gran), image, name])
        srv = self.start_nbdfs([image])
        # 131,072 runs in base:allocation and in each bitmap.
        hostile.write_every_other_block(srv.uri(), size, gran)
        base = hostile.rss_mib(srv.proc.pid)
        sampler = hostile.RssSampler(srv.proc.pid)
        sampler.start()
        contexts = ["base:allocation"] + ["qemu:dirty-bitmap:" + b for b in bitmaps]
        floods = [hostile.block_status_flood(srv.sock, contexts, 64, size) for _ in range(3)]
        time.sleep(4)
        try:
            # The server still answers others at once.
            latency = hostile.read_latencies(srv.uri(), 0.5, size)[-1]
        finally:
            peak = sampler.stop()
            for c in floods:
                c.close()
        report("3 clients x 64 block-status requests, 9 contexts x 131k extents, unread",
               server_growth_mib="%.0f" % (peak - base), other_worst_read_ms="%.1f" % (latency * 1000))
        self.assertLess(peak - base, 256 + 32)
        self.assertLess(latency, STALL_BOUND)


class ThreadLimitTest(t.TestCase):
    """A server run by an unprivileged user with RLIMIT_NPROC: a thread the
    system refuses costs the client that needed it, never the server."""

    def test_refused_thread_costs_one_client(self):
        os.chmod(self.tmp, 0o777)
        image = t.make_image(self.path("disk.img"), 64 * MiB,
                             [(0, os.urandom(64 * MiB))])
        os.chmod(image, 0o666)
        # A user id of its own: RLIMIT_NPROC counts every thread of the user, system-wide.
        uid = 40000 + os.getpid() % 20000

        def start(nproc, name):
            sock = self.path(name + ".sock")
            srv = t.Server(["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups",
                            "prlimit", "--nproc=%d:%d" % (nproc, nproc), "--", NBDFS, "serve",
                            "--threads", "2", "-U", sock, image], sock, self.path(name + ".err"))
            self.addCleanup(srv.stop)
            os.chmod(sock, 0o666)
            h = nbd.NBD()
            h.connect_uri(srv.uri())
            self.assertEqual(len(h.pread(4096, 0)), 4096)
            return srv, sock, h
        # How many threads this build runs with one client (sanitizers may add some)...
        # (the fewest seen over a second: a sanitizer's short-lived helpers do not count).
        probe, _, h = start(1000, "probe")
        threads = 1000
        for _ in range(20):
            threads = min(threads, len(os.listdir("/proc/%d/task" % probe.proc.pid)))
            time.sleep(0.05)
        h.shutdown()
        probe.stop()
        # ...then room for one more (the next client's reader), not for its writer.
        srv, sock, h = start(threads + 1, "limited")
        for attempt in range(10):
            greedy = rc.RawClient(sock)
            try:
                greedy.connect(rc.STRUCTURED)
                break
            except rc.Closed:
                # A sanitizer's short-lived helper took the room: the reader
                # was refused, which costs this client alone too.  Again.
                greedy.close()
                self.assertTrue(srv.alive(), srv.stderr())
                self.assertIn("cannot start a thread:", srv.stderr())
                time.sleep(0.5)
        for i in range(32):
            greedy.request(rc.CMD_READ, i * MiB, MiB)    # unread: needs the writer thread
        self.assertTrue(greedy.is_closed(10), "the client whose writer was refused stays")
        greedy.close()
        self.assertTrue(srv.alive(), srv.stderr())
        self.assertEqual(len(h.pread(4096, MiB)), 4096)
        h.shutdown()
        self.assertIn("cannot start a thread to send replies", srv.stderr())


class SidecarTest(t.TestCase):

    def test_planted_symlinks_are_not_followed(self):
        victim = self.path("victim")
        with open(victim, "w") as f:
            f.write("precious")
        image = t.make_image(self.path("disk.img"), 8 * MiB)
        os.symlink(victim, image + ".bitmaps.tmp")
        run([NBDFS, "bitmap", "add", image, "b0"])
        srv = self.start_nbdfs([image])
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        h.pwrite(b"x" * 4096, 0)
        h.flush()
        h.shutdown()
        self.assertEqual(srv.stop(), 0)
        with open(victim) as f:
            self.assertEqual(f.read(), "precious")
        self.assertTrue(os.path.islink(image + ".bitmaps.tmp"))
        st = os.lstat(image + ".bitmaps")
        self.assertTrue(os.path.isfile(image + ".bitmaps") and not os.path.islink(
            image + ".bitmaps"), st)
        # The sidecar itself a symlink: refused, named, nothing written through it.
        os.unlink(image + ".bitmaps")
        os.symlink(victim, image + ".bitmaps")
        for argv in ([NBDFS, "bitmap", "list", image],
                     [NBDFS, "bitmap", "add", image, "b1"],
                     [NBDFS, "serve", "-U", self.path("s.sock"), image]):
            p = run(argv, check=False)
            self.assertEqual(p.returncode, 1, argv)
            self.assertIn(image + ".bitmaps: is a symbolic link", p.stderr)
        with open(victim) as f:
            self.assertEqual(f.read(), "precious")

    def crashed_sidecar(self):
        """An image whose server was killed: the sidecar is left in use."""
        image = t.make_image(self.path("disk.img"), 8 * MiB)
        run([NBDFS, "bitmap", "add", image, "b0"])
        srv = self.start_nbdfs([image])
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        h.pwrite(b"y" * 4096, MiB)
        h.flush()
        srv.stop(signal.SIGKILL)
        with open(image + ".bitmaps", "rb") as f:
            data = bytearray(f.read())
        self.assertEqual(struct.unpack_from("<II", data, 8), (2, 1))   # version 2, in use
        return image, data

    def test_corrupt_sidecar_left_in_use_is_refused(self):
        image, data = self.crashed_sidecar()
        data[160 + 2] ^= 1            # b0's "enabled" flag in the directory
        with open(image + ".bitmaps", "wb") as f:
            f.write(data)
        for argv in ([NBDFS, "bitmap", "list", image],
                     [NBDFS, "serve", "-U", self.path("s2.sock"), image]):
            p = run(argv, check=False)
            self.assertEqual(p.returncode, 1, argv)
            self.assertIn(image + ".bitmaps: directory checksum mismatch", p.stderr)
            self.assertIn("move the file away", p.stderr)

    def test_sidecar_left_in_use_with_stale_data_is_all_dirty(self):
        image, data = self.crashed_sidecar()
        data[-1] ^= 0xff              # a bitmap word: stale by design while in use
        with open(image + ".bitmaps", "wb") as f:
            f.write(data)
        out = json.loads(run([NBDFS, "bitmap", "list", "--json", image]).stdout)
        self.assertEqual([(b["name"], b["consistent"], b["dirty-bytes"]) for b in out],
                         [("b0", False, 8 * MiB)])

    def test_version_1_sidecar_is_read(self):
        image = t.make_image(self.path("disk.img"), 8 * MiB)
        shutil.copy(os.path.join(SEEDS, "v1-clean"), image + ".bitmaps")
        out = json.loads(run([NBDFS, "bitmap", "list", "--json", image]).stdout)
        # Another image's mtime: inconsistent, which is what it must say.
        self.assertEqual([(b["name"], b["consistent"]) for b in out], [("b0", False)])
        run([NBDFS, "bitmap", "clear", image, "b0"])
        with open(image + ".bitmaps", "rb") as f:
            self.assertEqual(struct.unpack_from("<I", f.read(12), 8), (2,))


class FuaFallbackTest(t.TestCase):

    def test_first_fua_write_without_rwf_dsync_is_flushed(self):
        image = t.make_image(self.path("disk.img"), 8 * MiB)
        log = self.path("shim.log")
        sock = self.path("shim.sock")
        env = dict(os.environ, LD_PRELOAD=os.environ["NBDFS_FUA_SHIM"], NBDFS_SHIM_LOG=log)
        proc = subprocess.Popen([NBDFS, "serve", "-U", sock, image], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(proc.wait, 10)
        self.addCleanup(proc.terminate)
        t.wait_for(lambda: t.unix_socket_ready(sock), 10, "the server")
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///?socket=" + sock)

        def syncs():
            if not os.path.exists(log):
                return 0
            with open(log) as f:
                return f.read().count("fdatasync")
        before = syncs()
        h.pwrite(b"f" * 4096, 0, nbd.CMD_FLAG_FUA)
        self.assertGreater(syncs(), before, "the first FUA write was acknowledged unsynced")
        before = syncs()
        h.pwrite(b"g" * 4096, 4096, nbd.CMD_FLAG_FUA)
        self.assertGreater(syncs(), before)
        h.shutdown()


class LimitsTest(t.TestCase):

    def setUp(self):
        super().setUp()
        self.image = t.make_image(self.path("disk.img"), 8 * MiB)

    def negotiate_after(self, srv, seconds):
        """A client that waits SECONDS after the greeting: True if it gets in."""
        c = rc.RawClient(srv.sock)
        try:
            c.read_greeting()
            time.sleep(seconds)
            c.send_client_flags(rc.FLAG_FIXED_NEWSTYLE | rc.FLAG_NO_ZEROES)
            c.started = True
            c.connect(rc.STRUCTURED)
            return len(c.read(0, 4096)) == 4096
        except (rc.Closed, OSError, AssertionError):
            return False
        finally:
            c.close()

    def test_handshake_limit_of_4295_seconds_is_honoured(self):
        # 4295 s is 2^32 us and a little: it must not wrap to a few milliseconds.
        srv = self.start_nbdfs([self.image], "--handshake-limit", "4295")
        self.assertTrue(self.negotiate_after(srv, 1.0))

    def test_handshake_limit_edges(self):
        for value, ok in (("86400", True), ("86401", False), ("-1", False)):
            sock = self.path("edge.sock")
            p = subprocess.Popen([NBDFS, "serve", "--handshake-limit", value, "-U", sock,
                                  self.image], stderr=subprocess.PIPE, text=True)
            self.addCleanup(p.kill)
            if ok:
                t.wait_for(lambda: t.unix_socket_ready(sock), 10, "the server")
                p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=10)
            if ok:
                self.assertEqual(p.returncode, 0, err)
            else:
                self.assertEqual(p.returncode, 1)
                self.assertIn("--handshake-limit: must be 0 (none) to 86400 seconds", err)
        srv = self.start_nbdfs([self.image], "--handshake-limit", "1")
        start = time.monotonic()
        c = rc.RawClient(srv.sock)
        c.read_greeting()
        self.assertTrue(c.is_closed(5))
        self.assertGreater(time.monotonic() - start, 0.8)
        c.close()

    def test_idle_limit(self):
        srv = self.start_nbdfs([self.image], "--idle-limit", "1")
        idle = rc.RawClient(srv.sock)
        idle.connect(rc.STRUCTURED)
        busy = rc.RawClient(srv.sock)
        busy.connect(rc.STRUCTURED)
        start = time.monotonic()
        while time.monotonic() - start < 3:
            self.assertEqual(len(busy.read(0, 512)), 512)
            time.sleep(0.4)
        self.assertTrue(idle.is_closed(1))
        self.assertEqual(len(busy.read(0, 512)), 512)
        busy.close()
        idle.close()
        self.assertIn("idle for 1 s, dropping the client", srv.stderr())

    def test_tcp_keepalive(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = t.Process([NBDFS, "serve", "-p", str(port), self.image], self.path("tcp.err"))
        self.addCleanup(srv.stop)
        h = nbd.NBD()
        t.wait_for(lambda: self.try_connect(h, port), 10, "the TCP server")

        def keepalive_armed():
            # Once the connection is quiet, its timer is the keepalive one.
            out = run(["ss", "-tnoH", "state", "established", "( sport = :%d )" % port]).stdout
            return "timer:(keepalive," in out
        t.wait_for(keepalive_armed, 5, "a keepalive timer on the server's socket")
        h.shutdown()

    @staticmethod
    def try_connect(h, port):
        try:
            h.connect_uri("nbd://127.0.0.1:%d/" % port)
            return True
        except nbd.Error:
            return False


class BlockDeviceTest(t.TestCase):

    def test_block_device_is_served_and_refuses_bitmaps(self):
        image = t.make_image(self.path("disk.img"), 32 * MiB, [(MiB, b"blockdev" * 512)])
        dev = run(["losetup", "--find", "--show", image]).stdout.strip()
        self.addCleanup(run, ["losetup", "-d", dev])
        p = run([NBDFS, "bitmap", "add", dev, "b0"], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("is a block device: bitmaps need a regular file", p.stderr)
        srv = self.start_nbdfs([dev])
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        self.assertEqual(h.get_size(), 32 * MiB)
        self.assertEqual(h.pread(4096, MiB), (b"blockdev" * 512)[:4096])
        h.shutdown()


class LogTest(t.TestCase):

    def test_log_lines_carry_a_timestamp(self):
        image = t.make_image(self.path("disk.img"), MiB)
        srv = self.start_nbdfs([image], "-v")
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        h.pread(512, 0)
        h.shutdown()
        srv.stop()
        lines = [line for line in srv.stderr().splitlines() if line]
        self.assertTrue(lines)
        for line in lines:
            stamp, rest = line.split(" ", 1)
            self.assertRegex(stamp, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
            self.assertTrue(rest.startswith("nbdfs serve: "), line)


if __name__ == "__main__":
    t.main()
