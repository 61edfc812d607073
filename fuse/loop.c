/*
 * The mount's lifetime: the FUSE threads that read and dispatch requests,
 * the main thread's wait for the end, and the orderly stop.
 *
 * FUSE threads: each has its own epoll on the FUSE device (shared by all,
 * each woken exclusively) and on the stop eventfd.  A request is read and
 * dispatched in the thread: data requests issue their NBD commands and
 * return (the reply comes from an I/O thread); the others wait for their
 * answer on a condition variable (see the thread model in mount.h).
 *
 * The end: the kernel reports the unmount on the FUSE device at once (a
 * FUSE thread then wakes the main thread), or a stop signal arrives.  The
 * orderly stop then:
 *   1. if still mounted (a signal), writes back dirty pages while the FUSE
 *      threads still serve (syncfs);
 *   2. stops reading requests (the FUSE threads finish the one they serve);
 *   3. waits until every request in flight is answered: the I/O threads
 *      answer or fail each by its deadline, and past it the connections
 *      are cut, which fails the rest at once;
 *   4. sends FLUSH if anything was written since the last one;
 *   5. disconnects every connection at once (NBD_CMD_DISC, bounded).
 * The caller then unmounts and destroys the FUSE session: nothing can reply
 * to it any more.
 */
#include "mount.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <gio/gio.h>

/* FUSE threads: requests that wait (lseek, st_blocks, O_DSYNC...) each hold one. */
#define FUSE_THREADS 4
/* FUSE requests a thread serves per wake-up, when that many are waiting. */
#define REQUESTS_PER_WAKEUP 16
/* After the request timeout, how long the cut connections get to fail the rest. */
#define ABORT_GRACE_S 5

enum { SOURCE_FUSE, SOURCE_STOP };

typedef struct {
    NbdfsFs *fs;
    GThread *thread;
    int epfd;
    struct fuse_buf fbuf;
} FuseThread;

static _Thread_local FuseThread *current;

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

static void signal_fd(int fd)
{
    uint64_t one = 1;

    if (write(fd, &one, sizeof(one)) < 0 && errno != EAGAIN) {
        g_warning("eventfd: %s", g_strerror(errno));
    }
}

/* Read and dispatch one FUSE request: 1, 0 if none was waiting, -1 at the end. */
static int serve_request(FuseThread *t)
{
    struct fuse_session *se = t->fs->session;
    int r = fuse_session_receive_buf(se, &t->fbuf);

    if (r == -EAGAIN || r == -EINTR) {
        return 0;                  /* another thread took it */
    }
    if (r <= 0) {
        /* Unmounted (ENODEV), or the device failed: the end. */
        if (r < 0 && r != -ENODEV) {
            g_warning("reading the FUSE device: %s", g_strerror(-r));
        }
        fuse_session_exit(se);
        return -1;
    }
    fuse_session_process_buf(se, &t->fbuf);
    return 1;
}

/* Serve the requests waiting, a few at most; false once the session is over. */
static bool serve_requests(FuseThread *t)
{
    for (int i = 0; i < REQUESTS_PER_WAKEUP; i++) {
        int r = serve_request(t);
        if (r <= 0) {
            return r == 0;
        }
    }
    return true;
}

static gpointer fuse_thread(gpointer data)
{
    FuseThread *t = data;
    int fuse_fd = fuse_session_fd(t->fs->session);
    bool serving = true;

    current = t;
    for (;;) {
        struct epoll_event events[2];
        int n = epoll_wait(t->epfd, events, G_N_ELEMENTS(events), -1);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            g_warning("epoll_wait: %s", g_strerror(errno));
            break;
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.u32 == SOURCE_STOP) {
                goto out;
            }
            if (serving && !serve_requests(t)) {
                /* Tell the main thread; stop watching a device that stays readable. */
                serving = false;
                epoll_ctl(t->epfd, EPOLL_CTL_DEL, fuse_fd, NULL);
                signal_fd(t->fs->ended_fd);
            }
        }
    }
out:
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

/* Wait for the end: true if a signal asked for it (the mount is still there). */
static bool wait_for_end(NbdfsFs *fs, int sfd)
{
    for (;;) {
        struct pollfd pfd[3] = {
            { .fd = sfd, .events = POLLIN },
            { .fd = fs->ended_fd, .events = POLLIN },
            { .fd = fs->control_fd, .events = POLLIN },
        };
        if (poll(pfd, 3, -1) < 0) {
            if (errno != EINTR) {
                g_warning("poll: %s", g_strerror(errno));
                return true;
            }
            continue;
        }
        if (pfd[2].revents & POLLIN) {
            nbdfs_control_accept(fs);
        }
        if (pfd[1].revents & POLLIN) {
            g_debug("unmounted");
            return false;
        }
        if (pfd[0].revents & POLLIN) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof(si)) == sizeof(si)) {
                g_message("signal %s: unmounting", g_strsignal(si.ssi_signo));
            }
            return true;
        }
    }
}

/* Write back the page cache of the mount while the FUSE threads still serve. */
static void sync_mount(NbdfsFs *fs)
{
    int fd = open(fs->mountpoint, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

    if (fd < 0 || syncfs(fd) < 0) {
        g_warning("%s: writing back cached data: %s", fs->mountpoint, g_strerror(errno));
    }
    if (fd >= 0) {
        close(fd);
    }
}

/* Wait until no request is in flight, or DEADLINE (monotonic us); true if none is. */
static bool wait_requests(NbdfsMount *m, gint64 deadline)
{
    bool idle;

    g_mutex_lock(&m->ios_lock);
    while (m->ios_alive > 0 && g_cond_wait_until(&m->ios_cond, &m->ios_lock, deadline)) {
    }
    idle = m->ios_alive == 0;
    g_mutex_unlock(&m->ios_lock);
    return idle;
}

/* Steps 3 and 4 of the orderly stop, for one export. */
static bool finish_requests(NbdfsMount *m, GError **error)
{
    gint64 deadline = g_get_monotonic_time() + ((gint64)m->timeout + 1) * G_USEC_PER_SEC;

    if (!wait_requests(m, deadline)) {
        g_warning("%s%srequests still in flight after %u s: cutting the connections",
                  m->dir_name ? m->dir_name : "", m->dir_name ? ": " : "", m->timeout + 1);
        for (unsigned i = 0; i < m->n_conns; i++) {
            nbdfs_conn_abort(m->conns[i]);
        }
        if (!wait_requests(m, g_get_monotonic_time() + ABORT_GRACE_S * G_USEC_PER_SEC)) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT,
                        "%s%srequests still in flight after the connections were cut",
                        m->dir_name ? m->dir_name : "", m->dir_name ? ": " : "");
            return false;
        }
    }
    if (!m->read_only && m->can_flush && nbdfs_files_need_flush(m)) {
        NbdfsIo *io = nbdfs_io_new(m, NULL, NBDFS_REPLY_NONE, 0, false);
        int err;
        nbdfs_io_flush(io, NULL);
        err = nbdfs_io_run(io);    /* a failure is recorded for the exit status */
        g_debug("final FLUSH: %s", err ? g_strerror(err) : "done");
    }
    return true;
}

int nbdfs_loop_run(NbdfsFs *fs, const sigset_t *stop_signals, GError **error)
{
    int fuse_fd = fuse_session_fd(fs->session);
    FuseThread threads[FUSE_THREADS] = { { 0 } };
    int sfd = signalfd(-1, stop_signals, SFD_CLOEXEC);
    int stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    bool signalled = false;
    int status = 0;

    if (sfd < 0 || stop_fd < 0) {
        g_set_error(error, G_FILE_ERROR, g_file_error_from_errno(errno), "signalfd: %s",
                    g_strerror(errno));
        status = -1;
        goto out;
    }
    /* Each thread reads requests without blocking; its epoll does the waiting. */
    fcntl(fuse_fd, F_SETFL, fcntl(fuse_fd, F_GETFL) | O_NONBLOCK);
    for (unsigned i = 0; i < FUSE_THREADS; i++) {
        threads[i].epfd = -1;
    }
    for (unsigned i = 0; i < FUSE_THREADS && status == 0; i++) {
        FuseThread *t = &threads[i];
        t->fs = fs;
        t->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (t->epfd < 0 ||
            !add_source(t->epfd, fuse_fd, EPOLLIN | EPOLLEXCLUSIVE, SOURCE_FUSE, error) ||
            !add_source(t->epfd, stop_fd, EPOLLIN, SOURCE_STOP, error)) {
            status = -1;
        } else if (!(t->thread = g_thread_try_new("nbdfs-fuse", fuse_thread, t, error))) {
            status = -1;
        }
    }

    if (status == 0) {
        signalled = wait_for_end(fs, sfd);
        if (signalled) {
            sync_mount(fs);                                  /* 1 */
        }
    }
    nbdfs_fs_stop_opening(fs);
    signal_fd(stop_fd);                                      /* 2 */
    for (unsigned i = 0; i < FUSE_THREADS; i++) {
        if (threads[i].thread) {
            g_thread_join(threads[i].thread);
        }
        if (threads[i].epfd >= 0) {
            close(threads[i].epfd);
        }
        free(threads[i].fbuf.mem);
    }
    for (guint i = 0; i < fs->exports->len; i++) {
        NbdfsMount *m = g_ptr_array_index(fs->exports, i);
        if (nbdfs_fs_export_is_open(m) &&
            !finish_requests(m, status == 0 ? error : NULL)) {   /* 3, 4 */
            status = -1;
        }
    }
    for (guint i = 0; i < fs->exports->len; i++) {
        nbdfs_fs_close_export(g_ptr_array_index(fs->exports, i));   /* 5 */
    }
out:
    if (sfd >= 0) {
        close(sfd);
    }
    if (stop_fd >= 0) {
        close(stop_fd);
    }
    return status;
}
