/*
 * The control socket between a mount's daemon and `nbdfs umount`.
 *
 * `fusermount3 -u` returns as soon as the kernel has let go of the mount,
 * while the daemon still has writes to flush, bitmaps to save and an image
 * to unlock.  So `nbdfs umount` connects to the daemon first, unmounts, and
 * waits for the daemon to say it is done:
 *
 *   daemon -> client: "message TEXT\n"...  then "status N\n", then close
 *
 * sent once everything is released.  The socket lives in the abstract
 * namespace under the mount's device number ("nbdfs-mount/MAJ:MIN", as
 * /proc/self/mountinfo shows it), so no file is left behind and a stale name
 * cannot exist.  Only the daemon's user and root may connect (SO_PEERCRED),
 * and the client trusts only a daemon run by itself or root.
 */
#include "mount.h"
#include "nbdfs.h"

#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <gio/gio.h>

/* The address of DEVICE's ("MAJ:MIN") control socket; its length in *LEN. */
static struct sockaddr_un control_address(const char *device, socklen_t *len)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    int n = snprintf(sun.sun_path + 1, sizeof(sun.sun_path) - 1, "nbdfs-mount/%s", device);

    *len = offsetof(struct sockaddr_un, sun_path) + 1 + n;
    return sun;
}

/* May the peer of FD talk to us: the same user, or root? */
static bool peer_trusted(int fd)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);

    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        return false;
    }
    return cred.uid == 0 || cred.uid == getuid();
}

bool nbdfs_control_listen(NbdfsFs *fs, const char *device, GError **error)
{
    socklen_t len;
    struct sockaddr_un sun = control_address(device, &len);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);

    fs->control_waiters = g_array_new(FALSE, FALSE, sizeof(int));
    if (fd < 0 || bind(fd, (struct sockaddr *)&sun, len) < 0 || listen(fd, 8) < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno),
                    "control socket @%s: %s", sun.sun_path + 1, g_strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        return false;
    }
    fs->control_fd = fd;
    return true;
}

void nbdfs_control_accept(NbdfsFs *fs)
{
    int fd = accept4(fs->control_fd, NULL, NULL, SOCK_CLOEXEC);

    if (fd < 0) {
        return;
    }
    if (!peer_trusted(fd)) {
        g_warning("control socket: refused a client of another user");
        close(fd);
        return;
    }
    g_array_append_val(fs->control_waiters, fd);
}

void nbdfs_control_finish(NbdfsFs *fs, const char *messages, int status)
{
    g_autoptr(GString) out = g_string_new(NULL);
    g_auto(GStrv) lines = g_strsplit(messages, "\n", -1);

    if (fs->control_fd >= 0) {
        close(fs->control_fd);
        fs->control_fd = -1;
    }
    if (!fs->control_waiters) {
        return;
    }
    for (char **l = lines; *l; l++) {
        if (**l) {
            g_string_append_printf(out, "message %s\n", *l);
        }
    }
    g_string_append_printf(out, "status %d\n", status);
    for (guint i = 0; i < fs->control_waiters->len; i++) {
        int fd = g_array_index(fs->control_waiters, int, i);
        nbds_send_all(fd, out->str, out->len);
        close(fd);
    }
    g_clear_pointer(&fs->control_waiters, g_array_unref);
}

/* ---- the client: nbdfs umount ---- */

int nbdfs_control_connect(const char *device, GError **error)
{
    socklen_t len;
    struct sockaddr_un sun = control_address(device, &len);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

    if (fd < 0 || connect(fd, (struct sockaddr *)&sun, len) < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "%s",
                    g_strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    if (!peer_trusted(fd)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                    "its control socket belongs to another user");
        close(fd);
        return -1;
    }
    return fd;
}

int nbdfs_control_wait(int fd, unsigned timeout_s, GString *messages, GError **error)
{
    gint64 deadline = g_get_monotonic_time() + (gint64)timeout_s * G_USEC_PER_SEC;
    g_autoptr(GString) in = g_string_new(NULL);

    for (;;) {
        char buf[4096];
        char *nl;
        struct pollfd pfd = { .fd = fd, .events = POLLIN };
        gint64 left = deadline - g_get_monotonic_time();
        ssize_t n;

        while ((nl = strchr(in->str, '\n'))) {
            int status;
            *nl = '\0';
            if (g_str_has_prefix(in->str, "message ")) {
                g_string_append_printf(messages, "%s\n", in->str + strlen("message "));
            } else if (sscanf(in->str, "status %d", &status) == 1) {
                return status;
            }
            g_string_erase(in, 0, nl + 1 - in->str);
        }
        if (left <= 0) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT,
                        "the daemon has not finished within %u seconds", timeout_s);
            return -1;
        }
        if (poll(&pfd, 1, (int)MIN(left / 1000 + 1, G_MAXINT)) < 0 && errno != EINTR) {
            g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "poll: %s",
                        g_strerror(errno));
            return -1;
        }
        if (!pfd.revents) {
            continue;
        }
        n = recv(fd, buf, sizeof(buf), 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_CONNECTION_CLOSED,
                        "the daemon ended without saying how (killed?)");
            return -1;
        }
        g_string_append_len(in, buf, n);
    }
}
