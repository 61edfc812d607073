#!/usr/bin/python3
"""Backup views of a served image: exactly the image at the instant of
`backup begin` while writers never stop, the bitmap handed over at that same
instant (no change lost, none counted twice), abort giving the changes back,
a crash leaving the bitmap all dirty, a full scratch file breaking the view
and never a write."""
import json
import os
import random
import signal
import subprocess
import threading
import time

import nbd

import nbdfs_test as t
from nbdfs_test import NBDFS, run

KiB = 1024
MiB = 1024 * KiB
GRAN = 64 * KiB


def nbdfs(*args, check=True):
    return run([NBDFS, *args], check=check)


def views(image):
    return {v["view"]: v for v in json.loads(nbdfs("backup", "list", "--json", image).stdout)}


def bitmaps(image):
    return {b["name"]: b for b in json.loads(nbdfs("bitmap", "list", "--json", image).stdout)}


def dirty_granules(uri, name):
    out = run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:" + name, uri]).stdout
    granules = set()
    for e in json.loads(out):
        if e["type"] & 1:
            granules.update(range(e["offset"] // GRAN, (e["offset"] + e["length"]) // GRAN))
    return granules


def read_all(uri, size):
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return b"".join(h.pread(min(4 * MiB, size - off), off) for off in range(0, size, 4 * MiB))
    finally:
        h.shutdown()


class Writers:
    """Threads that never stop writing while a test runs, each in a region of
    its own, in sequence, logging every write with when it started and ended."""

    def __init__(self, uri, base, nthreads, region):
        self.base = bytearray(base)
        self.region = region
        self.stop_event = threading.Event()
        self.logs = [[] for _ in range(nthreads)]
        self.errors = []
        self.threads = [threading.Thread(target=self._run, args=(uri, i))
                        for i in range(nthreads)]
        for th in self.threads:
            th.start()

    def _run(self, uri, slot):
        rnd = random.Random(slot)
        try:
            h = nbd.NBD()
            h.connect_uri(uri)
            while not self.stop_event.is_set():
                length = rnd.choice([512, 4096, 65536, 200000])
                off = slot * self.region + rnd.randrange(0, self.region - length)
                op = rnd.random()
                start = time.monotonic()
                if op < 0.1:
                    h.zero(length, off)
                    data = bytes(length)
                elif op < 0.15:
                    h.trim(length, off)          # nbdfs punches a hole: zeros
                    data = bytes(length)
                else:
                    data = rnd.randbytes(length)
                    h.pwrite(data, off)
                self.logs[slot].append((start, time.monotonic(), off, length, data))
            h.shutdown()
        except Exception as e:        # reported by stop()
            self.errors.append(e)

    def stop(self):
        self.stop_event.set()
        for th in self.threads:
            th.join(60)
        if self.errors:
            raise self.errors[0]

    def matches_a_cut(self, tc, view, began, ended):
        """VIEW must hold, in each region, the base with exactly the region's
        writes up to some point inside [BEGAN, ENDED] applied."""
        for slot, log in enumerate(self.logs):
            lo, hi = slot * self.region, (slot + 1) * self.region
            image = bytearray(self.base[lo:hi])
            done = [w for w in log if w[1] < began]          # surely before
            maybe = [w for w in log if w[1] >= began and w[0] <= ended]
            tc.assertTrue(done, "region %d: no write before the view" % slot)
            for _, _, off, _, data in done:
                image[off - lo:off - lo + len(data)] = data
            want = view[lo:hi]
            ok = image == want
            for _, _, off, _, data in maybe:
                if ok:
                    break
                image[off - lo:off - lo + len(data)] = data
                ok = image == want
            tc.assertTrue(ok, "region %d: the view is no cut of the writes in [%d done, %d "
                          "racing]" % (slot, len(done), len(maybe)))

    def touched(self, pred):
        """Granules marked by the requests PRED(start, end) accepts (trims too)."""
        out = set()
        for log in self.logs:
            for start, end, off, length, _ in log:
                if pred(start, end):
                    out.update(range(off // GRAN, (off + length - 1) // GRAN + 1))
        return out


class BackupViewTest(t.TestCase):
    SIZE = 32 * MiB

    def setUp(self):
        super().setUp()
        self.base = random.Random(7).randbytes(self.SIZE // 2) + bytes(self.SIZE // 2)
        self.img = t.make_image(self.path("disk.img"), self.SIZE, [(0, self.base[:self.SIZE // 2])])
        nbdfs("bitmap", "add", self.img, "b0")
        self.srv = self.start_nbdfs([self.img])

    def view_uri(self, name="disk.img@backup"):
        return self.srv.uri(name)

    def change_around_a_begin(self):
        """A write at 1 MiB, `backup begin --bitmap b0` (b0 restarts), a write at 5 MiB."""
        h = nbd.NBD()
        h.connect_uri(self.srv.uri())
        h.pwrite(b"a" * 4096, 1 * MiB)
        nbdfs("backup", "begin", "--bitmap", "b0", self.img)
        self.assertEqual(dirty_granules(self.srv.uri(), "b0"), set())
        h.pwrite(b"b" * 4096, 5 * MiB)
        h.flush()
        h.shutdown()

    def test_a_view_is_the_image_at_begin_while_writers_never_stop(self):
        w = Writers(self.srv.uri(), self.base, 4, self.SIZE // 4)
        self.addCleanup(w.stop_event.set)
        time.sleep(0.5)
        began = time.monotonic()
        self.assertEqual(nbdfs("backup", "begin", "--bitmap", "b0", self.img).stdout,
                         "disk.img@backup\n")
        ended = time.monotonic()
        time.sleep(0.5)              # the image changes more under the view...
        view = read_all(self.view_uri(), self.SIZE)     # ...and while it is read
        frozen = dirty_granules(self.view_uri(), "b0")
        w.stop()
        live = dirty_granules(self.srv.uri(), "b0")
        w.matches_a_cut(self, view, began, ended)
        # The view's b0: every change before the instant; the live b0: every
        # change after it; a write racing `begin` is in one of them.
        before = w.touched(lambda s, e: e < began)
        after = w.touched(lambda s, e: s > ended)
        self.assertTrue(before and after)
        self.assertLessEqual(before, frozen)
        self.assertLessEqual(after, live)
        self.assertEqual(frozen | live, w.touched(lambda s, e: True))
        self.assertFalse(frozen - w.touched(lambda s, e: s <= ended))
        self.assertFalse(live - w.touched(lambda s, e: e >= began))
        # What was kept: only clusters rewritten since, never more than the image.
        info = views(self.img)["disk.img@backup"]
        self.assertEqual(info["bitmap"], "b0")
        self.assertIsNone(info["broken"])
        self.assertGreater(info["kept-bytes"], 0)
        self.assertLessEqual(info["kept-bytes"], self.SIZE)
        self.assertLessEqual(info["scratch-bytes"], info["kept-bytes"] + 1 * MiB)
        nbdfs("backup", "end", self.img)
        self.assertEqual(views(self.img), {})
        # The view is gone for clients too.
        p = run(["nbdinfo", self.view_uri()], check=False)
        self.assertNotEqual(p.returncode, 0)

    def test_map_and_holes_of_a_view(self):
        h = nbd.NBD()
        h.connect_uri(self.srv.uri())
        nbdfs("backup", "begin", self.img)
        # Data punched away and holes filled after the instant: the view keeps both.
        h.zero(MiB, 0)
        h.pwrite(b"x" * MiB, 20 * MiB)
        h.shutdown()
        out = json.loads(run(["nbdinfo", "--json", "--map", self.view_uri()]).stdout)
        runs = [(e["offset"], e["length"], e["type"]) for e in out]
        self.assertEqual(runs, [(0, self.SIZE // 2, 0), (self.SIZE // 2, self.SIZE // 2, 3)])
        self.assertEqual(read_all(self.view_uri(), self.SIZE), self.base)
        # No bitmap asked: the view carries none.
        ctx = json.loads(run(["nbdinfo", "--json", self.view_uri()]).stdout)
        self.assertEqual(ctx["exports"][0]["contexts"], ["base:allocation"])
        self.assertTrue(ctx["exports"][0]["is_read_only"])
        # Rewriting the same block again keeps nothing more.
        kept = views(self.img)["disk.img@backup"]["kept-bytes"]
        self.assertEqual(kept, MiB)               # the zeroed data; the filled hole costs nothing
        h = nbd.NBD()
        h.connect_uri(self.srv.uri())
        for i in range(5):
            h.pwrite(bytes([i]) * MiB, 0)
        h.shutdown()
        self.assertEqual(views(self.img)["disk.img@backup"]["kept-bytes"], kept)
        nbdfs("backup", "end", self.img)

    def test_abort_gives_the_changes_back(self):
        self.change_around_a_begin()
        nbdfs("backup", "abort", self.img)
        self.assertEqual(dirty_granules(self.srv.uri(), "b0"), {16, 80})
        # Saved at once (the sidecar is rewritten in place): still so after a clean stop.
        self.assertEqual(self.srv.stop(), 0)
        self.assertEqual(bitmaps(self.img)["b0"]["dirty-bytes"], 2 * GRAN)

    def test_clean_shutdown_with_a_view_open_gives_the_changes_back(self):
        self.change_around_a_begin()
        self.assertEqual(self.srv.stop(), 0)
        self.assertIn("changes are back in bitmap 'b0'", self.srv.stderr())
        b0 = bitmaps(self.img)["b0"]
        self.assertTrue(b0["consistent"])
        self.assertEqual(b0["dirty-bytes"], 2 * GRAN)

    def test_a_crash_during_a_backup_misses_no_change(self):
        self.change_around_a_begin()
        self.srv.stop(signal.SIGKILL)
        b0 = bitmaps(self.img)["b0"]
        self.assertFalse(b0["consistent"])
        self.assertEqual(b0["dirty-bytes"], self.SIZE)
        # The scratch file had no name: nothing is left behind.
        self.assertEqual(sorted(f for f in os.listdir(self.tmp) if f.startswith("disk.img")),
                         ["disk.img", "disk.img.bitmaps", "disk.img.control"])

    def test_a_full_scratch_file_breaks_the_view_never_a_write(self):
        small = self.path("small")
        os.mkdir(small)
        run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small])
        self.addCleanup(run, ["umount", "-l", small])
        nbdfs("backup", "begin", "--scratch", small, "--view", "v", self.img)
        h = nbd.NBD()
        h.connect_uri(self.srv.uri())
        new = os.urandom(4 * MiB)
        h.pwrite(new, 0)                          # 4 MiB of old data cannot fit in 1 MiB
        h.flush()
        self.assertEqual(h.pread(4 * MiB, 0), new)
        h.shutdown()
        info = views(self.img)["v"]
        self.assertEqual(info["broken"], "No space left on device")
        self.assertEqual(info["scratch-bytes"], 0)       # given back at once
        v = nbd.NBD()
        v.connect_uri(self.view_uri("v"))
        with self.assertRaises(nbd.Error) as e:
            v.pread(4096, 8 * MiB)
        self.assertEqual(e.exception.errno, "EIO")
        v.shutdown()
        self.assertIn("backup view 'v' of", self.srv.stderr())
        nbdfs("backup", "end", self.img, "v")
        with open(self.img, "rb") as f:
            self.assertEqual(f.read(4 * MiB), new)

    def test_end_waits_for_the_views_clients(self):
        nbdfs("backup", "begin", self.img)
        v = nbd.NBD()
        v.connect_uri(self.view_uri())
        self.assertEqual(views(self.img)["disk.img@backup"]["clients"], 1)
        # A client that leaves within the wait: end goes through.
        ender = subprocess.Popen([NBDFS, "backup", "end", self.img], stderr=subprocess.PIPE,
                                 text=True)
        time.sleep(1)
        self.assertIsNone(ender.poll())
        v.shutdown()
        _, err = ender.communicate(timeout=10)
        self.assertEqual(ender.returncode, 0, err)
        # One that stays: refused, named, and the view stays usable.
        nbdfs("backup", "begin", self.img)
        v = nbd.NBD()
        v.connect_uri(self.view_uri())
        p = nbdfs("backup", "end", self.img, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("backup view 'disk.img@backup' is still in use by 1 client connection",
                      p.stderr)
        self.assertEqual(len(v.pread(4096, 0)), 4096)
        v.shutdown()
        nbdfs("backup", "end", self.img)

    def test_errors(self):
        def fails(args, message):
            p = nbdfs("backup", *args, check=False)
            self.assertEqual(p.returncode, 1, p.stdout)
            self.assertIn(message, p.stderr)
        fails(["begin", "--bitmap", "nope", self.img], "no bitmap named 'nope'")
        fails(["begin", "--view", "disk.img", self.img], "an export named 'disk.img' exists")
        fails(["begin", "--scratch", self.path("missing"), self.img], "not a directory")
        fails(["end", self.img], "no backup view is open")
        nbdfs("backup", "begin", "--view", "one", self.img)
        nbdfs("backup", "begin", "--view", "two", self.img)
        fails(["begin", "--view", "two", self.img], "an export named 'two' exists")
        fails(["end", self.img], "2 backup views are open: name one")
        fails(["abort", self.img, "three"], "no backup view named 'three'")
        self.assertEqual(sorted(views(self.img)), ["one", "two"])
        nbdfs("backup", "end", self.img, "one")
        nbdfs("backup", "end", self.img)
        other = t.make_image(self.path("other.img"), MiB)
        fails(["begin", other], "a backup view is made by the server that writes the image")
        fails(["list", self.path("missing.img")], "missing.img")
        fails(["start", self.img], "unknown backup command 'start'")
        fails(["end", self.img, "a", "b"], "expected IMAGE [VIEW]")

    def test_a_mounts_own_server_has_no_views(self):
        image = t.make_image(self.path("m.img"), MiB)
        m = self.mount(image)
        p = nbdfs("backup", "begin", image, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("listens on no socket a view could be reached on", p.stderr)
        self.assertEqual(m.unmount(), 0)

    def test_a_read_only_server_has_no_views(self):
        ro = t.make_image(self.path("ro.img"), MiB)
        self.start_nbdfs([ro], "-r", name="ro")
        p = nbdfs("backup", "begin", ro, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("a backup view is made by the server that writes the image", p.stderr)


if __name__ == "__main__":
    t.main()
