"""Faults around 'nbdfs serve': a killed server, killed clients, a full disk,
failing reads of the image, clients arriving during shutdown."""
import errno
import os
import signal
import socket
import struct
import subprocess
import time

import nbd

import nbdfs_test
from nbdfs_test import NBDFS, run

KiB, MiB = 1024, 1024 * 1024


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class ServerFaults(nbdfs_test.TestCase):

    def test_kill_9_loses_nothing_that_was_flushed(self):
        img = nbdfs_test.make_image(self.path("disk.img"), 64 * MiB)
        srv = self.start_nbdfs([img])
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        flushed = os.urandom(4 * MiB)
        h.pwrite(flushed[:2 * MiB], 0)
        h.pwrite(flushed[2 * MiB:], 2 * MiB, nbd.CMD_FLAG_FUA)
        h.flush()
        # Unflushed writes in flight while the server dies.
        for i in range(32):
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(os.urandom(64 * KiB))),
                         8 * MiB + i * 64 * KiB)
        srv.stop(signal.SIGKILL)
        with open(img, "rb") as f:
            self.assertEqual(f.read(4 * MiB), flushed)
        # The client sees the connection die, it does not hang.
        deadline = time.monotonic() + 5
        while h.aio_in_flight() > 0 and time.monotonic() < deadline:
            try:
                h.poll(100)
            except nbd.Error:
                break
        with self.assertRaises(nbd.Error):
            h.pread(512, 0)

    def test_killed_clients_leave_nothing_behind(self):
        img = nbdfs_test.make_image(self.path("disk.img"), 256 * MiB, [(0, os.urandom(MiB))])
        srv = self.start_nbdfs([img])
        script = (
            "import nbd, sys, time\n"
            "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
            "for i in range(64): h.aio_pread(nbd.Buffer(4 << 20), (i % 60) << 20)\n"
            "print('ready', flush=True); time.sleep(60)\n")
        baseline = None
        for round_ in range(6):
            p = subprocess.Popen(["/usr/bin/python3", "-c", script, srv.uri()],
                                 stdout=subprocess.PIPE, text=True)
            self.assertEqual(p.stdout.readline().strip(), "ready")
            p.kill()
            p.wait(10)
            if round_ == 1:
                time.sleep(0.5)
                baseline = rss_kib(srv.proc.pid)
        # Another client is unaffected.
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        with open(img, "rb") as f:
            self.assertEqual(h.pread(MiB, 0), f.read(MiB))
        h.shutdown()
        time.sleep(0.5)
        # Memory of the killed clients' requests (256 MiB each round) was given back.
        self.assertLess(rss_kib(srv.proc.pid), baseline + 64 * 1024)
        self.assertTrue(srv.alive())

    def test_a_client_that_stops_reading_stalls_only_itself(self):
        img = nbdfs_test.make_image(self.path("disk.img"), 64 * MiB, [(0, os.urandom(MiB))])
        srv = self.start_nbdfs([img], "--threads", "4")
        # Negotiate by hand, then ask for 256 MiB of reads and never read a reply.
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(srv.sock)
        s.recv(18, socket.MSG_WAITALL)
        s.sendall(struct.pack(">I", 3))
        s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))    # EXPORT_NAME ""
        s.recv(10, socket.MSG_WAITALL)
        s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 63) * MiB, MiB)
                           for i in range(256)))
        time.sleep(1)
        # Every worker thread would be stuck sending to it if replies blocked:
        # other clients must still be served promptly (bounded: a hang fails).
        with open(img, "rb") as f:
            want = f.read(MiB)
        for _ in range(3):
            start = time.monotonic()
            p = run(["nbdsh", "-u", srv.uri(), "-c",
                     "import sys; sys.stdout.buffer.write(h.pread(%d, 0))" % MiB],
                    timeout=10, text=False)
            self.assertEqual(p.stdout, want)
            self.assertLess(time.monotonic() - start, 5)
        s.close()

    def test_disk_full_is_enospc_and_nothing_else_breaks(self):
        mnt = self.small_tmpfs("small", "8m")
        img = nbdfs_test.make_image(os.path.join(mnt, "disk.img"), 64 * MiB)
        srv = self.start_nbdfs([img])
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        first = os.urandom(MiB)
        h.pwrite(first, 0)
        with self.assertRaises(nbd.Error) as cm:
            for i in range(1, 16):
                h.pwrite(os.urandom(MiB), i * MiB)
        self.assertEqual(cm.exception.errno, errno.errorcode[errno.ENOSPC])
        # Still serving: reads work and the first write is intact.
        self.assertEqual(h.pread(MiB, 0), first)
        h.flush()
        h.shutdown()

    def failing_image(self):
        """A file whose every read fails with EIO: nbdkit's error filter, mounted by nbdfuse."""
        ksock = self.path("k.sock")
        k = nbdfs_test.Server(["nbdkit", "-f", "-U", ksock, "--filter=error", "memory", "16M",
                               "error-pread-rate=1", "error-pread=EIO"], ksock,
                              self.path("nbdkit.err"))
        self.addCleanup(k.stop)
        mnt = self.path("fuse")
        os.mkdir(mnt)
        fuse = nbdfs_test.Process(["nbdfuse", mnt, "nbd+unix:///?socket=" + ksock],
                                  self.path("nbdfuse.err"))
        self.addCleanup(fuse.stop)
        self.addCleanup(subprocess.run, ["fusermount3", "-u", mnt], capture_output=True)
        bad = os.path.join(mnt, "nbd")
        nbdfs_test.wait_for(lambda: os.path.exists(bad), 10, "nbdfuse mount")
        return bad

    def test_read_errors_of_the_image_become_eio(self):
        srv = self.start_nbdfs([self.failing_image()], "-r")
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        with self.assertRaises(nbd.Error) as cm:
            h.pread(4096, 0)
        self.assertEqual(cm.exception.errno, errno.errorcode[errno.EIO])
        # The connection and the server survive.
        self.assertEqual(h.get_size(), 16 * MiB)
        with self.assertRaises(nbd.Error):
            h.pread(512, 8 * MiB)
        h.shutdown()
        self.assertTrue(srv.alive())

    def test_read_errors_of_a_read_only_local_mount_become_eio(self):
        # Such a mount reads the image itself, from its FUSE threads.
        m = self.mount(self.failing_image(), "-r", "--format", "raw")
        with open(m.path("nbd"), "rb", buffering=0) as f:
            for off in (0, 8 * MiB):
                with self.assertRaises(OSError) as cm:
                    os.pread(f.fileno(), 4096, off)
                self.assertEqual(cm.exception.errno, errno.EIO)
        self.assertEqual(m.unmount(), 0, m.messages)

    def test_clients_arriving_during_shutdown(self):
        img = nbdfs_test.make_image(self.path("disk.img"), MiB)
        srv = self.start_nbdfs([img])
        # One client parked in the handshake, one in transmission.
        parked = socket.socket(socket.AF_UNIX)
        parked.settimeout(10)
        parked.connect(srv.sock)
        self.assertEqual(parked.recv(18)[:8], b"NBDMAGIC")
        parked.sendall(struct.pack(">I", 3))
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        srv.proc.send_signal(signal.SIGTERM)
        # Shutdown ends both connections and the server exits cleanly, in time.
        self.assertEqual(srv.proc.wait(15), 0)
        self.assertFalse(os.path.exists(srv.sock))
        try:
            self.assertEqual(parked.recv(100), b"")
        except ConnectionResetError:
            pass
        with self.assertRaises(nbd.Error):
            h.pread(512, 0)
        # Nobody is listening any more.
        late = socket.socket(socket.AF_UNIX)
        with self.assertRaises(OSError):
            late.connect(srv.sock)
        late.close()
        parked.close()


if __name__ == "__main__":
    nbdfs_test.main()
