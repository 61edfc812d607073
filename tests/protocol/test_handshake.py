"""The fixed-newstyle handshake of 'nbdfs serve', byte by byte.

Each test talks to a fresh server through rawclient and checks the exact
option replies of nbd-protocol.md sections 1 and 4 (and the corner cases of
section 10), and that negotiation goes on after every recoverable error.
"""
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nbdfs_test  # noqa: E402
from rawclient import *  # noqa: E402,F401,F403
from rawclient import RawClient, info_payload, meta_payload  # noqa: E402

A_SIZE = 1 << 20
B_SIZE = 512 << 10
A_DATA = [(0, b"A" * 4096), (65536, b"a" * 65536)]

# Transmission flags nbdfs serve sends for a writable export.
BASE_FLAGS = (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM |
              TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN | TF_SEND_CACHE |
              TF_SEND_FAST_ZERO)


class HandshakeTest(nbdfs_test.TestCase):

    def setUp(self):
        super().setUp()
        self.a = nbdfs_test.make_image(self.path("a.img"), A_SIZE, A_DATA)
        self.b = nbdfs_test.make_image(self.path("b.img"), B_SIZE)

    def serve(self, *args):
        self.srv = self.start_nbdfs([self.a, self.b], *args)
        return self.srv

    def client(self, start=True, flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        c = RawClient(self.srv.sock)
        self.addCleanup(c.close)
        if start:
            c.start(flags)
        return c

    def assertReplies(self, replies, option, types):
        """REPLIES answer OPTION and have exactly the reply TYPES."""
        self.assertEqual([r.option for r in replies], [option] * len(replies))
        self.assertEqual([r.type for r in replies], types)

    def assertRefused(self, c, option, data, reply):
        """OPTION with DATA gets exactly one error reply REPLY."""
        replies = c.option(option, data)
        self.assertReplies(replies, option, [reply])
        # Error replies carry a readable message.
        self.assertTrue(replies[0].data.decode())
        return replies[0]

    def assertStillNegotiating(self, c):
        """The option loop still runs: LIST answers both exports."""
        replies = c.option(OPT_LIST)
        self.assertReplies(replies, OPT_LIST, [REP_SERVER, REP_SERVER, REP_ACK])

    def assertBlockStatusRefused(self, c):
        r = c.command(CMD_BLOCK_STATUS, 0, 4096)
        self.assertEqual(r.error, EINVAL)
        self.assertEqual(c.read(0, 4096), b"A" * 4096)

    # ---- greeting and client flags ----

    def test_greeting_bytes(self):
        self.serve()
        c = self.client(start=False)
        self.assertEqual(c.recv_exact(18), b"NBDMAGIC" b"IHAVEOPT" b"\x00\x03")

    def test_client_flags_fixed_newstyle_only(self):
        # Without NO_ZEROES, EXPORT_NAME is answered with the 124 zero bytes.
        self.serve()
        c = self.client(flags=FLAG_FIXED_NEWSTYLE)
        c.send_option(OPT_EXPORT_NAME, b"")
        self.assertEqual(c.recv_exact(10), struct.pack(">QH", A_SIZE, BASE_FLAGS))
        self.assertEqual(c.recv_exact(124), bytes(124))
        c.request(CMD_READ, 0, 4, cookie=7)
        self.assertEqual(c.recv_exact(20), struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 7)
                         + b"AAAA")

    def test_unknown_client_flag_closes(self):
        self.serve()
        for flags in (0x4, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES | 0x4, 0x80000001):
            c = self.client(flags=flags)
            self.assertTrue(c.is_closed(), "client flags 0x%x" % flags)

    # ---- unknown and malformed options ----

    def test_unknown_options_unsupported(self):
        self.serve()
        c = self.client()
        for option, data in ((OPT_PEEK_EXPORT, b""), (12, b""), (0xDEAD, b"x" * 10),
                             (0xDEAD, b""), (12, b"\0" * 100)):
            self.assertRefused(c, option, data, REP_ERR_UNSUP)
        self.assertStillNegotiating(c)

    def test_data_on_dataless_options(self):
        self.serve()
        c = self.client()
        for option in (OPT_LIST, OPT_STRUCTURED_REPLY, OPT_EXTENDED_HEADERS, OPT_STARTTLS):
            self.assertRefused(c, option, b"\0\0\0\0", REP_ERR_INVALID)
        # Neither mode was switched on by the refused attempts: SET still needs one.
        self.assertRefused(c, OPT_SET_META_CONTEXT, meta_payload("", ["base:allocation"]),
                           REP_ERR_INVALID)
        self.assertStillNegotiating(c)
        c.negotiate_mode(EXTENDED)

    def test_starttls_refused_by_policy(self):
        self.serve()
        c = self.client()
        self.assertRefused(c, OPT_STARTTLS, b"", REP_ERR_POLICY)
        self.assertStillNegotiating(c)

    # ---- header modes ----

    def test_extended_headers_twice(self):
        self.serve()
        c = self.client()
        self.assertReplies(c.option(OPT_EXTENDED_HEADERS), OPT_EXTENDED_HEADERS, [REP_ACK])
        self.assertRefused(c, OPT_EXTENDED_HEADERS, b"", REP_ERR_INVALID)
        # Extended headers stay on: 32-byte requests, 32-byte reply headers.
        c.go()
        c.mode = EXTENDED
        r = c.command(CMD_READ, 0, 4096)
        self.assertEqual([ch.magic for ch in r.chunks], [EXTENDED_REPLY_MAGIC])
        self.assertEqual(r.data(0, 4096), b"A" * 4096)

    def test_structured_reply_after_extended_headers(self):
        self.serve()
        c = self.client()
        c.negotiate_mode(EXTENDED)
        self.assertRefused(c, OPT_STRUCTURED_REPLY, b"", REP_ERR_EXT_HEADER_REQD)
        _, eflags = c.go()
        self.assertEqual(eflags, BASE_FLAGS | TF_SEND_DF)
        c.mode = EXTENDED
        r = c.command(CMD_FLUSH)
        self.assertEqual([(ch.magic, ch.type, ch.flags) for ch in r.chunks],
                         [(EXTENDED_REPLY_MAGIC, REPLY_TYPE_NONE, REPLY_FLAG_DONE)])

    def test_structured_reply_twice(self):
        self.serve()
        c = self.client()
        c.negotiate_mode(STRUCTURED)
        self.assertRefused(c, OPT_STRUCTURED_REPLY, b"", REP_ERR_INVALID)
        c.go()
        c.mode = STRUCTURED
        self.assertEqual(c.read(0, 8), b"A" * 8)

    def test_extended_headers_after_structured_reply(self):
        self.serve()
        c = self.client()
        c.negotiate_mode(STRUCTURED)
        c.negotiate_mode(EXTENDED)
        c.go()
        c.mode = EXTENDED
        r = c.command(CMD_READ, 65536, 16)
        self.assertEqual([ch.magic for ch in r.chunks], [EXTENDED_REPLY_MAGIC])
        self.assertEqual(r.chunks[0].offset, 65536)
        self.assertEqual(r.data(65536, 16), b"a" * 16)

    # ---- EXPORT_NAME ----

    def test_export_name_after_extended_headers_closes(self):
        self.serve()
        c = self.client()
        c.negotiate_mode(EXTENDED)
        c.send_option(OPT_EXPORT_NAME, b"a.img")
        self.assertTrue(c.is_closed())

    def test_export_name_unknown_closes(self):
        self.serve()
        for name in (b"nosuch", b"a.im", b"a.img\0", b"../a.img", self.a.encode()):
            c = self.client()
            c.send_option(OPT_EXPORT_NAME, name)
            self.assertTrue(c.is_closed(), name)

    def test_export_name_known(self):
        self.serve()
        for name, size in ((b"", A_SIZE), (b"a.img", A_SIZE), (b"b.img", B_SIZE)):
            c = self.client()
            c.send_option(OPT_EXPORT_NAME, name)
            # NO_ZEROES was negotiated: 10 bytes, then the simple reply comes next.
            self.assertEqual(c.recv_exact(10), struct.pack(">QH", size, BASE_FLAGS))
            c.request(CMD_READ, 0, 4, cookie=99)
            self.assertEqual(c.recv_exact(16),
                             struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 99))
            self.assertEqual(c.recv_exact(4), b"AAAA" if size == A_SIZE else bytes(4))

    def test_export_name_with_structured_replies(self):
        self.serve()
        c = self.client(flags=FLAG_FIXED_NEWSTYLE)
        c.negotiate_mode(STRUCTURED)
        c.send_option(OPT_EXPORT_NAME, b"b.img")
        self.assertEqual(c.recv_exact(134),
                         struct.pack(">QH", B_SIZE, BASE_FLAGS | TF_SEND_DF) + bytes(124))

    # ---- LIST, INFO, GO ----

    def test_list(self):
        self.serve()
        c = self.client()
        replies = c.option(OPT_LIST)
        self.assertReplies(replies, OPT_LIST, [REP_SERVER, REP_SERVER, REP_ACK])
        self.assertEqual([r.data for r in replies],
                         [b"\0\0\0\x05a.img", b"\0\0\0\x05b.img", b""])

    def test_info_go_malformed(self):
        self.serve()
        c = self.client()
        for option in (OPT_INFO, OPT_GO):
            bad = [
                b"",                                          # shorter than 6 bytes
                b"\0\0\0\0\0",
                info_payload("a.img", name_len=100),         # name overruns
                info_payload("a.img", name_len=0xFFFFFFFF),
                info_payload("a.img", [INFO_NAME], count=2),  # count mismatch
                info_payload("a.img", [INFO_NAME], count=0),
                info_payload("a.img", [], count=1),
                info_payload("a.img") + b"\0",                # trailing byte
            ]
            for data in bad:
                self.assertRefused(c, option, data, REP_ERR_INVALID)
            # An unknown export: the error alone, no INFO before it.
            for name in ("nosuch", "A.IMG", "a.img/"):
                self.assertRefused(c, option, info_payload(name), REP_ERR_UNKNOWN)
        self.assertStillNegotiating(c)
        self.assertEqual(c.go("b.img"), (B_SIZE, BASE_FLAGS))

    def test_info_replies(self):
        self.serve()
        c = self.client()
        replies, infos = c.info_go(OPT_INFO, "b.img", [INFO_NAME, INFO_BLOCK_SIZE])
        self.assertReplies(replies, OPT_INFO, [REP_INFO] * 3 + [REP_ACK])
        self.assertEqual(infos[INFO_EXPORT], struct.pack(">QH", B_SIZE, BASE_FLAGS))
        self.assertEqual(infos[INFO_NAME], b"b.img")
        self.assertEqual(infos[INFO_BLOCK_SIZE], struct.pack(">III", 1, 4096, 32 << 20))
        # Every INFO reply is sized as libnbd requires.
        sizes = {struct.unpack(">H", r.data[:2])[0]: len(r.data) for r in replies[:-1]}
        self.assertEqual(sizes[INFO_EXPORT], 12)
        self.assertEqual(sizes[INFO_BLOCK_SIZE], 14)
        # INFO changes nothing: GO of the default export follows.
        self.assertEqual(c.go(""), (A_SIZE, BASE_FLAGS))

    def test_info_then_go_flags_extended(self):
        self.serve()
        # No contexts: INFO advertises block-status payloads, GO does not.
        c = self.client()
        c.negotiate_mode(EXTENDED)
        _, infos = c.info_go(OPT_INFO, "a.img")
        self.assertEqual(struct.unpack(">QH", infos[INFO_EXPORT]),
                         (A_SIZE, BASE_FLAGS | TF_SEND_DF | TF_BLOCK_STAT_PAYLOAD))
        self.assertEqual(c.go("a.img"), (A_SIZE, BASE_FLAGS | TF_SEND_DF))
        # A context selected for the export: both advertise it.
        c = self.client()
        c.negotiate_mode(EXTENDED)
        ids, final = c.set_meta_context("a.img", ["base:allocation"])
        self.assertEqual((ids, final), ({"base:allocation": 0}, REP_ACK))
        _, infos = c.info_go(OPT_INFO, "a.img")
        self.assertEqual(struct.unpack(">QH", infos[INFO_EXPORT]),
                         (A_SIZE, BASE_FLAGS | TF_SEND_DF | TF_BLOCK_STAT_PAYLOAD))
        self.assertEqual(c.go("a.img"),
                         (A_SIZE, BASE_FLAGS | TF_SEND_DF | TF_BLOCK_STAT_PAYLOAD))

    def test_info_then_go_flags_structured(self):
        # Never the payload bit without extended headers, contexts or not.
        self.serve()
        c = self.client()
        c.negotiate_mode(STRUCTURED)
        c.set_meta_context("a.img", ["base:allocation"])
        _, infos = c.info_go(OPT_INFO, "a.img")
        self.assertEqual(struct.unpack(">QH", infos[INFO_EXPORT]),
                         (A_SIZE, BASE_FLAGS | TF_SEND_DF))
        self.assertEqual(c.go("a.img"), (A_SIZE, BASE_FLAGS | TF_SEND_DF))

    def test_go_unknown_export_continues(self):
        self.serve()
        c = self.client()
        self.assertRefused(c, OPT_GO, info_payload("c.img"), REP_ERR_UNKNOWN)
        self.assertEqual(c.go("a.img"), (A_SIZE, BASE_FLAGS))
        c.mode = SIMPLE
        self.assertEqual(c.read(65536, 3), b"aaa")

    # ---- meta contexts ----

    def list_contexts(self, c, queries, export="a.img"):
        replies = c.option(OPT_LIST_META_CONTEXT, meta_payload(export, queries))
        self.assertEqual(replies[-1].type, REP_ACK)
        self.assertEqual({r.type for r in replies[:-1]} - {REP_META_CONTEXT}, set())
        # LIST ids mean nothing: always 0 here.
        self.assertEqual([r.data[:4] for r in replies[:-1]], [b"\0\0\0\0"] * (len(replies) - 1))
        return [r.data[4:].decode() for r in replies[:-1]]

    def test_list_meta_context(self):
        self.serve()
        c = self.client()
        c.negotiate_mode(STRUCTURED)
        cases = [
            ([], ["base:allocation"]),
            (["base:"], ["base:allocation"]),
            (["base:allocation"], ["base:allocation"]),
            (["qemu:"], []),
            (["qemu:dirty-bitmap:"], []),
            (["qemu:dirty-bitmap:b0"], []),
            (["qemu:allocation-depth"], []),
            (["nosuch:"], []),
            (["nosuch:allocation"], []),
            (["base:other"], []),
            (["base"], []),
            ([""], []),
            (["nosuch:", "base:allocation", "qemu:"], ["base:allocation"]),
        ]
        for queries, expected in cases:
            self.assertEqual(self.list_contexts(c, queries), expected, queries)
        self.assertEqual(self.list_contexts(c, [], export=""), ["base:allocation"])
        self.assertEqual(self.list_contexts(c, ["base:"], export="b.img"), ["base:allocation"])

    def test_meta_context_bitmaps(self):
        nbdfs_test.run([nbdfs_test.NBDFS, "bitmap", "add", self.a, "b0"])
        nbdfs_test.run([nbdfs_test.NBDFS, "bitmap", "add", self.a, "b1"])
        self.serve()
        c = self.client()
        c.negotiate_mode(EXTENDED)
        b0, b1 = "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"
        for queries, expected in (([], ["base:allocation", b0, b1]),
                                  (["qemu:"], [b0, b1]),
                                  (["qemu:dirty-bitmap:"], [b0, b1]),
                                  (["qemu:dirty-bitmap:b1"], [b1]),
                                  (["qemu:dirty-bitmap:b"], []),
                                  (["qemu:dirty-bitmap:b2"], []),
                                  (["base:"], ["base:allocation"])):
            self.assertEqual(self.list_contexts(c, queries), expected, queries)
        # b.img has no bitmaps.
        self.assertEqual(self.list_contexts(c, ["qemu:"], export="b.img"), [])
        # SET selects exact names only; ids are fixed per export.
        for queries, expected in ((["qemu:"], {}), (["qemu:dirty-bitmap:"], {}),
                                  ([b1], {b1: 2}), ([b1, "base:allocation"],
                                                    {b1: 2, "base:allocation": 0}),
                                  ([b0, b1, "base:"], {b0: 1, b1: 2})):
            self.assertEqual(c.set_meta_context("a.img", queries), (expected, REP_ACK),
                             queries)
        self.assertEqual(c.go("a.img"),
                         (A_SIZE, BASE_FLAGS | TF_SEND_DF | TF_BLOCK_STAT_PAYLOAD))

    def test_list_meta_context_before_structured_replies(self):
        # Served, as qemu-nbd does (the protocol lets a server refuse it).
        self.serve()
        c = self.client()
        self.assertEqual(self.list_contexts(c, []), ["base:allocation"])

    def test_list_meta_context_malformed(self):
        self.serve()
        c = self.client()
        c.negotiate_mode(EXTENDED)
        for data in (b"", b"\0\0\0\0", meta_payload("a.img", ["base:"], name_len=50),
                     meta_payload("a.img", ["base:"], count=2),
                     meta_payload("a.img", ["base:"]) + b"x",
                     meta_payload("a.img", ["base:"])[:-1]):
            self.assertRefused(c, OPT_LIST_META_CONTEXT, data, REP_ERR_INVALID)
        self.assertRefused(c, OPT_LIST_META_CONTEXT, meta_payload("nosuch", []),
                           REP_ERR_UNKNOWN)
        self.assertStillNegotiating(c)

    def test_set_meta_context_before_structured_replies(self):
        self.serve()
        c = self.client()
        self.assertRefused(c, OPT_SET_META_CONTEXT, meta_payload("a.img", ["base:allocation"]),
                           REP_ERR_INVALID)
        c.negotiate_mode(STRUCTURED)
        self.assertEqual(c.set_meta_context("a.img", ["base:allocation"]),
                         ({"base:allocation": 0}, REP_ACK))

    def test_set_meta_context_queries(self):
        self.serve()
        c = self.client()
        c.negotiate_mode(STRUCTURED)
        cases = [
            ([], {}),
            (["base:"], {}),
            (["qemu:"], {}),
            (["qemu:dirty-bitmap:"], {}),
            (["nosuch:allocation"], {}),
            (["base:other"], {}),
            (["base:allocation"], {"base:allocation": 0}),
            (["base:allocation", "base:allocation"], {"base:allocation": 0}),
        ]
        for queries, expected in cases:
            ids, final = c.set_meta_context("a.img", queries)
            self.assertEqual((ids, final), (expected, REP_ACK), queries)
        # The last SET ("base:" alone) selects nothing: block status is refused.
        c.set_meta_context("a.img", ["base:"])
        c.go("a.img")
        c.mode = STRUCTURED
        self.assertBlockStatusRefused(c)

    def set_then_break(self, data, reply):
        """SET base:allocation, then a SET with DATA refused with REPLY;
        afterwards nothing is selected (checked after GO, under EH)."""
        c = self.client()
        c.negotiate_mode(EXTENDED)
        self.assertEqual(c.set_meta_context("a.img", ["base:allocation"]),
                         ({"base:allocation": 0}, REP_ACK))
        self.assertRefused(c, OPT_SET_META_CONTEXT, data, reply)
        self.assertEqual(c.go("a.img"), (A_SIZE, BASE_FLAGS | TF_SEND_DF))
        c.mode = EXTENDED
        self.assertBlockStatusRefused(c)

    def test_set_meta_context_unknown_export_clears(self):
        self.serve()
        self.set_then_break(meta_payload("nosuch", ["base:allocation"]), REP_ERR_UNKNOWN)

    def test_set_meta_context_query_overrun_clears(self):
        self.serve()
        q = meta_payload("a.img", ["base:allocation"])
        # Last query's length says 16, 15 bytes follow.
        self.set_then_break(q[:-15 - 4] + struct.pack(">I", 16) + b"base:allocation",
                            REP_ERR_INVALID)

    def test_set_meta_context_malformed_clears(self):
        self.serve()
        for data in (meta_payload("a.img", ["base:allocation"]) + b"\0\0",   # trailing
                     meta_payload("a.img", ["base:allocation"], count=2),    # missing query
                     meta_payload("a.img", ["base:allocation"], name_len=200),
                     b"\0\0\0\0\0\0\0"):
            self.set_then_break(data, REP_ERR_INVALID)

    def test_go_other_export_than_set(self):
        self.serve()
        # SET names b.img, GO enters a.img: no contexts, no payload bit.
        c = self.client()
        c.negotiate_mode(EXTENDED)
        self.assertEqual(c.set_meta_context("b.img", ["base:allocation"]),
                         ({"base:allocation": 0}, REP_ACK))
        self.assertEqual(c.go("a.img"), (A_SIZE, BASE_FLAGS | TF_SEND_DF))
        c.mode = EXTENDED
        self.assertBlockStatusRefused(c)
        # The same under structured replies.
        c = self.client()
        c.negotiate_mode(STRUCTURED)
        c.set_meta_context("b.img", ["base:allocation"])
        c.go("a.img")
        c.mode = STRUCTURED
        self.assertBlockStatusRefused(c)
        # Whereas SET and GO of the same export keep the selection.
        c = self.client()
        c.negotiate_mode(EXTENDED)
        c.set_meta_context("a.img", ["base:allocation"])
        c.go("a.img")
        c.mode = EXTENDED
        r = c.command(CMD_BLOCK_STATUS, 0, 8192)
        self.assertEqual(r.error, 0)
        self.assertEqual(r.chunks[0].extents, [(4096, 0), (4096, STATE_HOLE | STATE_ZERO)])

    def test_extended_headers_after_set_keeps_contexts(self):
        self.serve()
        c = self.client()
        c.negotiate_mode(STRUCTURED)
        c.set_meta_context("a.img", ["base:allocation"])
        c.negotiate_mode(EXTENDED)
        self.assertEqual(c.go("a.img"),
                         (A_SIZE, BASE_FLAGS | TF_SEND_DF | TF_BLOCK_STAT_PAYLOAD))

    # ---- size limits, ABORT, magic ----

    def test_option_over_64k_too_big(self):
        self.serve()
        c = self.client()
        c.negotiate_mode(STRUCTURED)
        big = meta_payload("a.img", ["base:allocation"] + ["x" * 1000] * 70)
        self.assertGreater(len(big), 64 << 10)
        for option in (OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT, OPT_GO, OPT_INFO):
            self.assertRefused(c, option, big, REP_ERR_TOO_BIG)
        # An unknown option is drained just the same.
        self.assertRefused(c, 0xDEAD, b"\0" * (1 << 20), REP_ERR_UNSUP)
        self.assertStillNegotiating(c)
        self.assertEqual(c.set_meta_context("a.img", ["base:allocation"]),
                         ({"base:allocation": 0}, REP_ACK))

    def test_option_over_32m_closes(self):
        self.serve()
        for option in (OPT_GO, 0xDEAD, OPT_EXPORT_NAME):
            c = self.client()
            c.send_option(option, length=(32 << 20) + 1)
            self.assertTrue(c.is_closed(), option)

    def test_abort(self):
        self.serve()
        for data in (b"", b"ignored"):
            c = self.client()
            self.assertReplies(c.option(OPT_ABORT, data), OPT_ABORT, [REP_ACK])
            self.assertTrue(c.is_closed())
        # A client that hangs up right after ABORT does not upset the server.
        c = self.client()
        c.send_option(OPT_ABORT)
        c.close()
        c = self.client()
        self.assertStillNegotiating(c)

    def test_bad_option_magic_closes(self):
        self.serve()
        c = self.client()
        c.send_option(OPT_LIST, magic=IHAVEOPT ^ 1)
        self.assertTrue(c.is_closed())
        c = self.client()
        c.negotiate_mode(STRUCTURED)
        c.send_option(OPT_LIST, magic=0)
        self.assertTrue(c.is_closed())

    # ---- limits on clients ----

    def test_handshake_limit(self):
        self.serve("--handshake-limit", "1")
        silent = self.client(start=False)
        t0 = time.monotonic()
        self.assertEqual(silent.recv_exact(18)[:8], b"NBDMAGIC")
        # One that stops half way through the option loop is dropped too.
        slow = self.client()
        slow.negotiate_mode(STRUCTURED)
        done = self.client()
        done.connect(STRUCTURED, "a.img")
        self.assertTrue(silent.is_closed(timeout=5))
        self.assertGreaterEqual(time.monotonic() - t0, 0.9)
        self.assertTrue(slow.is_closed(timeout=5))
        # The limit is on negotiation only: transmission has none.
        time.sleep(0.3)
        self.assertEqual(done.read(0, 4), b"AAAA")

    def test_max_connections(self):
        self.serve("--max-connections", "2")
        # The start-up probe's connection may still be counted for a moment:
        # take the two slots once both clients are served.
        pair = []

        def two_served():
            a, b = self.client(), self.client()
            if all(x.option(OPT_LIST)[-1].type == REP_ACK for x in (a, b)):
                pair.extend((a, b))
                return True
            a.close()
            b.close()
            return False
        nbdfs_test.wait_for(two_served, 5, "two connection slots")
        first, second = pair
        first.connect(EXTENDED, "a.img")
        # second is still negotiating: it counts all the same.
        third = self.client()
        reply = self.assertRefused(third, OPT_GO, info_payload("a.img"), REP_ERR_POLICY)
        self.assertIn(b"2", reply.data)
        self.assertRefused(third, OPT_LIST, b"", REP_ERR_POLICY)
        self.assertReplies(third.option(OPT_ABORT), OPT_ABORT, [REP_ACK])
        self.assertTrue(third.is_closed())
        second.connect(STRUCTURED, "b.img")
        self.assertEqual(first.read(0, 4), b"AAAA")
        self.assertEqual(second.read(0, 4), bytes(4))
        # Once one has left (its socket closed), a new client is served again.
        first.disconnect()
        self.assertTrue(first.is_closed())
        fourth = self.client()
        self.assertStillNegotiating(fourth)


if __name__ == "__main__":
    nbdfs_test.main()
