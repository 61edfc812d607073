/* The block-status payload validator over every bad form (nbd-protocol.md 5.4). */
#include <endian.h>
#include <glib.h>
#include <string.h>

#include "internal.h"

/* Contexts 0..3 exist; 0, 1 and 3 were negotiated. */
static const bool selected[4] = { true, true, false, true };

static GByteArray *payload(uint64_t effect, size_t n, const uint32_t *ids)
{
    GByteArray *p = g_byte_array_new();
    uint64_t be64 = htobe64(effect);

    g_byte_array_append(p, (const guint8 *)&be64, 8);
    for (size_t i = 0; i < n; i++) {
        uint32_t be32 = htobe32(ids[i]);
        g_byte_array_append(p, (const guint8 *)&be32, 4);
    }
    return p;
}

static uint32_t parse(const GByteArray *p, uint64_t *effect, uint32_t *ids, size_t *n_ids,
                      const char **why)
{
    *why = NULL;
    return nbds_block_status_parse_payload(p->data, p->len, selected, 4, effect, ids, n_ids,
                                           why);
}

static void test_valid(void)
{
    uint32_t want[] = { 3, 0 };
    g_autoptr(GByteArray) p = payload(UINT64_C(1) << 40, 2, want);
    uint32_t ids[4];
    size_t n = 0;
    uint64_t effect = 0;
    const char *why;

    g_assert_cmpuint(parse(p, &effect, ids, &n, &why), ==, 0);
    g_assert_null(why);
    g_assert_cmpuint(effect, ==, UINT64_C(1) << 40);     /* 64-bit effect lengths are fine */
    g_assert_cmpuint(n, ==, 2);
    g_assert_cmpuint(ids[0], ==, 0);                      /* always in registry order */
    g_assert_cmpuint(ids[1], ==, 3);
}

static void test_all_selected(void)
{
    uint32_t want[] = { 0, 1, 3 };
    g_autoptr(GByteArray) p = payload(512, 3, want);
    uint32_t ids[4];
    size_t n;
    uint64_t effect;
    const char *why;

    g_assert_cmpuint(parse(p, &effect, ids, &n, &why), ==, 0);
    g_assert_cmpuint(n, ==, 3);
}

typedef struct {
    const char *name;
    size_t truncate_to;            /* 0: keep the built length */
    size_t extra;                  /* bytes appended */
    uint64_t effect;
    size_t n;
    uint32_t ids[5];
} BadCase;

static const BadCase bad_cases[] = {
    { "empty", 1, 0, 512, 0, { 0 } },                   /* truncated to 0 below */
    { "short-4", 4, 0, 512, 1, { 0 } },
    { "short-7", 7, 0, 512, 1, { 0 } },
    { "no-ids", 0, 0, 512, 0, { 0 } },
    { "misaligned-13", 13, 0, 512, 2, { 0, 1 } },
    { "misaligned-extra", 0, 1, 512, 1, { 0 } },
    { "not-negotiated", 0, 0, 512, 1, { 2 } },
    { "unknown-id", 0, 0, 512, 1, { 4 } },
    { "huge-id", 0, 0, 512, 1, { 0xffffffff } },
    { "duplicate", 0, 0, 512, 2, { 1, 1 } },
    { "too-many", 0, 0, 512, 5, { 0, 1, 3, 0, 1 } },
    { "zero-effect", 0, 0, 0, 1, { 0 } },
};

static void test_bad(gconstpointer data)
{
    const BadCase *c = data;
    g_autoptr(GByteArray) p = payload(c->effect, c->n, c->ids);
    uint32_t ids[4];
    size_t n;
    uint64_t effect;
    const char *why;

    if (c->truncate_to) {
        g_byte_array_set_size(p, strcmp(c->name, "empty") == 0 ? 0 : c->truncate_to);
    }
    for (size_t i = 0; i < c->extra; i++) {
        g_byte_array_append(p, (const guint8 *)"", 1);
    }
    g_assert_cmpuint(parse(p, &effect, ids, &n, &why), ==, NBDS_EINVAL);
    g_assert_nonnull(why);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_func("/block-status-payload/valid", test_valid);
    g_test_add_func("/block-status-payload/all-selected", test_all_selected);
    for (size_t i = 0; i < G_N_ELEMENTS(bad_cases); i++) {
        g_autofree char *path = g_strdup_printf("/block-status-payload/bad/%s",
                                                bad_cases[i].name);
        g_test_add_data_func(path, &bad_cases[i], test_bad);
    }
    return g_test_run();
}
