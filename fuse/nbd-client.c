/*
 * libnbd connections: where an export comes from (a URI, or a local image
 * served in-process over a socketpair), the bounded handshake, the export's
 * identity, reconnection, and FUSE requests served by NBD commands
 * (NbdfsIo).  conn.c runs each connection's I/O thread.
 *
 * When a connection dies, libnbd fails every command in flight on it, and
 * new commands go to the live connections or fail at once, so a FUSE request
 * always gets an answer: EIO.
 */
#include "mount.h"

#include <errno.h>
#include <poll.h>
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
    /* The export's canonical name and description, to recognise it on reconnection. */
    nbd_set_full_info(h, true);
    if (opt_mode) {
        nbd_set_opt_mode(h, true);
    }
    return h;
}

/*
 * Poll H (which has no I/O thread yet) until DONE(H, DATA), for at most
 * TIMEOUT_S seconds and while CANCEL_FD (if >= 0) is not readable.
 */
static bool poll_until(struct nbd_handle *h, bool (*done)(struct nbd_handle *, void *),
                       void *data, const char *what, unsigned timeout_s, int cancel_fd,
                       GError **error)
{
    gint64 deadline = g_get_monotonic_time() + (gint64)timeout_s * G_USEC_PER_SEC;

    while (!done(h, data)) {
        gint64 left = deadline - g_get_monotonic_time();
        unsigned dir = nbd_aio_get_direction(h);
        struct pollfd pfd[2] = {
            { .fd = nbd_aio_get_fd(h),
              .events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                        ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0) },
            { .fd = cancel_fd, .events = POLLIN },
        };
        int r = 0;

        if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
            nbdfs_set_nbd_error(error, what);
            return false;
        }
        if (left <= 0) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT,
                        "%s: no answer from the server within %u seconds", what, timeout_s);
            return false;
        }
        if (pfd[0].fd < 0) {
            /* Connecting may not have a socket yet (a command being started). */
            if (nbd_poll(h, 100) == -1) {
                nbdfs_set_nbd_error(error, what);
                return false;
            }
            continue;
        }
        /* Slices of 250 ms: DONE may watch more than the socket (a server's death). */
        if (poll(pfd, 2, (int)MIN(left / 1000 + 1, 250)) < 0) {
            if (errno == EINTR) {
                continue;
            }
            g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "%s: poll: %s",
                        what, g_strerror(errno));
            return false;
        }
        if (pfd[1].revents & POLLIN) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_CANCELLED, "%s: cancelled", what);
            return false;
        }
        if ((pfd[0].revents & (POLLIN | POLLHUP | POLLERR)) && (pfd[0].events & POLLIN)) {
            r = nbd_aio_notify_read(h);
        } else if (pfd[0].revents & (POLLOUT | POLLHUP | POLLERR)) {
            r = nbd_aio_notify_write(h);
        }
        if (r == -1) {
            nbdfs_set_nbd_error(error, what);
            return false;
        }
    }
    return true;
}

static bool handshake_done(struct nbd_handle *h, void *data)
{
    NbdfsSource *src = data;
    g_autofree char *died = NULL;

    if (!nbd_aio_is_connecting(h)) {
        return true;
    }
    /* A server started for us that died will never answer (its socket is ours). */
    died = src->spawned ? nbdfs_spawn_exit_reason(src->spawned) : NULL;
    return died != NULL;
}

bool nbdfs_source_connect(NbdfsSource *src, const char *export_name, struct nbd_handle *h,
                          unsigned timeout_s, int cancel_fd, GError **error)
{
    if (!nbdfs_source_dial(src, export_name, h, error)) {
        return false;
    }
    if (!poll_until(h, handshake_done, src, "cannot connect", timeout_s, cancel_fd, error) ||
        (!nbd_aio_is_negotiating(h) && !nbd_aio_is_ready(h))) {
        /* A server started for us that died says more than the closed socket. */
        g_autofree char *why = src->spawned ? nbdfs_spawn_exit_reason(src->spawned) : NULL;
        if (why) {
            g_clear_error(error);
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_FAILED, "%s", why);
        } else if (error && !*error) {
            nbdfs_set_nbd_error(error, "handshake failed");
        }
        return false;
    }
    nbdfs_enlarge_socket_buffers(nbd_aio_get_fd(h));
    return true;
}

void nbdfs_export_entry_free(NbdfsExportEntry *e)
{
    g_free(e->name);
    g_free(e->description);
    g_free(e);
}

static int collect_export(void *data, const char *name, const char *description)
{
    NbdfsExportEntry *e = g_new0(NbdfsExportEntry, 1);

    e->name = g_strdup(name);
    e->description = description && description[0] ? g_strdup(description) : NULL;
    g_ptr_array_add(data, e);
    return 0;
}

GPtrArray *nbdfs_list_exports(struct nbd_handle *h, unsigned timeout_s, GError **error)
{
    g_autoptr(GPtrArray) entries =
        g_ptr_array_new_with_free_func((GDestroyNotify)nbdfs_export_entry_free);
    NbdfsOption opt;

    if (!nbdfs_option_wait(h, nbd_aio_opt_list(h, (nbd_list_callback){
                                                   .callback = collect_export,
                                                   .user_data = entries },
                                               nbdfs_option_callback(&opt)),
                           &opt, "NBD_OPT_LIST", timeout_s, error)) {
        return NULL;
    }
    return g_steal_pointer(&entries);
}

void nbdfs_end_negotiation(struct nbd_handle *h)
{
    gint64 deadline = g_get_monotonic_time() + 2 * G_USEC_PER_SEC;

    if (nbd_aio_opt_abort(h) == -1) {
        return;
    }
    while (!nbd_aio_is_closed(h) && !nbd_aio_is_dead(h) &&
           g_get_monotonic_time() < deadline && nbd_poll(h, 100) != -1) {
    }
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
                       unsigned timeout_s, GError **error)
{
    if (r == -1) {
        nbdfs_set_nbd_error(error, what);
        return false;
    }
    if (!poll_until(h, option_finished, opt, what, timeout_s, -1, error)) {
        return false;
    }
    if (opt->error) {
        /* libnbd said why as it read the server's refusal, in this thread ("requires TLS"). */
        const char *msg = nbd_get_error();
        const char *colon = msg ? strstr(msg, ": ") : NULL;
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(opt->error), "%s: %s", what,
                    opt->error == ENOENT ? "no such export on the server" :
                    colon && g_str_has_prefix(msg, "nbd_") ? colon + 2 :
                    g_strerror(opt->error));
        return false;
    }
    return true;
}

/* ---- the export's identity ---- */

void nbdfs_export_identity_read(struct nbd_handle *h, NbdfsExportIdentity *id)
{
    char *name = nbd_get_canonical_export_name(h);
    char *description = nbd_get_export_description(h);

    if (!name) {
        name = nbd_get_export_name(h);
    }
    id->canonical_name = g_strdup(name ? name : "");
    id->description = description ? g_strdup(description) : NULL;
    free(name);
    free(description);
    id->size = nbd_get_size(h);
    id->read_only = nbd_is_read_only(h) == 1;
    id->can_flush = nbd_can_flush(h) == 1;
    id->can_fua = nbd_can_fua(h) == 1;
    id->can_trim = nbd_can_trim(h) == 1;
    id->can_zero = nbd_can_zero(h) == 1;
    id->can_fast_zero = nbd_can_fast_zero(h) == 1;
    id->can_cache = nbd_can_cache(h) == 1;
    id->can_df = nbd_can_df(h) == 1;
    id->can_multi_conn = nbd_can_multi_conn(h) == 1;
    id->can_payload = nbd_can_block_status_payload(h) == 1;
    id->structured = nbd_get_structured_replies_negotiated(h) == 1;
    id->extended = nbd_get_extended_headers_negotiated(h) == 1;
    id->block_size[0] = MAX(nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM), 0);
    id->block_size[1] = MAX(nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED), 0);
    id->block_size[2] = MAX(nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM), 0);
}

void nbdfs_export_identity_clear(NbdfsExportIdentity *id)
{
    g_clear_pointer(&id->canonical_name, g_free);
    g_clear_pointer(&id->description, g_free);
}

static const char *header_mode(const NbdfsExportIdentity *id)
{
    return id->extended ? "extended" : id->structured ? "structured" : "simple";
}

char *nbdfs_export_identity_diff(const NbdfsExportIdentity *a, const NbdfsExportIdentity *b)
{
    static const struct {
        const char *name;
        size_t offset;
    } flags[] = {
        { "read-only", G_STRUCT_OFFSET(NbdfsExportIdentity, read_only) },
        { "flush", G_STRUCT_OFFSET(NbdfsExportIdentity, can_flush) },
        { "fua", G_STRUCT_OFFSET(NbdfsExportIdentity, can_fua) },
        { "trim", G_STRUCT_OFFSET(NbdfsExportIdentity, can_trim) },
        { "write-zeroes", G_STRUCT_OFFSET(NbdfsExportIdentity, can_zero) },
        { "fast-zero", G_STRUCT_OFFSET(NbdfsExportIdentity, can_fast_zero) },
        { "cache", G_STRUCT_OFFSET(NbdfsExportIdentity, can_cache) },
        { "df", G_STRUCT_OFFSET(NbdfsExportIdentity, can_df) },
        { "multi-conn", G_STRUCT_OFFSET(NbdfsExportIdentity, can_multi_conn) },
        { "block-status-payload", G_STRUCT_OFFSET(NbdfsExportIdentity, can_payload) },
    };
    static const char *const size_names[] = { "minimum", "preferred", "maximum" };
    GString *d = g_string_new(NULL);

#define SEP (d->len ? "; " : "")
    if (a->size != b->size) {
        g_string_append_printf(d, "%ssize %" G_GUINT64_FORMAT " is now %" G_GUINT64_FORMAT,
                               SEP, a->size, b->size);
    }
    if (g_strcmp0(a->canonical_name, b->canonical_name) != 0) {
        g_string_append_printf(d, "%sexport name '%s' is now '%s'", SEP, a->canonical_name,
                               b->canonical_name);
    }
    if (g_strcmp0(a->description, b->description) != 0) {
        g_string_append_printf(d, "%sdescription '%s' is now '%s'", SEP,
                               a->description ? a->description : "",
                               b->description ? b->description : "");
    }
    for (size_t i = 0; i < G_N_ELEMENTS(flags); i++) {
        bool fa = G_STRUCT_MEMBER(bool, a, flags[i].offset);
        bool fb = G_STRUCT_MEMBER(bool, b, flags[i].offset);
        if (fa != fb) {
            g_string_append_printf(d, "%s%s %s", SEP, flags[i].name,
                                   fb ? "appeared" : "is gone");
        }
    }
    if (a->extended != b->extended || a->structured != b->structured) {
        g_string_append_printf(d, "%sheaders %s are now %s", SEP, header_mode(a),
                               header_mode(b));
    }
    for (int k = 0; k < 3; k++) {
        if (a->block_size[k] != b->block_size[k]) {
            g_string_append_printf(d, "%s%s block size %" G_GINT64_FORMAT " is now %"
                                   G_GINT64_FORMAT, SEP, size_names[k], a->block_size[k],
                                   b->block_size[k]);
        }
    }
#undef SEP
    return g_string_free(d, d->len == 0);
}

/* ---- the mount's connections ---- */

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
static GPtrArray *list_bitmaps(NbdfsMount *m, struct nbd_handle *h)
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
                           &opt, "NBD_OPT_LIST_META_CONTEXT", m->timeout, &error)) {
        g_debug("listing dirty bitmaps: %s", error->message);
        g_ptr_array_set_size(names, 0);
    }
    g_ptr_array_sort(names, compare_names);
    return names;
}

/* Read the export's properties from the first handle, once it is ready. */
static void read_properties(NbdfsMount *m, struct nbd_handle *h, GPtrArray *bitmap_names)
{
    NbdfsExportIdentity *id = &m->identity;
    char *name = nbd_get_export_name(h);

    nbdfs_export_identity_read(h, id);
    m->export_name = g_strdup(name ? name : "");
    free(name);
    m->size = id->size;
    m->read_only = id->read_only;
    m->can_flush = id->can_flush;
    m->can_fua = id->can_fua;
    m->can_trim = id->can_trim;
    m->can_zero = id->can_zero;
    m->can_payload = id->can_payload;
    m->extended = id->extended;
    m->min_block = id->block_size[0] > 0 ? (uint64_t)id->block_size[0] : 1;
    m->max_io = nbd_get_block_size(h, LIBNBD_SIZE_PAYLOAD) > 0
                ? (uint64_t)nbd_get_block_size(h, LIBNBD_SIZE_PAYLOAD) : 32u << 20;
    if (id->block_size[2] > 0 && (uint64_t)id->block_size[2] < m->max_io) {
        m->max_io = id->block_size[2];
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

/* The contexts the mount tracks: asked for before NBD_OPT_GO on every new handle. */
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

/* A context the mount uses that H did not negotiate, or NULL. */
static const char *missing_context(NbdfsMount *m, struct nbd_handle *h)
{
    if (m->allocation->served && nbd_can_meta_context(h, m->allocation->name) != 1) {
        return m->allocation->name;
    }
    for (guint i = 0; i < m->bitmaps->len; i++) {
        NbdfsContext *ctx = g_ptr_array_index(m->bitmaps, i);
        if (nbd_can_meta_context(h, ctx->name) != 1) {
            return ctx->name;
        }
    }
    return NULL;
}

static bool ready_or_dead(struct nbd_handle *h, void *data)
{
    (void)data;
    return !nbd_aio_is_connecting(h);
}

/* One more connection to the same export (multi-conn, or a reconnection). */
static struct nbd_handle *connect_another(NbdfsMount *m, int cancel_fd, GError **error)
{
    struct nbd_handle *h = nbdfs_handle_new(false, error);
    NbdfsExportIdentity id = { 0 };
    g_autofree char *diff = NULL;
    const char *missing;

    if (!h) {
        return NULL;
    }
    request_contexts(m, h);
    if (!nbdfs_source_connect(m->source, m->ask_name, h, m->timeout, cancel_fd, error) ||
        !poll_until(h, ready_or_dead, NULL, "cannot connect", m->timeout, cancel_fd, error)) {
        nbd_close(h);
        return NULL;
    }
    if (!nbd_aio_is_ready(h)) {
        nbdfs_set_nbd_error(error, "cannot open the export");
        nbd_close(h);
        return NULL;
    }
    nbdfs_export_identity_read(h, &id);
    diff = nbdfs_export_identity_diff(&m->identity, &id);
    nbdfs_export_identity_clear(&id);
    missing = missing_context(m, h);
    if (diff || missing) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_FAILED,
                    "the server now offers a different export (%s%s%s%s)", diff ? diff : "",
                    diff && missing ? "; " : "", missing ? missing : "",
                    missing ? " is not offered" : "");
        nbd_close(h);
        return NULL;
    }
    return h;
}

bool nbdfs_client_connect(NbdfsMount *m, unsigned connections, GError **error)
{
    struct nbd_handle *h = nbdfs_handle_new(true, error);
    g_autoptr(GPtrArray) bitmap_names = NULL;
    g_autoptr(GPtrArray) conns = NULL;

    if (!h) {
        return false;
    }
    if (!nbdfs_source_connect(m->source, m->ask_name, h, m->timeout, -1, error)) {
        nbd_close(h);
        return false;
    }
    if (nbd_aio_is_negotiating(h)) {
        NbdfsOption opt;
        bitmap_names = list_bitmaps(m, h);
        nbd_add_meta_context(h, "base:allocation");
        for (guint i = 0; i < bitmap_names->len; i++) {
            nbd_add_meta_context(h, g_ptr_array_index(bitmap_names, i));
        }
        if (!nbdfs_option_wait(h, nbd_aio_opt_go(h, nbdfs_option_callback(&opt)), &opt,
                               "cannot open the export", m->timeout, error)) {
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

    conns = g_ptr_array_new_with_free_func((GDestroyNotify)nbd_close);
    g_ptr_array_add(conns, h);
    if (connections > 1 && !m->identity.can_multi_conn) {
        g_debug("the server does not allow multi-conn: one connection");
        connections = 1;
    }
    while (conns->len < connections) {
        struct nbd_handle *more = connect_another(m, -1, error);
        if (!more) {
            g_prefix_error(error, "connection %u: ", conns->len);
            return false;
        }
        g_ptr_array_add(conns, more);
    }

    m->n_conns = conns->len;
    m->conns = g_new0(NbdfsConn *, m->n_conns);
    for (unsigned i = 0; i < m->n_conns; i++) {
        m->conns[i] = nbdfs_conn_new(m, g_ptr_array_index(conns, i), i, error);
        if (!m->conns[i]) {
            nbdfs_client_stop(m);
            return false;
        }
        g_ptr_array_index(conns, i) = NULL;    /* the connection owns it now */
    }
    return true;
}

bool nbdfs_client_start(NbdfsMount *m, GError **error)
{
    for (unsigned i = 0; i < m->n_conns; i++) {
        if (!nbdfs_conn_start_thread(m->conns[i], error)) {
            return false;
        }
    }
    return true;
}

void nbdfs_client_stop(NbdfsMount *m)
{
    /* Every connection disconnects at once; then wait for them all. */
    for (unsigned i = 0; i < m->n_conns; i++) {
        if (m->conns[i]) {
            nbdfs_conn_stop_thread(m->conns[i], false);
        }
    }
    for (unsigned i = 0; i < m->n_conns; i++) {
        if (m->conns[i]) {
            nbdfs_conn_stop_thread(m->conns[i], true);
            nbdfs_conn_free(m->conns[i]);
        }
    }
    g_clear_pointer(&m->conns, g_free);
    m->n_conns = 0;
}

/* ---- reconnection ---- */

static gpointer reconnect_thread(gpointer data)
{
    NbdfsMount *m = data;

    g_mutex_lock(&m->reconnect_lock);
    while (!m->reconnect_stop) {
        gint64 next = 0;

        for (unsigned i = 0; i < m->n_conns && !m->reconnect_stop; i++) {
            NbdfsConn *c = m->conns[i];
            g_autoptr(GError) error = NULL;
            struct nbd_handle *h;

            if (nbdfs_conn_alive(c) || g_atomic_pointer_get(&c->replacement)) {
                c->backoff = 0;
                continue;
            }
            if (c->backoff && g_get_monotonic_time() < c->retry_at) {
                next = next ? MIN(next, c->retry_at) : c->retry_at;
                continue;
            }
            g_mutex_unlock(&m->reconnect_lock);
            h = connect_another(m, m->reconnect_cancel_fd, &error);
            g_mutex_lock(&m->reconnect_lock);
            if (!h) {
                c->backoff = c->backoff ? MIN(c->backoff * 2, RECONNECT_MAX_S) : RECONNECT_FIRST_S;
                c->retry_at = g_get_monotonic_time() + c->backoff * G_USEC_PER_SEC;
                next = next ? MIN(next, c->retry_at) : c->retry_at;
                /* Each new reason is said once; repeats only in the debug log. */
                g_log(G_LOG_DOMAIN, g_strcmp0(c->last_failure, error->message) != 0
                      ? G_LOG_LEVEL_MESSAGE : G_LOG_LEVEL_DEBUG,
                      "connection %u: reconnecting failed: %s; next try in %u s",
                      c->index, error->message, c->backoff);
                g_free(c->last_failure);
                c->last_failure = g_strdup(error->message);
                continue;
            }
            g_clear_pointer(&c->last_failure, g_free);
            g_atomic_pointer_set(&c->replacement, h);
            nbdfs_conn_wake(c);
        }
        if (m->reconnect_stop) {
            break;
        }
        /* Until a connection dies, or the next retry is due. */
        if (next) {
            g_cond_wait_until(&m->reconnect_cond, &m->reconnect_lock, next);
        } else {
            g_cond_wait(&m->reconnect_cond, &m->reconnect_lock);
        }
    }
    g_mutex_unlock(&m->reconnect_lock);
    return NULL;
}

bool nbdfs_client_start_reconnect(NbdfsMount *m, GError **error)
{
    m->reconnect_cancel_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (m->reconnect_cancel_fd < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "eventfd: %s",
                    g_strerror(errno));
        return false;
    }
    m->reconnect_thread = g_thread_try_new("nbdfs-reconnect", reconnect_thread, m, error);
    return m->reconnect_thread != NULL;
}

void nbdfs_client_connection_died(NbdfsMount *m)
{
    if (!m->reconnect_thread) {
        return;
    }
    g_mutex_lock(&m->reconnect_lock);
    g_cond_signal(&m->reconnect_cond);
    g_mutex_unlock(&m->reconnect_lock);
}

void nbdfs_client_stop_reconnect(NbdfsMount *m)
{
    uint64_t one = 1;

    if (m->reconnect_thread) {
        g_mutex_lock(&m->reconnect_lock);
        m->reconnect_stop = true;
        g_cond_signal(&m->reconnect_cond);
        g_mutex_unlock(&m->reconnect_lock);
        /* A handshake in progress gives up at once. */
        if (write(m->reconnect_cancel_fd, &one, sizeof(one)) < 0) {
            g_debug("eventfd: %s", g_strerror(errno));
        }
        g_thread_join(m->reconnect_thread);
        m->reconnect_thread = NULL;
    }
    if (m->reconnect_cancel_fd >= 0) {
        close(m->reconnect_cancel_fd);
        m->reconnect_cancel_fd = -1;
    }
}

bool nbdfs_conn_adopt_replacement(NbdfsConn *c)
{
    struct nbd_handle *h = g_atomic_pointer_exchange(&c->replacement, NULL);
    struct nbd_handle *old;

    if (!h) {
        return false;
    }
    g_rw_lock_writer_lock(&c->handle_lock);
    old = c->nbd;
    c->nbd = h;
    g_rw_lock_writer_unlock(&c->handle_lock);
    nbd_close(old);                /* dead: libnbd already failed what was in flight */
    /* What the server says may have changed while we were away. */
    nbdfs_contexts_forget(c->m);
    g_atomic_int_set(&c->dead, 0);
    g_message("connection %u to the server is back", c->index);
    return true;
}

/* ---- FUSE requests served by NBD commands ---- */

typedef struct {
    GMutex lock;
    GCond cond;
    bool done;
    int error;
} IoWaiter;

struct NbdfsIo {
    NbdfsMount *m;
    fuse_req_t req;
    NbdfsReplyKind kind;
    char *buf;
    bool own_buf;                  /* buf is ours to free */
    void *adopted;                 /* a request buffer taken from libfuse (free()) */
    size_t reply_offset, reply_length;   /* DATA: the slice; WRITE: the count */
    bool changes;                  /* write-type commands: [lo, hi) changed */
    uint64_t lo, hi;
    bool is_write;                 /* nbdfs_io_set_writer() */
    NbdfsFile *writer;             /* a reference; NULL: the page cache (FLUSH: who asked) */
    bool reserved;                 /* [res_lo, res_hi) is in the write-behind table */
    uint64_t res_lo, res_hi;
    bool is_flush;
    uint64_t flush_covers;         /* nbdfs_files_flush_begin() */
    IoWaiter *waiter;              /* nbdfs_io_run() */
    gint refs;                     /* commands not yet released, plus one while issuing */
    gint error;                    /* the first errno */
    gint send_error;               /* the first failure known without the server */
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
        io->own_buf = true;
    }
    io->reply_length = buf_size;
    io->refs = 1;
    g_mutex_lock(&m->ios_lock);
    m->ios_alive++;
    g_mutex_unlock(&m->ios_lock);
    return io;
}

char *nbdfs_io_buffer(NbdfsIo *io)
{
    return io->buf;
}

void nbdfs_io_set_buffer(NbdfsIo *io, char *buf)
{
    if (io->own_buf) {
        g_free(io->buf);
    }
    io->buf = buf;
    io->own_buf = false;
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
    g_atomic_int_compare_and_exchange(&io->send_error, 0, err);
    g_atomic_int_compare_and_exchange(&io->error, 0, err);
}

void nbdfs_io_command_failed(NbdfsIo *io, int err)
{
    g_atomic_int_compare_and_exchange(&io->error, 0, err);
}

int nbdfs_io_error(NbdfsIo *io)
{
    return g_atomic_int_get(&io->send_error);
}

void nbdfs_io_set_writer(NbdfsIo *io, NbdfsFile *file, bool reserved, uint64_t offset,
                         uint64_t length)
{
    io->is_write = true;
    io->writer = file ? nbdfs_file_ref(file) : NULL;
    io->reserved = reserved;
    io->res_lo = offset;
    io->res_hi = offset + length;
}

static void io_finish(NbdfsIo *io)
{
    NbdfsMount *m = io->m;
    int err = g_atomic_int_get(&io->error);

    /* Before the reply: whoever asks next must not see the old status. */
    if (io->changes) {
        nbdfs_contexts_changed(m, io->lo, io->hi - io->lo);
    }
    /* Errors are recorded before the range is free, so a drain sees them. */
    if (io->is_write) {
        /* A synchronous write's error goes to its caller, not to a later fsync. */
        nbdfs_files_write_done(m, io->writer, err, io->req != NULL || io->waiter != NULL,
                               io->lo, io->hi - io->lo);
        nbdfs_file_unref(io->writer);
    }
    if (io->reserved) {
        nbdfs_pending_end(m, io->res_lo, io->res_hi - io->res_lo);
    }
    if (io->is_flush) {
        nbdfs_files_flush_done(m, io->flush_covers, err, io->writer);
        nbdfs_file_unref(io->writer);
    }
    if (io->waiter) {
        IoWaiter *w = io->waiter;
        g_mutex_lock(&w->lock);
        w->done = true;
        w->error = err;
        g_cond_signal(&w->cond);
        g_mutex_unlock(&w->lock);
    } else if (!io->req) {
        /* Answered already (write-behind). */
    } else if (err) {
        fuse_reply_err(io->req, nbdfs_errno(err));
    } else if (io->kind == NBDFS_REPLY_DATA) {
        fuse_reply_buf(io->req, io->buf + io->reply_offset, io->reply_length);
    } else if (io->kind == NBDFS_REPLY_WRITE) {
        fuse_reply_write(io->req, io->reply_length);
    } else {
        fuse_reply_err(io->req, 0);
    }
    if (io->own_buf) {
        g_free(io->buf);
    }
    free(io->adopted);
    g_free(io);

    g_mutex_lock(&m->ios_lock);
    if (--m->ios_alive == 0) {
        g_cond_broadcast(&m->ios_cond);
    }
    g_mutex_unlock(&m->ios_lock);
}

void nbdfs_io_ref(NbdfsIo *io)
{
    g_atomic_int_inc(&io->refs);
}

void nbdfs_io_unref(NbdfsIo *io)
{
    if (g_atomic_int_dec_and_test(&io->refs)) {
        io_finish(io);
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
        nbdfs_conn_issue(io->m, io, &(NbdfsCommand){
            .kind = NBDFS_CMD_READ, .buf = io->buf + buf_offset + done, .count = n,
            .offset = offset + done });
        done += n;
    }
}

void nbdfs_io_pwrite(NbdfsIo *io, const void *data, uint64_t offset, uint64_t length,
                     uint32_t flags)
{
    io_changes(io, offset, length);
    for (uint64_t done = 0; done < length;) {
        uint64_t n = MIN(length - done, io->m->max_io);
        nbdfs_conn_issue(io->m, io, &(NbdfsCommand){
            .kind = NBDFS_CMD_WRITE, .buf = (char *)data + done, .count = n,
            .offset = offset + done, .flags = flags });
        done += n;
    }
}

void nbdfs_io_zero(NbdfsIo *io, uint64_t offset, uint64_t length, uint32_t flags)
{
    uint64_t chunk = MAX_ZERO_REQUEST - MAX_ZERO_REQUEST % io->m->min_block;

    io_changes(io, offset, length);
    for (uint64_t done = 0; done < length;) {
        uint64_t n = MIN(length - done, chunk);
        nbdfs_conn_issue(io->m, io, &(NbdfsCommand){
            .kind = NBDFS_CMD_ZERO, .count = n, .offset = offset + done, .flags = flags });
        done += n;
    }
}

void nbdfs_io_flush(NbdfsIo *io, NbdfsFile *issuer)
{
    /* Multi-conn: a flush on one connection covers writes answered on all. */
    io->is_flush = true;
    io->writer = issuer ? nbdfs_file_ref(issuer) : NULL;
    io->flush_covers = nbdfs_files_flush_begin(io->m);
    nbdfs_conn_issue(io->m, io, &(NbdfsCommand){ .kind = NBDFS_CMD_FLUSH });
}

void nbdfs_io_submit(NbdfsIo *io)
{
    nbdfs_io_unref(io);
}

int nbdfs_io_run(NbdfsIo *io)
{
    IoWaiter w = { .done = false };
    int err;

    g_assert(!io->req);
    g_mutex_init(&w.lock);
    g_cond_init(&w.cond);
    io->waiter = &w;
    nbdfs_io_unref(io);
    /* Ends: the I/O thread completes or fails each command by its deadline. */
    g_mutex_lock(&w.lock);
    while (!w.done) {
        g_cond_wait(&w.cond, &w.lock);
    }
    err = w.error;
    g_mutex_unlock(&w.lock);
    g_mutex_clear(&w.lock);
    g_cond_clear(&w.cond);
    return err;
}

/* ---- block status ---- */

typedef struct {
    const char *context;
    bool have;                     /* the context's chunk arrived */
    GArray *extents;
    uint64_t start;
} StatusAnswer;

static int status_extents(void *data, const char *metacontext, uint64_t offset,
                          nbd_extent *entries, size_t n, int *error)
{
    StatusAnswer *a = data;

    /* Without the payload form the server answers for every context: keep ours. */
    if (*error || a->have || strcmp(metacontext, a->context) != 0) {
        return 0;
    }
    a->have = true;
    a->start = offset;
    g_array_append_vals(a->extents, entries, n);
    return 0;
}

int nbdfs_client_block_status(NbdfsMount *m, NbdfsContext *ctx, uint64_t offset,
                              GArray *extents, uint64_t *start)
{
    StatusAnswer a = { .context = ctx->name, .extents = extents };
    uint64_t from = offset - offset % m->min_block;
    uint64_t count = m->size - from;
    NbdfsIo *io = nbdfs_io_new(m, NULL, NBDFS_REPLY_NONE, 0, false);
    int err;

    /* Ask about as much as the protocol allows: the server stops where it likes. */
    if (!m->extended && count > MAX_COMPACT_STATUS) {
        count = MAX_COMPACT_STATUS - MAX_COMPACT_STATUS % m->min_block;
    }
    g_debug("block status of %s from %" G_GUINT64_FORMAT, ctx->name, from);
    nbdfs_conn_issue(m, io, &(NbdfsCommand){
        .kind = NBDFS_CMD_BLOCK_STATUS, .count = count, .offset = from,
        .context = m->can_payload ? ctx->name : NULL,
        .extents = { .callback = status_extents, .user_data = &a } });
    err = nbdfs_io_run(io);
    if (!err && (!a.have || extents->len == 0)) {
        g_warning("block status of %s: the server sent no extents", ctx->name);
        err = EIO;
    }
    *start = a.start;
    return err;
}
