/*
 * libFuzzer target: the transmission phase.  A fixed, valid negotiation
 * comes first; the input's first byte picks it (extended headers, structured
 * replies, or neither; with or without meta contexts), the rest is requests.
 */
#include <endian.h>
#include <string.h>

#include "fuzz-common.h"
#include "protocol.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Append one option (IHAVEOPT, code, length, data) to BUF at *POS. */
static void option(uint8_t *buf, size_t *pos, uint32_t code, const void *payload, uint32_t len)
{
    uint64_t magic = htobe64(NBDS_OPTS_MAGIC);
    uint32_t c = htobe32(code), l = htobe32(len);

    memcpy(buf + *pos, &magic, 8);
    memcpy(buf + *pos + 8, &c, 4);
    memcpy(buf + *pos + 12, &l, 4);
    if (len) {
        memcpy(buf + *pos + 16, payload, len);
    }
    *pos += 16 + len;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* SET_META_CONTEXT: export "", 3 queries. */
    static const uint8_t set_meta[] =
        "\0\0\0\0" "\0\0\0\3"
        "\0\0\0\x0f" "base:allocation"
        "\0\0\0\x14" "qemu:dirty-bitmap:b0"
        "\0\0\0\x14" "qemu:dirty-bitmap:b1";
    static const uint8_t go[] = "\0\0\0\0" "\0\1" "\0\3";   /* "", ask for BLOCK_SIZE */
    uint8_t prefix[512];
    size_t pos = 0;
    uint32_t flags = htobe32(NBDS_FLAG_C_FIXED_NEWSTYLE | NBDS_FLAG_C_NO_ZEROES);
    uint8_t mode;

    if (size < 1) {
        return 0;
    }
    mode = data[0];
    memcpy(prefix, &flags, 4);
    pos = 4;
    switch (mode % 3) {
    case 0:
        option(prefix, &pos, NBDS_OPT_EXTENDED_HEADERS, NULL, 0);
        break;
    case 1:
        option(prefix, &pos, NBDS_OPT_STRUCTURED_REPLY, NULL, 0);
        break;
    default:
        break;
    }
    if (mode & 4) {
        option(prefix, &pos, NBDS_OPT_SET_META_CONTEXT, set_meta, sizeof(set_meta) - 1);
    }
    option(prefix, &pos, NBDS_OPT_GO, go, sizeof(go) - 1);
    fuzz_play(prefix, pos, data + 1, size - 1);
    return 0;
}
