/*
 * The fixed-newstyle handshake: greeting, client flags and the option loop,
 * up to NBD_OPT_GO or NBD_OPT_EXPORT_NAME.
 *
 * Every option is read whole (or drained, when too long to parse) before it
 * is answered, so the stream never falls out of step: an option either gets
 * its replies or the connection is dropped.
 */
#include "internal.h"

#include <endian.h>
#include <stdarg.h>
#include <string.h>

#include "protostrings.h"

/* Bytes of client data quoted back in an error message, at most. */
#define QUOTE_MAX 128

bool nbds_opt_reply(NbdsConn *c, uint32_t option, uint32_t reply, const void *data,
                    size_t len)
{
    struct nbds_option_reply hdr = {
        .magic = htobe64(NBDS_REP_MAGIC),
        .option = htobe32(option),
        .reply = htobe32(reply),
        .replylen = htobe32(len),
    };
    struct iovec iov[2] = {
        { .iov_base = &hdr, .iov_len = sizeof(hdr) },
        { .iov_base = (void *)data, .iov_len = len },
    };

    g_debug("%s: %s -> %s (%zu bytes)", c->peer, nbds_opt_name(option),
            nbds_rep_name(reply), len);
    return nbds_conn_writev(c, iov, 2);
}

bool nbds_opt_error(NbdsConn *c, uint32_t option, uint32_t reply, const char *fmt, ...)
{
    va_list ap;
    g_autofree char *msg = NULL;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_debug("%s: %s refused: %s", c->peer, nbds_opt_name(option), msg);
    return nbds_opt_reply(c, option, reply, msg, MIN(strlen(msg), NBDS_MAX_STRING));
}

/* NBD_OPT_LIST: one NBD_REP_SERVER per export (name, then description), then ACK. */
static bool handle_list(NbdsConn *c, uint32_t len)
{
    if (len != 0) {
        return nbds_opt_error(c, NBDS_OPT_LIST, NBDS_REP_ERR_INVALID,
                              "NBD_OPT_LIST takes no data");
    }
    /* Made under the lock, sent after: a slow client holds no lock. */
    g_autoptr(GPtrArray) replies = g_ptr_array_new_with_free_func((GDestroyNotify)g_bytes_unref);
    g_mutex_lock(&c->server->exports_lock);
    for (guint i = 0; i < c->server->exports->len; i++) {
        NbdsExport *exp = g_ptr_array_index(c->server->exports, i);
        size_t nlen = strlen(exp->name);
        size_t dlen = exp->description ? strlen(exp->description) : 0;
        uint8_t *buf = g_malloc(4 + nlen + dlen);
        uint32_t be = htobe32(nlen);

        memcpy(buf, &be, 4);
        memcpy(buf + 4, exp->name, nlen);
        if (dlen) {
            memcpy(buf + 4 + nlen, exp->description, dlen);
        }
        g_ptr_array_add(replies, g_bytes_new_take(buf, 4 + nlen + dlen));
    }
    g_mutex_unlock(&c->server->exports_lock);
    for (guint i = 0; i < replies->len; i++) {
        gsize size;
        const void *data = g_bytes_get_data(g_ptr_array_index(replies, i), &size);
        if (!nbds_opt_reply(c, NBDS_OPT_LIST, NBDS_REP_SERVER, data, size)) {
            return false;
        }
    }
    return nbds_opt_reply(c, NBDS_OPT_LIST, NBDS_REP_ACK, NULL, 0);
}

static bool send_info(NbdsConn *c, uint32_t option, uint16_t type, const char *str)
{
    size_t len = strlen(str);
    g_autofree uint8_t *buf = g_malloc(2 + len);
    uint16_t be = htobe16(type);

    memcpy(buf, &be, 2);
    memcpy(buf + 2, str, len);
    return nbds_opt_reply(c, option, NBDS_REP_INFO, buf, 2 + len);
}

/* Transmission flags for EXP on this connection, as INFO, GO or EXPORT_NAME report them. */
static uint16_t conn_export_flags(NbdsConn *c, const NbdsExport *exp, uint32_t option)
{
    uint16_t flags = nbds_export_flags(exp);

    if (c->mode != NBDS_MODE_SIMPLE) {
        flags |= NBDS_FLAG_SEND_DF;
    }
    /*
     * Block-status payloads need extended headers.  Like qemu-nbd: INFO always
     * advertises them then; GO only when contexts were negotiated for this export.
     */
    if (c->mode == NBDS_MODE_EXTENDED &&
        (option == NBDS_OPT_INFO || (c->meta_export == exp && c->meta_count > 0))) {
        flags |= NBDS_FLAG_BLOCK_STAT_PAYLOAD;
    }
    return flags;
}

/* The INFO replies for EXP, then ACK; with GO, EXP becomes C's export. */
static int reply_export(NbdsConn *c, uint32_t option, NbdsExport *exp, bool want_name,
                        bool want_desc)
{
    uint16_t flags;
    struct nbds_info_export ie;
    struct nbds_info_block_size ib;

    if (option == NBDS_OPT_GO && c->meta_export != exp) {
        /* Contexts negotiated for another export do not carry over. */
        nbds_meta_clear(c);
    }
    flags = conn_export_flags(c, exp, option);

    ie.info = htobe16(NBDS_INFO_EXPORT);
    ie.exportsize = htobe64(nbds_image_size(exp->image));
    ie.eflags = htobe16(flags);
    if (!nbds_opt_reply(c, option, NBDS_REP_INFO, &ie, sizeof(ie))) {
        return -1;
    }
    if (want_name && !send_info(c, option, NBDS_INFO_NAME, exp->name)) {
        return -1;
    }
    if (want_desc && exp->description &&
        !send_info(c, option, NBDS_INFO_DESCRIPTION, exp->description)) {
        return -1;
    }
    /* Sent whether asked or not: no constraint beyond the defaults is imposed. */
    ib.info = htobe16(NBDS_INFO_BLOCK_SIZE);
    ib.minimum = htobe32(1);
    ib.preferred = htobe32(4096);
    ib.maximum = htobe32(NBDS_MAX_PAYLOAD);
    if (!nbds_opt_reply(c, option, NBDS_REP_INFO, &ib, sizeof(ib)) ||
        !nbds_opt_reply(c, option, NBDS_REP_ACK, NULL, 0)) {
        return -1;
    }
    if (option == NBDS_OPT_GO) {
        c->export = exp;
        c->eflags = flags;
        nbds_export_count_client(c->server, exp, 1);
        return 1;
    }
    return 0;
}

/*
 * NBD_OPT_INFO and NBD_OPT_GO.
 *   [0 .. 3]     export name length n
 *   [4 .. 3+n]   export name
 *   [4+n .. 5+n] number of info requests k
 *   then k x 2-byte NBD_INFO_* codes
 * Returns -1 on I/O failure, 0 when answered, 1 when GO succeeded.
 */
static int handle_info_go(NbdsConn *c, uint32_t option, const uint8_t *data, uint32_t len)
{
    uint32_t namelen;
    uint16_t nreq;
    bool want_name = false, want_desc = false;
    g_autofree char *name = NULL;
    NbdsExport *exp;
    int r;

    if (len < 6) {
        return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID, "%s: option too short",
                              nbds_opt_name(option)) ? 0 : -1;
    }
    namelen = nbds_load_be32(data);
    if (namelen > len - 6) {
        return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID,
                              "%s: export name length %u overruns the option",
                              nbds_opt_name(option), namelen) ? 0 : -1;
    }
    if (namelen > NBDS_MAX_STRING || memchr(data + 4, 0, namelen)) {
        return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID,
                              "%s: invalid export name", nbds_opt_name(option)) ? 0 : -1;
    }
    nreq = nbds_load_be16(data + 4 + namelen);
    if (6 + namelen + 2u * nreq != len) {
        return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID,
                              "%s: %u info requests do not match the option length",
                              nbds_opt_name(option), nreq) ? 0 : -1;
    }
    for (unsigned i = 0; i < nreq; i++) {
        uint16_t info = nbds_load_be16(data + 6 + namelen + 2 * i);
        want_name |= info == NBDS_INFO_NAME;
        want_desc |= info == NBDS_INFO_DESCRIPTION;
    }
    name = g_strndup((const char *)data + 4, namelen);
    exp = nbds_server_ref_export(c->server, name);
    if (!exp) {
        return nbds_opt_error(c, option, NBDS_REP_ERR_UNKNOWN, "export '%.*s' not found",
                              QUOTE_MAX, name) ? 0 : -1;
    }
    r = reply_export(c, option, exp, want_name, want_desc);
    if (r != 1) {
        nbds_export_unref(c->server, exp);    /* kept only by a successful GO */
    }
    return r;
}

/* NBD_OPT_EXPORT_NAME: no option reply exists, so every failure closes. */
static bool handle_export_name(NbdsConn *c, uint32_t len)
{
    g_autofree char *name = NULL;
    struct nbds_export_name_reply r;
    static const char zeroes[NBDS_EXPORT_NAME_ZEROES];
    NbdsExport *exp;

    if (len > NBDS_MAX_STRING) {
        g_message("%s: NBD_OPT_EXPORT_NAME: name of %u bytes, dropping", c->peer, len);
        return false;
    }
    if (c->mode == NBDS_MODE_EXTENDED) {
        g_message("%s: NBD_OPT_EXPORT_NAME after extended headers, dropping", c->peer);
        return false;
    }
    name = g_malloc(len + 1);
    if (!nbds_conn_read(c, name, len)) {
        return false;
    }
    name[len] = '\0';
    exp = strlen(name) == len ? nbds_server_ref_export(c->server, name) : NULL;
    if (!exp || c->refuse || g_atomic_int_get(&c->server->shutting_down)) {
        g_message("%s: NBD_OPT_EXPORT_NAME: export '%.*s' refused, dropping", c->peer,
                  QUOTE_MAX, name);
        nbds_export_unref(c->server, exp);
        return false;
    }
    nbds_meta_clear(c);
    c->export = exp;
    c->eflags = conn_export_flags(c, exp, NBDS_OPT_EXPORT_NAME);
    nbds_export_count_client(c->server, exp, 1);
    r.exportsize = htobe64(nbds_image_size(exp->image));
    r.eflags = htobe16(c->eflags);
    return nbds_conn_write(c, &r, sizeof(r)) &&
           (c->no_zeroes || nbds_conn_write(c, zeroes, sizeof(zeroes)));
}

/*
 * NBD_OPT_STARTTLS: the ACK in the clear, the TLS handshake on the same
 * socket, then negotiation from the start (nothing negotiated before
 * counts).  A failed handshake ends the connection.
 */
static int handle_starttls(NbdsConn *c, uint32_t len)
{
    if (len) {
        return nbds_opt_error(c, NBDS_OPT_STARTTLS, NBDS_REP_ERR_INVALID,
                              "NBD_OPT_STARTTLS takes no data") ? 0 : -1;
    }
    if (c->server->config.tls == NBDS_TLS_OFF) {
        return nbds_opt_error(c, NBDS_OPT_STARTTLS, NBDS_REP_ERR_POLICY,
                              "TLS is not enabled on this server") ? 0 : -1;
    }
    if (c->tls) {
        return nbds_opt_error(c, NBDS_OPT_STARTTLS, NBDS_REP_ERR_INVALID,
                              "TLS is already negotiated") ? 0 : -1;
    }
    if (!nbds_opt_reply(c, NBDS_OPT_STARTTLS, NBDS_REP_ACK, NULL, 0) || !nbds_tls_start(c)) {
        return -1;
    }
    c->mode = NBDS_MODE_SIMPLE;
    c->structured = false;
    nbds_meta_clear(c);
    return 0;
}

/* An option without data that only switches a mode on. */
static bool handle_mode_option(NbdsConn *c, uint32_t option, uint32_t len)
{
    if (len != 0) {
        return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID, "%s takes no data",
                              nbds_opt_name(option));
    }
    if (option == NBDS_OPT_STRUCTURED_REPLY) {
        if (c->mode == NBDS_MODE_EXTENDED) {
            return nbds_opt_error(c, option, NBDS_REP_ERR_EXT_HEADER_REQD,
                                  "extended headers are already negotiated");
        }
        if (c->structured) {
            return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID,
                                  "structured replies are already negotiated");
        }
        c->structured = true;
        c->mode = NBDS_MODE_STRUCTURED;
    } else {
        if (c->mode == NBDS_MODE_EXTENDED) {
            return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID,
                                  "extended headers are already negotiated");
        }
        c->mode = NBDS_MODE_EXTENDED;
    }
    return nbds_opt_reply(c, option, NBDS_REP_ACK, NULL, 0);
}

/*
 * One option whose data (LEN bytes, not yet read) the server parses.
 * Returns -1 to drop the connection, 0 to go on, 1 when GO succeeded.
 */
static int handle_option(NbdsConn *c, uint32_t option, uint32_t len)
{
    g_autofree uint8_t *data = NULL;

    if (len > NBDS_MAX_OPTION_LEN) {
        if (!nbds_conn_skip(c, len)) {
            return -1;
        }
        return nbds_opt_error(c, option, NBDS_REP_ERR_TOO_BIG, "%s: option of %u bytes is too long",
                              nbds_opt_name(option), len) ? 0 : -1;
    }
    data = g_malloc(len ? len : 1);
    if (!nbds_conn_read(c, data, len)) {
        return -1;
    }

    switch (option) {
    case NBDS_OPT_ABORT:
        /* The client may hang up before reading this: that is fine. */
        nbds_opt_reply(c, option, NBDS_REP_ACK, NULL, 0);
        return -1;
    case NBDS_OPT_LIST:
        return handle_list(c, len) ? 0 : -1;
    case NBDS_OPT_STARTTLS:
        return handle_starttls(c, len);
    case NBDS_OPT_INFO:
    case NBDS_OPT_GO:
        return handle_info_go(c, option, data, len);
    case NBDS_OPT_STRUCTURED_REPLY:
    case NBDS_OPT_EXTENDED_HEADERS:
        return handle_mode_option(c, option, len) ? 0 : -1;
    case NBDS_OPT_LIST_META_CONTEXT:
    case NBDS_OPT_SET_META_CONTEXT:
        return nbds_meta_handle_option(c, option, data, len);
    default:
        g_assert_not_reached();
    }
}

static bool known_option(uint32_t option)
{
    switch (option) {
    case NBDS_OPT_ABORT:
    case NBDS_OPT_LIST:
    case NBDS_OPT_STARTTLS:
    case NBDS_OPT_INFO:
    case NBDS_OPT_GO:
    case NBDS_OPT_STRUCTURED_REPLY:
    case NBDS_OPT_LIST_META_CONTEXT:
    case NBDS_OPT_SET_META_CONTEXT:
    case NBDS_OPT_EXTENDED_HEADERS:
        return true;
    default:
        return false;
    }
}

/*
 * Answer an option without acting on it: unknown options (ERR_UNSUP), every
 * option of a client that is over the connection cap (ERR_POLICY) or arrives
 * while the server shuts down (ERR_SHUTDOWN), and options before TLS on a
 * server that requires it (ERR_TLS_REQD).
 */
static bool refuse_option(NbdsConn *c, uint32_t option, uint32_t len, uint32_t reply)
{
    if (!nbds_conn_skip(c, len)) {
        return false;
    }
    if (option == NBDS_OPT_ABORT) {
        nbds_opt_reply(c, option, NBDS_REP_ACK, NULL, 0);
        return false;
    }
    switch (reply) {
    case NBDS_REP_ERR_UNSUP:
        return nbds_opt_error(c, option, reply, "option %u is not supported", option);
    case NBDS_REP_ERR_SHUTDOWN:
        return nbds_opt_error(c, option, reply, "server is shutting down");
    case NBDS_REP_ERR_TLS_REQD:
        return nbds_opt_error(c, option, reply, "this server requires TLS (NBD_OPT_STARTTLS)");
    default:
        return nbds_opt_error(c, option, reply,
                              "server has reached its limit of %u connections",
                              c->server->config.max_connections);
    }
}

bool nbds_handshake(NbdsConn *c)
{
    struct nbds_greeting g = {
        .nbdmagic = htobe64(NBDS_MAGIC),
        .version = htobe64(NBDS_OPTS_MAGIC),
        .gflags = htobe16(NBDS_FLAG_FIXED_NEWSTYLE | NBDS_FLAG_NO_ZEROES),
    };
    uint32_t cflags;

    if (!nbds_conn_write(c, &g, sizeof(g)) || !nbds_conn_read(c, &cflags, 4)) {
        return false;
    }
    cflags = be32toh(cflags);
    if (cflags & ~(uint32_t)(NBDS_FLAG_C_FIXED_NEWSTYLE | NBDS_FLAG_C_NO_ZEROES)) {
        g_message("%s: unknown client flags 0x%x, dropping", c->peer, cflags);
        return false;
    }
    c->no_zeroes = cflags & NBDS_FLAG_C_NO_ZEROES;

    for (;;) {
        struct nbds_option_header h;
        uint32_t option, len;
        int r;

        if (!nbds_conn_read(c, &h, sizeof(h))) {
            return false;
        }
        option = be32toh(h.option);
        len = be32toh(h.optlen);
        if (be64toh(h.version) != NBDS_OPTS_MAGIC) {
            g_message("%s: bad option magic, dropping", c->peer);
            return false;
        }
        g_debug("%s: option %s (%u), %u bytes", c->peer, nbds_opt_name(option), option, len);
        if (len > NBDS_MAX_PAYLOAD) {
            g_message("%s: %s of %u bytes, dropping", c->peer, nbds_opt_name(option), len);
            return false;
        }
        if (option == NBDS_OPT_EXPORT_NAME) {
            if (c->server->config.tls == NBDS_TLS_REQUIRE && !c->tls) {
                /* It cannot be refused with a reply: the protocol says close. */
                g_message("%s: NBD_OPT_EXPORT_NAME before TLS, dropping", c->peer);
                return false;
            }
            return handle_export_name(c, len);
        }
        if (c->server->config.tls == NBDS_TLS_REQUIRE && !c->tls &&
            option != NBDS_OPT_STARTTLS && option != NBDS_OPT_ABORT) {
            /* Nothing is served before TLS: not the export list, not an export's size. */
            if (!refuse_option(c, option, len, NBDS_REP_ERR_TLS_REQD)) {
                return false;
            }
            continue;
        }
        if (c->refuse || g_atomic_int_get(&c->server->shutting_down) || !known_option(option)) {
            uint32_t reply = !known_option(option) ? NBDS_REP_ERR_UNSUP :
                             c->refuse ? NBDS_REP_ERR_POLICY : NBDS_REP_ERR_SHUTDOWN;
            if (!refuse_option(c, option, len, reply)) {
                return false;
            }
            continue;
        }
        r = handle_option(c, option, len);
        if (r < 0) {
            return false;
        }
        if (r > 0) {
            return true;
        }
    }
}
