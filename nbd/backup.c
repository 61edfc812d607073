/*
 * Backup views: a read-only export that shows an image exactly as it was at
 * one instant, while clients keep writing the image (copy-before-write).
 *
 * Begin, with the image's write gate held exclusively (no write half done):
 * the view starts to count, and with a bitmap NAME, a frozen copy of NAME
 * becomes the view's qemu:dirty-bitmap:NAME and NAME itself restarts empty,
 * saved (in use) before anything else is written.  From then on every
 * write-type request, inside the gate (shared), first copies each 64 KiB
 * cluster it touches that the view still reads from the image into the
 * view's scratch file (at the same offset: a sparse file the image's size),
 * then marks the cluster copied, then writes the image.  End drops the view;
 * abort also merges the frozen copy back into NAME, so a failed backup loses
 * no change.  A server killed meanwhile leaves NAME's sidecar in use, so
 * NAME is all dirty next time: a change is never missed.
 *
 * Threads: copiers (workers running writes) take the view's copy_lock; view
 * readers take no lock at all.  A reader reads a cluster from the scratch
 * file when its copied bit is set (that data never changes again), else
 * from the image, and then looks at the bits again: it keeps what it read
 * only up to the first cluster copied meanwhile (that one may have new
 * data in the image), and reads the rest again, from the scratch file
 * where copied.  This is sound because a cluster's bit is set after its old
 * data is in the scratch file and before the image changes (fences on both
 * sides), and bits are never cleared.  So readers never wait for writers,
 * and writers never wait for readers, however many a backup copy runs.
 *
 * A copy that fails (ENOSPC in the scratch file) breaks the view before the
 * image changes: the write goes on, and the view's reads fail with EIO from
 * then on (broken is checked after every read).
 *
 * The list of views of an export changes only under its gate held
 * exclusively (by the control thread), so writers read it under their
 * shared hold.  A view's export is in the server's list for clients; end
 * waits (bounded) until no connection holds it.
 */
#include "internal.h"

#include <errno.h>
#include <string.h>

#include <gio/gio.h>

/* What one copy-before-write moves: qemu's default cluster. */
#define CLUSTER (64u << 10)
/* How long end and abort wait for the view's clients to disconnect. */
#define END_WAIT_US (5 * G_USEC_PER_SEC)

struct NbdsBackupView {
    NbdsExport *source;
    NbdsExport *export;            /* read-only, what clients connect to */
    char *bitmap;                  /* NAME whose changes the view carries, or NULL */
    NbdsBitmap *frozen;            /* NAME as it was at the start */
    NbdsImage *scratch;            /* old data of clusters rewritten since the start */
    char *scratch_dir;
    NbdsBitmap *copied;            /* granule CLUSTER: the old data is in scratch */
    GMutex copy_lock;              /* one copier at a time; readers never take it */
    uint8_t *buffer;               /* CLUSTER bytes, under copy_lock */
    gint broken;                   /* errno that broke the view, 0 if none */
    guint64 bytes_copied;          /* atomic: old data kept */
    char *started;                 /* UTC, ISO 8601 */
};

static void view_free(NbdsBackupView *v)
{
    if (!v) {
        return;
    }
    nbds_export_free(v->export);
    nbds_image_close(v->scratch);
    nbds_bitmap_free(v->frozen);
    nbds_bitmap_free(v->copied);
    g_mutex_clear(&v->copy_lock);
    g_free(v->buffer);
    g_free(v->bitmap);
    g_free(v->scratch_dir);
    g_free(v->started);
    g_free(v);
}

/* ---- the data path ---- */

/* The old data of [START, STOP) (within one cluster) into the scratch file. */
static int copy_cluster(NbdsBackupView *v, uint64_t start, uint64_t stop)
{
    NbdsImage *img = v->source->image;

    for (uint64_t pos = start; pos < stop;) {
        bool hole;
        uint64_t run_end;
        int err = nbds_image_next_run(img, pos, stop, &hole, &run_end);
        if (err) {
            return err;
        }
        /* A hole stays one: the scratch file reads as zeros where nothing was written. */
        if (!hole) {
            err = nbds_image_pread(img, v->buffer, run_end - pos, pos);
            if (!err) {
                err = nbds_image_pwrite(v->scratch, v->buffer, run_end - pos, pos, false);
            }
            if (err) {
                return err;
            }
            __atomic_fetch_add(&v->bytes_copied, run_end - pos, __ATOMIC_RELAXED);
        }
        pos = run_end;
    }
    return 0;
}

static void break_view(NbdsBackupView *v, int err)
{
    g_atomic_int_set(&v->broken, err);
    g_warning("backup view '%s' of %s is broken: cannot keep old data in %s: %s; its reads "
              "fail from now on (the image is not affected)", v->export->name,
              nbds_image_path(v->source->image), v->scratch_dir, g_strerror(err));
    nbds_image_shrink_to_nothing(v->scratch);      /* its space is of no use now */
}

static void preserve(NbdsBackupView *v, uint64_t offset, uint64_t len)
{
    uint64_t end = offset + len, size = nbds_image_size(v->source->image);

    if (len == 0 || g_atomic_int_get(&v->broken)) {
        return;
    }
    /* Rewrites of clusters already kept cost nothing more. */
    if (nbds_bitmap_test(v->copied, offset) && nbds_bitmap_run_end(v->copied, offset, end) >= end) {
        return;
    }
    g_mutex_lock(&v->copy_lock);
    for (uint64_t pos = offset / CLUSTER * CLUSTER; pos < end && !g_atomic_int_get(&v->broken);) {
        uint64_t next = nbds_bitmap_run_end(v->copied, pos, end);
        if (!nbds_bitmap_test(v->copied, pos)) {
            for (uint64_t c = pos; c < next; c += CLUSTER) {
                int err = copy_cluster(v, c, MIN(c + CLUSTER, size));
                if (err) {
                    break_view(v, err);
                    goto out;
                }
                /* The old data is in place before anyone may rely on the bit... */
                __atomic_thread_fence(__ATOMIC_RELEASE);
                nbds_bitmap_set(v->copied, c, 1);
                /* ...and the bit is set before the image changes. */
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
            }
        }
        pos = next;
    }
out:
    g_mutex_unlock(&v->copy_lock);
}

void nbds_backup_before_write(NbdsExport *exp, uint64_t offset, uint64_t len)
{
    for (guint i = 0; i < exp->views->len; i++) {
        preserve(g_ptr_array_index(exp->views, i), offset, len);
    }
}

/*
 * [OFFSET, END) was read from the image: how much of it still holds the
 * view's bytes (see the top), up to the first cluster copied meanwhile.
 * Nothing (at most OFFSET) when OFFSET's own cluster was.
 */
static uint64_t still_valid(NbdsBackupView *v, uint64_t offset, uint64_t end)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);      /* the image's bytes were read first */
    return nbds_bitmap_next_set(v->copied, offset, end);
}

/* Whether OFFSET's cluster is in the scratch file; what is read there after this is its. */
static bool is_copied(NbdsBackupView *v, uint64_t offset)
{
    bool copied = nbds_bitmap_test(v->copied, offset);

    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return copied;
}

int nbds_backup_view_pread(NbdsBackupView *v, void *buf, uint64_t len, uint64_t offset)
{
    uint8_t *p = buf;
    uint64_t end = offset + len;

    for (uint64_t pos = offset; pos < end;) {
        bool copied = is_copied(v, pos);
        uint64_t run_end = nbds_bitmap_run_end(v->copied, pos, end);
        int err = nbds_image_pread(copied ? v->scratch : v->source->image, p + (pos - offset),
                                   run_end - pos, pos);
        if (err) {
            return err;
        }
        if (!copied) {
            run_end = still_valid(v, pos, run_end);
            if (run_end <= pos) {
                continue;                          /* again, from the scratch file */
            }
        }
        pos = run_end;
    }
    return g_atomic_int_get(&v->broken) ? EIO : 0;
}

int nbds_backup_view_next_run(NbdsBackupView *v, uint64_t offset, uint64_t end,
                              bool *is_hole, uint64_t *run_end)
{
    for (;;) {
        bool copied = is_copied(v, offset);
        uint64_t same = nbds_bitmap_run_end(v->copied, offset, end);
        int err = nbds_image_next_run(copied ? v->scratch : v->source->image, offset, same,
                                      is_hole, run_end);
        if (err) {
            return err;
        }
        if (copied) {
            break;
        }
        *run_end = still_valid(v, offset, *run_end);
        if (*run_end > offset) {
            break;
        }
    }
    return g_atomic_int_get(&v->broken) ? EIO : 0;
}

/* The view's qemu:dirty-bitmap:NAME: the frozen copy. */
static int frozen_extents(NbdsExport *exp, const NbdsMetaContext *ctx, NbdsExtents *e)
{
    return nbds_bitmap_extents(exp->view->source->bitmaps, ctx->opaque, e);
}

/* ---- commands ---- */

static NbdsBackupView *find_view(NbdsExport *src, const char *name, GError **error)
{
    for (guint i = 0; i < src->views->len; i++) {
        NbdsBackupView *v = g_ptr_array_index(src->views, i);
        if (name[0] ? strcmp(v->export->name, name) == 0 : src->views->len == 1) {
            return v;
        }
    }
    if (name[0]) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND, "no backup view named '%s'", name);
    } else if (src->views->len == 0) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND, "no backup view is open");
    } else {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "%u backup views are open: name one", src->views->len);
    }
    return NULL;
}

static bool view_name_valid(NbdsServer *s, const char *name, GError **error)
{
    bool taken;

    if (strlen(name) > NBDS_MAX_STRING || !g_utf8_validate(name, -1, NULL)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "a view's name is an export name: UTF-8, at most %d bytes", NBDS_MAX_STRING);
        return false;
    }
    g_mutex_lock(&s->exports_lock);
    taken = nbds_server_find_export_locked(s, name) != NULL;
    g_mutex_unlock(&s->exports_lock);
    if (taken) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_EXISTS,
                    "an export named '%s' exists already (--view names another)", name);
    }
    return !taken;
}

static bool backup_begin(NbdsServer *s, NbdsExport *src, const char *view_name,
                         const char *bitmap, const char *scratch_dir, GString *out,
                         GError **error)
{
    g_autofree char *name = view_name[0] ? g_strdup(view_name)
                                         : g_strconcat(src->name, "@backup", NULL);
    uint64_t size = nbds_image_size(src->image);
    g_autoptr(GDateTime) now = g_date_time_new_now_utc();
    NbdsBackupView *v;
    NbdsImage *scratch;

    if (s->listen_fds->len == 0) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_SUPPORTED,
                    "its server (a mount's own) listens on no socket a view could be reached "
                    "on: serve the image with nbdfs serve, and mount that");
        return false;
    }
    if (!view_name_valid(s, name, error)) {
        return false;
    }
    if (!scratch_dir[0] && nbds_image_is_block_device(src->image)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "the image is a block device: name a directory for the scratch file "
                    "(--scratch DIR)");
        return false;
    }
    if (bitmap[0] && !nbds_bitmaps_find(src->bitmaps, bitmap)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND, "no bitmap named '%s'", bitmap);
        return false;
    }
    v = g_new0(NbdsBackupView, 1);
    v->scratch_dir = scratch_dir[0] ? g_strdup(scratch_dir)
                                    : g_path_get_dirname(nbds_image_path(src->image));
    scratch = nbds_image_new_scratch(v->scratch_dir, size, error);
    if (!scratch) {
        g_free(v->scratch_dir);
        g_free(v);
        return false;
    }
    v->source = src;
    v->scratch = scratch;
    v->copied = nbds_bitmap_new(CLUSTER, size);
    v->buffer = g_malloc(CLUSTER);
    g_mutex_init(&v->copy_lock);
    v->started = g_date_time_format(now, "%Y-%m-%dT%H:%M:%SZ");
    v->export = nbds_export_new(name, src->image, true);
    v->export->view = v;
    v->export->description = g_strdup_printf("%s as of %s (backup view)", src->name,
                                             v->started);

    /* The instant: no write is half done while the view starts and NAME restarts. */
    pthread_rwlock_wrlock(&src->gate);
    if (bitmap[0]) {
        NbdsBitmap *bm = nbds_bitmaps_find(src->bitmaps, bitmap);
        g_autofree char *context = g_strconcat("qemu:dirty-bitmap:", bitmap, NULL);
        bool saved = false;

        v->bitmap = g_strdup(bitmap);
        v->frozen = nbds_bitmap_copy(bm, size);
        if (!nbds_bitmaps_edit_in_use(src->bitmaps, NBDS_BITMAP_CLEAR, bitmap, 0, &saved,
                                      error) || !saved) {
            nbds_bitmap_merge(bm, v->frozen);     /* as it was: nothing is lost */
            pthread_rwlock_unlock(&src->gate);
            g_prefix_error(error, "bitmap '%s' could not restart: ", bitmap);
            view_free(v);
            return false;
        }
        nbds_meta_add(v->export, context, frozen_extents, v->frozen);
    }
    g_ptr_array_add(src->views, v);
    pthread_rwlock_unlock(&src->gate);

    g_mutex_lock(&s->exports_lock);
    g_ptr_array_add(s->exports, v->export);
    g_mutex_unlock(&s->exports_lock);
    g_message("%s: backup view '%s' begun%s%s%s", nbds_image_path(src->image), name,
              bitmap[0] ? " (bitmap '" : "", bitmap, bitmap[0] ? "' restarted)" : "");
    nbds_control_info(out, "view", name, NULL);
    return true;
}

static void log_dropped(NbdsBackupView *v, const char *how, bool given_back)
{
    if (v->frozen && given_back) {
        g_message("%s: backup view '%s' %s: its changes are back in bitmap '%s'",
                  nbds_image_path(v->source->image), v->export->name, how, v->bitmap);
    } else {
        g_message("%s: backup view '%s' %s", nbds_image_path(v->source->image),
                  v->export->name, how);
    }
}

/* An aborted view's changes go back into its bitmap; false (with WHY) if they cannot. */
static bool give_back(NbdsBackupView *v, const char **why)
{
    NbdsBitmap *bm;

    if (!v->frozen) {
        return true;
    }
    bm = nbds_bitmaps_find(v->source->bitmaps, v->bitmap);
    if (!bm) {
        *why = "it was removed";
        return false;
    }
    nbds_bitmap_merge(bm, v->frozen);
    return true;
}

static bool backup_finish(NbdsServer *s, NbdsExport *src, const char *view_name, bool abort,
                          GString *out, GError **error)
{
    NbdsBackupView *v = find_view(src, view_name, error);
    gint64 deadline = g_get_monotonic_time() + END_WAIT_US;
    const char *why = NULL;
    bool given = true;
    guint index;
    int refs, clients, err = 0;

    if (!v) {
        return false;
    }
    /* Its clients first (an unmount may still be closing its connection). */
    g_mutex_lock(&s->exports_lock);
    while (v->export->refs > 0 &&
           g_cond_wait_until(&s->exports_cond, &s->exports_lock, deadline)) {
    }
    refs = v->export->refs;
    clients = MAX(v->export->clients, 1);      /* one may hold it while negotiating */
    if (refs == 0 && g_ptr_array_find(s->exports, v->export, &index)) {
        g_ptr_array_steal_index(s->exports, index);
    }
    g_mutex_unlock(&s->exports_lock);
    if (refs > 0) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_BUSY,
                    "backup view '%s' is still in use by %d client connection%s: disconnect "
                    "them (unmount the view) first", v->export->name, clients,
                    clients == 1 ? "" : "s");
        return false;
    }

    pthread_rwlock_wrlock(&src->gate);
    g_ptr_array_remove(src->views, v);
    if (abort) {
        given = give_back(v, &why);
    }
    pthread_rwlock_unlock(&src->gate);
    if (abort && given && v->frozen) {
        err = nbds_bitmaps_sync(src->bitmaps);
    }
    log_dropped(v, abort ? "aborted" : "ended", abort && given);
    if (!given) {
        g_autofree char *line = g_strdup_printf("bitmap '%s' no longer exists (%s): its "
                                                "changes before the view have nowhere to go",
                                                v->bitmap, why);
        nbds_control_info(out, "warning", line, NULL);
    }
    if (err) {
        g_autofree char *line = g_strdup_printf("bitmap '%s' is not saved yet (it is at the "
                                                "next flush or at shutdown): %s", v->bitmap,
                                                g_strerror(err));
        nbds_control_info(out, "warning", line, NULL);
    }
    view_free(v);
    return true;
}

/* "info view NAME BITMAP STARTED COPIED-BYTES SCRATCH-BYTES CLIENTS STATE" per view. */
static void backup_list(NbdsServer *s, NbdsExport *src, GString *out)
{
    for (guint i = 0; i < src->views->len; i++) {
        NbdsBackupView *v = g_ptr_array_index(src->views, i);
        int broken = g_atomic_int_get(&v->broken);
        char copied[24], scratch[24], clients[16];

        g_snprintf(copied, sizeof(copied), "%" G_GUINT64_FORMAT,
                   (guint64)__atomic_load_n(&v->bytes_copied, __ATOMIC_RELAXED));
        g_snprintf(scratch, sizeof(scratch), "%" G_GUINT64_FORMAT,
                   nbds_image_allocated_bytes(v->scratch));
        g_mutex_lock(&s->exports_lock);
        g_snprintf(clients, sizeof(clients), "%d", v->export->clients);
        g_mutex_unlock(&s->exports_lock);
        nbds_control_info(out, "view", v->export->name, v->bitmap ? v->bitmap : "", v->started,
                          copied, scratch, clients, broken ? g_strerror(broken) : "ok", NULL);
    }
}

bool nbds_backup_command(NbdsServer *s, NbdsExport *exp, char **argv, GString *out,
                         GError **error)
{
    guint n = argv ? g_strv_length(argv) : 0;

    if (n == 1 && strcmp(argv[0], "list") == 0) {
        backup_list(s, exp, out);
        return true;
    }
    if (n == 4 && strcmp(argv[0], "begin") == 0) {
        if (exp->read_only) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_READ_ONLY,
                        "the image is served read-only: it does not change under a backup");
            return false;
        }
        return backup_begin(s, exp, argv[1], argv[2], argv[3], out, error);
    }
    if (n == 2 && (strcmp(argv[0], "end") == 0 || strcmp(argv[0], "abort") == 0)) {
        return backup_finish(s, exp, argv[1], strcmp(argv[0], "abort") == 0, out, error);
    }
    g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT, "bad backup request");
    return false;
}

void nbds_backup_abort_all(NbdsServer *s)
{
    for (guint i = 0; i < s->exports->len; i++) {
        NbdsExport *src = g_ptr_array_index(s->exports, i);

        while (src->views && src->views->len > 0) {
            NbdsBackupView *v = g_ptr_array_steal_index(src->views, src->views->len - 1);
            const char *why = NULL;
            guint index;

            if (g_ptr_array_find(s->exports, v->export, &index)) {
                g_ptr_array_steal_index(s->exports, index);
                if (index < i) {
                    i--;
                }
            }
            if (!give_back(v, &why)) {
                g_warning("%s: backup view '%s' dropped at shutdown; bitmap '%s': %s",
                          nbds_image_path(src->image), v->export->name, v->bitmap, why);
            }
            log_dropped(v, "dropped at shutdown", why == NULL);
            view_free(v);
        }
    }
}
