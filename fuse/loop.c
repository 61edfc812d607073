/*
 * The mount's worker threads.  Each owns one NBD connection and serves FUSE
 * requests: its epoll waits on the FUSE device (shared by all threads, each
 * woken exclusively), on its connection's socket and on an eventfd.  A FUSE
 * request is read and dispatched in the thread; its NBD commands go out on
 * the thread's own connection, and their replies come back to the same
 * thread, which answers FUSE from the completion callback.  So no request
 * crosses threads, nobody waits for a lock held across a poll, and a small
 * read costs one wake-up for the request and one for its reply.
 *
 * An operation that must wait (block status for lseek, a write that overlaps
 * one in flight) runs a nested loop on its own connection only; FUSE
 * requests meanwhile go to the other threads.
 */
#include "mount.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <unistd.h>

/*
 * FUSE requests read per wake-up.  One: the epoll is level-triggered, so a
 * busy device wakes us again at once, and an idle one costs no read that
 * finds nothing.
 */
#define REQUESTS_PER_WAKEUP 1
/* A nested wait re-checks its condition at least this often (ms). */
#define WAIT_RECHECK_MS 100

enum { SOURCE_FUSE, SOURCE_NBD, SOURCE_WAKE };

typedef struct {
    NbdfsMount *m;
    NbdfsConn *conn;
    GThread *thread;
    int epfd;
    int nbd_fd;                    /* registered socket, -1 when none */
    uint32_t nbd_events;
    unsigned socket_turns;         /* times a nested wait drove the socket */
    struct fuse_buf fbuf;
} LoopThread;

static _Thread_local LoopThread *current;

void *nbdfs_loop_take_request_buffer(const void *data)
{
    struct fuse_buf *b = current ? &current->fbuf : NULL;
    void *mem;

    if (!b || !b->mem || (const char *)data < (const char *)b->mem ||
        (const char *)data >= (const char *)b->mem + b->size) {
        return NULL;
    }
    /* libfuse allocates a fresh buffer for the next request. */
    mem = b->mem;
    b->mem = NULL;
    return mem;
}

bool nbdfs_loop_owns(NbdfsConn *c)
{
    return current && current->conn == c;
}

NbdfsConn *nbdfs_loop_conn(NbdfsMount *m)
{
    if (current) {
        return current->conn;
    }
    /* Outside the workers (setup, teardown): any connection will do. */
    return m->conns[(guint)g_atomic_int_add(&m->next_conn, 1) % m->n_conns];
}

void nbdfs_conn_wake(NbdfsConn *c)
{
    uint64_t one = 1;
    ssize_t r = write(c->wake_fd, &one, sizeof(one));

    (void)r;                       /* a full counter means a wake-up is pending anyway */
}

void nbdfs_loop_wake_all(NbdfsMount *m)
{
    for (unsigned i = 0; i < m->n_conns; i++) {
        nbdfs_conn_wake(m->conns[i]);
    }
}

/* libnbd's direction for C's socket, as poll events. */
static short wanted_events(NbdfsConn *c)
{
    unsigned dir = nbd_aio_get_direction(c->nbd);

    return ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
           ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
}

/* The connection failed: say so once (the reconnect thread takes it from there). */
static void note_death(NbdfsConn *c)
{
    if (!g_atomic_int_get(&c->dead)) {
        const char *msg = nbd_get_error();
        g_atomic_int_set(&c->dead, 1);
        g_warning("connection %u to the server lost%s%s", c->index, msg ? ": " : "",
                  msg ? msg : "");
    }
}

static bool conn_alive(NbdfsConn *c)
{
    return !nbd_aio_is_dead(c->nbd) && !nbd_aio_is_closed(c->nbd);
}

/*
 * Let libnbd act on socket events REVENTS.  On a failure the connection is
 * dead: libnbd has failed its commands in flight and fails later ones at once.
 */
static void drive_socket(NbdfsConn *c, short wanted, short revents)
{
    int r = 0;

    if ((revents & (POLLIN | POLLHUP | POLLERR)) && (wanted & POLLIN)) {
        r = nbd_aio_notify_read(c->nbd);
    } else if (revents & (POLLOUT | POLLHUP | POLLERR)) {
        r = nbd_aio_notify_write(c->nbd);
    }
    if (r == -1) {
        note_death(c);
    }
}

static void drain_wake(NbdfsConn *c)
{
    uint64_t n;
    ssize_t r = read(c->wake_fd, &n, sizeof(n));

    (void)r;
}

void nbdfs_loop_wait(NbdfsMount *m, bool (*done)(gpointer), gpointer data)
{
    NbdfsConn *c = current ? current->conn : NULL;

    while (!done(data)) {
        struct pollfd pfd[2] = {
            { .fd = -1 },
            { .fd = c ? c->wake_fd : -1, .events = POLLIN },
        };
        short wanted = 0;

        if (c && !g_atomic_int_get(&c->dead) && conn_alive(c)) {
            wanted = wanted_events(c);
            pfd[0].fd = nbd_aio_get_fd(c->nbd);
            pfd[0].events = wanted;
        }
        if (poll(pfd, 2, WAIT_RECHECK_MS) < 0 && errno != EINTR) {
            g_warning("poll: %s", g_strerror(errno));
        }
        if (pfd[1].revents & POLLIN) {
            drain_wake(c);
        }
        if (pfd[0].fd >= 0 && pfd[0].revents) {
            drive_socket(c, wanted, pfd[0].revents);
            current->socket_turns++;
        }
    }
    (void)m;
}

/* Keep the epoll registration of the socket in step with libnbd's direction. */
static void update_socket(LoopThread *t)
{
    int fd;

    if (!conn_alive(t->conn)) {
        note_death(t->conn);
        /* Its socket is gone (unregistered below): a new handle may be waiting. */
        if (t->nbd_fd < 0) {
            nbdfs_conn_adopt_replacement(t->m, t->conn);
        }
    }
    fd = conn_alive(t->conn) ? nbd_aio_get_fd(t->conn->nbd) : -1;
    uint32_t events = fd >= 0 ? (uint32_t)wanted_events(t->conn) : 0;
    struct epoll_event ev = { .events = events, .data.u32 = SOURCE_NBD };

    if (fd != t->nbd_fd) {
        if (t->nbd_fd >= 0) {
            epoll_ctl(t->epfd, EPOLL_CTL_DEL, t->nbd_fd, NULL);
        }
        if (fd >= 0) {
            epoll_ctl(t->epfd, EPOLL_CTL_ADD, fd, &ev);
        }
        t->nbd_fd = fd;
        t->nbd_events = events;
    } else if (fd >= 0 && events != t->nbd_events) {
        epoll_ctl(t->epfd, EPOLL_CTL_MOD, fd, &ev);
        t->nbd_events = events;
    }
}

/* Read and dispatch the FUSE requests waiting (a few at most). */
static void serve_requests(LoopThread *t)
{
    struct fuse_session *se = t->m->session;

    for (int i = 0; i < REQUESTS_PER_WAKEUP && !fuse_session_exited(se); i++) {
        int r = fuse_session_receive_buf(se, &t->fbuf);
        if (r == -EAGAIN) {
            return;                /* another thread took it */
        }
        if (r == -EINTR) {
            continue;
        }
        if (r <= 0) {
            /* Unmounted (libfuse marked the session exited), or a device error. */
            fuse_session_exit(se);
            return;
        }
        fuse_session_process_buf(se, &t->fbuf);
    }
}

static gpointer loop_thread(gpointer data)
{
    LoopThread *t = data;
    struct fuse_session *se = t->m->session;
    struct epoll_event events[8];

    current = t;
    while (!fuse_session_exited(se)) {
        unsigned turns;
        int n;
        update_socket(t);
        n = epoll_wait(t->epfd, events, G_N_ELEMENTS(events), -1);
        if (n < 0) {
            if (errno != EINTR) {
                g_warning("epoll_wait: %s", g_strerror(errno));
                fuse_session_exit(se);
            }
            continue;
        }
        turns = t->socket_turns;
        for (int i = 0; i < n; i++) {
            switch (events[i].data.u32) {
            case SOURCE_NBD:
                /*
                 * Only if no nested wait drove the socket since epoll_wait: its
                 * data may be gone, and libnbd told "readable" on an empty
                 * socket waits there for a reply while it queues new requests
                 * unsent.  The next epoll_wait reports it again if need be.
                 */
                if (t->socket_turns == turns) {
                    drive_socket(t->conn, (short)t->nbd_events, (short)events[i].events);
                }
                break;
            case SOURCE_WAKE:
                drain_wake(t->conn);
                break;
            case SOURCE_FUSE:
                serve_requests(t);
                break;
            }
        }
    }
    /* The session is over: make sure every other thread notices. */
    nbdfs_loop_wake_all(t->m);
    current = NULL;
    return NULL;
}

static bool add_source(int epfd, int fd, uint32_t events, uint32_t source, GError **error)
{
    struct epoll_event ev = { .events = events, .data.u32 = source };

    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno), "epoll_ctl: %s",
                    g_strerror(errno));
        return false;
    }
    return true;
}

int nbdfs_loop_run(NbdfsMount *m, const sigset_t *stop_signals, GError **error)
{
    int fuse_fd = fuse_session_fd(m->session);
    g_autofree LoopThread *threads = g_new0(LoopThread, m->n_conns);
    int sfd = signalfd(-1, stop_signals, SFD_CLOEXEC);
    int status = 0;

    if (sfd < 0) {
        g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno), "signalfd: %s",
                    g_strerror(errno));
        return -1;
    }
    /* Each thread reads requests without blocking; its epoll does the waiting. */
    fcntl(fuse_fd, F_SETFL, fcntl(fuse_fd, F_GETFL) | O_NONBLOCK);
    for (unsigned i = 0; i < m->n_conns; i++) {
        threads[i].epfd = -1;
    }
    for (unsigned i = 0; i < m->n_conns; i++) {
        LoopThread *t = &threads[i];
        t->m = m;
        t->conn = m->conns[i];
        t->nbd_fd = -1;
        t->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (t->epfd < 0 ||
            !add_source(t->epfd, fuse_fd, EPOLLIN | EPOLLEXCLUSIVE, SOURCE_FUSE, error) ||
            !add_source(t->epfd, t->conn->wake_fd, EPOLLIN, SOURCE_WAKE, error)) {
            status = -1;
            break;
        }
    }
    for (unsigned i = 0; status == 0 && i < m->n_conns; i++) {
        threads[i].thread = g_thread_new("nbdfs-worker", loop_thread, &threads[i]);
    }

    /* The main thread waits for a stop signal, or for the workers to end. */
    while (status == 0 && !fuse_session_exited(m->session)) {
        struct pollfd pfd = { .fd = sfd, .events = POLLIN };
        if (poll(&pfd, 1, 200) > 0) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof(si)) == sizeof(si)) {
                g_debug("signal %u: unmounting", si.ssi_signo);
                fuse_session_exit(m->session);
            }
        }
    }
    fuse_session_exit(m->session);
    nbdfs_loop_wake_all(m);
    for (unsigned i = 0; i < m->n_conns; i++) {
        LoopThread *t = &threads[i];
        if (t->thread) {
            g_thread_join(t->thread);
        }
        if (t->epfd >= 0) {
            close(t->epfd);
        }
        free(t->fbuf.mem);
    }
    close(sfd);
    return status;
}
