"""Test certificates and keys, made at test time with GnuTLS's certtool and
psktool (no key is ever committed), for the TLS tests and the benchmark."""
import os
import subprocess


def certtool(*args):
    subprocess.run(["certtool", *args], check=True, capture_output=True, timeout=60)


class Pki:
    """A CA and what it signs, in DIR: DIR/server (server-cert.pem, server-key.pem,
    ca-cert.pem: qemu's server layout), DIR/client (ca-cert.pem, client-cert.pem,
    client-key.pem: libnbd's and qemu's client layout), DIR/foreign-client (a client
    certificate from another CA), DIR/expired (a server whose certificate expired),
    DIR/keys.psk (alice) and DIR/wrong.psk (alice, another key)."""

    def __init__(self, top):
        self.top = top
        for sub in ("server", "client", "foreign", "foreign-client", "expired",
                    "client-ca-only"):
            os.makedirs(os.path.join(top, sub))
        self.ca("ca", "nbdfs test CA")
        self.ca("foreign/ca", "another CA")
        for d in ("server", "client", "client-ca-only", "expired"):
            self.copy("ca-cert.pem", d + "/ca-cert.pem")
        self.copy("ca-cert.pem", "foreign-client/ca-cert.pem")
        self.sign("ca", "server/server", "cn = localhost\ndns_name = localhost\n"
                  "ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n"
                  "expiration_days = 30\n")
        self.sign("ca", "expired/server", "cn = localhost\ndns_name = localhost\n"
                  "tls_www_server\nencryption_key\nsigning_key\n"
                  'activation_date = "2020-01-01 00:00:00"\n'
                  'expiration_date = "2021-01-01 00:00:00"\n')
        client = "cn = client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 30\n"
        self.sign("ca", "client/client", client)
        self.sign("foreign/ca", "foreign-client/client", client)
        for name in ("keys.psk", "wrong.psk"):
            subprocess.run(["psktool", "-u", "alice", "-p", self.path(name)], check=True,
                           capture_output=True, timeout=60)

    def path(self, *names):
        return os.path.join(self.top, *names)

    def copy(self, src, dst):
        with open(self.path(src), "rb") as f, open(self.path(dst), "wb") as g:
            g.write(f.read())

    def ca(self, name, cn):
        certtool("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", self.path(name + "-key.pem"))
        with open(self.path(name + ".info"), "w") as f:
            f.write("cn = %s\nca\ncert_signing_key\nexpiration_days = 30\n" % cn)
        certtool("--generate-self-signed", "--load-privkey", self.path(name + "-key.pem"),
                 "--template", self.path(name + ".info"), "--outfile",
                 self.path(name + "-cert.pem"))

    def sign(self, ca, name, template):
        certtool("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", self.path(name + "-key.pem"))
        with open(self.path(name + ".info"), "w") as f:
            f.write(template)
        certtool("--generate-certificate", "--load-privkey", self.path(name + "-key.pem"),
                 "--load-ca-certificate", self.path(ca + "-cert.pem"), "--load-ca-privkey",
                 self.path(ca + "-key.pem"), "--template", self.path(name + ".info"),
                 "--outfile", self.path(name + "-cert.pem"))
