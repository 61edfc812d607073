/*
 * A server started for a mount (or for `nbdfs info`): qemu-nbd for an image
 * of another format, or the user's `[ CMD ARGS... ]`, by systemd-style
 * socket activation on a private unix socket, as libnbd's
 * nbd_connect_systemd_socket_activation does, except that the socket stays
 * ours: every connection of the mount (multi-conn) and every reconnection
 * goes to it, and the server can be started again when it died.
 *
 * The server's lifetime is the mount's: stopped (SIGTERM, then SIGKILL
 * after a grace) when the mount ends.  Starting it again after a crash is
 * left to the reconnect thread, which calls nbdfs_spawn_ensure() before
 * every attempt: a server that died is what a reconnection should fix.
 */
#include "mount.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gio/gio.h>

#define LISTEN_FDS_START 3
/* How long a server may take to exit on SIGTERM before SIGKILL. */
#define STOP_GRACE_MS 10000

struct NbdfsSpawned {
    char **argv;
    GThread *logger;               /* forwards the server's stderr to our log */
    char *dir;                     /* private: only we can reach the socket */
    char *socket;
    int listen_fd;
    GMutex lock;                   /* pid (the reconnect thread restarts it) */
    pid_t pid;
    int status;                    /* how it ended, once reaped (pid 0) */
    unsigned starts;
};

/* Async-signal-safe decimal, for the child between fork and exec. */
static void format_pid(char *out, pid_t pid)
{
    char digits[24];
    int n = 0;

    do {
        digits[n++] = '0' + pid % 10;
        pid /= 10;
    } while (pid > 0);
    while (n > 0) {
        *out++ = digits[--n];
    }
    *out = '\0';
}

typedef struct {
    char *name;
    int fd;
} LogPipe;

/*
 * The server's messages, line by line, into our log: on our stderr in the
 * foreground, in syslog in the background.  The server must not hold the
 * caller's terminal or pipes: a script waiting for 'nbdfs mount' to finish
 * would wait for the server too.
 */
static gpointer logger_thread(gpointer data)
{
    LogPipe *lp = data;
    FILE *f = fdopen(lp->fd, "r");
    char line[4096];

    while (f && fgets(line, sizeof(line), f)) {
        /* Named once: "qemu-nbd: ..." from qemu-nbd is not prefixed again. */
        bool named = g_str_has_prefix(line, lp->name) && line[strlen(lp->name)] == ':';
        g_message("%s%s%s", named ? "" : lp->name, named ? "" : ": ", g_strchomp(line));
    }
    if (f) {
        fclose(f);
    } else {
        close(lp->fd);
    }
    g_free(lp->name);
    g_free(lp);
    return NULL;
}

/* Fork and exec the server with the listening socket as fd 3.  s->lock held. */
static bool start_locked(NbdfsSpawned *s, GError **error)
{
    int out[2];
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    /* Everything the child needs is made before fork: threads may exist. */
    g_auto(GStrv) env = g_get_environ();
    pid_t pid;

    env = g_environ_setenv(env, "LISTEN_FDS", "1", TRUE);
    env = g_environ_unsetenv(env, "LISTEN_FDNAMES");
    env = g_environ_unsetenv(env, "LISTEN_PID");
    /* Room for the child's pid, written in the child. */
    env = g_environ_setenv(env, "LISTEN_PID", "000000000000000000000", TRUE);
    if (null < 0 || pipe2(out, O_CLOEXEC) < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "pipe: %s",
                    g_strerror(errno));
        if (null >= 0) {
            close(null);
        }
        return false;
    }
    pid = fork();
    if (pid < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "fork: %s",
                    g_strerror(errno));
        close(null);
        close(out[0]);
        close(out[1]);
        return false;
    }
    if (pid == 0) {
        char **e;
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        dup2(null, STDIN_FILENO);
        dup2(null, STDOUT_FILENO);
        dup2(out[1], STDERR_FILENO);
        if (s->listen_fd != LISTEN_FDS_START) {
            dup2(s->listen_fd, LISTEN_FDS_START);
        } else {
            fcntl(LISTEN_FDS_START, F_SETFD, 0);     /* keep it across exec */
        }
        /* Its own session: a terminal's Ctrl-C reaches us first, and we stop it. */
        setsid();
        for (e = env; *e && strncmp(*e, "LISTEN_PID=", 11) != 0; e++) {
        }
        if (*e) {
            format_pid(*e + 11, getpid());
        }
        execvpe(s->argv[0], s->argv, env);
        _exit(127);
    }
    close(null);
    close(out[1]);
    s->pid = pid;
    s->starts++;
    g_debug("started %s (pid %d) on %s", s->argv[0], (int)pid, s->socket);
    {
        LogPipe *lp = g_new0(LogPipe, 1);
        g_autoptr(GError) local = NULL;
        lp->name = g_path_get_basename(s->argv[0]);
        lp->fd = out[0];
        if (s->logger) {
            g_thread_join(s->logger);      /* the last server's: its pipe is closed */
        }
        s->logger = g_thread_try_new("nbdfs-server-log", logger_thread, lp, &local);
        if (!s->logger) {
            g_warning("%s: its messages are lost: %s", lp->name, local->message);
            close(lp->fd);
            g_free(lp->name);
            g_free(lp);
        }
    }
    return true;
}

/* Has the server exited?  Reaps it; s->lock held. */
static bool exited_locked(NbdfsSpawned *s, int *status)
{
    int st;

    if (s->pid <= 0) {
        if (status) {
            *status = s->status;
        }
        return true;
    }
    if (waitpid(s->pid, &st, WNOHANG) == s->pid) {
        s->pid = 0;
        s->status = st;
        if (status) {
            *status = st;
        }
        return true;
    }
    return false;
}

NbdfsSpawned *nbdfs_spawn_start(char **argv, GError **error)
{
    g_autoptr(GError) local = NULL;
    NbdfsSpawned *s = g_new0(NbdfsSpawned, 1);
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    g_autofree char *found = g_find_program_in_path(argv[0]);
    bool ok;

    s->argv = g_strdupv(argv);
    s->listen_fd = -1;
    g_mutex_init(&s->lock);
    if (!found) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND, "%s: command not found%s",
                    argv[0], strcmp(argv[0], "qemu-nbd") == 0
                    ? " (it serves images of formats other than raw: install qemu-utils, "
                      "e.g. 'apt install qemu-utils')" : "");
        nbdfs_spawn_free(s);
        return NULL;
    }
    s->dir = g_dir_make_tmp("nbdfs-server-XXXXXX", &local);
    if (!s->dir) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_FAILED, "temporary directory: %s",
                    local->message);
        nbdfs_spawn_free(s);
        return NULL;
    }
    s->socket = g_build_filename(s->dir, "sock", NULL);
    g_strlcpy(sun.sun_path, s->socket, sizeof(sun.sun_path));
    s->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s->listen_fd < 0 || bind(s->listen_fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 ||
        listen(s->listen_fd, SOMAXCONN) < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "%s: %s", s->socket,
                    g_strerror(errno));
        nbdfs_spawn_free(s);
        return NULL;
    }
    g_mutex_lock(&s->lock);
    ok = start_locked(s, error);
    g_mutex_unlock(&s->lock);
    if (!ok) {
        nbdfs_spawn_free(s);
        return NULL;
    }
    return s;
}

const char *nbdfs_spawn_socket(const NbdfsSpawned *s)
{
    return s->socket;
}

bool nbdfs_spawn_ensure(NbdfsSpawned *s, GError **error)
{
    int status = 0;
    bool ok = true;

    g_mutex_lock(&s->lock);
    if (exited_locked(s, &status)) {
        g_message("%s exited (%s %d): starting it again", s->argv[0],
                  WIFSIGNALED(status) ? "signal" : "status",
                  WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
        ok = start_locked(s, error);
    }
    g_mutex_unlock(&s->lock);
    return ok;
}

char *nbdfs_spawn_exit_reason(NbdfsSpawned *s)
{
    int status = 0;
    char *reason = NULL;

    g_mutex_lock(&s->lock);
    if (exited_locked(s, &status)) {
        reason = WIFSIGNALED(status)
                 ? g_strdup_printf("%s was killed by signal %d", s->argv[0], WTERMSIG(status))
                 : WEXITSTATUS(status) == 127
                 ? g_strdup_printf("%s could not be started", s->argv[0])
                 : g_strdup_printf("%s exited with status %d", s->argv[0], WEXITSTATUS(status));
    }
    g_mutex_unlock(&s->lock);
    return reason;
}

bool nbdfs_spawn_free(NbdfsSpawned *s)
{
    bool clean = true;

    if (!s) {
        return true;
    }
    g_mutex_lock(&s->lock);
    if (s->pid > 0) {
        gint64 deadline = g_get_monotonic_time() + STOP_GRACE_MS * 1000;
        int status = 0;
        kill(s->pid, SIGTERM);
        while (!exited_locked(s, &status) && g_get_monotonic_time() < deadline) {
            g_usleep(10 * 1000);
        }
        if (s->pid > 0) {
            g_warning("%s (pid %d) did not stop on SIGTERM: killing it", s->argv[0],
                      (int)s->pid);
            kill(s->pid, SIGKILL);
            waitpid(s->pid, NULL, 0);
            clean = false;
        } else if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0) &&
                   !(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM)) {
            g_warning("%s ended with %s %d", s->argv[0],
                      WIFSIGNALED(status) ? "signal" : "status",
                      WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
            clean = false;
        }
    }
    g_mutex_unlock(&s->lock);
    if (s->logger) {
        g_thread_join(s->logger);          /* the server is gone: its pipe is closed */
    }
    if (s->listen_fd >= 0) {
        close(s->listen_fd);
    }
    if (s->socket) {
        unlink(s->socket);
    }
    if (s->dir) {
        rmdir(s->dir);
    }
    g_mutex_clear(&s->lock);
    g_strfreev(s->argv);
    g_free(s->socket);
    g_free(s->dir);
    g_free(s);
    return clean;
}
