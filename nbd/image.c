/* Raw image backend.  See image.h. */
#include "image.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <gio/gio.h>

#include "protocol.h"

struct NbdsImage {
    char *path;
    int fd;
    uint64_t size;
    bool is_block_device;
    /* Cleared on the first EOPNOTSUPP/EINVAL so later calls skip straight to the fallback. */
    gint can_seek_data;
    gint can_punch;
    gint can_zero_range;
    gint can_dsync;
    /*
     * The last data run SEEK_HOLE found.  On tmpfs SEEK_HOLE scans page by
     * page to the end of the run, so without this every READ of a fully
     * allocated image would cost a scan to the end of the file.  Writes only
     * add data; trims and zeroes may punch holes and drop the cache.
     */
    GMutex run_lock;
    uint64_t data_start, data_end;
};

static void forget_data_run(NbdsImage *img)
{
    g_mutex_lock(&img->run_lock);
    img->data_start = img->data_end = 0;
    g_mutex_unlock(&img->run_lock);
}

NbdsImage *nbds_image_open(const char *path, bool read_only, GError **error)
{
    g_autoptr(NbdsImage) img = g_new0(NbdsImage, 1);
    struct stat st;

    img->path = g_strdup(path);
    img->can_seek_data = img->can_punch = img->can_zero_range = img->can_dsync = 1;
    g_mutex_init(&img->run_lock);
    img->fd = open(path, (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOCTTY);
    if (img->fd < 0) {
        int err = errno;
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(err), "%s: %s%s", path,
                    g_strerror(err), !read_only && (err == EROFS || err == EACCES) ?
                    " (read-only access may work: -r)" : "");
        return NULL;
    }
    if (fstat(img->fd, &st) < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "%s: %s", path,
                    g_strerror(errno));
        return NULL;
    }
    /*
     * Keep the canonical path: the bitmap sidecar is found from it, and a
     * caller may change directory later (a daemonized mount chdirs to /).
     */
    {
        char *canon = realpath(path, NULL);
        if (canon) {
            g_free(img->path);
            img->path = g_strdup(canon);
            free(canon);
        }
    }
    if (S_ISREG(st.st_mode)) {
        img->size = st.st_size;
    } else if (S_ISBLK(st.st_mode)) {
        img->is_block_device = true;
        img->can_seek_data = 0;
        if (ioctl(img->fd, BLKGETSIZE64, &img->size) < 0) {
            g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno),
                        "%s: cannot get the device size: %s", path, g_strerror(errno));
            return NULL;
        }
    } else {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_REGULAR_FILE,
                    "%s: not a regular file or block device", path);
        return NULL;
    }
    if (flock(img->fd, (read_only ? LOCK_SH : LOCK_EX) | LOCK_NB) < 0) {
        if (errno == EWOULDBLOCK) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_BUSY,
                        "%s: image is in use by another nbdfs process", path);
        } else {
            g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno), "%s: lock: %s",
                        path, g_strerror(errno));
        }
        return NULL;
    }
    return g_steal_pointer(&img);
}

NbdsImage *nbds_image_new_scratch(const char *dir, uint64_t size, GError **error)
{
    g_autoptr(NbdsImage) img = g_new0(NbdsImage, 1);

    img->path = g_strdup_printf("%s/(scratch file)", dir);
    img->size = size;
    img->can_seek_data = img->can_punch = img->can_zero_range = img->can_dsync = 1;
    g_mutex_init(&img->run_lock);
    /* Nameless from birth: nothing to clean up after a crash. */
    img->fd = open(dir, O_TMPFILE | O_RDWR | O_EXCL | O_CLOEXEC, 0600);
    if (img->fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR)) {
        g_autofree char *tmpl = g_build_filename(dir, ".nbdfs-scratch-XXXXXX", NULL);
        img->fd = g_mkstemp_full(tmpl, O_RDWR | O_CLOEXEC, 0600);
        if (img->fd >= 0) {
            unlink(tmpl);
        }
    }
    if (img->fd < 0 || ftruncate(img->fd, size) < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(errno),
                    "%s: cannot create a scratch file: %s", dir, g_strerror(errno));
        return NULL;
    }
    return g_steal_pointer(&img);
}

uint64_t nbds_image_allocated_bytes(const NbdsImage *img)
{
    struct stat st;

    return fstat(img->fd, &st) == 0 ? (uint64_t)st.st_blocks * 512 : 0;
}

void nbds_image_shrink_to_nothing(NbdsImage *img)
{
    if (ftruncate(img->fd, 0) == 0) {
        forget_data_run(img);
    }
}

void nbds_image_close(NbdsImage *img)
{
    if (!img) {
        return;
    }
    if (img->fd >= 0) {
        close(img->fd);    /* also drops the lock */
    }
    g_mutex_clear(&img->run_lock);
    g_free(img->path);
    g_free(img);
}

const char *nbds_image_path(const NbdsImage *img) { return img->path; }
uint64_t nbds_image_size(const NbdsImage *img) { return img->size; }
bool nbds_image_is_block_device(const NbdsImage *img)
{
    return img->is_block_device;
}

int nbds_image_fd(const NbdsImage *img) { return img->fd; }

int nbds_pread_image_fd(int fd, void *buf, uint64_t len, uint64_t offset)
{
    char *p = buf;

    while (len > 0) {
        ssize_t r = pread(fd, p, len, offset);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return errno;
        }
        if (r == 0) {
            /* The file shrank behind our back: what is gone reads as zeros. */
            memset(p, 0, len);
            return 0;
        }
        p += r;
        offset += r;
        len -= r;
    }
    return 0;
}

int nbds_image_pread(NbdsImage *img, void *buf, uint64_t len, uint64_t offset)
{
    return nbds_pread_image_fd(img->fd, buf, len, offset);
}

/*
 * pwrite, with RWF_DSYNC for FUA where the kernel supports it.  When it
 * turns out not to, *DSYNC is cleared: the caller must then flush, this
 * write included.
 */
static ssize_t write_once(NbdsImage *img, const void *buf, size_t len, uint64_t offset,
                          bool *dsync)
{
    if (*dsync) {
        struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
        ssize_t r = pwritev2(img->fd, &iov, 1, offset, RWF_DSYNC);
        if (r >= 0 || (errno != EOPNOTSUPP && errno != EINVAL)) {
            return r;
        }
        g_atomic_int_set(&img->can_dsync, 0);
        *dsync = false;
    }
    return pwrite(img->fd, buf, len, offset);
}

int nbds_image_pwrite(NbdsImage *img, const void *buf, uint64_t len, uint64_t offset, bool fua)
{
    const char *p = buf;
    bool dsync = fua && g_atomic_int_get(&img->can_dsync);

    while (len > 0) {
        ssize_t r = write_once(img, p, len, offset, &dsync);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return errno;
        }
        p += r;
        offset += r;
        len -= r;
    }
    /* FUA without RWF_DSYNC (or found missing on this very write): flush it all. */
    if (fua && !dsync) {
        return nbds_image_flush(img);
    }
    return 0;
}

int nbds_image_flush(NbdsImage *img)
{
    return fdatasync(img->fd) < 0 ? errno : 0;
}

/* fallocate that remembers when the file system cannot do MODE. */
static int try_fallocate(NbdsImage *img, gint *supported, int mode, uint64_t offset,
                         uint64_t len)
{
    if (!g_atomic_int_get(supported)) {
        return EOPNOTSUPP;
    }
    if (fallocate(img->fd, mode, offset, len) == 0) {
        return 0;
    }
    if (errno == EOPNOTSUPP || errno == ENOSYS) {
        g_atomic_int_set(supported, 0);
        return EOPNOTSUPP;
    }
    return errno;
}

int nbds_image_trim(NbdsImage *img, uint64_t offset, uint64_t len, bool fua)
{
    int err = 0;

    forget_data_run(img);
    if (len == 0) {
        /* Nothing to discard (fallocate would fail with EINVAL); as qemu-nbd. */
        return fua ? nbds_image_flush(img) : 0;
    }
    if (img->is_block_device) {
        uint64_t range[2] = { offset, len };
        err = ioctl(img->fd, BLKDISCARD, range) < 0 ? errno : 0;
    } else {
        err = try_fallocate(img, &img->can_punch,
                            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
    }
    if (err == EOPNOTSUPP || err == ENOTTY) {
        err = 0;        /* TRIM is advisory */
    }
    if (!err && fua) {
        err = nbds_image_flush(img);
    }
    return err;
}

/* Write zeros the slow way, one buffer at a time. */
static int write_zeros(NbdsImage *img, uint64_t offset, uint64_t len)
{
    enum { ZERO_BUF = 1 << 20 };
    static const char zeros[ZERO_BUF];

    while (len > 0) {
        uint64_t n = MIN(len, ZERO_BUF);
        int err = nbds_image_pwrite(img, zeros, n, offset, false);
        if (err) {
            return err;
        }
        offset += n;
        len -= n;
    }
    return 0;
}

static int zero_range(NbdsImage *img, uint64_t offset, uint64_t len, bool may_trim, bool fast)
{
    int err;

    if (img->is_block_device) {
        uint64_t range[2] = { offset, len };
        if (ioctl(img->fd, BLKZEROOUT, range) == 0) {
            return 0;
        }
        return fast ? ENOTSUP : write_zeros(img, offset, len);
    }
    if (may_trim) {
        err = try_fallocate(img, &img->can_punch,
                            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
        if (err != EOPNOTSUPP) {
            return err;
        }
    }
    err = try_fallocate(img, &img->can_zero_range,
                        FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, len);
    if (err != EOPNOTSUPP) {
        return err;
    }
    /* No ZERO_RANGE (tmpfs): punching and then allocating gives allocated zeros. */
    err = try_fallocate(img, &img->can_punch,
                        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, len);
    if (!err) {
        err = fallocate(img->fd, FALLOC_FL_KEEP_SIZE, offset, len) < 0 ? errno : 0;
        return err == EOPNOTSUPP && may_trim ? 0 : err;
    }
    if (err != EOPNOTSUPP) {
        return err;
    }
    return fast ? ENOTSUP : write_zeros(img, offset, len);
}

int nbds_image_zero(NbdsImage *img, uint64_t offset, uint64_t len, bool may_trim,
                    bool fast, bool fua)
{
    /* A zero-length request succeeds, as with qemu-nbd (fallocate would say EINVAL). */
    int err = len ? zero_range(img, offset, len, may_trim, fast) : 0;

    if (may_trim) {
        forget_data_run(img);         /* it may have punched a hole */
    }
    if (!err && fua) {
        err = nbds_image_flush(img);
    }
    return err;
}

int nbds_image_cache(NbdsImage *img, uint64_t offset, uint64_t len)
{
    if (len == 0) {
        return 0;      /* for posix_fadvise, 0 would mean "to the end of the file" */
    }
    return posix_fadvise(img->fd, offset, len, POSIX_FADV_WILLNEED);
}

int nbds_image_next_run(NbdsImage *img, uint64_t offset, uint64_t end, bool *is_hole,
                        uint64_t *run_end)
{
    off_t data, hole;

    g_assert(offset < end);
    if (!g_atomic_int_get(&img->can_seek_data)) {
        goto all_data;
    }
    g_mutex_lock(&img->run_lock);
    if (offset >= img->data_start && offset < img->data_end) {
        *is_hole = false;
        *run_end = MIN(img->data_end, end);
        g_mutex_unlock(&img->run_lock);
        return 0;
    }
    g_mutex_unlock(&img->run_lock);

    data = lseek(img->fd, offset, SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) {
            /* No data at or after OFFSET: a hole up to the end of the file. */
            *is_hole = true;
            *run_end = end;
            return 0;
        }
        if (errno == EINVAL || errno == EOPNOTSUPP) {
            g_atomic_int_set(&img->can_seek_data, 0);
            goto all_data;
        }
        return errno;
    }
    if ((uint64_t)data > offset) {
        *is_hole = true;
        *run_end = MIN((uint64_t)data, end);
        return 0;
    }
    hole = lseek(img->fd, offset, SEEK_HOLE);
    if (hole < 0) {
        if (errno == ENXIO) {     /* the file shrank meanwhile */
            *is_hole = true;
            *run_end = end;
            return 0;
        }
        return errno;
    }
    *is_hole = false;
    /* A concurrent punch can make SEEK_HOLE answer OFFSET itself: never stall. */
    if ((uint64_t)hole <= offset) {
        *run_end = MIN(offset + 512, end);
        return 0;
    }
    *run_end = MIN((uint64_t)hole, end);
    g_mutex_lock(&img->run_lock);
    if ((uint64_t)hole == img->data_end && offset < img->data_start) {
        /* The same run seen from further back: grow it, so parallel readers converge. */
        img->data_start = offset;
    } else if ((uint64_t)hole != img->data_end) {
        img->data_start = offset;
        img->data_end = hole;
    }
    g_mutex_unlock(&img->run_lock);
    return 0;

all_data:
    *is_hole = false;
    *run_end = end;
    return 0;
}
