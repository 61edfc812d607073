/*
 * The server object: exports, listening sockets, the accept loop, one thread
 * per connection (handshake, then the request reader) and clean shutdown.
 */
#include "image-format.h"
#include "internal.h"

#include <errno.h>
#include <malloc.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gio/gio.h>

/* Over-cap clients answered politely at once; beyond this they are just closed. */
#define MAX_REFUSING 16
/* How long shutdown lets connections finish before cutting them off. */
#define SHUTDOWN_GRACE_US (5 * G_USEC_PER_SEC)

/* Writer-preferring: writes arriving all the time must not keep a command out. */
static void gate_init(pthread_rwlock_t *gate)
{
    pthread_rwlockattr_t attr;

    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(gate, &attr);
    pthread_rwlockattr_destroy(&attr);
}

NbdsExport *nbds_export_new(const char *name, NbdsImage *img, bool read_only)
{
    NbdsExport *exp = g_new0(NbdsExport, 1);

    exp->name = g_strdup(name);
    exp->image = img;
    exp->read_only = read_only;
    exp->contexts = g_ptr_array_new_with_free_func((GDestroyNotify)nbds_meta_context_free);
    exp->views = g_ptr_array_new();
    g_rw_lock_init(&exp->contexts_lock);
    gate_init(&exp->gate);
    nbds_meta_add_base_allocation(exp);
    return exp;
}

void nbds_export_free(NbdsExport *exp)
{
    if (!exp) {
        return;
    }
    g_assert(exp->views->len == 0);
    g_ptr_array_unref(exp->views);
    g_ptr_array_unref(exp->contexts);
    g_rw_lock_clear(&exp->contexts_lock);
    pthread_rwlock_destroy(&exp->gate);
    g_free(exp->untracked_writer);
    /* Not closed cleanly (no shutdown): the in-use flag stays and flags the bitmaps. */
    nbds_bitmaps_free(exp->bitmaps);
    if (!exp->view) {
        nbds_image_close(exp->image);      /* a view's image is its source's */
    }
    g_free(exp->name);
    g_free(exp->description);
    g_free(exp);
}

/*
 * Request payloads and read buffers (up to 32 MiB each) come and go by the
 * thousand per second.  With glibc's defaults each large one is a fresh mmap,
 * or the heap is trimmed under it, and all its pages fault in again: that
 * halved write throughput (nbdcopy into the server: 450-940 MiB/s, 1,640-1,740
 * with this).  Keep them in the heap, and let it keep up to 128 MiB free
 * (what clients may make the server hold is bounded by --max-buffered).
 */
static void tune_allocator(void)
{
    static gsize done;

    if (g_once_init_enter(&done)) {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, 128 << 20);
        g_once_init_leave(&done, 1);
    }
}

NbdsServer *nbds_server_new(const NbdsServerConfig *config, GError **error)
{
    NbdsServer *s;
    NbdsTls *tls = NULL;

    tune_allocator();
    if (config->tls != NBDS_TLS_OFF) {
        tls = nbds_tls_new(config->tls_creds, config->tls_psk, config->tls_verify_peer,
                           config->tls_psk_user, error);
        if (!tls) {
            return NULL;
        }
    }
    s = g_new0(NbdsServer, 1);
    s->config = *config;
    s->tls = tls;
    /* The paths are read once, above: the config need not outlive this call. */
    s->config.tls_creds = s->config.tls_psk = s->config.tls_psk_user = NULL;
    if (!s->config.threads) {
        s->config.threads = 16;
    }
    if (!s->config.max_buffered) {
        s->config.max_buffered = NBDS_DEFAULT_MAX_BUFFERED;
    }
    nbds_budget_init(&s->budget, s->config.max_buffered,
                     s->config.max_connections ? s->config.max_connections
                                               : NBDS_DEFAULT_MAX_CONNECTIONS);
    s->exports = g_ptr_array_new_with_free_func((GDestroyNotify)nbds_export_free);
    g_mutex_init(&s->exports_lock);
    g_cond_init(&s->exports_cond);
    s->listen_fds = g_array_new(FALSE, FALSE, sizeof(int));
    s->finished = g_ptr_array_new();
    g_mutex_init(&s->lock);
    g_cond_init(&s->cond);
    return s;
}

void nbds_server_free(NbdsServer *s)
{
    if (!s) {
        return;
    }
    nbds_server_shutdown(s);
    g_ptr_array_unref(s->exports);
    g_mutex_clear(&s->exports_lock);
    g_cond_clear(&s->exports_cond);
    g_array_unref(s->listen_fds);
    g_ptr_array_unref(s->finished);
    g_mutex_clear(&s->lock);
    g_cond_clear(&s->cond);
    nbds_budget_clear(&s->budget);
    nbds_tls_free(s->tls);
    g_free(s);
}

NbdsExport *nbds_server_find_export_locked(NbdsServer *s, const char *name)
{
    if (name[0] == '\0') {
        return s->exports->len ? g_ptr_array_index(s->exports, 0) : NULL;
    }
    for (guint i = 0; i < s->exports->len; i++) {
        NbdsExport *exp = g_ptr_array_index(s->exports, i);
        if (strcmp(exp->name, name) == 0) {
            return exp;
        }
    }
    return NULL;
}

NbdsExport *nbds_server_ref_export(NbdsServer *s, const char *name)
{
    NbdsExport *exp;

    g_mutex_lock(&s->exports_lock);
    exp = nbds_server_find_export_locked(s, name);
    if (exp) {
        exp->refs++;
    }
    g_mutex_unlock(&s->exports_lock);
    return exp;
}

void nbds_export_count_client(NbdsServer *s, NbdsExport *exp, int delta)
{
    g_mutex_lock(&s->exports_lock);
    exp->clients += delta;
    g_mutex_unlock(&s->exports_lock);
}

void nbds_export_unref(NbdsServer *s, NbdsExport *exp)
{
    if (exp) {
        g_mutex_lock(&s->exports_lock);
        g_assert(exp->refs > 0);
        exp->refs--;
        g_cond_broadcast(&s->exports_cond);
        g_mutex_unlock(&s->exports_lock);
    }
}

NbdsExport *nbds_server_add_export(NbdsServer *s, const char *path, GError **error)
{
    g_autofree char *name = g_path_get_basename(path);
    NbdsExport *exp;
    NbdsImage *img;
    NbdsBitmapSet *bitmaps;
    const char *format;

    if (name[0] && nbds_server_find_export_locked(s, name)) {   /* before serving */
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_EXISTS,
                    "%s: another image is already exported as '%s'", path, name);
        return NULL;
    }
    img = nbds_image_open(path, s->config.read_only, error);
    if (!img) {
        return NULL;
    }
    format = nbds_image_format_probe(nbds_image_fd(img));
    if (format && !s->config.any_format) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                    "%s: this is a %s image, not a raw one; nbdfs serves raw images only "
                    "(--format raw serves its bytes as they are)", path, format);
        nbds_image_close(img);
        return NULL;
    }
    bitmaps = nbds_bitmaps_load(img, !s->config.read_only, error);
    if (!bitmaps) {
        nbds_image_close(img);
        return NULL;
    }
    if (nbds_bitmaps_inconsistent_reason(bitmaps)) {
        g_warning("%s: dirty bitmaps are inconsistent (%s): they are served as all dirty "
                  "until cleared with 'nbdfs bitmap clear'", path,
                  nbds_bitmaps_inconsistent_reason(bitmaps));
    }
    exp = nbds_export_new(name, img, s->config.read_only);
    exp->bitmaps = bitmaps;
    nbds_meta_add_bitmaps(exp);
    g_ptr_array_add(s->exports, exp);
    if (s->config.control && !exp->read_only) {
        g_autoptr(GError) local = NULL;
        if (!nbds_image_control_add(s, exp, &local)) {
            g_warning("%s: 'nbdfs bitmap' and 'nbdfs backup' cannot reach this server",
                      local->message);
        }
    }
    return exp;
}

int nbds_export_image_fd(const NbdsExport *exp)
{
    return nbds_image_fd(exp->image);
}

bool nbds_export_allow_untracked_writes(NbdsExport *exp, const char *why)
{
    bool allowed;

    /* Atomic against bitmap edits, which hold the gate too. */
    pthread_rwlock_wrlock(&exp->gate);
    allowed = !nbds_bitmaps_any_enabled(exp->bitmaps);
    if (allowed && !exp->untracked_writer) {
        exp->untracked_writer = g_strdup(why);
    }
    pthread_rwlock_unlock(&exp->gate);
    return allowed;
}

uint16_t nbds_export_flags(const NbdsExport *exp)
{
    /*
     * One descriptor and one page cache serve every connection and FLUSH is
     * fdatasync on it, so a flush on any connection covers writes on all:
     * multi-conn is safe.
     */
    uint16_t flags = NBDS_FLAG_HAS_FLAGS | NBDS_FLAG_SEND_FLUSH | NBDS_FLAG_SEND_FUA |
                     NBDS_FLAG_SEND_CACHE | NBDS_FLAG_CAN_MULTI_CONN;

    if (exp->read_only) {
        flags |= NBDS_FLAG_READ_ONLY;
    } else {
        flags |= NBDS_FLAG_SEND_TRIM | NBDS_FLAG_SEND_WRITE_ZEROES | NBDS_FLAG_SEND_FAST_ZERO;
    }
    return flags;
}

int nbds_export_pread(NbdsExport *exp, void *buf, uint64_t len, uint64_t offset)
{
    return exp->view ? nbds_backup_view_pread(exp->view, buf, len, offset)
                     : nbds_image_pread(exp->image, buf, len, offset);
}

int nbds_export_next_run(NbdsExport *exp, uint64_t offset, uint64_t end, bool *is_hole,
                         uint64_t *run_end)
{
    return exp->view ? nbds_backup_view_next_run(exp->view, offset, end, is_hole, run_end)
                     : nbds_image_next_run(exp->image, offset, end, is_hole, run_end);
}

/* ---- listening sockets ---- */

bool nbds_server_listen_fd(NbdsServer *s, int fd, GError **error)
{
    int listening = 0;
    socklen_t len = sizeof(listening);

    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0 || !listening) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "file descriptor %d is not a listening socket", fd);
        return false;
    }
    g_array_append_val(s->listen_fds, fd);
    return true;
}

int nbds_listen_unix_path(const char *path, unsigned mode, GError **error)
{
    mode_t old_umask;
    int err;
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    struct stat st;
    int fd;

    if (strlen(path) >= sizeof(sun.sun_path)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_FILENAME_TOO_LONG,
                    "%s: socket path is too long", path);
        return -1;
    }
    strcpy(sun.sun_path, path);
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_EXISTS,
                        "%s: exists and is not a socket", path);
            return -1;
        }
        /* A socket nobody answers on is left over from a dead server. */
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == 0) {
            close(fd);
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_ADDRESS_IN_USE,
                        "%s: a server is already listening there", path);
            return -1;
        }
        if (fd >= 0) {
            close(fd);
        }
        unlink(path);
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    /* Born owner-only (no window where others may connect), then given MODE. */
    old_umask = umask(0177);
    err = fd < 0 || bind(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 ? errno : 0;
    umask(old_umask);
    if (!err && chmod(path, mode) < 0) {
        err = errno;
        unlink(path);
    }
    if (!err && listen(fd, SOMAXCONN) < 0) {
        err = errno;
        unlink(path);
    }
    if (err) {
        if (fd >= 0) {
            close(fd);
        }
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(err), "%s: %s", path,
                    g_strerror(err));
        return -1;
    }
    return fd;
}

bool nbds_server_listen_unix(NbdsServer *s, const char *path, unsigned mode, GError **error)
{
    int fd = nbds_listen_unix_path(path, mode, error);

    if (fd < 0) {
        return false;
    }
    g_array_append_val(s->listen_fds, fd);
    return true;
}

bool nbds_server_listen_tcp(NbdsServer *s, const char *address, const char *port,
                            GError **error)
{
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC,
        .ai_socktype = SOCK_STREAM,
        .ai_flags = AI_PASSIVE | AI_ADDRCONFIG,
    };
    struct addrinfo *res = NULL;
    int r = getaddrinfo(address, port, &hints, &res);
    int last_err = 0;
    guint before = s->listen_fds->len;

    if (r != 0) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT, "%s:%s: %s",
                    address ? address : "*", port, gai_strerror(r));
        return false;
    }
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int one = 1;
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            last_err = errno;
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (ai->ai_family == AF_INET6) {
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
        }
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, SOMAXCONN) < 0) {
            last_err = errno;
            close(fd);
            continue;
        }
        g_array_append_val(s->listen_fds, fd);
    }
    freeaddrinfo(res);
    if (s->listen_fds->len == before) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(last_err), "%s:%s: %s",
                    address ? address : "*", port, g_strerror(last_err));
        return false;
    }
    return true;
}

/* ---- connections ---- */

/* Keepalive: a dead peer is probed after a minute idle, dropped 1 minute later. */
#define KEEPALIVE_IDLE_S 60
#define KEEPALIVE_INTERVAL_S 10
#define KEEPALIVE_PROBES 6

/*
 * TCP clients: no Nagle delay on replies, and keepalive, so a client that
 * vanished without a FIN (a dead host, a cut network) is noticed and its
 * connection freed.  Nothing to do on unix sockets.
 */
static void set_tcp_options(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    int one = 1, idle = KEEPALIVE_IDLE_S, interval = KEEPALIVE_INTERVAL_S;
    int probes = KEEPALIVE_PROBES;

    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0 ||
        (ss.ss_family != AF_INET && ss.ss_family != AF_INET6)) {
        return;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof(interval));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof(probes));
}

/* Take C off the server's books; THREAD (if any) is to be joined. */
static void forget_conn(NbdsServer *s, NbdsConn *c, bool refused, GThread *thread)
{
    g_mutex_lock(&s->lock);
    if (refused) {
        s->n_refusing--;
    } else {
        s->conns = g_list_remove(s->conns, c);
        s->n_conns--;
    }
    if (thread) {
        g_ptr_array_add(s->finished, thread);
    }
    g_cond_broadcast(&s->cond);
    g_mutex_unlock(&s->lock);
}

static gpointer conn_thread(gpointer data)
{
    NbdsConn *c = data;
    NbdsServer *s = c->server;
    bool refused = c->refuse;

    if (nbds_handshake(c) && !c->refuse) {
        c->deadline = 0;
        g_debug("%s: serving export '%s'", c->peer, c->export->name);
        nbds_transmission(c);
    }
    g_debug("%s: connection closed", c->peer);

    /* Joined by the next reap (which waits for the rest of this function). */
    forget_conn(s, c, refused, g_thread_self());
    nbds_conn_free(c);
    return NULL;
}

/* Join the threads of connections that have ended. */
static void reap_finished(NbdsServer *s)
{
    g_autoptr(GPtrArray) done = NULL;

    g_mutex_lock(&s->lock);
    done = s->finished;
    s->finished = g_ptr_array_new();
    g_mutex_unlock(&s->lock);
    for (guint i = 0; i < done->len; i++) {
        g_thread_join(g_ptr_array_index(done, i));
    }
}

void nbds_server_wait_idle(NbdsServer *s)
{
    g_mutex_lock(&s->lock);
    while (s->n_conns > 0 || s->n_refusing > 0) {
        g_cond_wait(&s->cond, &s->lock);
    }
    g_mutex_unlock(&s->lock);
    reap_finished(s);
}

void nbds_server_serve_fd(NbdsServer *s, int fd)
{
    NbdsConn *c;
    GThread *t;
    bool refuse = false;
    g_autoptr(GError) error = NULL;

    set_tcp_options(fd);

    g_mutex_lock(&s->lock);
    if (!s->workers) {
        /*
         * Threads start with the first client, so a server may fork before
         * that.  Exclusive: they are the server's own, all started now (no
         * request can then fail for want of a thread), and end with it.
         */
        s->workers = g_thread_pool_new(nbds_work_run, s, s->config.threads, TRUE, &error);
        if (!s->workers) {
            g_mutex_unlock(&s->lock);
            g_warning("cannot start the worker threads (%s): closing the client",
                      error->message);
            close(fd);
            return;
        }
    }
    if (s->config.max_connections && s->n_conns >= s->config.max_connections) {
        if (s->n_refusing >= MAX_REFUSING) {
            g_mutex_unlock(&s->lock);
            g_message("connection limit (%u) reached, closing a new client at once",
                      s->config.max_connections);
            close(fd);
            return;
        }
        refuse = true;
    }
    c = nbds_conn_new(s, fd);
    c->refuse = refuse;
    if (s->config.handshake_limit) {
        c->deadline = g_get_monotonic_time() + (gint64)s->config.handshake_limit * G_USEC_PER_SEC;
    } else if (refuse) {
        c->deadline = g_get_monotonic_time() + G_USEC_PER_SEC;
    }
    if (refuse) {
        s->n_refusing++;
        g_message("%s: connection limit (%u) reached, refusing the client", c->peer,
                  s->config.max_connections);
    } else {
        s->conns = g_list_prepend(s->conns, c);
        s->n_conns++;
    }
    g_mutex_unlock(&s->lock);

    t = g_thread_try_new("nbds-conn", conn_thread, c, &error);
    if (!t) {
        g_warning("%s: cannot start a thread: %s", c->peer, error->message);
        forget_conn(s, c, refuse, NULL);
        nbds_conn_free(c);
        return;
    }
    /* The reference is kept: reap_finished() joins the thread once it ends. */
    reap_finished(s);
}

void nbds_server_run(NbdsServer *s, int stop_fd)
{
    guint n = s->listen_fds->len;
    g_autofree struct pollfd *pfd = g_new0(struct pollfd, n + 1);

    for (guint i = 0; i < n; i++) {
        pfd[i].fd = g_array_index(s->listen_fds, int, i);
        pfd[i].events = POLLIN;
    }
    pfd[n].fd = stop_fd;
    pfd[n].events = POLLIN;

    for (;;) {
        if (poll(pfd, n + 1, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            g_warning("poll: %s", g_strerror(errno));
            return;
        }
        if (pfd[n].revents) {
            return;
        }
        for (guint i = 0; i < n; i++) {
            int fd;
            if (!(pfd[i].revents & POLLIN)) {
                continue;
            }
            fd = accept4(pfd[i].fd, NULL, NULL, SOCK_CLOEXEC);
            if (fd < 0) {
                if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
                    g_warning("accept: %s", g_strerror(errno));
                    /* Out of descriptors: do not spin on the same error. */
                    g_usleep(100 * 1000);
                }
                continue;
            }
            nbds_server_serve_fd(s, fd);
        }
    }
}

/* Cut every connection's socket in direction HOW (wakes blocked readers/writers). */
static void shutdown_all(NbdsServer *s, int how)
{
    for (GList *l = s->conns; l; l = l->next) {
        NbdsConn *c = l->data;
        shutdown(c->fd, how);
    }
}

bool nbds_server_shutdown(NbdsServer *s)
{
    gint64 deadline = g_get_monotonic_time() + SHUTDOWN_GRACE_US;
    bool ok = true;

    if (g_atomic_int_get(&s->shutting_down) == 2) {
        return true;
    }
    g_atomic_int_set(&s->shutting_down, 1);
    /* No command runs past this point: the bitmaps are saved as they are. */
    nbds_image_control_stop(s);
    for (guint i = 0; i < s->listen_fds->len; i++) {
        close(g_array_index(s->listen_fds, int, i));
    }
    g_array_set_size(s->listen_fds, 0);

    /* Stop reading requests; requests in flight still get their replies. */
    nbds_budget_wake(s);
    g_mutex_lock(&s->lock);
    shutdown_all(s, SHUT_RD);
    while (s->n_conns > 0 || s->n_refusing > 0) {
        if (!g_cond_wait_until(&s->cond, &s->lock, deadline)) {
            g_message("%u clients did not finish in time, cutting them off", s->n_conns);
            shutdown_all(s, SHUT_RDWR);
            deadline = G_MAXINT64;
        }
    }
    g_mutex_unlock(&s->lock);
    reap_finished(s);
    if (s->workers) {
        g_thread_pool_free(s->workers, FALSE, TRUE);
        s->workers = NULL;
    }
    /* Their frozen changes go back into their bitmaps before these are saved. */
    nbds_backup_abort_all(s);

    for (guint i = 0; i < s->exports->len; i++) {
        NbdsExport *exp = g_ptr_array_index(s->exports, i);
        int err = exp->read_only ? 0 : nbds_image_flush(exp->image);
        g_autoptr(GError) error = NULL;

        if (err) {
            /* The bitmaps keep their in-use flag: next time they are inconsistent. */
            g_warning("%s: flush: %s", nbds_image_path(exp->image), g_strerror(err));
            ok = false;
            continue;
        }
        if (!exp->read_only && !nbds_bitmaps_close(g_steal_pointer(&exp->bitmaps), &error)) {
            g_warning("%s", error->message);
            ok = false;
        }
    }
    g_atomic_int_set(&s->shutting_down, 2);
    return ok;
}
