/*
 * Metadata contexts: the registry each export offers (base:allocation first,
 * id 0, then one qemu:dirty-bitmap:NAME per bitmap, ids 1..n, bit 0 = dirty
 * as qemu-nbd serves them) and the LIST/SET options.
 *
 *   [0 .. 3]      export name length n
 *   [4 .. 3+n]    export name
 *   [4+n .. 7+n]  number of queries q
 *   then q x { 4-byte length m; m bytes of query }
 *
 * LIST: no query lists every context; a query ending in ':' ("base:",
 * "qemu:", "qemu:dirty-bitmap:") lists the contexts under it; any other query
 * lists the context of that exact name.  SET selects exact names only.  Ids
 * are indexes into the export's registry, so they are stable for the life of
 * the connection.  Unknown namespaces and names are ignored, as the protocol
 * requires.
 *
 * The registry grows while served (a bitmap added through the control
 * socket) and is never shortened: a removed context is only marked, so the
 * ids connected clients hold keep their meaning.  It is read under
 * contexts_lock, briefly, never across a socket write.
 */
#include "internal.h"

#include <endian.h>
#include <string.h>

#include "protostrings.h"

void nbds_meta_context_free(NbdsMetaContext *ctx)
{
    if (ctx) {
        g_free(ctx->name);
        g_free(ctx);
    }
}

void nbds_meta_add(NbdsExport *exp, const char *name, NbdsExtentsFn extents, gpointer opaque)
{
    NbdsMetaContext *ctx = g_new0(NbdsMetaContext, 1);

    ctx->name = g_strdup(name);
    ctx->extents = extents;
    ctx->opaque = opaque;
    g_rw_lock_writer_lock(&exp->contexts_lock);
    g_ptr_array_add(exp->contexts, ctx);
    g_rw_lock_writer_unlock(&exp->contexts_lock);
}

/* base:allocation: data 0, holes HOLE|ZERO (a backup view's as it was). */
static int base_allocation_extents(NbdsExport *exp, const NbdsMetaContext *ctx, NbdsExtents *e)
{
    (void)ctx;
    while (!nbds_extents_done(e)) {
        bool is_hole;
        uint64_t run_end;
        int err = nbds_export_next_run(exp, e->next, e->end, &is_hole, &run_end);
        if (err) {
            return err;
        }
        nbds_extents_add(e, run_end - e->next,
                         is_hole ? NBDS_STATE_HOLE | NBDS_STATE_ZERO : 0);
    }
    return 0;
}

void nbds_meta_add_base_allocation(NbdsExport *exp)
{
    g_assert(exp->contexts->len == 0);   /* id 0 */
    nbds_meta_add(exp, "base:allocation", base_allocation_extents, NULL);
}

static int dirty_bitmap_extents(NbdsExport *exp, const NbdsMetaContext *ctx, NbdsExtents *e)
{
    return nbds_bitmap_extents(exp->bitmaps, ctx->opaque, e);
}

void nbds_meta_add_bitmap(NbdsExport *exp, NbdsBitmap *bm)
{
    NbdsBitmapInfo info;
    g_autofree char *name = NULL;

    nbds_bitmap_info(exp->bitmaps, bm, &info);
    name = g_strconcat("qemu:dirty-bitmap:", info.name, NULL);
    nbds_meta_add(exp, name, dirty_bitmap_extents, bm);
}

void nbds_meta_add_bitmaps(NbdsExport *exp)
{
    for (guint i = 0; i < nbds_bitmaps_count(exp->bitmaps); i++) {
        nbds_meta_add_bitmap(exp, nbds_bitmaps_get(exp->bitmaps, i));
    }
}

void nbds_meta_remove_bitmap(NbdsExport *exp, NbdsBitmap *bm)
{
    g_rw_lock_writer_lock(&exp->contexts_lock);
    for (guint i = 0; i < exp->contexts->len; i++) {
        NbdsMetaContext *ctx = g_ptr_array_index(exp->contexts, i);
        if (ctx->extents == dirty_bitmap_extents && ctx->opaque == bm) {
            ctx->removed = true;
        }
    }
    g_rw_lock_writer_unlock(&exp->contexts_lock);
}

NbdsMetaContext *nbds_meta_context_get(NbdsExport *exp, uint32_t id)
{
    NbdsMetaContext *ctx;

    g_rw_lock_reader_lock(&exp->contexts_lock);
    ctx = g_ptr_array_index(exp->contexts, id);
    g_rw_lock_reader_unlock(&exp->contexts_lock);
    return ctx;
}

/* The contexts offered now, by id; NULL where one was removed. */
static GPtrArray *offered_contexts(NbdsExport *exp)
{
    GPtrArray *snap;

    g_rw_lock_reader_lock(&exp->contexts_lock);
    snap = g_ptr_array_sized_new(exp->contexts->len);
    for (guint i = 0; i < exp->contexts->len; i++) {
        NbdsMetaContext *ctx = g_ptr_array_index(exp->contexts, i);
        g_ptr_array_add(snap, ctx->removed ? NULL : ctx);
    }
    g_rw_lock_reader_unlock(&exp->contexts_lock);
    return snap;
}

void nbds_meta_clear(NbdsConn *c)
{
    g_clear_pointer(&c->meta_selected, g_free);
    nbds_export_unref(c->server, c->meta_export);
    c->meta_export = NULL;
    c->meta_len = 0;
    c->meta_count = 0;
}

static bool query_matches(const char *query, size_t qlen, const char *name, bool is_list)
{
    if (strlen(name) == qlen && memcmp(query, name, qlen) == 0) {
        return true;
    }
    /* A namespace (or sub-namespace) query lists everything under it. */
    return is_list && qlen > 0 && query[qlen - 1] == ':' && strncmp(query, name, qlen) == 0;
}

/* Answer LIST or SET for EXP's contexts, from the queries at DATA + POS. */
static int match_contexts(NbdsConn *c, uint32_t option, NbdsExport *exp, const uint8_t *data,
                          uint32_t len, uint32_t pos, uint32_t nqueries)
{
    bool is_list = option == NBDS_OPT_LIST_META_CONTEXT;
    const char *what = nbds_opt_name(option);
    g_autofree bool *match = NULL;
    g_autoptr(GPtrArray) offered = NULL;
    unsigned count = 0;

    offered = offered_contexts(exp);
    match = g_new0(bool, offered->len);
    if (nqueries == 0 && is_list) {
        for (guint i = 0; i < offered->len; i++) {
            match[i] = g_ptr_array_index(offered, i) != NULL;
        }
    }
    for (uint32_t q = 0; q < nqueries; q++) {
        uint32_t qlen;
        const char *query;

        if (len - pos < 4) {
            return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID,
                                  "%s: query %u overruns the option", what, q) ? 0 : -1;
        }
        qlen = nbds_load_be32(data + pos);
        pos += 4;
        if (qlen > len - pos) {
            return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID,
                                  "%s: query %u length %u overruns the option", what, q,
                                  qlen) ? 0 : -1;
        }
        query = (const char *)data + pos;
        pos += qlen;
        if (memchr(query, 0, qlen)) {
            return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID,
                                  "%s: query %u contains a NUL byte", what, q) ? 0 : -1;
        }
        if (qlen > NBDS_MAX_STRING) {
            continue;          /* no context has such a name */
        }
        for (guint i = 0; i < offered->len; i++) {
            NbdsMetaContext *ctx = g_ptr_array_index(offered, i);
            match[i] |= ctx && query_matches(query, qlen, ctx->name, is_list);
        }
    }
    if (pos != len) {
        return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID,
                              "%s: %u bytes after the last query", what, len - pos) ? 0 : -1;
    }

    for (guint i = 0; i < offered->len; i++) {
        NbdsMetaContext *ctx = g_ptr_array_index(offered, i);
        size_t nlen;
        g_autofree uint8_t *buf = NULL;
        uint32_t id;

        if (!match[i]) {
            continue;
        }
        nlen = strlen(ctx->name);
        buf = g_malloc(4 + nlen);
        id = htobe32(is_list ? 0 : i);     /* LIST ids mean nothing */
        memcpy(buf, &id, 4);
        memcpy(buf + 4, ctx->name, nlen);
        if (!nbds_opt_reply(c, option, NBDS_REP_META_CONTEXT, buf, 4 + nlen)) {
            return -1;
        }
        count++;
    }
    if (!is_list) {
        c->meta_export = exp;
        c->meta_selected = g_steal_pointer(&match);
        c->meta_len = offered->len;
        c->meta_count = count;
    }
    return nbds_opt_reply(c, option, NBDS_REP_ACK, NULL, 0) ? 0 : -1;
}

int nbds_meta_handle_option(NbdsConn *c, uint32_t option, const uint8_t *data, uint32_t len)
{
    bool is_list = option == NBDS_OPT_LIST_META_CONTEXT;
    const char *what = nbds_opt_name(option);
    uint32_t namelen, nqueries, pos;
    g_autofree char *name = NULL;
    NbdsExport *exp;
    int r;

    if (!is_list) {
        /* Each SET replaces the whole selection, even when it fails. */
        nbds_meta_clear(c);
        if (c->mode == NBDS_MODE_SIMPLE) {
            return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID,
                                  "%s needs structured replies or extended headers first",
                                  what) ? 0 : -1;
        }
    }
    if (len < 8) {
        return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID, "%s: option too short",
                              what) ? 0 : -1;
    }
    namelen = nbds_load_be32(data);
    if (namelen > len - 8) {
        return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID,
                              "%s: export name length %u overruns the option", what,
                              namelen) ? 0 : -1;
    }
    if (namelen > NBDS_MAX_STRING || memchr(data + 4, 0, namelen)) {
        return nbds_opt_error(c, option, NBDS_REP_ERR_INVALID, "%s: invalid export name",
                              what) ? 0 : -1;
    }
    name = g_strndup((const char *)data + 4, namelen);
    nqueries = nbds_load_be32(data + 4 + namelen);
    pos = 8 + namelen;

    exp = nbds_server_ref_export(c->server, name);
    if (!exp) {
        return nbds_opt_error(c, option, NBDS_REP_ERR_UNKNOWN, "export '%.*s' not found",
                              128, name) ? 0 : -1;
    }
    r = match_contexts(c, option, exp, data, len, pos, nqueries);
    if (c->meta_export != exp || is_list) {
        nbds_export_unref(c->server, exp);    /* kept only by a successful SET */
    }
    return r;
}
