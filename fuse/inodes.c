/*
 * The tree and the FUSE low-level operations table.  One export:
 *
 *   /                 1
 *   /<file>           2   the export (ops-export.c)
 *   /dirty/           3
 *   /dirty/NAME.map   4 + 3i   } one triple per dirty bitmap i (ops-dirty.c)
 *   /dirty/NAME.json  5 + 3i   }
 *   /dirty/NAME.img   6 + 3i   }
 *
 * With --all the top directory (1) holds a directory per export, the k-th
 * (from 0) laid out as above with its numbers plus (k + 1) << 32: its
 * directory is ((k + 1) << 32) + 1.  Looking at the top directory or at an
 * export's directory itself opens nothing; anything inside opens the export
 * (exports.c).
 *
 * Inode numbers are computed, never allocated, so lookup counts need no
 * bookkeeping and forget is a no-op.  This file dispatches each operation by
 * inode and answers the directory ones itself.
 */
#include "mount.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Names never change; the export's attributes rarely (st_blocks after writes). */
#define ENTRY_TIMEOUT 3600.0
#define EXPORT_ATTR_TIMEOUT 1.0

static const char *const dirty_suffix[NBDFS_DIRTY_KINDS] = { ".map", ".json", ".img" };

static NbdfsFs *fs_of(fuse_req_t req)
{
    return fuse_req_userdata(req);
}

/* Is INO the top directory of an --all mount? */
static bool is_top(NbdfsFs *fs, fuse_ino_t ino)
{
    return fs->all && ino == NBDFS_INO_ROOT;
}

/*
 * The export INO belongs to, and INO's number within it (*LOCAL, the
 * numbers of the table above); NULL for the top directory or no inode.
 */
static NbdfsMount *export_of(NbdfsFs *fs, fuse_ino_t ino, fuse_ino_t *local)
{
    uint64_t k = ino >> 32;

    if (!fs->all) {
        *local = ino;
        return g_ptr_array_index(fs->exports, 0);
    }
    *local = ino & G_MAXUINT32;
    return k >= 1 && k <= fs->exports->len ? g_ptr_array_index(fs->exports, k - 1) : NULL;
}

/* The bitmap and file kind of a dirty/ inode, or NULL. */
static NbdfsContext *dirty_node(NbdfsMount *m, fuse_ino_t ino, NbdfsDirtyKind *kind)
{
    guint i;

    if (ino < NBDFS_INO_FIRST_BITMAP) {
        return NULL;
    }
    i = (ino - NBDFS_INO_FIRST_BITMAP) / NBDFS_DIRTY_KINDS;
    if (i >= m->bitmaps->len) {
        return NULL;
    }
    *kind = (ino - NBDFS_INO_FIRST_BITMAP) % NBDFS_DIRTY_KINDS;
    return g_ptr_array_index(m->bitmaps, i);
}

/* "b0.map": a bitmap name may contain '/', which a file name cannot. */
static char *dirty_name(const NbdfsContext *bitmap, NbdfsDirtyKind kind)
{
    char *name = g_strconcat(bitmap->bitmap, dirty_suffix[kind], NULL);

    return g_strdelimit(name, "/", '_');
}

bool nbdfs_valid_file_name(const char *name)
{
    return name[0] && strlen(name) <= 255 && !strchr(name, '/') && strcmp(name, ".") != 0 &&
           strcmp(name, "..") != 0 && strcmp(name, "dirty") != 0;
}

mode_t nbdfs_node_mode(NbdfsMount *m, fuse_ino_t ino)
{
    switch (ino) {
    case NBDFS_INO_ROOT:
        return S_IFDIR | 0755;
    case NBDFS_INO_DIRTY:
        return S_IFDIR | 0555;
    case NBDFS_INO_EXPORT:
        return S_IFREG | (m->read_only ? 0444 : 0644);
    default:
        return S_IFREG | 0444;
    }
}

/*
 * May the caller of REQ access INO for MASK (R_OK | W_OK | X_OK)?  The mount
 * checks modes itself instead of asking the kernel to (default_permissions):
 * the kernel would then fetch attributes before every open, and a dirty
 * file's attributes cost a block-status walk.
 */
static bool may_access(fuse_req_t req, mode_t mode, int mask)
{
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    mode_t bits = mode & 07;

    if (ctx->uid == 0) {
        return !(mask & X_OK) || (mode & 0111);    /* as root may, on any file system */
    }
    if (ctx->uid == getuid()) {
        bits = (mode >> 6) & 07;
    } else if (ctx->gid == getgid()) {
        bits = (mode >> 3) & 07;
    } else {
        gid_t groups[64];
        int n = fuse_req_getgroups(req, G_N_ELEMENTS(groups), groups);
        for (int i = 0; i < MIN(n, (int)G_N_ELEMENTS(groups)); i++) {
            if (groups[i] == getgid()) {
                bits = (mode >> 3) & 07;
            }
        }
    }
    return ((mode_t)mask & bits) == (mode_t)mask;
}

static int open_mask(int flags)
{
    switch (flags & O_ACCMODE) {
    case O_WRONLY:
        return W_OK;
    case O_RDWR:
        return R_OK | W_OK;
    default:
        return R_OK;
    }
}

static void fill_attr(NbdfsFs *fs, fuse_ino_t ino, mode_t mode, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = mode;
    st->st_nlink = S_ISDIR(mode) ? 2 : 1;
    st->st_uid = getuid();
    st->st_gid = getgid();
    st->st_blksize = 4096;
    st->st_atim = st->st_mtim = st->st_ctim = fs->start_time;
}

void nbdfs_fill_attr(NbdfsMount *m, fuse_ino_t ino, mode_t mode, struct stat *st)
{
    fill_attr(m->fs, m->ino_base + ino, mode, st);
}

/* The top directory of --all: a subdirectory per export. */
static void top_attr(NbdfsFs *fs, struct stat *st)
{
    fill_attr(fs, NBDFS_INO_ROOT, S_IFDIR | 0755, st);
    st->st_nlink = 2 + fs->exports->len;
}

/*
 * Attributes of INO and how long the kernel may keep them; 0 or an errno.
 * For a LOOKUP the dirty files answer without asking the server: their
 * attributes expire at once, and opening one fetches the bitmap anyway.
 */
static int node_attr(NbdfsMount *m, fuse_ino_t ino, bool lookup, struct stat *st,
                     double *timeout)
{
    NbdfsDirtyKind kind;
    NbdfsContext *bitmap;

    *timeout = ENTRY_TIMEOUT;
    switch (ino) {
    case NBDFS_INO_ROOT:
        nbdfs_fill_attr(m, ino, nbdfs_node_mode(m, ino), st);
        st->st_nlink = 3;
        return 0;
    case NBDFS_INO_DIRTY:
        nbdfs_fill_attr(m, ino, nbdfs_node_mode(m, ino), st);
        return 0;
    case NBDFS_INO_EXPORT:
        *timeout = EXPORT_ATTR_TIMEOUT;
        return nbdfs_export_getattr(m, st);
    default:
        bitmap = dirty_node(m, ino, &kind);
        if (!bitmap) {
            return ENOENT;
        }
        *timeout = 0;              /* changes with every write */
        return nbdfs_dirty_getattr(m, ino, bitmap, kind, lookup, st);
    }
}

static fuse_ino_t lookup_name(NbdfsMount *m, fuse_ino_t parent, const char *name)
{
    if (parent == NBDFS_INO_ROOT) {
        if (strcmp(name, m->file_name) == 0) {
            return NBDFS_INO_EXPORT;
        }
        return strcmp(name, "dirty") == 0 ? NBDFS_INO_DIRTY : 0;
    }
    if (parent != NBDFS_INO_DIRTY) {
        return 0;
    }
    for (guint i = 0; i < m->bitmaps->len; i++) {
        for (int kind = 0; kind < NBDFS_DIRTY_KINDS; kind++) {
            g_autofree char *file = dirty_name(g_ptr_array_index(m->bitmaps, i), kind);
            if (strcmp(name, file) == 0) {
                return NBDFS_INO_FIRST_BITMAP + NBDFS_DIRTY_KINDS * i + kind;
            }
        }
    }
    return 0;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    NbdfsFs *fs = fs_of(req);
    struct fuse_entry_param e = { .generation = 1, .entry_timeout = ENTRY_TIMEOUT };
    fuse_ino_t local;
    NbdfsMount *m;
    int err;

    if (is_top(fs, parent)) {
        /* An export's directory: known without opening the export. */
        for (guint i = 0; i < fs->exports->len; i++) {
            m = g_ptr_array_index(fs->exports, i);
            if (strcmp(name, m->dir_name) == 0) {
                e.ino = m->ino_base + NBDFS_INO_ROOT;
                node_attr(m, NBDFS_INO_ROOT, true, &e.attr, &e.attr_timeout);
                fuse_reply_entry(req, &e);
                return;
            }
        }
        fuse_reply_err(req, ENOENT);
        return;
    }
    m = export_of(fs, parent, &local);
    if (!m) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    err = nbdfs_fs_export_ready(m);
    local = err ? 0 : lookup_name(m, local, name);
    if (!err && !local) {
        err = ENOENT;
    }
    if (!err) {
        e.ino = m->ino_base + local;
        err = node_attr(m, local, true, &e.attr, &e.attr_timeout);
    }
    if (err) {
        fuse_reply_err(req, err == ENOENT ? ENOENT : nbdfs_errno(err));
        return;
    }
    fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    NbdfsFs *fs = fs_of(req);
    struct stat st;
    double timeout = ENTRY_TIMEOUT;
    fuse_ino_t local;
    NbdfsMount *m = export_of(fs, ino, &local);
    int err = 0;

    (void)fi;
    if (is_top(fs, ino)) {
        top_attr(fs, &st);
    } else if (!m) {
        err = ENOENT;
    } else {
        /* An export's directory is known without opening the export. */
        if (local != NBDFS_INO_ROOT) {
            err = nbdfs_fs_export_ready(m);
        }
        if (!err) {
            err = node_attr(m, local, false, &st, &timeout);
        }
    }
    if (err) {
        fuse_reply_err(req, err == ENOENT ? ENOENT : nbdfs_errno(err));
        return;
    }
    fuse_reply_attr(req, &st, timeout);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    fuse_ino_t local;
    NbdfsMount *m = export_of(fs_of(req), ino, &local);
    int err;

    (void)fi;
    if (fuse_req_ctx(req)->uid != 0 && fuse_req_ctx(req)->uid != getuid()) {
        fuse_reply_err(req, EPERM);            /* only the owner changes attributes */
    } else if (!m || local != NBDFS_INO_EXPORT) {
        fuse_reply_err(req, EPERM);
    } else if ((err = nbdfs_fs_export_ready(m)) != 0) {
        fuse_reply_err(req, err);
    } else {
        nbdfs_export_setattr(req, m, attr, to_set);
    }
}

/* Append one entry to BUF if it fits in SIZE; false when full. */
static bool add_entry(fuse_req_t req, GByteArray *buf, size_t size, const char *name,
                      fuse_ino_t ino, mode_t mode, off_t next)
{
    struct stat st = { .st_ino = ino, .st_mode = mode };
    size_t len = fuse_add_direntry(req, NULL, 0, name, NULL, 0);
    guint at = buf->len;

    if (at + len > size) {
        return false;
    }
    g_byte_array_set_size(buf, at + len);
    fuse_add_direntry(req, (char *)buf->data + at, len, name, &st, next);
    return true;
}

/* Reply to a READDIR of SIZE bytes from OFF: ".", "..", then NAMES with INOS. */
static void reply_dir(fuse_req_t req, fuse_ino_t ino, fuse_ino_t parent, size_t size, off_t off,
                      GPtrArray *names, GArray *inos, GArray *modes)
{
    g_autoptr(GByteArray) buf = g_byte_array_new();

    /* Offsets: 0 ".", 1 "..", 2 + i the i-th child. */
    for (off_t i = off; i < (off_t)names->len + 2; i++) {
        bool fits;
        if (i == 0) {
            fits = add_entry(req, buf, size, ".", ino, S_IFDIR, i + 1);
        } else if (i == 1) {
            fits = add_entry(req, buf, size, "..", parent, S_IFDIR, i + 1);
        } else {
            fits = add_entry(req, buf, size, g_ptr_array_index(names, i - 2),
                             g_array_index(inos, fuse_ino_t, i - 2),
                             g_array_index(modes, mode_t, i - 2), i + 1);
        }
        if (!fits) {
            break;
        }
    }
    fuse_reply_buf(req, (const char *)buf->data, buf->len);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    NbdfsFs *fs = fs_of(req);
    g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GArray) inos = g_array_new(FALSE, FALSE, sizeof(fuse_ino_t));
    g_autoptr(GArray) modes = g_array_new(FALSE, FALSE, sizeof(mode_t));
    mode_t dir = S_IFDIR, reg = S_IFREG;
    fuse_ino_t local, child;
    NbdfsMount *m;
    int err;

    (void)fi;
    if (is_top(fs, ino)) {
        for (guint i = 0; i < fs->exports->len; i++) {
            m = g_ptr_array_index(fs->exports, i);
            child = m->ino_base + NBDFS_INO_ROOT;
            g_ptr_array_add(names, g_strdup(m->dir_name));
            g_array_append_val(inos, child);
            g_array_append_val(modes, dir);
        }
        reply_dir(req, ino, ino, size, off, names, inos, modes);
        return;
    }
    m = export_of(fs, ino, &local);
    if (!m || (local != NBDFS_INO_ROOT && local != NBDFS_INO_DIRTY)) {
        fuse_reply_err(req, m ? ENOTDIR : ENOENT);
        return;
    }
    err = nbdfs_fs_export_ready(m);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    if (local == NBDFS_INO_ROOT) {
        child = m->ino_base + NBDFS_INO_EXPORT;
        g_ptr_array_add(names, g_strdup(m->file_name));
        g_array_append_val(inos, child);
        g_array_append_val(modes, reg);
        child = m->ino_base + NBDFS_INO_DIRTY;
        g_ptr_array_add(names, g_strdup("dirty"));
        g_array_append_val(inos, child);
        g_array_append_val(modes, dir);
    } else {
        for (guint i = 0; i < m->bitmaps->len; i++) {
            for (int kind = 0; kind < NBDFS_DIRTY_KINDS; kind++) {
                child = m->ino_base + NBDFS_INO_FIRST_BITMAP + NBDFS_DIRTY_KINDS * i + kind;
                g_ptr_array_add(names, dirty_name(g_ptr_array_index(m->bitmaps, i), kind));
                g_array_append_val(inos, child);
                g_array_append_val(modes, reg);
            }
        }
    }
    /* The parent of an export's directory is the top one (itself without --all). */
    reply_dir(req, ino, local == NBDFS_INO_ROOT ? NBDFS_INO_ROOT : m->ino_base + NBDFS_INO_ROOT,
              size, off, names, inos, modes);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_ino_t local;
    NbdfsMount *m = export_of(fs_of(req), ino, &local);
    NbdfsDirtyKind kind;
    NbdfsContext *bitmap;
    int err;

    if (!m || local == NBDFS_INO_ROOT || local == NBDFS_INO_DIRTY) {
        fuse_reply_err(req, m || is_top(fs_of(req), ino) ? EISDIR : ENOENT);
    } else if ((err = nbdfs_fs_export_ready(m)) != 0) {
        fuse_reply_err(req, err);
    } else if (!may_access(req, nbdfs_node_mode(m, local), open_mask(fi->flags))) {
        fuse_reply_err(req, EACCES);
    } else if (local == NBDFS_INO_EXPORT) {
        nbdfs_export_open(req, m, fi);
    } else if ((bitmap = dirty_node(m, local, &kind))) {
        nbdfs_dirty_open(req, m, bitmap, kind, fi);
    } else {
        fuse_reply_err(req, ENOENT);
    }
}

/*
 * The export of an open file INO (only open exports have open files) and
 * its number there.
 */
static NbdfsMount *open_export_of(fuse_req_t req, fuse_ino_t ino, fuse_ino_t *local)
{
    NbdfsMount *m = export_of(fs_of(req), ino, local);

    if (!m) {
        *local = 0;
    }
    return m;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    fuse_ino_t local;
    NbdfsMount *m = open_export_of(req, ino, &local);
    NbdfsDirtyKind kind;
    NbdfsContext *bitmap;

    if (local == NBDFS_INO_EXPORT) {
        nbdfs_export_read(req, m, size, off);
    } else if (m && (bitmap = dirty_node(m, local, &kind))) {
        nbdfs_dirty_read(req, m, bitmap, kind, size, off, fi);
    } else {
        fuse_reply_err(req, EISDIR);
    }
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    fuse_ino_t local;
    NbdfsMount *m = open_export_of(req, ino, &local);

    if (local == NBDFS_INO_EXPORT) {
        nbdfs_export_write(req, m, buf, size, off, fi);
    } else {
        fuse_reply_err(req, EBADF);
    }
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_ino_t local;
    NbdfsMount *m = open_export_of(req, ino, &local);

    if (local == NBDFS_INO_EXPORT) {
        nbdfs_export_flush(req, m, fi);
    } else {
        fuse_reply_err(req, 0);
    }
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_ino_t local;
    NbdfsMount *m = open_export_of(req, ino, &local);

    if (local == NBDFS_INO_EXPORT) {
        nbdfs_export_release(m, fi);
    } else {
        nbdfs_dirty_release(fi);
    }
    fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    fuse_ino_t local;
    NbdfsMount *m = open_export_of(req, ino, &local);

    (void)datasync;
    if (local == NBDFS_INO_EXPORT) {
        nbdfs_export_fsync(req, m, fi);
    } else {
        fuse_reply_err(req, 0);
    }
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi)
{
    fuse_ino_t local;
    NbdfsMount *m = open_export_of(req, ino, &local);

    if (local == NBDFS_INO_EXPORT) {
        nbdfs_export_fallocate(req, m, mode, offset, length, fi);
    } else {
        fuse_reply_err(req, EBADF);
    }
}

static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                     struct fuse_file_info *fi)
{
    fuse_ino_t local;
    NbdfsMount *m = open_export_of(req, ino, &local);
    NbdfsDirtyKind kind;
    NbdfsContext *bitmap;

    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
        fuse_reply_err(req, EINVAL);
    } else if (local == NBDFS_INO_EXPORT) {
        nbdfs_export_lseek(req, m, off, whence);
    } else if (m && (bitmap = dirty_node(m, local, &kind))) {
        nbdfs_dirty_lseek(req, m, bitmap, kind, off, whence, fi);
    } else {
        fuse_reply_err(req, EINVAL);
    }
}

static void op_access(fuse_req_t req, fuse_ino_t ino, int mask)
{
    NbdfsFs *fs = fs_of(req);
    fuse_ino_t local;
    NbdfsMount *m = export_of(fs, ino, &local);
    NbdfsDirtyKind kind;
    int err = 0;

    if (is_top(fs, ino) || (m && local == NBDFS_INO_ROOT)) {
        /* Directories: known without opening the export. */
        err = may_access(req, S_IFDIR | 0755, mask) ? 0 : EACCES;
    } else if (!m) {
        err = ENOENT;
    } else if ((err = nbdfs_fs_export_ready(m)) != 0) {
        /* err */
    } else if (local > NBDFS_INO_DIRTY && !dirty_node(m, local, &kind)) {
        err = ENOENT;
    } else if ((mask & W_OK) && (local != NBDFS_INO_EXPORT || m->read_only)) {
        err = local == NBDFS_INO_EXPORT ? EROFS : EACCES;
    } else {
        err = may_access(req, nbdfs_node_mode(m, local), mask) ? 0 : EACCES;
    }
    fuse_reply_err(req, err);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    NbdfsFs *fs = fs_of(req);
    struct statvfs st = {
        .f_bsize = 4096,
        .f_frsize = 4096,
        .f_files = fs->all,        /* the top directory */
        .f_namemax = 255,
    };

    (void)ino;
    /* What is known without opening anything. */
    for (guint i = 0; i < fs->exports->len; i++) {
        NbdfsMount *m = g_ptr_array_index(fs->exports, i);
        if (nbdfs_fs_export_is_open(m)) {
            st.f_blocks += m->size / 4096;
            st.f_files += NBDFS_INO_FIRST_BITMAP - 1 + NBDFS_DIRTY_KINDS * m->bitmaps->len;
        } else {
            st.f_files += 1;
        }
    }
    fuse_reply_statfs(req, &st);
}

const struct fuse_lowlevel_ops nbdfs_ops = {
    .init = nbdfs_session_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .readdir = op_readdir,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .release = op_release,
    .fsync = op_fsync,
    .fallocate = op_fallocate,
    .lseek = op_lseek,
    .access = op_access,
    .statfs = op_statfs,
};
