/*
 * The conventions of Linux mounts: an fstab line of type fuse.nbdfs,
 * `mount -t fuse.nbdfs`, and the helpers that carry them out.
 *
 * mount(8) runs /sbin/mount.fuse.nbdfs (meson installs that name as a
 * link to nbdfs) or, without it, mount.fuse3, which runs `nbdfs SOURCE
 * MOUNTPOINT -o OPTIONS`.  Both come here: the options become nbdfs mount's
 * own (ro, all, timeout=, connections=, name=, format=, passthrough=), FUSE's (allow_other,
 * default_permissions...) and kernel flags (nosuid, noexec...) pass through,
 * and what only mount(8) and systemd read (defaults, _netdev, nofail,
 * x-systemd.*...) is dropped.  The mount goes to the background once ready,
 * as a mount helper must; umount(8) (or `nbdfs umount`) ends it.
 */
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "nbdfs.h"

/* Options that only mount(8), fstab and systemd read. */
static bool userspace_only(const char *opt)
{
    static const char *const names[] = {
        "defaults", "_netdev", "auto", "noauto", "nofail", "user", "users", "nouser",
        "owner", "group", "rw", "loop",
    };

    if (g_str_has_prefix(opt, "x-") || g_str_has_prefix(opt, "comment=")) {
        return true;
    }
    for (size_t i = 0; i < G_N_ELEMENTS(names); i++) {
        if (strcmp(opt, names[i]) == 0) {
            return true;
        }
    }
    return false;
}

/* nbdfs mount's long options as -o NAME=VALUE. */
static const struct {
    const char *name;
    const char *option;
} valued[] = {
    { "timeout", "--timeout" },
    { "connections", "--connections" },
    { "name", "--name" },
    { "format", "--format" },
    { "passthrough", "--passthrough" },
};

/* Append what OPTS ("ro,timeout=5,allow_other") means to ARGS. */
static void translate(const char *opts, GPtrArray *args)
{
    g_auto(GStrv) list = g_strsplit(opts, ",", -1);
    g_autoptr(GString) fuse = g_string_new(NULL);

    for (char **o = list; *o; o++) {
        const char *eq = strchr(*o, '=');
        bool done = false;

        if (!**o || userspace_only(*o)) {
            continue;
        }
        if (strcmp(*o, "ro") == 0 || strcmp(*o, "all") == 0) {
            g_ptr_array_add(args, g_strdup(strcmp(*o, "ro") == 0 ? "--read-only" : "--all"));
            continue;
        }
        for (size_t i = 0; eq && i < G_N_ELEMENTS(valued) && !done; i++) {
            if (strlen(valued[i].name) == (size_t)(eq - *o) &&
                strncmp(*o, valued[i].name, eq - *o) == 0) {
                g_ptr_array_add(args, g_strconcat(valued[i].option, "=", eq + 1, NULL));
                done = true;
            }
        }
        if (!done) {
            /* FUSE's options and the kernel's flags: libfuse knows them. */
            g_string_append_printf(fuse, "%s%s", fuse->len ? "," : "", *o);
        }
    }
    if (fuse->len) {
        g_ptr_array_add(args, g_strdup("-o"));
        g_ptr_array_add(args, g_strdup(fuse->str));
    }
}

bool nbdfs_is_mount_helper(int argc, char **argv)
{
    g_autofree char *base = g_path_get_basename(argv[0]);
    struct stat st;

    if (strcmp(base, "mount.nbdfs") == 0 || strcmp(base, "mount.fuse.nbdfs") == 0) {
        return true;
    }
    /* mount.fuse3's form: nbdfs SOURCE MOUNTPOINT [-o OPTIONS]. */
    return argc >= 3 && argv[1][0] != '-' && !nbdfs_is_subcommand(argv[1]) &&
           stat(argv[2], &st) == 0 && S_ISDIR(st.st_mode);
}

int nbdfs_mount_helper(int argc, char **argv)
{
    g_autoptr(GPtrArray) args = g_ptr_array_new_with_free_func(g_free);
    const char *source = NULL, *mountpoint = NULL;

    g_ptr_array_add(args, g_strdup("mount"));
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-o") == 0 && i + 1 < argc) {
            translate(argv[++i], args);
        } else if (g_str_has_prefix(argv[i], "-o")) {
            translate(argv[i] + 2, args);
        } else if ((strcmp(argv[i], "-t") == 0 || strcmp(argv[i], "-N") == 0) && i + 1 < argc) {
            i++;                       /* the type is ours; namespaces are not supported */
        } else if (strcmp(argv[i], "-f") == 0) {
            return 0;                  /* "fake": do everything but the mount */
        } else if (argv[i][0] == '-') {
            continue;                  /* -s (sloppy), -n (no mtab), -v */
        } else if (!source) {
            source = argv[i];
        } else if (!mountpoint) {
            mountpoint = argv[i];
        } else {
            nbdfs_error("mount", "unexpected argument '%s' (usage: mount.nbdfs SOURCE "
                        "MOUNTPOINT [-o OPTIONS])", argv[i]);
            return 1;
        }
    }
    if (!source || !mountpoint) {
        nbdfs_error("mount", "usage: mount.nbdfs SOURCE MOUNTPOINT [-o OPTIONS]");
        return 1;
    }
    g_ptr_array_add(args, g_strdup(source));
    g_ptr_array_add(args, g_strdup(mountpoint));
    {
        /* The option parser moves pointers around: it gets a copy of the array. */
        int n = (int)args->len;
        g_autofree char **view = g_new0(char *, n + 1);
        memcpy(view, args->pdata, n * sizeof(char *));
        return nbdfs_cmd_mount(n, view);
    }
}
