/* Extent lists: merging, caps, REQ_ONE, compact 32-bit limits, clipping. */
#include <glib.h>

#include "extents.h"

#define GiB (UINT64_C(1) << 30)

static void assert_extent(const NbdsExtents *e, size_t i, uint64_t length, uint32_t flags)
{
    g_assert_cmpuint(i, <, e->count);
    g_assert_cmpuint(e->extents[i].length, ==, length);
    g_assert_cmpuint(e->extents[i].flags, ==, flags);
}

static void test_merge(void)
{
    NbdsExtents *e = nbds_extents_new(4096, 10 * 4096, NBDS_MAX_EXTENTS, false);

    g_assert_true(nbds_extents_add(e, 4096, 0));
    g_assert_true(nbds_extents_add(e, 4096, 0));          /* merged */
    g_assert_true(nbds_extents_add(e, 4096, 3));
    g_assert_true(nbds_extents_add(e, 0, 0));              /* nothing */
    g_assert_true(nbds_extents_add(e, 4096, 3));          /* merged */
    g_assert_cmpuint(e->count, ==, 2);
    assert_extent(e, 0, 8192, 0);
    assert_extent(e, 1, 8192, 3);
    g_assert_cmpuint(e->next, ==, 4096 + 16384);
    nbds_extents_free(e);
}

static void test_clip_at_end(void)
{
    NbdsExtents *e = nbds_extents_new(0, 10000, NBDS_MAX_EXTENTS, false);

    g_assert_true(nbds_extents_add(e, 4096, 0));
    /* A producer that overshoots never makes the answer pass the request end. */
    g_assert_false(nbds_extents_add(e, GiB, 3));
    g_assert_true(nbds_extents_done(e));
    g_assert_false(nbds_extents_add(e, 4096, 0));
    g_assert_cmpuint(e->count, ==, 2);
    assert_extent(e, 1, 10000 - 4096, 3);
    g_assert_cmpuint(e->next, ==, 10000);
    nbds_extents_free(e);
}

static void test_req_one(void)
{
    NbdsExtents *e = nbds_extents_new(0, GiB, 1, false);

    g_assert_true(nbds_extents_add(e, 65536, 0));
    g_assert_true(nbds_extents_add(e, 65536, 0));          /* same status: still one */
    g_assert_false(nbds_extents_add(e, 65536, 3));         /* a second would be needed */
    g_assert_true(e->full);
    g_assert_cmpuint(e->count, ==, 1);
    assert_extent(e, 0, 131072, 0);
    nbds_extents_free(e);
}

static void test_cap(void)
{
    NbdsExtents *e = nbds_extents_new(0, GiB, 3, false);

    g_assert_true(nbds_extents_add(e, 512, 0));
    g_assert_true(nbds_extents_add(e, 512, 1));
    g_assert_true(nbds_extents_add(e, 512, 0));
    g_assert_false(nbds_extents_add(e, 512, 1));
    g_assert_cmpuint(e->count, ==, 3);
    g_assert_cmpuint(e->next, ==, 1536);                   /* a short answer, not a lie */
    nbds_extents_free(e);
}

static void test_grows(void)
{
    NbdsExtents *e = nbds_extents_new(0, GiB, NBDS_MAX_EXTENTS, true);

    for (unsigned i = 0; i < 10000; i++) {
        g_assert_true(nbds_extents_add(e, 512, i & 1));
    }
    g_assert_cmpuint(e->count, ==, 10000);
    for (unsigned i = 0; i < 10000; i++) {
        assert_extent(e, i, 512, i & 1);
    }
    nbds_extents_free(e);
}

static void test_compact_32bit(void)
{
    /* Extended headers: one 8 GiB extent. */
    NbdsExtents *e = nbds_extents_new(0, 8 * GiB, NBDS_MAX_EXTENTS, false);
    g_assert_false(nbds_extents_add(e, 8 * GiB, 3));
    g_assert_cmpuint(e->count, ==, 1);
    assert_extent(e, 0, 8 * GiB, 3);
    nbds_extents_free(e);

    /* Compact: lengths stay below 2^32 and 512-aligned, split across descriptors. */
    e = nbds_extents_new(0, 8 * GiB, NBDS_MAX_EXTENTS, true);
    g_assert_false(nbds_extents_add(e, 8 * GiB, 3));
    g_assert_cmpuint(e->count, ==, 3);
    assert_extent(e, 0, UINT32_MAX & ~511u, 3);
    assert_extent(e, 1, UINT32_MAX & ~511u, 3);
    assert_extent(e, 2, 8 * GiB - 2 * (uint64_t)(UINT32_MAX & ~511u), 3);
    nbds_extents_free(e);

    /* Compact under REQ_ONE: one saturated descriptor, then full. */
    e = nbds_extents_new(0, 8 * GiB, 1, true);
    g_assert_false(nbds_extents_add(e, 8 * GiB, 0));
    g_assert_cmpuint(e->count, ==, 1);
    assert_extent(e, 0, UINT32_MAX & ~511u, 0);
    g_assert_true(e->full);
    nbds_extents_free(e);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/extents/merge", test_merge);
    g_test_add_func("/extents/clip-at-end", test_clip_at_end);
    g_test_add_func("/extents/req-one", test_req_one);
    g_test_add_func("/extents/cap", test_cap);
    g_test_add_func("/extents/grows", test_grows);
    g_test_add_func("/extents/compact-32bit", test_compact_32bit);
    return g_test_run();
}
