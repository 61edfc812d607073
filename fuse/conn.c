/*
 * One NBD connection of a mount and the I/O thread that drives it.
 *
 * The I/O thread is the only thread that reads from the connection's
 * socket: it polls the socket (in the direction libnbd wants) and an
 * eventfd, lets libnbd act, and so runs every completion callback of the
 * connection.  Other threads issue commands directly (nbd_aio_* sends
 * without blocking, under libnbd's handle lock) and wake the I/O thread when
 * a command is left half sent.
 *
 * Deadlines: every command in flight is queued by issue time.  When the
 * oldest has waited --timeout seconds, the thread shuts the socket down:
 * libnbd sees the end of the stream, the connection dies and every command
 * in flight completes at once with an error (EIO to FUSE).  The reconnect
 * thread then makes a new handle, which this thread installs.  The thread is
 * woken for nothing else: idle, it sleeps at most --timeout, so a command
 * issued meanwhile is timed without a wake-up.
 *
 * Command lifetime: an NbdfsCmd has two references, the issuer's and
 * libnbd's (dropped by the callback's free function, which libnbd calls
 * exactly once, even when issuing fails or the handle is closed).  The last
 * one out takes the command off the deadline queue and hands its result to
 * its NbdfsIo.
 */
#include "mount.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gio/gio.h>

/* How long the orderly stop waits for a server to take NBD_CMD_DISC. */
#define DISCONNECT_TIMEOUT_MS 1000

typedef struct {
    NbdfsIo *io;
    NbdfsConn *c;
    GList link;                    /* in c->inflight */
    gint64 deadline;               /* monotonic us */
    gint refs;
    bool completed;                /* the completion callback ran */
    int error;                     /* its error */
    int issue_error;               /* issuing failed with this */
} NbdfsCmd;

NbdfsConn *nbdfs_conn_new(NbdfsMount *m, struct nbd_handle *h, unsigned index,
                          GError **error)
{
    NbdfsConn *c;
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

    if (fd < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "eventfd: %s",
                    g_strerror(errno));
        return NULL;
    }
    c = g_new0(NbdfsConn, 1);
    c->m = m;
    c->nbd = h;
    c->index = index;
    c->wake_fd = fd;
    g_rw_lock_init(&c->handle_lock);
    g_mutex_init(&c->inflight_lock);
    g_queue_init(&c->inflight);
    return c;
}

void nbdfs_conn_free(NbdfsConn *c)
{
    if (!c) {
        return;
    }
    g_assert(!c->thread);
    /* Any command still in flight is released by libnbd (the free callbacks). */
    nbd_close(c->nbd);
    nbd_close(g_atomic_pointer_exchange(&c->replacement, NULL));
    g_assert(g_queue_is_empty(&c->inflight));
    close(c->wake_fd);
    g_free(c->last_failure);
    g_rw_lock_clear(&c->handle_lock);
    g_mutex_clear(&c->inflight_lock);
    g_free(c);
}

void nbdfs_conn_wake(NbdfsConn *c)
{
    uint64_t one = 1;
    ssize_t r = write(c->wake_fd, &one, sizeof(one));

    (void)r;                       /* a full counter means a wake-up is pending anyway */
}

static void drain_wake(NbdfsConn *c)
{
    uint64_t n;
    ssize_t r = read(c->wake_fd, &n, sizeof(n));

    (void)r;
}

static bool handle_alive(struct nbd_handle *h)
{
    return h && !nbd_aio_is_dead(h) && !nbd_aio_is_closed(h) && !nbd_aio_is_created(h);
}

bool nbdfs_conn_alive(NbdfsConn *c)
{
    return !g_atomic_int_get(&c->dead);
}

/* ---- commands ---- */

static void cmd_unref(NbdfsCmd *cmd)
{
    NbdfsConn *c = cmd->c;

    if (!g_atomic_int_dec_and_test(&cmd->refs)) {
        return;
    }
    if (c) {
        g_mutex_lock(&c->inflight_lock);
        g_queue_unlink(&c->inflight, &cmd->link);
        g_mutex_unlock(&c->inflight_lock);
    }
    if (cmd->completed) {
        if (cmd->error) {
            nbdfs_io_command_failed(cmd->io, cmd->error);
        }
    } else {
        /* Never sent, or never answered before the handle went away. */
        nbdfs_io_fail(cmd->io, cmd->issue_error ? cmd->issue_error : ENOTCONN);
    }
    nbdfs_io_unref(cmd->io);
    g_free(cmd);
}

static int cmd_completed(void *data, int *error)
{
    NbdfsCmd *cmd = data;

    cmd->completed = true;
    cmd->error = *error;
    return 1;                      /* retire it: nobody polls for it */
}

static void cmd_free(void *data)
{
    cmd_unref(data);
}

/* A live connection, round robin from the last one used; NULL if none. */
static NbdfsConn *pick_conn(NbdfsMount *m)
{
    guint start = (guint)g_atomic_int_add(&m->next_conn, 1);

    for (unsigned i = 0; i < m->n_conns; i++) {
        NbdfsConn *c = m->conns[(start + i) % m->n_conns];
        if (nbdfs_conn_alive(c)) {
            return c;
        }
    }
    return NULL;
}

static int64_t issue_locked(struct nbd_handle *h, const NbdfsCommand *cmd,
                            nbd_completion_callback done)
{
    switch (cmd->kind) {
    case NBDFS_CMD_READ:
        return nbd_aio_pread(h, cmd->buf, cmd->count, cmd->offset, done, cmd->flags);
    case NBDFS_CMD_WRITE:
        return nbd_aio_pwrite(h, cmd->buf, cmd->count, cmd->offset, done, cmd->flags);
    case NBDFS_CMD_ZERO:
        return nbd_aio_zero(h, cmd->count, cmd->offset, done, cmd->flags);
    case NBDFS_CMD_FLUSH:
        return nbd_aio_flush(h, done, cmd->flags);
    case NBDFS_CMD_BLOCK_STATUS:
        if (cmd->context) {
            char *only[] = { (char *)cmd->context, NULL };
            return nbd_aio_block_status_filter(h, cmd->count, cmd->offset, only,
                                               cmd->extents, done, cmd->flags);
        }
        return nbd_aio_block_status_64(h, cmd->count, cmd->offset, cmd->extents, done,
                                       cmd->flags);
    }
    g_assert_not_reached();
}

void nbdfs_conn_issue(NbdfsMount *m, NbdfsIo *io, const NbdfsCommand *command)
{
    NbdfsConn *c = pick_conn(m);
    NbdfsCmd *cmd = g_new0(NbdfsCmd, 1);
    bool wake;
    int64_t r;

    cmd->io = io;
    cmd->refs = 2;                 /* ours, and libnbd's (its free callback) */
    nbdfs_io_ref(io);
    if (!c) {
        /* Every connection is down: fail at once, never wait. */
        cmd->issue_error = ENOTCONN;
        cmd->refs = 1;
        cmd_unref(cmd);
        return;
    }
    cmd->c = c;
    cmd->link.data = cmd;
    cmd->deadline = g_get_monotonic_time() + (gint64)m->timeout * G_USEC_PER_SEC;

    g_mutex_lock(&c->inflight_lock);
    g_queue_push_tail_link(&c->inflight, &cmd->link);
    g_mutex_unlock(&c->inflight_lock);

    g_rw_lock_reader_lock(&c->handle_lock);
    r = issue_locked(c->nbd, command, (nbd_completion_callback){
                         .callback = cmd_completed, .user_data = cmd, .free = cmd_free });
    if (r == -1) {
        int err = nbd_get_errno();
        cmd->issue_error = !handle_alive(c->nbd) || !err ? ENOTCONN : err;
    }
    /*
     * Half sent: the I/O thread must poll for POLLOUT now.  Or sending killed
     * the connection (libnbd then closed its socket): the thread must notice.
     */
    wake = !handle_alive(c->nbd) ||
           (nbd_aio_get_direction(c->nbd) & LIBNBD_AIO_DIRECTION_WRITE);
    g_rw_lock_reader_unlock(&c->handle_lock);
    if (wake) {
        nbdfs_conn_wake(c);
    }
    cmd_unref(cmd);
}

/* ---- the I/O thread ---- */

/* The oldest command's deadline, or 0 if nothing is in flight. */
static gint64 oldest_deadline(NbdfsConn *c)
{
    gint64 deadline = 0;

    g_mutex_lock(&c->inflight_lock);
    if (!g_queue_is_empty(&c->inflight)) {
        deadline = ((NbdfsCmd *)c->inflight.head->data)->deadline;
    }
    g_mutex_unlock(&c->inflight_lock);
    return deadline;
}

/* The connection failed: once, tell the files and the reconnect thread. */
static void note_death(NbdfsConn *c, const char *why)
{
    /* The orderly stop closes connections itself: no death to report. */
    if (g_atomic_int_get(&c->stop)) {
        g_atomic_int_set(&c->dead, 1);
        return;
    }
    if (g_atomic_int_compare_and_exchange(&c->dead, 0, 1)) {
        g_warning("connection %u to the server lost: %s", c->index, why);
        nbdfs_files_connection_lost(c->m);
        nbdfs_client_connection_died(c->m);
    }
}

/* Let libnbd act on socket events REVENTS (WANTED: what we polled for). */
static void drive_socket(NbdfsConn *c, short wanted, short revents)
{
    int r = 0;

    if (!handle_alive(c->nbd)) {
        note_death(c, "the connection failed");
        return;
    }
    if ((revents & (POLLIN | POLLHUP | POLLERR)) && (wanted & POLLIN)) {
        r = nbd_aio_notify_read(c->nbd);
    }
    if (r != -1 && (revents & (POLLOUT | POLLHUP | POLLERR)) && (wanted & POLLOUT)) {
        r = nbd_aio_notify_write(c->nbd);
    }
    if (r == -1 || !handle_alive(c->nbd)) {
        const char *msg = nbd_get_error();
        note_death(c, msg ? msg : "the connection failed");
    }
}

/*
 * Kill the handle: with its socket shut down libnbd reads the end of the
 * stream, declares the connection dead and fails everything in flight.
 */
static void kill_handle(NbdfsConn *c, const char *why)
{
    int fd = nbd_aio_get_fd(c->nbd);

    if (fd >= 0) {
        shutdown(fd, SHUT_RDWR);
        drive_socket(c, POLLIN | POLLOUT, POLLIN | POLLOUT | POLLHUP);
    }
    if (handle_alive(c->nbd)) {
        /* Still up (libnbd was not reading): closing it fails its commands too. */
        g_rw_lock_writer_lock(&c->handle_lock);
        nbd_close(c->nbd);
        c->nbd = nbd_create();
        g_rw_lock_writer_unlock(&c->handle_lock);
    }
    note_death(c, why);
}

/* Sends NBD_CMD_DISC and waits at most TIMEOUT_MS for the connection to close. */
static void disconnect(NbdfsConn *c, unsigned timeout_ms)
{
    gint64 deadline = g_get_monotonic_time() + (gint64)timeout_ms * 1000;

    if (!handle_alive(c->nbd) || nbd_aio_disconnect(c->nbd, 0) == -1) {
        return;
    }
    while (handle_alive(c->nbd)) {
        unsigned dir = nbd_aio_get_direction(c->nbd);
        struct pollfd pfd = {
            .fd = nbd_aio_get_fd(c->nbd),
            .events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                      ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0),
        };
        gint64 left = deadline - g_get_monotonic_time();
        if (left <= 0 || pfd.fd < 0) {
            break;
        }
        if (poll(&pfd, 1, (int)(left / 1000) + 1) > 0) {
            drive_socket(c, pfd.events, pfd.revents);
        }
    }
}

static gpointer io_thread(gpointer data)
{
    NbdfsConn *c = data;

    for (;;) {
        struct pollfd pfd[2] = {
            { .fd = -1 },
            { .fd = c->wake_fd, .events = POLLIN },
        };
        gint64 deadline = 0, now;
        /*
         * Idle, sleep at most --timeout: a command issued meanwhile has a
         * later deadline, so it needs no wake-up to be timed.
         */
        int timeout_ms = (int)c->m->timeout * 1000;

        if (g_atomic_int_get(&c->stop)) {
            disconnect(c, DISCONNECT_TIMEOUT_MS);
            break;
        }
        if (!g_atomic_int_get(&c->dead) && !handle_alive(c->nbd)) {
            /* Killed while a FUSE thread was sending on it. */
            note_death(c, "the connection failed");
        }
        if (g_atomic_int_get(&c->dead)) {
            nbdfs_conn_adopt_replacement(c);
        }
        if (!g_atomic_int_get(&c->dead)) {
            unsigned dir = nbd_aio_get_direction(c->nbd);
            pfd[0].fd = nbd_aio_get_fd(c->nbd);
            pfd[0].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                            ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
        }
        if (pfd[0].fd >= 0) {
            deadline = oldest_deadline(c);
        }
        if (deadline) {
            now = g_get_monotonic_time();
            if (now >= deadline) {
                g_warning("connection %u: the server has not answered a request in %u s; "
                          "dropping the connection", c->index, c->m->timeout);
                kill_handle(c, "request timed out");
                continue;
            }
            timeout_ms = (int)MIN((deadline - now + 999) / 1000, G_MAXINT);
        }
        if (poll(pfd, 2, timeout_ms) < 0) {
            if (errno != EINTR) {
                g_warning("connection %u: poll: %s", c->index, g_strerror(errno));
                g_usleep(G_USEC_PER_SEC / 10);
            }
            continue;
        }
        if (pfd[1].revents & POLLIN) {
            drain_wake(c);
        }
        if (pfd[0].fd >= 0 && pfd[0].revents) {
            drive_socket(c, pfd[0].events, pfd[0].revents);
        }
    }
    return NULL;
}

bool nbdfs_conn_start_thread(NbdfsConn *c, GError **error)
{
    g_autofree char *name = g_strdup_printf("nbdfs-io-%u", c->index);

    c->thread = g_thread_try_new(name, io_thread, c, error);
    return c->thread != NULL;
}

void nbdfs_conn_stop_thread(NbdfsConn *c, bool join)
{
    if (!c->thread) {
        return;
    }
    if (!join) {
        g_atomic_int_set(&c->stop, 1);
        nbdfs_conn_wake(c);
        return;
    }
    g_thread_join(c->thread);
    c->thread = NULL;
}

void nbdfs_conn_abort(NbdfsConn *c)
{
    int fd;

    /* The I/O thread sees the end of the stream at its next poll. */
    g_rw_lock_reader_lock(&c->handle_lock);
    fd = nbd_aio_get_fd(c->nbd);
    if (fd >= 0) {
        shutdown(fd, SHUT_RDWR);
    }
    g_rw_lock_reader_unlock(&c->handle_lock);
    nbdfs_conn_wake(c);
}
