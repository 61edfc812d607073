/*
 * Unit test of fuse/extent-cache.c: every operation is mirrored on a naive
 * byte-per-byte shadow, and every lookup is checked against it.
 */
#include <glib.h>

#include "extent-cache.h"

#define SIZE 512
#define UNKNOWN UINT64_MAX

typedef struct {
    NbdfsExtentCache *cache;
    uint64_t shadow[SIZE];
} Fixture;

static void fixture_set_up(Fixture *f, gconstpointer data)
{
    f->cache = nbdfs_extent_cache_new(SIZE, GPOINTER_TO_SIZE(data));
    for (int i = 0; i < SIZE; i++) {
        f->shadow[i] = UNKNOWN;
    }
}

static void fixture_tear_down(Fixture *f, gconstpointer data)
{
    (void)data;
    nbdfs_extent_cache_free(f->cache);
}

/* Every lookup agrees with the shadow, and runs are maximal. */
static void check_all(Fixture *f)
{
    for (uint64_t off = 0; off < SIZE; off++) {
        uint64_t status, end;
        bool known = nbdfs_extent_cache_lookup(f->cache, off, &status, &end);

        if (f->shadow[off] == UNKNOWN) {
            g_assert_false(known);
            continue;
        }
        g_assert_true(known);
        g_assert_cmpuint(status, ==, f->shadow[off]);
        g_assert_cmpuint(end, >, off);
        g_assert_cmpuint(end, <=, SIZE);
        for (uint64_t i = off; i < end; i++) {
            g_assert_cmpuint(f->shadow[i], ==, status);
        }
        g_assert_true(end == SIZE || f->shadow[end] != status);
    }
}

/* A cache whose memory limit was hit may have forgotten anything, never lied. */
static void check_consistent(Fixture *f)
{
    for (uint64_t off = 0; off < SIZE; off++) {
        uint64_t status, end;
        if (nbdfs_extent_cache_lookup(f->cache, off, &status, &end)) {
            g_assert_cmpuint(f->shadow[off], ==, status);
            for (uint64_t i = off; i < end; i++) {
                g_assert_cmpuint(f->shadow[i], ==, status);
            }
        }
    }
}

static void shadow_insert(Fixture *f, uint64_t off, const NbdfsExtent *e, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        for (uint64_t j = 0; j < e[i].length && off < SIZE; j++, off++) {
            f->shadow[off] = e[i].status;
        }
    }
}

static void insert(Fixture *f, uint64_t off, const NbdfsExtent *e, size_t n)
{
    g_assert_true(nbdfs_extent_cache_insert(f->cache, nbdfs_extent_cache_generation(f->cache),
                                            off, e, n));
    shadow_insert(f, off, e, n);
}

static void invalidate(Fixture *f, uint64_t off, uint64_t len)
{
    nbdfs_extent_cache_invalidate(f->cache, off, len);
    for (uint64_t i = off; i < off + len && i < SIZE; i++) {
        f->shadow[i] = UNKNOWN;
    }
}

static void test_empty(Fixture *f, gconstpointer data)
{
    (void)data;
    check_all(f);
    g_assert_cmpuint(nbdfs_extent_cache_runs(f->cache), ==, 0);
}

static void test_merge(Fixture *f, gconstpointer data)
{
    NbdfsExtent a[] = { { 10, 1 }, { 10, 1 }, { 5, 0 } };
    NbdfsExtent b[] = { { 10, 0 } };
    NbdfsExtent c[] = { { 5, 1 } };

    (void)data;
    insert(f, 100, a, G_N_ELEMENTS(a));
    check_all(f);
    g_assert_cmpuint(nbdfs_extent_cache_runs(f->cache), ==, 2);
    /* Adjacent on the right with the same status as the last run: merged. */
    insert(f, 125, b, 1);
    check_all(f);
    g_assert_cmpuint(nbdfs_extent_cache_runs(f->cache), ==, 2);
    /* Adjacent on the left: merged into the first run. */
    insert(f, 95, c, 1);
    check_all(f);
    g_assert_cmpuint(nbdfs_extent_cache_runs(f->cache), ==, 2);
    /* Bridging two runs of the same status makes one. */
    insert(f, 115, c, 1);
    insert(f, 120, c, 1);
    insert(f, 125, b, 1);
    check_all(f);
}

static void test_invalidate_splits(Fixture *f, gconstpointer data)
{
    NbdfsExtent a[] = { { 100, 3 } };

    (void)data;
    insert(f, 0, a, 1);
    invalidate(f, 40, 10);
    check_all(f);
    g_assert_cmpuint(nbdfs_extent_cache_runs(f->cache), ==, 2);
    invalidate(f, 0, 40);
    invalidate(f, 95, 1000);
    check_all(f);
    invalidate(f, 0, SIZE);
    check_all(f);
    g_assert_cmpuint(nbdfs_extent_cache_runs(f->cache), ==, 0);
}

static void test_stale_insert_refused(Fixture *f, gconstpointer data)
{
    NbdfsExtent a[] = { { 64, 1 } };
    uint64_t gen = nbdfs_extent_cache_generation(f->cache);

    (void)data;
    /* A write completed while the block-status request was in flight. */
    nbdfs_extent_cache_invalidate(f->cache, 0, 8);
    g_assert_false(nbdfs_extent_cache_insert(f->cache, gen, 0, a, 1));
    check_all(f);
    nbdfs_extent_cache_clear(f->cache);
    g_assert_false(nbdfs_extent_cache_insert(f->cache, gen + 1, 0, a, 1));
    check_all(f);
}

static void test_clipped_to_size(Fixture *f, gconstpointer data)
{
    NbdfsExtent a[] = { { 1000, 2 }, { 7, 1 } };

    (void)data;
    insert(f, SIZE - 10, a, G_N_ELEMENTS(a));
    check_all(f);
    g_assert_cmpuint(nbdfs_extent_cache_runs(f->cache), ==, 1);
}

static void test_random(Fixture *f, gconstpointer data)
{
    GRand *rand = g_rand_new_with_seed(42);

    (void)data;
    for (int round = 0; round < 3000; round++) {
        uint64_t off = g_rand_int_range(rand, 0, SIZE);
        if (g_rand_int_range(rand, 0, 3) == 0) {
            invalidate(f, off, g_rand_int_range(rand, 1, 64));
        } else {
            NbdfsExtent e[8];
            size_t n = g_rand_int_range(rand, 1, G_N_ELEMENTS(e) + 1);
            for (size_t i = 0; i < n; i++) {
                e[i].length = g_rand_int_range(rand, 1, 40);
                e[i].status = g_rand_int_range(rand, 0, 3);
            }
            insert(f, off, e, n);
        }
        check_all(f);
    }
    g_rand_free(rand);
}

/* With a small limit the cache drops what it knows instead of growing. */
static void test_memory_limit(Fixture *f, gconstpointer data)
{
    GRand *rand = g_rand_new_with_seed(7);

    for (int round = 0; round < 2000; round++) {
        NbdfsExtent e[4];
        uint64_t off = g_rand_int_range(rand, 0, SIZE);
        uint64_t gen = nbdfs_extent_cache_generation(f->cache);
        for (size_t i = 0; i < G_N_ELEMENTS(e); i++) {
            e[i].length = g_rand_int_range(rand, 1, 8);
            e[i].status = g_rand_int_range(rand, 0, 2);
        }
        g_assert_true(nbdfs_extent_cache_insert(f->cache, gen, off, e, G_N_ELEMENTS(e)));
        shadow_insert(f, off, e, G_N_ELEMENTS(e));
        g_assert_cmpuint(nbdfs_extent_cache_runs(f->cache), <=, GPOINTER_TO_SIZE(data));
        check_consistent(f);
    }
    g_rand_free(rand);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
#define ADD(name, fn, limit) \
    g_test_add("/extent-cache/" name, Fixture, GSIZE_TO_POINTER(limit), fixture_set_up, fn, \
               fixture_tear_down)
    ADD("empty", test_empty, 1000);
    ADD("merge", test_merge, 1000);
    ADD("invalidate-splits", test_invalidate_splits, 1000);
    ADD("stale-insert-refused", test_stale_insert_refused, 1000);
    ADD("clipped-to-size", test_clipped_to_size, 1000);
    ADD("random", test_random, 100000);
    ADD("memory-limit", test_memory_limit, 16);
    return g_test_run();
}
