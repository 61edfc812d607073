/*
 * nbdfs backup: point-in-time backup views of an image being served, made
 * by the server that holds it (through IMAGE.control; see nbd/backup.c).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gio/gio.h>

#include "nbdfs.h"
#include "server.h"

typedef enum { OP_BEGIN, OP_FINISH, OP_LIST } BackupOp;

static const struct {
    const char *name;
    BackupOp op;
    const char *params;
    const char *summary;
} ops[] = {
    { "begin", OP_BEGIN, "IMAGE",
      "Open a read-only export showing IMAGE as it is now, while clients keep writing it; "
      "print its name" },
    { "end", OP_FINISH, "IMAGE [VIEW]", "Drop the view after a good copy" },
    { "abort", OP_FINISH, "IMAGE [VIEW]",
      "Drop the view, and give its changes back to its bitmap (a failed backup loses "
      "nothing)" },
    { "list", OP_LIST, "IMAGE", "Show the backup views of IMAGE" },
};

static void usage(FILE *out)
{
    fprintf(out, "Usage:\n");
    for (size_t i = 0; i < G_N_ELEMENTS(ops); i++) {
        fprintf(out, "  nbdfs backup %s%s %s\n", ops[i].name,
                ops[i].op == OP_BEGIN ? " [--bitmap NAME] [--view VIEW] [--scratch DIR]" :
                ops[i].op == OP_LIST ? " [--json]" : "", ops[i].params);
    }
    fprintf(out, "\nIMAGE must be served by nbdfs serve.  Run "
                 "'nbdfs backup SUBCOMMAND --help' for details.\n");
}

static void json_string_or_null(GString *out, const char *s)
{
    if (s) {
        nbdfs_json_string(out, s);
    } else {
        g_string_append(out, "null");
    }
}

/* Lines "view NAME BITMAP STARTED COPIED SCRATCH CLIENTS STATE". */
static void print_list(GPtrArray *lines, bool json)
{
    g_autoptr(GString) out = g_string_new("[");
    bool first = true;

    if (!json && lines->len) {
        printf("%-24s %-12s %-20s %14s %14s %7s %s\n", "VIEW", "BITMAP", "STARTED",
               "KEPT", "SCRATCH", "CLIENTS", "STATE");
    }
    for (guint i = 0; i < lines->len; i++) {
        char **w = g_ptr_array_index(lines, i);
        if (g_strv_length(w) != 8 || strcmp(w[0], "view") != 0) {
            continue;
        }
        if (json) {
            g_string_append(out, first ? "\n  { \"view\": " : ",\n  { \"view\": ");
            nbdfs_json_string(out, w[1]);
            g_string_append(out, ", \"bitmap\": ");
            json_string_or_null(out, w[2][0] ? w[2] : NULL);
            g_string_append_printf(out, ", \"started\": \"%s\", \"kept-bytes\": %s, "
                                   "\"scratch-bytes\": %s, \"clients\": %s, \"broken\": ",
                                   w[3], w[4], w[5], w[6]);
            json_string_or_null(out, strcmp(w[7], "ok") ? w[7] : NULL);
            g_string_append(out, " }");
        } else {
            printf("%-24s %-12s %-20s %14s %14s %7s %s\n", w[1], w[2][0] ? w[2] : "-", w[3],
                   w[4], w[5], w[6], strcmp(w[7], "ok") ? w[7] : "ok");
        }
        first = false;
    }
    if (json) {
        printf("%s%s]\n", out->str, first ? "" : "\n");
    }
}

int nbdfs_cmd_backup(int argc, char **argv)
{
    g_autofree char *cmdname = NULL;
    g_autofree char *bitmap = NULL, *view = NULL, *scratch = NULL;
    g_autofree char *scratch_abs = NULL;
    gboolean json = FALSE;
    g_autoptr(GError) error = NULL;
    g_autoptr(GPtrArray) lines = g_ptr_array_new_with_free_func((GDestroyNotify)g_strfreev);
    size_t which;
    int status;
    const char *image;
    int nparams;

    status = nbdfs_pick_subcommand("backup", argc, argv, ops, G_N_ELEMENTS(ops), sizeof(ops[0]),
                                   usage, &which);
    if (status >= 0) {
        return status;
    }
    cmdname = g_strdup_printf("backup %s", ops[which].name);
    {
        GOptionEntry begin_entries[] = {
            { "bitmap", 'b', 0, G_OPTION_ARG_STRING, &bitmap,
              "Carry the changes in bitmap NAME since it was last cleared, and restart it "
              "empty at this instant", "NAME" },
            { "view", 0, 0, G_OPTION_ARG_STRING, &view,
              "The view's export name (default: the image's export name + '@backup')", "VIEW" },
            { "scratch", 0, 0, G_OPTION_ARG_FILENAME, &scratch,
              "Keep the old data of blocks rewritten meanwhile in a file in DIR (default: "
              "the image's directory)", "DIR" },
            G_OPTION_ENTRY_NULL
        };
        GOptionEntry list_entries[] = {
            { "json", 0, 0, G_OPTION_ARG_NONE, &json, "Print JSON", NULL },
            G_OPTION_ENTRY_NULL
        };
        GOptionEntry none[] = { G_OPTION_ENTRY_NULL };
        const GOptionEntry *entries = ops[which].op == OP_BEGIN ? begin_entries :
                                      ops[which].op == OP_LIST ? list_entries : none;
        argc--;
        argv++;
        if (!nbdfs_parse_options(cmdname, ops[which].params, ops[which].summary, entries,
                                 &argc, &argv)) {
            return 1;
        }
    }
    nparams = argc - 1;
    if (nparams < 1 || nparams > (ops[which].op == OP_FINISH ? 2 : 1)) {
        nbdfs_error(cmdname, "expected %s (see 'nbdfs %s --help')", ops[which].params, cmdname);
        return 1;
    }
    image = argv[1];
    if (scratch) {
        /* The server resolves nothing against our directory. */
        scratch_abs = realpath(scratch, NULL);
        if (!scratch_abs || !g_file_test(scratch_abs, G_FILE_TEST_IS_DIR)) {
            nbdfs_error(cmdname, "--scratch: %s: not a directory", scratch);
            return 1;
        }
    }
    if (view && !view[0]) {
        nbdfs_error(cmdname, "--view: a view needs a name");
        return 1;
    }
    {
        const char *begin[] = { "backup", "begin", view ? view : "", bitmap ? bitmap : "",
                                scratch_abs ? scratch_abs : "", NULL };
        const char *finish[] = { "backup", ops[which].name, nparams == 2 ? argv[2] : "", NULL };
        const char *list[] = { "backup", "list", NULL };
        const char *const *request = ops[which].op == OP_BEGIN ? begin :
                                     ops[which].op == OP_FINISH ? finish : list;
        if (!nbds_image_control_call(image, request, lines, &error)) {
            nbdfs_error(cmdname, "%s: %s%s", image, error->message,
                        g_error_matches(error, G_IO_ERROR, G_IO_ERROR_NOT_CONNECTED) ?
                        ": a backup view is made by the server that writes the image "
                        "(nbdfs serve)" : "");
            return 1;
        }
    }
    for (guint i = 0; i < lines->len; i++) {
        char **w = g_ptr_array_index(lines, i);
        if (g_strv_length(w) == 2 && strcmp(w[0], "warning") == 0) {
            fprintf(stderr, "nbdfs %s: warning: %s: %s\n", cmdname, image, w[1]);
        } else if (ops[which].op == OP_BEGIN && g_strv_length(w) == 2 &&
                   strcmp(w[0], "view") == 0) {
            printf("%s\n", w[1]);
        }
    }
    if (ops[which].op == OP_LIST) {
        print_list(lines, json);
    }
    return 0;
}
