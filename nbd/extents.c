/* Coalescing, capped extent lists.  See extents.h. */
#include "extents.h"

#include <glib.h>

/* Largest 32-bit length that keeps descriptors 512-aligned. */
#define COMPACT_MAX_LENGTH (UINT32_MAX & ~UINT32_C(511))

NbdsExtents *nbds_extents_new(uint64_t offset, uint64_t length, size_t max, bool compact)
{
    NbdsExtents *e = g_new0(NbdsExtents, 1);

    g_assert(max >= 1 && max <= NBDS_MAX_EXTENTS);
    e->start = e->next = offset;
    e->end = offset + length;
    e->max = max;
    e->compact = compact;
    /* Grow on demand: most answers are a handful of extents. */
    e->allocated = MIN(max, 16);
    e->extents = g_new(NbdsExtent, e->allocated);
    return e;
}

void nbds_extents_free(NbdsExtents *e)
{
    if (e) {
        g_free(e->extents);
        g_free(e);
    }
}

bool nbds_extents_add(NbdsExtents *e, uint64_t length, uint32_t flags)
{
    uint64_t limit = e->compact ? COMPACT_MAX_LENGTH : UINT64_MAX;

    if (nbds_extents_done(e)) {
        return false;
    }
    length = MIN(length, e->end - e->next);

    while (length > 0) {
        NbdsExtent *last = e->count ? &e->extents[e->count - 1] : NULL;
        uint64_t take;

        if (last && last->flags == flags && last->length < limit) {
            take = MIN(length, limit - last->length);
            last->length += take;
        } else if (e->count == e->max) {
            e->full = true;
            return false;
        } else {
            if (e->count == e->allocated) {
                e->allocated = MIN(e->allocated * 2, e->max);
                e->extents = g_renew(NbdsExtent, e->extents, e->allocated);
            }
            take = MIN(length, limit);
            e->extents[e->count].length = take;
            e->extents[e->count].flags = flags;
            e->count++;
        }
        e->next += take;
        length -= take;
    }
    return !nbds_extents_done(e);
}
