"""Regression tests for each class of NBD server vulnerability seen in the
wild: length overflows in options and strings, option payloads of gigabytes,
commands before NBD_OPT_GO, block-status ranges at the 32-bit and 64-bit
limits, client data echoed into bounded replies, connections during shutdown
(tests/faults), all against 'nbdfs serve', which must answer or hang up and
keep serving everyone else."""
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbdfs_test  # noqa: E402
from rawclient import *  # noqa: E402,F401,F403
from rawclient import RawClient, info_payload, meta_payload, status_payload  # noqa: E402

SIZE = 1 << 20


class CveClassTests(nbdfs_test.TestCase):

    def setUp(self):
        super().setUp()
        self.img = nbdfs_test.make_image(self.path("disk.img"), SIZE, [(0, b"D" * 4096)])
        self.srv = self.start_nbdfs([self.img])

    def client(self):
        c = RawClient(self.srv.sock)
        self.addCleanup(c.close)
        return c

    def assertServerHealthy(self):
        """A fresh client still negotiates and reads."""
        c = self.client()
        c.connect(EXTENDED)
        self.assertEqual(c.read(0, 4096), b"D" * 4096)

    def test_string_lengths_that_overflow(self):
        # Name length 0xffffffff in INFO/GO: 32-bit wrap-around of "4 + n + 2".
        for option in (OPT_INFO, OPT_GO):
            c = self.client()
            c.start()
            data = struct.pack(">I", 0xffffffff) + b"x" * 8 + struct.pack(">H", 0)
            replies = c.option(option, data)
            self.assertEqual([r.type for r in replies], [REP_ERR_INVALID])
            # Length just past the option's end, and a huge info count.
            replies = c.option(option, info_payload("disk.img", name_len=9))
            self.assertEqual([r.type for r in replies], [REP_ERR_INVALID])
            replies = c.option(option, info_payload("disk.img", count=0xffff))
            self.assertEqual([r.type for r in replies], [REP_ERR_INVALID])
        # Query lengths that wrap, in LIST and SET.
        for option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            c = self.client()
            c.start()
            c.negotiate_mode(EXTENDED)
            data = struct.pack(">II", 0, 2) + struct.pack(">I", 0xfffffffc) + b"base:"
            replies = c.option(option, data)
            self.assertEqual([r.type for r in replies], [REP_ERR_INVALID])
            replies = c.option(option, meta_payload("", ["base:allocation"], count=0x7fffffff))
            self.assertEqual([r.type for r in replies], [REP_ERR_INVALID])
        self.assertServerHealthy()

    def test_option_payload_of_gigabytes(self):
        for option in (OPT_GO, OPT_SET_META_CONTEXT, 0xdead):
            c = self.client()
            c.start()
            c.send_option(option, b"", length=4 << 30 - 1)
            self.assertTrue(c.is_closed(), "announced 4 GiB option not refused")
        self.assertServerHealthy()

    def test_commands_before_go(self):
        # A transmission request in the option phase is not an option: hang up.
        c = self.client()
        c.start()
        c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, 4096))
        self.assertTrue(c.is_closed())
        c = self.client()
        c.start()
        c.negotiate_mode(EXTENDED)
        c.send(struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 16) + b"w" * 16)
        self.assertTrue(c.is_closed())
        with open(self.img, "rb") as f:
            self.assertEqual(f.read(16), b"D" * 16)
        self.assertServerHealthy()

    def test_block_status_at_the_32_and_64_bit_limits(self):
        c = self.client()
        ids = c.connect(EXTENDED, contexts=["base:allocation"])
        bid = ids["base:allocation"]
        # Offsets and lengths whose sum overflows 64 bits.
        for offset, length in ((2**64 - 512, 1024), (512, 2**64 - 256), (SIZE, 1),
                               (2**63, 2**63)):
            r = c.command(CMD_BLOCK_STATUS, offset, length)
            self.assertEqual(r.error, EINVAL, (offset, length))
            r = c.command(CMD_BLOCK_STATUS, offset, 12, CMD_FLAG_PAYLOAD_LEN,
                          status_payload(length, [bid]))
            self.assertEqual(r.error, EINVAL, (offset, length))
        # The whole export at once, and its last byte.
        r = c.command(CMD_BLOCK_STATUS, 0, SIZE)
        self.assertFalse(r.error)
        r = c.command(CMD_BLOCK_STATUS, SIZE - 1, 1)
        self.assertFalse(r.error)
        # Compact mode: a length of 2^32 - 1 is fine and stays inside the export.
        c2 = self.client()
        c2.connect(STRUCTURED, contexts=["base:allocation"])
        r = c2.command(CMD_BLOCK_STATUS, 0, 0xffffffff)
        self.assertEqual(r.error, EINVAL)      # past the 1 MiB export
        r = c2.command(CMD_BLOCK_STATUS, 0, SIZE)
        self.assertFalse(r.error)
        self.assertEqual(c.read(0, 4096), b"D" * 4096)

    def test_client_data_is_not_echoed_unbounded(self):
        # A 4096-byte export name: the error message quotes at most 128 bytes of it.
        name = "N" * 4096
        for option in (OPT_INFO, OPT_SET_META_CONTEXT):
            c = self.client()
            c.start()
            c.negotiate_mode(STRUCTURED)
            data = info_payload(name) if option == OPT_INFO else meta_payload(name, ["base:"])
            replies = c.option(option, data)
            self.assertEqual([r.type for r in replies], [REP_ERR_UNKNOWN])
            self.assertLessEqual(replies[0].data.count(b"N"), 128)
            self.assertLess(len(replies[0].data), 256)
        # A name over the 4096-byte limit is refused without quoting it.
        c = self.client()
        c.start()
        replies = c.option(OPT_GO, info_payload("M" * 5000))
        self.assertEqual([r.type for r in replies], [REP_ERR_INVALID])
        self.assertNotIn(b"MMMM", replies[0].data)
        self.assertServerHealthy()


if __name__ == "__main__":
    nbdfs_test.main()
