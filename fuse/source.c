/*
 * Where a mount's export comes from:
 *   - an NBD URI: libnbd connects;
 *   - a local raw image: the bundled server serves it in-process, one
 *     socketpair per connection;
 *   - a local image of another format (qcow2, vmdk...: detected by its magic
 *     as qemu-img does, or named by --format): qemu-nbd serves the virtual
 *     disk, started for the mount by socket activation (spawn.c), with every
 *     persistent bitmap the image has (qemu-img info lists them) exported;
 *   - a command, [ CMD ARGS... ]: started the same way.
 */
#include "mount.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gio/gio.h>
#include <json-glib/json-glib.h>

#include "image-format.h"

/* Socket buffers: room for a few maximal FUSE writes. */
#define SOCKET_BUFFER (4 << 20)
/* Connections qemu-nbd accepts at once: the mount's, and a reconnection's. */
#define QEMU_NBD_SHARED "64"

/*
 * A 1 MiB write should leave in one send(2) from the thread that issues it:
 * a default unix socket buffer (about 200 KiB) makes the I/O thread finish
 * the job after several wake-ups.  Privileged users may go past wmem_max.
 */
void nbdfs_enlarge_socket_buffers(int fd)
{
    int size = SOCKET_BUFFER;

    if (fd < 0) {
        return;
    }
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) < 0) {
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
    }
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0) {
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
    }
}

/* The format of the image at PATH by its magic ("raw" if none); NULL if unreadable. */
static const char *probe_format(const char *path, GError **error)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    const char *format;

    if (fd < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "%s: %s", path,
                    g_strerror(errno));
        return NULL;
    }
    format = nbds_image_format_probe(fd);
    close(fd);
    return format ? format : "raw";
}

/*
 * The persistent bitmaps of IMAGE (FORMAT) that qemu can export, from
 * `qemu-img info --output=json`; those it marks in use (a qemu that did not
 * close the image cleanly) go to SKIPPED.
 */
static GPtrArray *image_bitmaps(const char *image, const char *format, GPtrArray *skipped,
                                GError **error)
{
    const char *argv[] = { "qemu-img", "info", "--output=json", "-U", "-f", format, image, NULL };
    g_autofree char *out = NULL;
    g_autofree char *err = NULL;
    g_autoptr(JsonParser) parser = json_parser_new();
    GPtrArray *names = g_ptr_array_new_with_free_func(g_free);
    JsonObject *root, *specific, *data;
    JsonArray *bitmaps;
    int status;

    if (!g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL, &out, &err,
                      &status, error)) {
        g_prefix_error(error, "qemu-img (install qemu-utils): ");
        g_ptr_array_unref(names);
        return NULL;
    }
    if (!g_spawn_check_wait_status(status, NULL)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_FAILED, "%s", g_strchomp(err));
        g_ptr_array_unref(names);
        return NULL;
    }
    if (!json_parser_load_from_data(parser, out, -1, error) ||
        !JSON_NODE_HOLDS_OBJECT(json_parser_get_root(parser))) {
        g_prefix_error(error, "qemu-img info: ");
        g_ptr_array_unref(names);
        return NULL;
    }
    root = json_node_get_object(json_parser_get_root(parser));
    specific = json_object_has_member(root, "format-specific")
               ? json_object_get_object_member(root, "format-specific") : NULL;
    data = specific && json_object_has_member(specific, "data")
           ? json_object_get_object_member(specific, "data") : NULL;
    bitmaps = data && json_object_has_member(data, "bitmaps")
              ? json_object_get_array_member(data, "bitmaps") : NULL;
    for (guint i = 0; bitmaps && i < json_array_get_length(bitmaps); i++) {
        JsonObject *bm = json_array_get_object_element(bitmaps, i);
        JsonArray *flags = json_object_has_member(bm, "flags")
                           ? json_object_get_array_member(bm, "flags") : NULL;
        const char *name = json_object_get_string_member(bm, "name");
        bool in_use = false;

        for (guint k = 0; flags && k < json_array_get_length(flags); k++) {
            in_use |= g_strcmp0(json_array_get_string_element(flags, k), "in-use") == 0;
        }
        if (!name) {
            continue;
        }
        g_ptr_array_add(in_use ? skipped : names, g_strdup(name));
    }
    return names;
}

/* qemu-nbd's command line for IMAGE of FORMAT, with every usable persistent bitmap. */
static char **qemu_nbd_argv(NbdfsSource *src, bool read_only, GError **error)
{
    g_autoptr(GPtrArray) bitmaps = NULL;
    GPtrArray *argv = g_ptr_array_new();

    src->skipped_bitmaps = g_ptr_array_new_with_free_func(g_free);
    bitmaps = image_bitmaps(src->image, src->format, src->skipped_bitmaps, error);
    if (!bitmaps) {
        g_prefix_error(error, "%s: ", src->image);
        g_ptr_array_unref(argv);
        return NULL;
    }
    for (guint i = 0; i < src->skipped_bitmaps->len; i++) {
        g_warning("%s: bitmap '%s' is marked in use (the qemu that had the image open did not "
                  "close it cleanly): it cannot be trusted, so it is not shown; "
                  "'qemu-img bitmap --remove' it, or clear it, and take a full backup",
                  src->image, (char *)g_ptr_array_index(src->skipped_bitmaps, i));
    }
    g_ptr_array_add(argv, g_strdup("qemu-nbd"));
    g_ptr_array_add(argv, g_strdup("-f"));
    g_ptr_array_add(argv, g_strdup(src->format));
    /* Several connections (multi-conn), and reconnections, to one process. */
    g_ptr_array_add(argv, g_strdup("--persistent"));
    g_ptr_array_add(argv, g_strdup("--shared=" QEMU_NBD_SHARED));
    /* Punched holes really deallocate (qcow2 clusters). */
    g_ptr_array_add(argv, g_strdup("--discard=unmap"));
    if (read_only) {
        g_ptr_array_add(argv, g_strdup("--read-only"));
    }
    for (guint i = 0; i < bitmaps->len; i++) {
        g_ptr_array_add(argv, g_strdup("-B"));
        g_ptr_array_add(argv, g_strdup(g_ptr_array_index(bitmaps, i)));
    }
    g_ptr_array_add(argv, g_strdup(src->image));
    g_ptr_array_add(argv, NULL);
    return (char **)g_ptr_array_free(argv, FALSE);
}

NbdfsSource *nbdfs_source_open(const char *spec, char **command, bool read_only,
                               const char *format, GError **error)
{
    g_autoptr(NbdfsSource) src = g_new0(NbdfsSource, 1);
    g_auto(GStrv) qemu_nbd = NULL;

    src->spec = g_strdup(spec);
    src->image_fd = -1;
    if (command) {
        src->spawned = nbdfs_spawn_start(command, error);
        return src->spawned ? g_steal_pointer(&src) : NULL;
    }
    if (strstr(spec, "://")) {
        return g_steal_pointer(&src);
    }
    /* Absolute: a daemon changes to "/", and the server reopens files by path. */
    src->image = g_canonicalize_filename(spec, NULL);
    src->format = g_strdup(format ? format : probe_format(src->image, error));
    if (!src->format) {
        return NULL;
    }
    if (strcmp(src->format, "raw") == 0) {
        src->server = nbds_server_new(&(NbdsServerConfig){
            .read_only = read_only,
            .any_format = format != NULL,
            .control = true,       /* `nbdfs bitmap` works on a mounted image too */
        }, error);
        NbdsExport *exp = NULL;

        if (!src->server || !(exp = nbds_server_add_export(src->server, src->image, error)) ||
            !nbds_server_start_control(src->server, error)) {
            return NULL;
        }
        src->export = exp;
        src->image_fd = nbds_export_image_fd(exp);
        return g_steal_pointer(&src);
    }
    qemu_nbd = qemu_nbd_argv(src, read_only, error);
    if (!qemu_nbd) {
        return NULL;
    }
    src->spawned = nbdfs_spawn_start(qemu_nbd, error);
    if (!src->spawned) {
        g_prefix_error(error, "%s is a %s image: ", src->image, src->format);
        return NULL;
    }
    return g_steal_pointer(&src);
}

char *nbdfs_uri_with_export(const char *uri, const char *name)
{
    g_autoptr(GUri) parsed = g_uri_parse(uri, G_URI_FLAGS_ENCODED | G_URI_FLAGS_NON_DNS, NULL);
    g_autoptr(GUri) built = NULL;
    g_autofree char *escaped = NULL;
    g_autofree char *path = NULL;

    if (!parsed) {
        return NULL;
    }
    /* The path is "/" and the export name, percent-encoded ('/' may stay). */
    escaped = g_uri_escape_string(name, "/", FALSE);
    path = g_strconcat("/", escaped, NULL);
    built = g_uri_build(G_URI_FLAGS_ENCODED | G_URI_FLAGS_NON_DNS, g_uri_get_scheme(parsed),
                        g_uri_get_userinfo(parsed), g_uri_get_host(parsed),
                        g_uri_get_port(parsed), path, g_uri_get_query(parsed),
                        g_uri_get_fragment(parsed));
    return g_uri_to_string(built);
}

bool nbdfs_source_dial(NbdfsSource *src, const char *export_name, struct nbd_handle *h,
                       GError **error)
{
    g_autofree char *uri = NULL;
    int r;

    if (export_name && !src->server && nbd_set_export_name(h, export_name) == -1) {
        nbdfs_set_nbd_error(error, "export name");
        return false;
    }

    if (src->server) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
            g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "socketpair: %s",
                        g_strerror(errno));
            return false;
        }
        /* The server's replies to large reads should fit its end too. */
        nbdfs_enlarge_socket_buffers(sv[0]);
        nbds_server_serve_fd(src->server, sv[0]);
        r = nbd_aio_connect_socket(h, sv[1]);
    } else if (src->spawned) {
        /* It may have died since: a reconnection starts it again. */
        if (!nbdfs_spawn_ensure(src->spawned, error)) {
            return false;
        }
        r = nbd_aio_connect_unix(h, nbdfs_spawn_socket(src->spawned));
    } else {
        /* The URI names an export; another one is asked for by rewriting it. */
        uri = export_name ? nbdfs_uri_with_export(src->spec, export_name) : g_strdup(src->spec);
        if (!uri) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                        "%s: not a URI that can name another export", src->spec);
            return false;
        }
        r = nbd_aio_connect_uri(h, uri);
    }
    if (r == -1) {
        nbdfs_set_nbd_error(error, "cannot connect");
        return false;
    }
    return true;
}

bool nbdfs_source_shutdown(NbdfsSource *src)
{
    bool ok = true;

    if (src && src->server && !src->shut_down) {
        /* Ends the in-process connections, flushes the image, saves the bitmaps. */
        ok = nbds_server_shutdown(src->server);
        if (!ok) {
            g_warning("%s: flushing the image failed", src->image);
        }
    }
    if (src && src->spawned && !src->shut_down) {
        /* qemu-nbd flushes and closes the image cleanly on SIGTERM. */
        ok = nbdfs_spawn_free(g_steal_pointer(&src->spawned));
    }
    if (src) {
        src->shut_down = true;
    }
    return ok;
}

void nbdfs_source_free(NbdfsSource *src)
{
    if (!src) {
        return;
    }
    nbdfs_source_shutdown(src);
    if (src->server) {
        nbds_server_free(src->server);
    }
    if (src->skipped_bitmaps) {
        g_ptr_array_unref(src->skipped_bitmaps);
    }
    g_free(src->spec);
    g_free(src->image);
    g_free(src->format);
    g_free(src);
}
