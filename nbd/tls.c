/*
 * TLS for the server, with GnuTLS: credentials (x509 in qemu's file layout,
 * or PSK in psktool's format), the handshake after NBD_OPT_STARTTLS, and the
 * record layer every socket read and write of a TLS connection goes through
 * (conn.c).
 *
 * Threads: a connection's reader receives and its writer sends; GnuTLS lets
 * one thread send while another receives on the same session.  Workers never
 * touch a TLS session: replies of a TLS connection always go through its
 * writer (reply.c).
 *
 * No plaintext survives the upgrade: the server reads exactly what each
 * option announces, so nothing a client sent after STARTTLS is buffered in
 * the clear; it is read by the TLS handshake (and fails it), and
 * negotiation starts over once TLS is up.
 */
#include "internal.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

#include <gio/gio.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

/* TLS 1.2 at least; PSK key exchanges too when a PSK file is given. */
#define PRIORITY_X509 "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"
#define PRIORITY_PSK PRIORITY_X509 ":+ECDHE-PSK:+DHE-PSK:+PSK"
/* The TLS handshake's limit when the server has no handshake limit. */
#define DEFAULT_TLS_HANDSHAKE_MS 60000

struct NbdsTls {
    gnutls_certificate_credentials_t x509;
    gnutls_psk_server_credentials_t psk;
    gnutls_priority_t priority;
    bool verify_peer;
    char *psk_user;
};

static bool tls_error(GError **error, const char *what, int err)
{
    g_set_error(error, G_IO_ERROR, G_IO_ERROR_FAILED, "%s: %s", what, gnutls_strerror(err));
    return false;
}

/* Load DIR's x509 files, with qemu's names. */
static bool load_x509(NbdsTls *t, const char *dir, GError **error)
{
    g_autofree char *ca = g_build_filename(dir, "ca-cert.pem", NULL);
    g_autofree char *crl = g_build_filename(dir, "ca-crl.pem", NULL);
    g_autofree char *cert = g_build_filename(dir, "server-cert.pem", NULL);
    g_autofree char *key = g_build_filename(dir, "server-key.pem", NULL);
    int r;

    r = gnutls_certificate_allocate_credentials(&t->x509);
    if (r < 0) {
        return tls_error(error, "x509 credentials", r);
    }
    for (const char *const *f = (const char *const[]){ cert, key, NULL }; *f; f++) {
        if (access(*f, R_OK) < 0) {
            g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno),
                        "--tls-creds: %s: %s", *f, g_strerror(errno));
            return false;
        }
    }
    r = gnutls_certificate_set_x509_key_file(t->x509, cert, key, GNUTLS_X509_FMT_PEM);
    if (r < 0) {
        g_autofree char *what = g_strdup_printf("--tls-creds: %s, %s", cert, key);
        return tls_error(error, what, r);
    }
    if (access(ca, R_OK) == 0) {
        r = gnutls_certificate_set_x509_trust_file(t->x509, ca, GNUTLS_X509_FMT_PEM);
        if (r < 0) {
            g_autofree char *what = g_strdup_printf("--tls-creds: %s", ca);
            return tls_error(error, what, r);
        }
    } else if (t->verify_peer) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND,
                    "--tls-verify-peer: %s: %s (the CA that signs client certificates)", ca,
                    g_strerror(errno));
        return false;
    }
    if (access(crl, R_OK) == 0) {
        r = gnutls_certificate_set_x509_crl_file(t->x509, crl, GNUTLS_X509_FMT_PEM);
        if (r < 0) {
            g_autofree char *what = g_strdup_printf("--tls-creds: %s", crl);
            return tls_error(error, what, r);
        }
    }
    gnutls_certificate_set_known_dh_params(t->x509, GNUTLS_SEC_PARAM_MEDIUM);
    return true;
}

/* Check FILE is psktool's "username:hexkey" lines, then hand it to GnuTLS. */
static bool load_psk(NbdsTls *t, const char *file, GError **error)
{
    g_autofree char *contents = NULL;
    g_auto(GStrv) lines = NULL;
    gsize len;
    int n = 0, r;

    if (!g_file_get_contents(file, &contents, &len, error)) {
        g_prefix_error(error, "--tls-psk: ");
        return false;
    }
    if (memchr(contents, 0, len)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                    "--tls-psk: %s is not 'username:hexkey' lines (psktool's format)", file);
        return false;
    }
    lines = g_strsplit(contents, "\n", -1);
    for (char **l = lines; *l; l++) {
        const char *colon = strchr(*l, ':');
        if (!**l) {
            continue;
        }
        if (!colon || colon == *l || !colon[1] || strspn(colon + 1, "0123456789abcdefABCDEF") !=
                                                      strlen(colon + 1)) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                        "--tls-psk: %s: line %d is not 'username:hexkey' (psktool's format)",
                        file, (int)(l - lines) + 1);
            return false;
        }
        n++;
    }
    if (n == 0) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA, "--tls-psk: %s: no keys",
                    file);
        return false;
    }
    r = gnutls_psk_allocate_server_credentials(&t->psk);
    if (r < 0) {
        return tls_error(error, "PSK credentials", r);
    }
    r = gnutls_psk_set_server_credentials_file(t->psk, file);
    if (r < 0) {
        g_autofree char *what = g_strdup_printf("--tls-psk: %s", file);
        return tls_error(error, what, r);
    }
    gnutls_psk_set_server_known_dh_params(t->psk, GNUTLS_SEC_PARAM_MEDIUM);
    return true;
}

NbdsTls *nbds_tls_new(const char *creds_dir, const char *psk_file, bool verify_peer,
                      const char *psk_user, GError **error)
{
    NbdsTls *t = g_new0(NbdsTls, 1);
    const char *err_pos = NULL;
    int r;

    t->verify_peer = verify_peer;
    t->psk_user = g_strdup(psk_user);
    if ((creds_dir && !load_x509(t, creds_dir, error)) ||
        (psk_file && !load_psk(t, psk_file, error))) {
        nbds_tls_free(t);
        return NULL;
    }
    r = gnutls_priority_init(&t->priority, psk_file ? PRIORITY_PSK : PRIORITY_X509, &err_pos);
    if (r < 0) {
        tls_error(error, "TLS priority", r);
        nbds_tls_free(t);
        return NULL;
    }
    return t;
}

void nbds_tls_free(NbdsTls *t)
{
    if (!t) {
        return;
    }
    if (t->x509) {
        gnutls_certificate_free_credentials(t->x509);
    }
    if (t->psk) {
        gnutls_psk_free_server_credentials(t->psk);
    }
    if (t->priority) {
        gnutls_priority_deinit(t->priority);
    }
    g_free(t->psk_user);
    g_free(t);
}

bool nbds_tls_start(NbdsConn *c)
{
    NbdsTls *t = c->server->tls;
    gnutls_session_t s;
    gint64 left = c->deadline ? c->deadline - g_get_monotonic_time()
                              : DEFAULT_TLS_HANDSHAKE_MS * 1000;
    int r;

    if (left <= 0 || gnutls_init(&s, GNUTLS_SERVER | GNUTLS_NO_SIGNAL) < 0) {
        return false;
    }
    gnutls_priority_set(s, t->priority);
    if (t->x509) {
        gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, t->x509);
    }
    if (t->psk) {
        gnutls_credentials_set(s, GNUTLS_CRD_PSK, t->psk);
    }
    if (t->verify_peer) {
        gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
        gnutls_session_set_verify_cert(s, NULL, 0);
    }
    gnutls_transport_set_int(s, c->fd);
    /* The handshake limit covers the TLS handshake too. */
    gnutls_handshake_set_timeout(s, (unsigned)MIN(left / 1000 + 1, G_MAXINT));
    do {
        r = gnutls_handshake(s);
    } while (r < 0 && !gnutls_error_is_fatal(r));
    if (r < 0) {
        g_message("%s: TLS handshake failed: %s", c->peer, gnutls_strerror(r));
        gnutls_deinit(s);
        return false;
    }
    if (t->psk && t->psk_user &&
        gnutls_auth_get_type(s) == GNUTLS_CRD_PSK &&
        g_strcmp0(gnutls_psk_server_get_username(s), t->psk_user) != 0) {
        g_message("%s: TLS: PSK user '%s' is not allowed (--tls-psk-user), dropping", c->peer,
                  gnutls_psk_server_get_username(s));
        gnutls_deinit(s);
        return false;
    }
    g_debug("%s: TLS established (%s)", c->peer, gnutls_protocol_get_name(
                gnutls_protocol_get_version(s)));
    c->tls = s;
    return true;
}

void nbds_tls_end(NbdsConn *c)
{
    if (c->tls) {
        /* Tell the client, without waiting for it. */
        gnutls_bye(c->tls, GNUTLS_SHUT_WR);
        gnutls_deinit(c->tls);
        c->tls = NULL;
    }
}

bool nbds_tls_pending(NbdsConn *c)
{
    return gnutls_record_check_pending(c->tls) > 0;
}

ssize_t nbds_tls_recv(NbdsConn *c, void *buf, size_t len)
{
    for (;;) {
        ssize_t r = gnutls_record_recv(c->tls, buf, len);
        if (r >= 0) {
            return r;
        }
        if (r == GNUTLS_E_INTERRUPTED || r == GNUTLS_E_AGAIN) {
            continue;
        }
        if (r != GNUTLS_E_PREMATURE_TERMINATION) {
            g_debug("%s: TLS receive: %s", c->peer, gnutls_strerror((int)r));
        }
        errno = EIO;
        return -1;
    }
}

ssize_t nbds_tls_send(NbdsConn *c, const void *buf, size_t len)
{
    for (;;) {
        ssize_t r = gnutls_record_send(c->tls, buf, len);
        if (r >= 0) {
            return r;
        }
        if (r == GNUTLS_E_INTERRUPTED || r == GNUTLS_E_AGAIN) {
            continue;
        }
        g_debug("%s: TLS send: %s", c->peer, gnutls_strerror((int)r));
        errno = EIO;
        return -1;
    }
}
