/*
 * The transmission phase.  One reader per connection receives each request
 * (header, then its payload), checks it, and hands it to the server's worker
 * pool; workers do the I/O and reply, so requests run in parallel and are
 * answered out of order.  Checking and doing are kept apart: check_request()
 * decides every error the protocol names, the do_* functions only do I/O.
 *
 * Order of checks (as qemu-nbd): DISC first; a payload over 32 MiB is refused
 * and the connection dropped (it cannot be skipped cheaply); otherwise the
 * payload is always consumed before any error is sent, so the stream stays
 * in step.  Then read-only, range, flags and command-specific rules.
 */
#include "internal.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>

#include "protostrings.h"

typedef struct {
    NbdsConn *conn;
    NbdsRequest req;
    uint8_t *data;                 /* WRITE payload */
    uint64_t length;               /* effect length (block status payload form aside = req.length) */
    uint32_t *ids;                 /* block status: contexts asked for (NULL = all selected) */
    size_t n_ids;
    uint64_t cost;                 /* bytes charged to the client's budget */
} NbdsWork;

static void work_free(NbdsWork *w)
{
    g_free(w->data);
    g_free(w->ids);
    g_free(w);
}

/* Flags each command accepts on this connection. */
static uint16_t allowed_flags(const NbdsConn *c, uint16_t type)
{
    uint16_t flags = NBDS_CMD_FLAG_FUA;
    bool ext = c->mode == NBDS_MODE_EXTENDED;

    switch (type) {
    case NBDS_CMD_READ:
        if (c->mode != NBDS_MODE_SIMPLE) {
            flags |= NBDS_CMD_FLAG_DF;
        }
        break;
    case NBDS_CMD_WRITE:
        if (ext) {
            flags |= NBDS_CMD_FLAG_PAYLOAD_LEN;
        }
        break;
    case NBDS_CMD_WRITE_ZEROES:
        flags |= NBDS_CMD_FLAG_NO_HOLE;
        if (c->eflags & NBDS_FLAG_SEND_FAST_ZERO) {
            flags |= NBDS_CMD_FLAG_FAST_ZERO;
        }
        break;
    case NBDS_CMD_BLOCK_STATUS:
        flags |= NBDS_CMD_FLAG_REQ_ONE;
        if (ext) {
            flags |= NBDS_CMD_FLAG_PAYLOAD_LEN;
        }
        break;
    default:
        break;
    }
    return flags;
}

static bool is_write_type(uint16_t type)
{
    return type == NBDS_CMD_WRITE || type == NBDS_CMD_TRIM || type == NBDS_CMD_WRITE_ZEROES;
}

/*
 * Decide whether W's request may run.  Returns 0, or an NBDS_E* error with
 * *WHY set.  For block status with a payload, parses it into w->ids/length.
 */
static uint32_t check_request(NbdsConn *c, NbdsWork *w, const uint8_t *payload,
                              uint64_t payload_len, const char **why)
{
    const NbdsRequest *req = &w->req;
    uint64_t size = nbds_image_size(c->export->image);
    uint16_t bad_flags;

    switch (req->type) {
    case NBDS_CMD_READ:
    case NBDS_CMD_WRITE:
    case NBDS_CMD_FLUSH:
    case NBDS_CMD_TRIM:
    case NBDS_CMD_CACHE:
    case NBDS_CMD_WRITE_ZEROES:
    case NBDS_CMD_BLOCK_STATUS:
        break;
    default:
        *why = "unknown command";
        return NBDS_EINVAL;
    }
    if (is_write_type(req->type) && (c->eflags & NBDS_FLAG_READ_ONLY)) {
        *why = "export is read-only";
        return NBDS_EPERM;
    }
    if (req->type != NBDS_CMD_WRITE && (req->flags & NBDS_CMD_FLAG_PAYLOAD_LEN) &&
        req->type != NBDS_CMD_BLOCK_STATUS) {
        *why = "NBD_CMD_FLAG_PAYLOAD_LEN is not valid for this command";
        return NBDS_EINVAL;
    }
    w->length = req->length;
    if (req->type == NBDS_CMD_BLOCK_STATUS) {
        if (c->mode == NBDS_MODE_SIMPLE) {
            *why = "block status needs structured replies or extended headers";
            return NBDS_EINVAL;
        }
        if (c->meta_export != c->export || c->meta_count == 0) {
            *why = "no metadata context was negotiated";
            return NBDS_EINVAL;
        }
        if ((req->flags & NBDS_CMD_FLAG_PAYLOAD_LEN) && c->mode == NBDS_MODE_EXTENDED) {
            uint32_t err;
            if (!payload) {
                *why = "block-status payload is longer than the contexts negotiated";
                return NBDS_EINVAL;
            }
            w->ids = g_new(uint32_t, c->meta_len);
            err = nbds_block_status_parse_payload(payload, payload_len, c->meta_selected,
                                                  c->meta_len, &w->length, w->ids, &w->n_ids,
                                                  why);
            if (err) {
                return err;
            }
        }
    }
    if (req->type == NBDS_CMD_FLUSH) {
        if (req->offset != 0 || req->length != 0) {
            *why = "FLUSH must have offset and length 0";
            return NBDS_EINVAL;
        }
    } else if (req->offset > size || w->length > size - req->offset) {
        *why = "request is past the end of the export";
        return req->type == NBDS_CMD_WRITE || req->type == NBDS_CMD_WRITE_ZEROES ?
               NBDS_ENOSPC : NBDS_EINVAL;
    }
    bad_flags = req->flags & ~allowed_flags(c, req->type);
    if (bad_flags) {
        *why = "command flag not valid for this command";
        return NBDS_EINVAL;
    }
    if (req->type == NBDS_CMD_READ && w->length > NBDS_MAX_PAYLOAD) {
        *why = "READ longer than the 32 MiB maximum";
        return NBDS_EOVERFLOW;
    }
    if (req->type == NBDS_CMD_BLOCK_STATUS && w->length == 0) {
        *why = "block status of length 0";
        return NBDS_EINVAL;
    }
    return 0;
}

/* The client did something (or we answered it): its idle time starts again.  c->lock held. */
static void note_activity(NbdsConn *c)
{
    c->last_activity = g_get_monotonic_time();
}

/* READ: data and hole chunks (structured), or the bytes (simple, or DF). */
#define MAX_READ_CHUNKS 64

static bool do_read(NbdsConn *c, const NbdsRequest *req)
{
    NbdsExport *exp = c->export;
    uint64_t len = req->length;
    g_autofree uint8_t *buf = NULL;
    struct {
        uint64_t offset, length;
        bool hole;
        uint8_t hdr[NBDS_REPLY_HEADER_MAX];
        union {
            struct nbds_chunk_offset_data data;
            struct nbds_chunk_offset_hole hole;
        } u;
    } runs[MAX_READ_CHUNKS];
    struct iovec iov[MAX_READ_CHUNKS * 3];
    int n = 0, niov = 0;
    uint64_t pos, end = req->offset + len;
    int err;

    if (len == 0) {
        return nbds_reply_ok(c, req);
    }
    buf = g_try_malloc(len);
    if (!buf) {
        return nbds_reply_error(c, req, NBDS_ENOMEM, "out of memory");
    }

    if (c->mode == NBDS_MODE_SIMPLE || (req->flags & NBDS_CMD_FLAG_DF)) {
        err = nbds_export_pread(exp, buf, len, req->offset);
        if (err) {
            return nbds_reply_error(c, req, nbds_errno_to_wire(err), "read: %s",
                                    g_strerror(err));
        }
        if (c->mode == NBDS_MODE_SIMPLE) {
            return nbds_reply_simple(c, req, 0, buf, len);
        }
        runs[0].offset = req->offset;
        runs[0].length = len;
        runs[0].hole = false;
        n = 1;
    } else {
        /* Holes become OFFSET_HOLE chunks, so nothing is read or sent for them. */
        for (pos = req->offset; pos < end; n++) {
            bool hole = false;
            uint64_t run_end = end;
            if (n < MAX_READ_CHUNKS - 1) {
                err = nbds_export_next_run(exp, pos, end, &hole, &run_end);
                if (err) {
                    return nbds_reply_error(c, req, nbds_errno_to_wire(err),
                                            "block status: %s", g_strerror(err));
                }
            }
            runs[n].offset = pos;
            runs[n].length = run_end - pos;
            runs[n].hole = hole;
            if (!hole) {
                err = nbds_export_pread(exp, buf + (pos - req->offset), run_end - pos, pos);
                if (err) {
                    return nbds_reply_error(c, req, nbds_errno_to_wire(err), "read: %s",
                                            g_strerror(err));
                }
            }
            pos = run_end;
        }
    }

    for (int i = 0; i < n; i++) {
        bool last = i + 1 == n;
        uint16_t flags = last ? NBDS_REPLY_FLAG_DONE : 0;
        size_t hlen;

        if (runs[i].hole) {
            runs[i].u.hole.offset = htobe64(runs[i].offset);
            runs[i].u.hole.length = htobe32((uint32_t)runs[i].length);
            hlen = nbds_chunk_header(c, req, flags, NBDS_REPLY_TYPE_OFFSET_HOLE,
                                     sizeof(runs[i].u.hole), runs[i].hdr);
            iov[niov++] = (struct iovec){ runs[i].hdr, hlen };
            iov[niov++] = (struct iovec){ &runs[i].u.hole, sizeof(runs[i].u.hole) };
        } else {
            runs[i].u.data.offset = htobe64(runs[i].offset);
            hlen = nbds_chunk_header(c, req, flags, NBDS_REPLY_TYPE_OFFSET_DATA,
                                     sizeof(runs[i].u.data) + runs[i].length, runs[i].hdr);
            iov[niov++] = (struct iovec){ runs[i].hdr, hlen };
            iov[niov++] = (struct iovec){ &runs[i].u.data, sizeof(runs[i].u.data) };
            iov[niov++] = (struct iovec){ buf + (runs[i].offset - req->offset),
                                          runs[i].length };
        }
    }
    return nbds_reply_send_owned(c, iov, niov, g_steal_pointer(&buf), len);
}

/* Reply to a request with no data: success or the errno of the I/O. */
static bool reply_status(NbdsConn *c, const NbdsRequest *req, int err)
{
    if (err) {
        return nbds_reply_error(c, req, nbds_errno_to_wire(err), "%s: %s",
                                nbds_cmd_name(req->type), g_strerror(err));
    }
    return nbds_reply_ok(c, req);
}

/* The I/O of a write-type request (and, with FUA, its marks' sync); 0 or an errno. */
static int write_request(NbdsConn *c, NbdsWork *w, bool fua)
{
    const NbdsRequest *req = &w->req;
    NbdsImage *img = c->export->image;
    int err;

    switch (req->type) {
    case NBDS_CMD_WRITE:
        err = nbds_image_pwrite(img, w->data, w->length, req->offset, fua);
        break;
    case NBDS_CMD_TRIM:
        err = nbds_image_trim(img, req->offset, w->length, fua);
        break;
    case NBDS_CMD_WRITE_ZEROES:
        err = nbds_image_zero(img, req->offset, w->length, !(req->flags & NBDS_CMD_FLAG_NO_HOLE),
                              req->flags & NBDS_CMD_FLAG_FAST_ZERO, fua);
        break;
    default:
        g_assert_not_reached();
    }
    return err || !fua ? err : nbds_bitmaps_sync(c->export->bitmaps);
}

void nbds_work_run(gpointer data, gpointer user_data)
{
    NbdsWork *w = data;
    NbdsConn *c = w->conn;
    const NbdsRequest *req = &w->req;
    NbdsImage *img = c->export->image;
    NbdsBitmapSet *bitmaps = c->export->bitmaps;
    bool fua = req->flags & NBDS_CMD_FLAG_FUA;
    int err;

    (void)user_data;
    if (is_write_type(req->type)) {
        /* Marks, I/O and FUA's sync happen inside the gate (see NbdsExport). */
        pthread_rwlock_rdlock(&c->export->gate);
        /* Mark before writing: no reader of a bitmap may see the data before the mark. */
        nbds_bitmaps_mark(bitmaps, req->offset, w->length);
        /* Backup views keep what they still need of the old data. */
        nbds_backup_before_write(c->export, req->offset, w->length);
        err = write_request(c, w, fua);
        pthread_rwlock_unlock(&c->export->gate);
        reply_status(c, req, err);
    }
    switch (req->type) {
    case NBDS_CMD_READ:
        do_read(c, req);
        break;
    case NBDS_CMD_FLUSH:
        /* Marks reach the disk no later than the data they describe. */
        err = nbds_bitmaps_sync(bitmaps);
        reply_status(c, req, err ? err : nbds_image_flush(img));
        break;
    case NBDS_CMD_CACHE:
        reply_status(c, req, nbds_image_cache(img, req->offset, w->length));
        break;
    case NBDS_CMD_BLOCK_STATUS:
        nbds_block_status_reply(c, req, w->length, w->ids, w->n_ids);
        break;
    case NBDS_CMD_WRITE:
    case NBDS_CMD_TRIM:
    case NBDS_CMD_WRITE_ZEROES:
        break;                     /* done above */
    default:
        g_assert_not_reached();
    }

    nbds_budget_release(c, w->cost, true);
    g_mutex_lock(&c->lock);
    c->in_flight--;
    note_activity(c);
    g_cond_broadcast(&c->cond);
    g_mutex_unlock(&c->lock);
    work_free(w);
}

/* Hand W to a worker: its cost was charged before its payload was read. */
static void dispatch(NbdsConn *c, NbdsWork *w)
{
    g_mutex_lock(&c->lock);
    c->in_flight++;
    g_mutex_unlock(&c->lock);
    g_thread_pool_push(c->server->workers, w, NULL);
}

/*
 * The most memory REQ (with a payload of PAYLOAD_LEN bytes) can make the
 * server hold until it is answered: its payload, its read buffer, or its
 * block-status answer at the descriptor cap for every context it may ask.
 */
static uint64_t request_cost(NbdsConn *c, const NbdsRequest *req, uint64_t payload_len)
{
    uint64_t cost = NBDS_REQUEST_OVERHEAD + payload_len;   /* a payload kept in memory */

    switch (req->type) {
    case NBDS_CMD_READ:
        /* A longer READ is refused (EOVERFLOW) before it allocates anything. */
        if (req->length <= NBDS_MAX_PAYLOAD) {
            cost += req->length;
        }
        break;
    case NBDS_CMD_BLOCK_STATUS:
        cost += nbds_block_status_cost(c, req->flags & NBDS_CMD_FLAG_REQ_ONE);
        break;
    default:
        break;
    }
    return cost;
}

/*
 * Receive the rest of one request whose header is REQ.  Returns false when
 * the connection must end (DISC, a payload too big to skip, a socket error).
 */
static bool receive_request(NbdsConn *c, const NbdsRequest *req)
{
    bool ext = c->mode == NBDS_MODE_EXTENDED;
    uint64_t payload_len = 0;
    g_autofree uint8_t *payload = NULL;
    NbdsWork *w;
    const char *why = NULL;
    uint64_t cost;
    uint32_t err;
    bool keep, ok;

    g_debug("%s: %s flags 0x%x offset %" G_GUINT64_FORMAT " length %" G_GUINT64_FORMAT,
            c->peer, nbds_cmd_name(req->type), req->flags, req->offset, req->length);
    if (req->type == NBDS_CMD_DISC) {
        return false;
    }
    /*
     * A WRITE always carries its data.  Under extended headers PAYLOAD_LEN
     * marks a payload, but qemu 10's client sends WRITE without the flag, so
     * (like qemu-nbd) the length of a WRITE is its payload either way.
     */
    if (req->type == NBDS_CMD_WRITE || (ext && (req->flags & NBDS_CMD_FLAG_PAYLOAD_LEN))) {
        payload_len = req->length;
    }
    if (payload_len > NBDS_MAX_PAYLOAD) {
        nbds_reply_error(c, req, NBDS_EINVAL,
                         "payload of %" G_GUINT64_FORMAT " bytes is over the 32 MiB limit",
                         payload_len);
        g_message("%s: request payload of %" G_GUINT64_FORMAT " bytes, dropping", c->peer,
                  payload_len);
        return false;
    }
    /*
     * Keep the payloads we use (WRITE data, a block-status payload that can be
     * valid); drain any other without allocating it.
     */
    keep = payload_len && (req->type == NBDS_CMD_WRITE ||
                           (req->type == NBDS_CMD_BLOCK_STATUS &&
                            payload_len <= 8 + 4 * (uint64_t)c->meta_len));
    /* Charged before its payload is read: an over-budget client stops being read. */
    cost = request_cost(c, req, keep ? payload_len : 0);
    if (!nbds_budget_reserve(c, cost)) {
        return false;
    }
    if (keep) {
        payload = g_try_malloc(payload_len);
        if (!payload) {
            ok = nbds_conn_skip(c, payload_len) &&
                 nbds_reply_error(c, req, NBDS_ENOMEM, "out of memory");
            nbds_budget_release(c, cost, true);
            return ok;
        }
        if (!nbds_conn_read(c, payload, payload_len)) {
            nbds_budget_release(c, cost, true);
            return false;
        }
    } else if (payload_len && !nbds_conn_skip(c, payload_len)) {
        nbds_budget_release(c, cost, true);
        return false;
    }

    w = g_new0(NbdsWork, 1);
    w->conn = c;
    w->req = *req;
    w->cost = cost;
    err = check_request(c, w, payload, payload_len, &why);
    if (err) {
        work_free(w);
        ok = nbds_reply_error(c, req, err, "%s", why);
        nbds_budget_release(c, cost, true);
        return ok;
    }
    if (req->type == NBDS_CMD_WRITE) {
        w->data = g_steal_pointer(&payload);
    }
    dispatch(c, w);
    return true;
}

/*
 * With an idle limit: wait for the next request; false once the client has
 * sent nothing for the limit while nothing of its was in flight (it is not
 * idle while it waits for our replies).
 */
static bool wait_for_request(NbdsConn *c)
{
    gint64 limit = (gint64)c->server->config.idle_limit * G_USEC_PER_SEC;

    if (!limit) {
        return true;
    }
    for (;;) {
        struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
        gint64 left;
        bool busy;
        int r;

        g_mutex_lock(&c->lock);
        busy = c->in_flight > 0 || !g_queue_is_empty(&c->out_queue);
        left = c->last_activity + limit - g_get_monotonic_time();
        g_mutex_unlock(&c->lock);
        if (!busy && left <= 0) {
            g_message("%s: idle for %u s, dropping the client", c->peer,
                      c->server->config.idle_limit);
            return false;
        }
        /* Busy: look again in a second (its requests end, the clock starts). */
        r = poll(&pfd, 1, busy ? 1000 : (int)MIN(left / 1000 + 1, G_MAXINT));
        if (r > 0) {
            return true;
        }
        if (r < 0 && errno != EINTR) {
            return false;
        }
    }
}

void nbds_transmission(NbdsConn *c)
{
    uint8_t hdr[sizeof(struct nbds_request_extended)];
    size_t hsize = nbds_request_size(c->mode);

    g_mutex_lock(&c->lock);
    note_activity(c);
    g_mutex_unlock(&c->lock);
    for (;;) {
        NbdsRequest req;

        if (!wait_for_request(c) || !nbds_conn_read(c, hdr, hsize)) {
            break;
        }
        g_mutex_lock(&c->lock);
        note_activity(c);
        g_mutex_unlock(&c->lock);
        if (!nbds_request_decode(c->mode, hdr, &req)) {
            g_message("%s: bad request magic, dropping the connection", c->peer);
            break;
        }
        if (!receive_request(c, &req)) {
            break;
        }
        if (g_atomic_int_get(&c->broken)) {
            break;
        }
    }
    /* DISC (or EOF): answer what is in flight before closing. */
    g_mutex_lock(&c->lock);
    while (c->in_flight > 0) {
        g_cond_wait(&c->cond, &c->lock);
    }
    g_mutex_unlock(&c->lock);
    nbds_reply_drain(c);
}
