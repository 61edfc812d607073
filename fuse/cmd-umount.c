/*
 * nbdfs umount: unmount an nbdfs mount and wait until its daemon has
 * flushed, disconnected, saved the bitmaps and released the image; exit
 * with the daemon's status.  So a script may use the image (or the server)
 * as soon as it returns.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gio/gio.h>

#include "mount.h"
#include "nbdfs.h"

#define DEFAULT_WAIT_S 120

/* Unmount MOUNTPOINT as umount(8) would: fails (EBUSY) while files are open on it. */
static bool unmount(const char *mountpoint, GError **error)
{
    const char *argv[] = { "fusermount3", "-u", "--", mountpoint, NULL };
    g_autofree char *err_out = NULL;
    int wait_status;

    if (geteuid() == 0) {
        if (umount2(mountpoint, 0) == 0) {
            return true;
        }
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "%s%s",
                    g_strerror(errno), errno == EBUSY ? " (files are open on it)" : "");
        return false;
    }
    /* Not root: fusermount3 may unmount what this user mounted. */
    if (!g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL, NULL,
                      &err_out, &wait_status, error)) {
        return false;
    }
    if (!g_spawn_check_wait_status(wait_status, NULL)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_FAILED, "%s",
                    err_out && *err_out ? g_strchomp(err_out) : "fusermount3 -u failed");
        return false;
    }
    return true;
}

int nbdfs_cmd_umount(int argc, char **argv)
{
    gint timeout = DEFAULT_WAIT_S;
    char **args = NULL;
    const GOptionEntry entries[] = {
        { "timeout", 't', 0, G_OPTION_ARG_INT, &timeout,
          "Wait at most SECS for the daemon to finish (default 120)", "SECS" },
        { G_OPTION_REMAINING, 0, 0, G_OPTION_ARG_FILENAME_ARRAY, &args, NULL, NULL },
        G_OPTION_ENTRY_NULL
    };
    g_autofree char *mountpoint = NULL;
    g_autofree char *device = NULL;
    g_autofree char *fstype = NULL;
    g_autoptr(GError) error = NULL;
    g_autoptr(GString) messages = g_string_new(NULL);
    char *real;
    int fd, status;

    if (!nbdfs_parse_options("umount", "MOUNTPOINT",
                             "Unmount an nbdfs mount and wait until its daemon has flushed "
                             "the data, saved the bitmaps\nand released the image; exit with "
                             "the daemon's status (0: every write reached the server).",
                             entries, &argc, &argv)) {
        return 1;
    }
    if (!args || g_strv_length(args) != 1) {
        nbdfs_error("umount", "expected one MOUNTPOINT (see 'nbdfs umount --help')");
        g_strfreev(args);
        return 1;
    }
    if (timeout < 1) {
        nbdfs_error("umount", "--timeout: must be at least 1, not %d", timeout);
        g_strfreev(args);
        return 1;
    }
    /* realpath asks the mount for its root's attributes; a dead daemon cannot answer. */
    real = realpath(args[0], NULL);
    mountpoint = real ? g_strdup(real) : g_canonicalize_filename(args[0], NULL);
    free(real);
    g_strfreev(args);

    if (!nbdfs_mountinfo_find(mountpoint, &device, &fstype)) {
        nbdfs_error("umount", "%s: not mounted", mountpoint);
        return 1;
    }
    if (strcmp(fstype, "fuse.nbdfs") != 0) {
        nbdfs_error("umount", "%s: not an nbdfs mount (it is %s)", mountpoint, fstype);
        return 1;
    }
    fd = nbdfs_control_connect(device, &error);
    if (fd < 0) {
        nbdfs_error("umount", "%s: cannot reach its daemon (%s): unmounting without waiting "
                    "for it", mountpoint, error->message);
        g_clear_error(&error);
    }
    if (!unmount(mountpoint, &error)) {
        nbdfs_error("umount", "%s: %s", mountpoint, error->message);
        if (fd >= 0) {
            close(fd);
        }
        return 1;
    }
    if (fd < 0) {
        return 0;
    }
    status = nbdfs_control_wait(fd, timeout, messages, &error);
    close(fd);
    if (messages->len) {
        g_auto(GStrv) lines = g_strsplit(g_strchomp(messages->str), "\n", -1);
        for (char **l = lines; *l; l++) {
            nbdfs_error("umount", "%s: %s", mountpoint, *l);
        }
    }
    if (status < 0) {
        nbdfs_error("umount", "%s: %s", mountpoint, error->message);
        return 1;
    }
    return status;
}
