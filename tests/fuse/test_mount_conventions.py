#!/usr/bin/python3
"""The conventions of Linux mounts: 'mount -t fuse.nbdfs' with -o options, an
fstab line (mount -T), the mount.fuse3 route, umount(8), and the systemd
units of examples/systemd checked with systemd-analyze verify."""
import errno
import os
import shutil

import nbdfs_test as t
from nbdfs_test import NBDFS, run

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = os.path.join(HERE, "..", "..", "examples", "systemd")
HELPER = "/sbin/mount.fuse.nbdfs"


class MountConventionsTest(t.TestCase):

    def setUp(self):
        super().setUp()
        self.image = t.make_image(self.path("disk.img"), 16 * MiB, [(MiB, b"fstab" * 100)])
        self.srv = self.start_nbdfs([self.image], "-r")
        self.mnt = self.path("mnt")
        os.mkdir(self.mnt)
        self.addCleanup(t.unmount, self.mnt)

    def install_helper(self):
        """mount(8) runs /sbin/mount.fuse.nbdfs ('meson install' puts it there): for the
        test, a link to the nbdfs under test, removed afterwards."""
        if os.path.lexists(HELPER):
            if os.path.realpath(HELPER) != os.path.realpath(NBDFS):
                self.skipTest("%s belongs to another nbdfs" % HELPER)
            return
        os.symlink(NBDFS, HELPER)
        self.addCleanup(os.unlink, HELPER)

    def check_mounted(self, name="disk", read_only=True):
        self.assertTrue(t.is_mounted(self.mnt))
        self.assertEqual(sorted(os.listdir(self.mnt)), sorted(["dirty", name]))
        with open(os.path.join(self.mnt, name), "rb") as f:
            f.seek(MiB)
            self.assertEqual(f.read(5), b"fstab")
        if read_only:
            with self.assertRaises(OSError) as cm:
                open(os.path.join(self.mnt, name), "r+b")
            self.assertEqual(cm.exception.errno, errno.EROFS)

    def umount(self):
        pids = t.mount_pids(self.mnt) or []
        run(["umount", self.mnt])
        t.wait_pids_gone(pids)
        self.assertFalse(t.is_mounted(self.mnt))

    def test_mount_t_with_options(self):
        self.install_helper()
        run(["mount", "-t", "fuse.nbdfs", self.srv.uri(), self.mnt, "-o",
             "ro,name=disk.raw,timeout=5,connections=2,allow_other,_netdev,nofail,"
             "x-systemd.automount,defaults"])
        self.check_mounted("disk.raw")
        with open("/proc/self/mountinfo") as f:
            line = [l for l in f if " %s " % self.mnt in l][0]
        self.assertIn("allow_other", line)
        self.umount()
        # Options mean what the long options mean, errors included.
        p = run(["mount", "-t", "fuse.nbdfs", self.srv.uri(), self.mnt, "-o", "timeout=0"],
                check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("--timeout: must be between 1 and", p.stderr)

    def test_fstab_line(self):
        self.install_helper()
        fstab = self.path("fstab")
        with open(fstab, "w") as f:
            f.write("# an fstab line\n%s %s fuse.nbdfs defaults,_netdev,ro 0 0\n"
                    % (self.srv.uri(), self.mnt))
        run(["mount", "-T", fstab, self.mnt])
        self.check_mounted()
        self.umount()

    def test_fstab_line_with_every_export(self):
        self.install_helper()
        other = t.make_image(self.path("other.img"), MiB)
        srv = self.start_nbdfs([self.image, other], "-r", name="two")
        fstab = self.path("fstab")
        with open(fstab, "w") as f:
            f.write("%s %s fuse.nbdfs all,ro 0 0\n" % (srv.uri(), self.mnt))
        run(["mount", "-T", fstab, self.mnt])
        self.assertEqual(sorted(os.listdir(self.mnt)), ["disk.img", "other.img"])
        with open(os.path.join(self.mnt, "disk.img", "disk.img"), "rb") as f:
            f.seek(MiB)
            self.assertEqual(f.read(5), b"fstab")
        self.umount()

    def test_mount_fuse3_route(self):
        # Without the helper, mount.fuse3 runs 'nbdfs SOURCE MOUNTPOINT -o OPTIONS' from PATH.
        env = dict(os.environ, PATH=os.path.dirname(NBDFS) + ":" + os.environ["PATH"])
        t.subprocess.run(["mount.fuse3", self.srv.uri(), self.mnt, "-o", "ro,name=x.img",
                          "-t", "fuse.nbdfs"], check=True, env=env, timeout=30)
        self.check_mounted("x.img")
        p = run([NBDFS, "umount", self.mnt])
        self.assertEqual(p.returncode, 0)

    def test_systemd_units_verify(self):
        units = self.path("units")
        os.mkdir(units)
        for name in sorted(os.listdir(UNITS)):
            with open(os.path.join(UNITS, name)) as f:
                text = f.read().replace("/usr/local/bin/nbdfs", NBDFS)
            target = name.replace("@.", "@disk.")
            with open(os.path.join(units, target), "w") as f:
                f.write(text)
        files = sorted(os.path.join(units, n) for n in os.listdir(units))
        self.assertEqual([os.path.basename(f) for f in files],
                         ["mnt-disk.mount", "nbdfs-serve@disk.service",
                          "nbdfs-serve@disk.socket"])
        p = run(["systemd-analyze", "verify", "--man=no", *files], check=False)
        self.assertEqual((p.returncode, p.stderr.strip()), (0, ""))


if __name__ == "__main__":
    t.main()
