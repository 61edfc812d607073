/*
 * The exports a mount shows: one, or (--all) every export the server lists,
 * each in a directory of its own and connected only when first used, so a
 * server with hundreds of exports mounts at once and only the exports in
 * use hold connections and threads.
 *
 * The first FUSE thread that needs a closed export opens it, bounded by
 * --timeout (it drives its own handshake: it waits on nobody); other
 * threads wanting the same export wait on open_cond until it is done, a
 * wait that ends with that bounded open.  An export that failed to open
 * answers EIO for OPEN_RETRY_S seconds, then is tried again.  Once open, an
 * export stays open (reconnecting if need be) until the orderly stop.
 */
#include "mount.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include <gio/gio.h>

#define OPEN_RETRY_S 5
/* Room left in a 255-byte file name for a "~N" that makes it unique. */
#define DIR_NAME_MAX 240

/*
 * A new open file description of the image FD (or -1): it shares no lock
 * with the server's (flock is per description), so the kernel may keep it
 * as a passthrough file's backing file for as long as it likes.
 */
static int reopen_image(int fd)
{
    g_autofree char *path = NULL;
    int copy;

    if (fd < 0) {
        return -1;
    }
    path = g_strdup_printf("/proc/self/fd/%d", fd);
    copy = open(path, O_RDONLY | O_CLOEXEC);
    return copy >= 0 ? copy : fcntl(fd, F_DUPFD_CLOEXEC, 0);
}

NbdfsMount *nbdfs_fs_add_export(NbdfsFs *fs, const char *ask_name, const char *dir_name)
{
    NbdfsMount *m = g_new0(NbdfsMount, 1);

    m->fs = fs;
    m->source = fs->source;
    /*
     * Its own descriptor, closed with the export (nbdfs_fs_close_export).
     * Writable, the server's own description: a passthrough backing file
     * then holds the image's exclusive lock for as long as the kernel may
     * write through it (files left open after the mount's process ended).
     */
    m->image_fd = fs->read_only ? reopen_image(fs->source->image_fd)
                  : fs->source->image_fd >= 0 ? fcntl(fs->source->image_fd, F_DUPFD_CLOEXEC, 0)
                                              : -1;
    m->ask_name = g_strdup(ask_name);
    m->dir_name = g_strdup(dir_name);
    /* Export i's inodes: (i + 1) << 32 plus those of inodes.c; the top is 1. */
    m->ino_base = fs->all ? (fuse_ino_t)(fs->exports->len + 1) << 32 : 0;
    m->timeout = fs->timeout;
    m->pending = nbdfs_pending_new();
    m->reconnect_cancel_fd = -1;
    g_mutex_init(&m->ios_lock);
    g_cond_init(&m->ios_cond);
    g_mutex_init(&m->files_lock);
    g_mutex_init(&m->reconnect_lock);
    g_cond_init(&m->reconnect_cond);
    g_ptr_array_add(fs->exports, m);
    return m;
}

void nbdfs_fs_free_export(NbdfsMount *m)
{
    nbdfs_files_forget(m);
    nbdfs_pending_free(m->pending);
    if (m->bitmaps) {
        g_ptr_array_unref(m->bitmaps);
    }
    nbdfs_context_free(m->allocation);
    nbdfs_export_identity_clear(&m->identity);
    g_free(m->export_name);
    g_free(m->file_name);
    g_free(m->dir_name);
    g_free(m->ask_name);
    g_mutex_clear(&m->ios_lock);
    g_cond_clear(&m->ios_cond);
    g_mutex_clear(&m->files_lock);
    g_mutex_clear(&m->reconnect_lock);
    g_cond_clear(&m->reconnect_cond);
    g_free(m);
}

/*
 * The virtual disk of an image of another format is raw bytes: "vm.qcow2"
 * shows as "vm.raw", so nothing takes it for the container.
 */
static char *raw_name(const char *image, const char *format)
{
    g_autofree char *base = g_path_get_basename(image);
    const char *ext = strcmp(format, "vpc") == 0 ? ".vhd" : NULL;
    g_autofree char *fmt_ext = g_strconcat(".", format, NULL);
    char *dot = strrchr(base, '.');

    if (dot && dot != base && (strcmp(dot, fmt_ext) == 0 || (ext && strcmp(dot, ext) == 0))) {
        *dot = '\0';
    }
    return g_strconcat(base, ".raw", NULL);
}

static char *choose_file_name(const NbdfsMount *m)
{
    if (m->fs->file_name) {
        return g_strdup(m->fs->file_name);
    }
    if (m->source->image && m->source->spawned) {
        return raw_name(m->source->image, m->source->format);
    }
    if (m->source->image) {
        return g_path_get_basename(m->source->image);
    }
    if (m->export_name[0]) {
        char *name = g_strdelimit(g_strdup(m->export_name), "/", '_');
        /* "..", "dirty", a name too long: the export is just the disk. */
        if (nbdfs_valid_file_name(name)) {
            return name;
        }
        g_free(name);
    }
    return g_strdup("disk");
}

void nbdfs_fs_close_export(NbdfsMount *m)
{
    nbdfs_client_stop_reconnect(m);
    nbdfs_client_stop(m);
    /*
     * With the source, before 'nbdfs umount' returns (the kernel lets go of
     * a passthrough backing file with the FUSE connection).
     */
    if (m->image_fd >= 0) {
        close(m->image_fd);
        m->image_fd = -1;
    }
}

bool nbdfs_fs_open_export(NbdfsMount *m, GError **error)
{
    if (!nbdfs_client_connect(m, m->fs->connections, error)) {
        return false;
    }
    m->read_only |= m->fs->read_only;
    /* A local image is locked by the in-process server: nobody else writes it. */
    m->keep_cache = m->source->image != NULL;
    m->file_name = choose_file_name(m);
    if (!nbdfs_valid_file_name(m->file_name)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_FILENAME,
                    "'%s' cannot be the export's file name (choose one with --name)",
                    m->file_name);
        nbdfs_fs_close_export(m);
        return false;
    }
    if (!nbdfs_client_start(m, error) || !nbdfs_client_start_reconnect(m, error)) {
        nbdfs_fs_close_export(m);
        return false;
    }
    g_debug("%s%s%" G_GUINT64_FORMAT " bytes, %u connection(s), %u dirty bitmap(s)%s",
            m->dir_name ? m->dir_name : "", m->dir_name ? ": " : "", m->size, m->n_conns,
            m->bitmaps->len, m->read_only ? ", read-only" : "");
    g_mutex_lock(&m->fs->open_lock);
    m->state = NBDFS_EXPORT_OPEN;
    g_mutex_unlock(&m->fs->open_lock);
    return true;
}

int nbdfs_fs_export_ready(NbdfsMount *m)
{
    NbdfsFs *fs = m->fs;
    g_autoptr(GError) error = NULL;
    bool ok;

    g_mutex_lock(&fs->open_lock);
    while (m->state == NBDFS_EXPORT_OPENING) {
        g_cond_wait(&fs->open_cond, &fs->open_lock);
    }
    if (m->state == NBDFS_EXPORT_OPEN) {
        g_mutex_unlock(&fs->open_lock);
        return 0;
    }
    if (fs->stopping || (m->state == NBDFS_EXPORT_FAILED &&
                         g_get_monotonic_time() - m->failed_at < OPEN_RETRY_S * G_USEC_PER_SEC)) {
        g_mutex_unlock(&fs->open_lock);
        return EIO;
    }
    m->state = NBDFS_EXPORT_OPENING;
    g_mutex_unlock(&fs->open_lock);

    ok = nbdfs_fs_open_export(m, &error);
    if (!ok) {
        g_warning("%s: %s", m->dir_name, error->message);
    }
    g_mutex_lock(&fs->open_lock);
    if (!ok) {
        m->state = NBDFS_EXPORT_FAILED;
        m->failed_at = g_get_monotonic_time();
    }
    g_cond_broadcast(&fs->open_cond);
    g_mutex_unlock(&fs->open_lock);
    return ok ? 0 : EIO;
}

bool nbdfs_fs_export_is_open(NbdfsMount *m)
{
    bool open;

    g_mutex_lock(&m->fs->open_lock);
    open = m->state == NBDFS_EXPORT_OPEN;
    g_mutex_unlock(&m->fs->open_lock);
    return open;
}

void nbdfs_fs_stop_opening(NbdfsFs *fs)
{
    g_mutex_lock(&fs->open_lock);
    fs->stopping = true;
    g_mutex_unlock(&fs->open_lock);
}

/*
 * A directory name for the export NAME: no '/', not "." or "..", the
 * default export ("") as "default", at most DIR_NAME_MAX bytes, and unlike
 * any in TAKEN (then "~2", "~3"...), which it joins.
 */
static char *dir_name_for(const char *name, GHashTable *taken)
{
    g_autofree char *base = g_strdelimit(g_strdup(name[0] ? name : "default"), "/", '_');
    char *dir;

    if (strcmp(base, ".") == 0 || strcmp(base, "..") == 0) {
        g_free(base);
        base = g_strconcat("_", name, NULL);
    }
    if (strlen(base) > DIR_NAME_MAX) {
        base[DIR_NAME_MAX] = '\0';
    }
    dir = g_strdup(base);
    for (unsigned n = 2; g_hash_table_contains(taken, dir); n++) {
        g_free(dir);
        dir = g_strdup_printf("%s~%u", base, n);
    }
    g_hash_table_add(taken, dir);
    return g_strdup(dir);
}

bool nbdfs_fs_list_exports(NbdfsFs *fs, GError **error)
{
    struct nbd_handle *h = nbdfs_handle_new(true, error);
    g_autoptr(GPtrArray) entries = NULL;
    g_autoptr(GHashTable) taken = NULL;

    if (!h) {
        return false;
    }
    if (!nbdfs_source_connect(fs->source, NULL, h, fs->timeout, -1, error)) {
        nbd_close(h);
        return false;
    }
    if (!nbd_aio_is_negotiating(h)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_SUPPORTED,
                    "the server cannot list its exports (it has no options): mount it "
                    "without --all");
        nbd_close(h);
        return false;
    }
    entries = nbdfs_list_exports(h, fs->timeout, error);
    nbdfs_end_negotiation(h);
    nbd_close(h);
    if (!entries) {
        g_prefix_error(error, "cannot list the exports: ");
        return false;
    }
    if (entries->len == 0) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND, "the server lists no exports");
        return false;
    }
    taken = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
    for (guint i = 0; i < entries->len; i++) {
        NbdfsExportEntry *e = g_ptr_array_index(entries, i);
        g_autofree char *dir = dir_name_for(e->name, taken);
        nbdfs_fs_add_export(fs, e->name, dir);
    }
    return true;
}
