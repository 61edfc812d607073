/*
 * The export file: its bytes, its holes and its allocation.  Data requests
 * become asynchronous NBD commands answered from their completions; lseek
 * and st_blocks come from base:allocation through the extent cache.
 */
#include "mount.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <string.h>

/*
 * Without WRITE_ZEROES a punch or zero range is written as zeros; past this
 * size that would flood the server, so it is refused instead.
 */
#define MAX_ZERO_WRITE (UINT64_C(256) << 20)

static const char zero_buffer[NBDFS_MAX_FUSE_IO];

int nbdfs_export_getattr(NbdfsMount *m, struct stat *st)
{
    uint64_t allocated;
    int err = nbdfs_counted_bytes(m, m->allocation, &allocated);

    if (err) {
        return err;
    }
    nbdfs_fill_attr(m, NBDFS_INO_EXPORT, nbdfs_node_mode(m, NBDFS_INO_EXPORT), st);
    st->st_size = m->size;
    st->st_blocks = (allocated + 511) / 512;
    return 0;
}

void nbdfs_export_open(fuse_req_t req, NbdfsMount *m, struct fuse_file_info *fi)
{
    if (m->read_only && (fi->flags & O_ACCMODE) != O_RDONLY) {
        fuse_reply_err(req, EROFS);
        return;
    }
    fi->keep_cache = m->keep_cache;
    /* close(2) of a writer reports failures of writes answered early. */
    fi->noflush = (fi->flags & O_ACCMODE) == O_RDONLY;
    /*
     * A write-only descriptor cannot read, so the page cache does nothing for
     * it: its writes come to us straight from the caller's buffer (one copy
     * less, no page cache to fill) and in requests as large as its writes.
     */
    fi->direct_io = (fi->flags & O_ACCMODE) == O_WRONLY;
    if (!m->keep_cache) {
        /* Close-to-open: another client may have changed a shared export. */
        nbdfs_extent_cache_clear(m->allocation->cache);
    }
    fuse_reply_open(req, fi);
}

void nbdfs_export_setattr(fuse_req_t req, NbdfsMount *m, struct stat *attr, int to_set)
{
    struct stat st;
    int err;

    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        fuse_reply_err(req, EPERM);
        return;
    }
    /* The export's size is the server's: only "truncating" to it succeeds. */
    if ((to_set & FUSE_SET_ATTR_SIZE) && (uint64_t)attr->st_size != m->size) {
        fuse_reply_err(req, m->read_only ? EROFS : EPERM);
        return;
    }
    err = nbdfs_export_getattr(m, &st);     /* times are the mount's: ignored */
    if (err) {
        fuse_reply_err(req, nbdfs_errno(err));
        return;
    }
    fuse_reply_attr(req, &st, 1.0);
}

/* Round [*LO, *HI) out to the server's minimum block size (never past the end). */
static void align_out(const NbdfsMount *m, uint64_t *lo, uint64_t *hi)
{
    *lo -= *lo % m->min_block;
    if (*hi % m->min_block) {
        *hi = MIN(*hi + (m->min_block - *hi % m->min_block), m->size);
    }
}

static bool is_aligned(const NbdfsMount *m, uint64_t offset, uint64_t length)
{
    return offset % m->min_block == 0 && (length % m->min_block == 0 ||
                                          offset + length == m->size);
}

void nbdfs_export_read(fuse_req_t req, NbdfsMount *m, size_t size, off_t off)
{
    uint64_t lo = off, hi;
    NbdfsIo *io;

    if (off < 0 || (uint64_t)off >= m->size || size == 0) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    hi = off + MIN(size, m->size - off);
    align_out(m, &lo, &hi);
    /* A write answered before it completed may still be on its way. */
    nbdfs_pending_wait_range(m, lo, hi - lo);
    io = nbdfs_io_new(m, req, NBDFS_REPLY_DATA, hi - lo, false);
    nbdfs_io_reply_slice(io, off - lo, MIN(size, m->size - off));
    nbdfs_io_pread(io, 0, lo, hi - lo);
    nbdfs_io_submit(io);
}

void nbdfs_export_write(fuse_req_t req, NbdfsMount *m, const char *buf, size_t size, off_t off,
                        int open_flags)
{
    /* O_SYNC and O_DSYNC writes are answered once the server has them. */
    bool sync = (open_flags & O_DSYNC) != 0;
    uint64_t length;
    void *owned;
    NbdfsIo *io;
    int err;

    if (m->read_only) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if (off < 0 || (uint64_t)off >= m->size) {
        fuse_reply_err(req, ENOSPC);          /* the export cannot grow */
        return;
    }
    length = MIN(size, m->size - off);        /* a short write at the end */
    if (!is_aligned(m, off, length)) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    nbdfs_pending_begin(m, off, length);
    /*
     * The data must outlive this call: take the request's buffer from libfuse
     * (it reads the next request into a new one), or else copy it.
     */
    owned = nbdfs_loop_take_request_buffer(buf);
    io = nbdfs_io_new(m, sync ? req : NULL, NBDFS_REPLY_WRITE, owned ? 0 : length, false);
    nbdfs_io_write_behind(io);
    if (owned) {
        nbdfs_io_adopt(io, owned);
    } else {
        buf = memcpy(nbdfs_io_buffer(io), buf, length);
    }
    nbdfs_io_pwrite(io, buf, off, length, sync && m->can_fua ? LIBNBD_CMD_FLAG_FUA : 0);
    err = nbdfs_io_error(io);
    nbdfs_io_submit(io);
    if (sync) {
        return;
    }
    if (err) {
        fuse_reply_err(req, nbdfs_errno(err));
    } else {
        fuse_reply_write(req, length);
    }
}

void nbdfs_export_fsync(fuse_req_t req, NbdfsMount *m)
{
    int err = nbdfs_pending_drain(m, true);
    NbdfsIo *io;

    if (err || m->read_only || !m->can_flush) {
        fuse_reply_err(req, err ? nbdfs_errno(err) : 0);
        return;
    }
    io = nbdfs_io_new(m, req, NBDFS_REPLY_NONE, 0, false);
    nbdfs_io_flush(io);
    nbdfs_io_submit(io);
}

void nbdfs_export_flush(fuse_req_t req, NbdfsMount *m)
{
    /* close(2): report what became of the writes answered early. */
    int err = nbdfs_pending_drain(m, true);

    fuse_reply_err(req, err ? nbdfs_errno(err) : 0);
}

void nbdfs_export_fallocate(fuse_req_t req, NbdfsMount *m, int mode, off_t off, off_t length)
{
    bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
    uint64_t end;
    NbdfsIo *io;

    mode &= ~FALLOC_FL_KEEP_SIZE;
    if (m->read_only) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if (off < 0 || length <= 0) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    if (!keep_size && (uint64_t)off + length > m->size) {
        fuse_reply_err(req, EFBIG);           /* would grow the export */
        return;
    }
    if (mode == 0) {
        fuse_reply_err(req, 0);               /* every byte of an export already exists */
        return;
    }
    if (mode != FALLOC_FL_PUNCH_HOLE && mode != FALLOC_FL_ZERO_RANGE) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    if ((uint64_t)off >= m->size) {
        fuse_reply_err(req, 0);               /* KEEP_SIZE past the end: nothing to do */
        return;
    }
    end = MIN((uint64_t)off + length, m->size);
    if (!is_aligned(m, off, end - off)) {
        fuse_reply_err(req, EINVAL);
        return;
    }

    nbdfs_pending_wait_range(m, off, end - off);
    io = nbdfs_io_new(m, req, NBDFS_REPLY_NONE, 0, false);
    if (m->can_zero) {
        /*
         * A punch is WRITE_ZEROES that may deallocate (reads return zeros,
         * which a bare TRIM does not promise); ZERO_RANGE keeps the space.
         */
        nbdfs_io_zero(io, off, end - off,
                      mode == FALLOC_FL_ZERO_RANGE ? LIBNBD_CMD_FLAG_NO_HOLE : 0);
    } else if (end - off <= MAX_ZERO_WRITE) {
        for (uint64_t pos = off; pos < end; pos += sizeof(zero_buffer)) {
            nbdfs_io_pwrite(io, zero_buffer, pos, MIN(sizeof(zero_buffer), end - pos), 0);
        }
    } else {
        nbdfs_io_fail(io, EOPNOTSUPP);
    }
    nbdfs_io_submit(io);
}

void nbdfs_export_lseek(fuse_req_t req, NbdfsMount *m, off_t off, int whence)
{
    uint64_t result;
    int err;

    if (off < 0) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    err = nbdfs_seek(m, m->allocation, off, whence == SEEK_DATA, &result);
    if (err) {
        fuse_reply_err(req, err == ENXIO ? ENXIO : nbdfs_errno(err));
        return;
    }
    fuse_reply_lseek(req, result);
}
