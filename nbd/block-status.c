/*
 * NBD_CMD_BLOCK_STATUS: the payload form's validation and the status chunks.
 *
 * Payload (NBD_CMD_FLAG_PAYLOAD_LEN, extended headers only):
 *   [0 .. 7]    effect length: the range asked about
 *   [8 .. ]     n x 4-byte context ids, a subset of those negotiated
 * Only the contexts listed are computed and sent, one chunk each, in id order.
 */
#include "internal.h"

#include <endian.h>
#include <string.h>

uint32_t nbds_block_status_parse_payload(const uint8_t *payload, size_t len,
                                         const bool *selected, size_t n,
                                         uint64_t *effect_length, uint32_t *ids,
                                         size_t *n_ids, const char **why)
{
    size_t count;
    g_autofree bool *seen = NULL;

    if (len < sizeof(struct nbds_block_status_payload)) {
        *why = "block-status payload is shorter than 8 bytes";
        return NBDS_EINVAL;
    }
    if ((len - 8) % 4 != 0) {
        *why = "block-status payload length is not 8 + 4n";
        return NBDS_EINVAL;
    }
    count = (len - 8) / 4;
    if (count == 0) {
        *why = "block-status payload lists no context";
        return NBDS_EINVAL;
    }
    if (count > n) {
        *why = "block-status payload lists more contexts than were negotiated";
        return NBDS_EINVAL;
    }
    seen = g_new0(bool, n);
    for (size_t i = 0; i < count; i++) {
        uint32_t id = nbds_load_be32(payload + 8 + 4 * i);
        if (id >= n || !selected[id]) {
            *why = "block-status payload names a context that was not negotiated";
            return NBDS_EINVAL;
        }
        if (seen[id]) {
            *why = "block-status payload names a context twice";
            return NBDS_EINVAL;
        }
        seen[id] = true;
    }
    *effect_length = nbds_load_be64(payload);
    if (*effect_length == 0) {
        *why = "block-status effect length is zero";
        return NBDS_EINVAL;
    }
    /* Ids in ascending order: chunks always come in registry order. */
    *n_ids = 0;
    for (size_t id = 0; id < n; id++) {
        if (seen[id]) {
            ids[(*n_ids)++] = id;
        }
    }
    return 0;
}

/* Append one status chunk for context ID with E's descriptors to OUT. */
static void encode_chunk(NbdsConn *c, const NbdsRequest *req, uint32_t id,
                         const NbdsExtents *e, bool last, GByteArray *out)
{
    bool ext = c->mode == NBDS_MODE_EXTENDED;
    size_t payload = ext ? 8 + 16 * e->count : 4 + 8 * e->count;
    uint8_t hdr[NBDS_REPLY_HEADER_MAX];
    size_t hlen = nbds_chunk_header(c, req, last ? NBDS_REPLY_FLAG_DONE : 0,
                                    ext ? NBDS_REPLY_TYPE_BLOCK_STATUS_EXT
                                        : NBDS_REPLY_TYPE_BLOCK_STATUS,
                                    payload, hdr);
    guint at;

    g_byte_array_append(out, hdr, hlen);
    at = out->len;
    g_byte_array_set_size(out, at + payload);
    if (ext) {
        struct nbds_chunk_block_status_ext h = { htobe32(id), htobe32(e->count) };
        memcpy(out->data + at, &h, sizeof(h));
        at += sizeof(h);
        for (size_t i = 0; i < e->count; i++) {
            struct nbds_block_descriptor_ext d = {
                htobe64(e->extents[i].length), htobe64(e->extents[i].flags)
            };
            memcpy(out->data + at, &d, sizeof(d));
            at += sizeof(d);
        }
    } else {
        struct nbds_chunk_block_status h = { htobe32(id) };
        memcpy(out->data + at, &h, sizeof(h));
        at += sizeof(h);
        for (size_t i = 0; i < e->count; i++) {
            struct nbds_block_descriptor d = {
                htobe32((uint32_t)e->extents[i].length), htobe32(e->extents[i].flags)
            };
            memcpy(out->data + at, &d, sizeof(d));
            at += sizeof(d);
        }
    }
}

/* Bytes of one context's answer at most: its chunk, and the list it is built in. */
static uint64_t context_cost(bool req_one)
{
    uint64_t n = req_one ? 1 : NBDS_MAX_EXTENTS;

    return NBDS_REPLY_HEADER_MAX + 8 + n * (16 + sizeof(NbdsExtent));
}

uint64_t nbds_block_status_cost(const NbdsConn *c, bool req_one)
{
    /* A payload may only name contexts that were selected: at most all of them. */
    return c->meta_count * context_cost(req_one);
}

bool nbds_block_status_reply(NbdsConn *c, const NbdsRequest *req, uint64_t length,
                             const uint32_t *ids, size_t n_ids)
{
    NbdsExport *exp = c->export;
    size_t max = req->flags & NBDS_CMD_FLAG_REQ_ONE ? 1 : NBDS_MAX_EXTENTS;
    g_autofree uint32_t *all = NULL;
    g_autoptr(GByteArray) out = g_byte_array_new();
    struct iovec iov;
    guint len;

    if (n_ids == 0) {
        all = g_new(uint32_t, c->meta_len);
        for (guint id = 0; id < c->meta_len; id++) {
            if (c->meta_selected[id]) {
                all[n_ids++] = id;
            }
        }
        ids = all;
    }
    /*
     * Each context's chunk is encoded as soon as it is known (and its list
     * freed); nothing is sent before all are, so an error still comes first.
     */
    for (size_t i = 0; i < n_ids; i++) {
        NbdsMetaContext *ctx = nbds_meta_context_get(exp, ids[i]);
        g_autoptr(NbdsExtents) e = nbds_extents_new(req->offset, length, max,
                                                    c->mode != NBDS_MODE_EXTENDED);
        int err = ctx->extents(exp, ctx, e);

        if (err) {
            return nbds_reply_error(c, req, nbds_errno_to_wire(err), "%s: %s", ctx->name,
                                    g_strerror(err));
        }
        if (e->count == 0) {
            nbds_extents_add(e, length, 0);    /* status 0 is always safe */
        }
        encode_chunk(c, req, ids[i], e, i + 1 == n_ids, out);
    }
    len = out->len;
    iov.iov_base = g_byte_array_steal(out, NULL);
    iov.iov_len = len;
    return nbds_reply_send_owned(c, &iov, 1, iov.iov_base, len);
}
