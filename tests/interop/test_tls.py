#!/usr/bin/python3
"""TLS and access control for 'nbdfs serve': x509 (with and without client
certificates) and PSK, --tls=on and require, every client kind reading and
writing through it (libnbd's nbdinfo, nbdcopy and Python bindings, qemu-img
and qemu-io, nbdfs mount; and nbdfs mount of qemu-nbd with TLS), the clients
it must refuse (plain, wrong key, foreign or expired certificate), the
hostile cases (options before TLS, plaintext after STARTTLS, garbage or
silence instead of a TLS handshake), socket permissions and the safe TCP
default.  Certificates and keys are made here with certtool and psktool."""
import os
import ssl
import time

import nbd

import nbdfs_test as t
from pki import Pki
from hostile import rc
from nbdfs_test import NBDFS, run

KiB, MiB = 1 << 10, 1 << 20


def tls_uri(sock, **params):
    query = "&".join(["socket=" + sock] + ["%s=%s" % kv for kv in params.items()])
    user = params.pop("user", None)
    return "nbds+unix://%s/?%s" % (user + "@" if user else "", query)


class TlsTest(t.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.pki_dir = t.tempfile.mkdtemp(prefix="nbdfs-pki-")
        cls.pki = Pki(cls.pki_dir)

    @classmethod
    def tearDownClass(cls):
        t.shutil.rmtree(cls.pki_dir, True)

    def setUp(self):
        super().setUp()
        self.image = t.make_image(self.path("disk.img"), 16 * MiB, [(MiB, b"tls!" * 1024)])

    def serve(self, *args, name="nbdfs"):
        return self.start_nbdfs([self.image], *args, name=name)

    def x509(self, *args):
        return self.serve("--tls-creds", self.pki.path("server"), *args)

    def client(self, sub="client"):
        return {"tls-certificates": self.pki.path(sub)}

    def nbdinfo(self, uri, check=True):
        return run(["nbdinfo", "--json", uri], check=check)

    # ---- clients that must work ----

    def test_x509_libnbd_tools_and_bindings(self):
        srv = self.x509()
        uri = tls_uri(srv.sock, **self.client())
        out = self.nbdinfo(uri).stdout
        self.assertIn('"export-size": %d' % (16 * MiB), out)
        data = os.urandom(4 * MiB)
        src = self.path("src.img")
        with open(src, "wb") as f:
            f.write(data)
        run(["nbdcopy", src, uri])
        dst = self.path("dst.img")
        run(["nbdcopy", uri, dst])
        with open(dst, "rb") as f:
            self.assertEqual(f.read(4 * MiB), data)
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.connect_uri(uri)
        self.assertEqual(h.get_tls_negotiated(), 1)
        h.pwrite(b"p" * 4096, 8 * MiB)
        self.assertEqual(h.pread(4096, 8 * MiB), b"p" * 4096)
        h.shutdown()
        p = run([NBDFS, "info", uri])
        self.assertIn("TLS: yes", p.stdout)

    def test_x509_qemu_img_and_qemu_io(self):
        srv = self.x509()
        obj = "tls-creds-x509,id=tls0,endpoint=client,dir=" + self.pki.path("client")
        opts = "driver=nbd,path=%s,tls-creds=tls0,tls-hostname=localhost" % srv.sock
        run(["qemu-io", "--object", obj, "--image-opts", opts,
             "-c", "write -P 0x5a 2M 64k", "-c", "read -P 0x5a 2M 64k",
             "-c", "read -P 0 0 64k"])
        out = run(["qemu-img", "info", "--object", obj, "--image-opts", opts]).stdout
        self.assertIn("virtual size: 16 MiB", out)
        dst = self.path("copy.raw")
        run(["qemu-img", "convert", "--object", obj, "--image-opts", opts, "-O", "raw", dst])
        with open(dst, "rb") as f:
            f.seek(2 * MiB)
            self.assertEqual(f.read(64 * KiB), b"\x5a" * 64 * KiB)

    def test_mount_over_tls(self):
        srv = self.x509()
        uri = tls_uri(srv.sock, **self.client())
        m = self.mount(uri)
        with open(m.path("disk"), "r+b") as f:
            f.seek(MiB)
            self.assertEqual(f.read(4), b"tls!")
            f.seek(3 * MiB)
            f.write(b"m" * 8192)
            f.flush()
            os.fsync(f.fileno())
        self.assertEqual(m.unmount(), 0, m.messages)
        with open(self.image, "rb") as f:
            f.seek(3 * MiB)
            self.assertEqual(f.read(8192), b"m" * 8192)

    def test_mount_of_qemu_nbd_over_tls(self):
        sock = self.path("qemu-tls.sock")
        srv = t.Server(["qemu-nbd", "-f", "raw", "-k", sock, "--persistent", "-e", "8",
                        "--object", "tls-creds-x509,id=tls0,endpoint=server,dir=" +
                        self.pki.path("server"), "--tls-creds", "tls0", self.image], sock,
                       self.path("qemu-tls.err"))
        self.addCleanup(srv.stop)
        m = self.mount(tls_uri(sock, **self.client()))
        with open(m.path("disk"), "rb") as f:
            f.seek(MiB)
            self.assertEqual(f.read(4), b"tls!")
        self.assertEqual(m.unmount(), 0, m.messages)

    def test_psk(self):
        srv = self.serve("--tls-psk", self.pki.path("keys.psk"))
        uri = tls_uri(srv.sock, user="alice", **{"tls-psk-file": self.pki.path("keys.psk")})
        self.assertIn('"export-size": %d' % (16 * MiB), self.nbdinfo(uri).stdout)
        m = self.mount(uri)
        with open(m.path("disk"), "rb") as f:
            f.seek(MiB)
            self.assertEqual(f.read(4), b"tls!")
        self.assertEqual(m.unmount(), 0, m.messages)
        obj = "tls-creds-psk,id=tls0,endpoint=client,username=alice,dir=" + self.pki.path("qpsk")
        os.makedirs(self.pki.path("qpsk"), exist_ok=True)
        self.pki.copy("keys.psk", "qpsk/keys.psk")
        run(["qemu-io", "--object", obj, "--image-opts",
             "driver=nbd,path=%s,tls-creds=tls0" % srv.sock, "-c", "read -P 0 0 4k"])

    def test_tls_on_serves_plain_and_tls_clients(self):
        srv = self.x509("--tls=on")
        self.assertIn('"export-size"', self.nbdinfo(srv.uri()).stdout)
        self.assertIn('"export-size"', self.nbdinfo(tls_uri(srv.sock, **self.client())).stdout)

    # ---- clients that must be refused ----

    def test_plain_client_refused(self):
        srv = self.x509()
        p = self.nbdinfo(srv.uri(), check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("TLS", p.stderr)
        os.makedirs(self.path("mnt"))
        p = run([NBDFS, "mount", srv.uri(), self.path("mnt")], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("the server requires TLS", p.stderr)

    def test_wrong_psk_refused_on_both_sides(self):
        srv = self.serve("--tls-psk", self.pki.path("keys.psk"))
        p = self.nbdinfo(tls_uri(srv.sock, user="alice",
                                 **{"tls-psk-file": self.pki.path("wrong.psk")}), check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("handshake", p.stderr.lower())
        t.wait_for(lambda: "TLS handshake failed" in srv.stderr(), 5, "the server's log")

    def test_psk_user_limit(self):
        srv = self.serve("--tls-psk", self.pki.path("keys.psk"), "--tls-psk-user", "bob")
        p = self.nbdinfo(tls_uri(srv.sock, user="alice",
                                 **{"tls-psk-file": self.pki.path("keys.psk")}), check=False)
        self.assertNotEqual(p.returncode, 0)
        t.wait_for(lambda: "PSK user 'alice' is not allowed" in srv.stderr(), 5,
                   "the server's log")

    def test_client_certificates_when_verifying_peers(self):
        srv = self.x509("--tls-verify-peer")
        self.assertIn('"export-size"', self.nbdinfo(tls_uri(srv.sock, **self.client())).stdout)
        for sub in ("client-ca-only", "foreign-client"):
            p = self.nbdinfo(tls_uri(srv.sock, **self.client(sub)), check=False)
            self.assertNotEqual(p.returncode, 0, sub)
        self.assertIn("TLS handshake failed", srv.stderr())

    def test_expired_server_certificate_refused_by_clients(self):
        srv = self.serve("--tls-creds", self.pki.path("expired"))
        p = self.nbdinfo(tls_uri(srv.sock, **self.client()), check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("certificate verification", p.stderr)

    # ---- hostile clients ----

    def raw(self, srv):
        c = rc.RawClient(srv.sock)
        self.addCleanup(c.close)
        c.start()
        return c

    def test_options_before_tls_are_refused(self):
        srv = self.x509("--handshake-limit", "5")
        c = self.raw(srv)
        for option, data in ((rc.OPT_LIST, b""), (rc.OPT_STRUCTURED_REPLY, b""),
                             (rc.OPT_GO, rc.info_payload("")), (rc.OPT_INFO, rc.info_payload("")),
                             (rc.OPT_SET_META_CONTEXT, rc.meta_payload("", ["base:allocation"])),
                             (99, b"xyz")):
            replies = c.option(option, data)
            self.assertEqual([r.type for r in replies], [rc.REP_ERR_TLS_REQD], option)
        self.assertEqual([r.type for r in c.option(rc.OPT_ABORT)], [rc.REP_ACK])
        c2 = self.raw(srv)
        c2.send_option(rc.OPT_EXPORT_NAME, b"")
        self.assertTrue(c2.is_closed(5))

    def starttls(self, srv):
        c = self.raw(srv)
        self.assertEqual([r.type for r in c.option(rc.OPT_STARTTLS)], [rc.REP_ACK])
        return c

    def test_plaintext_after_starttls_is_never_processed(self):
        srv = self.x509()
        c = self.raw(srv)
        # STARTTLS and, in the same breath, options in the clear.
        c.send_option(rc.OPT_STARTTLS)
        c.send_option(rc.OPT_LIST)
        c.send_option(rc.OPT_GO, rc.info_payload(""))
        replies = c.read_option_replies()
        self.assertEqual([r.type for r in replies], [rc.REP_ACK])
        self.assertTrue(c.is_closed(5))
        self.assertIn("TLS handshake failed", srv.stderr())

    def test_garbage_instead_of_a_client_hello(self):
        srv = self.x509()
        c = self.starttls(srv)
        # More than any TLS record could hold: garbage, whatever its first bytes say.
        c.send(os.urandom(32 * KiB))
        self.assertTrue(c.is_closed(5))
        t.wait_for(lambda: "TLS handshake failed" in srv.stderr(), 5, "the server's log")

    def test_stalled_tls_handshake_is_dropped_at_the_limit(self):
        srv = self.x509("--handshake-limit", "2")
        c = self.starttls(srv)
        start = time.monotonic()
        self.assertTrue(c.is_closed(10))
        self.assertGreater(time.monotonic() - start, 1)
        self.assertLess(time.monotonic() - start, 6)

    def test_negotiation_starts_over_after_starttls(self):
        srv = self.x509()
        c = self.raw(srv)
        # Negotiated in the clear (--tls=on would allow it): forgotten after TLS.
        c.option(rc.OPT_STARTTLS)
        ctx = ssl.create_default_context(cafile=self.pki.path("client", "ca-cert.pem"))
        c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
        self.assertEqual([r.type for r in c.option(rc.OPT_STARTTLS)], [rc.REP_ERR_INVALID])
        c.connect(rc.EXTENDED, contexts=["base:allocation"])
        self.assertEqual(c.read(MiB, 4), b"tls!")

    # ---- access control ----

    def test_socket_modes(self):
        srv = self.serve("-r")
        self.assertEqual(os.stat(srv.sock).st_mode & 0o777, 0o600)
        p = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "nbdinfo",
                 srv.uri()], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("Permission denied", p.stderr)
        srv2 = self.serve("-r", "--socket-mode", "0666", name="open")
        self.assertEqual(os.stat(srv2.sock).st_mode & 0o777, 0o666)
        p = run([NBDFS, "serve", "--socket-mode", "999", "-U", self.path("x.sock"), self.image],
                check=False)
        self.assertIn("--socket-mode: '999' is not an octal mode", p.stderr)

    def test_tcp_off_localhost_needs_tls_or_an_explicit_off(self):
        p = run([NBDFS, "serve", "-p", "10899", "-b", "0.0.0.0", self.image], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("--bind 0.0.0.0: other hosts could read and write the images in clear",
                      p.stderr)
        for argv, msg in (
                (["--tls=require"], "--tls=require needs credentials"),
                (["--tls=maybe", "--tls-creds", self.pki.path("server")],
                 "--tls: 'maybe' is not off, on or require"),
                (["--tls-verify-peer"], "--tls-verify-peer needs --tls-creds"),
                (["--tls-creds", self.path("nowhere")], "server-cert.pem"),
                (["--tls-psk", self.image], "is not 'username:hexkey'")):
            p = run([NBDFS, "serve", "-U", self.path("y.sock"), *argv, self.image], check=False)
            self.assertEqual(p.returncode, 1, argv)
            self.assertIn(msg, p.stderr, argv)


if __name__ == "__main__":
    t.main()
