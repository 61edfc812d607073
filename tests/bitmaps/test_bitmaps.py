"""Persistent dirty bitmaps of 'nbdfs serve': maps, payload filtering, crash
semantics, parity with qemu-nbd's qcow2 bitmaps, and the bitmap command."""
import json
import os
import signal
import struct
import subprocess

import nbd

import nbdfs_test
from nbdfs_test import NBDFS, run

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SIZE = 1 * GiB

# (offset, length) writes, trims and zeroes used by several tests.
WRITES = [(100 * KiB, 10 * KiB), (5 * MiB, 1), (64 * MiB - 1, 2), (SIZE - 512, 512)]
TRIMS = [(200 * MiB, 3 * MiB)]
ZEROES = [(300 * MiB + 4 * KiB, 64 * KiB)]


def rounded_runs(ranges, granularity, size):
    """The dirty runs a bitmap of GRANULARITY must show for RANGES (merged)."""
    bits = set()
    for off, length in ranges:
        bits.update(range(off // granularity, (off + length - 1) // granularity + 1))
    runs = []
    for b in sorted(bits):
        start, end = b * granularity, min((b + 1) * granularity, size)
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    return [(s, e - s) for s, e in runs]


def dirty_runs(uri, bitmap):
    """Dirty (offset, length) runs of qemu:dirty-bitmap:BITMAP, from nbdinfo --map --json."""
    out = run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:" + bitmap, uri]).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def connect(uri, contexts=()):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


def apply_changes(uri):
    h = connect(uri)
    for off, length in WRITES:
        h.pwrite(b"\xa5" * length, off)
    for off, length in TRIMS:
        h.trim(length, off)
    for off, length in ZEROES:
        h.zero(length, off)
    h.flush()
    h.shutdown()


ALL_CHANGES = WRITES + TRIMS + ZEROES


def read_sidecar(path):
    """Parse IMAGE.bitmaps: {name: (flags, granularity, set of dirty bits)} and header flags."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"NBDFSBMP"
    version, hflags = struct.unpack_from("<II", data, 8)
    assert version == 2, version
    count, = struct.unpack_from("<I", data, 36)
    pos, out = 160, {}                 # the version 2 header
    for _ in range(count):
        nlen, flags, gran, nbits, off, dlen = struct.unpack_from("<HBxIQQQ", data, pos)
        name = data[pos + 32:pos + 32 + nlen].decode()
        words = struct.unpack_from("<%dQ" % (dlen // 8), data, off)
        bits = {i * 64 + b for i, w in enumerate(words) for b in range(64) if w >> b & 1}
        out[name] = (flags, gran, bits)
        pos += 32 + nlen
    return hflags, out


class BitmapTests(nbdfs_test.TestCase):

    def setUp(self):
        super().setUp()
        self.img = nbdfs_test.make_image(self.path("disk.img"), SIZE)
        run([NBDFS, "bitmap", "add", self.img, "b0"])
        run([NBDFS, "bitmap", "add", "--granularity", "1M", self.img, "b1"])
        run([NBDFS, "bitmap", "add", "-g", "512", self.img, "fine"])

    def test_maps_are_the_changes_rounded_to_granularity(self):
        srv = self.start_nbdfs([self.img])
        self.assertEqual(dirty_runs(srv.uri(), "b0"), [])
        apply_changes(srv.uri())
        for name, gran in (("b0", 64 * KiB), ("b1", MiB), ("fine", 512)):
            with self.subTest(bitmap=name):
                self.assertEqual(dirty_runs(srv.uri(), name),
                                 rounded_runs(ALL_CHANGES, gran, SIZE))

    def test_list_meta_context(self):
        srv = self.start_nbdfs([self.img])
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(srv.uri())
        for query, want in (
            ("qemu:dirty-bitmap:", ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1",
                                    "qemu:dirty-bitmap:fine"]),
            ("qemu:", ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1",
                       "qemu:dirty-bitmap:fine"]),
            ("base:", ["base:allocation"]),
            ("qemu:dirty-bitmap:b1", ["qemu:dirty-bitmap:b1"]),
            ("qemu:dirty-bitmap:nope", []),
        ):
            got = []
            h.opt_list_meta_context_queries([query], lambda name: got.append(name) or 0)
            self.assertEqual(got, want, query)
        h.opt_abort()

    def test_filter_asks_for_b1_alone_and_gets_b1_alone(self):
        srv = self.start_nbdfs([self.img])
        apply_changes(srv.uri())
        h = connect(srv.uri(), ["base:allocation", "qemu:dirty-bitmap:b0",
                                "qemu:dirty-bitmap:b1"])
        self.assertTrue(h.can_block_status_payload())
        seen = {}

        def cb(metacontext, offset, entries, err):
            seen.setdefault(metacontext, []).append((offset, entries))
            return 0

        h.block_status_filter(SIZE, 0, ["qemu:dirty-bitmap:b1"], cb)
        self.assertEqual(list(seen), ["qemu:dirty-bitmap:b1"])
        entries = seen["qemu:dirty-bitmap:b1"][0][1]
        runs, pos = [], 0
        for length, flags in entries:       # 64-bit callback: (length, flags) pairs
            if flags & 1:
                runs.append((pos, length))
            pos += length
        self.assertEqual(pos, SIZE)
        self.assertEqual(runs, rounded_runs(ALL_CHANGES, MiB, SIZE))
        h.shutdown()

    def test_marks_survive_clean_restart_and_clear(self):
        srv = self.start_nbdfs([self.img])
        apply_changes(srv.uri())
        self.assertEqual(srv.stop(), 0)
        hflags, bitmaps = read_sidecar(self.img + ".bitmaps")
        self.assertEqual(hflags & 1, 0, "in-use flag left after a clean shutdown")
        listing = json.loads(run([NBDFS, "bitmap", "list", "--json", self.img]).stdout)
        want = sum(length for _, length in rounded_runs(ALL_CHANGES, 64 * KiB, SIZE))
        self.assertEqual([(b["name"], b["dirty-bytes"], b["consistent"], b["enabled"])
                          for b in listing][0], ("b0", want, True, True))

        srv = self.start_nbdfs([self.img], name="again")
        self.assertEqual(dirty_runs(srv.uri(), "b0"), rounded_runs(ALL_CHANGES, 64 * KiB, SIZE))
        srv.stop()
        run([NBDFS, "bitmap", "clear", self.img, "b0"])
        srv = self.start_nbdfs([self.img], name="cleared")
        self.assertEqual(dirty_runs(srv.uri(), "b0"), [])
        self.assertEqual(dirty_runs(srv.uri(), "b1"), rounded_runs(ALL_CHANGES, MiB, SIZE))

    def test_disable_stops_tracking_enable_resumes(self):
        run([NBDFS, "bitmap", "disable", self.img, "b0"])
        srv = self.start_nbdfs([self.img])
        apply_changes(srv.uri())
        self.assertEqual(dirty_runs(srv.uri(), "b0"), [])
        srv.stop()
        listing = json.loads(run([NBDFS, "bitmap", "list", "--json", self.img]).stdout)
        self.assertEqual(listing[0]["enabled"], False)
        run([NBDFS, "bitmap", "enable", self.img, "b0"])
        srv = self.start_nbdfs([self.img], name="enabled")
        h = connect(srv.uri())
        h.pwrite(b"x", 7 * MiB)
        h.shutdown()
        self.assertEqual(dirty_runs(srv.uri(), "b0"), [(7 * MiB, 64 * KiB)])

    def test_marks_are_on_disk_by_the_flush(self):
        srv = self.start_nbdfs([self.img])
        h = connect(srv.uri())
        h.pwrite(b"y" * 4096, 10 * MiB)
        h.flush()
        # The server is still running: the sidecar must already hold the mark.
        hflags, bitmaps = read_sidecar(self.img + ".bitmaps")
        self.assertEqual(hflags & 1, 1, "in-use flag must be set while served")
        self.assertIn(10 * MiB // (64 * KiB), bitmaps["b0"][2])
        h.pwrite(b"z" * 512, 20 * MiB, nbd.CMD_FLAG_FUA)
        hflags, bitmaps = read_sidecar(self.img + ".bitmaps")
        self.assertIn(20 * MiB // 512, bitmaps["fine"][2])
        h.shutdown()

    def test_kill_9_makes_every_bitmap_all_dirty(self):
        for flushed in (True, False):
            with self.subTest(flushed=flushed):
                run([NBDFS, "bitmap", "clear", self.img, "b0"])
                srv = self.start_nbdfs([self.img], name="victim%d" % flushed)
                h = connect(srv.uri())
                h.pwrite(b"q" * 8192, 33 * MiB)
                if flushed:
                    h.flush()
                srv.stop(signal.SIGKILL)
                p = run([NBDFS, "bitmap", "list", self.img])
                self.assertIn("did not shut down cleanly", p.stderr)
                self.assertRegex(p.stdout, r"b0 +65536 +yes +%d no" % SIZE)
                srv = self.start_nbdfs([self.img], name="restart%d" % flushed)
                self.assertEqual(dirty_runs(srv.uri(), "b0"), [(0, SIZE)])
                self.assertIn("inconsistent", srv.stderr())
                srv.stop()

    def test_change_behind_the_servers_back_is_dirty(self):
        run(["dd", "if=/dev/urandom", "of=" + self.img, "bs=4096", "seek=100", "count=1",
             "conv=notrunc"])
        srv = self.start_nbdfs([self.img])
        runs = dirty_runs(srv.uri(), "b0")
        self.assertEqual(runs, [(0, SIZE)])
        srv.stop()
        # A size change too.
        run([NBDFS, "bitmap", "clear", self.img, "b0"])
        os.truncate(self.img, SIZE + MiB)
        srv = self.start_nbdfs([self.img], name="grown")
        self.assertEqual(dirty_runs(srv.uri(), "b0"), [(0, SIZE + MiB)])

    def test_read_only_serving_leaves_the_sidecar_alone(self):
        srv = self.start_nbdfs([self.img])
        apply_changes(srv.uri())
        srv.stop()
        with open(self.img + ".bitmaps", "rb") as f:
            before = f.read()
        ro1 = self.start_nbdfs([self.img], "-r", name="ro1")
        ro2 = self.start_nbdfs([self.img], "-r", name="ro2")
        self.assertEqual(dirty_runs(ro1.uri(), "b1"), rounded_runs(ALL_CHANGES, MiB, SIZE))
        self.assertEqual(dirty_runs(ro2.uri(), "b1"), rounded_runs(ALL_CHANGES, MiB, SIZE))
        ro1.stop()
        ro2.stop()
        with open(self.img + ".bitmaps", "rb") as f:
            self.assertEqual(f.read(), before)


class QemuParityTests(nbdfs_test.TestCase):
    """The same writes give the same maps as qemu-nbd 10 serving a qcow2's bitmaps."""

    def test_same_maps_as_qemu_nbd(self):
        raw = nbdfs_test.make_image(self.path("disk.img"), SIZE)
        qcow = self.path("disk.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, str(SIZE)])
        for name, gran in (("b0", "65536"), ("b1", "1048576")):
            run([NBDFS, "bitmap", "add", "-g", gran, raw, name])
            run(["qemu-img", "bitmap", "--add", "-g", gran, qcow, name])
        ours = self.start_nbdfs([raw])
        # --discard=unmap: qemu-nbd otherwise ignores TRIM and marks nothing.
        theirs = self.start_qemu_nbd(qcow, "-B", "b0", "-B", "b1", "--discard=unmap",
                                     fmt="qcow2")
        for srv in (ours, theirs):
            apply_changes(srv.uri())
        for name in ("b0", "b1"):
            with self.subTest(bitmap=name):
                mine = run(["nbdinfo", "--map=qemu:dirty-bitmap:" + name, ours.uri()]).stdout
                qemus = run(["nbdinfo", "--map=qemu:dirty-bitmap:" + name, theirs.uri()]).stdout
                self.assertEqual(mine, qemus)
                self.assertNotEqual(mine.strip(), "")


class BitmapCommandErrors(nbdfs_test.TestCase):
    """Each bad input: its message, exit status 1, and nothing changed."""

    def setUp(self):
        super().setUp()
        self.img = nbdfs_test.make_image(self.path("disk.img"), 64 * MiB)
        run([NBDFS, "bitmap", "add", self.img, "b0"])
        self.sidecar = self.img + ".bitmaps"

    def snapshot(self):
        with open(self.sidecar, "rb") as f:
            return f.read()

    def check(self, args, message):
        before = self.snapshot()
        p = run([NBDFS, "bitmap", *args], check=False)
        self.assertEqual(p.returncode, 1, p)
        self.assertIn(message, p.stderr)
        self.assertEqual(p.stderr.count("\n"), 1, "one line: %r" % p.stderr)
        self.assertEqual(self.snapshot(), before)

    def test_errors(self):
        missing = self.path("missing.img")
        cases = [
            (["add", self.img, "b0"], "bitmap 'b0' already exists"),
            (["add", self.img, ""], "bitmap name must be 1 to 1023 bytes long"),
            (["add", self.img, "x" * 1024], "bitmap name must be 1 to 1023 bytes long"),
            (["add", self.img, "a/b"], "contains '/'"),
            (["add", "-g", "1000", self.img, "b1"], "granularity 1000 is not a power of two"),
            (["add", "-g", "256", self.img, "b1"], "granularity 256 is not a power of two"),
            (["add", "-g", "128M", self.img, "b1"], "is not a power of two from 512 to 64 MiB"),
            (["add", "-g", "lots", self.img, "b1"], "--granularity: 'lots' is not a size"),
            (["remove", self.img, "nope"], "no bitmap named 'nope'"),
            (["clear", self.img, "nope"], "no bitmap named 'nope'"),
            (["enable", self.img, "nope"], "no bitmap named 'nope'"),
            (["add", missing, "b1"], "missing.img: No such file or directory"),
            (["list", missing], "missing.img: No such file or directory"),
            (["frobnicate", self.img, "b0"], "unknown bitmap command 'frobnicate'"),
            (["add", self.img], "expected IMAGE NAME"),
            (["add", "--bogus", self.img, "b1"], "Unknown option --bogus"),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                self.check(args, message)

    def test_edits_refused_while_served_read_only(self):
        # A read-only server keeps no sidecar and no control socket; 'list'
        # still reads the sidecar (both hold the shared lock).
        srv = self.start_nbdfs([self.img], "-r")
        self.assertFalse(os.path.exists(self.img + ".control"))
        for args in (["add", self.img, "b1"], ["clear", self.img, "b0"],
                     ["remove", self.img, "b0"]):
            with self.subTest(args=args):
                self.check(args, "in use by another program, and no nbdfs server answers")
        self.assertIn("b0", run([NBDFS, "bitmap", "list", self.img]).stdout)
        srv.stop()

    def test_corrupt_and_foreign_sidecars_are_reported_not_reset(self):
        good = self.snapshot()
        for label, data in (("foreign", b"not a bitmap file at all"),
                            ("flipped", good[:200] + bytes([good[200] ^ 1]) + good[201:]),
                            ("truncated", good[:-1])):
            with self.subTest(label):
                with open(self.sidecar, "wb") as f:
                    f.write(data)
                self.check(["list", self.img], "the bitmaps cannot be trusted")
                p = run([NBDFS, "serve", "-U", self.path("s.sock"), self.img], check=False,
                        timeout=10)
                self.assertEqual(p.returncode, 1)
                self.assertIn("cannot be trusted", p.stderr)
                self.assertEqual(self.snapshot(), data)

    def test_remove_last_bitmap_removes_the_sidecar(self):
        run([NBDFS, "bitmap", "remove", self.img, "b0"])
        self.assertFalse(os.path.exists(self.sidecar))
        self.assertEqual(run([NBDFS, "bitmap", "list", "--json", self.img]).stdout.strip(), "[]")


if __name__ == "__main__":
    nbdfs_test.main()
