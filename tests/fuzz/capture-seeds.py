#!/usr/bin/python3
"""Record real client conversations with 'nbdfs serve' as fuzzing seeds.

A unix-socket proxy sits between each client (nbdinfo, nbdcopy, qemu-io,
qemu-img, qemu-nbd --list, libnbd without extended headers) and the server
and records what the client sent.  Each conversation becomes a seed for
fuzz-handshake (the whole stream) and, cut after NBD_OPT_GO, for
fuzz-transmission (a mode byte, then the requests).

Usage: capture-seeds.py NBDFS OUTDIR      (writes OUTDIR/handshake, OUTDIR/transmission)
"""
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

NBDFS, OUT = sys.argv[1], sys.argv[2]
OPT_GO, OPT_EXPORT_NAME, OPT_SR, OPT_EH, OPT_SET_META = 7, 1, 8, 11, 10


def proxy(listen_path, server_path, record):
    """Accept clients on LISTEN_PATH, forward to SERVER_PATH, append client bytes to RECORD."""
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(listen_path)
    ls.listen(16)
    ls.settimeout(0.2)

    def pump(src, dst, buf):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if buf is not None:
                buf.extend(data)
            try:
                dst.sendall(data)
            except OSError:        # the other side hung up first (ABORT): fine
                return

    def serve():
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except socket.timeout:
                continue
            s = socket.socket(socket.AF_UNIX)
            s.connect(server_path)
            buf = bytearray()
            record.append(buf)
            threading.Thread(target=pump, args=(c, s, buf), daemon=True).start()
            threading.Thread(target=pump, args=(s, c, None), daemon=True).start()

    stop = threading.Event()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return stop


def transmission_seed(stream):
    """Mode byte + the bytes after GO, or None if the stream never reached GO."""
    pos, mode, meta = 4, 2, False
    while pos + 16 <= len(stream):
        code, length = struct.unpack_from(">II", stream, pos + 8)
        pos += 16 + length
        if code == OPT_EH:
            mode = 0
        elif code == OPT_SR and mode != 0:
            mode = 1
        elif code == OPT_SET_META:
            meta = True
        elif code in (OPT_GO, OPT_EXPORT_NAME):
            return bytes([mode | (4 if meta else 0)]) + bytes(stream[pos:])
    return None


def main():
    tmp = tempfile.mkdtemp(prefix="nbdfs-seeds-")
    img = os.path.join(tmp, "disk.img")
    with open(img, "wb") as f:
        f.truncate(8 << 20)
        f.seek(1 << 20)
        f.write(b"nbdfs" * 1000)
    subprocess.run([NBDFS, "bitmap", "add", img, "b0"], check=True)
    ssock, psock = os.path.join(tmp, "s.sock"), os.path.join(tmp, "p.sock")
    srv = subprocess.Popen([NBDFS, "serve", "-U", ssock, img])
    for _ in range(100):
        if os.path.exists(ssock):
            break
        time.sleep(0.05)
    record = []
    stop = proxy(psock, ssock, record)
    uri = "nbd+unix:///?socket=" + psock
    clients = {
        "nbdinfo-json": ["nbdinfo", "--json", uri],
        "nbdinfo-map": ["nbdinfo", "--map", uri],
        "nbdinfo-map-bitmap": ["nbdinfo", "--map=qemu:dirty-bitmap:b0", uri],
        "nbdinfo-list": ["nbdinfo", "--list", uri],
        "nbdcopy-read": ["nbdcopy", uri, "null:"],
        "qemu-io-write": ["qemu-io", "-f", "raw", "-c", "write -P 7 4k 8k", "-c",
                          "write -z 64k 64k", "-c", "discard 128k 64k", "-c", "flush",
                          "-c", "read 0 16k", uri],
        "qemu-img-map": ["qemu-img", "map", "--output=json", "-f", "raw", uri],
        "qemu-nbd-list": ["qemu-nbd", "--list", "-k", psock],
        "nbdsh-compact": ["nbdsh", "-c", "h.set_request_extended_headers(False)",
                          "-c", "h.add_meta_context('base:allocation')",
                          "-c", "h.connect_uri('%s')" % uri,
                          "-c", "h.pread(4096, 1 << 20)",
                          "-c", "h.block_status(1 << 20, 0, lambda *a: 0)",
                          "-c", "h.pwrite(b'x' * 512, 4096, nbd.CMD_FLAG_FUA)"],
        "nbdsh-simple": ["nbdsh", "-c", "h.set_request_extended_headers(False)",
                         "-c", "h.set_request_structured_replies(False)",
                         "-c", "h.connect_uri('%s')" % uri,
                         "-c", "h.pread(4096, 0)", "-c", "h.trim(4096, 8192)",
                         "-c", "h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)", "-c", "h.flush()"],
        "nbdsh-filter": ["nbdsh", "-c", "h.add_meta_context('base:allocation')",
                         "-c", "h.add_meta_context('qemu:dirty-bitmap:b0')",
                         "-c", "h.connect_uri('%s')" % uri,
                         "-c", "h.block_status_filter(8 << 20, 0, "
                               "['qemu:dirty-bitmap:b0'], lambda *a: 0)",
                         "-c", "h.cache(65536, 0)"],
    }
    for d in ("handshake", "transmission"):
        os.makedirs(os.path.join(OUT, d), exist_ok=True)
    for name, argv in clients.items():
        before = len(record)
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=60)
        time.sleep(0.2)
        for i, stream in enumerate(record[before:]):
            with open(os.path.join(OUT, "handshake", "%s-%d" % (name, i)), "wb") as f:
                f.write(stream)
            seed = transmission_seed(stream)
            if seed is not None and len(seed) > 1:
                with open(os.path.join(OUT, "transmission", "%s-%d" % (name, i)), "wb") as f:
                    f.write(seed)
    stop.set()
    srv.terminate()
    srv.wait(10)


main()
