/*
 * The export file: its bytes, its holes and its allocation.  Data requests
 * become asynchronous NBD commands answered from their completions; lseek
 * and st_blocks come from base:allocation through the extent cache.
 *
 * Writes, zeroes and punches reserve their range (rounded out to the
 * server's minimum block size) in the write-behind table before anything
 * else, so overlapping writes are serialized; one that does not cover whole
 * blocks reads the blocks at its edges first and writes them back whole
 * (read-modify-write).
 *
 * Durability: an O_SYNC/O_DSYNC write is answered once it is stable: sent
 * with FUA when the server has it, else followed by a FLUSH.  fsync sends a
 * FLUSH when a write completed since the last one.  Errors follow
 * open-files.c.
 */
#include "mount.h"
#include "image.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <string.h>
#include <unistd.h>

/*
 * Without WRITE_ZEROES a punch or zero range is written as zeros; past this
 * size that would flood the server, so it is refused instead.
 */
#define MAX_ZERO_WRITE (UINT64_C(256) << 20)

static const char zero_buffer[NBDFS_MAX_FUSE_IO];

static NbdfsFile *file_of(struct fuse_file_info *fi)
{
    return (NbdfsFile *)(uintptr_t)fi->fh;
}

/*
 * Bytes st_blocks counts.  With writes that bypass us (writable
 * passthrough) nothing cached of the image's allocation holds, and walking
 * its extents at every getattr would cost as much as it has extents: its
 * own st_blocks says the same in one call, once any write of ours answered
 * early has landed.
 */
static int allocated_bytes(NbdfsMount *m, uint64_t *bytes)
{
    struct stat image;

    if (!g_atomic_int_get(&m->fs->untracked_writes) || m->image_fd < 0) {
        return nbdfs_counted_bytes(m, m->allocation, bytes);
    }
    nbdfs_pending_drain(m);
    if (fstat(m->image_fd, &image) < 0) {
        return errno;
    }
    *bytes = (uint64_t)image.st_blocks * 512;
    return 0;
}

int nbdfs_export_getattr(NbdfsMount *m, struct stat *st)
{
    uint64_t allocated;
    int err = allocated_bytes(m, &allocated);

    if (err) {
        return err;
    }
    nbdfs_fill_attr(m, NBDFS_INO_EXPORT, nbdfs_node_mode(m, NBDFS_INO_EXPORT), st);
    st->st_size = m->size;
    st->st_blocks = (allocated + 511) / 512;
    return 0;
}

#if NBDFS_HAVE_PASSTHROUGH
/* Register M's image with the kernel for passthrough: a backing id, or 0. */
static int register_backing_file(fuse_req_t req, NbdfsMount *m)
{
    int id = fuse_passthrough_open(req, m->image_fd);

    if (id <= 0) {
        /* No CAP_SYS_ADMIN (the kernel wants it), or a file system it refuses. */
        g_warning("the kernel refuses the image for FUSE passthrough (%s): nbdfs "
                  "reads%s it instead", g_strerror(errno), m->read_only ? "" : " and writes");
        return 0;
    }
    if (!m->read_only) {
        g_autofree char *why = g_strdup_printf(
            "%s is mounted on %s with --passthrough=all, whose writes no bitmap can see: "
            "unmount it, or mount it without --passthrough=all", m->source->image,
            m->fs->mountpoint);
        if (!nbds_export_allow_untracked_writes(m->source->export, why)) {
            g_message("FUSE passthrough: off, writes must mark the image's enabled bitmaps");
            fuse_passthrough_close(req, id);
            return 0;
        }
        /* Before any open gets the id: from now on nothing cached of the image holds. */
        g_atomic_int_set(&m->fs->untracked_writes, 1);
    }
    return id;
}

/*
 * The backing id of M's image for FUSE passthrough, registered once by the
 * first open (the others wait for it: the kernel refuses an inode open both
 * with and without passthrough) and kept until the FUSE connection ends;
 * 0 if the kernel does nothing itself.
 */
static int passthrough_backing_id(fuse_req_t req, NbdfsMount *m)
{
    if (m->image_fd < 0 || !g_atomic_int_get(&m->fs->passthrough)) {
        return 0;
    }
    if (g_once_init_enter(&m->backing_once)) {
        m->backing_id = register_backing_file(req, m);
        g_once_init_leave(&m->backing_once, 1);
    }
    return m->backing_id;
}
#endif

void nbdfs_export_open(fuse_req_t req, NbdfsMount *m, struct fuse_file_info *fi)
{
    bool writable = (fi->flags & O_ACCMODE) != O_RDONLY;

    if (m->read_only && writable) {
        fuse_reply_err(req, EROFS);
        return;
    }
    fi->keep_cache = m->keep_cache;
    /* close(2) of a writer reports failures of writes answered early. */
    fi->noflush = !writable;
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
    fi->fh = (uintptr_t)nbdfs_file_open(m, writable);
#if NBDFS_HAVE_PASSTHROUGH
    /*
     * Reads, writes and mmap of this file go to the image without reaching
     * us, through its page cache (the kernel refuses keep_cache with it, and
     * direct_io would take precedence).
     */
    fi->backing_id = passthrough_backing_id(req, m);
    if (fi->backing_id > 0) {
        fi->keep_cache = false;
        fi->direct_io = false;
    }
#endif
    if (fuse_reply_open(req, fi) != 0) {
        /* The opener is gone (interrupted): no release will come. */
        nbdfs_export_release(m, fi);
    }
}

void nbdfs_export_release(NbdfsMount *m, struct fuse_file_info *fi)
{
    if (fi->fh) {
        nbdfs_file_release(m, file_of(fi));
        fi->fh = 0;
    }
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

/*
 * Read-modify-write: BUF covers [LO, HI), [OFF, END) rounded out to whole
 * blocks; read the blocks at the edges that [OFF, END) covers only in part.
 * The caller holds the range in the write-behind table.  0 or an errno.
 */
static int read_edges(NbdfsMount *m, char *buf, uint64_t lo, uint64_t hi, uint64_t off,
                      uint64_t end)
{
    NbdfsIo *io = nbdfs_io_new(m, NULL, NBDFS_REPLY_NONE, 0, false);
    uint64_t head_end = MIN(lo + m->min_block, hi);
    uint64_t tail_lo = end - end % m->min_block;

    nbdfs_io_set_buffer(io, buf);
    if (off > lo) {
        nbdfs_io_pread(io, 0, lo, head_end - lo);
    }
    if (end < hi && !(off > lo && tail_lo < head_end)) {
        nbdfs_io_pread(io, tail_lo - lo, tail_lo, hi - tail_lo);
    }
    return nbdfs_io_run(io);
}

/* A FUSE thread's read buffer, kept for its next read (a thread never serves two at once). */
typedef struct {
    char *mem;
    size_t size;
} ReadBuffer;

static void read_buffer_free(gpointer data)
{
    ReadBuffer *b = data;

    g_free(b->mem);
    g_free(b);
}

static GPrivate read_buffer = G_PRIVATE_INIT(read_buffer_free);

static char *thread_buffer(size_t size)
{
    ReadBuffer *b = g_private_get(&read_buffer);

    if (!b) {
        b = g_new0(ReadBuffer, 1);
        g_private_set(&read_buffer, b);
    }
    if (b->size < size) {
        g_free(b->mem);
        b->mem = g_malloc(size);
        b->size = size;
    }
    return b->mem;
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
    if (m->image_fd >= 0) {
        /*
         * A local raw image: the bundled server would only pread the same
         * file, and writes it straight (no cache of its own), so once no
         * write in flight overlaps, read it here, with no handoff to
         * another thread.
         */
        char *buf = thread_buffer(hi - off);
        int err;
        nbdfs_pending_wait_range(m, off, hi - off);
        /* Whole, or an error: a short reply would read as the end of the file. */
        err = nbds_pread_image_fd(m->image_fd, buf, hi - off, off);
        if (err) {
            fuse_reply_err(req, err);
        } else {
            fuse_reply_buf(req, buf, hi - off);
        }
        return;
    }
    align_out(m, &lo, &hi);
    /* A write answered before it completed may still be on its way. */
    nbdfs_pending_wait_range(m, lo, hi - lo);
    io = nbdfs_io_new(m, req, NBDFS_REPLY_DATA, hi - lo, false);
    nbdfs_io_reply_slice(io, off - lo, MIN(size, m->size - off));
    nbdfs_io_pread(io, 0, lo, hi - lo);
    nbdfs_io_submit(io);
}

/* O_DSYNC without FUA: the write, then a FLUSH, then the reply. */
static void write_then_flush(fuse_req_t req, NbdfsMount *m, NbdfsIo *io, NbdfsFile *f,
                             uint64_t length)
{
    int err = nbdfs_io_run(io);

    if (!err) {
        NbdfsIo *flush = nbdfs_io_new(m, NULL, NBDFS_REPLY_NONE, 0, false);
        nbdfs_io_flush(flush, f);
        err = nbdfs_io_run(flush);
    }
    if (err) {
        fuse_reply_err(req, nbdfs_errno(err));
    } else {
        fuse_reply_write(req, length);
    }
}

void nbdfs_export_write(fuse_req_t req, NbdfsMount *m, const char *buf, size_t size, off_t off,
                        struct fuse_file_info *fi)
{
    /* O_SYNC and O_DSYNC writes (and RWF_DSYNC ones) are answered once stable. */
    bool sync = (fi->flags & O_DSYNC) != 0;
    bool flush_after = sync && !m->can_fua && m->can_flush;
    /* A write-back from the page cache: any writer may have made it. */
    NbdfsFile *f = fi->writepage ? NULL : file_of(fi);
    uint64_t length, lo, hi;
    const char *data = buf;
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
    lo = off;
    hi = off + length;
    align_out(m, &lo, &hi);
    nbdfs_pending_begin(m, lo, hi - lo);

    io = nbdfs_io_new(m, sync && !flush_after ? req : NULL, NBDFS_REPLY_WRITE, 0, false);
    nbdfs_io_reply_slice(io, 0, length);
    nbdfs_io_set_writer(io, f, true, lo, hi - lo);
    if (lo != (uint64_t)off || hi != off + length) {
        /* Read-modify-write of the blocks at the edges. */
        char *whole = g_malloc(hi - lo);
        err = read_edges(m, whole, lo, hi, off, off + length);
        memcpy(whole + (off - lo), buf, length);
        nbdfs_io_adopt(io, whole);
        data = whole;
        if (err) {
            nbdfs_io_fail(io, err);
        }
    } else {
        /*
         * The data must outlive this call: take the request's buffer from
         * libfuse (it reads the next request into a new one), or copy it.
         */
        void *owned = nbdfs_loop_take_request_buffer(buf);
        if (owned) {
            nbdfs_io_adopt(io, owned);
        } else {
            data = g_memdup2(buf, length);
            nbdfs_io_adopt(io, (void *)data);
        }
    }
    if (!nbdfs_io_error(io)) {
        nbdfs_io_pwrite(io, data, lo, hi - lo, sync && m->can_fua ? LIBNBD_CMD_FLAG_FUA : 0);
    }
    if (flush_after) {
        write_then_flush(req, m, io, f, length);
        return;
    }
    err = nbdfs_io_error(io);
    nbdfs_io_submit(io);
    if (sync) {
        return;                               /* replied from the completion */
    }
    if (err) {
        fuse_reply_err(req, nbdfs_errno(err));
    } else {
        fuse_reply_write(req, length);
    }
}

void nbdfs_export_fsync(fuse_req_t req, NbdfsMount *m, struct fuse_file_info *fi)
{
    NbdfsFile *f = fi ? file_of(fi) : NULL;
    NbdfsIo *io;
    int err;

    /* Writes answered early must be done (and their errors known). */
    nbdfs_pending_drain(m);
    err = f ? nbdfs_file_take_error(m, f, true) : 0;
    /*
     * The kernel's passthrough writes never reach us, but fsync does: flush
     * whenever the kernel may have written (the server's fdatasync of the
     * image covers every descriptor of it).
     */
    if (err || m->read_only || !m->can_flush ||
        !(nbdfs_files_need_flush(m) || g_atomic_int_get(&m->fs->untracked_writes))) {
        fuse_reply_err(req, err);
        return;
    }
    io = nbdfs_io_new(m, req, NBDFS_REPLY_NONE, 0, false);
    nbdfs_io_flush(io, f);
    nbdfs_io_submit(io);
}

void nbdfs_export_flush(fuse_req_t req, NbdfsMount *m, struct fuse_file_info *fi)
{
    /* close(2): report what became of the writes answered early. */
    nbdfs_pending_drain(m);
    fuse_reply_err(req, fi->fh ? nbdfs_file_take_error(m, file_of(fi), false) : 0);
}

/* Zero [LO, HI) (whole blocks) through IO: WRITE_ZEROES, or writes of zeros. */
static void zero_blocks(NbdfsMount *m, NbdfsIo *io, uint64_t lo, uint64_t hi, bool keep)
{
    if (lo >= hi) {
        return;
    }
    if (m->can_zero) {
        /*
         * A punch is WRITE_ZEROES that may deallocate (reads return zeros,
         * which a bare TRIM does not promise); ZERO_RANGE keeps the space.
         */
        nbdfs_io_zero(io, lo, hi - lo, keep ? LIBNBD_CMD_FLAG_NO_HOLE : 0);
        return;
    }
    for (uint64_t pos = lo; pos < hi; pos += sizeof(zero_buffer)) {
        nbdfs_io_pwrite(io, zero_buffer, pos, MIN(sizeof(zero_buffer), hi - pos), 0);
    }
}

void nbdfs_export_fallocate(fuse_req_t req, NbdfsMount *m, int mode, off_t off, off_t length,
                            struct fuse_file_info *fi)
{
    bool keep_size = mode & FALLOC_FL_KEEP_SIZE;
    uint64_t end, lo, hi, inner_lo, inner_hi;
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
    if (!m->can_zero && end - off > MAX_ZERO_WRITE) {
        fuse_reply_err(req, EOPNOTSUPP);
        return;
    }
    lo = off;
    hi = end;
    align_out(m, &lo, &hi);
    /* The whole blocks inside [off, end): zeroed directly; the edges are rewritten. */
    inner_lo = lo == (uint64_t)off ? lo : MIN(lo + m->min_block, hi);
    inner_hi = hi == end ? hi : MAX(end - end % m->min_block, inner_lo);

    nbdfs_pending_begin(m, lo, hi - lo);
    io = nbdfs_io_new(m, req, NBDFS_REPLY_NONE, 0, false);
    nbdfs_io_set_writer(io, file_of(fi), true, lo, hi - lo);
    if (inner_lo != lo || inner_hi != hi) {
        char *edges = g_malloc(hi - lo);
        int err = read_edges(m, edges, lo, hi, off, end);
        nbdfs_io_adopt(io, edges);
        if (err) {
            nbdfs_io_fail(io, err);
        } else {
            memset(edges + (off - lo), 0, end - off);
            if (inner_lo > lo) {
                nbdfs_io_pwrite(io, edges, lo, inner_lo - lo, 0);
            }
            if (inner_hi < hi) {
                nbdfs_io_pwrite(io, edges + (inner_hi - lo), inner_hi, hi - inner_hi, 0);
            }
        }
    }
    if (!nbdfs_io_error(io)) {
        zero_blocks(m, io, inner_lo, inner_hi, mode == FALLOC_FL_ZERO_RANGE);
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
    if (g_atomic_int_get(&m->fs->untracked_writes) && m->image_fd >= 0) {
        /*
         * The image is written past us: ask it directly, as the server would
         * (its base:allocation is the image's SEEK_DATA/SEEK_HOLE), once any
         * write of ours answered early has landed (a file the kernel refused
         * for passthrough writes through us).
         */
        off_t r;
        nbdfs_pending_drain(m);
        r = lseek(m->image_fd, off, whence);
        if (r < 0) {
            fuse_reply_err(req, errno);
        } else {
            fuse_reply_lseek(req, r);
        }
        return;
    }
    err = nbdfs_seek(m, m->allocation, off, whence == SEEK_DATA, &result);
    if (err) {
        fuse_reply_err(req, err == ENXIO ? ENXIO : nbdfs_errno(err));
        return;
    }
    fuse_reply_lseek(req, result);
}
