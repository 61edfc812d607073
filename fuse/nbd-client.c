/*
 * libnbd connections: where an export comes from (a URI, or a local image
 * served in-process over a socketpair), the bounded handshake, and FUSE
 * replies sent from command completions (loop.c runs the threads).
 *
 * Commands are issued asynchronously by the worker thread that owns the
 * connection (libnbd usually sends them at once, in that thread); their
 * completion callbacks run in the same thread when it drives the socket, and
 * reply to FUSE.  Callbacks never call libnbd: the handle's lock is held there.
 *
 * When a connection dies, libnbd fails every command in flight (their
 * callbacks run with ENOTCONN) and every later command fails at once, so a
 * FUSE request always gets an answer: EIO.
 */
#include "mount.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gio/gio.h>

/* Largest TRIM / WRITE_ZEROES sent at once (compact requests have 32-bit lengths). */
#define MAX_ZERO_REQUEST (UINT64_C(1) << 30)
/* Largest block-status range asked about without extended headers. */
#define MAX_COMPACT_STATUS ((UINT64_C(4) << 30) - (UINT64_C(1) << 20))
/* Socket buffers: room for a few maximal FUSE writes. */
#define SOCKET_BUFFER (4 << 20)
/* Reconnection back-off: the first retry, and the longest wait between two. */
#define RECONNECT_FIRST_S 1
#define RECONNECT_MAX_S 30
/* How long unmounting waits for each server to acknowledge the disconnect. */
#define DISCONNECT_TIMEOUT_MS 5000

G_STATIC_ASSERT(sizeof(NbdfsExtent) == sizeof(nbd_extent));
G_STATIC_ASSERT(G_STRUCT_OFFSET(NbdfsExtent, status) == G_STRUCT_OFFSET(nbd_extent, flags));

/* ---- errors ---- */

void nbdfs_set_nbd_error(GError **error, const char *what)
{
    const char *msg = nbd_get_error();
    const char *colon;

    if (!msg) {
        msg = g_strerror(nbd_get_errno() ? nbd_get_errno() : EIO);
    } else if (g_str_has_prefix(msg, "nbd_") && (colon = strstr(msg, ": "))) {
        msg = colon + 2;          /* "nbd_poll: connect: ..." -> "connect: ..." */
    }
    g_set_error(error, G_IO_ERROR, G_IO_ERROR_FAILED, "%s: %s", what, msg);
}

int nbdfs_errno(int err)
{
    switch (err) {
    case EPERM:
    case EROFS:
    case EINVAL:
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
    case ENOMEM:
    case EOVERFLOW:
    case ENOTSUP:
    case EIO:
        return err;
    default:
        /* ENOTCONN, ESHUTDOWN, EPIPE, EPROTO...: the connection is gone or broken. */
        return EIO;
    }
}

/* ---- sources ---- */

/*
 * A 1 MiB write should leave in one send(2) from the thread that issues it:
 * a default unix socket buffer (about 200 KiB) makes the event loop finish
 * the job after several wake-ups.  Privileged users may go past wmem_max.
 */
static void enlarge_socket_buffers(int fd)
{
    int size = SOCKET_BUFFER;

    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) < 0) {
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
    }
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0) {
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
    }
}

NbdfsSource *nbdfs_source_open(const char *spec, bool read_only, GError **error)
{
    g_autoptr(NbdfsSource) src = g_new0(NbdfsSource, 1);

    src->spec = g_strdup(spec);
    if (strstr(spec, "://")) {
        return g_steal_pointer(&src);
    }
    /* Absolute: a daemon changes to "/", and the server reopens files by path. */
    src->image = g_canonicalize_filename(spec, NULL);
    src->server = nbds_server_new(&(NbdsServerConfig){ .read_only = read_only });
    if (!nbds_server_add_export(src->server, src->image, error)) {
        return NULL;
    }
    return g_steal_pointer(&src);
}

void nbdfs_source_free(NbdfsSource *src)
{
    if (!src) {
        return;
    }
    if (src->server) {
        /* Ends the in-process connections and flushes the image. */
        if (!nbds_server_shutdown(src->server)) {
            g_warning("%s: flushing the image failed", src->image);
        }
        nbds_server_free(src->server);
    }
    g_free(src->spec);
    g_free(src->image);
    g_free(src);
}

struct nbd_handle *nbdfs_handle_new(bool opt_mode, GError **error)
{
    struct nbd_handle *h = nbd_create();

    if (!h) {
        nbdfs_set_nbd_error(error, "cannot create a libnbd handle");
        return NULL;
    }
    /* Every read buffer is filled by the server or the read fails. */
    nbd_set_pread_initialize(h, false);
    /* tls-certificates= and tls-psk-file= in a URI given on our command line. */
    nbd_set_uri_allow_local_file(h, true);
    if (opt_mode) {
        nbd_set_opt_mode(h, true);
    }
    return h;
}

/* Poll H until DONE(H, DATA) or the deadline; the handle has no loop thread yet. */
static bool poll_until(struct nbd_handle *h, bool (*done)(struct nbd_handle *, void *),
                       void *data, const char *what, GError **error)
{
    gint64 deadline = g_get_monotonic_time() + NBDFS_HANDSHAKE_TIMEOUT * G_USEC_PER_SEC;

    while (!done(h, data)) {
        gint64 left = deadline - g_get_monotonic_time();
        if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
            nbdfs_set_nbd_error(error, what);
            return false;
        }
        if (left <= 0) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT,
                        "%s: no answer from the server within %d seconds", what,
                        NBDFS_HANDSHAKE_TIMEOUT);
            return false;
        }
        if (nbd_poll(h, (int)MIN(left / 1000 + 1, G_MAXINT)) == -1) {
            nbdfs_set_nbd_error(error, what);
            return false;
        }
    }
    return true;
}

static bool handshake_done(struct nbd_handle *h, void *data)
{
    (void)data;
    return !nbd_aio_is_connecting(h);
}

bool nbdfs_source_connect(NbdfsSource *src, struct nbd_handle *h, GError **error)
{
    int r;

    if (src->image) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
            g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "socketpair: %s",
                        g_strerror(errno));
            return false;
        }
        /* The server's replies to large reads should fit its end too. */
        enlarge_socket_buffers(sv[0]);
        nbds_server_serve_fd(src->server, sv[0]);
        r = nbd_aio_connect_socket(h, sv[1]);
    } else {
        r = nbd_aio_connect_uri(h, src->spec);
    }
    if (r == -1) {
        nbdfs_set_nbd_error(error, "cannot connect");
        return false;
    }
    if (!poll_until(h, handshake_done, NULL, "cannot connect", error)) {
        return false;
    }
    if (!nbd_aio_is_negotiating(h) && !nbd_aio_is_ready(h)) {
        nbdfs_set_nbd_error(error, "handshake failed");
        return false;
    }
    return true;
}

static int option_done(void *data, int *error)
{
    NbdfsOption *opt = data;

    opt->done = true;
    opt->error = *error;
    return 1;
}

nbd_completion_callback nbdfs_option_callback(NbdfsOption *opt)
{
    *opt = (NbdfsOption){ 0 };
    return (nbd_completion_callback){ .callback = option_done, .user_data = opt };
}

static bool option_finished(struct nbd_handle *h, void *data)
{
    (void)h;
    return ((NbdfsOption *)data)->done;
}

bool nbdfs_option_wait(struct nbd_handle *h, int r, NbdfsOption *opt, const char *what,
                       GError **error)
{
    if (r == -1) {
        nbdfs_set_nbd_error(error, what);
        return false;
    }
    if (!poll_until(h, option_finished, opt, what, error)) {
        return false;
    }
    if (opt->error) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(opt->error), "%s: %s", what,
                    opt->error == ENOENT ? "no such export on the server"
                                         : g_strerror(opt->error));
        return false;
    }
    return true;
}

/* ---- the mount's connections ---- */

/*
 * After issuing a command on C (libnbd returned R): 0, or the errno of a
 * command that could not be issued (its completion callback will not run).
 */
static int conn_issued(NbdfsConn *c, int64_t r)
{
    if (r == -1) {
        int err = nbd_get_errno();
        if (nbd_aio_is_dead(c->nbd) || nbd_aio_is_closed(c->nbd)) {
            err = ENOTCONN;
        }
        return err ? err : EIO;
    }
    /*
     * The owner re-reads libnbd's direction before it polls again; anyone
     * else must wake it if part of the request is still to be sent.
     */
    if (!nbdfs_loop_owns(c) && (nbd_aio_get_direction(c->nbd) & LIBNBD_AIO_DIRECTION_WRITE)) {
        nbdfs_conn_wake(c);
    }
    return 0;
}

static NbdfsConn *conn_new(struct nbd_handle *h, unsigned index, GError **error)
{
    NbdfsConn *c;
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

    if (fd < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "eventfd: %s",
                    g_strerror(errno));
        return NULL;
    }
    c = g_new0(NbdfsConn, 1);
    c->nbd = h;
    c->index = index;
    c->wake_fd = fd;
    if (nbd_aio_get_fd(h) >= 0) {
        enlarge_socket_buffers(nbd_aio_get_fd(h));
    }
    return c;
}

static int collect_context(void *data, const char *name)
{
    g_ptr_array_add(data, g_strdup(name));
    return 0;
}

static gint compare_names(gconstpointer a, gconstpointer b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The dirty bitmaps the export offers, sorted by name (empty if it cannot say). */
static GPtrArray *list_bitmaps(struct nbd_handle *h)
{
    GPtrArray *names = g_ptr_array_new_with_free_func(g_free);
    char *queries[] = { (char *)"qemu:dirty-bitmap:", NULL };
    NbdfsOption opt;
    g_autoptr(GError) error = NULL;

    if (nbd_get_structured_replies_negotiated(h) != 1 &&
        nbd_get_extended_headers_negotiated(h) != 1) {
        return names;              /* no metadata contexts without structured replies */
    }
    if (!nbdfs_option_wait(h, nbd_aio_opt_list_meta_context_queries(
                                  h, queries, (nbd_context_callback){
                                      .callback = collect_context, .user_data = names },
                                  nbdfs_option_callback(&opt)),
                           &opt, "NBD_OPT_LIST_META_CONTEXT", &error)) {
        g_debug("listing dirty bitmaps: %s", error->message);
        g_ptr_array_set_size(names, 0);
    }
    g_ptr_array_sort(names, compare_names);
    return names;
}

/* Read the export's properties from the first handle, once it is ready. */
static void read_properties(NbdfsMount *m, struct nbd_handle *h, GPtrArray *bitmap_names)
{
    int64_t min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    int64_t max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    int64_t payload = nbd_get_block_size(h, LIBNBD_SIZE_PAYLOAD);
    char *name = nbd_get_export_name(h);

    m->export_name = g_strdup(name ? name : "");
    free(name);
    m->size = nbd_get_size(h);
    m->read_only = nbd_is_read_only(h) == 1;
    m->can_flush = nbd_can_flush(h) == 1;
    m->can_fua = nbd_can_fua(h) == 1;
    m->can_trim = nbd_can_trim(h) == 1;
    m->can_zero = nbd_can_zero(h) == 1;
    m->can_payload = nbd_can_block_status_payload(h) == 1;
    m->extended = nbd_get_extended_headers_negotiated(h) == 1;
    m->min_block = min > 0 ? (uint64_t)min : 1;
    m->max_io = payload > 0 ? (uint64_t)payload : 32u << 20;
    if (max > 0 && (uint64_t)max < m->max_io) {
        m->max_io = max;
    }
    m->max_io = MAX(m->max_io - m->max_io % m->min_block, m->min_block);

    m->allocation = nbdfs_context_new("base:allocation", m->size);
    m->allocation->served = nbd_can_meta_context(h, "base:allocation") == 1;
    m->bitmaps = g_ptr_array_new_with_free_func((GDestroyNotify)nbdfs_context_free);
    for (guint i = 0; i < bitmap_names->len; i++) {
        const char *ctx_name = g_ptr_array_index(bitmap_names, i);
        if (nbd_can_meta_context(h, ctx_name) == 1) {
            NbdfsContext *ctx = nbdfs_context_new(ctx_name, m->size);
            ctx->served = true;
            g_ptr_array_add(m->bitmaps, ctx);
        }
    }
}

/* Ask for every context the mount tracks before NBD_OPT_GO. */
static void request_contexts(NbdfsMount *m, struct nbd_handle *h)
{
    if (m->allocation->served) {
        nbd_add_meta_context(h, m->allocation->name);
    }
    for (guint i = 0; i < m->bitmaps->len; i++) {
        NbdfsContext *ctx = g_ptr_array_index(m->bitmaps, i);
        nbd_add_meta_context(h, ctx->name);
    }
}

static bool ready_or_dead(struct nbd_handle *h, void *data)
{
    (void)data;
    return !nbd_aio_is_connecting(h);
}

/* One more connection, like the first (multi-conn). */
static struct nbd_handle *connect_another(NbdfsMount *m, GError **error)
{
    struct nbd_handle *h = nbdfs_handle_new(false, error);

    if (!h) {
        return NULL;
    }
    request_contexts(m, h);
    if (!nbdfs_source_connect(m->source, h, error) ||
        !poll_until(h, ready_or_dead, NULL, "cannot connect", error)) {
        nbd_close(h);
        return NULL;
    }
    if (!nbd_aio_is_ready(h) || (uint64_t)nbd_get_size(h) != m->size) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_FAILED,
                    "another connection to the same export saw a different export");
        nbd_close(h);
        return NULL;
    }
    return h;
}

bool nbdfs_client_connect(NbdfsMount *m, unsigned connections, GError **error)
{
    struct nbd_handle *h = nbdfs_handle_new(true, error);
    g_autoptr(GPtrArray) bitmap_names = NULL;
    GPtrArray *conns;

    if (!h) {
        return false;
    }
    if (!nbdfs_source_connect(m->source, h, error)) {
        nbd_close(h);
        return false;
    }
    if (nbd_aio_is_negotiating(h)) {
        NbdfsOption opt;
        bitmap_names = list_bitmaps(h);
        nbd_add_meta_context(h, "base:allocation");
        for (guint i = 0; i < bitmap_names->len; i++) {
            nbd_add_meta_context(h, g_ptr_array_index(bitmap_names, i));
        }
        if (!nbdfs_option_wait(h, nbd_aio_opt_go(h, nbdfs_option_callback(&opt)), &opt,
                               "cannot open the export", error)) {
            nbd_close(h);
            return false;
        }
    } else {
        bitmap_names = g_ptr_array_new();    /* an old server: no options at all */
    }
    if (!nbd_aio_is_ready(h)) {
        nbdfs_set_nbd_error(error, "cannot open the export");
        nbd_close(h);
        return false;
    }
    read_properties(m, h, bitmap_names);

    conns = g_ptr_array_new();
    g_ptr_array_add(conns, h);
    if (connections > 1 && nbd_can_multi_conn(h) != 1) {
        g_debug("the server does not allow multi-conn: one connection");
        connections = 1;
    }
    while (conns->len < connections) {
        struct nbd_handle *more = connect_another(m, error);
        if (!more) {
            for (guint i = 0; i < conns->len; i++) {
                nbd_close(g_ptr_array_index(conns, i));
            }
            g_ptr_array_unref(conns);
            return false;
        }
        g_ptr_array_add(conns, more);
    }

    m->n_conns = conns->len;
    m->conns = g_new0(NbdfsConn *, m->n_conns);
    for (unsigned i = 0; i < m->n_conns; i++) {
        m->conns[i] = conn_new(g_ptr_array_index(conns, i), i, error);
        if (!m->conns[i]) {
            for (unsigned j = i; j < m->n_conns; j++) {
                nbd_close(g_ptr_array_index(conns, j));
            }
            g_ptr_array_unref(conns);
            nbdfs_client_stop(m);
            return false;
        }
    }
    g_ptr_array_unref(conns);
    return true;
}

/* ---- reconnection ---- */

static gpointer reconnect_thread(gpointer data)
{
    NbdfsMount *m = data;

    g_mutex_lock(&m->reconnect_lock);
    while (!m->reconnect_stop) {
        g_cond_wait_until(&m->reconnect_cond, &m->reconnect_lock,
                          g_get_monotonic_time() + G_USEC_PER_SEC / 2);
        for (unsigned i = 0; i < m->n_conns && !m->reconnect_stop; i++) {
            NbdfsConn *c = m->conns[i];
            g_autoptr(GError) error = NULL;
            struct nbd_handle *h;

            if (!g_atomic_int_get(&c->dead) || g_atomic_pointer_get(&c->replacement)) {
                c->backoff = 0;
                continue;
            }
            if (c->backoff && g_get_monotonic_time() < c->retry_at) {
                continue;
            }
            g_mutex_unlock(&m->reconnect_lock);
            h = connect_another(m, &error);
            g_mutex_lock(&m->reconnect_lock);
            if (!h) {
                c->backoff = c->backoff ? MIN(c->backoff * 2, RECONNECT_MAX_S) : RECONNECT_FIRST_S;
                c->retry_at = g_get_monotonic_time() + c->backoff * G_USEC_PER_SEC;
                g_debug("connection %u: reconnecting failed (%s); next try in %u s", c->index,
                        error->message, c->backoff);
                continue;
            }
            if (nbd_aio_get_fd(h) >= 0) {
                enlarge_socket_buffers(nbd_aio_get_fd(h));
            }
            g_atomic_pointer_set(&c->replacement, h);
            nbdfs_conn_wake(c);
        }
    }
    g_mutex_unlock(&m->reconnect_lock);
    return NULL;
}

void nbdfs_client_start_reconnect(NbdfsMount *m)
{
    g_mutex_init(&m->reconnect_lock);
    g_cond_init(&m->reconnect_cond);
    m->reconnect_thread = g_thread_new("nbdfs-reconnect", reconnect_thread, m);
}

void nbdfs_client_stop_reconnect(NbdfsMount *m)
{
    if (!m->reconnect_thread) {
        return;
    }
    g_mutex_lock(&m->reconnect_lock);
    m->reconnect_stop = true;
    g_cond_signal(&m->reconnect_cond);
    g_mutex_unlock(&m->reconnect_lock);
    g_thread_join(m->reconnect_thread);
    m->reconnect_thread = NULL;
    for (unsigned i = 0; i < m->n_conns; i++) {
        nbd_close(g_atomic_pointer_exchange(&m->conns[i]->replacement, NULL));
    }
    g_mutex_clear(&m->reconnect_lock);
    g_cond_clear(&m->reconnect_cond);
}

bool nbdfs_conn_adopt_replacement(NbdfsMount *m, NbdfsConn *c)
{
    struct nbd_handle *h = g_atomic_pointer_exchange(&c->replacement, NULL);

    if (!h) {
        return false;
    }
    nbd_close(c->nbd);             /* dead: nothing was in flight on it any more */
    c->nbd = h;
    /* What the server says may have changed while we were away. */
    nbdfs_extent_cache_clear(m->allocation->cache);
    for (guint i = 0; i < m->bitmaps->len; i++) {
        nbdfs_extent_cache_clear(((NbdfsContext *)g_ptr_array_index(m->bitmaps, i))->cache);
    }
    g_atomic_int_set(&c->dead, 0);
    g_message("connection %u to the server is back", c->index);
    return true;
}

static bool closed_or_dead(struct nbd_handle *h, void *data)
{
    (void)data;
    return nbd_aio_is_closed(h) || nbd_aio_is_dead(h);
}

void nbdfs_client_stop(NbdfsMount *m)
{
    for (unsigned i = 0; i < m->n_conns; i++) {
        NbdfsConn *c = m->conns[i];
        gint64 deadline = g_get_monotonic_time() + DISCONNECT_TIMEOUT_MS * 1000;
        if (!c) {
            continue;
        }
        /* A polite NBD_CMD_DISC, but never wait long for a server that is gone. */
        if (nbd_aio_is_ready(c->nbd) || nbd_aio_is_processing(c->nbd)) {
            nbd_aio_disconnect(c->nbd, 0);
            while (!closed_or_dead(c->nbd, NULL) && g_get_monotonic_time() < deadline) {
                if (nbd_poll(c->nbd, 100) == -1) {
                    break;
                }
            }
        }
        nbd_close(c->nbd);
        close(c->wake_fd);
        g_free(c);
    }
    g_clear_pointer(&m->conns, g_free);
    m->n_conns = 0;
}

/* ---- block status ---- */

typedef struct {
    gint done;
    int error;
    const char *context;
    bool have;                     /* the context's chunk arrived */
    GArray *extents;
    uint64_t start;
} StatusWait;

static int status_extents(void *data, const char *metacontext, uint64_t offset,
                          nbd_extent *entries, size_t n, int *error)
{
    StatusWait *w = data;

    /* Without the payload form the server answers for every context: keep ours. */
    if (*error || w->have || strcmp(metacontext, w->context) != 0) {
        return 0;
    }
    w->have = true;
    w->start = offset;
    g_array_append_vals(w->extents, entries, n);
    return 0;
}

static int status_done(void *data, int *error)
{
    StatusWait *w = data;

    w->error = *error;
    g_atomic_int_set(&w->done, 1);
    return 1;
}

static bool status_finished(gpointer data)
{
    return g_atomic_int_get(&((StatusWait *)data)->done);
}

int nbdfs_client_block_status(NbdfsMount *m, NbdfsContext *ctx, uint64_t offset,
                              GArray *extents, uint64_t *start)
{
    StatusWait w = { .context = ctx->name, .extents = extents };
    uint64_t from = offset - offset % m->min_block;
    uint64_t count = m->size - from;
    nbd_extent64_callback on_extents = { .callback = status_extents, .user_data = &w };
    nbd_completion_callback on_done = { .callback = status_done, .user_data = &w };
    NbdfsConn *c = nbdfs_loop_conn(m);
    int64_t r;
    int err;

    /* Ask about as much as the protocol allows: the server stops where it likes. */
    if (!m->extended && count > MAX_COMPACT_STATUS) {
        count = MAX_COMPACT_STATUS - MAX_COMPACT_STATUS % m->min_block;
    }
    g_debug("block status of %s from %" G_GUINT64_FORMAT, ctx->name, from);
    if (m->can_payload) {
        char *only[] = { ctx->name, NULL };
        r = nbd_aio_block_status_filter(c->nbd, count, from, only, on_extents, on_done, 0);
    } else {
        r = nbd_aio_block_status_64(c->nbd, count, from, on_extents, on_done, 0);
    }
    err = conn_issued(c, r);
    if (!err) {
        /* The reply comes on this thread's connection: drive it until then. */
        nbdfs_loop_wait(m, status_finished, &w);
        err = w.error;
        if (!err && (!w.have || extents->len == 0)) {
            g_warning("block status of %s: the server sent no extents", ctx->name);
            err = EIO;
        }
    }
    *start = w.start;
    return err;
}

/* ---- FUSE requests served by NBD commands ---- */

struct NbdfsIo {
    NbdfsMount *m;
    fuse_req_t req;
    NbdfsReplyKind kind;
    char *buf;
    void *adopted;                 /* a request buffer taken from libfuse (free()) */
    size_t reply_offset, reply_length;
    uint64_t written;              /* NBDFS_REPLY_WRITE: the count replied */
    bool changes;                  /* write-type commands: [lo, hi) changed */
    uint64_t lo, hi;
    bool write_behind;             /* [lo, hi) is pending until the commands complete */
    gint pending;                  /* commands in flight, plus one while issuing */
    gint error;                    /* the first errno */
};

NbdfsIo *nbdfs_io_new(NbdfsMount *m, fuse_req_t req, NbdfsReplyKind kind, size_t buf_size,
                      bool zeroed)
{
    NbdfsIo *io = g_new0(NbdfsIo, 1);

    io->m = m;
    io->req = req;
    io->kind = kind;
    if (buf_size) {
        io->buf = zeroed ? g_malloc0(buf_size) : g_malloc(buf_size);
    }
    io->reply_length = buf_size;
    io->pending = 1;
    return io;
}

char *nbdfs_io_buffer(NbdfsIo *io)
{
    return io->buf;
}

void nbdfs_io_adopt(NbdfsIo *io, void *mem)
{
    io->adopted = mem;
}

void nbdfs_io_reply_slice(NbdfsIo *io, size_t offset, size_t length)
{
    io->reply_offset = offset;
    io->reply_length = length;
}

void nbdfs_io_fail(NbdfsIo *io, int err)
{
    g_atomic_int_compare_and_exchange(&io->error, 0, err);
}

int nbdfs_io_error(NbdfsIo *io)
{
    return g_atomic_int_get(&io->error);
}

void nbdfs_io_write_behind(NbdfsIo *io)
{
    io->write_behind = true;
}

static void io_finish(NbdfsIo *io)
{
    int err = g_atomic_int_get(&io->error);

    /* Before the reply: whoever asks next must not see the old status. */
    if (io->changes) {
        nbdfs_contexts_changed(io->m, io->lo, io->hi - io->lo);
    }
    if (io->write_behind) {
        nbdfs_pending_end(io->m, io->lo, io->hi - io->lo, err);
    }
    if (!io->req) {
        /* Answered already (write-behind). */
    } else if (err) {
        fuse_reply_err(io->req, nbdfs_errno(err));
    } else if (io->kind == NBDFS_REPLY_DATA) {
        fuse_reply_buf(io->req, io->buf + io->reply_offset, io->reply_length);
    } else if (io->kind == NBDFS_REPLY_WRITE) {
        fuse_reply_write(io->req, io->written);
    } else {
        fuse_reply_err(io->req, 0);
    }
    g_free(io->buf);
    free(io->adopted);
    g_free(io);
}

static void io_put(NbdfsIo *io)
{
    if (g_atomic_int_dec_and_test(&io->pending)) {
        io_finish(io);
    }
}

static int io_command_done(void *data, int *error)
{
    NbdfsIo *io = data;

    if (*error) {
        nbdfs_io_fail(io, *error);
    }
    io_put(io);
    return 1;                      /* retire the command: nobody polls for it */
}

static nbd_completion_callback io_callback(NbdfsIo *io)
{
    g_atomic_int_inc(&io->pending);
    return (nbd_completion_callback){ .callback = io_command_done, .user_data = io };
}

/* After issuing on C: a command that could not be issued never completes. */
static void io_issued(NbdfsIo *io, NbdfsConn *c, int64_t r)
{
    int err = conn_issued(c, r);

    if (err) {
        nbdfs_io_fail(io, err);
        io_put(io);
    }
}

static void io_changes(NbdfsIo *io, uint64_t offset, uint64_t length)
{
    if (!io->changes) {
        io->changes = true;
        io->lo = offset;
        io->hi = offset + length;
    } else {
        io->lo = MIN(io->lo, offset);
        io->hi = MAX(io->hi, offset + length);
    }
}

void nbdfs_io_pread(NbdfsIo *io, size_t buf_offset, uint64_t offset, uint64_t length)
{
    for (uint64_t done = 0; done < length;) {
        uint64_t n = MIN(length - done, io->m->max_io);
        NbdfsConn *c = nbdfs_loop_conn(io->m);
        io_issued(io, c, nbd_aio_pread(c->nbd, io->buf + buf_offset + done, n, offset + done,
                                       io_callback(io), 0));
        done += n;
    }
}

void nbdfs_io_pwrite(NbdfsIo *io, const void *data, uint64_t offset, uint64_t length,
                     uint32_t flags)
{
    io_changes(io, offset, length);
    io->written += length;
    for (uint64_t done = 0; done < length;) {
        uint64_t n = MIN(length - done, io->m->max_io);
        NbdfsConn *c = nbdfs_loop_conn(io->m);
        io_issued(io, c, nbd_aio_pwrite(c->nbd, (const char *)data + done, n, offset + done,
                                        io_callback(io), flags));
        done += n;
    }
}

void nbdfs_io_zero(NbdfsIo *io, uint64_t offset, uint64_t length, uint32_t flags)
{
    uint64_t chunk = MAX_ZERO_REQUEST - MAX_ZERO_REQUEST % io->m->min_block;

    io_changes(io, offset, length);
    for (uint64_t done = 0; done < length;) {
        uint64_t n = MIN(length - done, chunk);
        NbdfsConn *c = nbdfs_loop_conn(io->m);
        io_issued(io, c, nbd_aio_zero(c->nbd, n, offset + done, io_callback(io), flags));
        done += n;
    }
}

void nbdfs_io_flush(NbdfsIo *io)
{
    /* Multi-conn: a flush on one connection covers writes answered on all. */
    NbdfsConn *c = nbdfs_loop_conn(io->m);

    io_issued(io, c, nbd_aio_flush(c->nbd, io_callback(io), 0));
}

void nbdfs_io_submit(NbdfsIo *io)
{
    io_put(io);
}
