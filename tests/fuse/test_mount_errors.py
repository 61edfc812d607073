#!/usr/bin/python3
"""Bad input to nbdfs mount: one clear line naming the culprit, a non-zero
exit, and no mount (nor daemon) left behind."""
import os
import subprocess

import nbdfs_test as t

MiB = 1 << 20


class MountErrorTest(t.TestCase):

    def setUp(self):
        super().setUp()
        self.image = t.make_image(self.path("disk.img"), 4 * MiB)
        self.mnt = self.path("mnt")
        os.mkdir(self.mnt)

    def assert_refused(self, argv, *culprits, mountpoint=None):
        """ARGV fails with one line 'nbdfs mount: ...' naming each of CULPRITS."""
        mountpoint = mountpoint or self.mnt
        p = t.run([t.NBDFS, "mount", *argv], check=False)
        self.addCleanup(t.unmount, mountpoint)
        self.assertNotEqual(p.returncode, 0, p.stderr)
        lines = p.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, "one line expected:\n" + p.stderr)
        self.assertTrue(lines[0].startswith("nbdfs mount: "), lines[0])
        for culprit in culprits:
            self.assertIn(culprit, lines[0])
        self.assertEqual(p.stdout, "")
        if os.path.isdir(mountpoint):
            self.assertFalse(t.is_mounted(mountpoint))
        self.assertEqual(t.mount_pids(mountpoint), [])
        return lines[0]

    def test_missing_image(self):
        missing = self.path("missing.img")
        self.assert_refused([missing, self.mnt], missing, "No such file")

    def test_image_is_a_directory(self):
        self.assert_refused([self.tmp, self.mnt], self.tmp)

    def test_image_in_use(self):
        srv = self.start_nbdfs([self.image])
        self.assertTrue(srv.alive())
        self.assert_refused([self.image, self.mnt], self.image, "in use")

    def test_missing_mountpoint(self):
        missing = self.path("nowhere")
        self.assert_refused([self.image, missing], missing, "No such file", mountpoint=missing)

    def test_mountpoint_not_a_directory(self):
        self.assert_refused([self.image, self.image], self.image, "not a directory",
                            mountpoint=self.image)

    def test_unknown_option(self):
        self.assert_refused(["--bogus", self.image, self.mnt], "--bogus")

    def test_bad_fuse_option(self):
        self.assert_refused(["-o", "no_such_fuse_option", self.image, self.mnt],
                            "no_such_fuse_option")

    def test_bad_connections(self):
        self.assert_refused(["-C", "0", self.image, self.mnt], "--connections")

    def test_reserved_name(self):
        self.assert_refused(["--name", "dirty", self.image, self.mnt], "--name", "dirty")

    def test_missing_arguments(self):
        self.assert_refused([self.image], "expected SOURCE MOUNTPOINT")

    def test_server_unreachable(self):
        sock = self.path("nobody.sock")
        uri = "nbd+unix:///?socket=" + sock
        self.assert_refused([uri, self.mnt], uri, "connect")

    def test_tcp_refused(self):
        uri = "nbd://127.0.0.1:1/"
        self.assert_refused([uri, self.mnt], uri)

    def test_bad_uri(self):
        uri = "nbd+unix:///disk"               # a unix socket URI needs socket=
        self.assert_refused([uri, self.mnt], uri)

    def test_unknown_scheme(self):
        uri = "http://127.0.0.1/disk"
        self.assert_refused([uri, self.mnt], uri)

    def test_no_such_export(self):
        srv = self.start_nbdfs([self.image])
        uri = srv.uri("nonesuch")
        self.assert_refused([uri, self.mnt], uri, "no such export")

    def test_not_an_nbd_server(self):
        # A socket that accepts and hangs up at once: the handshake fails, it does not hang.
        import socket
        import threading
        sock = self.path("mute.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(sock)
        s.listen(8)
        self.addCleanup(s.close)

        def hang_up():
            while True:
                try:
                    c, _ = s.accept()
                except OSError:
                    return
                c.sendall(b"HELLO, I am not NBD\n")
                c.close()
        threading.Thread(target=hang_up, daemon=True).start()
        uri = "nbd+unix:///?socket=" + sock
        self.assert_refused([uri, self.mnt], uri)

    def test_mountpoint_busy(self):
        m = self.mount(self.image, "-r")
        self.assertTrue(t.is_mounted(m.mountpoint))
        p = t.run([t.NBDFS, "mount", "-r", self.image, self.mnt], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        self.assertTrue(p.stderr.startswith("nbdfs mount: "), p.stderr)
        # The first mount is untouched.
        self.assertEqual(m.files(), ["dirty", "disk.img"])


if __name__ == "__main__":
    t.main()
