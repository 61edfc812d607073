/*
 * nbdfs bitmap: manage the persistent dirty bitmaps of a raw image.  The
 * image is opened and locked as the server does, so a command refuses to
 * touch an image that is being served.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "bitmap.h"
#include "image.h"
#include "nbdfs.h"

typedef enum { OP_ADD, OP_REMOVE, OP_CLEAR, OP_ENABLE, OP_DISABLE, OP_LIST } BitmapOp;

static const struct {
    const char *name;
    BitmapOp op;
    const char *params;
    const char *summary;
} ops[] = {
    { "add", OP_ADD, "IMAGE NAME", "Start tracking writes to IMAGE in a new bitmap NAME" },
    { "remove", OP_REMOVE, "IMAGE NAME", "Delete bitmap NAME" },
    { "clear", OP_CLEAR, "IMAGE NAME",
      "Mark every block of NAME clean (after a backup); also makes it consistent again" },
    { "enable", OP_ENABLE, "IMAGE NAME", "Resume tracking writes in NAME" },
    { "disable", OP_DISABLE, "IMAGE NAME", "Stop tracking writes in NAME (keeps its bits)" },
    { "list", OP_LIST, "IMAGE", "Show the bitmaps of IMAGE" },
};

static void usage(FILE *out)
{
    fprintf(out, "Usage:\n");
    for (size_t i = 0; i < G_N_ELEMENTS(ops); i++) {
        fprintf(out, "  nbdfs bitmap %s%s %s\n", ops[i].name,
                ops[i].op == OP_ADD ? " [--granularity BYTES]" :
                ops[i].op == OP_LIST ? " [--json]" : "", ops[i].params);
    }
    fprintf(out, "\nBitmaps live in IMAGE.bitmaps.  Run 'nbdfs bitmap SUBCOMMAND --help' "
                 "for details.\n");
}

static void print_list(NbdsBitmapSet *set, bool json, const char *image)
{
    if (json) {
        printf("[");
        for (guint i = 0; i < nbds_bitmaps_count(set); i++) {
            NbdsBitmapInfo info;
            g_autofree char *name = NULL;
            nbds_bitmap_info(set, nbds_bitmaps_get(set, i), &info);
            name = g_strescape(info.name, NULL);
            printf("%s\n  { \"name\": \"%s\", \"granularity\": %u, \"enabled\": %s, "
                   "\"dirty-bytes\": %" G_GUINT64_FORMAT ", \"consistent\": %s }",
                   i ? "," : "", name, info.granularity, info.enabled ? "true" : "false",
                   info.dirty_bytes, info.consistent ? "true" : "false");
        }
        printf("%s]\n", nbds_bitmaps_count(set) ? "\n" : "");
        return;
    }
    if (nbds_bitmaps_count(set) == 0) {
        return;
    }
    printf("%-20s %12s %8s %16s %s\n", "NAME", "GRANULARITY", "ENABLED", "DIRTY", "CONSISTENT");
    for (guint i = 0; i < nbds_bitmaps_count(set); i++) {
        NbdsBitmapInfo info;
        nbds_bitmap_info(set, nbds_bitmaps_get(set, i), &info);
        printf("%-20s %12u %8s %16" G_GUINT64_FORMAT " %s\n", info.name, info.granularity,
               info.enabled ? "yes" : "no", info.dirty_bytes, info.consistent ? "yes" : "no");
    }
    if (nbds_bitmaps_inconsistent_reason(set)) {
        fprintf(stderr, "nbdfs bitmap: warning: %s: bitmaps are inconsistent (%s); they count "
                        "as all dirty until cleared\n", image,
                nbds_bitmaps_inconsistent_reason(set));
    }
}

int nbdfs_cmd_bitmap(int argc, char **argv)
{
    g_autofree char *cmdname = NULL;
    g_autofree char *granularity_str = NULL;
    gboolean json = FALSE;
    g_autoptr(GError) error = NULL;
    g_autoptr(NbdsImage) img = NULL;
    g_autoptr(NbdsBitmapSet) set = NULL;
    guint64 granularity = NBDS_BITMAP_DEFAULT_GRANULARITY;
    NbdsBitmap *bm = NULL;
    size_t which;
    int nparams;
    const char *image, *name = NULL;

    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(stdout);
        return 0;
    }
    for (which = 0; which < G_N_ELEMENTS(ops); which++) {
        if (strcmp(argv[1], ops[which].name) == 0) {
            break;
        }
    }
    if (which == G_N_ELEMENTS(ops)) {
        nbdfs_error("bitmap", "unknown bitmap command '%s' (see 'nbdfs bitmap --help')", argv[1]);
        return 1;
    }
    cmdname = g_strdup_printf("bitmap %s", ops[which].name);
    {
        GOptionEntry add_entries[] = {
            { "granularity", 'g', 0, G_OPTION_ARG_STRING, &granularity_str,
              "Bytes per bit: a power of two from 512 to 64M (default 64K)", "BYTES" },
            G_OPTION_ENTRY_NULL
        };
        GOptionEntry list_entries[] = {
            { "json", 0, 0, G_OPTION_ARG_NONE, &json, "Print JSON", NULL },
            G_OPTION_ENTRY_NULL
        };
        GOptionEntry none[] = { G_OPTION_ENTRY_NULL };
        const GOptionEntry *entries = ops[which].op == OP_ADD ? add_entries :
                                      ops[which].op == OP_LIST ? list_entries : none;
        argc--;
        argv++;
        if (!nbdfs_parse_options(cmdname, ops[which].params, ops[which].summary, entries,
                                 &argc, &argv)) {
            return 1;
        }
    }
    nparams = ops[which].op == OP_LIST ? 1 : 2;
    if (argc - 1 != nparams) {
        nbdfs_error(cmdname, "expected %s (see 'nbdfs %s --help')", ops[which].params, cmdname);
        return 1;
    }
    image = argv[1];
    if (nparams == 2) {
        name = argv[2];
    }
    if (granularity_str && !nbdfs_parse_size(granularity_str, G_MAXUINT32, &granularity)) {
        nbdfs_error(cmdname, "--granularity: '%s' is not a size in bytes", granularity_str);
        return 1;
    }

    /* Validate what can be validated before opening anything. */
    if (ops[which].op == OP_ADD && !nbds_bitmap_name_valid(name, &error)) {
        nbdfs_error(cmdname, "%s", error->message);
        return 1;
    }
    img = nbds_image_open(image, ops[which].op == OP_LIST, &error);
    if (!img) {
        nbdfs_error(cmdname, "%s", error->message);
        return 1;
    }
    set = nbds_bitmaps_load(img, false, &error);
    if (!set) {
        nbdfs_error(cmdname, "%s", error->message);
        return 1;
    }
    if (ops[which].op == OP_LIST) {
        print_list(set, json, image);
        return 0;
    }
    if (ops[which].op != OP_ADD) {
        bm = nbds_bitmaps_find(set, name);
        if (!bm) {
            nbdfs_error(cmdname, "%s: no bitmap named '%s'", image, name);
            return 1;
        }
    }
    switch (ops[which].op) {
    case OP_ADD:
        if (!nbds_bitmaps_add(set, name, granularity, &error)) {
            nbdfs_error(cmdname, "%s: %s", image, error->message);
            return 1;
        }
        break;
    case OP_REMOVE:
        nbds_bitmaps_remove(set, bm);
        break;
    case OP_CLEAR:
        nbds_bitmap_clear(set, bm);
        break;
    case OP_ENABLE:
    case OP_DISABLE:
        nbds_bitmap_set_enabled(bm, ops[which].op == OP_ENABLE);
        break;
    case OP_LIST:
        g_assert_not_reached();
    }
    if (!nbds_bitmaps_save(set, &error)) {
        nbdfs_error(cmdname, "%s", error->message);
        return 1;
    }
    return 0;
}
