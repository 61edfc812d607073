/*
 * nbdfs mount: the command line, the daemon and the FUSE session ladder.
 *
 *   parse and check arguments -> fork (the parent waits on a pipe) ->
 *   open the source and connect -> fuse_session_new -> mount -> control
 *   socket -> I/O threads -> FUSE threads -> FUSE init (parent released:
 *   the mount is usable) -> until unmounted or signalled -> the orderly
 *   stop (loop.c) -> unmount, destroy the session -> release the image ->
 *   report to `nbdfs umount` -> exit 0 only if every write reached the
 *   server.
 *
 * Every failure before the parent is released prints one line naming the
 * culprit and leaves no mount behind; the parent exits non-zero.
 */
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mount.h"
#include "nbdfs.h"

#define DEFAULT_CONNECTIONS 4
#define MAX_CONNECTIONS 64
#define MAX_TIMEOUT 86400
/* FUSE requests the kernel may keep in flight for us (readahead, async direct I/O). */
#define MAX_BACKGROUND 64
#define READAHEAD NBDFS_MAX_FUSE_IO

typedef struct {
    gboolean all;
    gboolean read_only;
    gboolean foreground;
    gboolean verbose;
    char *passthrough;
    NbdfsPassthrough passthrough_mode;
    gint connections;
    gint timeout;
    char *format;
    char *name;
    char **fuse_options;
    char **args;
    char **command;                /* [ CMD ARGS... ]: a server started for the mount */
    char *source;                  /* args[0], or the command's name */
    char *mountpoint;              /* absolute */
} MountOptions;

static void mount_options_clear(MountOptions *o)
{
    g_free(o->name);
    g_free(o->format);
    g_free(o->passthrough);
    g_strfreev(o->fuse_options);
    g_strfreev(o->args);
    g_strfreev(o->command);
    g_free(o->mountpoint);
}
G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(MountOptions, mount_options_clear)

/* libfuse's own messages ("fuse: unknown option ..."), as ours, one line each. */
static void fuse_log_func(enum fuse_log_level level, const char *fmt, va_list ap)
{
    static GMutex lock;
    static GString *pending;
    g_autofree char *line = NULL;

    /* libfuse builds some lines with several calls: wait for the newline. */
    g_mutex_lock(&lock);
    if (!pending) {
        pending = g_string_new(NULL);
    }
    g_string_append_vprintf(pending, fmt, ap);
    if (pending->len && pending->str[pending->len - 1] == '\n') {
        line = g_strdup(g_strchomp(pending->str));
        g_string_truncate(pending, 0);
    }
    g_mutex_unlock(&lock);
    if (!line) {
        return;
    }
    if (nbdfs_log_to_syslog()) {
        g_log(G_LOG_DOMAIN, level <= FUSE_LOG_ERR ? G_LOG_LEVEL_WARNING : G_LOG_LEVEL_DEBUG,
              "%s", line);
    } else if (level <= FUSE_LOG_ERR) {
        nbdfs_error("mount", "%s", line);
    }
}

/* Background mode: tell the parent the mount works, and let go of its terminal. */
static void release_parent(NbdfsFs *fs)
{
    if (fs->ready_fd < 0) {
        return;
    }
    nbdfs_log_use_syslog();
    if (!nbdfs_daemon_ready(&fs->ready_fd, false)) {
        g_warning("cannot tell the parent process the mount is ready: %s", g_strerror(errno));
    }
}

char *nbdfs_mount_fuse_version(void)
{
    return g_strdup_printf("libfuse %s, FUSE passthrough %s", fuse_pkgversion(),
                           NBDFS_HAVE_PASSTHROUGH ? "supported" : "unsupported (libfuse < 3.16)");
}

void nbdfs_session_init(void *userdata, struct fuse_conn_info *conn)
{
    NbdfsFs *fs = userdata;

    /* Large requests, many at once: the kernel's defaults are 128 KiB and 12. */
    conn->max_write = NBDFS_MAX_FUSE_IO;
    /* The kernel lowers its readahead to this (see tune_readahead()). */
    conn->max_readahead = READAHEAD;
    conn->max_background = MAX_BACKGROUND;
    conn->congestion_threshold = MAX_BACKGROUND * 3 / 4;
    conn->want |= conn->capable & (FUSE_CAP_ASYNC_READ | FUSE_CAP_ASYNC_DIO);
    /* Our mtime never changes, and a getattr per read would be slow. */
    conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
#if NBDFS_HAVE_PASSTHROUGH
    /*
     * A local raw image: the kernel may read it directly (ops-export.c hands
     * it the image at the first open), and with --passthrough=all write it
     * too, if no bitmap needs to see the writes (checked then).
     */
    if (fs->source->image_fd >= 0 && (conn->capable & FUSE_CAP_PASSTHROUGH) &&
        (fs->read_only ? fs->passthrough_mode != NBDFS_PASSTHROUGH_OFF
                       : fs->passthrough_mode == NBDFS_PASSTHROUGH_ALL)) {
        conn->want |= FUSE_CAP_PASSTHROUGH;
        /* The image may itself be on a stacked file system (overlayfs). */
        conn->max_backing_stack_depth = 1;
        g_atomic_int_set(&fs->passthrough, 1);
    }
#endif
    g_debug("FUSE: max_write %u, max_readahead %u, max_background %u, passthrough %s",
            conn->max_write, conn->max_readahead, conn->max_background,
            g_atomic_int_get(&fs->passthrough) ? "on" : "off");
    release_parent(fs);
}

/*
 * The kernel reads ahead at most read_ahead_kb of our BDI: 128 KiB by
 * default, so a sequential reader's requests stay small.  READAHEAD lets them
 * grow to NBDFS_MAX_FUSE_IO (more readahead was measured to help one reader
 * little and several readers not at all).
 */
static void tune_readahead(const char *device)
{
    g_autofree char *path = NULL;
    g_autofree char *kb = NULL;
    int fd;

    path = g_strdup_printf("/sys/class/bdi/%s/read_ahead_kb", device);
    kb = g_strdup_printf("%u\n", READAHEAD / 1024);
    fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, kb, strlen(kb)) < 0) {
        g_debug("%s: %s: readahead stays at the kernel's default", path, g_strerror(errno));
    }
    if (fd >= 0) {
        close(fd);
    }
}

/* "fsname=SOURCE" with the commas and backslashes libfuse would split on escaped. */
static char *fuse_default_options(const MountOptions *o, bool read_only)
{
    GString *s = g_string_new("fsname=");
    g_autofree char *source = o->command ? g_strjoinv(" ", o->command) : g_strdup(o->source);

    for (const char *p = source; *p; p++) {
        if (*p == ',' || *p == '\\') {
            g_string_append_c(s, '\\');
        }
        g_string_append_c(s, *p);
    }
    g_string_append(s, ",subtype=nbdfs");
    if (read_only) {
        g_string_append(s, ",ro");
    }
    return g_string_free(s, FALSE);
}

static NbdfsFs *fs_new(const MountOptions *o, int ready_fd)
{
    NbdfsFs *fs = g_new0(NbdfsFs, 1);

    fs->all = o->all;
    fs->exports = g_ptr_array_new_with_free_func((GDestroyNotify)nbdfs_fs_free_export);
    fs->file_name = g_strdup(o->name);
    fs->read_only = o->read_only;
    fs->connections = o->connections;
    fs->timeout = o->timeout;
    fs->passthrough_mode = o->passthrough_mode;
    fs->ready_fd = ready_fd;
    fs->mountpoint = g_strdup(o->mountpoint);
    fs->ended_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    fs->control_fd = -1;
    g_mutex_init(&fs->open_lock);
    g_cond_init(&fs->open_cond);
    clock_gettime(CLOCK_REALTIME, &fs->start_time);
    return fs;
}

/*
 * Release every export and the source: a local image is flushed, its
 * bitmaps saved and its lock released.  False if flushing it failed.
 */
static bool fs_release(NbdfsFs *fs)
{
    bool ok;

    for (guint i = 0; i < fs->exports->len; i++) {
        nbdfs_fs_close_export(g_ptr_array_index(fs->exports, i));
    }
    ok = nbdfs_source_shutdown(fs->source);
    g_clear_pointer(&fs->source, nbdfs_source_free);
    return ok;
}

static void fs_free(NbdfsFs *fs)
{
    g_ptr_array_unref(fs->exports);
    g_free(fs->file_name);
    g_free(fs->mountpoint);
    if (fs->ready_fd >= 0) {
        close(fs->ready_fd);
    }
    if (fs->ended_fd >= 0) {
        close(fs->ended_fd);
    }
    g_mutex_clear(&fs->open_lock);
    g_cond_clear(&fs->open_cond);
    g_free(fs);
}

/* What became of the writes of every export; false if any failed or may be lost. */
static bool final_report(NbdfsFs *fs, GString *messages)
{
    bool ok = true;

    for (guint i = 0; i < fs->exports->len; i++) {
        NbdfsMount *m = g_ptr_array_index(fs->exports, i);
        g_autoptr(GString) lines = g_string_new(NULL);
        ok &= nbdfs_files_final_report(m, lines);
        if (lines->len && m->dir_name) {
            g_auto(GStrv) split = g_strsplit(g_strchomp(lines->str), "\n", -1);
            for (char **l = split; *l; l++) {
                g_string_append_printf(messages, "%s: %s\n", m->dir_name, *l);
            }
        } else {
            g_string_append(messages, lines->str);
        }
    }
    return ok;
}

/*
 * Everything after the fork; returns the exit status: 0 only if every write
 * reached the server (and the local image was flushed and released).
 */
static int run_mount(const MountOptions *o, int ready_fd)
{
    NbdfsFs *fs = fs_new(o, ready_fd);
    struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
    g_autofree char *defaults = NULL;
    g_autofree char *device = NULL;
    g_autoptr(GError) error = NULL;
    g_autoptr(GString) messages = g_string_new(NULL);
    struct fuse_session *se = NULL;
    sigset_t stop_signals;
    bool ran = false, ok = false, read_only = o->read_only;

    /* Before any thread starts: stop signals arrive through the main loop's signalfd. */
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &stop_signals, NULL);

    fs->source = nbdfs_source_open(o->source, o->command, o->read_only, o->format, &error);
    if (!fs->source) {
        nbdfs_error("mount", "%s", error->message);
        goto out;
    }
    if (o->all) {
        /* Every export the server lists, each opened when first used. */
        if (!nbdfs_fs_list_exports(fs, &error)) {
            nbdfs_error("mount", "%s: %s", o->source, error->message);
            goto out;
        }
        g_debug("%s: %u export(s)", o->source, fs->exports->len);
    } else {
        NbdfsMount *m = nbdfs_fs_add_export(fs, NULL, NULL);
        if (!nbdfs_fs_open_export(m, &error)) {
            nbdfs_error("mount", "%s: %s", o->source, error->message);
            goto out;
        }
        read_only = m->read_only;
    }

    defaults = fuse_default_options(o, read_only);
    fuse_opt_add_arg(&args, "nbdfs");
    fuse_opt_add_arg(&args, "-o");
    fuse_opt_add_arg(&args, defaults);
    for (char **opt = o->fuse_options; opt && *opt; opt++) {
        fuse_opt_add_arg(&args, "-o");
        fuse_opt_add_arg(&args, *opt);
    }
    se = fuse_session_new(&args, &nbdfs_ops, sizeof(nbdfs_ops), fs);
    fuse_opt_free_args(&args);
    if (!se) {
        goto out;                  /* libfuse said why (-o) */
    }
    if (fuse_session_mount(se, o->mountpoint) != 0) {
        goto out_session;          /* libfuse said why */
    }
    fs->session = se;
    if (nbdfs_mountinfo_find(o->mountpoint, &device, NULL)) {
        tune_readahead(device);
        if (!nbdfs_control_listen(fs, device, &error)) {
            g_warning("%s; 'nbdfs umount' cannot wait for this mount", error->message);
            g_clear_error(&error);
        }
    }
    if (ready_fd >= 0 && chdir("/") < 0) {
        g_debug("chdir /: %s", g_strerror(errno));
    }
    ran = true;
    ok = nbdfs_loop_run(fs, &stop_signals, &error) == 0;
    if (!ok) {
        g_string_append_printf(messages, "%s\n", error->message);
    }
    fuse_session_unmount(se);
out_session:
    fuse_session_destroy(se);
out:
    if (ran) {
        /* What became of the writes, once the session can take no more. */
        ok &= final_report(fs, messages);
    }
    if (!fs_release(fs) && ran) {
        g_string_append(messages, "flushing the image failed\n");
        ok = false;
    }
    if (messages->len) {
        g_auto(GStrv) lines = g_strsplit(g_strchomp(messages->str), "\n", -1);
        for (char **l = lines; *l; l++) {
            g_warning("%s", *l);
        }
    }
    /* Last: whoever waits in 'nbdfs umount' may use the image at once. */
    nbdfs_control_finish(fs, messages->str, ok ? 0 : 1);
    fs_free(fs);
    return ok ? 0 : 1;
}

static bool validate(MountOptions *o)
{
    guint n = o->args ? g_strv_length(o->args) : 0;
    const char *mp;
    struct stat st;
    char *abs;

    if (o->command ? n != 1 : n != 2) {
        nbdfs_error("mount", "expected SOURCE MOUNTPOINT, or [ CMD ARGS... ] MOUNTPOINT "
                    "(see 'nbdfs mount --help')");
        return false;
    }
    o->source = o->command ? o->command[0] : o->args[0];
    mp = o->args[n - 1];
    if (o->all && !o->command && !strstr(o->source, "://")) {
        nbdfs_error("mount", "--all: needs an NBD URI or [ CMD ARGS... ] (a server with "
                    "exports to list)");
        return false;
    }
    if (o->format && (o->command || strstr(o->source, "://"))) {
        nbdfs_error("mount", "--format: only for a local image (the server says what it "
                    "serves)");
        return false;
    }
    if (o->format && !g_regex_match_simple("^[a-z0-9][a-z0-9_-]*$", o->format, 0, 0)) {
        nbdfs_error("mount", "--format: '%s' is not a format name (raw, qcow2, vmdk...)",
                    o->format);
        return false;
    }
    if (o->passthrough && (o->command || strstr(o->source, "://"))) {
        nbdfs_error("mount", "--passthrough: only for a local raw image");
        return false;
    }
    if (!o->passthrough || strcmp(o->passthrough, "reads") == 0) {
        o->passthrough_mode = NBDFS_PASSTHROUGH_READS;
    } else if (strcmp(o->passthrough, "all") == 0) {
        o->passthrough_mode = NBDFS_PASSTHROUGH_ALL;
    } else if (strcmp(o->passthrough, "off") == 0) {
        o->passthrough_mode = NBDFS_PASSTHROUGH_OFF;
    } else {
        nbdfs_error("mount", "--passthrough: '%s' is not reads, all or off", o->passthrough);
        return false;
    }
    if (o->connections < 1 || o->connections > MAX_CONNECTIONS) {
        nbdfs_error("mount", "--connections: must be between 1 and %d, not %d",
                    MAX_CONNECTIONS, o->connections);
        return false;
    }
    if (o->timeout < 1 || o->timeout > MAX_TIMEOUT) {
        nbdfs_error("mount", "--timeout: must be between 1 and %d seconds, not %d",
                    MAX_TIMEOUT, o->timeout);
        return false;
    }
    if (o->name && !nbdfs_valid_file_name(o->name)) {
        nbdfs_error("mount", "--name: '%s' is not a usable file name (nor '.', '..' or 'dirty')",
                    o->name);
        return false;
    }
    if (stat(mp, &st) < 0) {
        nbdfs_error("mount", "mount point %s: %s", mp, g_strerror(errno));
        return false;
    }
    if (!S_ISDIR(st.st_mode)) {
        nbdfs_error("mount", "mount point %s: not a directory", mp);
        return false;
    }
    abs = realpath(mp, NULL);
    if (!abs) {
        nbdfs_error("mount", "mount point %s: %s", mp, g_strerror(errno));
        return false;
    }
    o->mountpoint = g_strdup(abs);
    free(abs);
    if (nbdfs_mountinfo_find(o->mountpoint, NULL, NULL)) {
        /* A second mount would hide the first: surely a mistake. */
        nbdfs_error("mount", "mount point %s: already a mount point (unmount it first)",
                    mp);
        return false;
    }
    return true;
}

int nbdfs_cmd_mount(int argc, char **argv)
{
    g_auto(MountOptions) o = { .connections = DEFAULT_CONNECTIONS,
                               .timeout = NBDFS_DEFAULT_TIMEOUT };
    const GOptionEntry entries[] = {
        { "all", 'a', 0, G_OPTION_ARG_NONE, &o.all,
          "Show every export the server lists, each in a directory of its own, connected "
          "on first use", NULL },
        { "read-only", 'r', 0, G_OPTION_ARG_NONE, &o.read_only,
          "Mount read-only (a read-only export always is)", NULL },
        { "foreground", 'f', 0, G_OPTION_ARG_NONE, &o.foreground,
          "Stay in the foreground until unmounted", NULL },
        { "connections", 'C', 0, G_OPTION_ARG_INT, &o.connections,
          "Open N connections when the server allows multi-conn (default 4)", "N" },
        { "timeout", 't', 0, G_OPTION_ARG_INT, &o.timeout,
          "Fail a request the server has not answered in SECS seconds with EIO, and "
          "reconnect (default 30)", "SECS" },
        { "format", 0, 0, G_OPTION_ARG_STRING, &o.format,
          "The local image's format (default: detected as qemu-img does); 'raw' mounts "
          "any file's bytes as they are", "FMT" },
        { "name", 0, 0, G_OPTION_ARG_STRING, &o.name,
          "File name of the export in the mount point", "NAME" },
        { "passthrough", 0, 0, G_OPTION_ARG_STRING, &o.passthrough,
          "What of a local raw image the kernel does itself (FUSE passthrough): 'reads' "
          "of a read-only mount (default), 'all' reads and writes (no bitmap may be "
          "enabled, and a write past the end grows the image), or 'off'", "MODE" },
        { "option", 'o', 0, G_OPTION_ARG_STRING_ARRAY, &o.fuse_options,
          "FUSE mount options, comma separated (allow_other, ...)", "OPT[,OPT]" },
        { "verbose", 'v', 0, G_OPTION_ARG_NONE, &o.verbose,
          "Log what the mount does (in the foreground: on stderr)", NULL },
        { G_OPTION_REMAINING, 0, 0, G_OPTION_ARG_FILENAME_ARRAY, &o.args, NULL,
          NULL },
        G_OPTION_ENTRY_NULL
    };
    int ready_fd = -1;

    if (!nbdfs_split_command("mount", &argc, argv, &o.command) ||
        !nbdfs_parse_options("mount", "SOURCE MOUNTPOINT | [ CMD ARGS... ] MOUNTPOINT",
                             "Mount the NBD export SOURCE (an NBD URI, or a local image: raw "
                             "ones served in-process,\nothers by qemu-nbd), or the export of "
                             "the server CMD started for the mount, as a file\nin "
                             "MOUNTPOINT, with its dirty bitmaps in MOUNTPOINT/dirty/.  "
                             "Unmount with\n'nbdfs umount MOUNTPOINT'.",
                             entries, &argc, &argv) ||
        !validate(&o)) {
        return 1;
    }
    if (o.verbose) {
        g_setenv("G_MESSAGES_DEBUG", "all", TRUE);
    }
    fuse_set_log_func(fuse_log_func);
    signal(SIGPIPE, SIG_IGN);

    /* Before any thread exists: the in-process server and libnbd start them later. */
    if (!o.foreground) {
        ready_fd = nbdfs_daemonize("mount");
    }
    return run_mount(&o, ready_fd);
}
