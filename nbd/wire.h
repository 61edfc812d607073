/*
 * Encoding and decoding of NBD transmission-phase headers between the packed
 * network layout of protocol.h and host-order structs.  Pure functions over
 * buffers: no I/O, no allocation, used by the server, the tests and fuzzers.
 */
#ifndef NBDS_WIRE_H
#define NBDS_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "protocol.h"

/* How replies are framed on a connection: decided by negotiation. */
typedef enum {
    NBDS_MODE_SIMPLE,          /* neither structured replies nor extended headers */
    NBDS_MODE_STRUCTURED,      /* NBD_OPT_STRUCTURED_REPLY */
    NBDS_MODE_EXTENDED,        /* NBD_OPT_EXTENDED_HEADERS: 32-byte requests and replies */
} NbdsHeaderMode;

/* A request header in host order (compact and extended alike). */
typedef struct {
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t offset;
    uint64_t length;           /* effect length, or payload length with PAYLOAD_LEN */
} NbdsRequest;

/* Size of a request header in MODE. */
size_t nbds_request_size(NbdsHeaderMode mode);

/*
 * Decode a request header of nbds_request_size(MODE) bytes.  Returns false if
 * the magic is not the one MODE requires (the stream is then out of step).
 */
bool nbds_request_decode(NbdsHeaderMode mode, const void *buf, NbdsRequest *req);

/* Encode REQ into BUF (nbds_request_size(MODE) bytes); returns the size. */
size_t nbds_request_encode(NbdsHeaderMode mode, const NbdsRequest *req, void *buf);

/* A reply header in host order: a simple reply or one structured/extended chunk. */
typedef struct {
    uint32_t error;            /* simple replies only (NBDS_E*) */
    uint16_t flags;            /* chunks only */
    uint16_t type;             /* chunks only */
    uint64_t cookie;
    uint64_t offset;           /* extended chunks only: the request's offset */
    uint64_t length;           /* chunks only: payload length */
} NbdsReplyHeader;

/* Largest reply header (extended). */
#define NBDS_REPLY_HEADER_MAX sizeof(struct nbds_extended_reply)

/*
 * Encode a reply header: with SIMPLE a simple reply, with STRUCTURED or
 * EXTENDED one chunk header of that kind.  Returns the bytes written.
 */
size_t nbds_reply_header_encode(NbdsHeaderMode mode, const NbdsReplyHeader *hdr, void *buf);

/*
 * Decode a reply header of the kind MODE expects; SIMPLE also accepts
 * structured chunks (clients see both after NBD_OPT_STRUCTURED_REPLY).
 * Returns the header size, or 0 on a bad magic or short buffer.
 */
size_t nbds_reply_header_decode(NbdsHeaderMode mode, const void *buf, size_t len,
                                NbdsReplyHeader *hdr, bool *is_simple);


/* Big-endian loads and stores on unaligned buffers. */
static inline uint16_t nbds_load_be16(const void *p)
{
    const uint8_t *b = p;
    return (uint16_t)(b[0] << 8 | b[1]);
}

static inline uint32_t nbds_load_be32(const void *p)
{
    const uint8_t *b = p;
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static inline uint64_t nbds_load_be64(const void *p)
{
    const uint8_t *b = p;
    return (uint64_t)nbds_load_be32(b) << 32 | nbds_load_be32(b + 4);
}

static inline void nbds_store_be16(void *p, uint16_t v)
{
    uint8_t *b = p;
    b[0] = v >> 8;
    b[1] = v;
}

static inline void nbds_store_be32(void *p, uint32_t v)
{
    nbds_store_be16(p, v >> 16);
    nbds_store_be16((uint8_t *)p + 2, v);
}

static inline void nbds_store_be64(void *p, uint64_t v)
{
    nbds_store_be32(p, v >> 32);
    nbds_store_be32((uint8_t *)p + 4, v);
}

#endif /* NBDS_WIRE_H */
