/* Mounts as the kernel lists them in /proc/self/mountinfo. */
#include "mount.h"

#include <string.h>

bool nbdfs_mountinfo_find(const char *mountpoint, char **device, char **fstype)
{
    g_autofree char *mountinfo = NULL;
    g_auto(GStrv) lines = NULL;
    bool found = false;

    if (!g_file_get_contents("/proc/self/mountinfo", &mountinfo, NULL, NULL)) {
        return false;
    }
    lines = g_strsplit(mountinfo, "\n", -1);
    for (char **l = lines; *l; l++) {
        /* ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ... */
        g_auto(GStrv) fields = g_strsplit(*l, " ", -1);
        g_autofree char *point = NULL;
        guint n = g_strv_length(fields), dash;

        if (n < 6) {
            continue;
        }
        point = g_strcompress(fields[4]);   /* "\040" escapes */
        if (strcmp(point, mountpoint) != 0) {
            continue;
        }
        for (dash = 6; dash < n && strcmp(fields[dash], "-") != 0; dash++) {
        }
        /* The last match is the topmost mount. */
        found = true;
        if (device) {
            g_free(*device);
            *device = g_strdup(fields[2]);
        }
        if (fstype) {
            g_free(*fstype);
            *fstype = g_strdup(dash + 1 < n ? fields[dash + 1] : "");
        }
    }
    return found;
}
