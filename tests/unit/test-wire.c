/* Wire encode/decode round trips; struct sizes are pinned in protocol.h. */
#include <glib.h>
#include <string.h>

#include "protocol.h"
#include "wire.h"

static void test_request_round_trip(gconstpointer data)
{
    NbdsHeaderMode mode = GPOINTER_TO_INT(data);
    NbdsRequest in = {
        .flags = NBDS_CMD_FLAG_FUA | NBDS_CMD_FLAG_PAYLOAD_LEN,
        .type = NBDS_CMD_BLOCK_STATUS,
        .cookie = UINT64_C(0x0102030405060708),
        .offset = UINT64_C(0x1122334455667788),
        .length = mode == NBDS_MODE_EXTENDED ? UINT64_C(0x100000000) : 0x80000000u,
    };
    NbdsRequest out;
    uint8_t buf[32];

    g_assert_cmpuint(nbds_request_encode(mode, &in, buf), ==, nbds_request_size(mode));
    g_assert_true(nbds_request_decode(mode, buf, &out));
    g_assert_cmphex(out.flags, ==, in.flags);
    g_assert_cmpuint(out.type, ==, in.type);
    g_assert_cmphex(out.cookie, ==, in.cookie);
    g_assert_cmphex(out.offset, ==, in.offset);
    g_assert_cmphex(out.length, ==, in.length);
}

static void test_request_layout(void)
{
    /* Byte-exact compact request, as the protocol draws it. */
    static const uint8_t expect[28] = {
        0x25, 0x60, 0x95, 0x13,                          /* magic */
        0x00, 0x01,                                      /* flags: FUA */
        0x00, 0x01,                                      /* type: WRITE */
        0, 0, 0, 0, 0, 0, 0, 42,                         /* cookie */
        0, 0, 0, 0, 0, 0, 0x10, 0,                       /* offset 4096 */
        0, 0, 0x02, 0,                                   /* length 512 */
    };
    NbdsRequest req = { .flags = 1, .type = NBDS_CMD_WRITE, .cookie = 42, .offset = 4096,
                        .length = 512 };
    uint8_t buf[28];

    g_assert_cmpuint(nbds_request_encode(NBDS_MODE_SIMPLE, &req, buf), ==, 28);
    g_assert_cmpmem(buf, 28, expect, 28);
}

static void test_request_bad_magic(void)
{
    NbdsRequest req = { .type = NBDS_CMD_READ };
    NbdsRequest out;
    uint8_t buf[32];

    /* A compact request is not an extended one, nor the reverse. */
    nbds_request_encode(NBDS_MODE_STRUCTURED, &req, buf);
    g_assert_false(nbds_request_decode(NBDS_MODE_EXTENDED, buf, &out));
    nbds_request_encode(NBDS_MODE_EXTENDED, &req, buf);
    g_assert_false(nbds_request_decode(NBDS_MODE_STRUCTURED, buf, &out));
}

static void test_reply_round_trip(gconstpointer data)
{
    NbdsHeaderMode mode = GPOINTER_TO_INT(data);
    NbdsReplyHeader in = {
        .cookie = 0xfeedface,
    };
    NbdsReplyHeader out;
    uint8_t buf[NBDS_REPLY_HEADER_MAX];
    bool simple;
    size_t n;

    if (mode == NBDS_MODE_SIMPLE) {
        in.error = NBDS_ENOSPC;
    } else {
        in.flags = NBDS_REPLY_FLAG_DONE;
        in.type = NBDS_REPLY_TYPE_BLOCK_STATUS_EXT;
        in.length = 40;
        in.offset = mode == NBDS_MODE_EXTENDED ? UINT64_C(1) << 40 : 0;
    }
    n = nbds_reply_header_encode(mode, &in, buf);
    g_assert_cmpuint(n, ==, mode == NBDS_MODE_SIMPLE ? 16 : mode == NBDS_MODE_STRUCTURED ? 20 : 32);
    g_assert_cmpuint(nbds_reply_header_decode(mode, buf, n, &out, &simple), ==, n);
    g_assert_cmpint(simple, ==, mode == NBDS_MODE_SIMPLE);
    g_assert_cmpmem(&in, sizeof(in), &out, sizeof(out));
    /* One byte short is not a header. */
    g_assert_cmpuint(nbds_reply_header_decode(mode, buf, n - 1, &out, &simple), ==, 0);
}

static void test_reply_extended_layout(void)
{
    static const uint8_t expect[32] = {
        0x6e, 0x8a, 0x27, 0x8c,                          /* magic */
        0x00, 0x01,                                      /* flags: DONE */
        0x00, 0x00,                                      /* type: NONE */
        0, 0, 0, 0, 0, 0, 0, 7,                          /* cookie */
        0, 0, 0, 0, 0, 0, 0x20, 0,                       /* offset 8192 */
        0, 0, 0, 0, 0, 0, 0, 0,                          /* length 0 */
    };
    NbdsReplyHeader h = { .flags = NBDS_REPLY_FLAG_DONE, .cookie = 7, .offset = 8192 };
    uint8_t buf[32];

    g_assert_cmpuint(nbds_reply_header_encode(NBDS_MODE_EXTENDED, &h, buf), ==, 32);
    g_assert_cmpmem(buf, 32, expect, 32);
}

static void test_load_be(void)
{
    static const uint8_t b[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };

    g_assert_cmphex(nbds_load_be16(b), ==, 0x0102);
    g_assert_cmphex(nbds_load_be32(b + 1), ==, 0x02030405);
    g_assert_cmphex(nbds_load_be64(b), ==, UINT64_C(0x0102030405060708));
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    g_test_add_data_func("/wire/request/compact", GINT_TO_POINTER(NBDS_MODE_STRUCTURED),
                         test_request_round_trip);
    g_test_add_data_func("/wire/request/extended", GINT_TO_POINTER(NBDS_MODE_EXTENDED),
                         test_request_round_trip);
    g_test_add_func("/wire/request/layout", test_request_layout);
    g_test_add_func("/wire/request/bad-magic", test_request_bad_magic);
    g_test_add_data_func("/wire/reply/simple", GINT_TO_POINTER(NBDS_MODE_SIMPLE),
                         test_reply_round_trip);
    g_test_add_data_func("/wire/reply/structured", GINT_TO_POINTER(NBDS_MODE_STRUCTURED),
                         test_reply_round_trip);
    g_test_add_data_func("/wire/reply/extended", GINT_TO_POINTER(NBDS_MODE_EXTENDED),
                         test_reply_round_trip);
    g_test_add_func("/wire/reply/extended-layout", test_reply_extended_layout);
    g_test_add_func("/wire/load-be", test_load_be);
    return g_test_run();
}
