/*
 * Block-status queries for the file system: the status at an offset, lseek
 * SEEK_DATA/SEEK_HOLE, allocated and dirty byte counts, runs for the dirty
 * files.  Answers come from each context's extent cache; a miss fetches one
 * large window from the server (a walk over many extents costs one request
 * per window the server answers, not one per lseek).
 */
#include "mount.h"

#include <errno.h>
#include <string.h>

#define DIRTY_BITMAP_PREFIX "qemu:dirty-bitmap:"
/* Runs a cache may hold: bounds memory even for a huge, fragmented export. */
#define MAX_ALLOCATION_RUNS (256u * 1024)
#define MAX_BITMAP_RUNS (128u * 1024)
/*
 * Writes invalidate whole grains around them: a server allocates (and reports)
 * in blocks or clusters, so neighbouring status may change too.
 */
#define CHANGE_GRAIN (UINT64_C(64) << 10)

NbdfsContext *nbdfs_context_new(const char *name, uint64_t export_size)
{
    NbdfsContext *ctx = g_new0(NbdfsContext, 1);

    ctx->name = g_strdup(name);
    if (g_str_has_prefix(name, DIRTY_BITMAP_PREFIX)) {
        ctx->bitmap = ctx->name + strlen(DIRTY_BITMAP_PREFIX);
    }
    ctx->cache = nbdfs_extent_cache_new(export_size,
                                        ctx->bitmap ? MAX_BITMAP_RUNS : MAX_ALLOCATION_RUNS);
    g_mutex_init(&ctx->total_lock);
    return ctx;
}

void nbdfs_context_free(NbdfsContext *ctx)
{
    if (!ctx) {
        return;
    }
    nbdfs_extent_cache_free(ctx->cache);
    g_mutex_clear(&ctx->total_lock);
    g_free(ctx->name);
    g_free(ctx);
}

bool nbdfs_status_is_data(const NbdfsContext *ctx, uint64_t status)
{
    return ctx->bitmap ? (status & LIBNBD_STATE_DIRTY) : !(status & LIBNBD_STATE_ZERO);
}

/* Is STATUS counted in st_blocks: allocated, or dirty? */
static bool status_is_counted(const NbdfsContext *ctx, uint64_t status)
{
    return ctx->bitmap ? (status & LIBNBD_STATE_DIRTY) : !(status & LIBNBD_STATE_HOLE);
}

int nbdfs_status_at(NbdfsMount *m, NbdfsContext *ctx, uint64_t offset, uint64_t *status,
                    uint64_t *end)
{
    g_autoptr(GArray) extents = NULL;
    uint64_t generation, start, pos;
    int err;

    g_assert(offset < m->size);
    /* Writes answered early must be in what the server says (and in the cache). */
    nbdfs_pending_drain(m);
    if (!ctx->served) {
        *status = 0;               /* data, allocated, clean */
        *end = m->size;
        return 0;
    }
    if (nbdfs_extent_cache_lookup(ctx->cache, offset, status, end)) {
        return 0;
    }
    generation = nbdfs_extent_cache_generation(ctx->cache);
    extents = g_array_new(FALSE, FALSE, sizeof(NbdfsExtent));
    err = nbdfs_client_block_status(m, ctx, offset, extents, &start);
    if (err) {
        return err;
    }
    if (nbdfs_extent_cache_insert(ctx->cache, generation, start,
                                  (const NbdfsExtent *)extents->data, extents->len) &&
        nbdfs_extent_cache_lookup(ctx->cache, offset, status, end)) {
        return 0;
    }
    /* Not cached (a write completed meanwhile): the answer still holds for this call. */
    pos = start;
    for (guint i = 0; i < extents->len && pos < m->size; i++) {
        const NbdfsExtent *e = &g_array_index(extents, NbdfsExtent, i);
        uint64_t e_end = e->length > m->size - pos ? m->size : pos + e->length;
        if (offset >= pos && offset < e_end) {
            *status = e->status;
            *end = e_end;
            return 0;
        }
        pos = e_end;
    }
    g_warning("block status of %s: the answer does not cover offset %" G_GUINT64_FORMAT,
              ctx->name, offset);
    return EIO;
}

int nbdfs_seek(NbdfsMount *m, NbdfsContext *ctx, uint64_t offset, bool data, uint64_t *result)
{
    if (offset >= m->size) {
        return ENXIO;              /* as for any file: nothing at or past its end */
    }
    while (offset < m->size) {
        uint64_t status, end;
        int err = nbdfs_status_at(m, ctx, offset, &status, &end);
        if (err) {
            return err;
        }
        if (nbdfs_status_is_data(ctx, status) == data) {
            *result = offset;
            return 0;
        }
        offset = end;
    }
    if (data) {
        return ENXIO;
    }
    *result = m->size;             /* the implicit hole at the end */
    return 0;
}

int nbdfs_for_each_run(NbdfsMount *m, NbdfsContext *ctx, uint64_t start, uint64_t end,
                       NbdfsRunFn fn, gpointer data)
{
    uint64_t run_start = start, run_status = 0, pos = start;

    while (pos < end) {
        uint64_t status, status_end;
        int err = nbdfs_status_at(m, ctx, pos, &status, &status_end);
        if (err) {
            return err;
        }
        if (pos > run_start && status != run_status) {
            if (!fn(run_start, pos - run_start, run_status, data)) {
                return 0;
            }
            run_start = pos;
        }
        run_status = status;
        pos = MIN(status_end, end);
    }
    if (end > run_start) {
        fn(run_start, end - run_start, run_status, data);
    }
    return 0;
}

typedef struct {
    const NbdfsContext *ctx;
    uint64_t total;
} CountData;

static bool count_run(uint64_t offset, uint64_t length, uint64_t status, gpointer data)
{
    CountData *d = data;

    (void)offset;
    if (status_is_counted(d->ctx, status)) {
        d->total += length;
    }
    return true;
}

bool nbdfs_counted_bytes_cached(NbdfsContext *ctx, uint64_t *bytes)
{
    uint64_t generation = nbdfs_extent_cache_generation(ctx->cache);
    bool valid;

    g_mutex_lock(&ctx->total_lock);
    valid = ctx->total_valid && ctx->total_generation == generation;
    if (valid) {
        *bytes = ctx->total;
    }
    g_mutex_unlock(&ctx->total_lock);
    return valid;
}

int nbdfs_counted_bytes(NbdfsMount *m, NbdfsContext *ctx, uint64_t *bytes)
{
    CountData d = { .ctx = ctx };
    uint64_t generation = nbdfs_extent_cache_generation(ctx->cache);
    int err;

    if (!ctx->served) {
        *bytes = ctx->bitmap ? 0 : m->size;
        return 0;
    }
    if (nbdfs_counted_bytes_cached(ctx, bytes)) {
        return 0;
    }

    err = nbdfs_for_each_run(m, ctx, 0, m->size, count_run, &d);
    if (err) {
        return err;
    }
    g_mutex_lock(&ctx->total_lock);
    /* Keep the sum only if nothing changed while it was computed. */
    if (nbdfs_extent_cache_generation(ctx->cache) == generation) {
        ctx->total_valid = true;
        ctx->total_generation = generation;
        ctx->total = d.total;
    }
    g_mutex_unlock(&ctx->total_lock);
    *bytes = d.total;
    return 0;
}

void nbdfs_contexts_forget(NbdfsMount *m)
{
    nbdfs_extent_cache_clear(m->allocation->cache);
    for (guint i = 0; i < m->bitmaps->len; i++) {
        nbdfs_extent_cache_clear(((NbdfsContext *)g_ptr_array_index(m->bitmaps, i))->cache);
    }
}

void nbdfs_contexts_changed(NbdfsMount *m, uint64_t offset, uint64_t length)
{
    uint64_t grain = MAX(CHANGE_GRAIN, m->min_block);
    uint64_t lo = offset - offset % grain;
    uint64_t hi = offset + length;

    hi = hi % grain ? hi + (grain - hi % grain) : hi;
    nbdfs_extent_cache_invalidate(m->allocation->cache, lo, hi - lo);
    /* A bitmap's granularity is unknown here: forget it all (it is refetched on demand). */
    for (guint i = 0; i < m->bitmaps->len; i++) {
        NbdfsContext *ctx = g_ptr_array_index(m->bitmaps, i);
        nbdfs_extent_cache_clear(ctx->cache);
    }
}
