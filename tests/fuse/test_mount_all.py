#!/usr/bin/python3
"""nbdfs mount --all: every export a server lists, a directory each, laid
out like a single-export mount and connected only when first used."""
import errno
import os
import time

import nbd

import nbdfs_test as t
from nbdfs_test import NBDFS, run

MiB = 1 << 20


def threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


class AllExportsTest(t.TestCase):

    def test_nbdfs_serve_exports(self):
        a = t.make_image(self.path("a.img"), 8 * MiB, [(0, b"\xaa" * MiB)])
        b = t.make_image(self.path("b.img"), 4 * MiB, [(MiB, b"\xbb" * MiB)])
        run([NBDFS, "bitmap", "add", b, "daily"])
        srv = self.start_nbdfs([a, b])
        m = self.mount(srv.uri(), "--all", foreground=True)
        self.assertEqual(m.files(), ["a.img", "b.img"])
        self.assertEqual(sorted(os.listdir(m.path("a.img"))), ["a.img", "dirty"])
        self.assertEqual(sorted(os.listdir(m.path("b.img"))), ["b.img", "dirty"])
        self.assertEqual(os.listdir(m.path("b.img", "dirty")),
                         ["daily.map", "daily.json", "daily.img"])
        with open(m.path("a.img", "a.img"), "rb") as f:
            self.assertEqual(f.read(MiB), b"\xaa" * MiB)
        # Each export keeps its own data, holes and dirty map.
        with open(m.path("b.img", "b.img"), "r+b") as f:
            self.assertEqual(os.lseek(f.fileno(), 0, os.SEEK_DATA), MiB)
            f.seek(3 * MiB)
            f.write(b"\xcc" * 65536)
            f.flush()
            os.fsync(f.fileno())
        with open(m.path("b.img", "dirty", "daily.map")) as f:
            self.assertIn("3145728", f.read())
        with open(m.path("a.img", "a.img"), "rb") as f:
            f.seek(3 * MiB)
            self.assertEqual(f.read(65536), bytes(65536))
        # Inode numbers differ between exports.
        self.assertNotEqual(os.stat(m.path("a.img", "a.img")).st_ino,
                            os.stat(m.path("b.img", "b.img")).st_ino)
        self.assertEqual(m.unmount(), 0, m.messages)
        with open(b, "rb") as f:
            f.seek(3 * MiB)
            self.assertEqual(f.read(65536), b"\xcc" * 65536)

    def test_nbd_server_exports_open_lazily(self):
        one = t.make_image(self.path("one.img"), 4 * MiB, [(0, b"1" * 4096)])
        two = t.make_image(self.path("two.img"), 4 * MiB, [(0, b"2" * 4096)])
        # An export whose file is missing: only opening it fails.
        srv = self.start_nbd_server(one, export="one", more=[
            ("two", two), ("broken", self.path("missing.img"))])
        m = self.mount(srv.uri("one"), "--all", foreground=True)
        self.assertEqual(m.files(), ["broken", "one", "two"])
        for name, byte in (("one", b"1"), ("two", b"2")):
            with open(m.path(name, name), "rb") as f:
                self.assertEqual(f.read(4096), byte * 4096)
        self.assertEqual(os.stat(m.path("broken")).st_mode & 0o170000, 0o040000)
        with self.assertRaises(OSError) as cm:
            os.listdir(m.path("broken"))
        self.assertEqual(cm.exception.errno, errno.EIO)
        # The others still work; the failure is in the log, named.
        with open(m.path("two", "two"), "rb") as f:
            self.assertEqual(f.read(1), b"2")
        self.assertEqual(m.unmount(), 0, m.messages)
        self.assertIn("broken: ", m.messages)

    def test_hundreds_of_exports_mount_at_once(self):
        names = ["disk%03d" % i for i in range(300)]
        srv = self.start_nbdkit_cmd(["--filter=exportname", "memory", "1M",
                                     "exportname-list=explicit",
                                     *["exportname=" + n for n in names]])
        start = time.monotonic()
        m = self.mount(srv.uri(), "--all", foreground=True)
        mounted = time.monotonic() - start
        self.assertEqual(m.files(), names)
        self.assertLess(mounted, 5 * t.SLOW)
        # Listing the top and stat'ing the directories opened nothing.
        for n in names:
            os.stat(m.path(n))
        idle = threads(m.process.proc.pid)
        self.assertLess(idle, 12)
        with open(m.path("disk007", "disk007"), "r+b") as f:
            f.write(b"x" * 4096)
        self.assertGreater(threads(m.process.proc.pid), idle)
        self.assertEqual(m.unmount(), 0, m.messages)

    def test_export_names_made_safe(self):
        names = ["a/b", "a_b", "..", "", "x" * 300]
        srv = self.start_nbdkit_cmd(["--filter=exportname", "memory", "1M",
                                     "exportname-list=explicit",
                                     *["exportname=" + n for n in names]])
        m = self.mount(srv.uri(), "--all")
        self.assertEqual(m.files(), sorted(["a_b", "a_b~2", "_..", "default", "x" * 240]))
        # Each directory holds its export under the usual file name.
        self.assertEqual(sorted(os.listdir(m.path("default"))), ["dirty", "disk"])
        self.assertEqual(sorted(os.listdir(m.path("a_b"))), ["a_b", "dirty"])
        # A name that cannot be a file's: the export is the directory's "disk".
        self.assertEqual(sorted(os.listdir(m.path("_.."))), ["dirty", "disk"])
        self.assertEqual(sorted(os.listdir(m.path("x" * 240))), ["dirty", "disk"])
        self.assertEqual(os.path.getsize(m.path("a_b~2", "a_b")), MiB)
        self.assertEqual(m.unmount(), 0, m.messages)

    def test_server_started_for_the_mount(self):
        a = t.make_image(self.path("a.img"), MiB, [(0, b"a" * 512)])
        b = t.make_image(self.path("b.img"), MiB, [(0, b"b" * 512)])
        m = self.mount([NBDFS, "serve", a, b], "--all")
        self.assertEqual(m.files(), ["a.img", "b.img"])
        with open(m.path("b.img", "b.img"), "rb") as f:
            self.assertEqual(f.read(512), b"b" * 512)
        self.assertEqual(m.unmount(), 0, m.messages)

    def test_refusals(self):
        image = t.make_image(self.path("a.img"), MiB)
        os.mkdir(self.path("mnt"))
        p = run([NBDFS, "mount", "--all", image, self.path("mnt")], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("--all: needs an NBD URI", p.stderr)
        # nbd-server refuses to list without allowlist.
        srv = self.start_nbd_server(image, export="one", allowlist=False)
        p = run([NBDFS, "mount", "--all", srv.uri("one"), self.path("mnt")], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("cannot list the exports", p.stderr)
        self.assertFalse(t.is_mounted(self.path("mnt")))


if __name__ == "__main__":
    t.main()
