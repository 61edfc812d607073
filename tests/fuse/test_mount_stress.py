#!/usr/bin/python3
"""Other people's programs and hard use through a mount: a real ext4 on the
mounted file (mkfs, loop mount, a copied tree, e2fsck), qemu-io's pattern
checks, many threads on one open file, and a randomized operation sequence
checked against a shadow copy after every step (reads, writes, punches,
zero ranges, mmap, O_DIRECT, fsync, reopen), each against the bundled
server, qemu-nbd and an nbdkit with a 4 KiB minimum block size."""
import filecmp
import mmap
import os
import random
import shutil
import subprocess
import threading

import nbdfs_test as t
from nbdfs_test import run

MiB = 1 << 20
KiB = 1 << 10


class Subjects:
    """Mounts of a fresh image of SIZE bytes through each kind of server."""

    KINDS = ("local", "qemu-nbd", "nbdkit-4k")

    def mount_kind(self, kind, size, *args):
        """(Mount, path of the export file in it, image path)."""
        self.mounts_made = getattr(self, "mounts_made", 0) + 1
        tag = "%s-%d" % (kind, self.mounts_made)
        image = t.make_image(self.path("disk-%s.img" % tag), size)
        mnt = self.path("mnt-" + tag)
        if kind == "local":
            m = self.mount(image, *args, mountpoint=mnt)
            return m, m.path(os.path.basename(image)), image
        if kind == "qemu-nbd":
            srv = self.start_qemu_nbd(image, name=tag)
        else:
            srv = self.start_nbdkit_cmd([
                "--filter=blocksize-policy", "file", image, "blocksize-minimum=4096",
                "blocksize-preferred=4096", "blocksize-error-policy=error"], name=tag)
        m = self.mount(srv.uri(), *args, mountpoint=mnt)
        return m, m.path("disk"), image


class Ext4Test(Subjects, t.TestCase):

    def check_ext4(self, kind):
        source = "/usr/share/doc"
        m, disk, image = self.mount_kind(kind, 256 * MiB)
        run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", disk], timeout=120)
        inner = self.path("ext4-%s-%d" % (kind, self.mounts_made))
        os.mkdir(inner)
        run(["mount", "-o", "loop", disk, inner])
        try:
            shutil.copytree(source, os.path.join(inner, "doc"), symlinks=True)
            run(["sync"], timeout=120)
        finally:
            run(["umount", inner], timeout=120)
        run(["e2fsck", "-f", "-n", disk], timeout=120)
        run(["mount", "-o", "loop,ro", disk, inner])
        try:
            cmp = filecmp.dircmp(source, os.path.join(inner, "doc"))
            self.assertEqual((cmp.left_only, cmp.right_only, cmp.diff_files), ([], [], []))
            for sub in cmp.subdirs.values():
                self.assertEqual((sub.left_only, sub.right_only, sub.diff_files), ([], [], []))
        finally:
            run(["umount", inner], timeout=60)
        self.assertEqual(m.unmount(), 0, m.messages)
        # What the server holds is a clean file system too.
        run(["e2fsck", "-f", "-n", image], timeout=120)

    def test_ext4_local(self):
        self.check_ext4("local")

    def test_ext4_qemu_nbd(self):
        self.check_ext4("qemu-nbd")

    def test_ext4_nbdkit_4k(self):
        self.check_ext4("nbdkit-4k")


class QemuIoTest(Subjects, t.TestCase):
    """qemu-io checks its own patterns: sync and async, cached and O_DIRECT."""

    SCRIPT = [
        "write -P 0xa1 0 1M", "read -P 0xa1 0 1M",
        "write -P 0xb2 4095 8193", "read -P 0xb2 4095 8193", "read -P 0xa1 0 4095",
        "aio_write -P 0xc3 2M 64k", "aio_write -P 0xd4 3M 64k", "aio_flush",
        "read -P 0xc3 2M 64k", "read -P 0xd4 3M 64k",
        "write -z 512k 128k", "read -P 0 512k 128k", "read -P 0xa1 640k 384k",
        "discard 2M 64k", "flush",
        "writev -P 0xe5 5M 4k 8k 4k", "readv -P 0xe5 5M 16k",
    ]

    def check_qemu_io(self, kind, cache):
        m, disk, image = self.mount_kind(kind, 16 * MiB)
        args = ["qemu-io", "-f", "raw", "-t", cache]
        for cmd in self.SCRIPT:
            args += ["-c", cmd]
        out = run(args + [disk], timeout=120).stdout
        self.assertNotIn("Pattern verification failed", out)
        self.assertNotIn("failed", out)
        self.assertEqual(m.unmount(), 0, m.messages)
        run(["qemu-io", "-f", "raw", "-c", "read -P 0xb2 4095 8193", "-c",
             "read -P 0xe5 5M 16k", image])

    def test_qemu_io(self):
        for kind in self.KINDS:
            for cache in ("writeback", "none"):
                with self.subTest(kind=kind, cache=cache):
                    self.check_qemu_io(kind, cache)


class SharedDescriptorTest(Subjects, t.TestCase):
    """16 threads on one open file: each owns a region, writes (unaligned too),
    reads it back, and reads, stats and seeks the whole file meanwhile."""

    def check_shared(self, kind):
        threads_n, region = 16, 512 * KiB
        m, disk, image = self.mount_kind(kind, threads_n * region, "-C", "4")
        fd = os.open(disk, os.O_RDWR)
        shadows = [bytearray(region) for _ in range(threads_n)]
        errors = []

        def worker(i):
            rnd = random.Random(i)
            base = i * region
            try:
                for n in range(150):
                    off = rnd.randrange(0, region - 1)
                    data = rnd.randbytes(min(rnd.choice((1, 17, 512, 4096, 70000)),
                                             region - off))
                    os.pwrite(fd, data, base + off)
                    shadows[i][off:off + len(data)] = data
                    roff = rnd.randrange(0, region - 8192)
                    if os.pread(fd, 8192, base + roff) != shadows[i][roff:roff + 8192]:
                        errors.append("thread %d: read back differs at %d" % (i, base + roff))
                        return
                    if n % 30 == 0:
                        os.fsync(fd)
                        os.fstat(fd)
                        os.lseek(fd, 0, os.SEEK_DATA)
                        os.pread(fd, 65536, rnd.randrange(0, threads_n * region - 65536))
            except OSError as e:
                errors.append("thread %d: %s" % (i, e))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(180 * t.SLOW)
        self.assertFalse(any(th.is_alive() for th in threads), "a thread hung")
        os.fsync(fd)
        os.close(fd)
        self.assertEqual(errors, [])
        self.assertEqual(m.unmount(), 0, m.messages)
        with open(image, "rb") as f:
            self.assertEqual(f.read(), b"".join(shadows))

    def test_shared_descriptor(self):
        for kind in self.KINDS:
            with self.subTest(kind=kind):
                self.check_shared(kind)


class RandomOperationsTest(Subjects, t.TestCase):
    """A seeded random sequence of operations, each checked against a shadow
    copy, in the manner of xfstests' fsx (fixed size: the export cannot grow)."""

    SIZE = 8 * MiB
    OPS = 1500

    def check_random(self, kind, seed):
        rnd = random.Random(seed)
        m, disk, image = self.mount_kind(kind, self.SIZE)
        shadow = bytearray(self.SIZE)
        fd = os.open(disk, os.O_RDWR)
        dfd = os.open(disk, os.O_RDWR | os.O_DIRECT)
        abuf = mmap.mmap(-1, MiB)
        log = []

        def where():
            return "seed %d, op %d, last ops: %s" % (seed, len(log), log[-5:])

        def span(max_len):
            off = rnd.randrange(0, self.SIZE - 1)
            return off, rnd.randrange(1, min(max_len, self.SIZE - off) + 1)

        try:
            for _ in range(self.OPS):
                op = rnd.choice(("write", "write", "read", "read", "punch", "zero",
                                 "mapwrite", "mapread", "dwrite", "dread", "fsync", "reopen"))
                if op == "write":
                    off, n = span(200000)
                    data = rnd.randbytes(n)
                    os.pwrite(fd, data, off)
                    shadow[off:off + n] = data
                elif op == "read":
                    off, n = span(300000)
                    self.assertEqual(os.pread(fd, n, off), shadow[off:off + n], where())
                elif op in ("punch", "zero"):
                    off, n = span(300000)
                    mode = (t.FALLOC_FL_PUNCH_HOLE | t.FALLOC_FL_KEEP_SIZE if op == "punch"
                            else t.FALLOC_FL_ZERO_RANGE)
                    t.fallocate(fd, mode, off, n)
                    shadow[off:off + n] = bytes(n)
                elif op in ("mapwrite", "mapread"):
                    off, n = span(100000)
                    start = off - off % mmap.PAGESIZE
                    mm = mmap.mmap(fd, off + n - start, offset=start)
                    if op == "mapwrite":
                        data = rnd.randbytes(n)
                        mm[off - start:off - start + n] = data
                        shadow[off:off + n] = data
                        if rnd.random() < 0.5:
                            mm.flush()
                    else:
                        self.assertEqual(mm[off - start:off - start + n],
                                         shadow[off:off + n], where())
                    mm.close()
                elif op in ("dwrite", "dread"):
                    off = rnd.randrange(0, self.SIZE // 4096) * 4096
                    n = min(rnd.randrange(1, 65) * 4096, self.SIZE - off)
                    view = memoryview(abuf)[:n]
                    if op == "dwrite":
                        view[:] = rnd.randbytes(n)
                        os.pwritev(dfd, [view], off)
                        shadow[off:off + n] = view
                    else:
                        os.preadv(dfd, [view], off)
                        self.assertEqual(bytes(view), shadow[off:off + n], where())
                elif op == "fsync":
                    os.fsync(fd)
                else:
                    os.close(fd)
                    fd = os.open(disk, os.O_RDWR)
                log.append(op)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.close(dfd)
        self.assertEqual(m.unmount(), 0, m.messages)
        with open(image, "rb") as f:
            self.assertEqual(f.read() == bytes(shadow), True, "image differs: " + where())

    def test_random_operations(self):
        seed = int(os.environ.get("NBDFS_TEST_SEED", "0")) or random.randrange(1, 1 << 30)
        for kind in self.KINDS:
            with self.subTest(kind=kind, seed=seed):
                self.check_random(kind, seed)


if __name__ == "__main__":
    t.main()
