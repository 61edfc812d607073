/*
 * nbdfs bitmap: manage the persistent dirty bitmaps of a raw image.  The
 * image is opened and locked as the server does; when a server holds it,
 * the command goes to that server through IMAGE.control and is carried out
 * there, atomically with respect to its writes.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <gio/gio.h>

#include "bitmap.h"
#include "image.h"
#include "nbdfs.h"
#include "server.h"

typedef enum { OP_ADD, OP_EDIT, OP_LIST } BitmapOp;

static const struct {
    const char *name;
    BitmapOp op;
    NbdsBitmapEdit edit;
    const char *params;
    const char *summary;
} ops[] = {
    { "add", OP_ADD, NBDS_BITMAP_ADD, "IMAGE NAME",
      "Start tracking writes to IMAGE in a new bitmap NAME" },
    { "remove", OP_EDIT, NBDS_BITMAP_REMOVE, "IMAGE NAME", "Delete bitmap NAME" },
    { "clear", OP_EDIT, NBDS_BITMAP_CLEAR, "IMAGE NAME",
      "Mark every block of NAME clean (after a backup); also makes it consistent again" },
    { "enable", OP_EDIT, NBDS_BITMAP_ENABLE, "IMAGE NAME", "Resume tracking writes in NAME" },
    { "disable", OP_EDIT, NBDS_BITMAP_DISABLE, "IMAGE NAME",
      "Stop tracking writes in NAME (keeps its bits)" },
    { "list", OP_LIST, NBDS_BITMAP_ADD, "IMAGE", "Show the bitmaps of IMAGE" },
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

/* Print the bitmaps INFOS (NbdsBitmapInfo); REASON: why they are inconsistent, or NULL. */
static void print_list(GArray *infos, const char *reason, bool json, const char *image)
{
    if (json) {
        g_autoptr(GString) out = g_string_new("[");
        for (guint i = 0; i < infos->len; i++) {
            const NbdsBitmapInfo *info = &g_array_index(infos, NbdsBitmapInfo, i);
            g_string_append_printf(out, "%s\n  { \"name\": ", i ? "," : "");
            nbdfs_json_string(out, info->name);
            g_string_append_printf(out, ", \"granularity\": %u, \"enabled\": %s, "
                                   "\"dirty-bytes\": %" G_GUINT64_FORMAT ", \"consistent\": %s }",
                                   info->granularity, info->enabled ? "true" : "false",
                                   info->dirty_bytes, info->consistent ? "true" : "false");
        }
        printf("%s%s]\n", out->str, infos->len ? "\n" : "");
        return;
    }
    if (infos->len == 0) {
        return;
    }
    printf("%-20s %12s %8s %16s %s\n", "NAME", "GRANULARITY", "ENABLED", "DIRTY", "CONSISTENT");
    for (guint i = 0; i < infos->len; i++) {
        const NbdsBitmapInfo *info = &g_array_index(infos, NbdsBitmapInfo, i);
        printf("%-20s %12u %8s %16" G_GUINT64_FORMAT " %s\n", info->name, info->granularity,
               info->enabled ? "yes" : "no", info->dirty_bytes, info->consistent ? "yes" : "no");
    }
    if (reason) {
        fprintf(stderr, "nbdfs bitmap: warning: %s: bitmaps are inconsistent (%s); they count "
                        "as all dirty until cleared\n", image, reason);
    }
}

/* The bitmaps of an image nobody serves. */
static void list_offline(NbdsBitmapSet *set, bool json, const char *image)
{
    g_autoptr(GArray) infos = g_array_new(FALSE, FALSE, sizeof(NbdsBitmapInfo));

    for (guint i = 0; i < nbds_bitmaps_count(set); i++) {
        NbdsBitmapInfo info;
        nbds_bitmap_info(set, nbds_bitmaps_get(set, i), &info);
        g_array_append_val(infos, info);
    }
    print_list(infos, nbds_bitmaps_inconsistent_reason(set), json, image);
}

/*
 * The image is held by a server: ask it, through IMAGE.control.  Its answer
 * to a list is "bitmap NAME GRANULARITY ENABLED CONSISTENT DIRTY" lines.
 */
static int run_live(const char *cmdname, const char *image, const char *const *request,
                    bool list, bool json)
{
    g_autoptr(GPtrArray) lines = g_ptr_array_new_with_free_func((GDestroyNotify)g_strfreev);
    g_autoptr(GArray) infos = g_array_new(FALSE, FALSE, sizeof(NbdsBitmapInfo));
    g_autoptr(GError) error = NULL;
    const char *reason = NULL;

    if (!nbds_image_control_call(image, request, lines, &error)) {
        nbdfs_error(cmdname, "%s: %s%s", image,
                    g_error_matches(error, G_IO_ERROR, G_IO_ERROR_NOT_CONNECTED) ?
                    "in use by another program, and " : "", error->message);
        return 1;
    }
    if (!list) {
        return 0;
    }
    for (guint i = 0; i < lines->len; i++) {
        char **w = g_ptr_array_index(lines, i);
        if (g_strv_length(w) == 6 && strcmp(w[0], "bitmap") == 0) {
            NbdsBitmapInfo info = {
                .name = w[1],
                .granularity = (uint32_t)g_ascii_strtoull(w[2], NULL, 10),
                .enabled = strcmp(w[3], "yes") == 0,
                .consistent = strcmp(w[4], "yes") == 0,
                .dirty_bytes = g_ascii_strtoull(w[5], NULL, 10),
            };
            g_array_append_val(infos, info);
        } else if (g_strv_length(w) == 2 && strcmp(w[0], "inconsistent") == 0) {
            reason = w[1];
        }
    }
    print_list(infos, reason, json, image);
    return 0;
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
    size_t which;
    int status;
    int nparams;
    const char *image, *name = NULL;

    status = nbdfs_pick_subcommand("bitmap", argc, argv, ops, G_N_ELEMENTS(ops), sizeof(ops[0]),
                                   usage, &which);
    if (status >= 0) {
        return status;
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
    if (!img && g_error_matches(error, G_IO_ERROR, G_IO_ERROR_BUSY)) {
        /* A server holds the image: it carries the command out. */
        g_autofree char *gran = g_strdup_printf("%" G_GUINT64_FORMAT, granularity);
        const char *request[] = { "bitmap", ops[which].name, name, gran, NULL };
        if (ops[which].op != OP_ADD) {
            request[3] = NULL;
        }
        return run_live(cmdname, image, request, ops[which].op == OP_LIST, json);
    }
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
        list_offline(set, json, image);
        return 0;
    }
    if (!nbds_bitmaps_edit(set, ops[which].edit, name, (uint32_t)granularity, &error)) {
        nbdfs_error(cmdname, "%s: %s", image, error->message);
        return 1;
    }
    if (!nbds_bitmaps_save(set, &error)) {
        nbdfs_error(cmdname, "%s", error->message);
        return 1;
    }
    return 0;
}
