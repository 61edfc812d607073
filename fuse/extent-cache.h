/*
 * What we know of one metadata context's block status, by range.
 *
 * Block-status answers are stored as non-overlapping runs [start, end) with
 * one status each; adjacent runs with the same status are merged, so a
 * lookup returns the longest known run.  Ranges never asked about, or
 * forgotten after a write, are simply absent: the caller fetches them from
 * the server and inserts the answer.
 *
 * Coherence: every invalidation bumps a generation counter.  A caller reads
 * the generation before sending a block-status request and passes it to
 * insert, which refuses the answer if the cache was invalidated meanwhile
 * (the answer may predate a write that has since completed).
 *
 * Memory is bounded: when an insert would exceed the run limit, everything
 * already known is dropped first.  Thread-safe.
 */
#ifndef NBDFS_EXTENT_CACHE_H
#define NBDFS_EXTENT_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct NbdfsExtentCache NbdfsExtentCache;

/* One block-status descriptor: same layout as libnbd's nbd_extent. */
typedef struct {
    uint64_t length;
    uint64_t status;
} NbdfsExtent;

/* A cache for an export of SIZE bytes holding at most MAX_RUNS runs. */
NbdfsExtentCache *nbdfs_extent_cache_new(uint64_t size, size_t max_runs);
void nbdfs_extent_cache_free(NbdfsExtentCache *cache);

uint64_t nbdfs_extent_cache_generation(NbdfsExtentCache *cache);

/*
 * Record the N extents of a reply, the first starting at OFFSET (clipped to
 * the export size).  Returns false, storing nothing, when the cache was
 * invalidated after GENERATION was read.
 */
bool nbdfs_extent_cache_insert(NbdfsExtentCache *cache, uint64_t generation, uint64_t offset,
                               const NbdfsExtent *extents, size_t n);

/*
 * If the status at OFFSET (< size) is known, store it in *STATUS, the end of
 * its run in *END and return true.
 */
bool nbdfs_extent_cache_lookup(NbdfsExtentCache *cache, uint64_t offset, uint64_t *status,
                               uint64_t *end);

/* Forget [OFFSET, OFFSET + LENGTH), or everything. */
void nbdfs_extent_cache_invalidate(NbdfsExtentCache *cache, uint64_t offset, uint64_t length);
void nbdfs_extent_cache_clear(NbdfsExtentCache *cache);

/* Number of runs held (for tests and memory accounting). */
size_t nbdfs_extent_cache_runs(NbdfsExtentCache *cache);

#endif /* NBDFS_EXTENT_CACHE_H */
