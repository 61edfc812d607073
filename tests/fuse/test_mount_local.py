#!/usr/bin/python3
"""nbdfs mount of a local raw image (the bundled server in-process) and of an
'nbdfs serve' URI: bytes, holes, allocation, writes, read-only, unmount."""
import concurrent.futures
import contextlib
import errno
import filecmp
import mmap
import os
import random
import signal
import subprocess
import time

import nbdfs_test as t

MiB = 1 << 20
SIZE = 64 * MiB


def layout():
    """Data extents of the test image: (offset, length), all 4 KiB aligned."""
    runs = [(1 * MiB, 64 << 10), (10 * MiB, 4096), (20 * MiB, 4 * MiB)]
    runs += [(32 * MiB + k * (64 << 10), 4096) for k in range(256)]
    runs.append((SIZE - 4096, 4096))
    return runs


def make_test_image(path, seed=1):
    rnd = random.Random(seed)
    return t.make_image(path, SIZE, [(off, rnd.randbytes(n)) for off, n in layout()])


def allocated_bytes(entries):
    """Bytes of an nbdinfo base:allocation map without the hole bit."""
    return sum(e["length"] for e in entries if not e["type"] & 1)


def is_data(status):
    return not status & 2          # a range reading as zeros counts as a hole


def continue_process(pid):
    """SIGCONT to PID, if it is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


class LocalImageTest(t.TestCase):

    def setUp(self):
        super().setUp()
        self.image = make_test_image(self.path("disk.img"))

    def served_map(self, image):
        """nbdinfo --map of IMAGE through 'nbdfs serve' (of a copy: the mount locks it)."""
        copy = self.path("served-" + os.path.basename(image))
        t.run(["cp", "--sparse=always", image, copy])
        srv = self.start_nbdfs([copy], "-r", name="map-server")
        entries = t.nbdinfo_map(srv.uri())
        srv.stop()
        return entries

    def test_tree_name_and_bytes(self):
        m = self.mount(self.image)
        self.assertEqual(m.files(), ["dirty", "disk.img"])
        self.assertEqual(os.listdir(m.path("dirty")), [])
        st = os.stat(m.path("disk.img"))
        self.assertEqual(st.st_size, SIZE)
        self.assertEqual(st.st_mode & 0o777, 0o644)
        self.assertTrue(filecmp.cmp(m.path("disk.img"), self.image, shallow=False))

    def test_lseek_walk_and_st_blocks(self):
        entries = self.served_map(self.image)
        m = self.mount(self.image)
        walk = t.data_extents_by_lseek(m.path("disk.img"))
        self.assertEqual(walk, t.data_extents_by_lseek(self.image))
        self.assertEqual(walk, t.data_extents_of_map(entries, is_data))
        self.assertEqual(walk, layout()[:2] + [layout()[2]] + layout()[3:])
        st = os.stat(m.path("disk.img"))
        self.assertEqual(st.st_blocks * 512, allocated_bytes(entries))
        # Past the end there is nothing, as for any file.
        fd = os.open(m.path("disk.img"), os.O_RDONLY)
        try:
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                with self.assertRaises(OSError) as cm:
                    os.lseek(fd, SIZE, whence)
                self.assertEqual(cm.exception.errno, errno.ENXIO)
            self.assertEqual(os.lseek(fd, 2 * MiB, os.SEEK_DATA), 10 * MiB)
            self.assertEqual(os.lseek(fd, 20 * MiB + 100, os.SEEK_HOLE), 24 * MiB)
        finally:
            os.close(fd)

    def test_sparse_copy(self):
        m = self.mount(self.image)
        # On tmpfs, st_blocks counts data pages alone (ext4 adds extent-tree
        # blocks for a file of 260 extents, depending on how it allocated).
        out = os.path.join(self.small_tmpfs("copy", "128m"), "copy.img")
        t.run(["cp", "--sparse=always", m.path("disk.img"), out])
        self.assertTrue(filecmp.cmp(out, self.image, shallow=False))
        self.assertEqual(t.data_extents_by_lseek(out), t.data_extents_by_lseek(self.image))
        data = sum(n for _, n in layout())
        self.assertEqual(os.stat(out).st_blocks * 512, data)
        du = t.run(["du", "-B1", out]).stdout.split()[0]
        self.assertEqual(int(du), data)

    def test_write_punch_zero_land_in_image(self):
        m = self.mount(self.image)
        f = m.path("disk.img")
        rnd = random.Random(5)
        new = rnd.randbytes(256 << 10)
        fd = os.open(f, os.O_RDWR)
        try:
            # A write into a hole the mount has seen: its caches must let go of it.
            self.assertEqual(os.lseek(fd, 49 * MiB, os.SEEK_DATA), SIZE - 4096)
            os.pwrite(fd, new, 50 * MiB)
            os.fsync(fd)
            self.assertEqual(os.lseek(fd, 49 * MiB, os.SEEK_DATA), 50 * MiB)
            # A punch reads back as zeros and deallocates; a zero range reads zeros.
            t.fallocate(fd, t.FALLOC_FL_PUNCH_HOLE | t.FALLOC_FL_KEEP_SIZE, 21 * MiB, MiB)
            t.fallocate(fd, t.FALLOC_FL_ZERO_RANGE | t.FALLOC_FL_KEEP_SIZE, 1 * MiB, 64 << 10)
            self.assertEqual(os.pread(fd, MiB, 21 * MiB), bytes(MiB))
            self.assertEqual(os.pread(fd, 64 << 10, 1 * MiB), bytes(64 << 10))
            self.assertEqual(os.lseek(fd, 21 * MiB, os.SEEK_HOLE), 21 * MiB)
        finally:
            os.close(fd)
        with open(self.image, "rb") as img:
            img.seek(50 * MiB)
            self.assertEqual(img.read(len(new)), new)
            img.seek(21 * MiB)
            self.assertEqual(img.read(MiB), bytes(MiB))
            img.seek(1 * MiB)
            self.assertEqual(img.read(64 << 10), bytes(64 << 10))
        # The mount's view of holes follows the image's after all that.
        walk = t.data_extents_by_lseek(self.image)
        self.assertEqual(t.data_extents_by_lseek(f), walk)
        self.assertEqual(os.stat(f).st_blocks * 512, sum(n for _, n in walk))

    def test_size_is_fixed(self):
        m = self.mount(self.image)
        os.truncate(m.path("disk.img"), SIZE)
        for size in (0, SIZE - 4096, SIZE + 4096):
            with self.assertRaises(OSError) as cm:
                os.truncate(m.path("disk.img"), size)
            self.assertIn(cm.exception.errno, (errno.EPERM, errno.EINVAL))
        self.assertEqual(os.stat(m.path("disk.img")).st_size, SIZE)
        # Writing at the end cannot grow it either.
        fd = os.open(m.path("disk.img"), os.O_WRONLY)
        try:
            with self.assertRaises(OSError) as cm:
                os.pwrite(fd, b"x" * 4096, SIZE)
            self.assertIn(cm.exception.errno, (errno.ENOSPC, errno.EFBIG))
        finally:
            os.close(fd)

    def test_read_only_option(self):
        before = os.stat(self.image).st_mtime_ns
        m = self.mount(self.image, "-r")
        f = m.path("disk.img")
        self.assertEqual(os.stat(f).st_mode & 0o777, 0o444)
        for flags in (os.O_WRONLY, os.O_RDWR):
            with self.assertRaises(OSError) as cm:
                os.open(f, flags)
            self.assertEqual(cm.exception.errno, errno.EROFS)
        with self.assertRaises(OSError) as cm:
            os.truncate(f, SIZE)
        self.assertEqual(cm.exception.errno, errno.EROFS)
        self.assertTrue(filecmp.cmp(f, self.image, shallow=False))
        m.unmount()
        self.assertEqual(os.stat(self.image).st_mtime_ns, before)

    def with_daemon_stopped(self, m, fd, io, expect_finished):
        """Stop the mount's daemon and call IO() in a thread.  Returns
        (finished while stopped?, its result, once the daemon goes on if it
        had to wait).  I/O that needs no daemon may take long on a loaded
        machine (EXPECT_FINISHED: wait 30 s); one that does never finishes,
        so a short wait shows it."""
        pid = m.process.proc.pid if m.process else m.pids[0]
        pool = concurrent.futures.ThreadPoolExecutor(1)
        self.addCleanup(pool.shutdown)
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(continue_process, pid)
        future = pool.submit(io)
        try:
            result = future.result(timeout=30 if expect_finished else 3)
            finished = True
        except concurrent.futures.TimeoutError:
            finished = False
        os.kill(pid, signal.SIGCONT)
        if not finished:
            result = future.result(timeout=30)
        return finished, result

    def reads_with_daemon_stopped(self, m, name, offsets, expect_finished):
        """Open NAME and pread 1 MiB at each of OFFSETS (never read before)
        with the daemon stopped: (finished while stopped?, the bytes)."""
        fd = os.open(m.path(name), os.O_RDONLY)
        self.addCleanup(os.close, fd)
        return self.with_daemon_stopped(
            m, fd, lambda: [os.pread(fd, MiB, off) for off in offsets], expect_finished)

    def test_read_only_passthrough(self):
        """A read-only local raw image: with FUSE passthrough the kernel reads
        the image itself, so reads go on while the daemon is stopped; without
        it (an older libfuse or kernel) they wait for it and are then right."""
        offsets = [20 * MiB, 22 * MiB, 1 * MiB]
        with open(self.image, "rb") as f:
            expected = [os.pread(f.fileno(), MiB, off) for off in offsets]
            tail = os.pread(f.fileno(), 4096, SIZE - 4096)
        passthrough = t.passthrough_expected()
        m = self.mount(self.image, "-r")
        finished, data = self.reads_with_daemon_stopped(m, "disk.img", offsets, passthrough)
        self.assertEqual(finished, passthrough)
        self.assertEqual(data, expected)
        # mmap of a passthrough file maps the image's pages.
        with open(m.path("disk.img"), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            self.assertEqual(mm[20 * MiB:21 * MiB], expected[0])
            self.assertEqual(mm[SIZE - 4096:], tail)
        # lseek still comes to nbdfs, which answers from the server's block status.
        self.assertEqual(t.data_extents_by_lseek(m.path("disk.img")),
                         t.data_extents_by_lseek(self.image))

    def test_passthrough_off(self):
        """--passthrough=off: every read of a read-only image goes through nbdfs."""
        m = self.mount(self.image, "-r", "--passthrough=off")
        finished, data = self.reads_with_daemon_stopped(m, "disk.img", [20 * MiB], False)
        self.assertFalse(finished, "a read finished while nbdfs was stopped")
        with open(self.image, "rb") as f:
            self.assertEqual(data, [os.pread(f.fileno(), MiB, 20 * MiB)])

    def test_passthrough_option_errors(self):
        mnt = self.path("mnt-bad")
        os.mkdir(mnt)
        for args, message in ((["--passthrough=fast", self.image], "'fast' is not reads, all or off"),
                              (["--passthrough=all", "nbd://localhost/x"], "only for a local raw image")):
            p = t.run([t.NBDFS, "mount"] + args + [mnt], check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn("--passthrough: " + message, p.stderr)
        self.assertFalse(t.is_mounted(mnt))

    def test_writable_passthrough(self):
        """--passthrough=all, a writable local raw image with no bitmap
        enabled: the kernel writes it too (while the daemon is stopped),
        lseek and st_blocks see those writes at once, and no bitmap may be
        enabled meanwhile."""
        t.run([t.NBDFS, "bitmap", "add", self.image, "off"])
        t.run([t.NBDFS, "bitmap", "disable", self.image, "off"])
        passthrough = t.passthrough_expected()
        m = self.mount(self.image, "--passthrough=all")
        with open(m.path("disk.img"), "r+b", buffering=0) as f:
            fd = f.fileno()
            # The first write asks nbdfs once for security.capability (kernel's
            # file_remove_privs); later ones need nothing from it.
            os.pwrite(fd, b"\x01" * 4096, 0)
            data = random.Random(7).randbytes(MiB)
            finished, back = self.with_daemon_stopped(
                m, fd, lambda: (os.pwrite(fd, data, 52 * MiB), os.pread(fd, MiB, 52 * MiB))[1],
                passthrough)
            self.assertEqual(finished, passthrough)
            self.assertEqual(back, data)
            # The new extent (in a hole) is data for lseek and st_blocks at once, as in the image.
            self.assertEqual(os.lseek(fd, 49 * MiB, os.SEEK_DATA), 52 * MiB)
            self.assertEqual(os.lseek(fd, 52 * MiB, os.SEEK_HOLE), 53 * MiB)
            image_extents = t.data_extents_by_lseek(self.image)
            self.assertEqual(t.data_extents_by_lseek(m.path("disk.img")), image_extents)
            # Written past nbdfs, the file counts the image's own blocks (one
            # fstat, not a walk of its extents); else its data extents.
            self.assertEqual(os.stat(m.path("disk.img")).st_blocks,
                             os.stat(self.image).st_blocks if passthrough
                             else sum(n for _, n in image_extents) // 512)
            # Enabling a bitmap now would miss those writes: refused, naming the way out.
            for cmd in (["add", self.image, "b1"], ["enable", self.image, "off"]):
                p = t.run([t.NBDFS, "bitmap"] + cmd, check=False)
                if passthrough:
                    self.assertNotEqual(p.returncode, 0)
                    self.assertIn("is mounted on %s with --passthrough=all" % m.mountpoint, p.stderr)
                else:
                    self.assertEqual(p.returncode, 0, p.stderr)
            os.fsync(fd)
        m.unmount()
        with open(self.image, "rb") as f:
            self.assertEqual(os.pread(f.fileno(), MiB, 52 * MiB), data)
        t.run([t.NBDFS, "bitmap", "add", self.image, "b2"])

    def test_writable_passthrough_fsync_and_lock(self):
        """--passthrough=all: fsync makes the server sync the image (the
        kernel's writes never reach nbdfs, its fsync does), st_blocks comes
        from the image's own (no walk of its extents), and a file left open
        when the mount's process is killed keeps the image locked."""
        passthrough = t.passthrough_expected()
        m = self.mount(self.image, "--passthrough=all")
        pid = m.process.proc.pid if m.process else m.pids[0]
        trace = self.path("strace.out")
        # Opened first: the first open hands the image to the kernel (until
        # then, a stat counts the image's extents through block status).
        fd = os.open(m.path("disk.img"), os.O_RDWR)
        try:
            tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=fdatasync,lseek",
                                       "-o", trace, "-p", str(pid)], stderr=subprocess.DEVNULL)
            self.addCleanup(tracer.wait, 10)
            self.addCleanup(tracer.terminate)
            # strace attaches to every thread before it writes anything; give it a second.
            time.sleep(1)
            os.pwrite(fd, b"\x05" * 4096, 52 * MiB)
            os.fsync(fd)
            # Past the kernel's attribute timeout (1 s): stat asks nbdfs again.
            time.sleep(1.2)
            blocks = os.stat(m.path("disk.img")).st_blocks
            tracer.terminate()
            tracer.wait(10)
            with open(trace) as f:
                calls = f.read()
            self.assertIn("fdatasync(", calls)
            # Without passthrough st_blocks is counted from block status,
            # which the server answers with SEEK_DATA/SEEK_HOLE on the image.
            self.assertEqual("SEEK_DATA" in calls, not passthrough, calls)
            self.assertEqual(blocks, os.stat(self.image).st_blocks if passthrough
                             else sum(n for _, n in t.data_extents_by_lseek(self.image)) // 512)
            if passthrough:
                os.kill(pid, signal.SIGKILL)
                t.wait_for(lambda: t.pid_exited(pid), what="the mount's process to end")
                p = t.run(["flock", "-n", "-x", self.image, "true"], check=False)
                self.assertEqual(p.returncode, 1, "the image is not locked any more")
                os.pwrite(fd, b"\x06" * 4096, 56 * MiB)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        if passthrough:
            t.unmount(m.mountpoint)
        with open(self.image, "rb") as f:
            self.assertEqual(os.pread(f.fileno(), 4096, 52 * MiB), b"\x05" * 4096)

    def test_image_shrunk_under_the_mount_reads_zeros(self):
        """The FUSE threads read a local image themselves; an image another
        program shrinks reads as zeros past its new end, as the server
        sends, and never as a short read (the kernel would take that for
        the end of the file and shrink it)."""
        for args in (["--passthrough=off", "-r"], []):
            with self.subTest(args=args):
                image = make_test_image(self.path("shrunk-%d.img" % len(args)))
                m = self.mount(image, *args, mountpoint=self.path("mnt-%d" % len(args)))
                name = m.path(os.path.basename(image))
                size = os.stat(name).st_size
                os.truncate(image, size // 2)
                with open(name, "rb", buffering=0) as f:
                    # Not from the page cache: the read must reach nbdfs.
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    self.assertEqual(os.pread(f.fileno(), 8192, size - 8192), bytes(8192))
                    self.assertEqual(os.fstat(f.fileno()).st_size, size)
                m.unmount()

    def test_enabled_bitmap_keeps_writes_in_nbdfs(self):
        """With a bitmap enabled every write must mark it: even with
        --passthrough=all, a write waits for a stopped daemon (and is then
        marked); so does one of a writable mount by default."""
        t.run([t.NBDFS, "bitmap", "add", self.image, "b0"])
        for args, offset in ((["--passthrough=all"], 40 * MiB), ([], 48 * MiB)):
            m = self.mount(self.image, *args)
            fd = os.open(m.path("disk.img"), os.O_RDWR)
            try:
                os.pwrite(fd, b"\x01" * 4096, 0)
                finished, _ = self.with_daemon_stopped(
                    m, fd, lambda: os.pwrite(fd, b"\x02" * 65536, offset), False)
                self.assertFalse(finished, "a write finished while nbdfs was stopped "
                                 "(mount options %s)" % args)
                os.fsync(fd)
                with open(m.path("dirty", "b0.map")) as f:
                    self.assertIn("%d 65536\n" % offset, f.read())
            finally:
                os.close(fd)
            m.unmount()

    def test_read_only_export(self):
        srv = self.start_nbdfs([self.image], "-r")
        m = self.mount(srv.uri())
        self.assertEqual(m.files(), ["dirty", "disk"])
        with self.assertRaises(OSError) as cm:
            os.open(m.path("disk"), os.O_WRONLY)
        self.assertEqual(cm.exception.errno, errno.EROFS)

    def test_name_option(self):
        m = self.mount(self.image, "--name", "vm.raw")
        self.assertEqual(m.files(), ["dirty", "vm.raw"])
        self.assertTrue(filecmp.cmp(m.path("vm.raw"), self.image, shallow=False))

    def test_foreground_unmount_exit_status(self):
        m = self.mount(self.image, foreground=True)
        self.assertTrue(filecmp.cmp(m.path("disk.img"), self.image, shallow=False))
        self.assertEqual(m.unmount(), 0)
        self.assertEqual(os.listdir(m.mountpoint), [])

    def test_background_umount(self):
        m = self.mount(self.image)
        if not m.process:          # (all mounts run in the foreground under valgrind)
            self.assertEqual(len(m.pids), 1, "one daemon serves the mount")
        t.run(["umount", m.mountpoint])
        self.assertEqual(m.unmount(), 0)   # waits for the daemon to go away
        self.assertEqual(os.listdir(m.mountpoint), [])
        # The image is free again: another mount may lock it.
        m2 = self.mount(self.image, mountpoint=self.path("mnt2"))
        self.assertEqual(m2.files(), ["dirty", "disk.img"])

    def test_serve_uri_matches_nbdinfo(self):
        srv = self.start_nbdfs([self.image])
        uri = srv.uri("disk.img")
        m = self.mount(uri)
        self.assertEqual(m.files(), ["dirty", "disk.img"])
        self.assertTrue(filecmp.cmp(m.path("disk.img"), self.image, shallow=False))
        entries = t.nbdinfo_map(uri)
        self.assertEqual(t.data_extents_by_lseek(m.path("disk.img")),
                         t.data_extents_of_map(entries, is_data))
        self.assertEqual(os.stat(m.path("disk.img")).st_blocks * 512, allocated_bytes(entries))

    def test_bundled_server_bitmap(self):
        t.run([t.NBDFS, "bitmap", "add", self.image, "b0"])
        m = self.mount(self.image)
        self.assertEqual(sorted(os.listdir(m.path("dirty"))), ["b0.img", "b0.json", "b0.map"])
        with open(m.path("dirty", "b0.map")) as f:
            self.assertEqual(f.read(), "")
        fd = os.open(m.path("disk.img"), os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x77" * 4096, 5 * MiB + 4096)
            os.pwrite(fd, b"\x78" * (128 << 10), 40 * MiB)
        finally:
            os.close(fd)
        with open(m.path("dirty", "b0.map")) as f:
            self.assertEqual(f.read(), "%d %d\n%d %d\n" % (5 * MiB, 64 << 10, 40 * MiB, 128 << 10))
        with open(m.path("dirty", "b0.json")) as f:
            seen = f.read()
        self.assertEqual(os.stat(m.path("dirty", "b0.img")).st_blocks * 512, 192 << 10)
        m.unmount()
        # The bitmap outlives the mount (cleanly closed: not all dirty), and the
        # server's own view of it is what the mount showed, byte for byte.
        srv = self.start_nbdfs([self.image], "-r")
        want = t.run(["nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json", srv.uri()]).stdout
        self.assertEqual(seen, want)

    def test_permissions_with_allow_other(self):
        m = self.mount(self.image, "-o", "allow_other")
        os.chmod(self.tmp, 0o755)

        def as_nobody(script):
            return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup",
                                   "--clear-groups", "sh", "-c", script, "sh",
                                   m.path("disk.img")],
                                  capture_output=True, text=True, timeout=30)
        # Others may read the 0644 export, not write it.
        p = as_nobody('head -c 4096 "$1" | wc -c')
        self.assertEqual(p.stdout.strip(), "4096", p.stderr)
        p = as_nobody('printf x | dd of="$1" conv=notrunc status=none')
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("Permission denied", p.stderr)
        p = as_nobody('test -w "$1"')
        self.assertNotEqual(p.returncode, 0)
        p = as_nobody('truncate -s 1M "$1"')
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(os.stat(m.path("disk.img")).st_size, SIZE)

    def test_parallel_direct_io_on_connections(self):
        m = self.mount(self.image, "-C", "4")
        with open(self.image, "rb") as f:
            expect = f.read()
        rnd = random.Random(9)
        blocks = [rnd.randrange(0, SIZE // 4096) * 4096 for _ in range(400)]

        def check(off):
            fd = os.open(m.path("disk.img"), os.O_RDONLY | os.O_DIRECT)
            try:
                buf = mmap.mmap(-1, 65536)     # O_DIRECT wants an aligned buffer
                n = os.preadv(fd, [buf], off)
                return off, bytes(buf[:n])
            finally:
                os.close(fd)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for off, data in pool.map(check, blocks):
                self.assertEqual(data, expect[off:off + len(data)], "at %d" % off)


if __name__ == "__main__":
    t.main()
