/*
 * Reply framing for the transmission phase: simple replies, structured chunks
 * and extended chunks, chosen by the connection's negotiated mode.
 */
#include "internal.h"

#include <endian.h>
#include <errno.h>
#include <stdarg.h>
#include <string.h>
#include <sys/socket.h>

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

/*
 * A reply, or what is left of it, waiting in the connection's out_queue:
 * the sender's data buffer itself (owned, never copied), and a copy of the
 * small parts around it (chunk headers, built on the sender's stack).
 */
typedef struct {
    struct iovec *iov;             /* into copies or owned */
    int iovcnt;
    uint8_t *copies;
    gpointer owned;
    size_t len;
} NbdsOutBuf;

static void out_buf_free(gpointer data)
{
    NbdsOutBuf *b = data;
    g_free(b->iov);
    g_free(b->copies);
    g_free(b->owned);
    g_free(b);
}

/* Whether the (non-empty) entry IOV lies inside OWNED [OWNED_LEN]. */
static bool inside(const struct iovec *iov, gconstpointer owned, size_t owned_len)
{
    uintptr_t lo = (uintptr_t)owned, p = (uintptr_t)iov->iov_base;

    return owned && p >= lo && p - lo + iov->iov_len <= owned_len;
}

/* What of IOV is left, queued: entries inside OWNED [OWNED_LEN] point into it, others are copied. */
static NbdsOutBuf *out_buf_new(const struct iovec *iov, int iovcnt, gpointer owned,
                               size_t owned_len)
{
    NbdsOutBuf *b = g_new0(NbdsOutBuf, 1);
    size_t copied = 0;

    b->iov = g_new(struct iovec, MAX(iovcnt, 1));
    for (int i = 0; i < iovcnt; i++) {
        if (iov[i].iov_len && !inside(&iov[i], owned, owned_len)) {
            copied += iov[i].iov_len;
        }
    }
    b->copies = g_malloc(MAX(copied, 1));
    copied = 0;
    for (int i = 0; i < iovcnt; i++) {
        const uint8_t *p = iov[i].iov_base;
        if (iov[i].iov_len == 0) {     /* an empty entry may have no base */
            continue;
        }
        if (inside(&iov[i], owned, owned_len)) {
            b->iov[b->iovcnt] = iov[i];
        } else {
            memcpy(b->copies + copied, p, iov[i].iov_len);
            b->iov[b->iovcnt] = (struct iovec){ b->copies + copied, iov[i].iov_len };
            copied += iov[i].iov_len;
        }
        b->len += iov[i].iov_len;
        b->iovcnt++;
    }
    b->owned = owned;
    return b;
}

/* Called with c->lock held: the connection is dead, drop what was waiting. */
static void mark_broken(NbdsConn *c)
{
    uint64_t dropped = c->out_bytes;

    g_atomic_int_set(&c->broken, 1);
    g_queue_clear_full(&c->out_queue, out_buf_free);
    c->out_bytes = 0;
    /* Wake the reader blocked in recv, or waiting for budget: the connection is over. */
    shutdown(c->fd, SHUT_RDWR);
    g_cond_broadcast(&c->cond);
    nbds_budget_release(c, dropped, false);
}

/*
 * The connection's writer: puts on the wire what a slow client could not
 * take at once.  The only thread that waits on the client's socket.
 */
static gpointer writer_thread(gpointer data)
{
    NbdsConn *c = data;

    g_mutex_lock(&c->lock);
    for (;;) {
        NbdsOutBuf *b;
        bool ok;

        while (g_queue_is_empty(&c->out_queue) && !c->writer_stop) {
            g_cond_wait(&c->cond, &c->lock);
        }
        if (g_queue_is_empty(&c->out_queue)) {
            break;
        }
        /* The head stays queued while it is sent, so later replies queue behind it. */
        b = g_queue_peek_head(&c->out_queue);
        g_mutex_unlock(&c->lock);
        ok = nbds_conn_writev(c, b->iov, b->iovcnt);
        g_mutex_lock(&c->lock);
        if (!ok) {
            mark_broken(c);
            continue;
        }
        g_queue_pop_head(&c->out_queue);
        c->out_bytes -= b->len;
        nbds_budget_release(c, b->len, false);
        out_buf_free(b);
        g_cond_broadcast(&c->cond);
    }
    g_mutex_unlock(&c->lock);
    return NULL;
}

/*
 * Write what of IOV the socket takes now, never waiting for the client.
 * Returns false on an error; IOV is advanced past what was sent.
 */
static bool send_now(NbdsConn *c, struct iovec **iovp, int *iovcntp)
{
    struct iovec *iov = *iovp;
    int iovcnt = *iovcntp;
    bool ok = true;

    while (iovcnt > 0) {
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = MIN(iovcnt, IOV_MAX) };
        ssize_t r = sendmsg(c->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);

        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno != EAGAIN) {
                g_debug("%s: send: %s", c->peer, g_strerror(errno));
                ok = false;
            }
            break;                  /* full: the rest goes to the writer */
        }
        nbds_iov_advance(&iov, &iovcnt, r);
    }
    *iovp = iov;
    *iovcntp = iovcnt;
    return ok;
}

bool nbds_reply_send(NbdsConn *c, struct iovec *iov, int iovcnt)
{
    return nbds_reply_send_owned(c, iov, iovcnt, NULL, 0);
}

bool nbds_reply_send_owned(NbdsConn *c, struct iovec *iov, int iovcnt, gpointer owned,
                           size_t owned_len)
{
    g_autoptr(GError) error = NULL;
    g_autofree uint8_t *owned_here = owned;      /* until it is queued */
    NbdsOutBuf *b;
    bool direct;

    /* Serialises the workers' direct sends: each holds it for one non-blocking sendmsg. */
    g_mutex_lock(&c->send_lock);
    g_mutex_lock(&c->lock);
    if (g_atomic_int_get(&c->broken)) {
        g_mutex_unlock(&c->lock);
        g_mutex_unlock(&c->send_lock);
        return false;
    }
    /*
     * With nothing queued the socket is ours: only the writer sends queued
     * replies.  A TLS session is only ever written by the writer.
     */
    direct = g_queue_is_empty(&c->out_queue) && !c->tls;
    g_mutex_unlock(&c->lock);

    if (direct && !send_now(c, &iov, &iovcnt)) {
        g_mutex_lock(&c->lock);
        mark_broken(c);
        g_mutex_unlock(&c->lock);
        g_mutex_unlock(&c->send_lock);
        return false;
    }
    if (iovcnt == 0) {
        g_mutex_unlock(&c->send_lock);
        return true;
    }
    /* The client is slow to read: the rest waits for the writer, charged to the client. */
    b = out_buf_new(iov, iovcnt, g_steal_pointer(&owned_here), owned_len);
    nbds_budget_charge(c, b->len);
    g_mutex_lock(&c->lock);
    g_queue_push_tail(&c->out_queue, b);
    c->out_bytes += b->len;
    if (!c->writer) {
        /* No thread to be had costs this client only: the others go on. */
        c->writer = g_thread_try_new("nbds-writer", writer_thread, c, &error);
        if (!c->writer) {
            g_warning("%s: cannot start a thread to send replies (%s): dropping the client",
                      c->peer, error->message);
            mark_broken(c);
            g_mutex_unlock(&c->lock);
            g_mutex_unlock(&c->send_lock);
            return false;
        }
    }
    g_cond_broadcast(&c->cond);
    g_mutex_unlock(&c->lock);
    g_mutex_unlock(&c->send_lock);
    return true;
}

void nbds_reply_drain(NbdsConn *c)
{
    GThread *writer;

    g_mutex_lock(&c->lock);
    while (!g_queue_is_empty(&c->out_queue)) {
        g_cond_wait(&c->cond, &c->lock);
    }
    c->writer_stop = true;
    g_cond_broadcast(&c->cond);
    writer = g_steal_pointer(&c->writer);
    g_mutex_unlock(&c->lock);
    if (writer) {
        g_thread_join(writer);
    }
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
