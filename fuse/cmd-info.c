/*
 * nbdfs info: what a server offers, like `qemu-nbd --list` and `nbdinfo`.
 * The handshake stays in option mode: NBD_OPT_LIST for the exports, then
 * NBD_OPT_LIST_META_CONTEXT and NBD_OPT_INFO for each, then NBD_OPT_ABORT.
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gio/gio.h>

#include "mount.h"
#include "nbdfs.h"

typedef struct {
    char *name;
    char *description;
    uint64_t size;
    GPtrArray *flags;              /* const char *: names of the flags set */
    int64_t block_size[3];         /* minimum, preferred, maximum; 0 = not advertised */
    GPtrArray *contexts;           /* char * */
    char *error;                   /* the export could not be queried */
} ExportInfo;

static void export_info_free(ExportInfo *e)
{
    g_free(e->name);
    g_free(e->description);
    g_ptr_array_unref(e->flags);
    g_ptr_array_unref(e->contexts);
    g_free(e->error);
    g_free(e);
}

static int collect_context(void *data, const char *name)
{
    g_ptr_array_add(data, g_strdup(name));
    return 0;
}

/* Transmission flags as the protocol names them (libnbd cannot report send-resize). */
static void add_flags(struct nbd_handle *h, GPtrArray *flags)
{
    static const struct {
        const char *name;
        int (*query)(struct nbd_handle *);
    } table[] = {
        { "read-only", nbd_is_read_only },
        { "send-flush", nbd_can_flush },
        { "send-fua", nbd_can_fua },
        { "rotational", nbd_is_rotational },
        { "send-trim", nbd_can_trim },
        { "send-write-zeroes", nbd_can_zero },
        { "send-df", nbd_can_df },
        { "can-multi-conn", nbd_can_multi_conn },
        { "send-cache", nbd_can_cache },
        { "send-fast-zero", nbd_can_fast_zero },
        { "block-status-payload", nbd_can_block_status_payload },
    };

    g_ptr_array_add(flags, (gpointer) "has-flags");     /* libnbd insists on it */
    for (size_t i = 0; i < G_N_ELEMENTS(table); i++) {
        if (table[i].query(h) == 1) {
            g_ptr_array_add(flags, (gpointer)table[i].name);
        }
    }
}

/* Fill INFO from a handle that went through NBD_OPT_INFO or NBD_OPT_GO. */
static void read_export(struct nbd_handle *h, ExportInfo *info)
{
    char *canonical = nbd_get_canonical_export_name(h);
    char *description = nbd_get_export_description(h);

    if (canonical && strcmp(canonical, info->name) != 0 && info->name[0]) {
        g_free(info->name);
        info->name = g_strdup(canonical);
    }
    if (description && description[0] && !info->description) {
        info->description = g_strdup(description);
    }
    free(canonical);
    free(description);
    info->size = nbd_get_size(h);
    add_flags(h, info->flags);
    info->block_size[0] = MAX(nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM), 0);
    info->block_size[1] = MAX(nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED), 0);
    info->block_size[2] = MAX(nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM), 0);
}

static ExportInfo *query_export(struct nbd_handle *h, const NbdfsExportEntry *entry, bool contexts)
{
    ExportInfo *info = g_new0(ExportInfo, 1);
    g_autoptr(GError) error = NULL;
    NbdfsOption opt;

    info->name = g_strdup(entry->name);
    info->description = g_strdup(entry->description);
    info->flags = g_ptr_array_new();
    info->contexts = g_ptr_array_new_with_free_func(g_free);
    nbd_set_export_name(h, entry->name);
    if (contexts &&
        !nbdfs_option_wait(h, nbd_aio_opt_list_meta_context(
                                  h, (nbd_context_callback){ .callback = collect_context,
                                                             .user_data = info->contexts },
                                  nbdfs_option_callback(&opt)),
                           &opt, "NBD_OPT_LIST_META_CONTEXT", NBDFS_DEFAULT_TIMEOUT, &error)) {
        g_debug("%s", error->message);
        g_clear_error(&error);
    }
    if (!nbdfs_option_wait(h, nbd_aio_opt_info(h, nbdfs_option_callback(&opt)), &opt,
                           "NBD_OPT_INFO", NBDFS_DEFAULT_TIMEOUT, &error)) {
        info->error = g_strdup(error->message);
        return info;
    }
    read_export(h, info);
    return info;
}

static const char *header_mode(struct nbd_handle *h)
{
    if (nbd_get_extended_headers_negotiated(h) == 1) {
        return "extended";
    }
    return nbd_get_structured_replies_negotiated(h) == 1 ? "structured" : "simple";
}

/* "4 MiB", "1.5 GiB": plain ASCII (GLib's formatter puts in a no-break space). */
static char *human_size(uint64_t bytes)
{
    static const char *const units[] = { "bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
    double value = bytes;
    int u = 0;

    while (value >= 1024 && u + 1 < (int)G_N_ELEMENTS(units)) {
        value /= 1024;
        u++;
    }
    if (value == (uint64_t)value) {
        return g_strdup_printf("%" PRIu64 " %s", (uint64_t)value, units[u]);
    }
    return g_strdup_printf("%.1f %s", value, units[u]);
}

static void print_text(struct nbd_handle *h, GPtrArray *exports)
{
    const char *protocol = nbd_get_protocol(h);
    static const char *const size_names[] = { "minimum", "preferred", "maximum" };

    printf("protocol: %s\n", protocol ? protocol : "unknown");
    printf("headers: %s\n", header_mode(h));
    printf("TLS: %s\n", nbd_get_tls_negotiated(h) == 1 ? "yes" : "no");
    printf("exports: %u\n", exports->len);
    for (guint i = 0; i < exports->len; i++) {
        ExportInfo *e = g_ptr_array_index(exports, i);
        g_autofree char *size = NULL;
        g_autofree char *flags = NULL;

        printf("export \"%s\":\n", e->name);
        if (e->description) {
            printf("\tdescription: %s\n", e->description);
        }
        if (e->error) {
            printf("\terror: %s\n", e->error);
            continue;
        }
        size = human_size(e->size);
        printf("\tsize: %" PRIu64 " (%s)\n", e->size, size);
        g_ptr_array_add(e->flags, NULL);
        flags = g_strjoinv(" ", (char **)e->flags->pdata);
        g_ptr_array_remove_index(e->flags, e->flags->len - 1);
        printf("\tflags: %s\n", flags);
        printf("\tblock sizes:");
        for (int k = 0; k < 3; k++) {
            if (e->block_size[k]) {
                printf(" %s %" PRId64, size_names[k], e->block_size[k]);
            }
        }
        printf("%s\n", e->block_size[0] || e->block_size[1] || e->block_size[2] ? ""
                                                                                : " not advertised");
        printf("\tmeta contexts:%s\n", e->contexts->len ? "" : " none");
        for (guint k = 0; k < e->contexts->len; k++) {
            printf("\t\t%s\n", (char *)g_ptr_array_index(e->contexts, k));
        }
    }
}

static void json_string_array(GString *out, GPtrArray *strings)
{
    g_string_append_c(out, '[');
    for (guint i = 0; i < strings->len; i++) {
        g_string_append(out, i ? ", " : "");
        nbdfs_json_string(out, g_ptr_array_index(strings, i));
    }
    g_string_append_c(out, ']');
}

static void print_json(struct nbd_handle *h, GPtrArray *exports)
{
    const char *protocol = nbd_get_protocol(h);
    static const char *const size_names[] = { "minimum", "preferred", "maximum" };
    g_autoptr(GString) out = g_string_new("{\n  \"protocol\": ");

    nbdfs_json_string(out, protocol ? protocol : "unknown");
    g_string_append_printf(out, ",\n  \"headers\": \"%s\",\n  \"tls\": %s,\n  \"exports\": [",
                           header_mode(h), nbd_get_tls_negotiated(h) == 1 ? "true" : "false");
    for (guint i = 0; i < exports->len; i++) {
        ExportInfo *e = g_ptr_array_index(exports, i);
        bool first = true;

        g_string_append(out, i ? ",\n    {\n      \"name\": " : "\n    {\n      \"name\": ");
        nbdfs_json_string(out, e->name);
        if (e->description) {
            g_string_append(out, ",\n      \"description\": ");
            nbdfs_json_string(out, e->description);
        }
        if (e->error) {
            g_string_append(out, ",\n      \"error\": ");
            nbdfs_json_string(out, e->error);
            g_string_append(out, "\n    }");
            continue;
        }
        g_string_append_printf(out, ",\n      \"size\": %" PRIu64 ",\n      \"read-only\": %s"
                               ",\n      \"flags\": ", e->size,
                               g_ptr_array_find_with_equal_func(e->flags, "read-only",
                                                                g_str_equal, NULL)
                               ? "true" : "false");
        json_string_array(out, e->flags);
        g_string_append(out, ",\n      \"block-size\": {");
        for (int k = 0; k < 3; k++) {
            if (e->block_size[k]) {
                g_string_append_printf(out, "%s\"%s\": %" PRId64, first ? "" : ", ",
                                       size_names[k], e->block_size[k]);
                first = false;
            }
        }
        g_string_append(out, "},\n      \"meta-contexts\": ");
        json_string_array(out, e->contexts);
        g_string_append(out, "\n    }");
    }
    g_string_append(out, exports->len ? "\n  ]\n}\n" : "]\n}\n");
    fputs(out->str, stdout);
}

/* NBD_OPT_ABORT, politely waiting a moment for the server to hang up. */
/* Connect to SPEC: a local image is opened read-write if it can be, else read-only. */
static NbdfsSource *open_source(const char *spec, char **command, GError **error)
{
    NbdfsSource *src = nbdfs_source_open(spec, command, false, NULL, error);

    if (!src && g_error_matches(*error, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED)) {
        g_clear_error(error);
        src = nbdfs_source_open(spec, command, true, NULL, error);
    }
    return src;
}

int nbdfs_cmd_info(int argc, char **argv)
{
    gboolean json = FALSE;
    char **args = NULL;
    const GOptionEntry entries[] = {
        { "json", 0, 0, G_OPTION_ARG_NONE, &json, "Print JSON", NULL },
        { G_OPTION_REMAINING, 0, 0, G_OPTION_ARG_FILENAME_ARRAY, &args, NULL, NULL },
        G_OPTION_ENTRY_NULL
    };
    g_autoptr(NbdfsSource) src = NULL;
    g_autoptr(GError) error = NULL;
    g_autoptr(GPtrArray) entries_found = NULL;
    g_autoptr(GPtrArray) exports = g_ptr_array_new_with_free_func(
        (GDestroyNotify)export_info_free);
    g_auto(GStrv) command = NULL;
    struct nbd_handle *h = NULL;
    const char *spec;
    int status = 1;

    if (!nbdfs_split_command("info", &argc, argv, &command) ||
        !nbdfs_parse_options("info", "SOURCE | [ CMD ARGS... ]",
                             "Show the exports of the NBD server SOURCE (an NBD URI, or a local "
                             "image), or of the server\nCMD started for it by socket "
                             "activation: size, transmission flags, header mode,\nblock sizes "
                             "and metadata contexts.",
                             entries, &argc, &argv)) {
        return 1;
    }
    if ((!args || g_strv_length(args) != 1) && !(command && !args)) {
        nbdfs_error("info", "expected one SOURCE, or [ CMD ARGS... ] (see 'nbdfs info --help')");
        g_strfreev(args);
        return 1;
    }
    spec = command ? command[0] : args[0];
    signal(SIGPIPE, SIG_IGN);
    src = open_source(spec, command, &error);
    if (!src) {
        nbdfs_error("info", "%s", error->message);
        goto out;
    }
    h = nbdfs_handle_new(true, &error);
    if (!h) {
        nbdfs_error("info", "%s", error->message);
        goto out;
    }
    nbd_set_full_info(h, true);
    if (!nbdfs_source_connect(src, NULL, h, NBDFS_DEFAULT_TIMEOUT, -1, &error)) {
        nbdfs_error("info", "%s: %s", spec, error->message);
        goto out;
    }

    if (nbd_aio_is_negotiating(h)) {
        bool contexts = nbd_get_structured_replies_negotiated(h) == 1 ||
                        nbd_get_extended_headers_negotiated(h) == 1;
        entries_found = nbdfs_list_exports(h, NBDFS_DEFAULT_TIMEOUT, &error);
        if (!entries_found) {
            /* The server will not list: describe the export the source names. */
            NbdfsExportEntry *e = g_new0(NbdfsExportEntry, 1);
            char *name = nbd_get_export_name(h);
            g_debug("%s", error->message);
            g_clear_error(&error);
            entries_found = g_ptr_array_new_with_free_func(
                (GDestroyNotify)nbdfs_export_entry_free);
            e->name = g_strdup(name ? name : "");
            g_ptr_array_add(entries_found, e);
            free(name);
        }
        for (guint i = 0; i < entries_found->len; i++) {
            g_ptr_array_add(exports, query_export(h, g_ptr_array_index(entries_found, i),
                                                  contexts));
        }
        nbdfs_end_negotiation(h);
    } else {
        /* A server without options went straight to transmission. */
        ExportInfo *info = g_new0(ExportInfo, 1);
        char *name = nbd_get_export_name(h);
        info->name = g_strdup(name ? name : "");
        info->flags = g_ptr_array_new();
        info->contexts = g_ptr_array_new_with_free_func(g_free);
        free(name);
        read_export(h, info);
        g_ptr_array_add(exports, info);
    }

    if (json) {
        print_json(h, exports);
    } else {
        print_text(h, exports);
    }
    status = 0;
out:
    nbd_close(h);
    g_strfreev(args);
    return status;
}
