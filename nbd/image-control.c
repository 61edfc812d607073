/*
 * The control socket of a served image: how `nbdfs bitmap` and `nbdfs
 * backup` reach the server that holds an image (whose lock keeps them from
 * opening it themselves), found from the image's path alone.
 *
 * The socket is IMAGE.control, beside the image: bound through the
 * directory opened once (no path lookup can redirect it), born owner-only,
 * removed at shutdown.  A client must run as the server's user or as root
 * (SO_PEERCRED); the client checks the server the same way.
 *
 * One request per connection, a line of words, each percent-encoded:
 *   bitmap add NAME GRANULARITY | bitmap remove|clear|enable|disable NAME |
 *   bitmap list |
 *   backup begin VIEW BITMAP SCRATCH-DIR | backup end|abort VIEW | backup list
 * (an empty word: the default).  The answer: lines "info WORD..." then
 * "ok", or "error MESSAGE".
 *
 * Commands run in the control thread, one at a time.  A bitmap edit runs
 * with the export's write gate held exclusively, so every write is wholly
 * before or wholly after it, for every bitmap; the sidecar is rewritten
 * before the answer.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gio/gio.h>

#define CONTROL_SUFFIX ".control"
#define MAX_LINE (64u << 10)
/* How long a client may take to send its request, and a server to answer. */
#define REQUEST_TIMEOUT_S 5
#define ANSWER_TIMEOUT_S 120

typedef struct {
    NbdsExport *exp;
    int fd;                        /* listening */
    int dirfd;                     /* the image's directory (O_PATH) */
    char *name;                    /* the socket's name in it */
} ControlSocket;

struct NbdsImageControl {
    GPtrArray *sockets;            /* ControlSocket * */
    int wake_fd;                   /* eventfd: stop */
    GThread *thread;
};

/* "/proc/self/fd/DIRFD/NAME": a path to NAME in DIRFD short enough for sun_path. */
static bool socket_address(int dirfd, const char *name, struct sockaddr_un *sun,
                           GError **error)
{
    int n;

    memset(sun, 0, sizeof(*sun));
    sun->sun_family = AF_UNIX;
    n = snprintf(sun->sun_path, sizeof(sun->sun_path), "/proc/self/fd/%d/%s", dirfd, name);
    if (n < 0 || (size_t)n >= sizeof(sun->sun_path)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_FILENAME_TOO_LONG,
                    "%s: name too long for a control socket", name);
        return false;
    }
    return true;
}

/* The directory of IMAGE (O_PATH) and the control socket's name in it. */
static int control_location(const char *image, char **name, GError **error)
{
    g_autofree char *canonical = realpath(image, NULL);
    g_autofree char *dir = NULL;
    g_autofree char *base = NULL;
    int dirfd;

    if (!canonical) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "%s", g_strerror(errno));
        return -1;
    }
    dir = g_path_get_dirname(canonical);
    base = g_path_get_basename(canonical);
    dirfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "%s: %s", dir,
                    g_strerror(errno));
        return -1;
    }
    *name = g_strconcat(base, CONTROL_SUFFIX, NULL);
    return dirfd;
}

static bool peer_trusted(int fd, uid_t also)
{
    struct ucred cred;
    socklen_t len = sizeof(cred);

    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
        return false;
    }
    return cred.uid == 0 || cred.uid == geteuid() || cred.uid == also;
}

/* ---- the wire: percent-encoded words, one line ---- */

static char *encode_line(const char *const *words)
{
    GString *line = g_string_new(NULL);

    for (const char *const *w = words; *w; w++) {
        g_autofree char *escaped = g_uri_escape_string(*w, NULL, FALSE);
        g_string_append_printf(line, "%s%s", line->len ? " " : "", escaped);
    }
    g_string_append_c(line, '\n');
    return g_string_free(line, FALSE);
}

/* The words of LINE (without its newline); NULL if one is badly encoded. */
static char **decode_line(const char *line)
{
    g_auto(GStrv) raw = g_strsplit(line, " ", -1);
    g_autoptr(GPtrArray) words = g_ptr_array_new_with_free_func(g_free);

    for (char **r = raw; *r; r++) {
        char *w = g_uri_unescape_string(*r, NULL);
        if (!w) {
            return NULL;
        }
        g_ptr_array_add(words, w);
    }
    g_ptr_array_add(words, NULL);
    return (char **)g_ptr_array_free(g_steal_pointer(&words), FALSE);
}

/* Read one line (at most MAX_LINE bytes) from FD; NULL at EOF, on error or timeout. */
static char *read_line(int fd, GString *buffer)
{
    char chunk[4096];

    for (;;) {
        char *nl = memchr(buffer->str, '\n', buffer->len);
        ssize_t n;
        if (nl) {
            char *line = g_strndup(buffer->str, nl - buffer->str);
            g_string_erase(buffer, 0, nl - buffer->str + 1);
            return line;
        }
        if (buffer->len >= MAX_LINE) {
            return NULL;
        }
        n = recv(fd, chunk, sizeof(chunk), 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return NULL;
        }
        g_string_append_len(buffer, chunk, n);
    }
}

void nbds_send_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return;
        }
        buf += n;
        len -= n;
    }
}

void nbds_control_info(GString *out, const char *first, ...)
{
    g_autoptr(GPtrArray) words = g_ptr_array_new();
    g_autofree char *line = NULL;
    va_list ap;

    g_ptr_array_add(words, "info");
    va_start(ap, first);
    for (const char *w = first; w; w = va_arg(ap, const char *)) {
        g_ptr_array_add(words, (gpointer)w);
    }
    va_end(ap);
    g_ptr_array_add(words, NULL);
    line = encode_line((const char *const *)words->pdata);
    g_string_append(out, line);
}

/* ---- the server's commands ---- */

/* "info bitmap NAME GRANULARITY ENABLED CONSISTENT DIRTY-BYTES" per bitmap. */
static void bitmap_list(NbdsExport *exp, GString *out)
{
    const char *reason = nbds_bitmaps_inconsistent_reason(exp->bitmaps);

    for (guint i = 0; i < nbds_bitmaps_count(exp->bitmaps); i++) {
        NbdsBitmapInfo info;
        char granularity[16], dirty[24];
        nbds_bitmap_info(exp->bitmaps, nbds_bitmaps_get(exp->bitmaps, i), &info);
        g_snprintf(granularity, sizeof(granularity), "%u", info.granularity);
        g_snprintf(dirty, sizeof(dirty), "%" G_GUINT64_FORMAT, info.dirty_bytes);
        nbds_control_info(out, "bitmap", info.name, granularity, info.enabled ? "yes" : "no",
                          info.consistent ? "yes" : "no", dirty, NULL);
    }
    if (reason) {
        nbds_control_info(out, "inconsistent", reason, NULL);
    }
}

static bool bitmap_command(NbdsExport *exp, char **argv, GString *out, GError **error)
{
    NbdsBitmapEdit edit;
    guint64 granularity = NBDS_BITMAP_DEFAULT_GRANULARITY;
    NbdsBitmap *bm;
    bool ok = false;

    if (argv[0] && strcmp(argv[0], "list") == 0 && !argv[1]) {
        bitmap_list(exp, out);
        return true;
    }
    if (!argv[0] || !nbds_bitmap_edit_parse(argv[0], &edit) || !argv[1] ||
        (edit == NBDS_BITMAP_ADD ? !argv[2] || argv[3] ||
                                       !g_ascii_string_to_unsigned(argv[2], 10, 0, G_MAXUINT32,
                                                                   &granularity, NULL)
                                 : argv[2] != NULL)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT, "bad bitmap request");
        return false;
    }
    if (exp->read_only) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_READ_ONLY,
                    "the image is served read-only: its bitmaps cannot change");
        return false;
    }
    /* No write runs meanwhile: each is wholly before or after the edit. */
    pthread_rwlock_wrlock(&exp->gate);
    if (exp->untracked_writer && (edit == NBDS_BITMAP_ADD || edit == NBDS_BITMAP_ENABLE)) {
        /* A bitmap must never miss a change: none may track writes it cannot see. */
        pthread_rwlock_unlock(&exp->gate);
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_BUSY, "%s", exp->untracked_writer);
        return false;
    }
    bm = nbds_bitmaps_edit_in_use(exp->bitmaps, edit, argv[1], (uint32_t)granularity, &ok,
                                  error);
    if (bm && edit == NBDS_BITMAP_ADD) {
        nbds_meta_add_bitmap(exp, bm);            /* for clients that negotiate next */
    } else if (bm && edit == NBDS_BITMAP_REMOVE) {
        nbds_meta_remove_bitmap(exp, bm);
    }
    pthread_rwlock_unlock(&exp->gate);
    if (bm) {
        g_message("%s: bitmap %s '%s'%s", nbds_image_path(exp->image),
                  nbds_bitmap_edit_name(edit), argv[1], ok ? "" : " (not saved yet)");
    }
    if (bm && !ok) {
        g_prefix_error(error, "done, but not saved yet (it is at shutdown): ");
    }
    return ok;
}

static bool run_command(NbdsServer *s, NbdsExport *exp, char **argv, GString *out,
                        GError **error)
{
    if (argv[0] && strcmp(argv[0], "bitmap") == 0) {
        return bitmap_command(exp, argv + 1, out, error);
    }
    if (argv[0] && strcmp(argv[0], "backup") == 0) {
        return nbds_backup_command(s, exp, argv + 1, out, error);
    }
    g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT, "unknown request '%s'",
                argv[0] ? argv[0] : "");
    return false;
}

static void serve_client(NbdsServer *s, ControlSocket *cs, int fd)
{
    struct timeval tv = { .tv_sec = REQUEST_TIMEOUT_S };
    g_autoptr(GString) buffer = g_string_new(NULL);
    g_autoptr(GString) out = g_string_new(NULL);
    g_autoptr(GError) error = NULL;
    g_autofree char *line = NULL;
    g_auto(GStrv) argv = NULL;

    if (!peer_trusted(fd, geteuid())) {
        g_warning("%s: control socket: refused a client of another user", cs->name);
        return;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    line = read_line(fd, buffer);
    argv = line ? decode_line(line) : NULL;
    if (!argv) {
        return;
    }
    if (run_command(s, cs->exp, argv, out, &error)) {
        g_string_append(out, "ok\n");
    } else {
        const char *words[] = { "error", error->message, NULL };
        g_autofree char *reply = encode_line(words);
        g_string_append(out, reply);
    }
    nbds_send_all(fd, out->str, out->len);
}

static gpointer control_thread(gpointer data)
{
    NbdsServer *s = data;
    NbdsImageControl *ctl = s->control;

    for (;;) {
        g_autofree struct pollfd *pfd = g_new0(struct pollfd, ctl->sockets->len + 1);
        pfd[0] = (struct pollfd){ .fd = ctl->wake_fd, .events = POLLIN };
        for (guint i = 0; i < ctl->sockets->len; i++) {
            ControlSocket *cs = g_ptr_array_index(ctl->sockets, i);
            pfd[i + 1] = (struct pollfd){ .fd = cs->fd, .events = POLLIN };
        }
        if (poll(pfd, ctl->sockets->len + 1, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            g_warning("control sockets: poll: %s", g_strerror(errno));
            return NULL;
        }
        if (pfd[0].revents) {
            return NULL;
        }
        for (guint i = 0; i < ctl->sockets->len; i++) {
            ControlSocket *cs = g_ptr_array_index(ctl->sockets, i);
            int fd;
            if (!(pfd[i + 1].revents & POLLIN)) {
                continue;
            }
            fd = accept4(cs->fd, NULL, NULL, SOCK_CLOEXEC);
            if (fd >= 0) {
                serve_client(s, cs, fd);
                close(fd);
            }
        }
    }
}

static void control_socket_free(ControlSocket *cs)
{
    struct sockaddr_un sun;

    if (cs->fd >= 0) {
        close(cs->fd);
        if (socket_address(cs->dirfd, cs->name, &sun, NULL)) {
            unlink(sun.sun_path);
        }
    }
    if (cs->dirfd >= 0) {
        close(cs->dirfd);
    }
    g_free(cs->name);
    g_free(cs);
}

bool nbds_image_control_add(NbdsServer *s, NbdsExport *exp, GError **error)
{
    ControlSocket *cs = g_new0(ControlSocket, 1);
    struct sockaddr_un sun;

    cs->exp = exp;
    cs->fd = -1;
    cs->dirfd = control_location(nbds_image_path(exp->image), &cs->name, error);
    if (cs->dirfd < 0 || !socket_address(cs->dirfd, cs->name, &sun, error) ||
        (cs->fd = nbds_listen_unix_path(sun.sun_path, 0600, error)) < 0) {
        g_prefix_error(error, "control socket of %s: ", nbds_image_path(exp->image));
        control_socket_free(cs);
        return false;
    }
    if (!s->control) {
        s->control = g_new0(NbdsImageControl, 1);
        s->control->sockets = g_ptr_array_new_with_free_func(
            (GDestroyNotify)control_socket_free);
        s->control->wake_fd = eventfd(0, EFD_CLOEXEC);
    }
    g_ptr_array_add(s->control->sockets, cs);
    return true;
}

bool nbds_server_start_control(NbdsServer *s, GError **error)
{
    if (!s->control || s->control->thread) {
        return true;
    }
    s->control->thread = g_thread_try_new("nbds-control", control_thread, s, error);
    return s->control->thread != NULL;
}

void nbds_image_control_stop(NbdsServer *s)
{
    NbdsImageControl *ctl = s->control;
    uint64_t one = 1;

    if (!ctl) {
        return;
    }
    if (ctl->thread) {
        if (write(ctl->wake_fd, &one, sizeof(one)) < 0) {
            g_warning("control thread: %s", g_strerror(errno));
        }
        g_thread_join(ctl->thread);
    }
    g_ptr_array_unref(ctl->sockets);
    close(ctl->wake_fd);
    g_free(ctl);
    s->control = NULL;
}

/* ---- the client ---- */

bool nbds_image_control_call(const char *image, const char *const *argv, GPtrArray *info,
                             GError **error)
{
    g_autofree char *name = NULL;
    g_autofree char *request = encode_line(argv);
    g_autoptr(GString) buffer = g_string_new(NULL);
    struct timeval tv = { .tv_sec = ANSWER_TIMEOUT_S };
    struct sockaddr_un sun;
    struct stat st;
    int dirfd = control_location(image, &name, error);
    int fd = -1;
    bool ok = false;

    if (dirfd < 0) {
        return false;
    }
    if (!socket_address(dirfd, name, &sun, error)) {
        goto out;
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_CONNECTED,
                    "no nbdfs server answers on %s (%s)", name, g_strerror(errno));
        goto out;
    }
    /* The server must be the image's owner's, ours, or root's. */
    if (stat(image, &st) < 0 || !peer_trusted(fd, st.st_uid)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                    "the server on %s runs as another user", name);
        goto out;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    nbds_send_all(fd, request, strlen(request));
    for (;;) {
        g_autofree char *line = read_line(fd, buffer);
        g_auto(GStrv) words = line ? decode_line(line) : NULL;
        if (!words || !words[0]) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_CONNECTION_CLOSED,
                        "the server on %s did not answer", name);
            goto out;
        }
        if (strcmp(words[0], "ok") == 0) {
            ok = true;
            goto out;
        }
        if (strcmp(words[0], "error") == 0) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_FAILED, "%s",
                        words[1] ? words[1] : "failed");
            goto out;
        }
        if (strcmp(words[0], "info") == 0 && info) {
            g_ptr_array_add(info, g_strdupv(words + 1));
        }
    }
out:
    if (fd >= 0) {
        close(fd);
    }
    close(dirfd);
    return ok;
}
