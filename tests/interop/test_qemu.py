"""qemu 10's NBD client (qemu-nbd --list, qemu-img, qemu-io) against
'nbdfs serve' and qemu-nbd 10 serving the same kind of image.

Every check runs against both servers (NbdfsQemuChecks, QemuNbdQemuChecks);
where they differ on purpose, expect() names each one's answer.
"""
import json
import random
import shutil

import nbdfs_test
from nbdfs_test import run

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB


def pattern(seed, n):
    return random.Random(seed).randbytes(n)


RUNS = [(0, 64 * KiB), (1 * MiB, 128 * KiB), (SIZE - 4 * KiB, 4 * KiB)]
CONTENT = [(off, pattern(off, n)) for off, n in RUNS]


def map_entry(start, length, data):
    """One entry of 'qemu-img map --output=json' for a raw image."""
    return {"start": start, "length": length, "depth": 0, "present": True,
            "zero": not data, "data": data, "compressed": False, "offset": start}


INITIAL_MAP = [map_entry(0, 64 * KiB, True),
               map_entry(64 * KiB, 1 * MiB - 64 * KiB, False),
               map_entry(1 * MiB, 128 * KiB, True),
               map_entry(1 * MiB + 128 * KiB, SIZE - 4 * KiB - 1 * MiB - 128 * KiB, False),
               map_entry(SIZE - 4 * KiB, 4 * KiB, True)]


class QemuChecks:

    def setUp(self):
        super().setUp()
        self.img = nbdfs_test.make_image(self.path("disk.img"), SIZE, CONTENT)

    def serve(self, *args):
        self.srv = self.start_server(self.img, *args)
        return self.srv

    def file_bytes(self, offset, length):
        with open(self.img, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def qemu_map(self, target, fmt="raw"):
        return json.loads(run(["qemu-img", "map", "--output=json", "-f", fmt, target]).stdout)

    def qemu_io(self, *commands, read_only=False):
        argv = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
        for c in commands:
            argv += ["-c", c]
        return run(argv + [self.srv.uri()], check=False)

    # ---- qemu-nbd --list ----

    def listing(self, flags, names):
        return ("exports available: 1\n"
                " export: '%s'\n"
                "  size:  %d\n"
                "  flags: 0x%x ( %s )\n"
                "  min block: 1\n"
                "  opt block: 4096\n"
                "  max block: 33554432\n"
                "  transaction size: 64-bit\n"
                "  available meta contexts: 1\n"
                "   base:allocation\n"
                % (self.expect(nbdfs="disk.img", qemu_nbd=""), SIZE, flags, names))

    def test_list(self):
        self.serve()
        # qemu 10 negotiates extended headers, so the payload bit is shown.
        out = run(["qemu-nbd", "--list", "-k", self.srv.sock]).stdout
        self.assertEqual(out, self.listing(
            0x1DED, "flush fua trim zeroes df multi cache fast-zero block-status-payload"))

    def test_list_read_only(self):
        self.serve("-r")
        out = run(["qemu-nbd", "--list", "-k", self.srv.sock]).stdout
        self.assertEqual(out, self.listing(
            0x158F, "readonly flush fua df multi cache block-status-payload"))

    # ---- qemu-img ----

    def test_info(self):
        self.serve()
        info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw",
                               self.srv.uri()]).stdout)
        self.assertEqual((info["virtual-size"], info["format"]), (SIZE, "raw"))

    def test_compare(self):
        self.serve()
        pristine = self.path("pristine.img")
        shutil.copyfile(self.img, pristine)
        p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", pristine, self.srv.uri()])
        self.assertEqual(p.stdout, "Images are identical.\n")
        self.assertEqual(self.qemu_io("write -P 0x5a %d 512" % (2 * MiB)).returncode, 0)
        p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", pristine, self.srv.uri()],
                check=False)
        self.assertEqual((p.returncode, p.stdout), (1, "Content mismatch at offset %d!\n"
                                                    % (2 * MiB)))
        p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", self.img, self.srv.uri()])
        self.assertEqual(p.stdout, "Images are identical.\n")

    def test_map(self):
        self.serve()
        self.assertEqual(self.qemu_map(self.img), INITIAL_MAP)
        self.assertEqual(self.qemu_map(self.srv.uri()), INITIAL_MAP)

    def test_convert(self):
        self.serve()
        out = self.path("copy.img")
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", self.srv.uri(), out], timeout=60)
        with open(self.img, "rb") as a, open(out, "rb") as b:
            self.assertEqual(a.read(), b.read())
        # The copy is as sparse as the original: convert used block status.
        self.assertEqual(self.qemu_map(out), INITIAL_MAP)

    # ---- qemu-io writes land in the image ----

    def test_qemu_io_writes(self):
        self.serve()
        p = self.qemu_io("write -P 0xab 4096 8192",
                         "write -z %d %d" % (1 * MiB, 64 * KiB),             # NO_HOLE
                         "write -z -u %d %d" % (1 * MiB + 64 * KiB, 32 * KiB),  # may unmap
                         "discard %d %d" % (1 * MiB + 96 * KiB, 32 * KiB),
                         "write -P 0xcd %d 4096" % (8 * MiB),
                         "flush")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.count("wrote "), 4)
        self.assertEqual(self.file_bytes(0, 4096), CONTENT[0][1][:4096])
        self.assertEqual(self.file_bytes(4096, 8192), b"\xab" * 8192)
        self.assertEqual(self.file_bytes(12288, 64 * KiB - 12288), CONTENT[0][1][12288:])
        self.assertEqual(self.file_bytes(1 * MiB, 96 * KiB), bytes(96 * KiB))
        self.assertEqual(self.file_bytes(8 * MiB, 4096), b"\xcd" * 4096)
        self.assertEqual(self.file_bytes(8 * MiB + 4096, 4096), bytes(4096))
        # TRIM: nbdfs punches the hole; qemu-nbd ignores it (--discard=ignore).
        self.assertEqual(self.file_bytes(1 * MiB + 96 * KiB, 32 * KiB),
                         self.expect(nbdfs=bytes(32 * KiB),
                                     qemu_nbd=CONTENT[1][1][96 * KiB:]))
        # What is allocated now, seen in the file and through the export alike.
        expected = self.expect(
            nbdfs=[map_entry(0, 64 * KiB, True),
                   map_entry(64 * KiB, 1 * MiB - 64 * KiB, False),
                   map_entry(1 * MiB, 64 * KiB, True),         # NO_HOLE: allocated zeros
                   # write -z -u and discard punched the rest of that run.
                   map_entry(1 * MiB + 64 * KiB, 7 * MiB - 64 * KiB, False),
                   map_entry(8 * MiB, 4096, True),
                   map_entry(8 * MiB + 4096, SIZE - 4 * KiB - 8 * MiB - 4096, False),
                   map_entry(SIZE - 4 * KiB, 4 * KiB, True)],
            qemu_nbd=[map_entry(0, 64 * KiB, True),
                      map_entry(64 * KiB, 1 * MiB - 64 * KiB, False),
                      map_entry(1 * MiB, 128 * KiB, True),
                      map_entry(1 * MiB + 128 * KiB, 7 * MiB - 128 * KiB, False),
                      map_entry(8 * MiB, 4096, True),
                      map_entry(8 * MiB + 4096, SIZE - 4 * KiB - 8 * MiB - 4096, False),
                      map_entry(SIZE - 4 * KiB, 4 * KiB, True)])
        self.assertEqual(self.qemu_map(self.srv.uri()), self.qemu_map(self.img))
        self.assertEqual(self.qemu_map(self.img), expected)
        # qemu-io reads back what it wrote, pattern-checked.
        p = self.qemu_io("read -P 0xab 4096 8192", "read -P 0 %d %d" % (1 * MiB, 96 * KiB),
                         "read -P 0xcd %d 4096" % (8 * MiB), read_only=True)
        self.assertEqual((p.returncode, p.stdout.count("read "), "failed" in p.stdout),
                         (0, 3, False), p.stdout)
        p = self.qemu_io("read -P 0xac 4096 8192", read_only=True)
        self.assertIn("Pattern verification failed at offset 4096, 8192 bytes", p.stdout)

    def test_qemu_io_read_only(self):
        self.serve("-r")
        p = self.qemu_io("write -P 0xab 0 4096")
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(self.file_bytes(0, 4096), CONTENT[0][1][:4096])
        p = self.qemu_io("read -P 0 %d 4096" % (2 * MiB), read_only=True)
        self.assertEqual((p.returncode, "read 4096/4096 bytes at offset %d" % (2 * MiB)
                          in p.stdout), (0, True))


nbdfs_test.server_test_classes(QemuChecks, globals())

if __name__ == "__main__":
    nbdfs_test.main()
