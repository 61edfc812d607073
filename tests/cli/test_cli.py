"""The nbdfs command line: help, version, and every bad input to 'nbdfs serve'
giving one clear line that names the culprit, a non-zero exit and no change."""
import os
import socket
import stat

import nbd

import nbdfs_test
from nbdfs_test import NBDFS, run

MiB = 1024 * 1024


class TopLevel(nbdfs_test.TestCase):

    def test_help_and_version(self):
        p = run([NBDFS, "--help"])
        for sub in ("serve", "bitmap"):
            self.assertIn(sub, p.stdout)
        self.assertRegex(run([NBDFS, "--version"]).stdout,
                         r"^nbdfs \d+\.\d+\.\d+\nlibfuse \d+\.\d+\.\d+, FUSE passthrough "
                         r"(supported|unsupported \(libfuse < 3\.16\))\n$")
        self.assertIn("--socket", run([NBDFS, "serve", "--help"]).stdout)
        self.assertIn("granularity", run([NBDFS, "bitmap", "add", "--help"]).stdout)

    def test_bad_invocations(self):
        for args, message in (([], "Usage: nbdfs"),
                              (["frob"], "nbdfs: unknown subcommand 'frob'")):
            p = run([NBDFS, *args], check=False)
            self.assertEqual(p.returncode, 1)
            self.assertIn(message, p.stderr)


class ServeErrors(nbdfs_test.TestCase):

    def setUp(self):
        super().setUp()
        self.img = nbdfs_test.make_image(self.path("disk.img"), MiB, [(0, b"keep")])
        with open(self.img, "rb") as f:
            self.original = f.read()

    def check(self, args, message, timeout=10):
        p = run([NBDFS, "serve", *args], check=False, timeout=timeout)
        self.assertEqual(p.returncode, 1, p)
        self.assertIn(message, p.stderr)
        self.assertEqual(p.stderr.count("\n"), 1, "one line: %r" % p.stderr)
        self.assertTrue(p.stderr.startswith("nbdfs serve: "), p.stderr)
        with open(self.img, "rb") as f:
            self.assertEqual(f.read(), self.original)
        return p

    def test_bad_options_and_sources(self):
        sock = self.path("s.sock")
        other_dir = self.path("other")
        os.mkdir(other_dir)
        twin = nbdfs_test.make_image(os.path.join(other_dir, "disk.img"), MiB)
        fifo = self.path("fifo")
        os.mkfifo(fifo)
        cases = [
            ([], "no IMAGE given"),
            (["-U", sock, self.path("missing.img")], "missing.img: No such file or directory"),
            (["-U", sock, self.tmp], self.tmp + ": Is a directory"),
            (["-U", sock, fifo], "fifo: not a regular file or block device"),
            (["-U", sock, self.img, twin], "another image is already exported as 'disk.img'"),
            (["-p", "70000", self.img], "--port: '70000' is not a port number"),
            (["-p", "http", self.img], "--port: 'http' is not a port number"),
            (["-b", "127.0.0.1", self.img], "--bind needs --port"),
            (["--max-connections", "0", "-U", sock, self.img], "--max-connections: must be at least 1"),
            (["--handshake-limit", "-1", "-U", sock, self.img], "--handshake-limit"),
            (["--threads", "-2", "-U", sock, self.img], "--threads"),
            (["--bogus", self.img], "Unknown option --bogus"),
            (["-U", self.path("no/such/dir/s.sock"), self.img], "No such file or directory"),
            (["-U", "/tmp/" + "x" * 120, self.img], "socket path is too long"),
            (["-U", self.img, self.img], "exists and is not a socket"),
            (["--tls=off", "-p", "1", "-b", "203.0.113.77", self.img], "203.0.113.77:1"),
            (["--pid-file", self.path("no/dir/pid"), "-U", sock, self.img], "--pid-file"),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                self.check(args, message)
                self.assertFalse(os.path.exists(sock), "socket left behind")

    def test_read_only_file_system_suggests_read_only(self):
        ro = self.small_tmpfs("ro", "4m")
        img = nbdfs_test.make_image(os.path.join(ro, "ro.img"), MiB)
        run(["mount", "-o", "remount,ro", ro])
        p = run([NBDFS, "serve", "-U", self.path("s.sock"), img], check=False, timeout=10)
        self.assertEqual(p.returncode, 1)
        self.assertIn("ro.img: Read-only file system (read-only access may work: -r)", p.stderr)
        srv = self.start_nbdfs([img], "-r")
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        self.assertTrue(h.is_read_only())
        h.shutdown()

    def test_busy_image_and_busy_socket(self):
        srv = self.start_nbdfs([self.img])
        self.check(["-U", self.path("b.sock"), self.img], "image is in use by another nbdfs process")
        self.check(["-U", srv.sock, nbdfs_test.make_image(self.path("x.img"), MiB)],
                   "a server is already listening there")
        self.assertTrue(srv.alive())

    def test_stale_socket_is_replaced(self):
        sock = self.path("stale.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(sock)
        s.close()                      # a socket file nobody listens on
        self.assertTrue(stat.S_ISSOCK(os.lstat(sock).st_mode))
        srv = nbdfs_test.Server([NBDFS, "serve", "-U", sock, self.img], sock,
                                self.path("stale.err"))
        self.addCleanup(self.stop_cleanly, srv)
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        self.assertEqual(h.pread(4, 0), b"keep")
        h.shutdown()

    def test_pid_file_and_fork(self):
        sock, pidfile = self.path("f.sock"), self.path("nbdfs.pid")
        run([NBDFS, "serve", "--fork", "--pid-file", pidfile, "-U", sock, self.img])
        # --fork returns only once the server listens and the pid file names it.
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(lambda: os.path.exists("/proc/%d" % pid) and os.kill(pid, 9))
        self.assertTrue(nbdfs_test.unix_socket_ready(sock))
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            self.assertIn(b"serve", f.read())
        os.kill(pid, 15)
        nbdfs_test.wait_for(lambda: not os.path.exists("/proc/%d" % pid), 10, "server exit")
        self.assertFalse(os.path.exists(pidfile), "pid file left behind")
        self.assertFalse(os.path.exists(sock), "socket left behind")


class LargeExport(nbdfs_test.TestCase):

    def test_one_tib_sparse_image(self):
        TiB = 1 << 40
        img = nbdfs_test.make_image(self.path("big.img"), TiB, [(TiB - 4096, b"end")])
        run([NBDFS, "bitmap", "add", img, "b0"])
        srv = self.start_nbdfs([img])
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        h.pwrite(b"x", 5 << 30)
        h.shutdown()
        out = run(["nbdinfo", "--map", srv.uri()]).stdout.split("\n")
        self.assertEqual(out[0].split(), ["0", str(5 << 30), "3", "hole,zero"])
        self.assertEqual(out[-2].split()[:3], [str(TiB - 4096), "4096", "0"])
        self.assertEqual(run(["nbdinfo", "--map=qemu:dirty-bitmap:b0", srv.uri()]).stdout.split(),
                         ["0", str(5 << 30), "0", "clean",
                          str(5 << 30), "65536", "1", "dirty",
                          str((5 << 30) + 65536), str(TiB - (5 << 30) - 65536), "0", "clean"])


if __name__ == "__main__":
    nbdfs_test.main()
