#!/usr/bin/python3
"""nbdfs mount of qemu-nbd 10 serving a qcow2 with persistent dirty bitmaps:
the dirty/ files against nbdinfo, the delta image, writes through the mount,
and EIO (never a hang) once the server is killed."""
import errno
import filecmp
import mmap
import os
import signal
import time

import nbdfs_test as t

MiB = 1 << 20
KiB = 1 << 10
SIZE = 64 * MiB
CLUSTER = 64 * KiB


def qemu_io(image, *commands):
    argv = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    t.run(argv + [image])


def dirty_runs(entries):
    """(offset, length) of the dirty runs of an nbdinfo bitmap map."""
    return t.data_extents_of_map(entries, lambda status: status & 1)


def nonzero_bytes(data, block=4096):
    return sum(block for i in range(0, len(data), block) if any(data[i:i + block]))


class QemuBitmapTest(t.TestCase):

    def setUp(self):
        super().setUp()
        self.image = self.path("disk.qcow2")
        t.run(["qemu-img", "create", "-q", "-f", "qcow2", self.image, str(SIZE)])
        qemu_io(self.image, "write -P 0x11 0 4M", "write -P 0x12 20M 1M")
        t.run(["qemu-img", "bitmap", "--add", self.image, "b0"])
        # Changes after b0: whole clusters, one partial cluster, one zeroed range.
        qemu_io(self.image, "write -P 0x21 8M 128k", "write -P 0x22 1M 64k",
                "write -P 0x23 30M 4k", "write -z 20M 64k")
        t.run(["qemu-img", "bitmap", "--add", self.image, "b1"])
        qemu_io(self.image, "write -P 0x31 12M 64k")
        self.srv = self.start_qemu_nbd(self.image, "-B", "b0", "-B", "b1", fmt="qcow2")
        self.uri = self.srv.uri()

    def assert_dirty_files_match(self, m, bitmap):
        context = "qemu:dirty-bitmap:" + bitmap
        want_json = t.run(["nbdinfo", "--map=" + context, "--json", self.uri]).stdout
        with open(m.path("dirty", bitmap + ".json")) as f:
            self.assertEqual(f.read(), want_json)
        runs = dirty_runs(t.nbdinfo_map(self.uri, context))
        with open(m.path("dirty", bitmap + ".map")) as f:
            self.assertEqual(f.read(), "".join("%d %d\n" % r for r in runs))
        img = m.path("dirty", bitmap + ".img")
        st = os.stat(img)
        self.assertEqual(st.st_size, SIZE)
        self.assertEqual(st.st_blocks * 512, sum(n for _, n in runs))
        self.assertEqual(t.data_extents_by_lseek(img), runs)
        for kind in ("map", "json"):
            path = m.path("dirty", "%s.%s" % (bitmap, kind))
            with open(path, "rb") as f:
                self.assertEqual(os.stat(path).st_size, len(f.read()))
        return runs

    def test_dirty_files_match_nbdinfo(self):
        m = self.mount(self.uri)
        self.assertEqual(m.files(), ["dirty", "disk"])
        self.assertEqual(sorted(os.listdir(m.path("dirty"))),
                         ["b0.img", "b0.json", "b0.map", "b1.img", "b1.json", "b1.map"])
        runs = self.assert_dirty_files_match(m, "b0")
        self.assertEqual(runs, [(1 * MiB, CLUSTER), (8 * MiB, 2 * CLUSTER),
                                (12 * MiB, CLUSTER), (20 * MiB, CLUSTER), (30 * MiB, CLUSTER)])
        self.assertEqual(self.assert_dirty_files_match(m, "b1"), [(12 * MiB, CLUSTER)])
        for name in os.listdir(m.path("dirty")):
            with self.assertRaises(OSError) as cm:
                os.open(m.path("dirty", name), os.O_WRONLY)
            self.assertIn(cm.exception.errno, (errno.EACCES, errno.EROFS, errno.EPERM))

    def test_bytes_and_lseek_walk_match_nbdinfo(self):
        m = self.mount(self.uri)
        raw = self.path("disk.raw")
        t.run(["nbdcopy", self.uri, raw])
        self.assertTrue(filecmp.cmp(m.path("disk"), raw, shallow=False))
        entries = t.nbdinfo_map(self.uri)
        self.assertEqual(t.data_extents_by_lseek(m.path("disk")),
                         t.data_extents_of_map(entries, lambda status: not status & 2))
        self.assertEqual(os.stat(m.path("disk")).st_blocks * 512,
                         sum(e["length"] for e in entries if not e["type"] & 1))

    def test_delta_image(self):
        m = self.mount(self.uri)
        runs = dirty_runs(t.nbdinfo_map(self.uri, "qemu:dirty-bitmap:b0"))
        delta = self.path("delta.img")
        t.run(["cp", "--sparse=always", m.path("dirty", "b0.img"), delta])
        with open(m.path("disk"), "rb") as disk, open(delta, "rb") as d:
            export, got = disk.read(), d.read()
        self.assertEqual(len(got), SIZE)
        want = bytearray(SIZE)
        for off, n in runs:
            want[off:off + n] = export[off:off + n]
        self.assertEqual(got, bytes(want))
        # cp kept only the changed blocks that hold data (zeros become holes).
        data = sum(nonzero_bytes(export[off:off + n]) for off, n in runs)
        self.assertEqual(os.stat(delta).st_blocks * 512, data)
        self.assertLess(data, sum(n for _, n in runs))

    def test_writes_through_the_mount_update_maps(self):
        m = self.mount(self.uri)
        fmap = open(m.path("dirty", "b1.map"))
        self.addCleanup(fmap.close)
        self.assertEqual(fmap.read(), "%d %d\n" % (12 * MiB, CLUSTER))
        fd = os.open(m.path("disk"), os.O_RDWR)
        try:
            os.pwrite(fd, b"\x44" * 4096, 40 * MiB + 4096)
            t.fallocate(fd, t.FALLOC_FL_PUNCH_HOLE | t.FALLOC_FL_KEEP_SIZE, 0, 1 * MiB)
            t.fallocate(fd, t.FALLOC_FL_ZERO_RANGE | t.FALLOC_FL_KEEP_SIZE, 50 * MiB, CLUSTER)
            self.assertEqual(os.pread(fd, 1 * MiB, 0), bytes(MiB))
            self.assertEqual(os.pread(fd, CLUSTER, 50 * MiB), bytes(CLUSTER))
        finally:
            os.close(fd)
        # An open map shows the change when read from the start again.
        fmap.seek(0)
        self.assertEqual(fmap.read(), "0 %d\n%d %d\n%d %d\n%d %d\n" % (
            1 * MiB, 12 * MiB, CLUSTER, 40 * MiB, CLUSTER, 50 * MiB, CLUSTER))
        self.assert_dirty_files_match(m, "b0")
        self.assert_dirty_files_match(m, "b1")
        entries = t.nbdinfo_map(self.uri)
        self.assertEqual(t.data_extents_by_lseek(m.path("disk")),
                         t.data_extents_of_map(entries, lambda status: not status & 2))
        raw = self.path("after.raw")
        t.run(["nbdcopy", self.uri, raw])
        self.assertTrue(filecmp.cmp(m.path("disk"), raw, shallow=False))

    def test_info(self):
        info = t.run([t.NBDFS, "info", "--json", self.uri]).stdout
        import json
        got = json.loads(info)
        ref = json.loads(t.run(["nbdinfo", "--json", self.uri]).stdout)["exports"][0]
        self.assertEqual(got["headers"], "extended")
        self.assertEqual(got["protocol"], "newstyle-fixed")
        (exp,) = got["exports"]
        self.assertEqual(exp["size"], ref["export-size"])
        self.assertEqual(sorted(exp["meta-contexts"]), sorted(ref["contexts"]))
        self.assertEqual(exp["block-size"], {"minimum": ref["block_size_minimum"],
                                             "preferred": ref["block_size_preferred"],
                                             "maximum": ref["block_size_maximum"]})
        names = {"can_flush": "send-flush", "can_fua": "send-fua", "can_trim": "send-trim",
                 "can_zero": "send-write-zeroes", "can_df": "send-df",
                 "can_multi_conn": "can-multi-conn", "can_cache": "send-cache",
                 "can_fast_zero": "send-fast-zero", "is_read_only": "read-only",
                 "is_rotational": "rotational",
                 "can_block_status_payload": "block-status-payload"}
        for key, flag in names.items():
            self.assertEqual(flag in exp["flags"], ref[key], flag)
        self.assertIn("block-status-payload", exp["flags"])
        text = t.run([t.NBDFS, "info", self.uri]).stdout
        self.assertIn("headers: extended", text)
        self.assertIn("block-status-payload", text)
        self.assertIn("qemu:dirty-bitmap:b0", text)


class WriteOrderTest(t.TestCase):
    """Writes are answered before the server has them (write-behind): what is
    read back, and what reaches the image, must still be in write(2) order."""

    def test_overlapping_writes_and_reads(self):
        image = t.make_image(self.path("disk.raw"), 8 * MiB)
        srv = self.start_qemu_nbd(image)
        m = self.mount(srv.uri(), "-C", "4")
        shadow = bytearray(8 * MiB)
        rnd = __import__("random").Random(11)
        buf = mmap.mmap(-1, 256 * KiB)
        fd = os.open(m.path("disk"), os.O_RDWR | os.O_DIRECT)
        try:
            for i in range(1500):
                off = rnd.randrange(0, 8 * MiB // 4096 - 64) * 4096
                n = rnd.choice((4096, 16 * KiB, 64 * KiB, 256 * KiB))
                if rnd.random() < 0.7:
                    data = bytes([i % 251 + 1]) * n
                    buf[:n] = data
                    self.assertEqual(os.pwritev(fd, [memoryview(buf)[:n]], off), n)
                    shadow[off:off + n] = data
                else:
                    self.assertEqual(os.preadv(fd, [memoryview(buf)[:n]], off), n)
                    self.assertEqual(bytes(buf[:n]), bytes(shadow[off:off + n]), "read %d" % i)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(image, "rb") as f:
            self.assertEqual(f.read(), bytes(shadow))


class ServerDeathTest(t.TestCase):

    def test_eio_within_seconds_after_kill(self):
        image = t.make_image(self.path("disk.raw"), 16 * MiB, [(0, b"\x55" * MiB)])
        srv = self.start_qemu_nbd(image)
        m = self.mount(srv.uri(), foreground=True)
        fd = os.open(m.path("disk"), os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 65536)
        try:
            self.assertEqual(os.preadv(fd, [buf], 0), 65536)
            self.assertEqual(bytes(buf[:4]), b"\x55" * 4)
            os.kill(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(10)
            start = time.monotonic()
            with self.assertRaises(OSError) as cm:
                os.preadv(fd, [buf], 4 * MiB)
            self.assertEqual(cm.exception.errno, errno.EIO)
            # A write fails at once, or (sent on a connection whose death is
            # not yet seen) is answered early and its failure goes to fsync.
            try:
                self.assertEqual(os.pwritev(fd, [buf], 8 * MiB), 65536)
            except OSError as e:
                self.assertEqual(e.errno, errno.EIO)
            with self.assertRaises(OSError) as cm:
                os.fsync(fd)
            self.assertEqual(cm.exception.errno, errno.EIO)
            self.assertLess(time.monotonic() - start, 5)
        finally:
            os.close(fd)
        # Unmounting still works; the process ends and says a write was lost.
        self.assertEqual(m.unmount(), 1)
        self.assertIn("1 write(s) failed", m.process.stderr())
        self.assertEqual(os.listdir(m.mountpoint), [])

    def test_reconnects_when_the_server_returns(self):
        image = t.make_image(self.path("disk.raw"), 16 * MiB, [(0, b"\x66" * MiB)])
        srv = self.start_qemu_nbd(image)
        m = self.mount(srv.uri())
        buf = mmap.mmap(-1, 65536)
        fd = os.open(m.path("disk"), os.O_RDONLY | os.O_DIRECT)
        self.addCleanup(os.close, fd)
        self.assertEqual(os.preadv(fd, [buf], 0), 65536)
        srv.stop(signal.SIGKILL)
        with self.assertRaises(OSError) as cm:
            os.preadv(fd, [buf], 65536)
        self.assertEqual(cm.exception.errno, errno.EIO)
        # The same server comes back on the same socket: the mount follows.
        os.unlink(srv.sock)
        srv2 = self.start_qemu_nbd(image)
        self.assertEqual(srv2.sock, srv.sock)
        t.wait_for_reconnect(fd, buf, 65536, timeout=15)
        self.assertEqual(bytes(buf[:4]), b"\x66" * 4)
        self.assertTrue(filecmp.cmp(m.path("disk"), image, shallow=False))


if __name__ == "__main__":
    t.main()
