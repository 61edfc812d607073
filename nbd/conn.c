/*
 * Connection lifecycle and socket I/O.  Every read during the handshake is
 * bounded by the handshake deadline; afterwards reads block until the client
 * sends or the server shuts the socket down.
 */
#include "internal.h"

#include <errno.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

NbdsConn *nbds_conn_new(NbdsServer *server, int fd)
{
    NbdsConn *c = g_new0(NbdsConn, 1);
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);

    c->server = server;
    c->fd = fd;
    c->mode = NBDS_MODE_SIMPLE;
    g_mutex_init(&c->send_lock);
    g_mutex_init(&c->lock);
    g_queue_init(&c->out_queue);
    g_cond_init(&c->cond);
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0 && ss.ss_family != AF_UNIX) {
        char host[64] = "?";
        if (ss.ss_family == AF_INET) {
            inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, sizeof(host));
            c->peer = g_strdup_printf("%s:%u", host, ntohs(((struct sockaddr_in *)&ss)->sin_port));
        } else if (ss.ss_family == AF_INET6) {
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host, sizeof(host));
            c->peer = g_strdup_printf("[%s]:%u", host,
                                      ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
        }
    }
    if (!c->peer) {
        c->peer = g_strdup_printf("fd %d", fd);
    }
    return c;
}

void nbds_conn_free(NbdsConn *c)
{
    if (!c) {
        return;
    }
    nbds_tls_end(c);
    if (c->fd >= 0) {
        close(c->fd);
    }
    nbds_meta_clear(c);
    if (c->export) {
        nbds_export_count_client(c->server, c->export, -1);
        nbds_export_unref(c->server, c->export);
    }
    g_free(c->peer);
    g_mutex_clear(&c->send_lock);
    g_mutex_clear(&c->lock);
    g_cond_clear(&c->cond);
    g_free(c);
}

/* Wait until FD is ready for EVENTS or the handshake deadline passes. */
static bool wait_ready(NbdsConn *c, short events)
{
    struct pollfd pfd = { .fd = c->fd, .events = events };
    int timeout_ms;
    int r;

    if (!c->deadline) {
        return true;
    }
    do {
        gint64 left = c->deadline - g_get_monotonic_time();
        if (left <= 0) {
            g_message("%s: handshake limit reached, dropping the client", c->peer);
            errno = ETIMEDOUT;
            return false;
        }
        timeout_ms = (int)MIN(left / 1000 + 1, G_MAXINT);
        r = poll(&pfd, 1, timeout_ms);
    } while (r == 0 || (r < 0 && errno == EINTR));
    return r > 0;
}

bool nbds_conn_read(NbdsConn *c, void *buf, size_t len)
{
    char *p = buf;

    while (len > 0) {
        ssize_t r;
        /* Bytes GnuTLS has decrypted already do not show on the socket. */
        if (!(c->tls && nbds_tls_pending(c)) && !wait_ready(c, POLLIN)) {
            return false;
        }
        r = c->tls ? nbds_tls_recv(c, p, len) : recv(c->fd, p, len, 0);
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                continue;
            }
            g_debug("%s: recv: %s", c->peer, g_strerror(errno));
            return false;
        }
        if (r == 0) {
            return false;
        }
        p += r;
        len -= r;
    }
    return true;
}

void nbds_iov_advance(struct iovec **iovp, int *iovcntp, size_t n)
{
    struct iovec *iov = *iovp;
    int iovcnt = *iovcntp;

    while (iovcnt > 0 && n >= iov->iov_len) {
        n -= iov->iov_len;
        iov++;
        iovcnt--;
    }
    if (iovcnt > 0) {
        iov->iov_base = (char *)iov->iov_base + n;
        iov->iov_len -= n;
    }
    *iovp = iov;
    *iovcntp = iovcnt;
}

bool nbds_conn_writev(NbdsConn *c, struct iovec *iov, int iovcnt)
{
    while (iovcnt > 0) {
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = MIN(iovcnt, IOV_MAX) };
        ssize_t r;

        if (iov->iov_len == 0) {
            iov++;
            iovcnt--;
            continue;
        }
        if (!wait_ready(c, POLLOUT)) {
            return false;
        }
        r = c->tls ? nbds_tls_send(c, iov->iov_base, iov->iov_len)
                   : sendmsg(c->fd, &msg, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                continue;
            }
            g_debug("%s: send: %s", c->peer, g_strerror(errno));
            return false;
        }
        nbds_iov_advance(&iov, &iovcnt, r);
    }
    return true;
}

bool nbds_conn_write(NbdsConn *c, const void *buf, size_t len)
{
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    return nbds_conn_writev(c, &iov, 1);
}

bool nbds_conn_skip(NbdsConn *c, uint64_t len)
{
    char buf[16384];

    while (len > 0) {
        size_t n = MIN(len, sizeof(buf));
        if (!nbds_conn_read(c, buf, n)) {
            return false;
        }
        len -= n;
    }
    return true;
}
