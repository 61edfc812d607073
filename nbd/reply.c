/*
 * Reply framing for the transmission phase: simple replies, structured chunks
 * and extended chunks, chosen by the connection's negotiated mode.
 */
#include "internal.h"

#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <string.h>

#include "protostrings.h"

uint32_t nbds_errno_to_wire(int err)
{
    switch (err) {
    case 0:
        return 0;
    case EPERM:
    case EROFS:
        return NBDS_EPERM;
    case ENOMEM:
        return NBDS_ENOMEM;
    case EINVAL:
        return NBDS_EINVAL;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return NBDS_ENOSPC;
    case EOVERFLOW:
        return NBDS_EOVERFLOW;
    case ENOTSUP:
        return NBDS_ENOTSUP;
    case ESHUTDOWN:
        return NBDS_ESHUTDOWN;
    default:
        /* Whatever else the image's file system says is an I/O failure. */
        return NBDS_EIO;
    }
}

bool nbds_reply_send(NbdsConn *c, struct iovec *iov, int iovcnt)
{
    bool ok;

    g_mutex_lock(&c->send_lock);
    ok = !g_atomic_int_get(&c->broken) && nbds_conn_writev(c, iov, iovcnt);
    if (!ok) {
        g_atomic_int_set(&c->broken, 1);
    }
    g_mutex_unlock(&c->send_lock);
    return ok;
}

size_t nbds_chunk_header(NbdsConn *c, const NbdsRequest *req, uint16_t flags,
                         uint16_t type, uint64_t length, void *buf)
{
    NbdsReplyHeader h = {
        .flags = flags,
        .type = type,
        .cookie = req->cookie,
        .offset = req->offset,
        .length = length,
    };

    g_assert(c->mode != NBDS_MODE_SIMPLE);
    return nbds_reply_header_encode(c->mode, &h, buf);
}

bool nbds_reply_simple(NbdsConn *c, const NbdsRequest *req, uint32_t error,
                       const void *data, size_t len)
{
    uint8_t hdr[NBDS_REPLY_HEADER_MAX];
    NbdsReplyHeader h = { .error = error, .cookie = req->cookie };
    struct iovec iov[2] = {
        { .iov_base = hdr, .iov_len = nbds_reply_header_encode(NBDS_MODE_SIMPLE, &h, hdr) },
        { .iov_base = (void *)data, .iov_len = error ? 0 : len },
    };

    return nbds_reply_send(c, iov, 2);
}

bool nbds_reply_ok(NbdsConn *c, const NbdsRequest *req)
{
    uint8_t hdr[NBDS_REPLY_HEADER_MAX];
    struct iovec iov;

    /* Structured replies answer a data-less success simply, except READ (chunks only). */
    if (c->mode == NBDS_MODE_SIMPLE ||
        (c->mode == NBDS_MODE_STRUCTURED && req->type != NBDS_CMD_READ)) {
        return nbds_reply_simple(c, req, 0, NULL, 0);
    }
    iov.iov_base = hdr;
    iov.iov_len = nbds_chunk_header(c, req, NBDS_REPLY_FLAG_DONE, NBDS_REPLY_TYPE_NONE, 0, hdr);
    return nbds_reply_send(c, &iov, 1);
}

bool nbds_reply_error(NbdsConn *c, const NbdsRequest *req, uint32_t nbd_error,
                      const char *fmt, ...)
{
    uint8_t hdr[NBDS_REPLY_HEADER_MAX];
    struct nbds_chunk_error ce;
    g_autofree char *msg = NULL;
    va_list ap;
    size_t mlen;

    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_debug("%s: %s (offset %" G_GUINT64_FORMAT ", length %" G_GUINT64_FORMAT
            ") failed: %s: %s", c->peer, nbds_cmd_name(req->type), req->offset,
            req->length, nbds_err_name(nbd_error), msg);

    if (c->mode == NBDS_MODE_SIMPLE) {
        return nbds_reply_simple(c, req, nbd_error, NULL, 0);
    }
    /* Messages are ours, never client bytes, but keep the protocol's bound anyway. */
    mlen = MIN(strlen(msg), NBDS_MAX_STRING);
    ce.error = htobe32(nbd_error);
    ce.msglen = htobe16(mlen);
    struct iovec iov[3] = {
        { .iov_base = hdr,
          .iov_len = nbds_chunk_header(c, req, NBDS_REPLY_FLAG_DONE, NBDS_REPLY_TYPE_ERROR,
                                       sizeof(ce) + mlen, hdr) },
        { .iov_base = &ce, .iov_len = sizeof(ce) },
        { .iov_base = msg, .iov_len = mlen },
    };
    return nbds_reply_send(c, iov, 3);
}
