"""Faults and load through a mount: a full disk under the image reaches the
program writing through the mount as ENOSPC, and 8 parallel writers through
one mount lose nothing."""
import errno
import os
import random
import signal
import subprocess
import threading
import time

import nbdfs_test
from nbdfs_test import run

MiB = 1024 * 1024


class MountFaults(nbdfs_test.TestCase):

    def disk_full(self, status, *mount_args):
        small = self.small_tmpfs("small", "8m")
        img = nbdfs_test.make_image(os.path.join(small, "disk.img"), 64 * MiB)
        m = self.mount(img, *mount_args)
        p = subprocess.run(["dd", "if=/dev/urandom", "of=" + m.path("disk.img"), "bs=1M",
                            "count=32", "conv=notrunc,fsync", "oflag=direct"],
                           capture_output=True, text=True, timeout=60)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("No space left on device", p.stderr)
        # Nothing else broke: the mount still reads, and unmounts; its exit
        # status is 1 if writes failed through it (STATUS says).
        with open(m.path("disk.img"), "rb") as f, open(img, "rb") as g:
            self.assertEqual(f.read(MiB), g.read(MiB))
        self.assertEqual(m.unmount(), status)

    def test_disk_full_reaches_the_writer_as_enospc(self):
        self.disk_full(1)

    def test_disk_full_with_passthrough_writes(self):
        """The same when the kernel writes the image itself (--passthrough=all):
        it tells the writer alone, so the mount never saw a failed write."""
        self.disk_full(0 if nbdfs_test.passthrough_expected() else 1, "--passthrough=all")

    def test_eight_parallel_writers_lose_nothing(self):
        size, writers = 64 * MiB, 8
        region = size // writers
        img = nbdfs_test.make_image(self.path("disk.img"), size)
        m = self.mount(img)
        shadows = [bytearray(region) for _ in range(writers)]
        errors = []

        def writer(i):
            rnd = random.Random(i)
            base = i * region
            fd = os.open(m.path("disk.img"), os.O_RDWR)
            try:
                for n in range(300):
                    off = rnd.randrange(0, region - 4096) // 512 * 512
                    length = min(rnd.choice((512, 4096, 65536, 1 << 20)), region - off)
                    data = rnd.randbytes(length)
                    os.pwrite(fd, data, base + off)
                    shadows[i][off:off + length] = data
                    if n % 25 == 0:
                        os.fsync(fd)
                        roff = rnd.randrange(0, region - 65536)
                        if os.pread(fd, 65536, base + roff) != shadows[i][roff:roff + 65536]:
                            errors.append("writer %d: read back differs at %d" % (i, base + roff))
                            return
                os.fsync(fd)
            except OSError as e:
                errors.append("writer %d: %s" % (i, e))
            finally:
                os.close(fd)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertFalse(any(t.is_alive() for t in threads), "a writer hung")
        self.assertEqual(errors, [])
        with open(m.path("disk.img"), "rb") as f:
            for i in range(writers):
                self.assertEqual(f.read(region), bytes(shadows[i]), "region %d via the mount" % i)
        m.unmount()
        with open(img, "rb") as f:
            for i in range(writers):
                self.assertEqual(f.read(region), bytes(shadows[i]), "region %d in the image" % i)

    def test_reconnect_refuses_an_export_of_another_size(self):
        img = nbdfs_test.make_image(self.path("disk.img"), 16 * MiB, [(0, b"a" * MiB)])
        srv = self.start_qemu_nbd(img)
        m = self.mount(srv.uri())
        fd = os.open(m.path("disk"), os.O_RDONLY | os.O_DIRECT)
        self.addCleanup(os.close, fd)
        srv.stop(signal.SIGKILL)
        os.unlink(srv.sock)
        other = nbdfs_test.make_image(self.path("other.img"), 32 * MiB, [(0, b"b" * MiB)])
        srv2 = self.start_qemu_nbd(other)
        self.assertEqual(srv2.sock, srv.sock)
        # Several back-off rounds later, the mount still refuses the other export.
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            with self.assertRaises(OSError) as cm:
                os.pread(fd, 4096, 0)
            self.assertEqual(cm.exception.errno, errno.EIO)
            time.sleep(0.5)
        try:
            self.assertEqual(os.stat(m.path("disk")).st_size, 16 * MiB)
        except OSError as e:       # no connection: attributes fail too, they never change
            self.assertEqual(e.errno, errno.EIO)


if __name__ == "__main__":
    nbdfs_test.main()
