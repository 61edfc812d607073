/* NBD transmission headers: network layout <-> host structs.  See wire.h. */
#include "wire.h"

#include <endian.h>
#include <string.h>

size_t nbds_request_size(NbdsHeaderMode mode)
{
    return mode == NBDS_MODE_EXTENDED ? sizeof(struct nbds_request_extended)
                                      : sizeof(struct nbds_request_compact);
}

/*
 * Compact and extended requests share their first 24 bytes (magic, flags,
 * type, cookie, offset); only the length differs: 4 bytes or 8.
 */
bool nbds_request_decode(NbdsHeaderMode mode, const void *buf, NbdsRequest *req)
{
    const uint8_t *b = buf;
    bool ext = mode == NBDS_MODE_EXTENDED;

    if (nbds_load_be32(b) != (ext ? NBDS_EXTENDED_REQUEST_MAGIC : NBDS_REQUEST_MAGIC)) {
        return false;
    }
    req->flags = nbds_load_be16(b + 4);
    req->type = nbds_load_be16(b + 6);
    req->cookie = nbds_load_be64(b + 8);
    req->offset = nbds_load_be64(b + 16);
    req->length = ext ? nbds_load_be64(b + 24) : nbds_load_be32(b + 24);
    return true;
}

size_t nbds_request_encode(NbdsHeaderMode mode, const NbdsRequest *req, void *buf)
{
    uint8_t *b = buf;
    bool ext = mode == NBDS_MODE_EXTENDED;

    nbds_store_be32(b, ext ? NBDS_EXTENDED_REQUEST_MAGIC : NBDS_REQUEST_MAGIC);
    nbds_store_be16(b + 4, req->flags);
    nbds_store_be16(b + 6, req->type);
    nbds_store_be64(b + 8, req->cookie);
    nbds_store_be64(b + 16, req->offset);
    if (ext) {
        nbds_store_be64(b + 24, req->length);
    } else {
        nbds_store_be32(b + 24, (uint32_t)req->length);
    }
    return nbds_request_size(mode);
}

size_t nbds_reply_header_encode(NbdsHeaderMode mode, const NbdsReplyHeader *hdr, void *buf)
{
    switch (mode) {
    case NBDS_MODE_SIMPLE: {
        struct nbds_simple_reply w = {
            .magic = htobe32(NBDS_SIMPLE_REPLY_MAGIC),
            .error = htobe32(hdr->error),
            .cookie = htobe64(hdr->cookie),
        };
        memcpy(buf, &w, sizeof(w));
        return sizeof(w);
    }
    case NBDS_MODE_STRUCTURED: {
        struct nbds_structured_reply w = {
            .magic = htobe32(NBDS_STRUCTURED_REPLY_MAGIC),
            .flags = htobe16(hdr->flags),
            .type = htobe16(hdr->type),
            .cookie = htobe64(hdr->cookie),
            .length = htobe32((uint32_t)hdr->length),
        };
        memcpy(buf, &w, sizeof(w));
        return sizeof(w);
    }
    case NBDS_MODE_EXTENDED:
    default: {
        struct nbds_extended_reply w = {
            .magic = htobe32(NBDS_EXTENDED_REPLY_MAGIC),
            .flags = htobe16(hdr->flags),
            .type = htobe16(hdr->type),
            .cookie = htobe64(hdr->cookie),
            .offset = htobe64(hdr->offset),
            .length = htobe64(hdr->length),
        };
        memcpy(buf, &w, sizeof(w));
        return sizeof(w);
    }
    }
}

size_t nbds_reply_header_decode(NbdsHeaderMode mode, const void *buf, size_t len,
                                NbdsReplyHeader *hdr, bool *is_simple)
{
    uint32_t magic;

    if (len < sizeof(magic)) {
        return 0;
    }
    memcpy(&magic, buf, sizeof(magic));
    magic = be32toh(magic);
    memset(hdr, 0, sizeof(*hdr));
    *is_simple = false;

    if (magic == NBDS_SIMPLE_REPLY_MAGIC && mode != NBDS_MODE_EXTENDED) {
        struct nbds_simple_reply w;
        if (len < sizeof(w)) {
            return 0;
        }
        memcpy(&w, buf, sizeof(w));
        hdr->error = be32toh(w.error);
        hdr->cookie = be64toh(w.cookie);
        *is_simple = true;
        return sizeof(w);
    }
    if (magic == NBDS_STRUCTURED_REPLY_MAGIC && mode != NBDS_MODE_EXTENDED) {
        struct nbds_structured_reply w;
        if (len < sizeof(w)) {
            return 0;
        }
        memcpy(&w, buf, sizeof(w));
        hdr->flags = be16toh(w.flags);
        hdr->type = be16toh(w.type);
        hdr->cookie = be64toh(w.cookie);
        hdr->length = be32toh(w.length);
        return sizeof(w);
    }
    if (magic == NBDS_EXTENDED_REPLY_MAGIC && mode == NBDS_MODE_EXTENDED) {
        struct nbds_extended_reply w;
        if (len < sizeof(w)) {
            return 0;
        }
        memcpy(&w, buf, sizeof(w));
        hdr->flags = be16toh(w.flags);
        hdr->type = be16toh(w.type);
        hdr->cookie = be64toh(w.cookie);
        hdr->offset = be64toh(w.offset);
        hdr->length = be64toh(w.length);
        return sizeof(w);
    }
    return 0;
}
