"""Shared helpers for nbdfs's Python tests: real servers, bounded waits, cleanup.

Every wait here has a timeout; every process started is stopped by the
test's cleanup (addCleanup), so a failing test leaves nothing running.
"""
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

NBDFS = os.environ.get("NBDFS") or shutil.which("nbdfs") or "nbdfs"
# A command to run 'nbdfs serve' under, e.g. "valgrind --error-exitcode=99 ..."
# (the 'valgrind' test setup).  Servers started by start_nbdfs must then
# still exit 0: no leak, no invalid access.
SERVER_WRAPPER = shlex.split(os.environ.get("NBDFS_SERVER_WRAPPER", ""))
DEFAULT_TIMEOUT = 30


def run(cmd, timeout=DEFAULT_TIMEOUT, check=True, input=None, env=None):
    """Run CMD (a list), return CompletedProcess with text stdout/stderr."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       input=input, env=env)
    if check and p.returncode != 0:
        raise AssertionError("command failed (%d): %s\nstdout:\n%s\nstderr:\n%s"
                             % (p.returncode, " ".join(map(str, cmd)), p.stdout, p.stderr))
    return p


def wait_for(predicate, timeout=10.0, what="condition"):
    """Poll PREDICATE until true; fail after TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))


def unix_socket_ready(path):
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def make_image(path, size, data=()):
    """A sparse raw image of SIZE bytes; DATA is [(offset, bytes)] written in."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, buf in data:
            f.seek(off)
            f.write(buf)
    return path


class Process:
    """A background server process, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, argv, stderr_path):
        self.argv = argv
        self.stderr_path = stderr_path
        self.stderr_file = open(stderr_path, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.stderr_file)

    def stderr(self):
        with open(self.stderr_path) as f:
            return f.read()

    def alive(self):
        return self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Stop the process; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.stderr_file.close()
        return self.proc.returncode


class Server(Process):
    """A server listening on a unix socket: 'nbdfs serve' or 'qemu-nbd'."""

    def __init__(self, argv, sock, stderr_path, timeout=10):
        super().__init__(argv, stderr_path)
        self.sock = sock
        try:
            wait_for(lambda: unix_socket_ready(sock) or not self.alive(), timeout,
                     "server socket %s" % sock)
        except AssertionError:
            self.stop(signal.SIGKILL)
            raise
        if not self.alive():
            raise AssertionError("server exited: %s\n%s" % (" ".join(argv), self.stderr()))

    def uri(self, export=""):
        return "nbd+unix:///%s?socket=%s" % (export, self.sock)


class TestCase(unittest.TestCase):
    """unittest.TestCase with a temporary directory and server starters."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="nbdfs-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def start_nbdfs(self, images, *args, name="nbdfs"):
        """'nbdfs serve' on a unix socket in the test's directory."""
        sock = self.path(name + ".sock")
        srv = Server([*SERVER_WRAPPER, NBDFS, "serve", "-U", sock, *args, *images], sock,
                     self.path(name + ".err"), timeout=60 if SERVER_WRAPPER else 10)
        self.addCleanup(self.stop_cleanly, srv)
        return srv

    def stop_cleanly(self, srv):
        """Cleanup of a server the test left running: SIGTERM must end it with status 0."""
        if not srv.alive():
            srv.stop()
            return
        code = srv.stop(timeout=60 if SERVER_WRAPPER else 10)
        self.assertEqual(code, 0, "server exit status %d on SIGTERM:\n%s" % (code, srv.stderr()))

    def start_qemu_nbd(self, image, *args, fmt="raw", name="qemu-nbd"):
        """qemu-nbd 10 serving IMAGE on a unix socket (several clients allowed)."""
        sock = self.path(name + ".sock")
        srv = Server(["qemu-nbd", "-f", fmt, "-k", sock, "-e", "16", "--persistent",
                      *args, image], sock, self.path(name + ".err"))
        self.addCleanup(srv.stop)
        return srv


# The servers interop checks run against: nbdfs's own and the reference.
SERVER_KINDS = ("nbdfs", "qemu-nbd")


class ServerTestCase(TestCase):
    """A TestCase whose checks run against one server kind (SERVER, one of
    SERVER_KINDS): subclass it once per kind."""

    SERVER = None

    def start_server(self, image, *args, name=None):
        """Serve raw IMAGE with the class's server; ARGS are options both
        understand (-r).  The image is the default export "" on either."""
        if self.SERVER == "nbdfs":
            return self.start_nbdfs([image], *args, name=name or "nbdfs")
        if self.SERVER == "qemu-nbd":
            return self.start_qemu_nbd(image, *args, name=name or "qemu-nbd")
        raise AssertionError("unknown server kind %r" % self.SERVER)

    def server_argv(self, image, *args):
        """A command line serving IMAGE on the socket systemd-style activation
        passes (fd 3), for nbdinfo [ ... ] and connect_systemd_socket_activation."""
        if self.SERVER == "nbdfs":
            return [*SERVER_WRAPPER, NBDFS, "serve", *args, image]
        return ["qemu-nbd", "-f", "raw", *args, image]

    def expect(self, **by_server):
        """The expectation for this class's server: expect(nbdfs=x, qemu_nbd=y)."""
        return by_server[self.SERVER.replace("-", "_")]


def server_test_classes(mixin, namespace):
    """Define one TestCase per server kind from MIXIN's checks in NAMESPACE
    (a module's globals()), named <Kind><Mixin>."""
    for kind in SERVER_KINDS:
        prefix = "".join(part.capitalize() for part in kind.split("-"))
        name = prefix + mixin.__name__
        namespace[name] = type(name, (mixin, ServerTestCase),
                               {"SERVER": kind, "__module__": namespace["__name__"]})


def main():
    unittest.main(verbosity=2)
