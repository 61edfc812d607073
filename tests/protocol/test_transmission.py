"""The transmission phase of 'nbdfs serve' through raw requests.

Every malformed request must get the exact error of nbd-protocol.md (sections
5.4, 6 and 10) and leave the stream in step: each error check is followed by
a READ whose bytes are compared.  Checks run with compact requests and
structured replies, with extended headers, and (where they apply) with
neither.
"""
import os
import random
import struct
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nbdfs_test  # noqa: E402
from rawclient import *  # noqa: E402,F401,F403
from rawclient import RawClient, status_payload  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB
MAX_PAYLOAD = 32 * MiB
DATA = 0
HOLE = STATE_HOLE | STATE_ZERO


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


# Data runs of the test image; everything else is a hole.
RUNS = [(0, 64 * KiB), (1 * MiB, 128 * KiB), (SIZE - 4 * KiB, 4 * KiB)]
CONTENT = [(off, pattern(off, n)) for off, n in RUNS]
FIRST = CONTENT[0][1]


class Base(nbdfs_test.TestCase):
    MODE = STRUCTURED

    def setUp(self):
        super().setUp()
        self.img = nbdfs_test.make_image(self.path("disk.img"), SIZE, CONTENT)

    def serve(self, *args):
        self.srv = self.start_nbdfs([self.img], *args)
        return self.srv

    def client(self, contexts=None, mode=None):
        if not hasattr(self, "srv"):
            self.serve()
        c = RawClient(self.srv.sock)
        self.addCleanup(c.close)
        self.ids = c.connect(mode or self.MODE, "disk.img", contexts)
        return c

    def assertInStep(self, c):
        """The stream is in step: a READ gets exactly the image's bytes."""
        self.assertEqual(c.read(0, 4096), FIRST[:4096])
        self.assertEqual(c.read(SIZE - 100, 100), CONTENT[2][1][-100:])

    def assertError(self, c, reply, error, offset=None):
        """REPLY is a failure with ERROR, in the form of the connection's mode."""
        if c.mode == SIMPLE:
            self.assertEqual(len(reply.chunks), 1)
            self.assertTrue(reply.chunks[0].simple)
            self.assertEqual(reply.chunks[0].error, error)
            self.assertIsNone(reply.chunks[0].data)
            return
        # One ERROR chunk with DONE and a message; extended chunks echo the offset.
        self.assertEqual(len(reply.chunks), 1, reply.chunks)
        ch = reply.chunks[0]
        self.assertEqual((ch.simple, ch.type, ch.flags, ch.error),
                         (False, REPLY_TYPE_ERROR, REPLY_FLAG_DONE, error))
        self.assertTrue(ch.message)
        self.assertEqual(len(ch.payload), 6 + len(ch.message.encode()))
        if c.mode == EXTENDED:
            self.assertEqual(ch.offset, offset)
        else:
            self.assertIsNone(ch.offset)

    def assertOk(self, c, reply, offset=0):
        """REPLY is a data-less success as the mode frames it."""
        if c.mode == EXTENDED:
            self.assertEqual([(ch.type, ch.flags, ch.offset, ch.length) for ch in reply.chunks],
                             [(REPLY_TYPE_NONE, REPLY_FLAG_DONE, offset, 0)])
        else:
            # Simple reply, also under structured replies (as qemu-nbd).
            self.assertEqual([(ch.simple, ch.error) for ch in reply.chunks], [(True, 0)])

    def check_error(self, c, type, offset, length, flags=0, payload=b"", error=EINVAL):
        r = c.command(type, offset, length, flags, payload)
        self.assertError(c, r, error, offset)
        self.assertInStep(c)

    def write_flags(self, c):
        return CMD_FLAG_PAYLOAD_LEN if c.mode == EXTENDED else 0

    def file_bytes(self, offset, length):
        with open(self.img, "rb") as f:
            f.seek(offset)
            return f.read(length)


class CommonTests:
    """Checks valid in every header mode."""

    def test_unknown_command(self):
        c = self.client()
        for type in (8, 9, 0x100, 0xFFFF):
            self.check_error(c, type, 0, 4096)

    def test_unknown_flags(self):
        c = self.client()
        for flag in (1 << 6, 1 << 7, 1 << 15):
            self.check_error(c, CMD_READ, 0, 4096, flag)

    def test_inapplicable_flags(self):
        c = self.client()
        self.check_error(c, CMD_READ, 0, 4096, CMD_FLAG_NO_HOLE)
        self.check_error(c, CMD_READ, 0, 4096, CMD_FLAG_REQ_ONE)
        self.check_error(c, CMD_READ, 0, 4096, CMD_FLAG_FAST_ZERO)
        self.check_error(c, CMD_TRIM, 0, 4096, CMD_FLAG_DF)
        self.check_error(c, CMD_WRITE_ZEROES, 0, 4096, CMD_FLAG_REQ_ONE)
        self.check_error(c, CMD_FLUSH, 0, 0, CMD_FLAG_NO_HOLE)
        self.check_error(c, CMD_CACHE, 0, 4096, CMD_FLAG_DF)
        # Nothing was written by the refused commands.
        self.assertEqual(self.file_bytes(0, 4096), FIRST[:4096])

    def test_df_on_write(self):
        c = self.client()
        flags = CMD_FLAG_DF | self.write_flags(c)
        self.check_error(c, CMD_WRITE, 0, 4096, flags, b"x" * 4096)
        self.assertEqual(self.file_bytes(0, 4096), FIRST[:4096])

    def test_past_the_end_einval(self):
        c = self.client()
        for type in (CMD_READ, CMD_TRIM, CMD_CACHE):
            for offset, length in ((SIZE - 4096, 4097), (SIZE, 1), (SIZE + 4096, 4096),
                                   ((1 << 64) - 512, 1024), ((1 << 64) - 1, 0)):
                self.check_error(c, type, offset, length)

    def test_past_the_end_enospc(self):
        c = self.client()
        wf = self.write_flags(c)
        for offset, length in ((SIZE - 4096, 4097), (SIZE, 1), ((1 << 64) - 512, 1024)):
            self.check_error(c, CMD_WRITE, offset, length, wf, b"w" * length, error=ENOSPC)
            self.check_error(c, CMD_WRITE_ZEROES, offset, length, error=ENOSPC)
        self.assertEqual(os.path.getsize(self.img), SIZE)
        self.assertEqual(self.file_bytes(SIZE - 4096, 4096), CONTENT[2][1])

    def test_read_over_max_payload(self):
        c = self.client()
        self.check_error(c, CMD_READ, 0, MAX_PAYLOAD + 1, error=EOVERFLOW)
        self.check_error(c, CMD_READ, 4096, MAX_PAYLOAD + 4096, error=EOVERFLOW)
        # Exactly the maximum is served.
        data = c.read(0, MAX_PAYLOAD)
        self.assertEqual(len(data), MAX_PAYLOAD)
        self.assertEqual(data[:64 * KiB], FIRST)
        self.assertEqual(data[1 * MiB:1 * MiB + 128 * KiB], CONTENT[1][1])
        self.assertEqual(data.count(0, 64 * KiB, 1 * MiB), 1 * MiB - 64 * KiB)

    def test_write_over_max_payload_disconnects(self):
        c = self.client()
        cookie = c.request(CMD_WRITE, 0, MAX_PAYLOAD + 1, self.write_flags(c))
        r = c.read_reply(cookie)
        self.assertError(c, r, EINVAL, 0)
        self.assertTrue(c.is_closed())

    def test_flush(self):
        c = self.client()
        self.assertOk(c, c.command(CMD_FLUSH))
        self.check_error(c, CMD_FLUSH, 4096, 0)
        self.check_error(c, CMD_FLUSH, 0, 4096)
        self.assertOk(c, c.command(CMD_FLUSH, flags=CMD_FLAG_FUA))

    def test_write_trim_zero_cache(self):
        c = self.client()
        wf = self.write_flags(c)
        data = pattern(99, 8192)
        self.assertOk(c, c.command(CMD_WRITE, 8192, 8192, wf, data), 8192)
        self.assertOk(c, c.command(CMD_WRITE, 16384, 4096, wf | CMD_FLAG_FUA,
                                   data[:4096]), 16384)
        self.assertEqual(c.read(8192, 8192), data)
        self.assertEqual(self.file_bytes(8192, 12288), data + data[:4096])
        self.assertOk(c, c.command(CMD_WRITE_ZEROES, 8192, 4096), 8192)
        self.assertOk(c, c.command(CMD_WRITE_ZEROES, 12288, 4096, CMD_FLAG_NO_HOLE), 12288)
        self.assertOk(c, c.command(CMD_WRITE_ZEROES, 16384, 4096, CMD_FLAG_FAST_ZERO), 16384)
        self.assertEqual(self.file_bytes(8192, 12288), bytes(12288))
        self.assertOk(c, c.command(CMD_TRIM, 0, 4096, CMD_FLAG_FUA))
        self.assertEqual(self.file_bytes(0, 4096), bytes(4096))
        self.assertOk(c, c.command(CMD_CACHE, 0, 1 * MiB), 0)
        # A zero-length write and FUA on READ are accepted.
        self.assertOk(c, c.command(CMD_WRITE, 4096, 0, wf), 4096)
        self.assertEqual(c.read(4096, 4096, CMD_FLAG_FUA), FIRST[4096:8192])

    def test_zero_length_requests(self):
        # The protocol leaves them unspecified; like qemu-nbd, they succeed.
        c = self.client()
        for offset in (0, 8 * MiB, SIZE):
            self.assertOk(c, c.command(CMD_TRIM, offset, 0), offset)
            self.assertOk(c, c.command(CMD_WRITE_ZEROES, offset, 0), offset)
            self.assertOk(c, c.command(CMD_WRITE_ZEROES, offset, 0, CMD_FLAG_FUA), offset)
            self.assertOk(c, c.command(CMD_CACHE, offset, 0), offset)
            self.assertOk(c, c.command(CMD_WRITE, offset, 0, self.write_flags(c)), offset)
        self.assertInStep(c)
        self.assertEqual(self.file_bytes(0, 64 * KiB), FIRST)

    def test_read_only_eperm(self):
        self.serve("-r")
        c = self.client()
        self.assertEqual(c.eflags & TF_READ_ONLY, TF_READ_ONLY)
        wf = self.write_flags(c)
        for offset in (0, SIZE - 100, SIZE + 4096):
            # The payload is consumed: the READ after it is in step.
            self.check_error(c, CMD_WRITE, offset, 4096, wf, b"r" * 4096, error=EPERM)
            self.check_error(c, CMD_TRIM, offset, 4096, error=EPERM)
            self.check_error(c, CMD_WRITE_ZEROES, offset, 4096, error=EPERM)
        self.assertOk(c, c.command(CMD_FLUSH))
        self.assertEqual(self.file_bytes(0, 4096), FIRST[:4096])

    def test_pipelined_requests(self):
        c = self.client()
        wf = self.write_flags(c)
        rng = random.Random(7)
        requests = []             # (cookie, type, offset, data)
        buf = bytearray()
        for i in range(200):
            cookie = 0x1000000000 + i * 3
            if i % 2:
                offset = 2 * MiB + i * 512
                data = rng.randbytes(512)
                hdr_type, length, flags, payload = CMD_WRITE, 512, wf, data
            else:
                offset = rng.randrange(0, 64 * KiB - 1024)
                data = FIRST[offset:offset + 1024]
                hdr_type, length, flags, payload = CMD_READ, 1024, 0, b""
            if c.mode == EXTENDED:
                hdr = struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, hdr_type,
                                  cookie, offset, length)
            else:
                hdr = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, hdr_type, cookie,
                                  offset, length)
            c.pending[cookie] = (hdr_type, flags, offset, length)
            buf += hdr + payload
            requests.append((cookie, hdr_type, offset, data))
        # All requests go out before any reply is read (from another thread,
        # so neither side can block the other on full socket buffers).
        sender = threading.Thread(target=c.send, args=(bytes(buf),))
        sender.start()
        try:
            replies = c.read_replies(len(requests))
        finally:
            sender.join(30)
        self.assertEqual(sorted(replies), sorted(r[0] for r in requests))
        for cookie, type, offset, data in requests:
            r = replies[cookie]
            self.assertEqual(r.error, 0)
            if type == CMD_READ:
                self.assertEqual(r.data(offset, len(data)), data)
        for cookie, type, offset, data in requests:
            if type == CMD_WRITE:
                self.assertEqual(self.file_bytes(offset, 512), data)
        self.assertInStep(c)

    def test_disc_with_requests_in_flight(self):
        c = self.client()
        cookies = []
        for i in range(40):
            cookies.append(c.request(CMD_READ, (i % 16) * 4096, 64 * KiB - (i % 16) * 4096))
        c.disconnect()
        replies = c.read_replies(len(cookies))
        self.assertEqual(sorted(replies), sorted(cookies))
        for i, cookie in enumerate(cookies):
            off = (i % 16) * 4096
            self.assertEqual(replies[cookie].data(off, 64 * KiB - off), FIRST[off:])
        self.assertTrue(c.is_closed())

    def test_wrong_request_magic_closes(self):
        c = self.client()
        c.request(CMD_READ, 0, 512, magic=0x12345678)
        self.assertTrue(c.is_closed())


class StructuredTests:
    """Checks for structured replies and extended headers."""

    def read_chunks(self, c, offset, length, flags=0):
        r = c.command(CMD_READ, offset, length, flags)
        self.assertEqual(r.error, 0)
        for ch in r.chunks[:-1]:
            self.assertEqual(ch.flags, 0)
        self.assertEqual(r.chunks[-1].flags, REPLY_FLAG_DONE)
        pos = offset
        for ch in r.chunks:
            # Extended chunks echo the request's offset, whatever they carry.
            self.assertEqual(ch.offset, offset if c.mode == EXTENDED else None)
            # Content chunks cover the range in order, each byte once.
            if ch.type == REPLY_TYPE_OFFSET_DATA:
                self.assertEqual(ch.data_offset, pos)
                self.assertGreater(len(ch.data), 0)
                pos += len(ch.data)
            else:
                self.assertEqual((ch.type, ch.hole_offset), (REPLY_TYPE_OFFSET_HOLE, pos))
                self.assertGreater(ch.hole_length, 0)
                pos += ch.hole_length
        self.assertEqual(pos, offset + length)
        return r

    def test_read_many_runs(self):
        # More data runs than one reply's chunk budget: still every byte, once.
        c = self.client()
        runs = [(16 * MiB + i * 64 * KiB, pattern(i, 4096)) for i in range(100)]
        for off, data in runs:
            self.assertOk(c, c.command(CMD_WRITE, off, 4096, self.write_flags(c), data), off)
        expected = bytearray(7 * MiB)
        for off, data in runs:
            expected[off - 16 * MiB:off - 16 * MiB + 4096] = data
        r = self.read_chunks(c, 16 * MiB, 7 * MiB)
        self.assertEqual(r.data(16 * MiB, 7 * MiB), bytes(expected))

    def test_read_holes_as_hole_chunks(self):
        c = self.client()
        r = self.read_chunks(c, 32 * KiB, 2 * MiB)
        got = []
        for ch in r.chunks:
            if ch.type == REPLY_TYPE_OFFSET_DATA:
                got.append(("data", ch.data_offset, len(ch.data)))
            else:
                self.assertEqual(ch.type, REPLY_TYPE_OFFSET_HOLE)
                self.assertEqual(len(ch.payload), 12)
                got.append(("hole", ch.hole_offset, ch.hole_length))
        self.assertEqual(got, [("data", 32 * KiB, 32 * KiB),
                               ("hole", 64 * KiB, 1 * MiB - 64 * KiB),
                               ("data", 1 * MiB, 128 * KiB),
                               ("hole", 1 * MiB + 128 * KiB, 1 * MiB - 128 * KiB + 32 * KiB)])
        self.assertEqual(r.data(32 * KiB, 2 * MiB)[:32 * KiB], FIRST[32 * KiB:])
        # A read entirely inside a hole is one hole chunk.
        r = self.read_chunks(c, 8 * MiB, 1 * MiB)
        self.assertEqual([(ch.type, ch.hole_offset, ch.hole_length) for ch in r.chunks],
                         [(REPLY_TYPE_OFFSET_HOLE, 8 * MiB, 1 * MiB)])

    def test_read_df_one_data_chunk(self):
        c = self.client()
        self.assertEqual(c.eflags & TF_SEND_DF, TF_SEND_DF)
        r = self.read_chunks(c, 32 * KiB, 64 * KiB, CMD_FLAG_DF)
        self.assertEqual([(ch.type, ch.data_offset, len(ch.data)) for ch in r.chunks],
                         [(REPLY_TYPE_OFFSET_DATA, 32 * KiB, 64 * KiB)])
        self.assertEqual(r.chunks[0].data, FIRST[32 * KiB:] + bytes(32 * KiB))
        r = self.read_chunks(c, 8 * MiB, 4096, CMD_FLAG_DF)
        self.assertEqual([(ch.type, ch.data) for ch in r.chunks],
                         [(REPLY_TYPE_OFFSET_DATA, bytes(4096))])

    def test_zero_length_read(self):
        c = self.client()
        for offset in (0, 8 * MiB, SIZE):
            r = c.command(CMD_READ, offset, 0)
            self.assertEqual([(ch.simple, ch.type, ch.flags, ch.length) for ch in r.chunks],
                             [(False, REPLY_TYPE_NONE, REPLY_FLAG_DONE, 0)])
        self.assertInStep(c)

    def test_read_error_is_a_chunk(self):
        # Even an early READ error comes as a chunk, never a simple reply.
        c = self.client()
        r = c.command(CMD_READ, SIZE, 512)
        self.assertEqual([(ch.simple, ch.type) for ch in r.chunks],
                         [(False, REPLY_TYPE_ERROR)])

    # ---- block status ----

    def status(self, c, offset, length, flags=0, payload=b""):
        r = c.command(CMD_BLOCK_STATUS, offset, length, flags, payload)
        self.assertEqual(r.error, 0, r.chunks)
        chunks = r.status_chunks()
        self.assertEqual(chunks, r.chunks)
        ext = c.mode == EXTENDED
        for i, ch in enumerate(chunks):
            self.assertEqual(ch.type, REPLY_TYPE_BLOCK_STATUS_EXT if ext
                             else REPLY_TYPE_BLOCK_STATUS)
            self.assertEqual(ch.flags, REPLY_FLAG_DONE if i + 1 == len(chunks) else 0)
            self.assertEqual(ch.offset, offset if ext else None)
            self.assertEqual(ch.count, len(ch.extents))
            self.assertGreaterEqual(ch.count, 1)
            self.assertEqual(len(ch.payload), (8 + 16 * ch.count) if ext else (4 + 8 * ch.count))
        return [(ch.context_id, ch.extents) for ch in chunks]

    def test_block_status(self):
        c = self.client(contexts=["base:allocation"])
        self.assertEqual(self.ids, {"base:allocation": 0})
        self.assertEqual(self.status(c, 0, 4 * MiB),
                         [(0, [(64 * KiB, DATA), (1 * MiB - 64 * KiB, HOLE),
                               (128 * KiB, DATA), (3 * MiB - 128 * KiB, HOLE)])])
        self.assertEqual(self.status(c, 32 * KiB, 64 * KiB),
                         [(0, [(32 * KiB, DATA), (32 * KiB, HOLE)])])
        self.assertEqual(self.status(c, SIZE - 8 * KiB, 8 * KiB),
                         [(0, [(4 * KiB, HOLE), (4 * KiB, DATA)])])
        self.assertEqual(self.status(c, SIZE - 1, 1), [(0, [(1, DATA)])])
        # FUA is accepted and ignored.
        self.assertEqual(self.status(c, 0, 4096, CMD_FLAG_FUA), [(0, [(4096, DATA)])])
        self.assertInStep(c)

    def test_block_status_req_one(self):
        c = self.client(contexts=["base:allocation"])
        for offset, length, expect in ((0, 4 * MiB, (64 * KiB, DATA)),
                                       (64 * KiB, 4 * MiB, (1 * MiB - 64 * KiB, HOLE)),
                                       (100, 50, (50, DATA)),
                                       (2 * MiB, 1 * MiB, (1 * MiB, HOLE))):
            self.assertEqual(self.status(c, offset, length, CMD_FLAG_REQ_ONE),
                             [(0, [expect])])

    def test_block_status_errors(self):
        c = self.client(contexts=["base:allocation"])
        self.check_error(c, CMD_BLOCK_STATUS, 0, 0)
        self.check_error(c, CMD_BLOCK_STATUS, SIZE, 0)
        self.check_error(c, CMD_BLOCK_STATUS, SIZE - 4096, 4097)
        self.check_error(c, CMD_BLOCK_STATUS, SIZE + 1, 1)
        for flag in (CMD_FLAG_FAST_ZERO, CMD_FLAG_NO_HOLE, CMD_FLAG_DF, 1 << 6):
            self.check_error(c, CMD_BLOCK_STATUS, 0, 4096, flag)

    def test_block_status_without_contexts(self):
        c = self.client()
        self.check_error(c, CMD_BLOCK_STATUS, 0, 4096)
        c = self.client(contexts=["base:"])
        self.assertEqual(self.ids, {})
        self.check_error(c, CMD_BLOCK_STATUS, 0, 4096)

    def test_block_status_without_payload_bit_in_compact(self):
        # PAYLOAD_LEN on a compact request is an invalid flag; nothing extra is read.
        c = self.client(contexts=["base:allocation"], mode=STRUCTURED)
        self.check_error(c, CMD_BLOCK_STATUS, 0, 12, CMD_FLAG_PAYLOAD_LEN)
        self.check_error(c, CMD_READ, 0, 4096, CMD_FLAG_PAYLOAD_LEN)
        self.check_error(c, CMD_FLUSH, 0, 0, CMD_FLAG_PAYLOAD_LEN)
        self.check_error(c, CMD_WRITE, 0, 4, CMD_FLAG_PAYLOAD_LEN, b"abcd")
        self.assertEqual(self.file_bytes(0, 4096), FIRST[:4096])


class SimpleModeTest(CommonTests, Base):
    MODE = SIMPLE

    def test_zero_length_read(self):
        c = self.client()
        r = c.command(CMD_READ, 4096, 0)
        self.assertEqual([(ch.simple, ch.error, ch.data) for ch in r.chunks], [(True, 0, b"")])
        self.assertInStep(c)

    def test_block_status_refused(self):
        c = self.client()
        self.check_error(c, CMD_BLOCK_STATUS, 0, 4096)

    def test_df_refused(self):
        c = self.client()
        self.assertEqual(c.eflags & TF_SEND_DF, 0)
        self.check_error(c, CMD_READ, 0, 4096, CMD_FLAG_DF)


class StructuredModeTest(CommonTests, StructuredTests, Base):
    MODE = STRUCTURED

    def test_compact_block_status_splits_at_4g(self):
        # A 6 GiB sparse image: one hole, but a 32-bit descriptor cannot say it.
        big = nbdfs_test.make_image(self.path("big.img"), 6 << 30)
        srv = self.start_nbdfs([big], name="big")
        c = RawClient(srv.sock)
        self.addCleanup(c.close)
        c.connect(STRUCTURED, "", ["base:allocation"])
        r = c.command(CMD_BLOCK_STATUS, 0, 0xFFFFFFFF)
        self.assertEqual(r.error, 0)
        # The first descriptor stops at the largest 512-aligned 32-bit length.
        self.assertEqual(r.chunks[0].extents, [(0xFFFFFE00, HOLE), (0x1FF, HOLE)])
        self.assertEqual(c.read((6 << 30) - 512, 512), bytes(512))


class ExtendedModeTest(CommonTests, StructuredTests, Base):
    MODE = EXTENDED

    def test_write_without_payload_flag_carries_data(self):
        # qemu 10's client sends WRITE without PAYLOAD_LEN under extended
        # headers; its length is taken as the payload all the same.
        c = self.client()
        data = pattern(5, 4096)
        self.assertOk(c, c.command(CMD_WRITE, 8192, 4096, 0, data), 8192)
        self.assertEqual(self.file_bytes(8192, 4096), data)
        self.assertInStep(c)

    def test_payload_on_commands_without_one(self):
        c = self.client(contexts=["base:allocation"])
        for type, offset in ((CMD_READ, 0), (CMD_FLUSH, 0), (CMD_TRIM, 4096),
                             (CMD_CACHE, 0), (CMD_WRITE_ZEROES, 0), (9, 0)):
            self.check_error(c, type, offset, 100, CMD_FLAG_PAYLOAD_LEN, b"p" * 100)
        self.assertEqual(self.file_bytes(0, 8192), FIRST[:8192])

    def test_payload_over_max_disconnects(self):
        c = self.client()
        cookie = c.request(CMD_READ, 0, MAX_PAYLOAD + 1, CMD_FLAG_PAYLOAD_LEN)
        self.assertError(c, c.read_reply(cookie), EINVAL, 0)
        self.assertTrue(c.is_closed())

    def test_compact_request_closes(self):
        c = self.client()
        # Two compact headers: the server reads the first 32 bytes as one
        # extended header and finds the wrong magic.
        c.request(CMD_READ, 0, 512, extended=False)
        c.request(CMD_READ, 0, 512, extended=False)
        self.assertTrue(c.is_closed())

    def test_big_effect_lengths(self):
        # Extended headers carry 64-bit lengths: past 4 GiB is one descriptor.
        big = nbdfs_test.make_image(self.path("big.img"), 6 << 30, [(5 << 30, b"x")])
        srv = self.start_nbdfs([big], name="big")
        c = RawClient(srv.sock)
        self.addCleanup(c.close)
        c.connect(EXTENDED, "", ["base:allocation"])
        self.assertEqual(self.status(c, 0, 6 << 30),
                         [(0, [(5 << 30, HOLE), (4096, DATA), ((1 << 30) - 4096, HOLE)])])
        self.assertEqual(self.status(c, 0, 12, CMD_FLAG_PAYLOAD_LEN,
                                     status_payload(6 << 30, [0])),
                         [(0, [(5 << 30, HOLE), (4096, DATA), ((1 << 30) - 4096, HOLE)])])
        self.assertOk(c, c.command(CMD_WRITE_ZEROES, 0, 5 << 30), 0)
        self.assertOk(c, c.command(CMD_TRIM, 1 << 30, 5 << 30), 1 << 30)
        self.assertEqual(c.read((5 << 30) - 2, 4), bytes(4))

    # ---- block-status payload form ----

    def test_payload_form(self):
        c = self.client(contexts=["base:allocation"])
        self.assertEqual(c.eflags & TF_BLOCK_STAT_PAYLOAD, TF_BLOCK_STAT_PAYLOAD)
        plain = self.status(c, 32 * KiB, 2 * MiB)
        # The header length is the payload's; the effect length governs.
        self.assertEqual(self.status(c, 32 * KiB, 12, CMD_FLAG_PAYLOAD_LEN,
                                     status_payload(2 * MiB, [0])), plain)
        self.assertEqual(plain, [(0, [(32 * KiB, DATA), (1 * MiB - 64 * KiB, HOLE),
                                      (128 * KiB, DATA), (1 * MiB - 96 * KiB, HOLE)])])
        # The last byte of the export, asked with a 12-byte header length.
        self.assertEqual(self.status(c, SIZE - 1, 12, CMD_FLAG_PAYLOAD_LEN,
                                     status_payload(1, [0])), [(0, [(1, DATA)])])
        self.assertEqual(self.status(c, SIZE - 4097, 12, CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA,
                                     status_payload(4097, [0])),
                         [(0, [(1, HOLE), (4096, DATA)])])
        # REQ_ONE with a payload: exactly one descriptor.
        self.assertEqual(self.status(c, 0, 12, CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_REQ_ONE,
                                     status_payload(4 * MiB, [0])),
                         [(0, [(64 * KiB, DATA)])])
        self.assertInStep(c)

    def test_payload_form_errors(self):
        c = self.client(contexts=["base:allocation"])
        F = CMD_FLAG_PAYLOAD_LEN
        cases = [
            b"",                                     # no payload at all
            b"\0\0\0\0",                             # shorter than 8
            struct.pack(">Q", 4096)[:7],
            status_payload(4096, [0]) + b"\0",       # 13 bytes
            status_payload(4096, [0])[:-1] + b"",    # 11 bytes
            status_payload(4096, []),                # n = 0
            status_payload(4096, [1]),               # never negotiated
            status_payload(4096, [0xFFFFFFFF]),
            status_payload(4096, [0, 0]),            # duplicate
            status_payload(4096, [0, 1, 2]),         # more than negotiated
            status_payload(4096, list(range(300))),
            status_payload(0, [0]),                  # effect length 0
            status_payload(SIZE + 1, [0]),           # past the end
            status_payload(1 << 63, [0]),
            status_payload((1 << 64) - 1, [0]),
        ]
        for payload in cases:
            self.check_error(c, CMD_BLOCK_STATUS, 0, len(payload), F, payload)
        # Effect past the end from an offset inside the export.
        self.check_error(c, CMD_BLOCK_STATUS, SIZE - 1, 12, F, status_payload(2, [0]))
        self.check_error(c, CMD_BLOCK_STATUS, SIZE, 12, F, status_payload(1, [0]))
        # Invalid flags with a payload: read, refused.
        for flag in (CMD_FLAG_DF, CMD_FLAG_NO_HOLE, CMD_FLAG_FAST_ZERO):
            self.check_error(c, CMD_BLOCK_STATUS, 0, 12, F | flag, status_payload(4096, [0]))
        # A large (but not oversized) payload is drained as well.
        self.check_error(c, CMD_BLOCK_STATUS, 0, 1 * MiB, F, bytes(1 * MiB))

    def test_payload_form_without_contexts(self):
        c = self.client()
        self.assertEqual(c.eflags & TF_BLOCK_STAT_PAYLOAD, 0)
        self.check_error(c, CMD_BLOCK_STATUS, 0, 12, CMD_FLAG_PAYLOAD_LEN,
                         status_payload(4096, [0]))

    def test_payload_form_over_max_disconnects(self):
        c = self.client(contexts=["base:allocation"])
        cookie = c.request(CMD_BLOCK_STATUS, 0, MAX_PAYLOAD + 8, CMD_FLAG_PAYLOAD_LEN)
        self.assertError(c, c.read_reply(cookie), EINVAL, 0)
        self.assertTrue(c.is_closed())


class ContextsTest(Base):
    """Block status with three contexts: base:allocation (id 0) and two dirty
    bitmaps, qemu:dirty-bitmap:b0 (64 KiB granularity, id 1) and b1 (1 MiB, id 2)."""

    MODE = EXTENDED
    ALL = ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]

    def setUp(self):
        super().setUp()
        nbdfs_test.run([nbdfs_test.NBDFS, "bitmap", "add", self.img, "b0"])
        nbdfs_test.run([nbdfs_test.NBDFS, "bitmap", "add", "--granularity", str(MiB),
                        self.img, "b1"])

    def dirty_client(self, contexts=ALL, mode=EXTENDED):
        c = self.client(contexts, mode)
        # Dirty [2 MiB + 4 KiB, +4 KiB): b0 marks 64 KiB, b1 marks 1 MiB.
        self.assertOk(c, c.write(2 * MiB + 4096, b"d" * 4096), 2 * MiB + 4096)
        return c

    ALLOC = (0, [(128 * KiB, DATA), (2 * MiB + 4096 - 1 * MiB - 128 * KiB, HOLE), (4096, DATA),
                 (4 * MiB - 2 * MiB - 8192, HOLE)])
    B0 = (1, [(2 * MiB - 1 * MiB, 0), (64 * KiB, 1), (4 * MiB - 2 * MiB - 64 * KiB, 0)])
    B1 = (2, [(2 * MiB - 1 * MiB, 0), (1 * MiB, 1), (1 * MiB, 0)])

    def test_ids(self):
        self.serve()
        c = self.client(self.ALL)
        self.assertEqual(self.ids, {name: i for i, name in enumerate(self.ALL)})
        self.assertEqual(c.eflags & TF_BLOCK_STAT_PAYLOAD, TF_BLOCK_STAT_PAYLOAD)

    def test_chunk_order_and_done(self):
        for mode in (STRUCTURED, EXTENDED):
            c = self.dirty_client(mode=mode)
            # One chunk per context, in id order, DONE on the last only.
            self.assertEqual(StructuredTests.status(self, c, 1 * MiB, 3 * MiB),
                             [self.ALLOC, self.B0, self.B1])
            self.assertEqual(StructuredTests.status(self, c, 1 * MiB, 3 * MiB,
                                                    CMD_FLAG_REQ_ONE),
                             [(0, self.ALLOC[1][:1]), (1, self.B0[1][:1]),
                              (2, self.B1[1][:1])])

    def test_payload_subsets(self):
        c = self.dirty_client()
        status = lambda ids, flags=0: StructuredTests.status(
            self, c, 1 * MiB, 12 + 4 * (len(ids) - 1), CMD_FLAG_PAYLOAD_LEN | flags,
            status_payload(3 * MiB, ids))
        self.assertEqual(status([2]), [self.B1])
        self.assertEqual(status([1]), [self.B0])
        self.assertEqual(status([0]), [self.ALLOC])
        # Any order asked: chunks come in id order.
        self.assertEqual(status([2, 0]), [self.ALLOC, self.B1])
        self.assertEqual(status([2, 1, 0]), [self.ALLOC, self.B0, self.B1])
        self.assertEqual(status([1, 2], CMD_FLAG_REQ_ONE),
                         [(1, self.B0[1][:1]), (2, self.B1[1][:1])])

    def test_payload_errors(self):
        c = self.dirty_client()
        for ids in ([1, 1], [0, 2, 0], [0, 1, 2, 0], [3], [0, 1, 2, 3]):
            payload = status_payload(3 * MiB, ids)
            self.check_error(c, CMD_BLOCK_STATUS, 1 * MiB, len(payload),
                             CMD_FLAG_PAYLOAD_LEN, payload)

    def test_payload_unselected_id(self):
        self.serve()
        # Only b1 selected: id 2 is valid, ids 0 and 1 are not.
        c = self.client(["qemu:dirty-bitmap:b1"])
        self.assertEqual(self.ids, {"qemu:dirty-bitmap:b1": 2})
        for ids in ([0], [1], [2, 0]):
            payload = status_payload(4096, ids)
            self.check_error(c, CMD_BLOCK_STATUS, 0, len(payload), CMD_FLAG_PAYLOAD_LEN,
                             payload)
        self.assertEqual(StructuredTests.status(self, c, 0, 12, CMD_FLAG_PAYLOAD_LEN,
                                                status_payload(4096, [2])),
                         [(2, [(4096, 0)])])
        self.assertEqual(StructuredTests.status(self, c, 0, 4096), [(2, [(4096, 0)])])


if __name__ == "__main__":
    nbdfs_test.main()
