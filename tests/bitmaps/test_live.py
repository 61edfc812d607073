#!/usr/bin/python3
"""Bitmap commands on an image being served: carried out by the server through
IMAGE.control, atomically with respect to writes, persisted at once, seen by
clients that negotiate afterwards, harmless to those connected."""
import json
import os
import signal
import stat
import threading
import time

import nbd

import nbdfs_test as t
from nbdfs_test import NBDFS, run

KiB = 1024
MiB = 1024 * KiB


def bitmap(args):
    return run([NBDFS, "bitmap", *args])


def listing(image):
    return {b["name"]: b for b in json.loads(bitmap(["list", "--json", image]).stdout)}


def contexts(uri):
    out = json.loads(run(["nbdinfo", "--json", uri]).stdout)
    return sorted(out["exports"][0]["contexts"])


def dirty_runs(uri, name):
    out = run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:" + name, uri]).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


class LiveBitmapTest(t.TestCase):

    def setUp(self):
        super().setUp()
        self.img = t.make_image(self.path("disk.img"), 64 * MiB)
        bitmap(["add", self.img, "b0"])
        self.srv = self.start_nbdfs([self.img])

    def test_commands_on_a_served_image(self):
        ctl = self.img + ".control"
        st = os.lstat(ctl)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        h = nbd.NBD()
        h.connect_uri(self.srv.uri())
        h.pwrite(b"a" * 4096, MiB)
        # Added while served: tracks from now on, offered to the next clients.
        bitmap(["add", "-g", "4096", self.img, "b1"])
        self.assertEqual(contexts(self.srv.uri()),
                         ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"])
        h.pwrite(b"b" * 4096, 2 * MiB)
        self.assertEqual(dirty_runs(self.srv.uri(), "b1"), [(2 * MiB, 4096)])
        self.assertEqual(dirty_runs(self.srv.uri(), "b0"), [(MiB, 64 * KiB), (2 * MiB, 64 * KiB)])
        # Persisted at once: the sidecar on disk lists it (the server still runs).
        self.assertIn(b"b1", open(self.img + ".bitmaps", "rb").read())
        info = listing(self.img)
        self.assertEqual(info["b1"]["granularity"], 4096)
        self.assertEqual(info["b0"]["dirty-bytes"], 128 * KiB)
        # Disabled: stops tracking; enabled again: tracks.
        bitmap(["disable", self.img, "b1"])
        h.pwrite(b"c" * 4096, 3 * MiB)
        self.assertFalse(listing(self.img)["b1"]["enabled"])
        bitmap(["enable", self.img, "b1"])
        h.pwrite(b"d" * 4096, 4 * MiB)
        self.assertEqual(dirty_runs(self.srv.uri(), "b1"), [(2 * MiB, 4096), (4 * MiB, 4096)])
        # Cleared: what follows is all it holds.
        bitmap(["clear", self.img, "b0"])
        self.assertEqual(dirty_runs(self.srv.uri(), "b0"), [])
        h.pwrite(b"e" * 4096, 5 * MiB)
        self.assertEqual(dirty_runs(self.srv.uri(), "b0"), [(5 * MiB, 64 * KiB)])
        h.shutdown()
        # Errors come back from the server, named.
        p = run([NBDFS, "bitmap", "clear", self.img, "nope"], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("no bitmap named 'nope'", p.stderr)
        p = run([NBDFS, "bitmap", "add", self.img, "b1"], check=False)
        self.assertIn("bitmap 'b1' already exists", p.stderr)
        # What the server saves at shutdown is what it showed.
        self.assertEqual(self.srv.stop(), 0)
        self.assertFalse(os.path.exists(self.img + ".control"))
        offline = listing(self.img)
        self.assertEqual(offline["b0"]["dirty-bytes"], 64 * KiB)
        self.assertEqual(offline["b1"]["dirty-bytes"], 12 * KiB)     # 2M, 4M, 5M
        self.assertTrue(offline["b0"]["consistent"])

    def test_connected_clients_are_not_disturbed(self):
        before = nbd.NBD()
        before.add_meta_context("qemu:dirty-bitmap:b0")
        before.connect_uri(self.srv.uri())
        before.pwrite(b"x" * 4096, 0)
        bitmap(["add", self.img, "late"])
        bitmap(["remove", self.img, "b0"])
        # Removed: offered no more...
        self.assertEqual(contexts(self.srv.uri()), ["base:allocation", "qemu:dirty-bitmap:late"])
        # ...but the client that negotiated it still gets answers, with the
        # context id it was given, and its writes still work.
        seen = []
        before.block_status(MiB, 0,
                            lambda ctx, off, ents, err: seen.append((ctx, list(ents))))
        self.assertEqual(seen, [("qemu:dirty-bitmap:b0", [64 * KiB, 1, MiB - 64 * KiB, 0])])
        before.pwrite(b"y" * 4096, 8 * MiB)
        before.shutdown()
        self.assertEqual(sorted(listing(self.img)), ["late"])
        self.assertEqual(dirty_runs(self.srv.uri(), "late"), [(8 * MiB, 64 * KiB)])

    def test_clear_is_atomic_with_writes(self):
        # Writers never stop; each logs when its writes started and ended.
        # A write that ended before the clear began must be gone from the
        # bitmap; one that began after the clear ended must be in it.
        gran = 64 * KiB
        stop = threading.Event()
        log = []
        lock = threading.Lock()

        def writer(slot):
            h = nbd.NBD()
            h.connect_uri(self.srv.uri())
            i = 0
            while not stop.is_set():
                block = (slot * 64 + i % 64)
                with lock:
                    log.append(("start", block, time.monotonic()))
                h.pwrite(bytes([i % 256]) * gran, block * gran)
                with lock:
                    log.append(("end", block, time.monotonic()))
                i += 1
            h.shutdown()
        threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
        for th in threads:
            th.start()
        time.sleep(0.5)
        begin = time.monotonic()
        bitmap(["clear", self.img, "b0"])
        end = time.monotonic()
        time.sleep(0.3)
        stop.set()
        for th in threads:
            th.join()
        dirty = set()
        for off, length in dirty_runs(self.srv.uri(), "b0"):
            dirty.update(range(off // gran, (off + length) // gran))
        after = {b for kind, b, ts in log if kind == "start" and ts > end}
        self.assertTrue(after)
        self.assertLessEqual(after, dirty)
        # Blocks written only before the clear (never after it began) are clean.
        before_only = ({b for kind, b, ts in log if kind == "end" and ts < begin} -
                       {b for kind, b, ts in log if kind == "start" and ts >= begin} -
                       {b for kind, b, ts in log if kind == "end" and ts >= begin})
        self.assertFalse(before_only & dirty)

    def test_only_the_servers_user_or_root(self):
        uid = 40000 + os.getpid() % 20000
        os.chmod(self.tmp, 0o755)
        p = run(["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups",
                 NBDFS, "bitmap", "clear", self.img, "b0"], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("disk.img", p.stderr)
        self.assertEqual(listing(self.img)["b0"]["enabled"], True)

    def test_stale_socket_after_kill(self):
        self.srv.stop(signal.SIGKILL)
        self.assertTrue(os.path.exists(self.img + ".control"))
        # Nobody holds the image: the command works on it directly.
        bitmap(["clear", self.img, "b0"])
        # A new server replaces the stale socket.
        srv = self.start_nbdfs([self.img], name="again")
        bitmap(["add", self.img, "b2"])
        self.assertIn("qemu:dirty-bitmap:b2", contexts(srv.uri()))

    def test_on_a_mounted_image(self):
        image = t.make_image(self.path("m.img"), 8 * MiB)
        m = self.mount(image)
        bitmap(["add", image, "live"])
        with open(m.path("m.img"), "r+b") as f:
            f.write(b"z" * 4096)
            f.flush()
            os.fsync(f.fileno())
        self.assertEqual(listing(image)["live"]["dirty-bytes"], 64 * KiB)
        self.assertEqual(m.unmount(), 0)
        self.assertEqual(listing(image)["live"]["dirty-bytes"], 64 * KiB)


if __name__ == "__main__":
    t.main()
