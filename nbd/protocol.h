/*
 * NBD wire format: every magic, code, flag and on-the-wire layout nbdfs uses.
 *
 * The structs below are the exact network representation (packed, big-endian
 * fields); code decodes them into host-order values at the socket edge and
 * never keeps them around.  Names follow the protocol specification, with an
 * NBDS_ prefix because libnbd, linked into the same binary, owns NBD_.
 * No GLib here: this header is shared by the server, the tests and fuzzers.
 */
#ifndef NBDS_PROTOCOL_H
#define NBDS_PROTOCOL_H

#include <stdint.h>

#define NBDS_PACKED __attribute__((__packed__))

/* Handshake (fixed newstyle). */
#define NBDS_MAGIC                 UINT64_C(0x4e42444d41474943) /* "NBDMAGIC" */
#define NBDS_OPTS_MAGIC            UINT64_C(0x49484156454F5054) /* "IHAVEOPT" */
#define NBDS_REP_MAGIC             UINT64_C(0x0003e889045565a9)

#define NBDS_FLAG_FIXED_NEWSTYLE   0x0001u
#define NBDS_FLAG_NO_ZEROES        0x0002u
#define NBDS_FLAG_C_FIXED_NEWSTYLE NBDS_FLAG_FIXED_NEWSTYLE
#define NBDS_FLAG_C_NO_ZEROES      NBDS_FLAG_NO_ZEROES

/* Server greeting: magic, IHAVEOPT, handshake flags. */
struct nbds_greeting {
    uint64_t nbdmagic;
    uint64_t version;
    uint16_t gflags;
} NBDS_PACKED;

/* Option request header; data follows. */
struct nbds_option_header {
    uint64_t version;          /* NBDS_OPTS_MAGIC */
    uint32_t option;
    uint32_t optlen;
} NBDS_PACKED;

/* Option reply header; data follows. */
struct nbds_option_reply {
    uint64_t magic;            /* NBDS_REP_MAGIC */
    uint32_t option;
    uint32_t reply;
    uint32_t replylen;
} NBDS_PACKED;

/* Reply to NBD_OPT_EXPORT_NAME (124 zero bytes follow unless NO_ZEROES). */
struct nbds_export_name_reply {
    uint64_t exportsize;
    uint16_t eflags;
} NBDS_PACKED;
#define NBDS_EXPORT_NAME_ZEROES    124

/* Options. */
#define NBDS_OPT_EXPORT_NAME       1
#define NBDS_OPT_ABORT             2
#define NBDS_OPT_LIST              3
#define NBDS_OPT_PEEK_EXPORT       4   /* withdrawn */
#define NBDS_OPT_STARTTLS          5
#define NBDS_OPT_INFO              6
#define NBDS_OPT_GO                7
#define NBDS_OPT_STRUCTURED_REPLY  8
#define NBDS_OPT_LIST_META_CONTEXT 9
#define NBDS_OPT_SET_META_CONTEXT  10
#define NBDS_OPT_EXTENDED_HEADERS  11

/* Option reply types. */
#define NBDS_REP_ERR(v)            (UINT32_C(0x80000000) | (v))
#define NBDS_REP_ACK               1
#define NBDS_REP_SERVER            2
#define NBDS_REP_INFO              3
#define NBDS_REP_META_CONTEXT      4
#define NBDS_REP_ERR_UNSUP         NBDS_REP_ERR(1)
#define NBDS_REP_ERR_POLICY        NBDS_REP_ERR(2)
#define NBDS_REP_ERR_INVALID       NBDS_REP_ERR(3)
#define NBDS_REP_ERR_PLATFORM      NBDS_REP_ERR(4)
#define NBDS_REP_ERR_TLS_REQD      NBDS_REP_ERR(5)
#define NBDS_REP_ERR_UNKNOWN       NBDS_REP_ERR(6)
#define NBDS_REP_ERR_SHUTDOWN      NBDS_REP_ERR(7)
#define NBDS_REP_ERR_BLOCK_SIZE_REQD NBDS_REP_ERR(8)
#define NBDS_REP_ERR_TOO_BIG       NBDS_REP_ERR(9)
#define NBDS_REP_ERR_EXT_HEADER_REQD NBDS_REP_ERR(10)

/* NBD_INFO_* types in NBD_REP_INFO and in INFO/GO requests. */
#define NBDS_INFO_EXPORT           0
#define NBDS_INFO_NAME             1
#define NBDS_INFO_DESCRIPTION      2
#define NBDS_INFO_BLOCK_SIZE       3

struct nbds_info_export {
    uint16_t info;             /* NBDS_INFO_EXPORT */
    uint64_t exportsize;
    uint16_t eflags;
} NBDS_PACKED;

struct nbds_info_block_size {
    uint16_t info;             /* NBDS_INFO_BLOCK_SIZE */
    uint32_t minimum;
    uint32_t preferred;
    uint32_t maximum;
} NBDS_PACKED;

/* Transmission flags. */
#define NBDS_FLAG_HAS_FLAGS        (1u << 0)
#define NBDS_FLAG_READ_ONLY        (1u << 1)
#define NBDS_FLAG_SEND_FLUSH       (1u << 2)
#define NBDS_FLAG_SEND_FUA         (1u << 3)
#define NBDS_FLAG_ROTATIONAL       (1u << 4)
#define NBDS_FLAG_SEND_TRIM        (1u << 5)
#define NBDS_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBDS_FLAG_SEND_DF          (1u << 7)
#define NBDS_FLAG_CAN_MULTI_CONN   (1u << 8)
#define NBDS_FLAG_SEND_RESIZE      (1u << 9)
#define NBDS_FLAG_SEND_CACHE       (1u << 10)
#define NBDS_FLAG_SEND_FAST_ZERO   (1u << 11)
#define NBDS_FLAG_BLOCK_STAT_PAYLOAD (1u << 12)

/* Requests. */
#define NBDS_REQUEST_MAGIC         UINT32_C(0x25609513)
#define NBDS_EXTENDED_REQUEST_MAGIC UINT32_C(0x21e41c71)

struct nbds_request_compact {
    uint32_t magic;
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t offset;
    uint32_t count;
} NBDS_PACKED;

struct nbds_request_extended {
    uint32_t magic;
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t offset;
    uint64_t count;
} NBDS_PACKED;

/* Commands. */
#define NBDS_CMD_READ              0
#define NBDS_CMD_WRITE             1
#define NBDS_CMD_DISC              2
#define NBDS_CMD_FLUSH             3
#define NBDS_CMD_TRIM              4
#define NBDS_CMD_CACHE             5
#define NBDS_CMD_WRITE_ZEROES      6
#define NBDS_CMD_BLOCK_STATUS      7

/* Command flags. */
#define NBDS_CMD_FLAG_FUA          (1u << 0)
#define NBDS_CMD_FLAG_NO_HOLE      (1u << 1)
#define NBDS_CMD_FLAG_DF           (1u << 2)
#define NBDS_CMD_FLAG_REQ_ONE      (1u << 3)
#define NBDS_CMD_FLAG_FAST_ZERO    (1u << 4)
#define NBDS_CMD_FLAG_PAYLOAD_LEN  (1u << 5)

/* Replies. */
#define NBDS_SIMPLE_REPLY_MAGIC    UINT32_C(0x67446698)
#define NBDS_STRUCTURED_REPLY_MAGIC UINT32_C(0x668e33ef)
#define NBDS_EXTENDED_REPLY_MAGIC  UINT32_C(0x6e8a278c)

struct nbds_simple_reply {
    uint32_t magic;
    uint32_t error;
    uint64_t cookie;
} NBDS_PACKED;

struct nbds_structured_reply {
    uint32_t magic;
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint32_t length;
} NBDS_PACKED;

struct nbds_extended_reply {
    uint32_t magic;
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t offset;           /* echoes the request's offset */
    uint64_t length;
} NBDS_PACKED;

#define NBDS_REPLY_FLAG_DONE       (1u << 0)

/* Chunk types. */
#define NBDS_REPLY_TYPE_NONE       0
#define NBDS_REPLY_TYPE_OFFSET_DATA 1
#define NBDS_REPLY_TYPE_OFFSET_HOLE 2
#define NBDS_REPLY_TYPE_BLOCK_STATUS 5
#define NBDS_REPLY_TYPE_BLOCK_STATUS_EXT 6
#define NBDS_REPLY_TYPE_ERROR      ((1u << 15) + 1)
#define NBDS_REPLY_TYPE_ERROR_OFFSET ((1u << 15) + 2)

struct nbds_chunk_offset_data { uint64_t offset; } NBDS_PACKED;   /* data follows */
struct nbds_chunk_offset_hole { uint64_t offset; uint32_t length; } NBDS_PACKED;
struct nbds_chunk_error { uint32_t error; uint16_t msglen; } NBDS_PACKED; /* message follows */
struct nbds_chunk_block_status { uint32_t context_id; } NBDS_PACKED;  /* descriptors follow */
struct nbds_chunk_block_status_ext { uint32_t context_id; uint32_t count; } NBDS_PACKED;
struct nbds_block_descriptor { uint32_t length; uint32_t status_flags; } NBDS_PACKED;
struct nbds_block_descriptor_ext { uint64_t length; uint64_t status_flags; } NBDS_PACKED;

/* Block-status payload (PAYLOAD_LEN on BLOCK_STATUS): context ids follow. */
struct nbds_block_status_payload { uint64_t effect_length; } NBDS_PACKED;

/* Error values on the wire. */
#define NBDS_EPERM                 1
#define NBDS_EIO                   5
#define NBDS_ENOMEM                12
#define NBDS_EINVAL                22
#define NBDS_ENOSPC                28
#define NBDS_EOVERFLOW             75
#define NBDS_ENOTSUP               95
#define NBDS_ESHUTDOWN             108

/* base:allocation and qemu:dirty-bitmap:* status bits. */
#define NBDS_STATE_HOLE            (1u << 0)
#define NBDS_STATE_ZERO            (1u << 1)
#define NBDS_STATE_DIRTY           (1u << 0)

/* Limits. */
#define NBDS_MAX_STRING            4096            /* names, queries, messages */
#define NBDS_MAX_PAYLOAD           (32u << 20)     /* largest request payload / READ */

_Static_assert(sizeof(struct nbds_greeting) == 18, "greeting");
_Static_assert(sizeof(struct nbds_option_header) == 16, "option header");
_Static_assert(sizeof(struct nbds_option_reply) == 20, "option reply");
_Static_assert(sizeof(struct nbds_export_name_reply) == 10, "export name reply");
_Static_assert(sizeof(struct nbds_info_export) == 12, "NBD_INFO_EXPORT");
_Static_assert(sizeof(struct nbds_info_block_size) == 14, "NBD_INFO_BLOCK_SIZE");
_Static_assert(sizeof(struct nbds_request_compact) == 28, "compact request");
_Static_assert(sizeof(struct nbds_request_extended) == 32, "extended request");
_Static_assert(sizeof(struct nbds_simple_reply) == 16, "simple reply");
_Static_assert(sizeof(struct nbds_structured_reply) == 20, "structured reply");
_Static_assert(sizeof(struct nbds_extended_reply) == 32, "extended reply");
_Static_assert(sizeof(struct nbds_chunk_offset_hole) == 12, "OFFSET_HOLE");
_Static_assert(sizeof(struct nbds_chunk_error) == 6, "ERROR");
_Static_assert(sizeof(struct nbds_chunk_block_status_ext) == 8, "BLOCK_STATUS_EXT");
_Static_assert(sizeof(struct nbds_block_descriptor) == 8, "descriptor");
_Static_assert(sizeof(struct nbds_block_descriptor_ext) == 16, "extended descriptor");
_Static_assert(sizeof(struct nbds_block_status_payload) == 8, "block status payload");

#endif /* NBDS_PROTOCOL_H */
