/*
 * Write-behind: a write to the export is answered as soon as its NBD command
 * is sent, so a writer's next write(2) overlaps the server's work on this
 * one.  Until the server answers, the write's range is pending:
 *
 *   - a read or another write overlapping it waits (an NBD server may run
 *     the requests of a connection in any order);
 *   - block-status queries, fallocate, fsync and close wait for every
 *     pending write;
 *   - a failure is kept, and the next fsync or close reports it (as a
 *     kernel's own write-back does).
 *
 * Waiting happens in the worker's nested loop (loop.c), which keeps driving
 * its own connection; a completion on any thread wakes the waiters.  The
 * bytes pending are bounded, which bounds memory and what a failure can lose.
 */
#include "mount.h"

#include <errno.h>

#define MAX_PENDING_BYTES (UINT64_C(32) << 20)
#define MAX_PENDING_WRITES 256

typedef struct {
    uint64_t start, end;
} Range;

struct NbdfsPending {
    GMutex lock;
    GArray *ranges;                /* Range: the writes in flight */
    uint64_t bytes;
    int error;                     /* the first failure not yet reported */
    gint count;                    /* ranges->len, readable without the lock */
    gint waiters;
};

NbdfsPending *nbdfs_pending_new(void)
{
    NbdfsPending *p = g_new0(NbdfsPending, 1);

    g_mutex_init(&p->lock);
    p->ranges = g_array_new(FALSE, FALSE, sizeof(Range));
    return p;
}

void nbdfs_pending_free(NbdfsPending *p)
{
    if (p) {
        g_array_unref(p->ranges);
        g_mutex_clear(&p->lock);
        g_free(p);
    }
}

static bool overlaps_locked(NbdfsPending *p, uint64_t start, uint64_t end)
{
    for (guint i = 0; i < p->ranges->len; i++) {
        const Range *r = &g_array_index(p->ranges, Range, i);
        if (r->start < end && start < r->end) {
            return true;
        }
    }
    return false;
}

typedef struct {
    NbdfsPending *p;
    uint64_t start, end;
    bool reserve;                  /* also wait for room in the budget */
} WaitFor;

static bool range_free(gpointer data)
{
    WaitFor *w = data;
    bool free;

    g_mutex_lock(&w->p->lock);
    free = !overlaps_locked(w->p, w->start, w->end) &&
           (!w->reserve || w->p->ranges->len == 0 ||
            (w->p->bytes + (w->end - w->start) <= MAX_PENDING_BYTES &&
             w->p->ranges->len < MAX_PENDING_WRITES));
    if (free && w->reserve) {
        Range r = { w->start, w->end };
        g_array_append_val(w->p->ranges, r);
        w->p->bytes += w->end - w->start;
        g_atomic_int_set(&w->p->count, w->p->ranges->len);
    }
    g_mutex_unlock(&w->p->lock);
    return free;
}

/* Wait (driving this worker's connection) until W's range is free. */
static void wait_for(NbdfsMount *m, WaitFor *w)
{
    if (range_free(w)) {
        return;
    }
    g_atomic_int_inc(&w->p->waiters);
    nbdfs_loop_wait(m, range_free, w);
    g_atomic_int_add(&w->p->waiters, -1);
}

void nbdfs_pending_begin(NbdfsMount *m, uint64_t offset, uint64_t length)
{
    WaitFor w = { m->pending, offset, offset + length, true };

    wait_for(m, &w);
}

void nbdfs_pending_end(NbdfsMount *m, uint64_t offset, uint64_t length, int err)
{
    NbdfsPending *p = m->pending;

    g_mutex_lock(&p->lock);
    for (guint i = 0; i < p->ranges->len; i++) {
        Range *r = &g_array_index(p->ranges, Range, i);
        if (r->start == offset && r->end == offset + length) {
            g_array_remove_index_fast(p->ranges, i);
            p->bytes -= length;
            break;
        }
    }
    g_atomic_int_set(&p->count, p->ranges->len);
    if (err && !p->error) {
        p->error = err;
    }
    g_mutex_unlock(&p->lock);
    if (g_atomic_int_get(&p->waiters) > 0) {
        nbdfs_loop_wake_all(m);
    }
}

void nbdfs_pending_wait_range(NbdfsMount *m, uint64_t offset, uint64_t length)
{
    WaitFor w = { m->pending, offset, offset + length, false };

    if (g_atomic_int_get(&m->pending->count) > 0) {
        wait_for(m, &w);
    }
}

int nbdfs_pending_drain(NbdfsMount *m, bool take_error)
{
    NbdfsPending *p = m->pending;
    WaitFor w = { p, 0, UINT64_MAX, false };
    int err = 0;

    if (g_atomic_int_get(&p->count) > 0) {
        wait_for(m, &w);
    }
    if (take_error) {
        g_mutex_lock(&p->lock);
        err = p->error;
        p->error = 0;
        g_mutex_unlock(&p->lock);
    }
    return err;
}
