"""Shared helpers for nbdfs's Python tests: real servers, bounded waits, cleanup.

Every wait here has a timeout; every process started is stopped by the
test's cleanup (addCleanup), so a failing test leaves nothing running.
"""
import contextlib
import errno
import os
import re
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
# The same for 'nbdfs mount' (the 'valgrind' setup): mounts then run in the
# foreground under it, and their exit status is checked at unmount.
MOUNT_WRAPPER = shlex.split(os.environ.get("NBDFS_MOUNT_WRAPPER", ""))
# Waits on a mount scale with it (valgrind is slow).
SLOW = 8 if MOUNT_WRAPPER else 1
# Run every mount in the foreground, so its exit status is checked at unmount
# (the sanitizer build: a leak or an error is the daemon's exit status).
FOREGROUND = bool(MOUNT_WRAPPER) or os.environ.get("NBDFS_TEST_FOREGROUND") == "1"
DEFAULT_TIMEOUT = 30


def run(cmd, timeout=DEFAULT_TIMEOUT, check=True, input=None, env=None, text=True):
    """Run CMD (a list), return CompletedProcess with stdout/stderr (text unless TEXT=False)."""
    p = subprocess.run(cmd, capture_output=True, text=text, timeout=timeout,
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

    def small_tmpfs(self, name, size):
        """A tmpfs of SIZE (e.g. "8m") at TMP/NAME, unmounted by the cleanup."""
        path = self.path(name)
        os.mkdir(path)
        run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", path])
        self.addCleanup(run, ["umount", "-l", path])
        return path

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


# ---- FUSE mounts (tests/fuse) ----

def _unescape_mountinfo(field):
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mounted(path):
    """True if PATH is a mount point, per /proc/self/mountinfo."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if _unescape_mountinfo(line.split()[4]) == path:
                return True
    return False


def passthrough_expected():
    """nbdfs's libfuse has FUSE passthrough (>= 3.16) and so has the kernel (>= 6.9)."""
    version = run([NBDFS, "--version"]).stdout
    release = tuple(map(int, re.match(r"(\d+)\.(\d+)", os.uname().release).groups()))
    return "FUSE passthrough supported" in version and release >= (6, 9)


def mount_pids(mountpoint):
    """Pids of the 'nbdfs mount' processes whose command line names MOUNTPOINT."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if (argv and os.path.basename(argv[0]) == b"nbdfs" and b"mount" in argv
                and os.fsencode(mountpoint) in argv):
            pids.append(int(entry))
    return pids


def unmount(mountpoint, timeout=10):
    """fusermount3 -u MOUNTPOINT (then umount -l); waits until it is gone."""
    if not is_mounted(mountpoint):
        return
    subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, timeout=timeout)
    if is_mounted(mountpoint):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, timeout=timeout)
    wait_for(lambda: not is_mounted(mountpoint), timeout, "unmount of %s" % mountpoint)


def pid_exited(pid):
    """True once PID has exited: gone, or a zombie its new parent has yet to reap."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def wait_pids_gone(pids, timeout=10):
    """Wait for PIDS (not our children) to exit; SIGKILL them past TIMEOUT."""
    def gone():
        return all(pid_exited(p) for p in pids)
    try:
        wait_for(gone, timeout, "processes %s to exit" % pids)
    except AssertionError:
        for p in pids:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
        raise


class Mount:
    """An 'nbdfs mount' of SOURCE on MOUNTPOINT; unmounted by the test's cleanup."""

    def __init__(self, mountpoint, process=None):
        self.mountpoint = mountpoint
        self.process = process        # a Process in foreground mode, else None
        self.pids = [] if process else mount_pids(mountpoint)
        self.messages = ""            # what the daemon said at 'nbdfs umount'

    def path(self, *names):
        return os.path.join(self.mountpoint, *names)

    def files(self):
        return sorted(os.listdir(self.mountpoint))

    def unmount(self, timeout=30):
        """'nbdfs umount': returns the daemon's exit status once it has ended
        (its messages in self.messages).  If something else unmounted it
        already, waits for the daemon (its status is known in the foreground)."""
        status = 0
        if is_mounted(self.mountpoint):
            p = run([NBDFS, "umount", "--timeout", str(timeout * SLOW), self.mountpoint],
                    timeout=timeout * SLOW + 10, check=False)
            self.messages, status = p.stderr, p.returncode
        if is_mounted(self.mountpoint):
            raise AssertionError("nbdfs umount left %s mounted (%d):\n%s"
                                 % (self.mountpoint, status, self.messages))
        if self.process:
            try:
                self.process.proc.wait(timeout * SLOW)
            except subprocess.TimeoutExpired:
                self.process.stop(signal.SIGKILL)
                raise AssertionError("nbdfs mount still running %ds after unmount" % timeout)
            code = self.process.stop()
            self.messages += self.process.stderr()
            # Under valgrind, memory errors are the wrapper's exit status.
            if MOUNT_WRAPPER and code == 99:
                raise AssertionError("valgrind found errors in nbdfs mount:\n%s"
                                     % self.process.stderr())
            return code
        wait_pids_gone(self.pids, timeout)
        return status


def _mount_cleanup(m):
    with contextlib.suppress(Exception):
        unmount(m.mountpoint)
    if m.process:
        m.process.stop(signal.SIGKILL)
    else:
        with contextlib.suppress(AssertionError):
            wait_pids_gone(m.pids)


def _mount(tc, source, args, mountpoint, foreground, timeout):
    mountpoint = mountpoint or tc.path("mnt")
    os.makedirs(mountpoint, exist_ok=True)
    if isinstance(source, list):
        source = ["[", *source, "]"]       # a server started for the mount
    else:
        source = [source]
    if foreground or FOREGROUND:
        proc = Process([*MOUNT_WRAPPER, NBDFS, "mount", "-f", *args, *source, mountpoint],
                       tc.path("mount-%s.err" % os.path.basename(mountpoint)))
        m = Mount(mountpoint, proc)
        tc.addCleanup(_mount_cleanup, m)
        wait_for(lambda: is_mounted(mountpoint) or not proc.alive(), timeout * SLOW,
                 "nbdfs mount on %s" % mountpoint)
        if not is_mounted(mountpoint):
            raise AssertionError("nbdfs mount failed (%s):\n%s" % (proc.stop(), proc.stderr()))
        return m
    # Background mode: the command returns once the mount is usable.
    run([NBDFS, "mount", *args, *source, mountpoint], timeout=timeout)
    m = Mount(mountpoint)
    tc.addCleanup(_mount_cleanup, m)
    if not is_mounted(mountpoint):
        raise AssertionError("nbdfs mount returned before %s was mounted" % mountpoint)
    return m


def _start_nbdkit_cmd(tc, argv, name="nbdkit"):
    """nbdkit on a unix socket: ARGV is [--filter=F ..., PLUGIN, key=value ...]."""
    sock = tc.path(name + ".sock")
    srv = Server(["nbdkit", "--foreground", "-U", sock, *argv], sock, tc.path(name + ".err"))
    tc.addCleanup(srv.stop)
    return srv


def _start_nbdkit(tc, image, *args, name="nbdkit"):
    """nbdkit's file plugin serving IMAGE on a unix socket."""
    return _start_nbdkit_cmd(tc, [*args, "file", image], name=name)


class Daemon:
    """A server that forks into the background, known by its pid file."""

    def __init__(self, pid_file, sock):
        self.pid_file = pid_file
        self.sock = sock
        self.pid = None

    def alive(self):
        return self.pid is not None and os.path.exists("/proc/%d" % self.pid)

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.alive():
            with contextlib.suppress(OSError):
                os.kill(self.pid, sig)
            with contextlib.suppress(AssertionError):
                wait_pids_gone([self.pid], timeout)

    def uri(self, export=""):
        return "nbd+unix:///%s?socket=%s" % (export, self.sock)


def _start_nbd_server(tc, image, export="disk", name="nbd-server", more=(), allowlist=True):
    """nbd-server serving IMAGE as EXPORT, and each (EXPORT, IMAGE) of MORE, on a
    unix socket only (it then opens no TCP port).  It daemonizes: its pid file
    tells which process to stop."""
    sock = tc.path(name + ".sock")
    conf = tc.path(name + ".conf")
    with open(conf, "w") as f:
        f.write("[generic]\nunixsock = %s\nallowlist = %s\n\n"
                % (sock, "true" if allowlist else "false"))
        for e, i in [(export, image), *more]:
            f.write("[%s]\nexportname = %s\ntrim = true\nflush = true\n\n" % (e, i))
    srv = Daemon(tc.path(name + ".pid"), sock)
    tc.addCleanup(srv.stop)
    run(["nbd-server", "-C", conf, "-p", srv.pid_file])
    wait_for(lambda: os.path.exists(srv.pid_file) and unix_socket_ready(sock), 10,
             "nbd-server socket %s" % sock)
    with open(srv.pid_file) as f:
        srv.pid = int(f.read().split()[0])
    return srv


TestCase.mount = lambda self, source, *args, mountpoint=None, foreground=False, timeout=30: \
    _mount(self, source, args, mountpoint, foreground, timeout)
TestCase.mount.__doc__ = """'nbdfs mount [ARGS] SOURCE MOUNTPOINT' (default TMP/mnt): a Mount.
    SOURCE a list: '[ SOURCE... ]', a server started for the mount.
    FOREGROUND runs it with -f (its exit status can be checked); else the
    command must return with the mount in place."""
TestCase.start_nbdkit = _start_nbdkit
TestCase.start_nbdkit_cmd = _start_nbdkit_cmd
TestCase.start_nbd_server = _start_nbd_server


def wait_for_reconnect(fd, buf, offset=0, timeout=20):
    """Retry preadv(FD, [BUF], OFFSET) until it reads all of BUF: the mount's
    reconnection (EIO meanwhile)."""
    def readable():
        try:
            return os.preadv(fd, [buf], offset) == len(buf)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            return False
    wait_for(readable, timeout, "the mount to reconnect")


def data_extents_by_lseek(path):
    """[(offset, length)] of PATH's data, walked with SEEK_DATA / SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            if hole <= data:
                raise AssertionError("SEEK_HOLE at %d returned %d" % (data, hole))
            out.append((data, hole - data))
            off = hole
    finally:
        os.close(fd)
    return out


def nbdinfo_map(uri, context="base:allocation"):
    """[{offset, length, type, description}] from 'nbdinfo --map=CONTEXT --json URI'."""
    import json
    return json.loads(run(["nbdinfo", "--map=" + context, "--json", uri]).stdout)


def data_extents_of_map(entries, is_data):
    """Merge the entries of an nbdinfo map whose type IS_DATA into [(offset, length)]."""
    out = []
    for e in entries:
        if not is_data(e["type"]):
            continue
        if out and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["offset"], e["length"]))
    return out


# fallocate(2), which Python's os module lacks (it has posix_fallocate only).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd, mode, offset, length):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
