/*
 * A bounded, coalescing list of block-status extents for one request.
 *
 * Producers (base:allocation, dirty bitmaps) add runs in ascending order from
 * the request offset; the list merges neighbours with equal status, clips at
 * the request end (so nothing ever passes the export end), stops at its
 * descriptor cap (1 under REQ_ONE) and, in compact mode, keeps every length
 * below 2^32.  nbds_extents_add() returning false means "full: stop".
 */
#ifndef NBDS_EXTENTS_H
#define NBDS_EXTENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <glib.h>

typedef struct {
    uint64_t length;
    uint32_t flags;
} NbdsExtent;

typedef struct {
    uint64_t start;            /* request offset */
    uint64_t end;              /* request offset + length: nothing passes it */
    uint64_t next;             /* first byte not yet covered */
    size_t count;
    size_t max;                /* descriptor cap */
    size_t allocated;          /* room in extents[] */
    bool compact;              /* 32-bit descriptors: lengths < 2^32 */
    bool full;
    NbdsExtent *extents;
} NbdsExtents;

/*
 * Largest number of descriptors in one chunk (spec: <= 2^20; qemu-nbd: 2^17).
 * 2^16 keeps a reply under 1 MiB of memory while a whole 1 TiB bitmap with
 * tens of thousands of dirty runs still fits in one answer.
 */
#define NBDS_MAX_EXTENTS 65536

/*
 * A list for [OFFSET, OFFSET + LENGTH) holding at most MAX descriptors
 * (MAX >= 1).  COMPACT limits each length to 32 bits.
 */
NbdsExtents *nbds_extents_new(uint64_t offset, uint64_t length, size_t max, bool compact);
void nbds_extents_free(NbdsExtents *e);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NbdsExtents, nbds_extents_free)

/*
 * Append LENGTH bytes of status FLAGS at e->next.  Returns true while more may
 * be added, false once the list is full or reaches the request end.
 */
bool nbds_extents_add(NbdsExtents *e, uint64_t length, uint32_t flags);

/* True when nothing more can be added. */
static inline bool nbds_extents_done(const NbdsExtents *e)
{
    return e->full || e->next >= e->end;
}

#endif /* NBDS_EXTENTS_H */
