/*
 * Persistent dirty bitmaps of a raw image, kept in a sidecar file beside it
 * (IMAGE.bitmaps) and served as qemu:dirty-bitmap:NAME.
 *
 * Crash semantics: a server writing the image sets the sidecar's in-use flag
 * (durably) before its first write and clears it on clean close, recording
 * the image's size and mtime.  Finding the flag set, or the image's size or
 * mtime changed, makes every bitmap inconsistent: served as all dirty until
 * cleared.  Marks are set in memory before each write runs and reach the
 * sidecar no later than the FLUSH or FUA write that makes the data durable.
 */
#ifndef NBDS_BITMAP_H
#define NBDS_BITMAP_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>

#include "extents.h"
#include "image.h"

#define NBDS_BITMAP_MIN_GRANULARITY 512u
#define NBDS_BITMAP_MAX_GRANULARITY (64u << 20)
#define NBDS_BITMAP_DEFAULT_GRANULARITY (64u << 10)
#define NBDS_BITMAP_MAX_NAME 1023
#define NBDS_BITMAP_MAX_COUNT 64

typedef struct NbdsBitmap NbdsBitmap;
typedef struct NbdsBitmapSet NbdsBitmapSet;

/* Why the set was found inconsistent (for messages), or NULL. */
typedef struct {
    const char *name;
    uint32_t granularity;
    bool enabled;
    bool consistent;
    uint64_t dirty_bytes;          /* the image size when inconsistent */
} NbdsBitmapInfo;

/* The sidecar's path for IMAGE_PATH (caller frees). */
char *nbds_bitmap_sidecar_path(const char *image_path);

/* What a sidecar's header says of the image it belongs to. */
typedef struct {
    bool in_use;                   /* a server was writing the image */
    uint64_t size;                 /* the image's size, and mtime, at the last clean close */
    int64_t mtime_sec;
    uint32_t mtime_nsec;
} NbdsSidecarState;

/* An empty set for the sidecar at PATH of an image of SIZE bytes, with no file. */
NbdsBitmapSet *nbds_bitmaps_new(const char *path, uint64_t size);
/*
 * Check and parse a sidecar's bytes into SET's bitmaps (no file, no image:
 * the fuzzers feed it directly).  A file failing any check is an error
 * naming it and saying how to recover.
 */
bool nbds_bitmaps_parse(NbdsBitmapSet *set, const uint8_t *buf, size_t len,
                        NbdsSidecarState *state, GError **error);

/*
 * Load the bitmaps of IMG (opened and locked by the caller).  A missing
 * sidecar is an empty set.  A corrupt or foreign sidecar is an error naming
 * it, and so is one beside a block device (its changes while not served
 * could not be detected), or one that is a symlink.  FOR_WRITING (a server that writes the image) marks the sidecar in use
 * on disk before returning; otherwise nothing is written.
 */
NbdsBitmapSet *nbds_bitmaps_load(NbdsImage *img, bool for_writing, GError **error);

/*
 * Clean close of a set loaded FOR_WRITING: persist every bit, record the
 * image's size and mtime (after the caller's final image flush), clear the
 * in-use flag.  Frees the set.
 */
bool nbds_bitmaps_close(NbdsBitmapSet *set, GError **error);
void nbds_bitmaps_free(NbdsBitmapSet *set);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NbdsBitmapSet, nbds_bitmaps_free)

/* Why loading found the bitmaps inconsistent ("unclean shutdown", ...), or NULL. */
const char *nbds_bitmaps_inconsistent_reason(const NbdsBitmapSet *set);

guint nbds_bitmaps_count(const NbdsBitmapSet *set);
NbdsBitmap *nbds_bitmaps_get(NbdsBitmapSet *set, guint i);
NbdsBitmap *nbds_bitmaps_find(NbdsBitmapSet *set, const char *name);
void nbds_bitmap_info(const NbdsBitmapSet *set, const NbdsBitmap *bm, NbdsBitmapInfo *info);

/* Data path: mark [OFFSET, OFFSET+LEN) dirty in every enabled bitmap.  Lock-free. */
void nbds_bitmaps_mark(NbdsBitmapSet *set, uint64_t offset, uint64_t len);
/* Is any bitmap of SET enabled (consistent or not)? */
bool nbds_bitmaps_any_enabled(const NbdsBitmapSet *set);
/* Write changed marks to the sidecar and sync it; 0 or an errno. */
int nbds_bitmaps_sync(NbdsBitmapSet *set);
/* Dirty status (bit 0) of BM over e's range, merged and granularity-aligned. */
int nbds_bitmap_extents(NbdsBitmapSet *set, const NbdsBitmap *bm, NbdsExtents *e);

/*
 * Edits: by the bitmap command on an image nobody serves (then saved by
 * nbds_bitmaps_save), or by the server holding the image, with no write
 * running (then saved by nbds_bitmaps_save_in_use).  A bitmap removed while
 * served stays readable until the set is freed: clients may still read it.
 */
typedef enum {
    NBDS_BITMAP_ADD,
    NBDS_BITMAP_REMOVE,
    NBDS_BITMAP_CLEAR,
    NBDS_BITMAP_ENABLE,
    NBDS_BITMAP_DISABLE,
} NbdsBitmapEdit;

const char *nbds_bitmap_edit_name(NbdsBitmapEdit edit);
bool nbds_bitmap_edit_parse(const char *name, NbdsBitmapEdit *edit);
/* Apply EDIT to the bitmap NAME (GRANULARITY: for ADD); the bitmap, or NULL with ERROR. */
NbdsBitmap *nbds_bitmaps_edit(NbdsBitmapSet *set, NbdsBitmapEdit edit, const char *name,
                              uint32_t granularity, GError **error);
/*
 * The same on a set loaded for writing, while served (no write may run):
 * the sidecar is rewritten, still in use; *SAVED tells whether that worked
 * (else ERROR says why, and the edit stands: it is saved at the close).
 */
NbdsBitmap *nbds_bitmaps_edit_in_use(NbdsBitmapSet *set, NbdsBitmapEdit edit, const char *name,
                                     uint32_t granularity, bool *saved, GError **error);

/*
 * Bitmaps outside any set, for backup views: never saved, never marked by
 * writes.  Bits are read and set atomically, from any thread.
 */
/* An empty one, for an image of SIZE bytes. */
NbdsBitmap *nbds_bitmap_new(uint32_t granularity, uint64_t size);
/* A frozen copy of BM. */
NbdsBitmap *nbds_bitmap_copy(const NbdsBitmap *bm, uint64_t size);
/* Whether the granule holding OFFSET is set. */
bool nbds_bitmap_test(const NbdsBitmap *bm, uint64_t offset);
/* Where the run of granules like OFFSET's ends (a byte offset, at most LIMIT). */
uint64_t nbds_bitmap_run_end(const NbdsBitmap *bm, uint64_t offset, uint64_t limit);
/* Where the first set granule at or after OFFSET's starts (a byte offset, at most LIMIT). */
uint64_t nbds_bitmap_next_set(const NbdsBitmap *bm, uint64_t offset, uint64_t limit);
/* Set the granules covering [OFFSET, OFFSET+LEN). */
void nbds_bitmap_set(NbdsBitmap *bm, uint64_t offset, uint64_t len);
/* Set in INTO every range set in FROM: an aborted backup's changes go back. */
void nbds_bitmap_merge(NbdsBitmap *into, const NbdsBitmap *from);
void nbds_bitmap_free(NbdsBitmap *bm);

bool nbds_bitmap_name_valid(const char *name, GError **error);
bool nbds_bitmaps_add(NbdsBitmapSet *set, const char *name, uint32_t granularity,
                      GError **error);
void nbds_bitmaps_remove(NbdsBitmapSet *set, NbdsBitmap *bm);
void nbds_bitmap_clear(NbdsBitmapSet *set, NbdsBitmap *bm);
void nbds_bitmap_set_enabled(NbdsBitmap *bm, bool enabled);
/* Rewrite the sidecar atomically (or remove it when no bitmap is left). */
bool nbds_bitmaps_save(NbdsBitmapSet *set, GError **error);

#endif /* NBDS_BITMAP_H */
