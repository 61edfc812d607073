/* Cache of block-status runs.  See extent-cache.h. */
#include "extent-cache.h"

#include <glib.h>

typedef struct {
    uint64_t start, end;
    uint64_t status;
} Run;

struct NbdfsExtentCache {
    GMutex lock;
    GTree *runs;                /* Run * -> Run *, ordered by start; never overlapping */
    GTreeNode *hint;            /* the last run found: a walk asks for its successor next */
    size_t n_runs;
    size_t max_runs;
    uint64_t size;
    uint64_t generation;
};

static gint run_compare(gconstpointer a, gconstpointer b, gpointer unused)
{
    const Run *x = a, *y = b;

    (void)unused;
    return x->start < y->start ? -1 : x->start > y->start;
}

static GTree *runs_new(void)
{
    return g_tree_new_full(run_compare, NULL, g_free, NULL);
}

NbdfsExtentCache *nbdfs_extent_cache_new(uint64_t size, size_t max_runs)
{
    NbdfsExtentCache *c = g_new0(NbdfsExtentCache, 1);

    g_mutex_init(&c->lock);
    c->runs = runs_new();
    c->size = size;
    c->max_runs = MAX(max_runs, 1);
    return c;
}

void nbdfs_extent_cache_free(NbdfsExtentCache *c)
{
    if (!c) {
        return;
    }
    g_tree_destroy(c->runs);
    g_mutex_clear(&c->lock);
    g_free(c);
}

uint64_t nbdfs_extent_cache_generation(NbdfsExtentCache *c)
{
    uint64_t gen;

    g_mutex_lock(&c->lock);
    gen = c->generation;
    g_mutex_unlock(&c->lock);
    return gen;
}

/* The run starting at or before OFFSET with the greatest start, or NULL. */
static Run *run_at_or_before(NbdfsExtentCache *c, uint64_t offset)
{
    Run key = { .start = offset };
    GTreeNode *node = g_tree_upper_bound(c->runs, &key);

    node = node ? g_tree_node_previous(node) : g_tree_node_last(c->runs);
    return node ? g_tree_node_value(node) : NULL;
}

/* The first run starting at or after OFFSET, or NULL. */
static Run *run_at_or_after(NbdfsExtentCache *c, uint64_t offset)
{
    Run key = { .start = offset };
    GTreeNode *node = g_tree_lower_bound(c->runs, &key);

    return node ? g_tree_node_value(node) : NULL;
}

static void run_remove(NbdfsExtentCache *c, Run *r)
{
    c->hint = NULL;
    g_tree_remove(c->runs, r);
    c->n_runs--;
}

static Run *run_add(NbdfsExtentCache *c, uint64_t start, uint64_t end, uint64_t status)
{
    Run *r = g_new(Run, 1);

    r->start = start;
    r->end = end;
    r->status = status;
    c->hint = NULL;
    g_tree_insert(c->runs, r, r);
    c->n_runs++;
    return r;
}

/* Make [START, END) unknown, trimming or splitting the runs across its edges. */
static void forget_range(NbdfsExtentCache *c, uint64_t start, uint64_t end)
{
    Run *r = run_at_or_before(c, start);

    if (r && r->end > start) {
        if (r->end > end) {
            /* START..END lies inside one run: split it in two. */
            run_add(c, end, r->end, r->status);
            r->end = start;
            if (r->start == start) {
                run_remove(c, r);
            }
            return;
        }
        if (r->start == start) {
            run_remove(c, r);
        } else {
            r->end = start;
        }
    }
    while ((r = run_at_or_after(c, start)) && r->start < end) {
        if (r->end > end) {
            /* Moving the start up keeps the tree's order: runs never overlap. */
            r->start = end;
            break;
        }
        run_remove(c, r);
    }
}

/* Record [START, END) as STATUS, merging with equal neighbours. */
static void store_range(NbdfsExtentCache *c, uint64_t start, uint64_t end, uint64_t status)
{
    Run *left, *right;

    forget_range(c, start, end);
    left = start > 0 ? run_at_or_before(c, start - 1) : NULL;
    right = run_at_or_after(c, end);
    if (left && left->end == start && left->status == status) {
        left->end = end;
        if (right && right->start == end && right->status == status) {
            left->end = right->end;
            run_remove(c, right);
        }
    } else if (right && right->start == end && right->status == status) {
        right->start = start;
    } else {
        run_add(c, start, end, status);
    }
}

static void clear_locked(NbdfsExtentCache *c)
{
    c->hint = NULL;
    g_tree_destroy(c->runs);
    c->runs = runs_new();
    c->n_runs = 0;
}

bool nbdfs_extent_cache_insert(NbdfsExtentCache *c, uint64_t generation, uint64_t offset,
                               const NbdfsExtent *extents, size_t n)
{
    uint64_t pos = offset;

    g_mutex_lock(&c->lock);
    if (generation != c->generation) {
        g_mutex_unlock(&c->lock);
        return false;
    }
    /* Each extent adds at most two runs (a split neighbour and itself). */
    if (c->n_runs + 2 * n > c->max_runs) {
        clear_locked(c);
    }
    for (size_t i = 0; i < n && pos < c->size; i++) {
        uint64_t end = extents[i].length > c->size - pos ? c->size : pos + extents[i].length;
        if (end > pos) {
            store_range(c, pos, end, extents[i].status);
        }
        pos = end;
    }
    g_mutex_unlock(&c->lock);
    return true;
}

bool nbdfs_extent_cache_lookup(NbdfsExtentCache *c, uint64_t offset, uint64_t *status,
                               uint64_t *end)
{
    Run *r;
    bool found = false;

    g_mutex_lock(&c->lock);
    r = NULL;
    if (c->hint) {
        /* A lseek walk asks for the run after the last one: no tree search. */
        Run *h = g_tree_node_value(c->hint);
        GTreeNode *next = g_tree_node_next(c->hint);
        if (offset >= h->start && offset < h->end) {
            r = h;
        } else if (next && offset >= ((Run *)g_tree_node_value(next))->start &&
                   offset < ((Run *)g_tree_node_value(next))->end) {
            r = g_tree_node_value(next);
            c->hint = next;
        }
    }
    if (!r) {
        Run key = { .start = offset };
        GTreeNode *node = g_tree_upper_bound(c->runs, &key);
        node = node ? g_tree_node_previous(node) : g_tree_node_last(c->runs);
        r = node ? g_tree_node_value(node) : NULL;
        c->hint = node;
    }
    if (r && offset < r->end) {
        *status = r->status;
        *end = r->end;
        found = true;
    }
    g_mutex_unlock(&c->lock);
    return found;
}

void nbdfs_extent_cache_invalidate(NbdfsExtentCache *c, uint64_t offset, uint64_t length)
{
    g_mutex_lock(&c->lock);
    c->generation++;
    if (offset < c->size && length > 0) {
        forget_range(c, offset, length > c->size - offset ? c->size : offset + length);
    }
    g_mutex_unlock(&c->lock);
}

void nbdfs_extent_cache_clear(NbdfsExtentCache *c)
{
    g_mutex_lock(&c->lock);
    c->generation++;
    clear_locked(c);
    g_mutex_unlock(&c->lock);
}

size_t nbdfs_extent_cache_runs(NbdfsExtentCache *c)
{
    size_t n;

    g_mutex_lock(&c->lock);
    n = c->n_runs;
    g_mutex_unlock(&c->lock);
    return n;
}
