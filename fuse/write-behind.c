/*
 * Write-behind: a write to the export is answered as soon as its NBD command
 * is sent, so a writer's next write(2) overlaps the server's work on this
 * one.  Until the server answers, the write's range is pending:
 *
 *   - a read or another write overlapping it waits (an NBD server may run
 *     requests in any order, and several connections race anyway);
 *   - block-status queries, fsync and close wait for every write reserved
 *     before them (not for later ones: a busy writer cannot starve them);
 *   - a failure reaches the files that wrote it (open-files.c).
 *
 * Waits are on a condition variable that completions signal; they end
 * within the request timeout, because the I/O threads complete or fail
 * every command by its deadline.  The lock is a leaf: never held across a
 * wait or a libnbd call.  The bytes pending are bounded, which bounds memory
 * and what a failure can lose.
 */
#include "mount.h"

#include <errno.h>

#define MAX_PENDING_BYTES (UINT64_C(32) << 20)
#define MAX_PENDING_WRITES 256

typedef struct {
    uint64_t start, end;
    uint64_t seq;                  /* reservation order */
} Range;

struct NbdfsPending {
    GMutex lock;
    GCond changed;                 /* a range ended */
    GArray *ranges;                /* Range: the writes in flight */
    uint64_t bytes;
    uint64_t next_seq;
    gint count;                    /* ranges->len, readable without the lock */
};

NbdfsPending *nbdfs_pending_new(void)
{
    NbdfsPending *p = g_new0(NbdfsPending, 1);

    g_mutex_init(&p->lock);
    g_cond_init(&p->changed);
    p->ranges = g_array_new(FALSE, FALSE, sizeof(Range));
    p->next_seq = 1;
    return p;
}

void nbdfs_pending_free(NbdfsPending *p)
{
    if (p) {
        g_array_unref(p->ranges);
        g_mutex_clear(&p->lock);
        g_cond_clear(&p->changed);
        g_free(p);
    }
}

/* Does a pending write reserved before SEQ overlap [START, END)? */
static bool busy_locked(NbdfsPending *p, uint64_t start, uint64_t end, uint64_t seq)
{
    for (guint i = 0; i < p->ranges->len; i++) {
        const Range *r = &g_array_index(p->ranges, Range, i);
        if (r->seq < seq && r->start < end && start < r->end) {
            return true;
        }
    }
    return false;
}

static bool room_locked(NbdfsPending *p, uint64_t length)
{
    return p->ranges->len == 0 ||
           (p->bytes + length <= MAX_PENDING_BYTES && p->ranges->len < MAX_PENDING_WRITES);
}

void nbdfs_pending_begin(NbdfsMount *m, uint64_t offset, uint64_t length)
{
    NbdfsPending *p = m->pending;
    Range r = { offset, offset + length, 0 };

    g_mutex_lock(&p->lock);
    while (busy_locked(p, r.start, r.end, UINT64_MAX) || !room_locked(p, length)) {
        g_cond_wait(&p->changed, &p->lock);
    }
    r.seq = p->next_seq++;
    g_array_append_val(p->ranges, r);
    p->bytes += length;
    g_atomic_int_set(&p->count, p->ranges->len);
    g_mutex_unlock(&p->lock);
}

void nbdfs_pending_end(NbdfsMount *m, uint64_t offset, uint64_t length)
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
    g_cond_broadcast(&p->changed);
    g_mutex_unlock(&p->lock);
}

void nbdfs_pending_wait_range(NbdfsMount *m, uint64_t offset, uint64_t length)
{
    NbdfsPending *p = m->pending;

    if (g_atomic_int_get(&p->count) == 0) {
        return;
    }
    g_mutex_lock(&p->lock);
    while (busy_locked(p, offset, offset + length, UINT64_MAX)) {
        g_cond_wait(&p->changed, &p->lock);
    }
    g_mutex_unlock(&p->lock);
}

void nbdfs_pending_drain(NbdfsMount *m)
{
    NbdfsPending *p = m->pending;
    uint64_t before;

    if (g_atomic_int_get(&p->count) == 0) {
        return;
    }
    g_mutex_lock(&p->lock);
    before = p->next_seq;
    while (busy_locked(p, 0, UINT64_MAX, before)) {
        g_cond_wait(&p->changed, &p->lock);
    }
    g_mutex_unlock(&p->lock);
}
