#!/usr/bin/python3
"""nbdfs info against the bundled server (a URI of 'nbdfs serve', and a local
image), checked against nbdinfo's view of the same server."""
import json

import nbdfs_test as t

MiB = 1 << 20

# nbdinfo --json key -> our transmission flag name.
FLAG_OF_NBDINFO_KEY = {
    "is_read_only": "read-only", "can_flush": "send-flush", "can_fua": "send-fua",
    "is_rotational": "rotational", "can_trim": "send-trim", "can_zero": "send-write-zeroes",
    "can_df": "send-df", "can_multi_conn": "can-multi-conn", "can_cache": "send-cache",
    "can_fast_zero": "send-fast-zero", "can_block_status_payload": "block-status-payload",
}


class InfoTest(t.TestCase):

    def setUp(self):
        super().setUp()
        self.a = t.make_image(self.path("a.img"), 4 * MiB, [(0, b"a" * 4096)])
        self.b = t.make_image(self.path("b.img"), 6 * MiB)

    def info_json(self, source):
        return json.loads(t.run([t.NBDFS, "info", "--json", source]).stdout)

    def assert_matches_nbdinfo(self, got, uri):
        ref = json.loads(t.run(["nbdinfo", "--list", "--json", uri]).stdout)
        self.assertEqual(got["protocol"], ref["protocol"])
        self.assertEqual(got["tls"], ref["TLS"])
        self.assertEqual(got["headers"], "extended" if ref["extended"] else
                         "structured" if ref["structured"] else "simple")
        ref_exports = {e["export-name"]: e for e in ref["exports"]}
        self.assertEqual(sorted(e["name"] for e in got["exports"]), sorted(ref_exports))
        for exp in got["exports"]:
            r = ref_exports[exp["name"]]
            self.assertEqual(exp["size"], r["export-size"])
            self.assertEqual(exp["meta-contexts"], r["contexts"])
            self.assertEqual(exp["block-size"], {"minimum": r["block_size_minimum"],
                                                 "preferred": r["block_size_preferred"],
                                                 "maximum": r["block_size_maximum"]})
            for key, flag in FLAG_OF_NBDINFO_KEY.items():
                self.assertEqual(flag in exp["flags"], r[key], "%s of %s" % (flag, exp["name"]))
            self.assertIn("has-flags", exp["flags"])

    def test_serve_uri(self):
        srv = self.start_nbdfs([self.a, self.b])
        got = self.info_json(srv.uri())
        self.assertEqual([e["name"] for e in got["exports"]], ["a.img", "b.img"])
        self.assertEqual([e["size"] for e in got["exports"]], [4 * MiB, 6 * MiB])
        self.assertEqual(got["headers"], "extended")
        for exp in got["exports"]:
            self.assertIn("block-status-payload", exp["flags"])
            self.assertEqual(exp["meta-contexts"], ["base:allocation"])
            self.assertFalse(exp["read-only"])
        self.assert_matches_nbdinfo(got, srv.uri())

    def test_read_only_server(self):
        srv = self.start_nbdfs([self.a], "-r")
        got = self.info_json(srv.uri())
        self.assertTrue(got["exports"][0]["read-only"])
        self.assertIn("read-only", got["exports"][0]["flags"])
        self.assertNotIn("send-trim", got["exports"][0]["flags"])
        self.assert_matches_nbdinfo(got, srv.uri())

    def test_text_output(self):
        srv = self.start_nbdfs([self.a])
        text = t.run([t.NBDFS, "info", srv.uri()]).stdout
        self.assertIn("protocol: newstyle-fixed\n", text)
        self.assertIn("headers: extended\n", text)
        self.assertIn("TLS: no\n", text)
        self.assertIn('export "a.img":\n', text)
        self.assertIn("\tsize: 4194304 (4 MiB)\n", text)
        self.assertIn("block-status-payload", text)
        self.assertIn("\tblock sizes: minimum 1 preferred 4096 maximum 33554432\n", text)
        self.assertIn("\t\tbase:allocation\n", text)

    def test_local_image(self):
        got = self.info_json(self.a)
        (exp,) = got["exports"]
        self.assertEqual(exp["name"], "a.img")
        self.assertEqual(exp["size"], 4 * MiB)
        self.assertEqual(exp["meta-contexts"], ["base:allocation"])

    def test_errors(self):
        for argv, culprit in ((["nbd+unix:///?socket=" + self.path("none.sock")], "none.sock"),
                              ([self.path("missing.img")], "missing.img"),
                              (["--bogus", self.a], "--bogus"),
                              ([], "SOURCE")):
            p = t.run([t.NBDFS, "info", *argv], check=False)
            self.assertNotEqual(p.returncode, 0)
            lines = p.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, p.stderr)
            self.assertTrue(lines[0].startswith("nbdfs info: "), lines[0])
            self.assertIn(culprit, lines[0])


if __name__ == "__main__":
    t.main()
