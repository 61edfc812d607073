#!/usr/bin/python3
"""nbdfs benchmark: `nbdfs mount` and `nbdfs serve` measured side by side with their peers.

Usage (as root; scripts/bench.sh builds nbdfs and installs what is missing first):

    scripts/bench.sh [OPTIONS]
    /usr/bin/python3 tests/bench/bench.py [OPTIONS]

    --runs N          measured runs per subject (default 3); the table shows median and range
    --only W1,W3,...  run only these workloads (W1 W1b W2 W3 W4 W5 W6 W7 W8 W9 B1 B2 B3 C1
                      C2 C3 S1 S2)
    --nbdfs PATH      the nbdfs binary (default: $NBDFS, else build/fuse/nbdfs, else PATH)
    --quick           smaller sizes and shorter runs: a smoke run, figures indicative only
    --workdir DIR     where images and mounts go (default /dev/shm, a tmpfs)
    --output FILE     also write the table (with the machine's description) to FILE

It prints ONE table: workload, subject, median, range (min-max) over the runs, unit, the
ratio of the median to the workload's reference peer, and PASS/MISS of nbdfs against the
target.  Every subject of a workload is set up once, then the runs are interleaved (run 1 of
every subject, then run 2, ...) so that a noisy neighbour hurts all subjects alike.  Before
each run: `sync; echo 3 > /proc/sys/vm/drop_caches`, which drops the mounted file's cached
pages; the images live on tmpfs, so their own pages stay in memory (primed) throughout.

Subjects
    nbdfs         `nbdfs mount -f URI MNT` of a qemu-nbd export (file MNT/disk)
    nbdfs local   `nbdfs mount -f IMAGE MNT`, the bundled server in-process (read-only:
                  read by the kernel with FUSE passthrough where libfuse has it)
    nbdfs local all   the same with --passthrough=all (write workloads, a copy of the image)
    nbdfuse       `nbdfuse MNT URI` (libnbd 1.22, default 4 connections; file MNT/nbd)
    qsd nbd       qemu-storage-daemon FUSE export of an NBD client node (driver=nbd)
    qsd file      qemu-storage-daemon FUSE export of the raw file (driver=file, locking=off)
    nbdcopy       `nbdcopy URI null:` (no FUSE: what the NBD path can deliver)
    local         the image file itself on tmpfs
  Remote subjects read `qemu-nbd -f raw -k SOCK -e 16 --persistent --cache=writeback IMAGE`.
  Read workloads mount read-only (nbdfs -r, nbdfuse -r, qsd writable=off).

Workloads (sizes in --quick mode in brackets)
    W1   sequential read of a 2 GiB [256 MiB] image: `dd bs=1M` of the mounted file; MiB/s
    W1b  the same with fio: 1 MiB, 4 jobs each reading a quarter, psync, buffered; MiB/s
    W2   4 KiB random reads: fio libaio, iodepth 16, O_DIRECT, 10 s [3 s]; IOPS
    W3   `cp --sparse=always` of a 16 GiB [2 GiB] image holding 64 MiB [16 MiB] in 64
         extents: seconds, and bytes read = cp's rchar (`sh -c 'cp ...; grep rchar
         /proc/$$/io'`: a shell's io counters include its reaped children's)
    W4   sequential write of 1 GiB [128 MiB]: `dd bs=1M conv=fsync,notrunc`; MiB/s
    W5   SEEK_DATA/SEEK_HOLE walk (tests/bench/seekwalk.c) over 100,000 [10,000] data
         extents, 4 KiB of data every 64 KiB; seconds (nbdfuse has no lseek: n/a)
    W6   server throughput, unix sockets: `nbdcopy URI null:` and `nbdcopy --flush FILE URI`
         (2 GiB [512 MiB]) against nbdfs serve, qemu-nbd (options above), `nbdkit -U SOCK
         file IMAGE` and nbd-server (config with unixsock); MiB/s.  "W6 tls": the same over
         TLS (x509, certificates made with certtool) against nbdfs serve, qemu-nbd, nbdkit
    W7   reading dirty/b0.map of a 1 TiB image whose base:allocation has 200,000 [20,000]
         extents and bitmap b0 10,000 [1,000] dirty runs (written through `nbdfs serve` after
         `nbdfs bitmap add`), fresh mount for every run: seconds (direct mount), and bytes the
         mount received (server to client, counted by a unix-socket proxy between a second
         mount and the server) against an unfiltered libnbd walk of block status of
         base:allocation + b0 through the same kind of proxy
    W8   memory (VmHWM in /proc/PID/status, the peak resident set): `nbdfs mount -f` of the
         1 TiB export after a seek walk of the disk, reads of b0.map and b0.json and of every
         data byte of b0.img (fresh mount per run; the peak of the runs is reported); and the
         `nbdfs serve` of W7 (one bitmap, 1 TiB) at the end, with its VmHWM after each phase
         (dirty writes, W7, B2, W8 mounts) in the notes
    W9   a VM disk's mix: fio 4 KiB random read/write 70/30, libaio qd32, O_DIRECT, an fsync
         every 64 writes, for 10 s [3 s] over a 1 GiB [256 MiB] image; read + write IOPS,
         through the mounts of W4
    B1   bitmap cost: `nbdcopy --flush` of 2 GiB [512 MiB] into `nbdfs serve` with 0 and
         with 3 enabled bitmaps; MiB/s
    B2   one block-status request for b0 over the 1 TiB export (libnbd block_status_filter,
         the single call timed, callback included); ms
    B3   copy-before-write cost: `nbdcopy --flush` of 2 GiB [512 MiB] over a 2 GiB data
         image in `nbdfs serve`, with no backup view, with a view open (every cluster is
         rewritten for the first time since the view began: its old data is copied to the
         scratch file first), and the same again (nothing left to copy); MiB/s.  And the
         scratch file's size on disk against the bytes rewritten
    C1   how the lseek walk grows: W5's walk through `nbdfs mount` of qemu-nbd over 10k, 100k
         and 1M [1k, 10k, 100k] data extents (a fresh mount per run): microseconds per
         extent, and the mount's VmHWM (MiB)
    C2   how dirty/b0.map grows with the export: 1, 16 and 64 TiB exports of `nbdfs serve`
         with bitmap b0 (1 MiB granularity) holding the same 1,000 dirty runs; seconds to
         read b0.map on a fresh mount, and bytes the mount received (counting proxy)
    C3   a 64 TiB export (sparse, 1 MiB of data at its start and end) through qemu-nbd:
         seconds from starting the mount to its file being there, and to the first 4 KiB
         and the last 4 KiB read (O_DIRECT); nbdfs, nbdfuse, qsd nbd
    S1   servers under slow readers: 20 clients queue 64 READs of 1 MiB each and take their
         replies at ~1.25 MiB/s while another client does 4 KiB reads for 5 s [2 s]: its
         worst and 99th-percentile latency (ms), and the server's VmHWM (MiB); nbdfs serve,
         qemu-nbd (-e 32), nbdkit
    S2   servers under block-status floods: 3 clients each send 64 BLOCK_STATUS requests over
         a 512 MiB [128 MiB] image with 131,072 runs in base:allocation and in 8 bitmaps
         (nbdfs serve; qemu-nbd of the same data in qcow2 with the same bitmaps; nbdkit,
         base:allocation only) and read nothing; the server's VmHWM growth (MiB)

Targets (PASS/MISS on the nbdfs rows; "x" = times the peer's median in the same run)
    W1   nbdfs >= 2x nbdfuse, or >= 0.85x nbdcopy if that is lower; nbdfs local >= qsd file
    W1b  nbdfs >= 1.5x nbdfuse, or >= 0.85x nbdcopy if that is lower
    W2   nbdfs >= 2x nbdfuse and >= qsd nbd; nbdfs local >= qsd file
    W3   time <= qsd file; rchar <= 1.1x the data (worst run)
    W4   nbdfs >= 1.5x nbdfuse; nbdfs local >= qsd file
    W5   <= 1 s            W6   nbdfs serve >= the best peer, read and write
    W7   <= 0.5 s; bytes <= 1/10 of the unfiltered walk (worst run)
    W8   mount <= 64 MiB; serve <= 16 MiB + 2 MiB per bitmap per TiB
    W9   nbdfs >= nbdfuse and qsd nbd; nbdfs local >= qsd file
    B1   3 bitmaps >= 95% of none            B2   < 50 ms
    B3   2nd rewrite under a view >= 95% of no view; scratch <= bytes rewritten
    C1   per-extent time at the most extents <= 1.5x at the fewest; VmHWM <= 64 MiB
    C2   time and bytes at 64 TiB <= 1.5x at 1 TiB
    C3   mount <= 1 s; first and last byte <= 0.1 s after it
    S1   worst <= 100 ms; memory <= 320 MiB  S2   growth <= 256 MiB (--max-buffered)

Bytes are checked: samples of what each mount read against the image (W1), of what each
subject wrote (W4, a different source window per subject and run), the copy of W3, the
extent counts and data size of every W5 walk, the exact text of every W7 map.  A mismatch,
a failed command, or an nbdfs mount that exits non-zero (a crash) is listed under "Errors";
the processes' logs are then kept in WORKDIR/nbdfs-bench-logs.PID.  Every process and
mount started is stopped on exit, on error and on Ctrl-C or SIGTERM (fusermount3 -u, then
umount -l; SIGTERM, then SIGKILL), and every wait is bounded.  Traffic goes over unix
sockets only.  Exit status: 0, or 1 when anything failed (130 when interrupted).
"""
import argparse
import contextlib
import datetime
import errno
import json
import mmap
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

sys.path.insert(0, os.path.join(TOP, "tests", "lib"))
import hostile  # noqa: E402
import nbdfs_test  # noqa: E402
from pki import Pki  # noqa: E402

ALL_WORKLOADS = ["W1", "W1b", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9", "B1", "B2", "B3",
                 "C1", "C2", "C3", "S1", "S2"]


def log(msg):
    print("bench: " + msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# Processes, mounts, bounded waits, cleanup

# Mount and socket probes are the test suite's (tests/lib/nbdfs_test.py).
is_mounted = nbdfs_test.is_mounted
socket_ready = nbdfs_test.unix_socket_ready


def wait_for(pred, timeout, what):
    """nbdfs_test.wait_for, failing with BenchError (a benchmark error, not a test's)."""
    try:
        nbdfs_test.wait_for(pred, timeout, what)
    except AssertionError as e:
        raise BenchError(str(e)) from None


def run(argv, timeout=120, check=True, input=None):
    """Run ARGV to completion (bounded); returns CompletedProcess (text)."""
    p = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        raise BenchError("timed out after %gs: %s" % (timeout, " ".join(argv)))
    except BaseException:
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            p.communicate(timeout=10)
        raise
    if check and p.returncode != 0:
        raise BenchError("failed (exit %d): %s\n%s" % (p.returncode, " ".join(argv), (err or out)[-2000:]))
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def timed(argv, timeout=300):
    """Run ARGV, return (seconds, CompletedProcess)."""
    t0 = time.monotonic()
    p = run(argv, timeout=timeout)
    return time.monotonic() - t0, p


class Registry:
    """Every process and mount the benchmark starts, for cleanup in any case."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = []
        self.mounts = []
        self.seq = 0

    def spawn(self, argv, name):
        self.seq += 1
        path = os.path.join(self.logdir, "%03d-%s.log" % (self.seq, name))
        f = open(path, "wb")
        try:
            # A session of its own: Ctrl-C reaches only the benchmark, which unmounts
            # before it stops the daemons.
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        finally:
            f.close()
        p.logpath = path
        p.name = name
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=15):
        """Stop P (SIGTERM, then SIGKILL); returns its exit status."""
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log("%s (pid %d) ignored SIGTERM for %ds: SIGKILL" % (p.name, p.pid, timeout))
                with contextlib.suppress(OSError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
        if p in self.procs and p.poll() is not None:
            self.procs.remove(p)
        return p.returncode

    def add_mount(self, path):
        self.mounts.append(path)

    def umount(self, path):
        if is_mounted(path):
            r = subprocess.run(["fusermount3", "-u", path], capture_output=True, timeout=30)
            if r.returncode != 0 or is_mounted(path):
                time.sleep(0.2)
                if is_mounted(path):
                    subprocess.run(["fusermount3", "-u", path], capture_output=True, timeout=30)
                if is_mounted(path):
                    log("fusermount3 -u %s failed (%s): umount -l" % (path, r.stderr.decode().strip()))
                    subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)
        if path in self.mounts:
            self.mounts.remove(path)

    def cleanup(self):
        for m in reversed(list(self.mounts)):
            try:
                self.umount(m)
            except Exception as e:  # keep cleaning
                log("cleanup: unmounting %s: %s" % (m, e))
        for p in reversed(list(self.procs)):
            try:
                self.stop(p, timeout=10)
            except Exception as e:
                log("cleanup: stopping %s: %s" % (p.name, e))


REG = None   # the Registry
CURRENT = ["-"]   # the workload running (for messages)
ARGS = None  # parsed options
WORK = None  # work directory (tmpfs)
LOGS_KEPT = None  # where the processes' logs go when something failed


def logtail(p, n=1500):
    try:
        with open(p.logpath, "rb") as f:
            return f.read()[-n:].decode(errors="replace")
    except OSError:
        return ""


def vm_hwm_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise BenchError("no VmHWM for pid %d" % pid)


def drop_caches():
    """sync; echo 3 > /proc/sys/vm/drop_caches (bounded)."""
    run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], timeout=120)


# ---------------------------------------------------------------------------------------
# Servers and mounts

class Server:
    def __init__(self, kind, proc, sock, export="", tls_client=None):
        self.kind, self.proc, self.sock, self.export = kind, proc, sock, export
        self.tls_client = tls_client     # a client's certificate directory: nbds://

    @property
    def uri(self):
        if self.tls_client:
            return "nbds+unix:///%s?socket=%s&tls-certificates=%s" % (
                self.export, self.sock, self.tls_client)
        return "nbd+unix:///%s?socket=%s" % (self.export, self.sock)

    def stop(self):
        return REG.stop(self.proc)


def wait_socket(proc, sock, what, timeout=30):
    try:
        wait_for(lambda: socket_ready(sock) or proc.poll() is not None, timeout, what)
    except BenchError:
        REG.stop(proc, signal.SIGKILL)
        raise
    if proc.poll() is not None:
        raise BenchError("%s exited (%s):\n%s" % (what, proc.returncode, logtail(proc)))


def new_path(name):
    """A fresh path in the work directory."""
    i = 0
    while True:
        p = os.path.join(WORK, "%s%s" % (name, "" if i == 0 else "-%d" % i))
        if not os.path.exists(p):
            return p
        i += 1


QEMU_NBD_OPTS = ["-f", "raw", "-e", "16", "--persistent", "--cache=writeback"]


def start_qemu_nbd(img, readonly=False, opts=QEMU_NBD_OPTS, pki=None):
    """qemu-nbd; with PKI (a pki.Pki), TLS with its server certificate."""
    sock = new_path("qemu-nbd.sock")
    tls = ["--object", "tls-creds-x509,id=tls0,endpoint=server,dir=" + pki.path("server"),
           "--tls-creds", "tls0"] if pki else []
    p = REG.spawn(["qemu-nbd", *opts, *tls, *(["-r"] if readonly else []), "-k", sock, img],
                  "qemu-nbd")
    wait_socket(p, sock, "qemu-nbd on " + sock)
    return Server("qemu-nbd", p, sock, tls_client=pki and pki.path("client"))


def start_nbdfs_serve(img, *opts, pki=None):
    sock = new_path("nbdfs.sock")
    tls = ["--tls-creds", pki.path("server")] if pki else []
    p = REG.spawn([ARGS.nbdfs, "serve", *opts, *tls, "-U", sock, img], "nbdfs-serve")
    wait_socket(p, sock, "nbdfs serve on " + sock)
    return Server("nbdfs serve", p, sock, tls_client=pki and pki.path("client"))


def start_nbdkit(img, pki=None):
    sock = new_path("nbdkit.sock")
    tls = ["--tls=require", "--tls-certificates=" + pki.path("server")] if pki else []
    p = REG.spawn(["nbdkit", "-f", *tls, "-U", sock, "file", img], "nbdkit")
    wait_socket(p, sock, "nbdkit on " + sock)
    return Server("nbdkit", p, sock, tls_client=pki and pki.path("client"))


class PidProc:
    """A daemon that detached itself (nbd-server), known by the pid in its pid file, with
    the part of Popen's interface the Registry uses."""

    def __init__(self, pid, name, logpath):
        self.pid, self.name, self.logpath = pid, name, logpath
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            try:
                with open("/proc/%d/stat" % self.pid) as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if state in ("Z", "X"):
                    self.returncode = 0
            except OSError:
                self.returncode = 0
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def children(self):
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    with open("/proc/%s/stat" % d) as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == self.pid:
                            out.append(int(d))
        return out

    def wait(self, timeout):
        kids = self.children()
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("pid %d" % self.pid, timeout)
            time.sleep(0.05)
        for k in kids:   # connection children left behind
            with contextlib.suppress(OSError):
                os.kill(k, signal.SIGKILL)
        return self.returncode


def start_nbd_server(img):
    sock = new_path("nbd-server.sock")
    conf, pidfile = sock + ".conf", sock + ".pid"
    with open(conf, "w") as f:
        # flush = true: NBD_CMD_FLUSH (fsync), which nbdcopy --flush needs.
        f.write("[generic]\nunixsock = %s\n\n[disk]\nexportname = %s\nflush = true\n" % (sock, img))
    # nbd-server forks a process per connection only as a daemon (-d serves one
    # connection at a time), so it daemonizes and is known by its pid file.
    p = REG.spawn(["nbd-server", "-C", conf, "-p", pidfile], "nbd-server")
    try:
        p.wait(30)
        wait_for(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(), 30,
                 "nbd-server's pid file")
    except (subprocess.TimeoutExpired, BenchError):
        REG.stop(p, signal.SIGKILL)
        raise BenchError("nbd-server did not start: " + logtail(p))
    REG.stop(p)
    d = PidProc(int(open(pidfile).read().strip()), "nbd-server", p.logpath)
    REG.procs.append(d)
    wait_socket(d, sock, "nbd-server on " + sock)
    return Server("nbd-server", d, sock, export="disk")


class Mount:
    """A FUSE mount started by the benchmark, whose process we own."""

    def __init__(self, kind, proc, mnt, path, source=""):
        self.kind, self.proc, self.mnt, self.path = kind, proc, mnt, path
        self.source = source
        self.workload = CURRENT[0]

    def close(self):
        """Unmount, then make sure the process is gone.  nbdfs and nbdfuse exit on
        unmount; a mount of nbdfs that does not is reported."""
        REG.umount(self.mnt)
        if self.proc.poll() is None:
            try:
                self.proc.wait(10 if self.kind.startswith("nbdfs") else 2)
            except subprocess.TimeoutExpired:
                if self.kind.startswith("nbdfs"):
                    ERRORS.append("%s: %s of %s (pid %d) still running 10 s after its unmount"
                                  % (self.workload, self.kind, self.source, self.proc.pid))
        code = REG.stop(self.proc)
        if self.kind.startswith("nbdfs") and code not in (0, None):
            ERRORS.append("%s: %s mount of %s exited with status %s (log %s):\n%s"
                          % (self.workload, self.kind, self.source, code,
                             os.path.basename(self.proc.logpath), logtail(self.proc)))
        if self.proc in REG.procs:
            REG.procs.remove(self.proc)


def wait_mount(proc, mnt, what, timeout=30):
    REG.add_mount(mnt)
    try:
        wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, timeout, what)
    except BenchError:
        REG.umount(mnt)
        REG.stop(proc, signal.SIGKILL)
        raise
    if proc.poll() is not None:
        REG.umount(mnt)
        raise BenchError("%s exited (%s) before mounting:\n%s" % (what, proc.returncode, logtail(proc)))


def the_file(mnt, what):
    """The export's file in an nbdfs mount: the one regular file at the top."""
    files = [n for n in sorted(os.listdir(mnt)) if os.path.isfile(os.path.join(mnt, n))]
    if len(files) != 1:
        raise BenchError("%s: expected one file in %s, found %r" % (what, mnt, files))
    return os.path.join(mnt, files[0])


def mount_nbdfs(source, readonly=False, extra=()):
    mnt = new_path("mnt-nbdfs")
    os.mkdir(mnt)
    local = not source.startswith("nbd")
    argv = [ARGS.nbdfs, "mount", "-f", *(["-r"] if readonly else []), *extra, source, mnt]
    p = REG.spawn(argv, "nbdfs-mount")
    wait_mount(p, mnt, "nbdfs mount of " + source)
    m = Mount("nbdfs local" if local else "nbdfs", p, mnt, None, source)
    try:
        m.path = the_file(mnt, "nbdfs mount")
    except BaseException:
        m.close()
        raise
    return m


def mount_nbdfuse(uri, readonly=False):
    mnt = new_path("mnt-nbdfuse")
    os.mkdir(mnt)
    p = REG.spawn(["nbdfuse", *(["-r"] if readonly else []), mnt, uri], "nbdfuse")
    wait_mount(p, mnt, "nbdfuse of " + uri)
    return Mount("nbdfuse", p, mnt, os.path.join(mnt, "nbd"))


def mount_qsd(blockdev, kind, readonly=False):
    target = new_path("qsd-export")
    open(target, "w").close()   # the mountpoint of qsd's FUSE export is a regular file
    p = REG.spawn(["qemu-storage-daemon", "--blockdev", blockdev,
                   "--export", "type=fuse,id=e,node-name=n,mountpoint=%s,writable=%s"
                   % (target, "off" if readonly else "on")], "qsd")
    wait_mount(p, target, "qemu-storage-daemon FUSE export (%s)" % kind)
    return Mount(kind, p, target, target)


def mount_qsd_file(img, readonly=False):
    return mount_qsd("driver=file,filename=%s,node-name=n,locking=off%s"
                     % (img, ",read-only=on" if readonly else ""), "qsd file", readonly)


def mount_qsd_nbd(sock, readonly=False):
    return mount_qsd("driver=nbd,server.type=unix,server.path=%s,node-name=n%s"
                     % (sock, ",read-only=on" if readonly else ""), "qsd nbd", readonly)


# ---------------------------------------------------------------------------------------
# Results

class Row:
    def __init__(self, workload, subject, unit, values=None, better="higher", error=None):
        self.workload, self.subject, self.unit = workload, subject, unit
        self.values = values if values is not None else []
        self.better = better
        self.error = error
        self.ratio = ""
        self.verdict = ""
        self.agg = None   # override of the median (e.g. peak memory)

    @property
    def median(self):
        if self.agg is not None:
            return self.agg
        return statistics.median(self.values) if self.values else None


RESULTS = []   # Rows in table order
NOTES = []     # free text printed under the table
ERRORS = []    # problems met (nbdfs or peers)


def fmt(v):
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return "%.0f" % v
    if a >= 100:
        return "%.1f" % v
    if a >= 10:
        return "%.2f" % v
    if a >= 1:
        return "%.3f" % v
    return "%.4f" % v


class Workload:
    """The rows of one workload.  A row is a subject's figures for one metric (SUB, e.g.
    "W3 time"; by default the workload's name)."""

    def __init__(self, name, title):
        self.name, self.title = name, title
        self.rows = {}

    @staticmethod
    def key(subject, sub):
        return subject if sub is None else subject + "@" + sub

    def row(self, subject, unit, better="higher", sub=None):
        key = self.key(subject, sub)
        if key not in self.rows:
            r = Row(sub or self.name, subject, unit, better=better)
            self.rows[key] = r
            RESULTS.append(r)
        return self.rows[key]

    def get(self, subject, sub=None):
        return self.rows.get(self.key(subject, sub))

    def fail(self, subject, unit, err, sub=None):
        r = self.row(subject, unit, sub=sub)
        r.error = first_line(err)
        ERRORS.append("%s %s: %s" % (r.workload, subject, err))
        log("%s %s: ERROR %s" % (r.workload, subject, err))

    def med(self, subject, sub=None):
        r = self.get(subject, sub)
        return r.median if r is not None and r.values else None

    def ratios(self, ref, sub=None, refname=None):
        """Fill the ratio column of this metric's rows against REF's median."""
        refrow = self.get(ref, sub)
        for key, r in self.rows.items():
            if r.workload != (sub or self.name) or not r.values:
                continue
            if r is refrow:
                r.ratio = "ref"
            elif refrow is not None and refrow.values and refrow.median:
                r.ratio = "%.2fx %s" % (r.median / refrow.median, refname or ref)


def first_line(err):
    text = str(err).strip()
    return (text.splitlines()[0][:110] if text else type(err).__name__)


def verdict(row, ok, text):
    """Mark ROW PASS/MISS with the target TEXT; OK None means not measurable."""
    if row is None:
        return
    if ok is None:
        row.verdict = "n/a (%s)" % text
    else:
        row.verdict = ("PASS" if ok else "MISS") + " " + text


# ---------------------------------------------------------------------------------------
# Data

DATA_CACHE = {}


def data_file(size):
    """A SIZE-byte file of non-zero, non-repeating data (each MiB stamped with its index)."""
    if size in DATA_CACHE:
        return DATA_CACHE[size]
    path = new_path("data-%dM" % (size // MiB))
    rnd = random.Random(1234)
    base = bytearray(rnd.randbytes(MiB))
    with open(path, "wb") as f:
        for i in range(size // MiB):
            base[0:16] = struct.pack("<QQ", i, size)
            f.write(base)
    DATA_CACHE[size] = path
    return path


def copy_file(src, dst):
    run(["cp", "--sparse=never", src, dst], timeout=300)
    return dst


def sample_check(what, mounted_path, ref_path, size, samples=16, block=MiB, ref_offset=0):
    """Compare SAMPLES random blocks of MOUNTED_PATH with REF_PATH (at +REF_OFFSET)."""
    rnd = random.Random(size ^ samples)
    offs = sorted({rnd.randrange(0, size // block) * block for _ in range(samples)} | {0, size - block})
    with open(mounted_path, "rb", buffering=0) as a, open(ref_path, "rb", buffering=0) as b:
        for off in offs:
            x = os.pread(a.fileno(), block, off)
            y = os.pread(b.fileno(), block, off + ref_offset)
            if x != y:
                raise BenchError("%s: wrong bytes at offset %d (%d bytes compared)" % (what, off, block))


def make_sparse(path, size, extents, ext_len, fill=None):
    """A SIZE-byte sparse image with EXTENTS data extents of EXT_LEN bytes, evenly spaced."""
    stride = size // extents
    buf = bytearray(random.Random(77).randbytes(ext_len))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for k in range(extents):
            buf[0:8] = struct.pack("<Q", k)
            os.pwrite(fd, buf, k * stride)
    finally:
        os.close(fd)
    return stride


def seekwalk(path, timeout=300):
    """(extents, data bytes, seconds) of the lseek walk of PATH."""
    p = run([SEEKWALK, path], timeout=timeout)
    n, data, secs = p.stdout.split()
    return int(n), int(data), float(secs)


SEEKWALK = None


def build_seekwalk():
    global SEEKWALK
    out = os.path.join(WORK, "seekwalk")
    run(["cc", "-O2", "-o", out, os.path.join(HERE, "seekwalk.c")], timeout=60)
    SEEKWALK = out


# ---------------------------------------------------------------------------------------
# Byte-counting unix-socket proxy (runs as a separate process: bench.py --proxy)

def proxy_main(listen, target):
    """Forward every connection to LISTEN to TARGET, counting bytes both ways.  Connecting
    to LISTEN.ctl returns "client_to_server server_to_client\\n" totals."""
    totals = [0, 0]
    lock = threading.Lock()

    def pump(src, dst, idx):
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
                with lock:
                    totals[idx] += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                src.shutdown(socket.SHUT_RD)

    def serve_conn(c):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(target)
        except OSError:
            c.close()
            return
        t1 = threading.Thread(target=pump, args=(c, s, 0), daemon=True)
        t2 = threading.Thread(target=pump, args=(s, c, 1), daemon=True)
        t1.start()
        t2.start()
        t1.join()
        t2.join()
        c.close()
        s.close()

    def ctl_loop(ls):
        while True:
            c, _ = ls.accept()
            with lock:
                msg = "%d %d\n" % tuple(totals)
            with contextlib.suppress(OSError):
                c.sendall(msg.encode())
            c.close()

    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.bind(listen + ".ctl")
    ctl.listen(8)
    threading.Thread(target=ctl_loop, args=(ctl,), daemon=True).start()
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(listen)
    ls.listen(64)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve_conn, args=(c,), daemon=True).start()


class Proxy:
    def __init__(self, target):
        self.sock = new_path("proxy.sock")
        self.proc = REG.spawn([sys.executable, os.path.abspath(__file__), "--proxy", self.sock, target],
                              "proxy")
        wait_socket(self.proc, self.sock + ".ctl", "counting proxy")
        wait_socket(self.proc, self.sock, "counting proxy")

    def counts(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(self.sock + ".ctl")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
        finally:
            s.close()
        c2s, s2c = data.split()
        return int(c2s), int(s2c)

    def uri(self, export=""):
        return "nbd+unix:///%s?socket=%s" % (export, self.sock)

    def stop(self):
        REG.stop(self.proc)


# ---------------------------------------------------------------------------------------
# Workload runner

def open_subjects(stack, wl, unit, makers, sub=None):
    """Start every subject in MAKERS [(name, fn)]; a subject that fails to start gets an
    error row.  Returns [(name, Mount-or-value)]."""
    out = []
    for name, fn in makers:
        try:
            m = fn()
            if isinstance(m, Mount):
                stack.callback(m.close)
            out.append((name, m))
        except Exception as e:
            wl.fail(name, unit, e, sub=sub)
    return out


def measure(wl, subjects, unit, fn, better="higher", sub=None, check=None):
    """Run FN(name, subject, run) for every run and subject (interleaved), dropping caches
    before each.  FN returns the value; an error ends that subject.  CHECK(name, subject)
    runs after the last run (the bytes)."""
    rows = {name: wl.row(name, unit, better, sub=sub) for name, _ in subjects}
    label = sub
    failed = set()
    for r in range(ARGS.runs):
        for name, subj in subjects:
            if name in failed:
                continue
            try:
                drop_caches()
                v = fn(name, subj, r)
                rows[name].values.append(v)
                log("%s run %d/%d %-12s %s %s" % (label or wl.name, r + 1, ARGS.runs, name, fmt(v), unit))
            except Exception as e:
                failed.add(name)
                rows[name].error = first_line(e)
                ERRORS.append("%s %s: %s" % (label or wl.name, name, e))
                log("%s %s: ERROR %s" % (label or wl.name, name, e))
    if check:
        for name, subj in subjects:
            if name in failed:
                continue
            try:
                check(name, subj)
            except Exception as e:
                rows[name].error = "WRONG DATA: " + first_line(e)
                ERRORS.append("%s %s: %s" % (label or wl.name, name, e))
                log("%s %s: CHECK FAILED %s" % (label or wl.name, name, e))
    return rows


def dd_read(path, size):
    t, _ = timed(["dd", "if=" + path, "of=/dev/null", "bs=1M", "count=%d" % (size // MiB),
                  "status=none"], timeout=600)
    return size / MiB / t


def nbdcopy_read(uri, size):
    t, _ = timed(["nbdcopy", uri, "null:"], timeout=600)
    return size / MiB / t


def fio_json(argv, timeout):
    p = run(["fio", "--output-format=json", *argv], timeout=timeout)
    text = p.stdout
    return json.loads(text[text.index("{"):])


# ---------------------------------------------------------------------------------------
# W1, W1b, W2: reads

def read_size():
    return 256 * MiB if ARGS.quick else 2 * GiB


def w1(want):
    size = read_size()
    img = data_file(size)
    wl = Workload("W1", "sequential read, dd bs=1M")
    unit = "MiB/s"
    with contextlib.ExitStack() as st:
        srv = start_qemu_nbd(img, readonly=True)
        st.callback(srv.stop)
        subjects = open_subjects(st, wl, unit, [
            ("nbdfs", lambda: mount_nbdfs(srv.uri, readonly=True)),
            ("nbdfs local", lambda: mount_nbdfs(img, readonly=True)),
            ("nbdfuse", lambda: mount_nbdfuse(srv.uri, readonly=True)),
            ("qsd nbd", lambda: mount_qsd_nbd(srv.sock, readonly=True)),
            ("qsd file", lambda: mount_qsd_file(img, readonly=True)),
            ("nbdcopy", lambda: srv.uri),
        ])

        def one(name, s, r):
            if name == "nbdcopy":
                return nbdcopy_read(s, size)
            return dd_read(s.path, size)

        def check(name, s):
            if isinstance(s, Mount):
                sample_check(name, s.path, img, size)
        measure(wl, subjects, unit, one, check=check)
    wl.ratios("nbdfuse")
    ref, cp = wl.med("nbdfuse"), wl.med("nbdcopy")
    target(wl, "nbdfs", "higher", [(2, ref, "2x nbdfuse"), (0.85, cp, "85% nbdcopy")], unit)
    local_target(wl, unit)
    return [wl]


def target(wl, subject, better, options, unit):
    """PASS when SUBJECT's median reaches the lowest of OPTIONS [(factor, ref median, text)]."""
    row = wl.rows.get(subject)
    if row is None or not row.values:
        return
    opts = [(f * v, t) for f, v, t in options if v]
    if not opts:
        verdict(row, None, "no reference")
        return
    need, text = min(opts)
    verdict(row, row.median >= need, ">= %s %s (%s)" % (fmt(need), unit, text))


def local_target(wl, unit, better="higher"):
    row, ref = wl.rows.get("nbdfs local"), wl.med("qsd file")
    if row is None or not row.values or not ref:
        return
    ok = row.median >= ref if better == "higher" else row.median <= ref
    verdict(row, ok, "%s %s %s (qsd file)" % (">=" if better == "higher" else "<=", fmt(ref), unit))
    row.ratio = "%.2fx qsd file" % (row.median / ref)


def w1b(want):
    size = read_size()
    img = data_file(size)
    wl = Workload("W1b", "sequential read, fio 1M x4 psync")
    unit = "MiB/s"
    with contextlib.ExitStack() as st:
        srv = start_qemu_nbd(img, readonly=True)
        st.callback(srv.stop)
        subjects = open_subjects(st, wl, unit, [
            ("nbdfs", lambda: mount_nbdfs(srv.uri, readonly=True)),
            ("nbdfuse", lambda: mount_nbdfuse(srv.uri, readonly=True)),
            ("qsd file", lambda: mount_qsd_file(img, readonly=True)),
            ("nbdcopy", lambda: srv.uri),
        ])

        def one(name, s, r):
            if name == "nbdcopy":
                return nbdcopy_read(s, size)
            q = size // 4
            j = fio_json(["--name=w1b", "--filename=" + s.path, "--rw=read", "--bs=1M",
                          "--ioengine=psync", "--direct=0", "--numjobs=4", "--size=%d" % q,
                          "--offset_increment=%d" % q, "--group_reporting", "--allow_file_create=0",
                          "--invalidate=1"], timeout=600)
            job = j["jobs"][0]["read"]
            if job["io_bytes"] < size:
                raise BenchError("fio read %d bytes, expected %d" % (job["io_bytes"], size))
            return job["bw_bytes"] / MiB
        measure(wl, subjects, unit, one)
    wl.ratios("nbdfuse")
    target(wl, "nbdfs", "higher", [(1.5, wl.med("nbdfuse"), "1.5x nbdfuse"),
                                   (0.85, wl.med("nbdcopy"), "85% nbdcopy")], unit)
    return [wl]


def w2(want):
    size = read_size()
    img = data_file(size)
    secs = 3 if ARGS.quick else 10
    wl = Workload("W2", "4K random read, libaio qd16 O_DIRECT")
    unit = "IOPS"
    with contextlib.ExitStack() as st:
        srv = start_qemu_nbd(img, readonly=True)
        st.callback(srv.stop)
        subjects = open_subjects(st, wl, unit, [
            ("nbdfs", lambda: mount_nbdfs(srv.uri, readonly=True)),
            ("nbdfs local", lambda: mount_nbdfs(img, readonly=True)),
            ("nbdfuse", lambda: mount_nbdfuse(srv.uri, readonly=True)),
            ("qsd nbd", lambda: mount_qsd_nbd(srv.sock, readonly=True)),
            ("qsd file", lambda: mount_qsd_file(img, readonly=True)),
        ])

        def one(name, s, r):
            j = fio_json(["--name=w2", "--filename=" + s.path, "--rw=randread", "--bs=4k",
                          "--ioengine=libaio", "--iodepth=16", "--direct=1", "--time_based",
                          "--runtime=%d" % secs, "--size=%d" % size, "--norandommap",
                          "--randrepeat=0", "--allow_file_create=0", "--group_reporting"],
                         timeout=secs + 120)
            rd = j["jobs"][0]["read"]
            if j["jobs"][0].get("error"):
                raise BenchError("fio error %s" % j["jobs"][0]["error"])
            return rd["iops"]
        measure(wl, subjects, unit, one)
    wl.ratios("nbdfuse")
    row = wl.rows.get("nbdfs")
    ref, qn = wl.med("nbdfuse"), wl.med("qsd nbd")
    if row is not None and row.values:
        need = max(x for x in (2 * (ref or 0), qn or 0))
        if need:
            verdict(row, row.median >= need, ">= %s IOPS (2x nbdfuse and qsd nbd)" % fmt(need))
    local_target(wl, unit)
    return [wl]


# ---------------------------------------------------------------------------------------
# W3: sparse copy

def w3(want):
    size = 2 * GiB if ARGS.quick else 16 * GiB
    data = 16 * MiB if ARGS.quick else 64 * MiB
    n = 64
    img = new_path("w3-sparse.img")
    stride = make_sparse(img, size, n, data // n)
    wl = Workload("W3", "cp --sparse=always")
    with contextlib.ExitStack() as st:
        st.callback(lambda: os.path.exists(img) and os.unlink(img))
        srv = start_qemu_nbd(img, readonly=True)
        st.callback(srv.stop)
        subjects = open_subjects(st, wl, "s", [
            ("nbdfs", lambda: mount_nbdfs(srv.uri, readonly=True)),
            ("nbdfuse", lambda: mount_nbdfuse(srv.uri, readonly=True)),
            ("qsd nbd", lambda: mount_qsd_nbd(srv.sock, readonly=True)),
            ("qsd file", lambda: mount_qsd_file(img, readonly=True)),
            ("local", lambda: img),
        ], sub="W3 time")
        rchar = {name: [] for name, _ in subjects}
        dst = new_path("w3-copy.img")
        st.callback(lambda: os.path.exists(dst) and os.unlink(dst))
        last = {}

        def one(name, s, r):
            src = s.path if isinstance(s, Mount) else s
            if os.path.exists(dst):
                os.unlink(dst)
            t, p = timed(["sh", "-c", 'cp --sparse=always "$1" "$2" && grep ^rchar: /proc/$$/io',
                          "sh", src, dst], timeout=900)
            rchar[name].append(int(p.stdout.split()[-1]) / MiB)
            check_copy(name, img, dst, size, stride, data // n)
            last[name] = True
            os.unlink(dst)
            return t
        rows = measure(wl, subjects, "s", one, better="lower", sub="W3 time")
        for name, _ in subjects:
            rr = wl.row(name, "MiB", better="lower", sub="W3 rchar")
            rr.values = rchar[name]
            if rows[name].error:
                rr.error = rows[name].error
    wl.ratios("qsd file", sub="W3 time")
    wl.ratios("qsd file", sub="W3 rchar")
    t = wl.get("nbdfs", "W3 time")
    q = wl.med("qsd file", "W3 time")
    if t is not None and t.values and q:
        verdict(t, t.median <= q, "<= %s s (qsd file)" % fmt(q))
    b = wl.get("nbdfs", "W3 rchar")
    if b is not None and b.values:
        lim = 1.1 * data / MiB
        verdict(b, max(b.values) <= lim, "<= %s MiB (1.1x data, worst run)" % fmt(lim))
    NOTES.append("W3: %d GiB image, %d MiB of data in %d extents of %d KiB every %d MiB; rchar "
                 "is what cp read (all runs' worst decides)." % (size // GiB, data // MiB, n,
                                                                 data // n // 1024, stride // MiB))
    return [wl]


def check_copy(name, img, dst, size, stride, ext_len):
    st = os.stat(dst)
    if st.st_size != size:
        raise BenchError("%s: copy has size %d, expected %d" % (name, st.st_size, size))
    with open(img, "rb") as a, open(dst, "rb") as b:
        for k in (0, 1, size // stride // 2, size // stride - 1):
            for off in (k * stride, k * stride + ext_len):   # data, and the hole after it
                if os.pread(a.fileno(), ext_len, off) != os.pread(b.fileno(), ext_len, off):
                    raise BenchError("%s: copy differs from the image at %d" % (name, off))


# ---------------------------------------------------------------------------------------
# W4: sequential write

def subject_image(name, img):
    """The image subject NAME of a write workload writes: IMG, but for the
    passthrough=all mount, which has a copy of its own (a local mount locks its image)."""
    return img + ".all" if name == "nbdfs local all" else img


def writable_mounts(stack, srv, img):
    """The makers of the write workloads' subjects: SRV (qemu-nbd of IMG) and IMG itself."""
    all_img = copy_file(img, subject_image("nbdfs local all", img))
    stack.callback(lambda: os.path.exists(all_img) and os.unlink(all_img))
    return [
        ("nbdfs", lambda: mount_nbdfs(srv.uri)),
        ("nbdfs local", lambda: mount_nbdfs(img)),
        ("nbdfs local all", lambda: mount_nbdfs(all_img, extra=["--passthrough=all"])),
        ("nbdfuse", lambda: mount_nbdfuse(srv.uri)),
        ("qsd nbd", lambda: mount_qsd_nbd(srv.sock)),
        ("qsd file", lambda: mount_qsd_file(img)),
    ]


def w4(want):
    size = 128 * MiB if ARGS.quick else GiB
    src = data_file(read_size())
    src_mib = read_size() // MiB
    img = new_path("w4-target.img")
    run(["dd", "if=" + src, "of=" + img, "bs=1M", "count=%d" % (size // MiB), "status=none"])
    wl = Workload("W4", "sequential write, dd bs=1M conv=fsync")
    unit = "MiB/s"
    with contextlib.ExitStack() as st:
        st.callback(lambda: os.path.exists(img) and os.unlink(img))
        srv = start_qemu_nbd(img)
        st.callback(srv.stop)
        makers = writable_mounts(st, srv, img)
        subjects = open_subjects(st, wl, unit, makers)
        index = {name: i for i, (name, _) in enumerate(makers)}
        skips = {}

        def one(name, s, r):
            # A different source window for each subject and run, so that the check below
            # sees this subject's bytes and not a previous subject's.
            skip = (index[name] * 7 + r * 3 + 1) % max(1, src_mib - size // MiB)
            skips[name] = skip
            t, _ = timed(["dd", "if=" + src, "of=" + s.path, "bs=1M", "count=%d" % (size // MiB),
                          "skip=%d" % skip, "conv=fsync,notrunc", "status=none"], timeout=600)
            sample_check(name + " (written)", subject_image(name, img), src, size,
                         ref_offset=skip * MiB)
            return size / MiB / t
        measure(wl, subjects, unit, one)
    wl.ratios("nbdfuse")
    target(wl, "nbdfs", "higher", [(1.5, wl.med("nbdfuse"), "1.5x nbdfuse")], unit)
    local_target(wl, unit)
    return [wl]


# ---------------------------------------------------------------------------------------
# C1, C3: how costs grow with the work

def c1(want):
    counts = [1000, 10000, 100000] if ARGS.quick else [10000, 100000, 1000000]
    wl = Workload("C1", "lseek walk through nbdfs mount, by extent count")
    for n in counts:
        img = new_path("c1-extents.img")
        make_sparse(img, n * 64 * 1024, n, 4096)
        label = "%dk extents" % (n // 1000)
        t_row = wl.row(label, "us/ext", better="lower", sub="C1 time")
        m_row = wl.row(label, "MiB", better="lower", sub="C1 memory")
        try:
            with contextlib.ExitStack() as st:
                st.callback(lambda: os.path.exists(img) and os.unlink(img))
                srv = start_qemu_nbd(img, readonly=True)
                st.callback(srv.stop)
                for r in range(ARGS.runs):
                    m = mount_nbdfs(srv.uri, readonly=True)
                    try:
                        cnt, data, secs = seekwalk(m.path, timeout=600)
                        peak = vm_hwm_kib(m.proc.pid) / 1024
                    finally:
                        m.close()
                    if cnt != n or data != n * 4096:
                        raise BenchError("walk found %d extents / %d bytes, expected %d / %d"
                                         % (cnt, data, n, n * 4096))
                    t_row.values.append(secs / n * 1e6)
                    m_row.values.append(peak)
                    log("C1 run %d/%d %s: %s us/extent, %s MiB" % (r + 1, ARGS.runs, label,
                                                                    fmt(secs / n * 1e6), fmt(peak)))
            m_row.agg = max(m_row.values)
        except Exception as e:
            t_row.error = first_line(e)
            ERRORS.append("C1 %s: %s" % (label, e))
    first, last = ("%dk extents" % (counts[0] // 1000), "%dk extents" % (counts[-1] // 1000))
    wl.ratios(first, sub="C1 time")
    wl.ratios(first, sub="C1 memory")
    lo, hi = wl.med(first, sub="C1 time"), wl.get(last, sub="C1 time")
    if lo and hi is not None and hi.values:
        verdict(hi, hi.median <= 1.5 * lo, "<= %s us/ext (1.5x at %s)" % (fmt(1.5 * lo), first))
    mem = wl.get(last, sub="C1 memory")
    if mem is not None and mem.values:
        verdict(mem, mem.median <= 64, "<= 64 MiB (peak of the runs)")
    NOTES.append("C1: the W5 walk (4 KiB of data every 64 KiB) through a fresh `nbdfs mount` of "
                 "qemu-nbd per run; VmHWM of the mount process after the walk.")
    return [wl]


def c2(want):
    nruns = 1000
    wl = Workload("C2", "dirty/b0.map by export size")
    for tib in (1, 16, 64):
        label = "%d TiB" % tib
        t_row = wl.row(label, "s", better="lower", sub="C2 time")
        b_row = wl.row(label, "KiB", better="lower", sub="C2 bytes")
        img = new_path("c2.img")
        try:
            with contextlib.ExitStack() as st:
                st.callback(lambda: [os.unlink(p) for p in (img, img + ".bitmaps")
                                     if os.path.exists(p)])
                with open(img, "wb") as f:
                    f.truncate(tib * TiB)
                run([ARGS.nbdfs, "bitmap", "add", "-g", "1M", img, "b0"], timeout=60)
                srv = start_nbdfs_serve(img)
                st.callback(srv.stop)
                import nbd
                h = nbd.NBD()
                h.connect_unix(srv.sock)
                runs = []
                for i in range(nruns):             # the same runs, within the first TiB
                    h.pwrite(b"\x5a" * 4096, i * GiB)
                    runs.append((i * GiB, MiB))
                h.flush()
                h.shutdown()
                h.close()
                want_map = expected_map(runs)
                proxy = Proxy(srv.sock)
                st.callback(proxy.stop)
                for r in range(ARGS.runs):
                    m = mount_nbdfs(proxy.uri())
                    try:
                        drop_caches()
                        before = proxy.counts()[1]
                        t1 = time.perf_counter()
                        with open(os.path.join(m.mnt, "dirty", "b0.map")) as f:
                            text = f.read()
                        dt = time.perf_counter() - t1
                        got = proxy.counts()[1] - before
                    finally:
                        m.close()
                    if text != want_map:
                        raise BenchError("b0.map of %s is wrong: %d lines, expected %d"
                                         % (label, text.count("\n"), nruns))
                    t_row.values.append(dt)
                    b_row.values.append(got / 1024)
                    log("C2 run %d/%d %s: %s s, %s KiB" % (r + 1, ARGS.runs, label, fmt(dt),
                                                         fmt(got / 1024)))
        except Exception as e:
            t_row.error = b_row.error = first_line(e)
            ERRORS.append("C2 %s: %s" % (label, e))
    for sub in ("C2 time", "C2 bytes"):
        wl.ratios("1 TiB", sub=sub)
        lo, hi = wl.med("1 TiB", sub=sub), wl.get("64 TiB", sub=sub)
        if lo and hi is not None and hi.values:
            verdict(hi, hi.median <= 1.5 * lo, "<= %s (1.5x at 1 TiB)" % fmt(1.5 * lo))
    NOTES.append("C2: sparse images on tmpfs; b0 (1 MiB granularity) dirty at 1,000 places in "
                 "the first TiB; the mount reaches `nbdfs serve` through a counting proxy "
                 "(bytes: server to mount, while b0.map is read).")
    return [wl]


def c3(want):
    size = 64 * TiB
    img = new_path("c3-64t.img")
    make_sparse(img, size, 2, MiB)     # data at the start and at the middle...
    with open(img, "r+b") as f:        # ...and the last MiB
        f.seek(size - MiB)
        f.write(random.Random(3).randbytes(MiB))
    wl = Workload("C3", "64 TiB export: mount, first and last 4 KiB")
    with contextlib.ExitStack() as st:
        st.callback(lambda: os.path.exists(img) and os.unlink(img))
        srv = start_qemu_nbd(img, readonly=True)
        st.callback(srv.stop)
        with open(img, "rb") as f:
            want_first = f.read(4096)
            f.seek(size - 4096)
            want_last = f.read(4096)
        makers = [("nbdfs", lambda: mount_nbdfs(srv.uri, readonly=True)),
                  ("nbdfuse", lambda: mount_nbdfuse(srv.uri, readonly=True)),
                  ("qsd nbd", lambda: mount_qsd_nbd(srv.sock, readonly=True))]
        for r in range(ARGS.runs):
            for name, mk in makers:
                rows = [wl.row(name, "s", better="lower", sub="C3 " + what)
                        for what in ("mount", "first 4K", "last 4K")]
                if any(row.error for row in rows):
                    continue
                try:
                    t0 = time.perf_counter()
                    m = mk()
                    t1 = time.perf_counter()
                    try:
                        fd = os.open(m.path, os.O_RDONLY | os.O_DIRECT)
                        try:
                            buf = mmap_buffer(4096)
                            os.preadv(fd, [buf], 0)
                            first = bytes(buf)
                            t2 = time.perf_counter()
                            os.preadv(fd, [buf], size - 4096)
                            last = bytes(buf)
                            t3 = time.perf_counter()
                        finally:
                            os.close(fd)
                    finally:
                        m.close()
                    if first != want_first or last != want_last:
                        raise BenchError("wrong bytes at the start or end of the 64 TiB file")
                    for row, v in zip(rows, (t1 - t0, t2 - t1, t3 - t2)):
                        row.values.append(v)
                    log("C3 run %d/%d %s: mount %s s, first %s s, last %s s"
                        % (r + 1, ARGS.runs, name, fmt(t1 - t0), fmt(t2 - t1), fmt(t3 - t2)))
                except Exception as e:
                    for row in rows:
                        row.error = first_line(e)
                    ERRORS.append("C3 %s: %s" % (name, e))
        for what in ("mount", "first 4K", "last 4K"):
            wl.ratios("nbdfuse", sub="C3 " + what)
            row = wl.get("nbdfs", sub="C3 " + what)
            if row is not None and row.values:
                bound = 1.0 if what == "mount" else 0.1
                verdict(row, row.median <= bound, "<= %s s" % fmt(bound))
    NOTES.append("C3: a 64 TiB sparse raw image on tmpfs served by qemu-nbd; a fresh mount per "
                 "run; mount = until the benchmark sees the file; reads with O_DIRECT.")
    return [wl]


def mmap_buffer(size):
    """A page-aligned buffer for O_DIRECT."""
    return mmap.mmap(-1, size)


# ---------------------------------------------------------------------------------------
# W9: a VM disk's mix

def w9(want):
    size = 256 * MiB if ARGS.quick else GiB
    secs = 3 if ARGS.quick else 10
    img = copy_file(data_file(size), new_path("w9-disk.img"))
    wl = Workload("W9", "fio 4K randrw 70/30, qd32, O_DIRECT, fsync every 64 writes")
    unit = "IOPS"
    with contextlib.ExitStack() as st:
        st.callback(lambda: os.path.exists(img) and os.unlink(img))
        srv = start_qemu_nbd(img)
        st.callback(srv.stop)
        subjects = open_subjects(st, wl, unit, writable_mounts(st, srv, img))

        def one(name, s, r):
            j = fio_json(["--name=w9", "--filename=" + s.path, "--rw=randrw", "--rwmixread=70",
                          "--bs=4k", "--ioengine=libaio", "--iodepth=32", "--direct=1",
                          "--fsync=64", "--time_based", "--runtime=%d" % secs,
                          "--size=%d" % size, "--norandommap", "--randrepeat=0",
                          "--allow_file_create=0", "--group_reporting"], timeout=secs + 120)
            job = j["jobs"][0]
            if job.get("error"):
                raise BenchError("fio error %s" % job["error"])
            return job["read"]["iops"] + job["write"]["iops"]
        measure(wl, subjects, unit, one)
    wl.ratios("nbdfuse")
    row = wl.rows.get("nbdfs")
    peers = [v for v in (wl.med("nbdfuse"), wl.med("qsd nbd")) if v]
    if row is not None and row.values and peers:
        verdict(row, row.median >= max(peers), ">= %s IOPS (nbdfuse and qsd nbd)" % fmt(max(peers)))
    local_target(wl, unit)
    NOTES.append("W9: fio --rw=randrw --rwmixread=70 --bs=4k --iodepth=32 --direct=1 --fsync=64 "
                 "for %d s over a %d MiB image of data; all subjects on one image (qemu-nbd "
                 "serves it writable to the remote ones)." % (secs, size // MiB))
    return [wl]


# ---------------------------------------------------------------------------------------
# W5: lseek walk

def w5(want):
    n = 10000 if ARGS.quick else 100000
    size = n * 64 * 1024
    img = new_path("w5-extents.img")
    make_sparse(img, size, n, 4096)
    wl = Workload("W5", "SEEK_DATA/SEEK_HOLE walk")
    with contextlib.ExitStack() as st:
        st.callback(lambda: os.path.exists(img) and os.unlink(img))
        srv = start_qemu_nbd(img, readonly=True)
        st.callback(srv.stop)
        subjects = open_subjects(st, wl, "s", [
            ("nbdfs", lambda: mount_nbdfs(srv.uri, readonly=True)),
            ("nbdfs local", lambda: mount_nbdfs(img, readonly=True)),
            ("qsd nbd", lambda: mount_qsd_nbd(srv.sock, readonly=True)),
            ("qsd file", lambda: mount_qsd_file(img, readonly=True)),
            ("local", lambda: img),
        ])

        def one(name, s, r):
            path = s.path if isinstance(s, Mount) else s
            cnt, data, secs = seekwalk(path)
            if cnt != n or data != n * 4096:
                raise BenchError("walk found %d extents / %d bytes of data, expected %d / %d"
                                 % (cnt, data, n, n * 4096))
            return secs
        measure(wl, subjects, "s", one, better="lower")
    r = wl.row("nbdfuse", "s")
    r.error = "n/a: no lseek"
    wl.ratios("local")
    for name in ("nbdfs", "nbdfs local"):
        row = wl.rows.get(name)
        if row is not None and row.values:
            verdict(row, row.median <= 1.0, "<= 1 s")
    NOTES.append("W5: %d data extents of 4 KiB every 64 KiB (%d lseek calls per walk), "
                 "walked by tests/bench/seekwalk.c; extent count and data size checked." % (n, 2 * n + 1))
    return [wl]


# ---------------------------------------------------------------------------------------
# W6: server throughput

def w6(want):
    size = 512 * MiB if ARGS.quick else 2 * GiB
    src = data_file(size)
    img = copy_file(src, new_path("w6-export.img"))
    wl = Workload("W6", "server throughput (nbdcopy)")
    unit = "MiB/s"
    pki = Pki(new_path("w6-pki"))
    variants = [("", None, [("nbdfs serve", lambda: start_nbdfs_serve(img)),
                            ("qemu-nbd", lambda: start_qemu_nbd(img)),
                            ("nbdkit", lambda: start_nbdkit(img)),
                            ("nbd-server", lambda: start_nbd_server(img))]),
                # The same certificates for every server, x509, TLS required.
                (" tls", pki, [("nbdfs serve", lambda: start_nbdfs_serve(img, pki=pki)),
                               ("qemu-nbd", lambda: start_qemu_nbd(img, pki=pki)),
                               ("nbdkit", lambda: start_nbdkit(img, pki=pki))])]
    conns = []
    with contextlib.ExitStack() as st:
        st.callback(lambda: os.path.exists(img) and os.unlink(img))
        for tag, _, makers in variants:
            rd_label, wr_label = "W6%s read" % tag, "W6%s write" % tag
            servers = []
            for name, fn in makers:
                try:
                    s = fn()
                    st.callback(s.stop)
                    servers.append((name, s))
                except Exception as e:
                    wl.fail(name, unit, e, sub=rd_label)
            for name, s in servers:
                with contextlib.suppress(Exception):
                    j = json.loads(run(["nbdinfo", "--json", s.uri], timeout=30).stdout)
                    mc = j["exports"][0].get("can_multi_conn")
                    conns.append("%s%s %s" % (name, tag, "multi-conn" if mc else "1 connection"))

            def rd(name, s, r):
                return nbdcopy_read(s.uri, size)

            def wr(name, s, r):
                t, _ = timed(["nbdcopy", "--flush", src, s.uri], timeout=600)
                return size / MiB / t
            measure(wl, servers, unit, rd, sub=rd_label)
            measure(wl, servers, unit, wr, sub=wr_label)
            # The last write left the source's bytes in the image.
            for name, s in servers[:1]:
                sample_check("W6%s image after writes" % tag, img, src, size)
            for lab in (rd_label, wr_label):
                peers = [(wl.med(p, lab), p) for p in ("qemu-nbd", "nbdkit", "nbd-server")]
                peers = [(v, p) for v, p in peers if v]
                if peers:
                    best, bp = max(peers)
                    wl.ratios(bp, sub=lab)
                    row = wl.get("nbdfs serve", lab)
                    if row is not None and row.values:
                        verdict(row, row.median >= best,
                                ">= %s MiB/s (best peer, %s)" % (fmt(best), bp))
            for _, s in servers:
                s.stop()
    NOTES.append("W6: %d MiB; nbdcopy defaults (%s); writes with --flush. W6 tls: x509, TLS "
                 "required, the same certificates for every server (nbd-server left out)."
                 % (size // MiB, ", ".join(conns)))
    return [wl]


# ---------------------------------------------------------------------------------------
# W7, W8, B2: the 1 TiB image with a dirty bitmap

def big_image():
    """The 1 TiB image: N data extents of 4 KiB (2N extents of base:allocation), bitmap b0
    with N/10 dirty runs written through `nbdfs serve`.  Returns (img, size, runs, server)."""
    n = 10000 if ARGS.quick else 100000
    size = TiB
    img = new_path("big.img")
    stride = 10 * MiB if not ARGS.quick else 100 * MiB
    assert n * stride <= size
    fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        buf = b"\xa5" * 4096
        for k in range(n):
            os.pwrite(fd, buf, k * stride)
    finally:
        os.close(fd)
    run([ARGS.nbdfs, "bitmap", "add", img, "b0"], timeout=60)
    srv = start_nbdfs_serve(img)
    import nbd
    h = nbd.NBD()
    runs = []
    try:
        h.connect_unix(srv.sock)
        buf = b"\x5a" * 4096
        for i in range(n // 10):
            off = i * 10 * stride          # on a data extent: base:allocation stays 2n extents
            h.pwrite(buf, off)
            runs.append((off, 64 * 1024))  # the default granularity
        h.flush()
        h.shutdown()
    finally:
        h.close()
    return img, size, n, runs, srv


def expected_map(runs):
    return "".join("%d %d\n" % r for r in runs)


def mount_hwm_activity(m):
    """The W8 activity on mount M: a seek walk of the disk, the maps, b0.img's data."""
    seekwalk(m.path, timeout=600)
    d = os.path.join(m.mnt, "dirty")
    with open(os.path.join(d, "b0.map")) as f:
        f.read()
    with open(os.path.join(d, "b0.json")) as f:
        json.load(f)
    fd = os.open(os.path.join(d, "b0.img"), os.O_RDONLY)
    try:
        off = 0
        while True:
            try:
                dstart = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            hend = os.lseek(fd, dstart, os.SEEK_HOLE)
            pos = dstart
            while pos < hend:
                got = os.pread(fd, min(MiB, hend - pos), pos)
                if not got:
                    raise BenchError("short read of b0.img at %d" % pos)
                pos += len(got)
            off = hend
    finally:
        os.close(fd)


def w7_w8_b2(want):
    wls = []
    w7 = Workload("W7", "dirty/b0.map of 1 TiB")
    w8 = Workload("W8", "memory (VmHWM)")
    b2 = Workload("B2", "block status filter, one call")
    with contextlib.ExitStack() as st:
        t0 = time.monotonic()
        img, size, n, runs, srv = big_image()
        st.callback(lambda: [os.unlink(p) for p in (img, img + ".bitmaps") if os.path.exists(p)])
        st.callback(srv.stop)
        log("1 TiB image: %d data extents, %d dirty runs (%.1f s)" % (n, len(runs), time.monotonic() - t0))
        want_map = expected_map(runs)
        proxy = Proxy(srv.sock)
        st.callback(proxy.stop)
        phases = []   # the server's VmHWM after each phase

        def phase(what):
            with contextlib.suppress(Exception):
                phases.append((what, vm_hwm_kib(srv.proc.pid) / 1024))
                log("nbdfs serve VmHWM after %s: %s MiB" % (what, fmt(phases[-1][1])))
        phase("the dirty writes")

        if "W7" in want:
            wls.append(w7)
            t_row = w7.row("nbdfs", "s", better="lower", sub="W7 time")
            b_row = w7.row("nbdfs", "KiB", better="lower", sub="W7 bytes")
            walk_row = w7.row("libnbd walk", "KiB", better="lower", sub="W7 bytes")
            for r in range(ARGS.runs):
                # time: a fresh mount straight to the server
                for row, uri, counted in ((t_row, srv.uri, False), (b_row, proxy.uri(), True)):
                    try:
                        m = mount_nbdfs(uri)
                        try:
                            drop_caches()
                            before = proxy.counts()[1] if counted else 0
                            t1 = time.perf_counter()
                            with open(os.path.join(m.mnt, "dirty", "b0.map")) as f:
                                text = f.read()
                            dt = time.perf_counter() - t1
                            after = proxy.counts()[1] if counted else 0
                        finally:
                            m.close()
                        if text != want_map:
                            raise BenchError("b0.map is wrong: %d lines, expected %d (first line %r, expected %r)"
                                             % (text.count("\n"), len(runs), text[:40], want_map[:40]))
                        v = (after - before) / 1024 if counted else dt
                        row.values.append(v)
                        log("%s run %d/%d nbdfs %s %s" % (row.workload, r + 1, ARGS.runs, fmt(v), row.unit))
                    except Exception as e:
                        row.error = first_line(e)
                        ERRORS.append("%s nbdfs: %s" % (row.workload, e))
                        log("%s nbdfs: ERROR %s" % (row.workload, e))
                try:
                    v, reqs = unfiltered_walk(proxy, size)
                    walk_row.values.append(v / 1024)
                    log("W7 bytes run %d/%d libnbd walk %s KiB (%d requests)" % (r + 1, ARGS.runs, fmt(v / 1024), reqs))
                except Exception as e:
                    walk_row.error = first_line(e)
                    ERRORS.append("W7 libnbd walk: %s" % e)
            if t_row.values:
                verdict(t_row, t_row.median <= 0.5, "<= 0.5 s")
            if b_row.values and walk_row.values:
                lim = walk_row.median / 10
                verdict(b_row, max(b_row.values) <= lim, "<= %s KiB (1/10 of the unfiltered walk)" % fmt(lim))
                b_row.ratio = "%.3fx walk" % (b_row.median / walk_row.median)
                walk_row.ratio = "ref"
            phase("W7")
            NOTES.append("W7: 1 TiB image, %d base:allocation extents, %d dirty runs of 64 KiB; "
                         "each run mounts afresh; map content checked; bytes = server-to-client "
                         "bytes through the counting proxy while reading b0.map (the walk: while "
                         "walking, handshake excluded)." % (2 * n, len(runs)))

        if "W8" in want or "B2" in want:
            # B2 first: W8's server figure includes it.
            if "B2" in want:
                wls.append(b2)
                row = b2.row("nbdfs serve", "ms", better="lower")
                try:
                    info = block_status_filter_times(srv.sock, size)
                    row.values = info["times"]
                    verdict(row, row.median < 50, "< 50 ms")
                    NOTES.append("B2: one block_status_filter(b0) of the whole 1 TiB: %d extents "
                                 "returned covering %d GiB (%s)." % (info["extents"], info["covered"] // GiB,
                                                                      "complete" if info["covered"] >= size
                                                                      else "the server answered a prefix"))
                except Exception as e:
                    b2.fail("nbdfs serve", "ms", e)
                phase("B2")
        if "W8" in want:
            wls.append(w8)
            mrow = w8.row("nbdfs mount", "MiB", better="lower", sub="W8 mount")
            for r in range(ARGS.runs):
                try:
                    m = mount_nbdfs(srv.uri)
                    try:
                        mount_hwm_activity(m)
                        hwm = vm_hwm_kib(m.proc.pid)
                    finally:
                        m.close()
                    mrow.values.append(hwm / 1024)
                    log("W8 run %d/%d mount VmHWM %s MiB" % (r + 1, ARGS.runs, fmt(hwm / 1024)))
                except Exception as e:
                    mrow.error = first_line(e)
                    ERRORS.append("W8 mount: %s" % e)
                    log("W8 mount: ERROR %s" % e)
            if mrow.values:
                mrow.agg = max(mrow.values)
                verdict(mrow, mrow.agg <= 64, "<= 64 MiB (peak of the runs)")
            phase("the W8 mounts")
            srow = w8.row("nbdfs serve", "MiB", better="lower", sub="W8 serve")
            if phases:
                srow.values = [phases[-1][1]]
                lim = 16 + 2 * 1 * (size / TiB)
                verdict(srow, srow.median <= lim, "<= %s MiB (16 + 2 per bitmap per TiB)" % fmt(lim))
            NOTES.append("W8: mount = VmHWM of `nbdfs mount -f` of the 1 TiB export after a seek "
                         "walk of the disk (%d extents), b0.map, b0.json and every data byte of "
                         "b0.img (fresh mount each run, peak reported); serve = VmHWM of the "
                         "1 TiB server with one bitmap at the end; after each phase it was: %s."
                         % (2 * n, ", ".join("%s %s MiB" % (w, fmt(v)) for w, v in phases)))
        code = srv.stop()
        if code != 0:
            ERRORS.append("nbdfs serve (1 TiB) exited %s on SIGTERM:\n%s" % (code, logtail(srv.proc)))
    return wls


def unfiltered_walk(proxy, size):
    """Server-to-client bytes of a libnbd walk of block status of base:allocation + b0
    without payload filtering, through PROXY.  Returns (bytes, requests)."""
    import nbd
    h = nbd.NBD()
    try:
        h.add_meta_context("base:allocation")
        h.add_meta_context("qemu:dirty-bitmap:b0")
        h.connect_unix(proxy.sock)
        before = proxy.counts()[1]
        off, reqs = 0, 0
        while off < size:
            ends = {}

            def cb(ctx, offset, entries, err):
                e = offset
                for length, _flags in entries:
                    e += length
                ends[ctx] = e
                return 0
            h.block_status_64(size - off, off, cb)
            reqs += 1
            nxt = min(ends.values()) if ends else off
            if nxt <= off:
                raise BenchError("block status made no progress at %d" % off)
            off = nxt
        after = proxy.counts()[1]
        h.shutdown()
    finally:
        h.close()
    return after - before, reqs


def block_status_filter_times(sock, size):
    import nbd
    h = nbd.NBD()
    try:
        h.add_meta_context("base:allocation")
        h.add_meta_context("qemu:dirty-bitmap:b0")
        h.connect_unix(sock)
        if not h.can_block_status_payload():
            raise BenchError("server does not advertise block status payloads")
        times, extents, covered = [], 0, 0
        for r in range(ARGS.runs):
            got = {"n": 0, "end": 0}

            def cb(ctx, offset, entries, err):
                got["n"] += len(entries)
                e = offset
                for length, _flags in entries:
                    e += length
                got["end"] = e
                return 0
            t0 = time.perf_counter()
            h.block_status_filter(size, 0, ["qemu:dirty-bitmap:b0"], cb)
            times.append((time.perf_counter() - t0) * 1000)
            log("B2 run %d/%d %s ms (%d extents)" % (r + 1, ARGS.runs, fmt(times[-1]), got["n"]))
            extents, covered = got["n"], got["end"]
        h.shutdown()
    finally:
        h.close()
    return {"times": times, "extents": extents, "covered": covered}


# ---------------------------------------------------------------------------------------
# B1: bitmap cost

def b1(want):
    size = 512 * MiB if ARGS.quick else 2 * GiB
    src = data_file(size)
    img = copy_file(src, new_path("b1-export.img"))
    wl = Workload("B1", "nbdcopy write into nbdfs serve, bitmaps")
    unit = "MiB/s"
    side = img + ".bitmaps"
    configs = [("0 bitmaps", 0), ("3 bitmaps", 3)]
    with contextlib.ExitStack() as st:
        st.callback(lambda: [os.unlink(p) for p in (img, side) if os.path.exists(p)])

        def one(name, nbm, r):
            if os.path.exists(side):
                os.unlink(side)
            for i in range(nbm):
                run([ARGS.nbdfs, "bitmap", "add", img, "b%d" % i], timeout=60)
            srv = start_nbdfs_serve(img)
            try:
                t, _ = timed(["nbdcopy", "--flush", src, srv.uri], timeout=600)
            finally:
                code = srv.stop()
            if code != 0:
                raise BenchError("nbdfs serve exited %s on SIGTERM: %s" % (code, logtail(srv.proc)))
            if nbm:
                lst = json.loads(run([ARGS.nbdfs, "bitmap", "list", "--json", img], timeout=60).stdout)
                text = json.dumps(lst)
                if "b0" not in text:
                    raise BenchError("bitmap list after the copy: %s" % text[:200])
            return size / MiB / t
        measure(wl, configs, unit, one)
    wl.ratios("0 bitmaps")
    row, ref = wl.rows.get("3 bitmaps"), wl.med("0 bitmaps")
    if row is not None and row.values and ref:
        verdict(row, row.median >= 0.95 * ref, ">= %s MiB/s (95%% of 0 bitmaps)" % fmt(0.95 * ref))
    NOTES.append("B1: `nbdcopy --flush` of %d MiB into `nbdfs serve` (server restarted for every "
                 "run, bitmaps freshly added)." % (size // MiB))
    return [wl]


# ---------------------------------------------------------------------------------------
# B3: copy-before-write cost

def b3(want):
    size = 512 * MiB if ARGS.quick else 2 * GiB
    src = data_file(size)
    img = copy_file(src, new_path("b3-export.img"))
    wl = Workload("B3", "nbdcopy rewrite of nbdfs serve's image, backup view open or not")
    unit = "MiB/s"
    configs = [("no backup view", 0), ("view, 1st rewrite", 1), ("view, 2nd rewrite", 2)]
    scratch = wl.row("view: scratch/rewritten", "ratio", better="lower", sub="B3 scratch")
    with contextlib.ExitStack() as st:
        st.callback(lambda: os.path.exists(img) and os.unlink(img))

        def one(name, mode, r):
            srv = start_nbdfs_serve(img)
            try:
                if mode:
                    run([ARGS.nbdfs, "backup", "begin", img], timeout=60)
                if mode == 2:
                    run(["nbdcopy", "--flush", src, srv.uri], timeout=600)
                t, _ = timed(["nbdcopy", "--flush", src, srv.uri], timeout=600)
                if mode == 1:
                    views = json.loads(run([ARGS.nbdfs, "backup", "list", "--json", img],
                                           timeout=60).stdout)
                    if len(views) != 1 or views[0]["broken"]:
                        raise BenchError("backup list: %s" % views)
                    scratch.values.append(views[0]["scratch-bytes"] / size)
                if mode:
                    run([ARGS.nbdfs, "backup", "end", img], timeout=60)
            finally:
                code = srv.stop()
            if code != 0:
                raise BenchError("nbdfs serve exited %s on SIGTERM: %s" % (code, logtail(srv.proc)))
            return size / MiB / t
        measure(wl, configs, unit, one)
    wl.ratios("no backup view")
    row, ref = wl.rows.get("view, 2nd rewrite"), wl.med("no backup view")
    if row is not None and row.values and ref:
        verdict(row, row.median >= 0.95 * ref, ">= %s MiB/s (95%% of no view)" % fmt(0.95 * ref))
    if scratch.values:
        verdict(scratch, max(scratch.values) <= 1.0, "<= 1 (worst run)")
    NOTES.append("B3: `nbdcopy --flush` of %d MiB over the whole image (server restarted for "
                 "every run; the view's scratch file beside the image, on the same disk)."
                 % (size // MiB))
    return [wl]


# ---------------------------------------------------------------------------------------
# S1, S2: servers under hostile clients

def server_peak_mib(srv):
    return vm_hwm_kib(srv.proc.pid) / 1024


def s1(want):
    """Another client's 4 KiB reads beside 20 slow readers, and the servers' peak memory."""
    n, data = 20, 64 * MiB
    seconds = 2 if ARGS.quick else 5
    img = copy_file(data_file(data), new_path("s1.img"))
    wl = Workload("S1", "4 KiB reads beside 20 slow readers")
    # Room for 21 clients on qemu-nbd (its -e caps connections).
    makers = [("nbdfs serve", lambda: start_nbdfs_serve(img)),
              ("qemu-nbd", lambda: start_qemu_nbd(img, opts=["-f", "raw", "-e", "32",
                                                             "--persistent"])),
              ("nbdkit", lambda: start_nbdkit(img))]

    def one(name, maker, r):
        srv = maker()
        try:
            slow = hostile.SlowReaders(srv.sock, n, data)
            time.sleep(2)
            try:
                lat = hostile.read_latencies(srv.uri, seconds, data)
                # Before the slow clients hang up: a server may not survive that.
                peak = server_peak_mib(srv)
            finally:
                slow.stop()
            wl.row(name, "MiB", "lower", sub="S1 memory").values.append(peak)
            wl.row(name, "ms", "lower", sub="S1 p99").values.append(
                lat[len(lat) * 99 // 100] * 1000)
        finally:
            srv.stop()
        return lat[-1] * 1000
    with contextlib.ExitStack() as st:
        st.callback(lambda: os.path.exists(img) and os.unlink(img))
        measure(wl, makers, "ms", one, better="lower", sub="S1 worst")
    for sub in ("S1 worst", "S1 p99", "S1 memory"):
        wl.ratios("qemu-nbd", sub=sub)
    row = wl.get("nbdfs serve", "S1 worst")
    if row is not None and row.values:
        verdict(row, row.median <= 100, "<= 100 ms")
    row = wl.get("nbdfs serve", "S1 memory")
    if row is not None and row.values:
        verdict(row, row.median <= 256 + 64, "<= 320 MiB (256 MiB --max-buffered + the rest)")
    NOTES.append("S1: %d clients each queue 64 READs of 1 MiB and take replies at ~1.25 MiB/s; "
                 "another client's 4 KiB reads for %d s (worst, p99); the server's VmHWM. "
                 "qemu-nbd -e 32, nbdkit file." % (n, seconds))
    return [wl]


def s2(want):
    """Servers' peak memory under 3 clients flooding block status over many extents."""
    size, gran, nbm = (128 * MiB if ARGS.quick else 512 * MiB), 4096, 8
    bitmaps = ["b%d" % i for i in range(nbm)]
    raw = new_path("s2.img")
    nbdfs_test.make_image(raw, size)
    qcow = new_path("s2.qcow2")
    wl = Workload("S2", "3 block-status floods")
    with contextlib.ExitStack() as st:
        st.callback(lambda: [os.unlink(p) for p in (raw, raw + ".bitmaps", qcow)
                             if os.path.exists(p)])
        for b in bitmaps:
            run([ARGS.nbdfs, "bitmap", "add", "-g", str(gran), raw, b])
        srv = start_nbdfs_serve(raw)
        try:
            hostile.write_every_other_block(srv.uri, size, gran)
        finally:
            srv.stop()
        # The same runs in a qcow2 with the same bitmaps, for qemu-nbd.
        run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, str(size)])
        for b in bitmaps:
            run(["qemu-img", "bitmap", "--add", "-g", str(gran), qcow, b])
        run(["qemu-img", "convert", "-n", "--target-is-zero", "-f", "raw", "-O", "qcow2",
             raw, qcow], timeout=300)
        all_ctx = ["base:allocation"] + ["qemu:dirty-bitmap:" + b for b in bitmaps]
        qemu_opts = ["-f", "qcow2", "-e", "32", "--persistent"]
        for b in bitmaps:
            qemu_opts += ["-B", b]
        ext, sr = hostile.rc.EXTENDED, hostile.rc.STRUCTURED
        makers = [("nbdfs serve", (lambda: start_nbdfs_serve(raw), all_ctx, ext)),
                  ("qemu-nbd", (lambda: start_qemu_nbd(qcow, opts=qemu_opts), all_ctx, ext)),
                  ("nbdkit", (lambda: start_nbdkit(raw), ["base:allocation"], sr))]

        def one(name, maker, r):
            start, contexts, mode = maker
            srv = start()
            try:
                base = hostile.rss_mib(srv.proc.pid)
                floods = [hostile.block_status_flood(srv.sock, contexts, 64, size, mode)
                          for _ in range(3)]
                time.sleep(3)
                peak = server_peak_mib(srv)
                for c in floods:
                    c.close()
                return peak - base
            finally:
                srv.stop()
        measure(wl, makers, "MiB", one, better="lower", sub="S2 growth")
    wl.ratios("qemu-nbd", sub="S2 growth")
    row = wl.get("nbdfs serve", "S2 growth")
    if row is not None and row.values:
        verdict(row, row.median <= 256, "<= 256 MiB (--max-buffered)")
    NOTES.append("S2: a %d MiB image written every other 4 KiB (%d runs in base:allocation and "
                 "in each of %d bitmaps of 4 KiB granularity); 3 clients select every context "
                 "(nbdfs, qemu-nbd: 9, extended headers; nbdkit 1.32: base:allocation only, "
                 "structured replies), send 64 BLOCK_STATUS requests over the whole image each "
                 "and read nothing: the server's VmHWM growth." % (size // MiB, size // gran, nbm))
    return [wl]


# ---------------------------------------------------------------------------------------
# Table

def machine():
    lines = []
    lines.append("date (end of the run): " + datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z"))
    lines.append("kernel: " + " ".join(os.uname()[i] for i in (0, 2, 4)))
    lines.append("nproc: %d" % os.cpu_count())
    with contextlib.suppress(Exception):
        lines.append("free -g:\n" + run(["free", "-g"], timeout=10).stdout.rstrip())
    with contextlib.suppress(Exception):
        lines.append("loadavg at end: " + open("/proc/loadavg").read().strip())
    vers = []
    for argv in (["qemu-nbd", "--version"], ["nbdfuse", "--version"], ["nbdkit", "--version"],
                 ["fio", "--version"], [ARGS.nbdfs, "--version"]):
        with contextlib.suppress(Exception):
            vers.append(run(argv, timeout=10, check=False).stdout.splitlines()[0].strip())
    lines.append("versions: " + "; ".join(vers))
    with contextlib.suppress(Exception):
        head = run(["git", "-C", TOP, "rev-parse", "--short", "HEAD"], timeout=10).stdout.strip()
        built = datetime.datetime.fromtimestamp(os.stat(ARGS.nbdfs).st_mtime).astimezone()
        lines.append("nbdfs: %s, built %s, tree at commit %s (plus any uncommitted changes)"
                     % (ARGS.nbdfs, built.strftime("%Y-%m-%d %H:%M:%S %z"), head))
    lines.append("options: runs=%d%s%s, workdir %s" % (ARGS.runs, ", quick" if ARGS.quick else "",
                                                      ", only " + ARGS.only if ARGS.only else "",
                                                      ARGS.workdir))
    return "\n".join(lines)


def table():
    hdr = ["workload", "subject", "median", "range (min-max)", "unit", "ratio", "target (nbdfs)"]
    rows = []
    for r in RESULTS:
        if r.error and not r.values:
            err = r.error if len(r.error) <= 70 else r.error[:67] + "..."
            if r.subject.startswith("nbdfs") and not r.error.startswith("n/a"):
                err = "MISS (error: %s)" % err
            rows.append([r.workload, r.subject, "-", "-", r.unit, "", err])
            continue
        rng = "%s-%s" % (fmt(min(r.values)), fmt(max(r.values))) if r.values else "-"
        med = fmt(r.median) + (" (peak)" if r.agg is not None else "")
        v = r.verdict
        if r.error:
            v = (v + "; " if v else "") + "ERROR: " + (r.error if len(r.error) <= 70 else r.error[:67] + "...")
        rows.append([r.workload, r.subject, med, rng, r.unit, r.ratio, v])
    widths = [max(len(str(x[i])) for x in rows + [hdr]) for i in range(len(hdr) - 1)]
    out = []

    def line(cells):
        s = "  ".join(str(c).ljust(w) if i not in (2, 3) else str(c).rjust(w)
                      for i, (c, w) in enumerate(zip(cells[:-1], widths)))
        return (s + "  " + cells[-1]).rstrip()
    out.append(line(hdr))
    out.append("-" * (sum(widths) + 2 * len(widths) + 14))
    prev = None
    for cells in rows:
        wl = cells[0].split()[0]
        if prev is not None and wl != prev:
            out.append("")
        prev = wl
        out.append(line(cells))
    return "\n".join(out)


def report():
    text = []
    text.append("nbdfs benchmark (%d runs each, median and range; ratio = median / reference's median)"
                % ARGS.runs)
    text.append(machine())
    text.append("")
    text.append(table())
    text.append("")
    text.append("Subjects: nbdfs = `nbdfs mount` of a URI (qemu-nbd %s on a unix socket); nbdfs local "
                "= `nbdfs mount IMAGE` (in-process server); nbdfuse = libnbd's, default options; qsd = "
                "qemu-storage-daemon FUSE export of an NBD node (qsd nbd) or of the raw file (qsd file, "
                "locking=off); read workloads mount read-only. Images on tmpfs; page cache dropped "
                "before every run." % " ".join(QEMU_NBD_OPTS))
    for n in NOTES:
        text.append(n)
    if ARGS.quick:
        text.append("QUICK RUN: reduced sizes; verdicts are indicative only.")
    if ERRORS:
        text.append("")
        text.append("Errors (logs of every process started: %s):" % LOGS_KEPT)
        for e in ERRORS:
            text.append("  - " + e.replace("\n", "\n    "))
    return "\n".join(text)


# ---------------------------------------------------------------------------------------

def default_nbdfs():
    if os.environ.get("NBDFS"):
        return os.environ["NBDFS"]
    p = os.path.join(TOP, "build", "fuse", "nbdfs")
    if os.access(p, os.X_OK):
        return p
    return shutil.which("nbdfs") or "nbdfs"


def on_signal(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def main():
    global REG, ARGS, WORK
    if len(sys.argv) >= 2 and sys.argv[1] == "--proxy":
        proxy_main(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description="nbdfs benchmark (see the top of this file)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="")
    ap.add_argument("--nbdfs", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workdir", default="/dev/shm")
    ap.add_argument("--output", default=None)
    ARGS = ap.parse_args()
    if ARGS.runs < 1:
        ap.error("--runs must be at least 1")
    ARGS.nbdfs = os.path.abspath(ARGS.nbdfs) if ARGS.nbdfs else default_nbdfs()
    want = ALL_WORKLOADS
    if ARGS.only:
        lower = {w.lower(): w for w in ALL_WORKLOADS}
        want = []
        for w in ARGS.only.split(","):
            w = w.strip()
            if w.lower() not in lower:
                ap.error("unknown workload %r (known: %s)" % (w, " ".join(ALL_WORKLOADS)))
            want.append(lower[w.lower()])
    if os.geteuid() != 0:
        ap.error("must run as root (drop_caches, FUSE mounts)")
    for tool in ("qemu-nbd", "qemu-storage-daemon", "nbdfuse", "nbdcopy", "nbdinfo", "nbdkit",
                 "nbd-server", "fio", "fusermount3", "cc", "dd", "cp"):
        if not shutil.which(tool):
            ap.error("%s not found (scripts/setup.sh installs it)" % tool)

    WORK = os.path.join(ARGS.workdir, "nbdfs-bench.%d" % os.getpid())
    global LOGS_KEPT
    LOGS_KEPT = os.path.join(ARGS.workdir, "nbdfs-bench-logs.%d" % os.getpid())
    os.makedirs(os.path.join(WORK, "logs"))
    REG = Registry(os.path.join(WORK, "logs"))
    # SIGINT too: a shell starts background jobs with SIGINT ignored.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    status = 0
    t_start = time.monotonic()
    try:
        log("nbdfs: %s; work directory %s" % (ARGS.nbdfs, WORK))
        build_seekwalk()
        steps = [("W1", w1), ("W1b", w1b), ("W2", w2), ("W3", w3), ("W4", w4), ("W5", w5),
                 ("W6", w6), (None, w7_w8_b2), ("W9", w9), ("B1", b1), ("B3", b3), ("C1", c1),
                 ("C2", c2), ("C3", c3), ("S1", s1),
                 ("S2", s2)]
        for name, fn in steps:
            if name is None:
                if not any(w in want for w in ("W7", "W8", "B2")):
                    continue
            elif name not in want:
                continue
            t0 = time.monotonic()
            CURRENT[0] = name or "W7/W8/B2"
            log("== %s" % (name or "W7/W8/B2"))
            try:
                fn(want)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                ERRORS.append("%s: %s" % (name or "W7/W8/B2", e))
                log("%s aborted: %s" % (name or "W7/W8/B2", e))
                REG.cleanup()
            log("%s done in %.0f s" % (name or "W7/W8/B2", time.monotonic() - t0))
        # The table's order: workloads as listed.
        order = {w: i for i, w in enumerate(ALL_WORKLOADS)}
        RESULTS.sort(key=lambda r: order.get(r.workload.split()[0], 99))
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        status = 130
    finally:
        REG.cleanup()
        for p in list(DATA_CACHE.values()):
            with contextlib.suppress(OSError):
                os.unlink(p)
        leftovers = [m for m in REG.mounts if is_mounted(m)]
        if leftovers:
            log("still mounted: %s" % leftovers)
        else:
            # The processes' logs are kept when something went wrong.
            if ERRORS or status:
                with contextlib.suppress(OSError):
                    shutil.move(os.path.join(WORK, "logs"), LOGS_KEPT)
                    log("logs of every process: %s" % LOGS_KEPT)
            shutil.rmtree(WORK, ignore_errors=True)
    log("total %.0f s" % (time.monotonic() - t_start))
    text = report()
    print(text)
    if ARGS.output:
        with open(ARGS.output, "w") as f:
            f.write(text + "\n")
    if status == 0 and ERRORS:
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
