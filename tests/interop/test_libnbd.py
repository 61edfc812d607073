"""libnbd 1.22 (its Python module and tools) against 'nbdfs serve' and qemu-nbd 10.

Every check runs against both servers (classes NbdfsLibnbdChecks and
QemuNbdLibnbdChecks); where the servers differ on purpose, expect() names
each one's answer.
"""
import errno
import json
import random

import nbd

import nbdfs_test

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB
DATA = 0
HOLE = nbd.STATE_HOLE | nbd.STATE_ZERO


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


RUNS = [(0, 64 * KiB), (1 * MiB, 128 * KiB), (SIZE - 4 * KiB, 4 * KiB)]
CONTENT = [(off, pattern(off, n)) for off, n in RUNS]
# base:allocation of the whole image.
MAP = [(0, 64 * KiB, DATA), (64 * KiB, 1 * MiB - 64 * KiB, HOLE),
       (1 * MiB, 128 * KiB, DATA), (1 * MiB + 128 * KiB, SIZE - 4 * KiB - 1 * MiB - 128 * KiB, HOLE),
       (SIZE - 4 * KiB, 4 * KiB, DATA)]


class LibnbdChecks:

    def setUp(self):
        super().setUp()
        self.img = nbdfs_test.make_image(self.path("disk.img"), SIZE, CONTENT)

    def serve(self, *args):
        self.srv = self.start_server(self.img, *args)
        return self.srv

    def handle(self, extended=True, structured=True, contexts=("base:allocation",),
               strict=True):
        h = nbd.NBD()
        self.addCleanup(h.close)
        h.set_request_extended_headers(extended)
        h.set_request_structured_replies(structured)
        for ctx in contexts:
            h.add_meta_context(ctx)
        h.connect_uri(self.srv.uri())
        if not strict:
            h.set_strict_mode(0)
        return h

    def extents(self, h, offset, length, filter=None, flags=0):
        """[(offset, length, status)] of base:allocation over the range,
        re-asking from the first uncovered byte after a short answer."""
        out = []
        end = offset + length
        while offset < end:
            got = []

            def cb(ctx, off, entries, err):
                self.assertEqual(ctx, "base:allocation")
                self.assertEqual(off, offset)
                self.assertEqual(err.value, 0)
                got.extend(entries)
                return 0
            if filter is None:
                h.block_status_64(end - offset, offset, cb, flags)
            else:
                h.block_status_filter(end - offset, offset, filter, cb, flags)
            self.assertTrue(got)
            for n, status in got:
                n = min(n, end - offset)
                out.append((offset, n, status))
                offset += n
        return out

    def assertErrno(self, err, fn, *args):
        with self.assertRaises(nbd.Error) as cm:
            fn(*args)
        self.assertEqual(cm.exception.errnum, err, cm.exception.string)

    def assertUsable(self, h):
        self.assertEqual(h.pread(4096, 0), CONTENT[0][1][:4096])

    # ---- nbdinfo ----

    def nbdinfo(self, *args, check=True):
        return nbdfs_test.run(["nbdinfo", *args], check=check)

    def expected_info(self, read_only=False):
        return {
            "protocol": "newstyle-fixed",
            "TLS": False,
            "structured": True,
            "extended": True,
            "exports": [{
                # The canonical name INFO_NAME reports for the default export.
                "export-name": self.expect(nbdfs="disk.img", qemu_nbd=""),
                "uri": self.srv.uri(),
                "contexts": ["base:allocation"],
                "is_rotational": False,
                "is_read_only": read_only,
                "can_block_status_payload": True,
                "can_cache": True,
                "can_df": True,
                "can_fast_zero": not read_only,
                "can_flush": True,
                "can_fua": True,
                "can_multi_conn": True,
                "can_trim": not read_only,
                "can_zero": not read_only,
                "block_size_minimum": 1,
                "block_size_preferred": 4096,
                "block_size_maximum": 32 * MiB,
                "export-size": SIZE,
                "export-size-str": "64M",
            }],
        }

    def test_nbdinfo_json(self):
        self.serve()
        out = self.nbdinfo("--json", "--no-content", self.srv.uri()).stdout
        self.assertEqual(json.loads(out), self.expected_info())

    def test_nbdinfo_json_read_only(self):
        self.serve("-r")
        out = self.nbdinfo("--json", "--no-content", self.srv.uri()).stdout
        self.assertEqual(json.loads(out), self.expected_info(read_only=True))

    def test_nbdinfo_map(self):
        self.serve()
        names = {DATA: "data", HOLE: "hole,zero"}
        text = "".join("%10d  %10d  %3d  %s\n" % (off, n, st, names[st]) for off, n, st in MAP)
        self.assertEqual(self.nbdinfo("--map", self.srv.uri()).stdout, text)
        self.assertEqual(self.nbdinfo("--map=base:allocation", self.srv.uri()).stdout, text)
        self.assertEqual(json.loads(self.nbdinfo("--map", "--json", self.srv.uri()).stdout),
                         [{"offset": off, "length": n, "type": st, "description": names[st]}
                          for off, n, st in MAP])
        self.assertEqual(self.nbdinfo("--map", "--totals", self.srv.uri()).stdout,
                         "%10d %5.1f%% %3d %s\n" % (196 * KiB, 196 * KiB * 100 / SIZE, 0, "data") +
                         "%10d %5.1f%% %3d %s\n" % (SIZE - 196 * KiB,
                                                     (SIZE - 196 * KiB) * 100 / SIZE, 3,
                                                     "hole,zero"))

    def test_nbdinfo_can(self):
        self.serve()
        for what in ("multi-conn", "block-status-payload", "df", "fast-zero", "trim",
                     "zero", "cache", "fua", "flush", "connect"):
            self.assertEqual(self.nbdinfo("--can", what, self.srv.uri(), check=False)
                             .returncode, 0, what)
        self.assertEqual(self.nbdinfo("--is", "read-only", self.srv.uri(), check=False)
                         .returncode, 2)
        self.assertEqual(self.nbdinfo("--size", self.srv.uri()).stdout, "%d\n" % SIZE)

    # ---- block status ----

    def test_block_status(self):
        self.serve()
        h = self.handle()
        self.assertTrue(h.can_meta_context("base:allocation"))
        self.assertEqual(self.extents(h, 0, SIZE), MAP)
        self.assertEqual(self.extents(h, 32 * KiB, 64 * KiB),
                         [(32 * KiB, 32 * KiB, DATA), (64 * KiB, 32 * KiB, HOLE)])
        self.assertEqual(self.extents(h, 0, 4 * MiB, flags=nbd.CMD_FLAG_REQ_ONE)[0],
                         (0, 64 * KiB, DATA))

    def test_block_status_filter(self):
        self.serve()
        h = self.handle()
        self.assertTrue(h.can_block_status_payload())
        every = [h.get_meta_context(i) for i in range(h.get_nr_meta_contexts())]
        self.assertEqual(every, ["base:allocation"])
        # All contexts, one context: both the same as unfiltered here.
        self.assertEqual(self.extents(h, 0, SIZE, filter=every), MAP)
        self.assertEqual(self.extents(h, 32 * KiB, 2 * MiB, filter=["base:allocation"]),
                         self.extents(h, 32 * KiB, 2 * MiB))
        # The last byte of the export.
        self.assertEqual(self.extents(h, SIZE - 1, 1, filter=["base:allocation"]),
                         [(SIZE - 1, 1, DATA)])
        self.assertEqual(self.extents(h, SIZE - 4097, 4097, filter=["base:allocation"]),
                         [(SIZE - 4097, 1, HOLE), (SIZE - 4096, 4096, DATA)])
        # An unknown name is refused by libnbd itself; the handle goes on.
        self.assertErrno(errno.EINVAL, h.block_status_filter, 512, 0, ["base:nosuch"],
                         lambda *a: 0)
        self.assertUsable(h)

    def test_block_status_payload_advertised(self):
        self.serve()
        h = self.handle(extended=True)
        self.assertTrue(h.get_extended_headers_negotiated())
        self.assertTrue(h.can_block_status_payload())
        h = self.handle(extended=False)
        self.assertFalse(h.get_extended_headers_negotiated())
        self.assertFalse(h.can_block_status_payload())
        # Without extended headers libnbd will not send the payload form.
        self.assertErrno(errno.ENOTSUP, h.block_status_filter, 512, 0, ["base:allocation"],
                         lambda *a: 0)
        self.assertEqual(self.extents(h, 0, 2 * MiB), MAP[:3] + [(1 * MiB + 128 * KiB,
                                                                 1 * MiB - 128 * KiB, HOLE)])

    def test_header_modes(self):
        self.serve()
        for extended, structured in ((True, True), (False, True), (False, False)):
            h = self.handle(extended, structured)
            what = "extended=%s structured=%s" % (extended, structured)
            self.assertEqual(h.get_extended_headers_negotiated(), extended, what)
            self.assertEqual(h.get_structured_replies_negotiated(), structured, what)
            self.assertEqual(h.can_meta_context("base:allocation"), structured, what)
            self.assertEqual(h.can_df(), structured, what)
            self.assertEqual(h.can_block_status_payload(), extended, what)
            self.assertEqual(h.pread(64 * KiB, 32 * KiB),
                             CONTENT[0][1][32 * KiB:] + bytes(32 * KiB), what)
            data = pattern(len(what), 8192)
            h.pwrite(data, 4 * MiB + 8192 * extended + 16384 * structured)
            h.flush()
            self.assertEqual(h.pread(8192, 4 * MiB + 8192 * extended + 16384 * structured),
                             data, what)
            if structured:
                self.assertEqual(self.extents(h, 0, 1 * MiB), MAP[:2], what)
                # Hole chunks, or one data chunk with DF.
                for flags, expected in ((0, [(60 * KiB, 4096, nbd.READ_DATA),
                                             (64 * KiB, 4096, nbd.READ_HOLE)]),
                                        (nbd.CMD_FLAG_DF, [(60 * KiB, 8192, nbd.READ_DATA)])):
                    chunks = []

                    def chunk(buf, off, status, err):
                        chunks.append((off, len(buf), status))
                        return 0
                    buf = h.pread_structured(8192, 60 * KiB, chunk, flags)
                    self.assertEqual(chunks, expected, what)
                    self.assertEqual(buf, CONTENT[0][1][60 * KiB:] + bytes(4096), what)
            h.shutdown()

    # ---- errors, with libnbd's own checks turned off ----

    def test_bad_requests(self):
        self.serve()
        h = self.handle(strict=False)
        enospc = self.expect(nbdfs=errno.ENOSPC, qemu_nbd=errno.EINVAL)
        cases = [
            (errno.EINVAL, h.pread, 512, SIZE),
            (errno.EINVAL, h.pread, 1024, SIZE - 512),
            (enospc, h.pwrite, b"x" * 512, SIZE),
            (enospc, h.pwrite, b"x" * 1024, SIZE - 512),
            (enospc, h.zero, 512, SIZE),
            (errno.EINVAL, h.trim, 512, SIZE),
            (errno.EINVAL, h.cache, 512, SIZE),
            # READ over the 32 MiB maximum: the protocol's EOVERFLOW, or qemu's EINVAL.
            (self.expect(nbdfs=errno.EOVERFLOW, qemu_nbd=errno.EINVAL),
             h.pread, 32 * MiB + 1, 0),
            (errno.EINVAL, h.block_status, 0, 0, lambda *a: 0),
            (errno.EINVAL, h.block_status, 512, SIZE, lambda *a: 0),
            (errno.EINVAL, h.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_DF),
            (errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE),
            (errno.EINVAL, h.pread, 512, 0, 0x40),
            (errno.EINVAL, h.block_status, 512, 0, lambda *a: 0, nbd.CMD_FLAG_FAST_ZERO),
            (errno.EINVAL, h.block_status, 512, 0, lambda *a: 0, nbd.CMD_FLAG_NO_HOLE),
            # libnbd passes a duplicate id through: the server must refuse it.
            (errno.EINVAL, h.block_status_filter, 512, 0,
             ["base:allocation", "base:allocation"], lambda *a: 0, nbd.CMD_FLAG_PAYLOAD_LEN),
        ]
        for err, fn, *args in cases:
            with self.subTest(fn=fn.__name__, args=args[:2]):
                self.assertErrno(err, fn, *args)
                self.assertUsable(h)
        # Zero-length requests succeed on both.
        self.assertEqual(h.pread(0, 0), b"")
        h.zero(0, 4096)
        h.trim(0, 4096)
        h.pwrite(b"", 0)
        self.assertUsable(h)
        with open(self.img, "rb") as f:
            self.assertEqual(f.read(64 * KiB), CONTENT[0][1])
            f.seek(SIZE - 4096)
            self.assertEqual(f.read(), CONTENT[2][1])

    def test_block_status_without_context(self):
        self.serve()
        h = self.handle(contexts=(), strict=False)
        self.assertFalse(h.can_meta_context("base:allocation"))
        self.assertErrno(errno.EINVAL, h.block_status, 512, 0, lambda *a: 0)
        self.assertUsable(h)
        h = self.handle(structured=False, extended=False, strict=False)
        self.assertErrno(errno.EINVAL, h.block_status, 512, 0, lambda *a: 0)
        self.assertUsable(h)

    def test_read_only_eperm(self):
        self.serve("-r")
        h = self.handle(strict=False)
        self.assertTrue(h.is_read_only())
        # The protocol's EPERM; qemu-nbd 10 answers EINVAL.
        eperm = self.expect(nbdfs=errno.EPERM, qemu_nbd=errno.EINVAL)
        for fn, args in ((h.pwrite, (b"x" * 4096, 0)), (h.trim, (4096, 0)),
                         (h.zero, (4096, 0)), (h.pwrite, (b"x" * 4096, SIZE))):
            self.assertErrno(eperm, fn, *args)
            self.assertUsable(h)
        with open(self.img, "rb") as f:
            self.assertEqual(f.read(64 * KiB), CONTENT[0][1])

    # ---- copies, activation, multi-conn ----

    def test_nbdcopy_round_trip(self):
        self.serve()
        dst = nbdfs_test.make_image(self.path("dst.img"), SIZE)
        srv2 = self.start_server(dst, name="dst")
        # Image -> export of a blank image -> a new file.
        nbdfs_test.run(["nbdcopy", self.srv.uri(), srv2.uri()], timeout=60)
        back = self.path("back.img")
        nbdfs_test.run(["nbdcopy", srv2.uri(), back], timeout=60)
        with open(self.img, "rb") as a, open(dst, "rb") as b, open(back, "rb") as c:
            orig = a.read()
            self.assertEqual(b.read(), orig)
            self.assertEqual(c.read(), orig)
        # nbdcopy zeroes the holes with WRITE_ZEROES (NO_HOLE clear): nbdfs
        # punches holes, qemu-nbd (default --discard=ignore) allocates zeros.
        srv2_map = json.loads(self.nbdinfo("--map", "--json", srv2.uri()).stdout)
        self.assertEqual(srv2_map, self.expect(
            nbdfs=json.loads(self.nbdinfo("--map", "--json", self.srv.uri()).stdout),
            qemu_nbd=[{"offset": 0, "length": SIZE, "type": DATA, "description": "data"}]))

    def test_socket_activation(self):
        out = self.nbdinfo("--json", "--no-content", "--", "[", *self.server_argv(self.img),
                           "]").stdout
        info = json.loads(out)["exports"][0]
        # qemu-nbd serves one client unless told otherwise (-e), so no multi-conn.
        self.assertEqual((info["export-size"], info["contexts"], info["can_multi_conn"],
                          info["can_block_status_payload"]),
                         (SIZE, ["base:allocation"], self.expect(nbdfs=True, qemu_nbd=False),
                          True))
        h = nbd.NBD()
        self.addCleanup(h.close)
        h.add_meta_context("base:allocation")
        h.connect_systemd_socket_activation(self.server_argv(self.img, "-r"))
        self.assertTrue(h.is_read_only())
        self.assertEqual(h.pread(128 * KiB, 1 * MiB), CONTENT[1][1])
        self.assertEqual(self.extents(h, 0, SIZE), MAP)
        h.shutdown()

    def test_multi_conn(self):
        self.serve()
        a = self.handle()
        b = self.handle()
        self.assertTrue(a.can_multi_conn())
        self.assertTrue(b.can_multi_conn())
        data = pattern(3, 64 * KiB)
        a.pwrite(data, 8 * MiB)
        a.flush()
        self.assertEqual(b.pread(64 * KiB, 8 * MiB), data)
        b.zero(32 * KiB, 8 * MiB, nbd.CMD_FLAG_FUA)
        self.assertEqual(a.pread(64 * KiB, 8 * MiB), bytes(32 * KiB) + data[32 * KiB:])


nbdfs_test.server_test_classes(LibnbdChecks, globals())

if __name__ == "__main__":
    nbdfs_test.main()
