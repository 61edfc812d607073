/* nbdfs serve: the bundled NBD server as a standalone program. */
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "nbdfs.h"
#include "server.h"

#define SD_LISTEN_FDS_START 3

typedef struct {
    char *socket;
    char *port;
    char *bind;
    char *pid_file;
    char *format;
    char *max_buffered;
    char *tls;
    char *tls_creds;
    char *tls_psk;
    char *tls_psk_user;
    char *socket_mode;
    gboolean tls_verify_peer;
    gboolean read_only;
    gboolean fork;
    gboolean verbose;
    gint max_connections;
    gint handshake_limit;
    gint idle_limit;
    gint threads;
    char **images;
} ServeOptions;

static void serve_options_clear(ServeOptions *o)
{
    g_free(o->socket);
    g_free(o->port);
    g_free(o->bind);
    g_free(o->pid_file);
    g_free(o->format);
    g_free(o->max_buffered);
    g_free(o->tls);
    g_free(o->tls_creds);
    g_free(o->tls_psk);
    g_free(o->tls_psk_user);
    g_free(o->socket_mode);
    g_strfreev(o->images);
}
G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(ServeOptions, serve_options_clear)

/* The listening fds systemd-style socket activation passed us, or 0. */
static int activation_fd_count(void)
{
    const char *pid = g_getenv("LISTEN_PID");
    const char *fds = g_getenv("LISTEN_FDS");
    guint64 p, n;

    if (!pid || !fds || !g_ascii_string_to_unsigned(pid, 10, 1, G_MAXINT, &p, NULL) ||
        (pid_t)p != getpid() || !g_ascii_string_to_unsigned(fds, 10, 1, 64, &n, NULL)) {
        return 0;
    }
    /* Not for our children. */
    g_unsetenv("LISTEN_PID");
    g_unsetenv("LISTEN_FDS");
    g_unsetenv("LISTEN_FDNAMES");
    return (int)n;
}

static bool write_pid_file(const char *path, GError **error)
{
    g_autofree char *text = g_strdup_printf("%d\n", (int)getpid());
    return g_file_set_contents(path, text, -1, error);
}

/* Is ADDRESS (for --bind) one only this host can reach? */
static bool loopback_address(const char *address)
{
    return !address || strcmp(address, "localhost") == 0 || g_str_has_prefix(address, "127.") ||
           strcmp(address, "::1") == 0;
}

/*
 * --tls: "off", "on", "require"; by default require when credentials are
 * given (as qemu-nbd does), else off.  TCP on an address others can reach is
 * refused without TLS unless --tls=off says so: the safe default.
 */
static bool tls_mode(const ServeOptions *o, NbdsTlsMode *mode)
{
    bool creds = o->tls_creds || o->tls_psk;

    if (!o->tls) {
        *mode = creds ? NBDS_TLS_REQUIRE : NBDS_TLS_OFF;
    } else if (strcmp(o->tls, "off") == 0) {
        *mode = NBDS_TLS_OFF;
    } else if (strcmp(o->tls, "on") == 0) {
        *mode = NBDS_TLS_ON;
    } else if (strcmp(o->tls, "require") == 0) {
        *mode = NBDS_TLS_REQUIRE;
    } else {
        nbdfs_error("serve", "--tls: '%s' is not off, on or require", o->tls);
        return false;
    }
    if (*mode != NBDS_TLS_OFF && !creds) {
        nbdfs_error("serve", "--tls=%s needs credentials: --tls-creds DIR or --tls-psk FILE",
                    o->tls);
        return false;
    }
    if (*mode == NBDS_TLS_OFF && creds && o->tls) {
        nbdfs_error("serve", "--tls=off with --tls-creds or --tls-psk: which one is meant?");
        return false;
    }
    if ((o->tls_verify_peer && !o->tls_creds) || (o->tls_psk_user && !o->tls_psk)) {
        nbdfs_error("serve", "%s", o->tls_verify_peer && !o->tls_creds
                                   ? "--tls-verify-peer needs --tls-creds"
                                   : "--tls-psk-user needs --tls-psk");
        return false;
    }
    if (o->port && !loopback_address(o->bind) && *mode == NBDS_TLS_OFF && !o->tls) {
        nbdfs_error("serve", "--bind %s: other hosts could read and write the images in "
                    "clear; give TLS credentials (--tls-creds, --tls-psk), or --tls=off to "
                    "serve them anyway", o->bind);
        return false;
    }
    return true;
}

static bool validate(const ServeOptions *o, int n_activation)
{
    guint64 v;

    if (!o->images || !o->images[0]) {
        nbdfs_error("serve", "no IMAGE given (see 'nbdfs serve --help')");
        return false;
    }
    if (o->port && !g_ascii_string_to_unsigned(o->port, 10, 1, 65535, &v, NULL)) {
        nbdfs_error("serve", "--port: '%s' is not a port number (1-65535)", o->port);
        return false;
    }
    if (o->bind && !o->port) {
        nbdfs_error("serve", "--bind needs --port");
        return false;
    }
    if (n_activation && (o->socket || o->port)) {
        nbdfs_error("serve", "socket activation (LISTEN_FDS) cannot be combined with -U or -p");
        return false;
    }
    if (o->max_connections < 1) {
        nbdfs_error("serve", "--max-connections: must be at least 1, not %d", o->max_connections);
        return false;
    }
    if (o->handshake_limit < 0 || o->handshake_limit > NBDS_MAX_TIME_LIMIT) {
        nbdfs_error("serve", "--handshake-limit: must be 0 (none) to %d seconds, not %d",
                    NBDS_MAX_TIME_LIMIT, o->handshake_limit);
        return false;
    }
    if (o->idle_limit < 0 || o->idle_limit > NBDS_MAX_TIME_LIMIT) {
        nbdfs_error("serve", "--idle-limit: must be 0 (none) to %d seconds, not %d",
                    NBDS_MAX_TIME_LIMIT, o->idle_limit);
        return false;
    }
    if (o->threads < 0 || o->threads > 1024) {
        nbdfs_error("serve", "--threads: must be between 1 and 1024, not %d", o->threads);
        return false;
    }
    return true;
}

int nbdfs_cmd_serve(int argc, char **argv)
{
    g_auto(ServeOptions) o = {
        .max_connections = NBDS_DEFAULT_MAX_CONNECTIONS,
        .handshake_limit = NBDS_DEFAULT_HANDSHAKE_LIMIT,
    };
    const GOptionEntry entries[] = {
        { "socket", 'U', 0, G_OPTION_ARG_FILENAME, &o.socket,
          "Listen on the unix socket PATH", "PATH" },
        { "port", 'p', 0, G_OPTION_ARG_STRING, &o.port,
          "Listen on TCP port PORT (default 10809 when no other socket is given)", "PORT" },
        { "bind", 'b', 0, G_OPTION_ARG_STRING, &o.bind,
          "Address to listen on with --port (default 127.0.0.1)", "ADDR" },
        { "read-only", 'r', 0, G_OPTION_ARG_NONE, &o.read_only,
          "Export the images read-only", NULL },
        { "format", 0, 0, G_OPTION_ARG_STRING, &o.format,
          "The images' format: only 'raw', to serve an image that looks like another "
          "format as its bytes", "FMT" },
        { "socket-mode", 0, 0, G_OPTION_ARG_STRING, &o.socket_mode,
          "Permissions of the -U socket, in octal (default 0600: only its owner connects)",
          "MODE" },
        { "tls", 0, 0, G_OPTION_ARG_STRING, &o.tls,
          "TLS: off, on (offered) or require (default: require with credentials, else off)",
          "off|on|require" },
        { "tls-creds", 0, 0, G_OPTION_ARG_FILENAME, &o.tls_creds,
          "x509 credentials: DIR holds ca-cert.pem, server-cert.pem, server-key.pem "
          "(and ca-crl.pem), as for qemu-nbd", "DIR" },
        { "tls-verify-peer", 0, 0, G_OPTION_ARG_NONE, &o.tls_verify_peer,
          "Require a client certificate signed by ca-cert.pem", NULL },
        { "tls-psk", 0, 0, G_OPTION_ARG_FILENAME, &o.tls_psk,
          "Pre-shared keys: FILE as psktool writes it (username:hexkey lines)", "FILE" },
        { "tls-psk-user", 0, 0, G_OPTION_ARG_STRING, &o.tls_psk_user,
          "Only this PSK user may connect", "NAME" },
        { "pid-file", 0, 0, G_OPTION_ARG_FILENAME, &o.pid_file,
          "Write the server's pid to FILE once it listens", "FILE" },
        { "fork", 0, 0, G_OPTION_ARG_NONE, &o.fork,
          "Go to the background once listening", NULL },
        { "max-connections", 0, 0, G_OPTION_ARG_INT, &o.max_connections,
          "Serve at most N clients at once (default 128)", "N" },
        { "max-buffered", 0, 0, G_OPTION_ARG_STRING, &o.max_buffered,
          "Hold at most BYTES for all clients together (default 256M): past it, the clients "
          "holding the most stop being read", "BYTES" },
        { "handshake-limit", 0, 0, G_OPTION_ARG_INT, &o.handshake_limit,
          "Drop clients that have not negotiated within SECONDS (default 10; 0 = never)",
          "SECONDS" },
        { "idle-limit", 0, 0, G_OPTION_ARG_INT, &o.idle_limit,
          "Drop clients that send nothing for SECONDS while nothing of theirs is in flight "
          "(default 0: never)", "SECONDS" },
        { "threads", 0, 0, G_OPTION_ARG_INT, &o.threads,
          "Worker threads running requests (default 16)", "N" },
        { "verbose", 'v', 0, G_OPTION_ARG_NONE, &o.verbose,
          "Log every option and request", NULL },
        { G_OPTION_REMAINING, 0, 0, G_OPTION_ARG_FILENAME_ARRAY, &o.images, NULL, "IMAGE..." },
        G_OPTION_ENTRY_NULL
    };
    g_autoptr(NbdsServer) server = NULL;
    g_autoptr(GError) error = NULL;
    int n_activation = activation_fd_count();
    guint64 max_buffered = 0, mode = 0600;
    NbdsTlsMode tls;
    int ready_fd = -1;
    int stop_fd = -1;
    sigset_t mask;
    int status = 0;

    if (!nbdfs_parse_options("serve", "IMAGE...",
                             "Serve each raw IMAGE over NBD under its base name; the first "
                             "is also the default export \"\".\nWith no -U or -p, and no "
                             "socket activation, listens on 127.0.0.1:10809.",
                             entries, &argc, &argv) ||
        !validate(&o, n_activation) || !nbdfs_check_format("serve", o.format) ||
        !tls_mode(&o, &tls)) {
        return 1;
    }
    if (o.socket_mode && (!g_ascii_string_to_unsigned(o.socket_mode, 8, 0, 0777, &mode, NULL))) {
        nbdfs_error("serve", "--socket-mode: '%s' is not an octal mode (0000-0777)",
                    o.socket_mode);
        return 1;
    }
    if (o.max_buffered && (!nbdfs_parse_size(o.max_buffered, G_MAXUINT64, &max_buffered) ||
                           max_buffered < NBDS_MIN_MAX_BUFFERED)) {
        nbdfs_error("serve", "--max-buffered: '%s' is not a size of at least %" G_GUINT64_FORMAT
                    " MiB", o.max_buffered, NBDS_MIN_MAX_BUFFERED >> 20);
        return 1;
    }
    if (o.verbose) {
        g_setenv("G_MESSAGES_DEBUG", "all", TRUE);
    }
    /*
     * glibc gives each thread that allocates its own arena, and freed request
     * buffers stay resident there: with 16 workers and a reader per client the
     * server's RSS grew by ~1.5 MiB per client.  Two arenas keep it flat.  A
     * fixed mmap threshold keeps request-sized buffers (<= 1 MiB) in the heap,
     * reused without page faults, and gives big ones (block-status replies,
     * 32 MiB reads) back to the system as soon as they are freed.
     */
    mallopt(M_ARENA_MAX, 2);
    mallopt(M_MMAP_THRESHOLD, 1 << 20);

    /* SIGINT/SIGTERM arrive through a signalfd; every thread inherits the block. */
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &mask, NULL);
    signal(SIGPIPE, SIG_IGN);

    server = nbds_server_new(&(NbdsServerConfig){
        .read_only = o.read_only,
        .max_connections = o.max_connections,
        .handshake_limit = o.handshake_limit,
        .idle_limit = o.idle_limit,
        .threads = o.threads,
        .any_format = o.format != NULL,
        .max_buffered = max_buffered,
        .tls = tls,
        .tls_creds = o.tls_creds,
        .tls_psk = o.tls_psk,
        .tls_verify_peer = o.tls_verify_peer,
        .tls_psk_user = o.tls_psk_user,
        .control = true,
    }, &error);
    if (!server) {
        nbdfs_error("serve", "%s", error->message);
        return 1;
    }
    for (char **img = o.images; *img; img++) {
        if (!nbds_server_add_export(server, *img, &error)) {
            nbdfs_error("serve", "%s", error->message);
            return 1;
        }
    }
    for (int i = 0; i < n_activation; i++) {
        if (!nbds_server_listen_fd(server, SD_LISTEN_FDS_START + i, &error)) {
            nbdfs_error("serve", "socket activation: %s", error->message);
            return 1;
        }
    }
    if (o.socket && !nbds_server_listen_unix(server, o.socket, mode, &error)) {
        nbdfs_error("serve", "--socket: %s", error->message);
        return 1;
    }
    if ((o.port || (!o.socket && !n_activation)) &&
        !nbds_server_listen_tcp(server, o.bind ? o.bind : "127.0.0.1",
                                o.port ? o.port : "10809", &error)) {
        nbdfs_error("serve", "%s", error->message);
        if (o.socket) {
            unlink(o.socket);
        }
        return 1;
    }

    if (o.fork) {
        ready_fd = nbdfs_daemonize("serve");
    }
    if (o.pid_file && !write_pid_file(o.pid_file, &error)) {
        nbdfs_error("serve", "--pid-file: %s", error->message);
        status = 1;
        goto out;
    }
    /* After the fork: threads do not survive it. */
    if (!nbds_server_start_control(server, &error)) {
        g_warning("'nbdfs bitmap' and 'nbdfs backup' cannot reach this server: %s",
                  error->message);
        g_clear_error(&error);
    }
    stop_fd = signalfd(-1, &mask, SFD_CLOEXEC);
    if (stop_fd < 0) {
        nbdfs_error("serve", "signalfd: %s", g_strerror(errno));
        status = 1;
        goto out;
    }
    /* Only now: the parent's caller may connect as soon as it returns. */
    if (ready_fd >= 0 && !nbdfs_daemon_ready(&ready_fd, o.verbose)) {
        status = 1;
        goto out;
    }

    nbds_server_run(server, stop_fd);
    g_message("shutting down");
    if (!nbds_server_shutdown(server)) {
        status = 1;
    }
    close(stop_fd);
    if (o.pid_file) {
        unlink(o.pid_file);
    }
out:
    if (o.socket) {
        unlink(o.socket);
    }
    return status;
}
