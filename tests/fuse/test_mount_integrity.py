#!/usr/bin/python3
"""The mount never loses an acknowledged write, never deadlocks, never hangs.

Each test is a case a careful user or a file-system tester hits: dirty-map
readers racing slow multi-conn writes, write errors injected by nbdkit's
error filter (who gets them, and when), a server killed with unflushed
writes, errors at shutdown, durability without FUA, SIGTERM with requests in
flight, a server stopped with SIGSTOP, 'nbdfs umount' racing the image lock,
servers with a 4 KiB minimum block size, reconnection to another export, and
images that are not raw."""
import ctypes
import errno
import json
import mmap
import os
import random
import re
import signal
import subprocess
import threading
import time

import nbdfs_test as t
from nbdfs_test import run

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_READ, PROT_WRITE, MAP_SHARED = 1, 2, 1

MiB = 1 << 20
KiB = 1 << 10


def join_all(threads, timeout, what):
    """Join THREADS within TIMEOUT seconds in all; fail (naming WHAT) if any hangs."""
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    hung = [th.name for th in threads if th.is_alive()]
    if hung:
        raise AssertionError("%s hung: %s" % (what, hung))


def odirect_buffer(size):
    return mmap.mmap(-1, size)


def nbdkit_log_commands(path):
    """[(command, fields dict)] of the requests an nbdkit log filter recorded."""
    out = []
    with open(path) as f:
        for line in f:
            # "connection=1 Write id=2 offset=0x0 count=0x1000 fua=0 ..."; the
            # results are "connection=1 ...Write id=2 return=0".
            m = re.search(r"connection=\d+ (\w+) id=\d+ ?(.*)$", line)
            if m:
                fields = dict(kv.split("=", 1) for kv in m.group(2).split() if "=" in kv)
                out.append((m.group(1), fields))
    return out


class DeadlockTest(t.TestCase):
    """Dirty-map readers on one open file while writes crawl to a throttled
    multi-conn server: everything finishes and the mount stays usable."""

    def start_qsd(self, image, bps):
        sock = self.path("qsd.sock")
        srv = t.Server([
            "qemu-storage-daemon",
            "--blockdev", "driver=file,filename=%s,node-name=file0" % image,
            "--blockdev", "driver=qcow2,file=file0,node-name=fmt0",
            "--object", "throttle-group,id=tg0,x-bps-write=%d" % bps,
            "--blockdev", "driver=throttle,node-name=thr0,file=fmt0,throttle-group=tg0",
            "--nbd-server", "addr.type=unix,addr.path=%s,max-connections=16" % sock,
            "--export", '{"type":"nbd","id":"exp0","node-name":"thr0","name":"",'
                        '"writable":true,"bitmaps":["b0"]}',
        ], sock, self.path("qsd.err"))
        self.addCleanup(srv.stop)
        return srv

    def test_map_readers_and_slow_writers(self):
        image = self.path("disk.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"])
        run(["qemu-img", "bitmap", "--add", image, "b0"])
        srv = self.start_qsd(image, 2 * MiB)
        m = self.mount(srv.uri(), "-C", "4")
        self.assertEqual(m.files(), ["dirty", "disk"])
        stop = threading.Event()
        errors = []
        map_fd = os.open(m.path("dirty", "b0.map"), os.O_RDONLY)
        written = []

        def reader():
            try:
                while not stop.is_set():
                    text = os.pread(map_fd, 1 << 20, 0).decode()
                    for line in text.splitlines():
                        off, length = map(int, line.split())
                        if length <= 0 or off % (64 * KiB):
                            errors.append("bad map line %r" % line)
            except OSError as e:
                errors.append("reader: %s" % e)

        def writer(i):
            fd = os.open(m.path("disk"), os.O_RDWR)
            try:
                for k in range(6):
                    off = (i * 8 + k) * MiB
                    os.pwrite(fd, bytes([i + 1]) * (256 * KiB), off)
                    written.append(off)
                os.fsync(fd)
            except OSError as e:
                errors.append("writer %d: %s" % (i, e))
            finally:
                os.close(fd)

        readers = [threading.Thread(target=reader, name="reader%d" % i) for i in range(4)]
        writers = [threading.Thread(target=writer, args=(i,), name="writer%d" % i)
                   for i in range(2)]
        for th in readers + writers:
            th.start()
        try:
            join_all(writers, 60 * t.SLOW, "writers")
        finally:
            stop.set()
        join_all(readers, 30 * t.SLOW, "readers")
        os.close(map_fd)
        self.assertEqual(errors, [])
        # The mount answers, and the map shows every write.
        self.assertEqual(m.files(), ["dirty", "disk"])
        with open(m.path("dirty", "b0.map")) as f:
            runs = [tuple(map(int, line.split())) for line in f]
        for off in written:
            self.assertTrue(any(s <= off and off + 256 * KiB <= s + n for s, n in runs),
                            "write at %d missing from %s" % (off, runs))
        self.assertEqual(m.unmount(), 0)


class WriteErrorTest(t.TestCase):
    """nbdkit's error filter fails writes while a trigger file exists."""

    def setUp(self):
        super().setUp()
        self.trigger = self.path("fail-writes")
        self.srv = self.start_nbdkit_cmd([
            "--filter=error", "memory", "64M", "error-pwrite=EIO", "error-pwrite-rate=100%",
            "error-pwrite-file=" + self.trigger])

    def fail_writes(self, on):
        if on:
            open(self.trigger, "w").close()
        elif os.path.exists(self.trigger):
            os.unlink(self.trigger)

    def test_error_reaches_its_writer_only(self):
        m = self.mount(self.srv.uri(), foreground=True)
        disk = m.path("disk")
        a = os.open(disk, os.O_RDWR)
        b = os.open(disk, os.O_RDWR)
        c = os.open(disk, os.O_RDWR)
        try:
            # B writes and syncs while the server works.
            os.pwrite(b, b"b" * 4096, MiB)
            os.fsync(b)
            self.fail_writes(True)
            # A's write is answered at once (write-behind): success for now.
            self.assertEqual(os.pwrite(a, b"a" * 65536, 0), 65536)
            # An unrelated descriptor's close does not take A's error...
            os.close(c)
            c = None
            # ...nor does a forked child that closes A's descriptor on exit.
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            # B did nothing wrong: its fsync succeeds.
            os.fsync(b)
            # A's fsync reports the failure, once.
            with self.assertRaises(OSError) as cm:
                os.fsync(a)
            self.assertEqual(cm.exception.errno, errno.EIO)
            self.fail_writes(False)
            os.fsync(a)
            # The data never reached the server: it reads back as zeros.
            fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
            buf = odirect_buffer(65536)
            os.preadv(fd, [buf], 0)
            os.close(fd)
            self.assertEqual(bytes(buf), bytes(65536))
        finally:
            for fd in (a, b, c):
                if fd is not None:
                    os.close(fd)
        self.assertEqual(m.unmount(), 1)
        self.assertIn("1 write(s) failed", m.messages)

    def test_close_reports_the_error(self):
        m = self.mount(self.srv.uri())
        fd = os.open(m.path("disk"), os.O_WRONLY)
        self.fail_writes(True)
        os.pwrite(fd, b"x" * 4096, 4096)
        with self.assertRaises(OSError) as cm:
            os.close(fd)
        self.assertEqual(cm.exception.errno, errno.EIO)
        self.fail_writes(False)
        self.assertEqual(m.unmount(), 1)

    def test_mmap_write_back_errors_are_not_lost_at_unmount(self):
        m = self.mount(self.srv.uri())
        fd = os.open(m.path("disk"), os.O_RDWR)
        addr = libc.mmap(None, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        self.assertNotEqual(addr, ctypes.c_void_p(-1).value)
        os.close(fd)                  # only the mapping holds the file now
        self.fail_writes(True)
        ctypes.memmove(addr, b"m" * 8192, 8192)
        libc.munmap(ctypes.c_void_p(addr), 8192)   # written back; nobody left to tell
        code = m.unmount()
        self.fail_writes(False)
        self.assertEqual(code, 1, m.messages)
        self.assertIn("1 write(s) failed, 1 of them never reported", m.messages)


class ReconnectDurabilityTest(t.TestCase):
    """Writes answered but not flushed die with an nbdkit memory server."""

    def test_fsync_fails_after_the_server_lost_unflushed_writes(self):
        argv = ["memory", "16M"]
        srv = self.start_nbdkit_cmd(argv)
        m = self.mount(srv.uri(), "-C", "1", foreground=True)
        fd = os.open(m.path("disk"), os.O_RDWR)
        os.pwrite(fd, b"w" * MiB, 0)
        # Reading the range (not from the page cache) waits for the write to
        # complete: answered by the server, not flushed.
        direct = os.open(m.path("disk"), os.O_RDONLY | os.O_DIRECT)
        buf = odirect_buffer(4096)
        os.preadv(direct, [buf], 0)
        self.assertEqual(bytes(buf[:4]), b"wwww")
        srv.stop(signal.SIGKILL)
        os.unlink(srv.sock)
        srv2 = self.start_nbdkit_cmd(argv, name="nbdkit")
        self.assertEqual(srv2.sock, srv.sock)
        t.wait_for_reconnect(direct, buf, timeout=20)
        self.assertEqual(bytes(buf), bytes(4096))   # the new server never had it
        with self.assertRaises(OSError) as cm:
            os.fsync(fd)
        self.assertEqual(cm.exception.errno, errno.EIO)
        os.fsync(fd)                  # reported once
        os.close(fd)
        os.close(direct)
        self.assertEqual(m.unmount(), 1)
        self.assertIn("may be lost", m.messages)


class DurabilityTest(t.TestCase):
    """nbdkit's log filter records what reaches the server."""

    def logged_server(self, fua):
        """FUA is not advertised (the fua filter's default mode), or passed through."""
        self.log = self.path("nbdkit.log")
        return self.start_nbdkit_cmd([
            "--filter=log", "--filter=fua", "memory", "16M", "logfile=" + self.log] +
            (["fuamode=pass"] if fua else []))

    def test_dsync_write_without_fua_is_followed_by_flush(self):
        srv = self.logged_server(False)
        m = self.mount(srv.uri(), "-C", "1")
        fd = os.open(m.path("disk"), os.O_WRONLY | os.O_DSYNC)
        os.pwrite(fd, b"d" * 4096, 0)
        cmds = nbdkit_log_commands(self.log)
        writes = [i for i, (c, _) in enumerate(cmds) if c == "Write"]
        self.assertTrue(writes, cmds)
        self.assertIn("Flush", [c for c, _ in cmds[writes[-1] + 1:]],
                      "no FLUSH after the O_DSYNC write: %s" % cmds)
        os.close(fd)
        self.assertEqual(m.unmount(), 0)

    def test_dsync_write_uses_fua_when_the_server_has_it(self):
        srv = self.logged_server(True)
        m = self.mount(srv.uri(), "-C", "1")
        fd = os.open(m.path("disk"), os.O_WRONLY | os.O_DSYNC)
        os.pwrite(fd, b"f" * 4096, 0)
        cmds = nbdkit_log_commands(self.log)
        self.assertEqual([f.get("fua") for c, f in cmds if c == "Write"], ["1"])
        self.assertNotIn("Flush", [c for c, _ in cmds])
        os.close(fd)
        self.assertEqual(m.unmount(), 0)

    def test_unmount_flushes_what_was_written(self):
        srv = self.logged_server(False)
        m = self.mount(srv.uri(), "-C", "2")
        with open(m.path("disk"), "r+b") as f:
            f.write(b"u" * 65536)     # no fsync
        self.assertEqual(m.unmount(), 0)
        cmds = [c for c, _ in nbdkit_log_commands(self.log)]
        last_write = max(i for i, c in enumerate(cmds) if c == "Write")
        self.assertIn("Flush", cmds[last_write + 1:], cmds)

    def test_unmount_sends_no_flush_when_nothing_was_written(self):
        srv = self.logged_server(False)
        m = self.mount(srv.uri())
        with open(m.path("disk"), "rb") as f:
            f.read(4096)
        self.assertEqual(m.unmount(), 0)
        self.assertNotIn("Flush", [c for c, _ in nbdkit_log_commands(self.log)])


class StopTest(t.TestCase):
    """SIGTERM, SIGINT and SIGHUP with requests in flight; a server that hangs."""

    def delayed_server(self, image, **delays):
        return self.start_nbdkit_cmd(
            ["--filter=delay", "file", image] +
            ["delay-%s=%s" % (k, v) for k, v in delays.items()])

    def check_signal_with_requests_in_flight(self, sig):
        image = t.make_image(self.path("disk.img"), 16 * MiB, [(0, b"r" * MiB)])
        srv = self.delayed_server(image, read="1", write="1")
        m = self.mount(srv.uri(), foreground=True)
        results = {}

        def reader(i):
            fd = os.open(m.path("disk"), os.O_RDONLY | os.O_DIRECT)
            buf = odirect_buffer(65536)
            try:
                results["r%d" % i] = os.preadv(fd, [buf], i * 65536) == 65536 and \
                    bytes(buf) == b"r" * 65536
            except OSError as e:
                results["r%d" % i] = e.errno
            finally:
                os.close(fd)

        def writer(i):
            fd = os.open(m.path("disk"), os.O_WRONLY | os.O_DIRECT)
            buf = odirect_buffer(65536)
            buf[:] = bytes([0x40 + i]) * 65536
            try:
                results["w%d" % i] = os.pwritev(fd, [buf], 8 * MiB + i * 65536) == 65536
            except OSError as e:
                results["w%d" % i] = e.errno
            finally:
                try:
                    os.close(fd)
                except OSError as e:
                    results["c%d" % i] = e.errno

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
        threads += [threading.Thread(target=writer, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        time.sleep(0.3)               # all in flight, in the server's delay
        start = time.monotonic()
        m.process.proc.send_signal(sig)
        try:
            m.process.proc.wait(15 * t.SLOW)
        except subprocess.TimeoutExpired:
            m.process.stop(signal.SIGKILL)
            raise AssertionError("nbdfs mount did not stop within 15 s of %s" % sig.name)
        elapsed = time.monotonic() - start
        join_all(threads, 10, "I/O threads")
        code = m.process.stop()
        self.assertEqual(code, 0, m.process.stderr())
        self.assertLess(elapsed, 10)
        self.assertFalse(t.is_mounted(m.mountpoint))
        # Whatever was in flight finished: answered, and the writes reached the image.
        for i in range(3):
            self.assertIs(results["r%d" % i], True, results)
            self.assertIs(results["w%d" % i], True, results)
        with open(image, "rb") as f:
            for i in range(3):
                f.seek(8 * MiB + i * 65536)
                self.assertEqual(f.read(65536), bytes([0x40 + i]) * 65536)

    def test_sigterm_with_requests_in_flight(self):
        self.check_signal_with_requests_in_flight(signal.SIGTERM)

    def test_sigint_with_requests_in_flight(self):
        self.check_signal_with_requests_in_flight(signal.SIGINT)

    def test_sighup_flushes_dirty_pages(self):
        image = t.make_image(self.path("disk.img"), 16 * MiB)
        srv = self.start_nbdkit(image)
        m = self.mount(srv.uri(), foreground=True)
        with open(m.path("disk"), "r+b") as f:
            mm = mmap.mmap(f.fileno(), 65536)
            mm[:] = b"h" * 65536
            mm.close()
        m.process.proc.send_signal(signal.SIGHUP)
        m.process.proc.wait(15 * t.SLOW)
        self.assertEqual(m.process.stop(), 0, m.process.stderr())
        with open(image, "rb") as f:
            self.assertEqual(f.read(65536), b"h" * 65536)

    def test_hung_server_fails_requests_after_the_timeout(self):
        image = t.make_image(self.path("disk.img"), 16 * MiB, [(0, b"s" * MiB)])
        srv = self.start_qemu_nbd(image)
        m = self.mount(srv.uri(), "--timeout", "2", foreground=True)
        fd = os.open(m.path("disk"), os.O_RDONLY | os.O_DIRECT)
        buf = odirect_buffer(65536)
        os.kill(srv.proc.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, srv.proc.pid, signal.SIGCONT)
        start = time.monotonic()
        with self.assertRaises(OSError) as cm:
            os.preadv(fd, [buf], MiB)
        elapsed = time.monotonic() - start
        self.assertEqual(cm.exception.errno, errno.EIO)
        self.assertGreaterEqual(elapsed, 1.5)
        self.assertLess(elapsed, 6 * t.SLOW)
        # While the server is stopped, requests fail at once; never a hang.
        start = time.monotonic()
        with self.assertRaises(OSError):
            os.preadv(fd, [buf], 0)
        self.assertLess(time.monotonic() - start, 4 * t.SLOW)
        # The server resumes: the mount reconnects.
        os.kill(srv.proc.pid, signal.SIGCONT)

        t.wait_for_reconnect(fd, buf, timeout=20)
        self.assertEqual(bytes(buf[:4]), b"ssss")
        # Stopped again: unmounting is quick all the same.
        os.close(fd)
        os.kill(srv.proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        self.assertEqual(m.unmount(), 0, m.messages)
        self.assertLess(time.monotonic() - start, 5 * t.SLOW)


class UmountTest(t.TestCase):

    def test_bitmap_command_right_after_umount(self):
        image = t.make_image(self.path("disk.img"), 32 * MiB)
        run([t.NBDFS, "bitmap", "add", image, "b0"])
        for i in range(5):
            m = self.mount(image)
            with open(m.path("disk.img"), "r+b") as f:
                f.seek(i * MiB)
                f.write(b"x" * 4096)
            self.assertEqual(m.unmount(), 0, m.messages)
            out = json.loads(run([t.NBDFS, "bitmap", "list", "--json", image]).stdout)
            self.assertEqual([(b["name"], b["dirty-bytes"], b["consistent"]) for b in out],
                             [("b0", (i + 1) * 65536, True)])

    def test_image_released_when_a_read_only_umount_returns(self):
        # A read-only mount reads the image itself: that descriptor goes too.
        image = t.make_image(self.path("ro.img"), 32 * MiB, [(0, b"r" * 4096)])
        run([t.NBDFS, "bitmap", "add", image, "b0"])
        for i in range(5):
            m = self.mount(image, "-r")
            with open(m.path("ro.img"), "rb") as f:
                self.assertEqual(f.read(4096), b"r" * 4096)
            self.assertEqual(m.unmount(), 0, m.messages)
            # Needs the image's exclusive lock, at once.
            run([t.NBDFS, "bitmap", "clear", image, "b0"])

    def test_umount_errors(self):
        p = run([t.NBDFS, "umount", self.tmp], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("not mounted", p.stderr)
        other = self.small_tmpfs("tmpfs", "1m")
        p = run([t.NBDFS, "umount", other], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("not an nbdfs mount", p.stderr)
        image = t.make_image(self.path("disk.img"), MiB)
        m = self.mount(image)
        with open(m.path("disk.img"), "rb"):
            p = run([t.NBDFS, "umount", m.mountpoint], check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("busy", p.stderr)
            self.assertTrue(t.is_mounted(m.mountpoint))
        self.assertEqual(m.unmount(), 0)


class MinimumBlockSizeTest(t.TestCase):
    """nbdkit's blocksize-policy filter: 4 KiB minimum, anything else an error."""

    def setUp(self):
        super().setUp()
        self.image = t.make_image(self.path("disk.img"), 4 * MiB,
                                  [(0, bytes(range(256)) * (4 * MiB // 256))])
        self.srv = self.start_nbdkit_cmd([
            "--filter=blocksize-policy", "file", self.image, "blocksize-minimum=4096",
            "blocksize-preferred=4096", "blocksize-maximum=1M",
            "blocksize-error-policy=error"])
        with open(self.image, "rb") as f:
            self.shadow = bytearray(f.read())

    def check(self, m):
        fd = os.open(m.path("disk"), os.O_RDONLY | os.O_DIRECT)
        buf = odirect_buffer(4 * MiB)
        try:
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
        self.assertEqual(bytes(buf), bytes(self.shadow))

    def test_unaligned_writes_zeroes_and_punches(self):
        m = self.mount(self.srv.uri())
        fd = os.open(m.path("disk"), os.O_RDWR | os.O_DIRECT)
        wfd = os.open(m.path("disk"), os.O_WRONLY)   # direct_io: FUSE passes any size
        os.pwrite(wfd, b"seventeen bytes!!", 5000)
        self.shadow[5000:5017] = b"seventeen bytes!!"
        os.pwrite(wfd, b"q" * 10000, 4 * MiB - 10001)
        self.shadow[4 * MiB - 10001:4 * MiB - 1] = b"q" * 10000
        t.fallocate(fd, t.FALLOC_FL_PUNCH_HOLE | t.FALLOC_FL_KEEP_SIZE, 100, 9000)
        self.shadow[100:9100] = bytes(9000)
        t.fallocate(fd, t.FALLOC_FL_ZERO_RANGE, 20000, 30)
        self.shadow[20000:20030] = bytes(30)
        os.fsync(wfd)
        os.close(wfd)
        os.close(fd)
        self.check(m)
        self.assertEqual(m.unmount(), 0, m.messages)
        with open(self.image, "rb") as f:
            self.assertEqual(f.read(), bytes(self.shadow))

    def test_overlapping_unaligned_writers_are_serialized(self):
        m = self.mount(self.srv.uri(), "-C", "4")
        errors = []
        lock = threading.Lock()

        def writer(i):
            rnd = random.Random(i)
            fd = os.open(m.path("disk"), os.O_WRONLY)
            try:
                for _ in range(60):
                    off = rnd.randrange(0, 64 * KiB)
                    data = bytes([i * 16 + rnd.randrange(16)]) * rnd.randrange(1, 3000)
                    with lock:       # the shadow must follow the order writes end in
                        os.pwrite(fd, data, off)
                        self.shadow[off:off + len(data)] = data
            except OSError as e:
                errors.append(str(e))
            finally:
                os.close(fd)

        # Writers alternate under the lock, but each write's read-modify-write
        # of shared 4 KiB blocks still races the previous writes in flight.
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        join_all(threads, 120 * t.SLOW, "writers")
        self.assertEqual(errors, [])
        self.check(m)
        self.assertEqual(m.unmount(), 0, m.messages)


class ReconnectIdentityTest(t.TestCase):

    def test_reconnect_refuses_another_export_of_the_same_size(self):
        image = t.make_image(self.path("disk.img"), 16 * MiB, [(0, b"i" * MiB)])
        srv = self.start_qemu_nbd(image)
        m = self.mount(srv.uri(), foreground=True)
        fd = os.open(m.path("disk"), os.O_RDONLY | os.O_DIRECT)
        buf = odirect_buffer(4096)
        srv.stop(signal.SIGKILL)
        os.unlink(srv.sock)
        # The same size, but read-only now: not the export the mount was made of.
        other = t.make_image(self.path("other.img"), 16 * MiB, [(0, b"o" * MiB)])
        srv2 = self.start_qemu_nbd(other, "-r")
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            with self.assertRaises(OSError) as cm:
                os.preadv(fd, [buf], 0)
            self.assertEqual(cm.exception.errno, errno.EIO)
            time.sleep(0.5)
        t.wait_for(lambda: "different export" in m.process.stderr(), 10,
                   "the refusal in the log")
        self.assertIn("read-only appeared", m.process.stderr())
        # The export comes back as it was: the mount carries on.
        srv2.stop()
        if os.path.exists(srv2.sock):
            os.unlink(srv2.sock)
        self.start_qemu_nbd(image)

        t.wait_for_reconnect(fd, buf, timeout=40)
        self.assertEqual(bytes(buf[:4]), b"iiii")
        os.close(fd)
        self.assertEqual(m.unmount(), 0, m.messages)


class ImageFormatTest(t.TestCase):
    """A local image of another format is never served as its raw bytes: the
    mount shows its virtual disk (through qemu-nbd), the server refuses it."""

    FORMATS = {
        "qcow2": [], "qcow": [], "vmdk": [], "vdi": [], "vhdx": [], "vpc": [], "qed": [],
    }

    def test_formats_show_the_virtual_disk_or_are_refused(self):
        os.mkdir(self.path("mnt"))
        for fmt, opts in self.FORMATS.items():
            image = self.path("disk." + fmt)
            run(["qemu-img", "create", "-q", "-f", fmt, *opts, image, "8M"])
            virtual = json.loads(run(["qemu-img", "info", "--output=json", image]).stdout)
            m = self.mount(image, "-r", mountpoint=self.path("mnt"))
            self.assertEqual(m.files(), ["dirty", "disk.raw"], fmt)
            self.assertEqual(os.path.getsize(m.path("disk.raw")), virtual["virtual-size"], fmt)
            self.assertEqual(m.unmount(), 0, fmt)
            p = run([t.NBDFS, "serve", "-U", self.path("s.sock"), image], check=False)
            self.assertEqual(p.returncode, 1, fmt)
            self.assertIn("this is a %s image" % fmt, p.stderr)

    def test_image_qemu_cannot_open_fails_at_once(self):
        # A LUKS image needs its key: qemu-nbd says so and exits; the mount
        # fails at once with its words, and leaves nothing mounted.
        image = self.path("disk.luks")
        run(["qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=sec0,data=secret",
             "-o", "key-secret=sec0", image, "8M"])
        os.mkdir(self.path("mnt"))
        start = time.monotonic()
        p = run([t.NBDFS, "mount", image, self.path("mnt")], check=False)
        self.assertLess(time.monotonic() - start, 10)
        self.assertEqual(p.returncode, 1)
        self.assertIn("key-secret", p.stderr)
        self.assertIn("qemu-nbd exited with status 1", p.stderr)
        self.assertFalse(t.is_mounted(self.path("mnt")))

    def test_format_raw_mounts_the_container_bytes(self):
        image = self.path("disk.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", image, "1G"])
        size = os.path.getsize(image)
        m = self.mount(image, "--format", "raw", "-r")
        self.assertEqual(os.path.getsize(m.path("disk.qcow2")), size)
        with open(m.path("disk.qcow2"), "rb") as f:
            self.assertEqual(f.read(4), b"QFI\xfb")
        self.assertEqual(m.unmount(), 0)
        os.mkdir(self.path("mnt2"))
        p = run([t.NBDFS, "mount", "--format", "bogus", image, self.path("mnt2")], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("Unknown driver 'bogus'", p.stderr)
        self.assertFalse(t.is_mounted(self.path("mnt2")))


if __name__ == "__main__":
    t.main()
