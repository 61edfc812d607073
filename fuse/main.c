/* nbdfs: dispatch to a subcommand. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <syslog.h>

#include "config.h"
#include "nbdfs.h"

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} subcommands[] = {
    { "mount", nbdfs_cmd_mount, "mount an NBD export as a file" },
    { "umount", nbdfs_cmd_umount, "unmount, and wait until the mount's daemon is done" },
    { "serve", nbdfs_cmd_serve, "serve raw images over NBD" },
    { "info", nbdfs_cmd_info, "show what an NBD server offers" },
    { "bitmap", nbdfs_cmd_bitmap, "manage the dirty bitmaps of a raw image" },
    { "backup", nbdfs_cmd_backup, "point-in-time backup views of an image being served" },
};

void nbdfs_error(const char *subcommand, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "nbdfs%s%s: ", subcommand ? " " : "", subcommand ? subcommand : "");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

void nbdfs_json_string(GString *out, const char *s)
{
    g_string_append_c(out, '"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            g_string_append_printf(out, "\\%c", *p);
        } else if (*p < 0x20) {
            g_string_append_printf(out, "\\u%04x", *p);
        } else {
            g_string_append_c(out, *p);
        }
    }
    g_string_append_c(out, '"');
}

int nbdfs_pick_subcommand(const char *group, int argc, char **argv, const void *table,
                          size_t n, size_t stride, void (*usage)(FILE *out), size_t *which)
{
    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(stdout);
        return 0;
    }
    for (*which = 0; *which < n; (*which)++) {
        const char *name = *(const char *const *)((const char *)table + *which * stride);
        if (strcmp(argv[1], name) == 0) {
            return -1;
        }
    }
    nbdfs_error(group, "unknown %s command '%s' (see 'nbdfs %s --help')", group, argv[1], group);
    return 1;
}

gboolean nbdfs_parse_options(const char *subcommand, const char *params, const char *summary,
                             const GOptionEntry *entries, int *argc, char ***argv)
{
    g_autoptr(GOptionContext) ctx = g_option_context_new(params);
    g_autoptr(GError) error = NULL;
    g_autofree char *prgname = g_strdup_printf("nbdfs %s", subcommand);

    g_set_prgname(prgname);
    g_option_context_set_summary(ctx, summary);
    g_option_context_add_main_entries(ctx, entries, NULL);
    if (!g_option_context_parse(ctx, argc, argv, &error)) {
        nbdfs_error(subcommand, "%s (see 'nbdfs %s --help')", error->message, subcommand);
        return FALSE;
    }
    return TRUE;
}

gboolean nbdfs_split_command(const char *subcommand, int *argc, char **argv, char ***command)
{
    int open = -1, close = -1;

    *command = NULL;
    for (int i = 1; i < *argc; i++) {
        if (open < 0 && strcmp(argv[i], "[") == 0) {
            open = i;
        } else if (open >= 0 && strcmp(argv[i], "]") == 0) {
            close = i;                 /* the last one: CMD's own arguments may hold "]" */
        }
    }
    if (open < 0) {
        return TRUE;
    }
    if (close < 0 || close == open + 1) {
        nbdfs_error(subcommand, close < 0 ? "'[' without ']': write [ CMD ARGS... ]"
                                          : "[ ]: no command between the brackets");
        return FALSE;
    }
    *command = g_new0(char *, close - open);
    for (int i = open + 1; i < close; i++) {
        (*command)[i - open - 1] = g_strdup(argv[i]);
    }
    /* The rest closes up over the brackets, for the option parser. */
    memmove(argv + open, argv + close + 1, (*argc - close) * sizeof(char *));
    *argc -= close - open + 1;
    return TRUE;
}

gboolean nbdfs_parse_size(const char *s, guint64 max, guint64 *out)
{
    static const char units[] = "KMGT";
    const char *unit;
    char *end;
    guint64 v, mult = 1;

    errno = 0;
    v = g_ascii_strtoull(s, &end, 10);
    if (errno || end == s || !g_ascii_isdigit(*s)) {
        return FALSE;
    }
    if (*end && (unit = strchr(units, g_ascii_toupper(*end)))) {
        mult = (guint64)1 << (10 * (unit - units + 1));
        end++;
        if (strcmp(end, "iB") == 0 || strcmp(end, "B") == 0) {
            end += strlen(end);
        }
    }
    if (*end || v > max / mult) {
        return FALSE;
    }
    *out = v * mult;
    return TRUE;
}

gboolean nbdfs_check_format(const char *subcommand, const char *format)
{
    if (format && strcmp(format, "raw") != 0) {
        nbdfs_error(subcommand, "--format: '%s' is not supported: nbdfs serves raw images "
                    "(serve other formats with qemu-nbd, and mount its URI)", format);
        return FALSE;
    }
    return TRUE;
}

static gint use_syslog;

void nbdfs_log_use_syslog(void)
{
    openlog("nbdfs", LOG_PID, LOG_DAEMON);
    g_atomic_int_set(&use_syslog, 1);
}

bool nbdfs_log_to_syslog(void)
{
    return g_atomic_int_get(&use_syslog);
}

/*
 * Log lines read "2026-12-05T13:05:01.123456Z nbdfs serve: warning: ...":
 * the time, to the microsecond, orders the events of a long-lived server;
 * then the command's name, as in its own errors.  A daemon whose stderr is
 * gone logs to syslog instead.
 */
static void log_handler(const char *domain, GLogLevelFlags level, const char *message,
                        gpointer data)
{
    static int debug = -1;
    const char *prefix = "";
    g_autoptr(GDateTime) now = NULL;
    g_autofree char *stamp = NULL;
    int priority = LOG_NOTICE;

    (void)domain;
    (void)data;
    if (level & G_LOG_LEVEL_DEBUG) {
        if (debug < 0) {
            debug = g_getenv("G_MESSAGES_DEBUG") != NULL;
        }
        if (!debug) {
            return;
        }
        prefix = "debug: ";
        priority = LOG_DEBUG;
    } else if (level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL)) {
        prefix = "error: ";
        priority = LOG_ERR;
    } else if (level & G_LOG_LEVEL_WARNING) {
        prefix = "warning: ";
        priority = LOG_WARNING;
    }
    if (nbdfs_log_to_syslog()) {
        syslog(priority, "%s%s", prefix, message);
        return;
    }
    now = g_date_time_new_now_utc();
    stamp = g_date_time_format(now, "%Y-%m-%dT%H:%M:%S.%fZ");
    fprintf(stderr, "%s %s: %s%s\n", stamp, g_get_prgname() ? g_get_prgname() : "nbdfs",
            prefix, message);
}

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: nbdfs SUBCOMMAND [OPTIONS] ...\n"
            "\n"
            "Mount NBD exports as files; serve raw images over NBD.\n"
            "\n"
            "Subcommands:\n");
    for (size_t i = 0; i < G_N_ELEMENTS(subcommands); i++) {
        fprintf(out, "  %-8s %s\n", subcommands[i].name, subcommands[i].summary);
    }
    fprintf(out,
            "\n"
            "Run 'nbdfs SUBCOMMAND --help' for a subcommand's options.\n"
            "  -h, --help      show this help\n"
            "  -V, --version   show the version\n");
}

bool nbdfs_is_subcommand(const char *name)
{
    for (size_t i = 0; i < G_N_ELEMENTS(subcommands); i++) {
        if (strcmp(name, subcommands[i].name) == 0) {
            return true;
        }
    }
    return false;
}

int main(int argc, char **argv)
{
    g_log_set_default_handler(log_handler, NULL);
    /* Run by mount(8), or by mount.fuse3 for an fstab line of type fuse.nbdfs. */
    if (nbdfs_is_mount_helper(argc, argv)) {
        return nbdfs_mount_helper(argc, argv);
    }
    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "-V") == 0 || strcmp(argv[1], "--version") == 0) {
        g_autofree char *fuse = nbdfs_mount_fuse_version();
        printf("nbdfs %s\n%s\n", NBDFS_VERSION, fuse);
        return 0;
    }
    for (size_t i = 0; i < G_N_ELEMENTS(subcommands); i++) {
        if (strcmp(argv[1], subcommands[i].name) == 0) {
            return subcommands[i].run(argc - 1, argv + 1);
        }
    }
    nbdfs_error(NULL, "unknown subcommand '%s' (see 'nbdfs --help')", argv[1]);
    return 1;
}
