#!/usr/bin/python3
"""nbdfs mount against servers without extended headers: nbdkit 1.32's file
plugin (structured replies, base:allocation) and nbd-server (simple replies,
no metadata contexts at all)."""
import errno
import filecmp
import os
import random

import nbdfs_test as t

MiB = 1 << 20
SIZE = 32 * MiB
LAYOUT = [(0, 4096), (2 * MiB, 128 << 10), (9 * MiB + 8192, 8192), (SIZE - MiB, MiB)]


class ServerChecks:
    """What every server must get right through the mount."""

    FILE = None          # the export's file name in the mount

    def setUp(self):
        super().setUp()
        rnd = random.Random(3)
        self.image = t.make_image(self.path("disk.img"), SIZE,
                                  [(off, rnd.randbytes(n)) for off, n in LAYOUT])

    def expected_map(self):
        """(data extents, allocated bytes) the server reports for the image now."""
        raise NotImplementedError

    def test_bytes_holes_and_writes(self):
        m = self.mount(self.uri)
        f = m.path(self.FILE)
        self.assertEqual(m.files(), ["dirty", self.FILE])
        self.assertTrue(filecmp.cmp(f, self.image, shallow=False))
        data, allocated = self.expected_map()
        self.assertEqual(t.data_extents_by_lseek(f), data)
        self.assertEqual(os.stat(f).st_blocks * 512, allocated)

        new = random.Random(4).randbytes(MiB)
        fd = os.open(f, os.O_RDWR)
        try:
            os.pwrite(fd, new, 4 * MiB)
            t.fallocate(fd, t.FALLOC_FL_PUNCH_HOLE | t.FALLOC_FL_KEEP_SIZE, 2 * MiB, 64 << 10)
            t.fallocate(fd, t.FALLOC_FL_ZERO_RANGE | t.FALLOC_FL_KEEP_SIZE,
                        SIZE - MiB, 256 << 10)
            os.fsync(fd)
            self.assertEqual(os.pread(fd, 64 << 10, 2 * MiB), bytes(64 << 10))
            self.assertEqual(os.pread(fd, 256 << 10, SIZE - MiB), bytes(256 << 10))
        finally:
            os.close(fd)
        with open(self.image, "rb") as img:
            img.seek(4 * MiB)
            self.assertEqual(img.read(MiB), new)
            img.seek(2 * MiB)
            self.assertEqual(img.read(64 << 10), bytes(64 << 10))
            img.seek(SIZE - MiB)
            self.assertEqual(img.read(256 << 10), bytes(256 << 10))
        self.assertTrue(filecmp.cmp(f, self.image, shallow=False))
        data, allocated = self.expected_map()
        self.assertEqual(t.data_extents_by_lseek(f), data)
        self.assertEqual(os.stat(f).st_blocks * 512, allocated)

    def test_sparse_copy(self):
        m = self.mount(self.uri)
        out = self.path("copy.img")
        t.run(["cp", "--sparse=always", m.path(self.FILE), out])
        self.assertTrue(filecmp.cmp(out, self.image, shallow=False))
        self.assertEqual(os.stat(out).st_blocks * 512, sum(n for _, n in LAYOUT))


class NbdkitTest(ServerChecks, t.TestCase):

    FILE = "disk"

    def setUp(self):
        super().setUp()
        self.srv = self.start_nbdkit(self.image)
        self.uri = self.srv.uri()

    def expected_map(self):
        entries = t.nbdinfo_map(self.uri)
        return (t.data_extents_of_map(entries, lambda status: not status & 2),
                sum(e["length"] for e in entries if not e["type"] & 1))

    def test_read_only_server(self):
        srv = self.start_nbdkit(self.image, "-r", name="nbdkit-ro")
        m = self.mount(srv.uri())
        with self.assertRaises(OSError) as cm:
            os.open(m.path("disk"), os.O_RDWR)
        self.assertEqual(cm.exception.errno, errno.EROFS)

    def test_info(self):
        import json
        got = json.loads(t.run([t.NBDFS, "info", "--json", self.uri]).stdout)
        self.assertEqual(got["headers"], "structured")
        (exp,) = got["exports"]
        self.assertEqual(exp["size"], SIZE)
        self.assertEqual(exp["meta-contexts"], ["base:allocation"])
        self.assertNotIn("block-status-payload", exp["flags"])
        self.assertIn("send-trim", exp["flags"])


class NbdServerTest(ServerChecks, t.TestCase):

    FILE = "disk"        # the export's name

    def setUp(self):
        super().setUp()
        self.srv = self.start_nbd_server(self.image, export="disk")
        self.uri = self.srv.uri("disk")

    def expected_map(self):
        # No base:allocation: all of it is data, and allocated as far as we can tell.
        with self.assertRaises(AssertionError):
            t.nbdinfo_map(self.uri)
        return [(0, SIZE)], SIZE

    def test_info(self):
        text = t.run([t.NBDFS, "info", self.uri]).stdout
        self.assertIn("headers: simple", text)
        self.assertIn('export "disk"', text)
        self.assertIn("meta contexts: none", text)


if __name__ == "__main__":
    t.main()
