#!/usr/bin/python3
"""Mounting what users have: images of other formats by path (qemu-nbd
started for the mount, with every persistent bitmap), servers started for
the mount ([ CMD ARGS... ]), and nbdfs info of both."""
import errno
import json
import mmap
import os
import signal

import nbdfs_test as t
from nbdfs_test import NBDFS, run

MiB = 1 << 20
KiB = 1 << 10


def qemu_map_data(image, fmt):
    """[(offset, length)] of IMAGE's data (zero ranges count as holes), as qemu-img maps it."""
    entries = json.loads(run(["qemu-img", "map", "--output=json", "-U", "-f", fmt,
                              image]).stdout)
    out = []
    for e in entries:
        if not e["data"] or e.get("zero"):
            continue
        if out and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["start"], e["length"]))
    return out


def processes(name, arg):
    """Pids of NAME processes whose command line holds ARG."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == name.encode() and arg.encode() in argv:
            out.append(int(pid))
    return out


class Qcow2Test(t.TestCase):

    def make_qcow2(self):
        """A 64 MiB qcow2 with data, holes, zeroes and two persistent bitmaps that saw
        some writes."""
        image = self.path("vm.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 1M 1M", "-c", "write -P 0x22 10M 64k",
             "-c", "write -z 20M 1M", image])
        run(["qemu-img", "bitmap", "--add", image, "b0"])
        run(["qemu-img", "bitmap", "--add", "-g", "4096", image, "b1"])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 30M 8k", image])
        return image

    def test_virtual_disk_holes_and_bitmaps(self):
        image = self.make_qcow2()
        raw = self.path("reference.raw")
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw])
        # What qemu itself says of the bitmaps, through its own server and nbdinfo.
        sock = self.path("ref.sock")
        ref = t.Server(["qemu-nbd", "-r", "-f", "qcow2", "-B", "b0", "-B", "b1", "-k", sock,
                        "--persistent", image], sock, self.path("ref.err"))
        expected = {b: json.loads(run(["nbdinfo", "--map=qemu:dirty-bitmap:" + b, "--json",
                                       ref.uri()]).stdout) for b in ("b0", "b1")}
        ref.stop()
        m = self.mount(image)
        self.assertEqual(m.files(), ["dirty", "vm.raw"])
        disk = m.path("vm.raw")
        self.assertEqual(os.path.getsize(disk), 64 * MiB)
        with open(disk, "rb") as f, open(raw, "rb") as g:
            self.assertEqual(f.read(), g.read())
        self.assertEqual(t.data_extents_by_lseek(disk), qemu_map_data(image, "qcow2"))
        self.assertEqual(sorted(os.listdir(m.path("dirty"))),
                         ["b0.img", "b0.json", "b0.map", "b1.img", "b1.json", "b1.map"])
        for b in ("b0", "b1"):
            with open(m.path("dirty", b + ".json")) as f:
                self.assertEqual(json.load(f), expected[b], b)
        with open(m.path("dirty", "b0.map")) as f:
            self.assertEqual(f.read(), "31457280 65536\n")
        with open(m.path("dirty", "b1.map")) as f:
            self.assertEqual(f.read(), "31457280 8192\n")
        # A write through the mount lands in the qcow2 and in both bitmaps.
        with open(disk, "r+b") as f:
            f.seek(40 * MiB)
            f.write(b"w" * 4096)
            f.flush()
            os.fsync(f.fileno())
        with open(m.path("dirty", "b1.map")) as f:
            self.assertEqual(f.read(), "31457280 8192\n41943040 4096\n")
        # The delta image holds exactly the changed blocks of b1.
        delta = self.path("delta.img")
        run(["cp", "--sparse=always", m.path("dirty", "b1.img"), delta])
        self.assertEqual(t.data_extents_by_lseek(delta), [(30 * MiB, 8192), (40 * MiB, 4096)])
        self.assertEqual(m.unmount(), 0, m.messages)
        self.assertEqual(processes("qemu-nbd", image), [])
        run(["qemu-img", "check", "-f", "qcow2", image])
        info = json.loads(run(["qemu-img", "info", "--output=json", image]).stdout)
        flags = [b["flags"] for b in info["format-specific"]["data"]["bitmaps"]]
        self.assertEqual(flags, [["auto"], ["auto"]])      # not left in use
        out = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x77 40M 4k", image]).stdout
        self.assertNotIn("Pattern verification failed", out)     # b"w" is 0x77

    def test_read_only(self):
        image = self.make_qcow2()
        m = self.mount(image, "-r")
        with self.assertRaises(OSError) as cm:
            open(m.path("vm.raw"), "r+b")
        self.assertEqual(cm.exception.errno, errno.EROFS)
        self.assertEqual(m.unmount(), 0)

    def test_bitmap_left_in_use_is_reported_and_not_shown(self):
        image = self.make_qcow2()
        sock = self.path("crash.sock")
        srv = t.Server(["qemu-nbd", "-f", "qcow2", "-k", sock, "--persistent", image], sock,
                       self.path("crash.err"))
        run(["nbdinfo", srv.uri()])   # the image is open for writing: bitmaps in use
        srv.stop(signal.SIGKILL)      # and they stay flagged so
        m = self.mount(image, foreground=True)
        self.assertEqual(os.listdir(m.path("dirty")), [])
        self.assertEqual(m.unmount(), 0)
        self.assertIn("bitmap 'b0' is marked in use", m.messages)
        self.assertIn("bitmap 'b1' is marked in use", m.messages)

    def test_other_formats(self):
        for fmt in ("vmdk", "vdi", "vhdx", "qed"):
            image = self.path("disk." + fmt)
            run(["qemu-img", "create", "-q", "-f", fmt, image, "16M"])
            run(["qemu-io", "-f", fmt, "-c", "write -P 0x5e 4M 64k", image])
            m = self.mount(image, mountpoint=self.path("mnt-" + fmt))
            self.assertEqual(m.files(), ["dirty", "disk.raw"])
            with open(m.path("disk.raw"), "rb") as f:
                f.seek(4 * MiB)
                self.assertEqual(f.read(64 * KiB), b"\x5e" * 64 * KiB)
            self.assertEqual(m.unmount(), 0, fmt)

    def test_without_qemu_nbd(self):
        image = self.make_qcow2()
        os.mkdir(self.path("mnt"))
        env = dict(os.environ, PATH="/nonexistent")
        p = t.subprocess.run([NBDFS, "mount", image, self.path("mnt")], capture_output=True,
                             text=True, env=env, timeout=30)
        self.assertEqual(p.returncode, 1)
        self.assertIn("install qemu-utils", p.stderr)
        self.assertFalse(t.is_mounted(self.path("mnt")))

    def test_info_of_an_image(self):
        image = self.make_qcow2()
        out = run([NBDFS, "info", image]).stdout
        self.assertIn("size: 67108864", out)
        self.assertIn("qemu:dirty-bitmap:b0", out)
        self.assertIn("qemu:dirty-bitmap:b1", out)


class CommandTest(t.TestCase):

    def test_qemu_nbd_command(self):
        image = t.make_image(self.path("disk.raw"), 16 * MiB, [(MiB, b"c" * 4096)])
        m = self.mount(["qemu-nbd", "-f", "raw", image])
        self.assertEqual(m.files(), ["dirty", "disk"])
        with open(m.path("disk"), "r+b") as f:
            f.seek(MiB)
            self.assertEqual(f.read(4096), b"c" * 4096)
            f.seek(2 * MiB)
            f.write(b"d" * 4096)
        self.assertEqual(m.unmount(), 0, m.messages)
        self.assertEqual(processes("qemu-nbd", image), [])
        with open(image, "rb") as f:
            f.seek(2 * MiB)
            self.assertEqual(f.read(4096), b"d" * 4096)

    def test_nbdkit_command_and_its_death(self):
        image = t.make_image(self.path("disk.raw"), 16 * MiB, [(MiB, b"k" * 4096)])
        m = self.mount(["nbdkit", "file", image], foreground=True)
        [pid] = processes("nbdkit", image)
        fd = os.open(m.path("disk"), os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        os.preadv(fd, [buf], MiB)
        self.assertEqual(bytes(buf), b"k" * 4096)
        os.kill(pid, signal.SIGKILL)
        # The server died: EIO at once, then the reconnection starts it again.
        t.wait_for_reconnect(fd, buf, MiB, timeout=20)
        self.assertEqual(bytes(buf), b"k" * 4096)
        self.assertNotEqual(processes("nbdkit", image), [pid])
        os.close(fd)
        self.assertEqual(m.unmount(), 0, m.messages)
        self.assertIn("nbdkit exited (signal 9): starting it again", m.messages)
        self.assertEqual(processes("nbdkit", image), [])

    def test_info_of_a_command(self):
        out = run([NBDFS, "info", "[", "nbdkit", "-r", "memory", "1M", "]"]).stdout
        self.assertIn("size: 1048576", out)
        self.assertIn("read-only", out)

    def test_bad_commands(self):
        os.mkdir(self.path("mnt"))
        for argv, msg in ((["[", "no-such-server-command", "]"],
                           "no-such-server-command: command not found"),
                          (["[", "]"], "no command between the brackets"),
                          (["[", "nbdkit", "memory", "1M"], "'[' without ']'"),
                          (["[", "false", "]"], "false exited with status 1")):
            p = run([NBDFS, "mount", *argv, self.path("mnt")], check=False, timeout=60)
            self.assertEqual(p.returncode, 1, argv)
            self.assertIn(msg, p.stderr, argv)
            self.assertFalse(t.is_mounted(self.path("mnt")))


if __name__ == "__main__":
    t.main()
