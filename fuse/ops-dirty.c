/*
 * The files of dirty/, one triple per qemu:dirty-bitmap:NAME context:
 *
 *   NAME.map    "<offset> <length>\n" per dirty run, ascending, merged
 *   NAME.json   every run, dirty and clean, exactly as
 *               `nbdinfo --map=qemu:dirty-bitmap:NAME --json` prints it
 *   NAME.img    the export's size; dirty runs read as the export's bytes and
 *               are data to SEEK_DATA, clean runs are holes reading as zeros
 *
 * All three come from the bitmap's extent cache, which writes through the
 * mount clear; opening a file (and reading a text file from offset 0) also
 * refetches from the server, so changes made elsewhere show up too.  The
 * text files are rendered once per open into a snapshot served with
 * direct_io (their size is only known by rendering them).  Rendering waits
 * for the server, so it never runs under the open file's lock, which only
 * guards swapping the snapshot in and copying out of it.
 */
#include "mount.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>

typedef struct {
    GMutex lock;
    GString *text;
    bool fresh;                    /* rendered by open, not read from offset 0 yet */
} DirtyText;

typedef struct {
    NbdfsDirtyKind kind;
    GString *out;
    bool first;                    /* json: no separator before the first run */
    uint64_t dirty_start, dirty_length;   /* map: the dirty run being merged */
} RenderData;

static void flush_dirty_run(RenderData *d)
{
    if (d->dirty_length) {
        g_string_append_printf(d->out, "%" PRIu64 " %" PRIu64 "\n", d->dirty_start,
                               d->dirty_length);
        d->dirty_length = 0;
    }
}

static bool render_run(uint64_t offset, uint64_t length, uint64_t status, gpointer data)
{
    RenderData *d = data;

    if (d->kind == NBDFS_DIRTY_JSON) {
        /* The byte layout of nbdinfo's --map --json output. */
        g_string_append_printf(d->out, "%s{ \"offset\": %" PRIu64 ", \"length\": %" PRIu64
                               ", \"type\": %" PRIu64, d->first ? "" : ",\n", offset,
                               length, status);
        if (status <= 1) {
            g_string_append_printf(d->out, ", \"description\": \"%s\"",
                                   status ? "dirty" : "clean");
        }
        g_string_append(d->out, "}");
        d->first = false;
    } else if (status & LIBNBD_STATE_DIRTY) {
        if (d->dirty_length && d->dirty_start + d->dirty_length == offset) {
            d->dirty_length += length;
        } else {
            flush_dirty_run(d);
            d->dirty_start = offset;
            d->dirty_length = length;
        }
    }
    return true;
}

/* Render BITMAP's NAME.map or NAME.json into OUT; 0 or an errno. */
static int render(NbdfsMount *m, NbdfsContext *bitmap, NbdfsDirtyKind kind, GString *out)
{
    RenderData d = { .kind = kind, .out = out, .first = true };
    int err;

    g_string_truncate(out, 0);
    if (kind == NBDFS_DIRTY_JSON) {
        g_string_append(out, "[\n");
    }
    err = nbdfs_for_each_run(m, bitmap, 0, m->size, render_run, &d);
    if (err) {
        return err;
    }
    if (kind == NBDFS_DIRTY_JSON) {
        g_string_append(out, "\n]\n");
    } else {
        flush_dirty_run(&d);
    }
    g_mutex_lock(&bitmap->total_lock);
    bitmap->text_size[kind] = out->len;
    g_mutex_unlock(&bitmap->total_lock);
    return 0;
}

int nbdfs_dirty_getattr(NbdfsMount *m, fuse_ino_t ino, NbdfsContext *bitmap,
                        NbdfsDirtyKind kind, bool quick, struct stat *st)
{
    int err = 0;

    nbdfs_fill_attr(m, ino, nbdfs_node_mode(m, ino), st);
    if (kind == NBDFS_DIRTY_IMG) {
        uint64_t dirty = 0;
        if (!quick) {
            err = nbdfs_counted_bytes(m, bitmap, &dirty);
        } else {
            nbdfs_counted_bytes_cached(bitmap, &dirty);
        }
        st->st_size = m->size;
        st->st_blocks = (dirty + 511) / 512;
    } else {
        if (!quick) {
            g_autoptr(GString) text = g_string_new(NULL);
            err = render(m, bitmap, kind, text);
        }
        g_mutex_lock(&bitmap->total_lock);
        st->st_size = bitmap->text_size[kind];
        g_mutex_unlock(&bitmap->total_lock);
        st->st_blocks = (st->st_size + 511) / 512;
    }
    return err;
}

void nbdfs_dirty_open(fuse_req_t req, NbdfsMount *m, NbdfsContext *bitmap, NbdfsDirtyKind kind,
                      struct fuse_file_info *fi)
{
    DirtyText *t;
    int err;

    if ((fi->flags & O_ACCMODE) != O_RDONLY) {
        fuse_reply_err(req, EACCES);
        return;
    }
    /* What the server says now, not what we saw before. */
    nbdfs_extent_cache_clear(bitmap->cache);
    if (kind == NBDFS_DIRTY_IMG) {
        fi->keep_cache = 0;
        fuse_reply_open(req, fi);
        return;
    }
    t = g_new0(DirtyText, 1);
    g_mutex_init(&t->lock);
    t->text = g_string_new(NULL);
    err = render(m, bitmap, kind, t->text);
    if (err) {
        fi->fh = (uintptr_t)t;
        nbdfs_dirty_release(fi);
        fuse_reply_err(req, nbdfs_errno(err));
        return;
    }
    t->fresh = true;
    fi->fh = (uintptr_t)t;
    fi->direct_io = 1;
    fi->noflush = 1;
    fuse_reply_open(req, fi);
}

typedef struct {
    NbdfsIo *io;
    uint64_t start;                /* file offset of the buffer's first byte */
} ImgReadData;

static bool read_dirty_run(uint64_t offset, uint64_t length, uint64_t status, gpointer data)
{
    ImgReadData *d = data;

    if (status & LIBNBD_STATE_DIRTY) {
        nbdfs_io_pread(d->io, offset - d->start, offset, length);
    }
    return true;                   /* clean runs stay zero in the buffer */
}

static void read_img(fuse_req_t req, NbdfsMount *m, NbdfsContext *bitmap, size_t size,
                     off_t off)
{
    ImgReadData d = { .start = off };
    uint64_t length;
    int err;

    if (off < 0 || (uint64_t)off >= m->size || size == 0) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    length = MIN(size, m->size - off);
    d.io = nbdfs_io_new(m, req, NBDFS_REPLY_DATA, length, true);
    err = nbdfs_for_each_run(m, bitmap, off, off + length, read_dirty_run, &d);
    if (err) {
        nbdfs_io_fail(d.io, err);
    }
    nbdfs_io_submit(d.io);
}

void nbdfs_dirty_read(fuse_req_t req, NbdfsMount *m, NbdfsContext *bitmap, NbdfsDirtyKind kind,
                      size_t size, off_t off, struct fuse_file_info *fi)
{
    DirtyText *t = (DirtyText *)(uintptr_t)fi->fh;
    g_autofree char *data = NULL;
    size_t length = 0;
    bool rerender;
    int err = 0;

    if (kind == NBDFS_DIRTY_IMG) {
        read_img(req, m, bitmap, size, off);
        return;
    }
    g_mutex_lock(&t->lock);
    rerender = off == 0 && !t->fresh;
    t->fresh = false;
    g_mutex_unlock(&t->lock);
    if (rerender) {
        /*
         * Reading from the start again: show the bitmap as it is now.  Rendered
         * without the lock (it waits for the server); then swapped in.
         */
        g_autoptr(GString) text = g_string_new(NULL);
        nbdfs_extent_cache_clear(bitmap->cache);
        err = render(m, bitmap, kind, text);
        if (!err) {
            GString *old;
            g_mutex_lock(&t->lock);
            old = t->text;
            t->text = g_steal_pointer(&text);
            g_mutex_unlock(&t->lock);
            g_string_free(old, TRUE);
        }
    }
    g_mutex_lock(&t->lock);
    if (!err && off >= 0 && (uint64_t)off < t->text->len) {
        length = MIN(size, t->text->len - off);
        data = g_memdup2(t->text->str + off, length);
    }
    g_mutex_unlock(&t->lock);
    /* Once replied, the file may be released (and T freed) at any moment. */
    if (err) {
        fuse_reply_err(req, nbdfs_errno(err));
    } else {
        fuse_reply_buf(req, data, length);
    }
}

void nbdfs_dirty_lseek(fuse_req_t req, NbdfsMount *m, NbdfsContext *bitmap, NbdfsDirtyKind kind,
                       off_t off, int whence, struct fuse_file_info *fi)
{
    uint64_t result;
    int err;

    if (off < 0) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    if (kind == NBDFS_DIRTY_IMG) {
        err = nbdfs_seek(m, bitmap, off, whence == SEEK_DATA, &result);
    } else {
        /* A text file is all data. */
        DirtyText *t = (DirtyText *)(uintptr_t)fi->fh;
        g_mutex_lock(&t->lock);
        err = (uint64_t)off < t->text->len ? 0 : ENXIO;
        result = whence == SEEK_DATA ? (uint64_t)off : t->text->len;
        g_mutex_unlock(&t->lock);
    }
    if (err) {
        fuse_reply_err(req, err == ENXIO ? ENXIO : nbdfs_errno(err));
        return;
    }
    fuse_reply_lseek(req, result);
}

void nbdfs_dirty_release(struct fuse_file_info *fi)
{
    DirtyText *t = (DirtyText *)(uintptr_t)fi->fh;

    if (t) {
        g_string_free(t->text, TRUE);
        g_mutex_clear(&t->lock);
        g_free(t);
        fi->fh = 0;
    }
}
