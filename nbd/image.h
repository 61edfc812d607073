/*
 * The raw image backend: one file (or block device) holding an export's bytes.
 *
 * Data-path functions return 0 or a positive errno and are safe to call from
 * many threads at once: they use positioned I/O on one shared descriptor, so
 * every connection sees the same page cache and a FLUSH on one connection
 * covers writes made on all of them (what CAN_MULTI_CONN promises).
 */
#ifndef NBDS_IMAGE_H
#define NBDS_IMAGE_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>

#include "extents.h"

typedef struct NbdsImage NbdsImage;

/*
 * Open PATH and take an advisory lock on it (shared when READ_ONLY, exclusive
 * otherwise), so two servers cannot write one image.  Errors name the path.
 */
NbdsImage *nbds_image_open(const char *path, bool read_only, GError **error);
/*
 * A scratch file of SIZE bytes in DIR, all holes, without a name (O_TMPFILE,
 * or a name unlinked at once): it disappears when closed, or when the process dies.
 */
NbdsImage *nbds_image_new_scratch(const char *dir, uint64_t size, GError **error);
/* Bytes the file takes on disk. */
uint64_t nbds_image_allocated_bytes(const NbdsImage *img);
/* Give a scratch file's space back at once (it reads as nothing afterwards). */
void nbds_image_shrink_to_nothing(NbdsImage *img);
void nbds_image_close(NbdsImage *img);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NbdsImage, nbds_image_close)

const char *nbds_image_path(const NbdsImage *img);
uint64_t nbds_image_size(const NbdsImage *img);
int nbds_image_fd(const NbdsImage *img);
bool nbds_image_is_block_device(const NbdsImage *img);

int nbds_image_pread(NbdsImage *img, void *buf, uint64_t len, uint64_t offset);
/*
 * The same from an image's descriptor FD (the mount reads its local image
 * so): whole (never short), zeros past the end of a file shrunk under it;
 * 0 or an errno.
 */
int nbds_pread_image_fd(int fd, void *buf, uint64_t len, uint64_t offset);
int nbds_image_pwrite(NbdsImage *img, const void *buf, uint64_t len, uint64_t offset, bool fua);
int nbds_image_flush(NbdsImage *img);
/* Discard: may do nothing; the range then reads as zeros only if the file system says so. */
int nbds_image_trim(NbdsImage *img, uint64_t offset, uint64_t len, bool fua);
/*
 * Make the range read as zeros.  MAY_TRIM lets it deallocate (no NO_HOLE);
 * FAST fails at once with ENOTSUP unless zeroing is cheaper than writing.
 */
int nbds_image_zero(NbdsImage *img, uint64_t offset, uint64_t len, bool may_trim,
                    bool fast, bool fua);
int nbds_image_cache(NbdsImage *img, uint64_t offset, uint64_t len);

/*
 * The run starting at OFFSET (< END): *IS_HOLE tells whether it reads as zeros
 * because nothing is allocated, *RUN_END where it ends (<= END, > OFFSET).
 */
int nbds_image_next_run(NbdsImage *img, uint64_t offset, uint64_t end, bool *is_hole,
                        uint64_t *run_end);

#endif /* NBDS_IMAGE_H */
