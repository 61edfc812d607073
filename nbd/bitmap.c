/*
 * Persistent dirty bitmaps: in-memory bits and the sidecar file.  See bitmap.h.
 *
 * Sidecar layout, version 2 (little-endian):
 *   header, 160 bytes
 *     [  0..  7] magic "NBDFSBMP"      [  8.. 11] version (2)
 *     [ 12.. 15] flags: bit 0 in use   [ 16.. 23] image size at last clean close
 *     [ 24.. 31] image mtime, seconds  [ 32.. 35] image mtime, nanoseconds
 *     [ 36.. 39] number of bitmaps     [ 40.. 47] body length (bytes after the header)
 *     [ 48.. 79] SHA-256 of the directory, always valid
 *     [ 80..111] SHA-256 of the data (the body after the directory); while in
 *                use, pages are rewritten in place and this sum is stale by
 *                design: the bits are not trusted then (all dirty)
 *     [112..119] directory length      [120..127] zero
 *     [128..159] SHA-256 of bytes 0..127
 *   directory: per bitmap 32 bytes, then its name
 *     [0..1] name length  [2] flags: bit 0 enabled, bit 1 inconsistent  [3] zero
 *     [4..7] granularity  [8..15] bits  [16..23] data offset  [24..31] data length
 *   data: per bitmap, 64-bit words, each area 4 KiB-aligned so pages can be
 *   rewritten in place while the image is served.
 * Version 1 (128-byte header, one sum over the whole body at [48..79], the
 * header's sum at [96..127]) is read when it was closed cleanly; one left in
 * use cannot be verified and is refused.
 *
 * Files: the image's path is resolved once when it is opened (nbds_image_open)
 * and its directory opened then; the sidecar is only ever opened relative to
 * that directory without following symlinks, and rewritten through a new
 * file with a random name created exclusively, renamed over it, and the
 * directory synced.  Someone who can write the image's directory cannot make
 * the server write anywhere else.
 */
#include "bitmap.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gio/gio.h>

#include "protocol.h"

#define MAGIC "NBDFSBMP"
#define VERSION 2
#define FLAG_IN_USE 1u
#define HEADER_SIZE 160
#define V1_HEADER_SIZE 128
#define ENTRY_SIZE 32
#define ENTRY_ENABLED 1u
#define ENTRY_INCONSISTENT 2u
#define PAGE 4096u
#define WORDS_PER_PAGE (PAGE / 8)

struct NbdsBitmap {
    char *name;
    uint32_t granularity;
    bool enabled;
    bool inconsistent;
    uint64_t nbits;
    uint64_t nwords;
    uint64_t *words;               /* bit i = granule i; atomic access while served */
    uint8_t *page_dirty;           /* per 4 KiB page of words: changed since last sync */
    uint64_t data_offset;          /* in the sidecar currently open */
};

struct NbdsBitmapSet {
    char *path;                    /* the sidecar, for messages */
    char *name;                    /* its name in dirfd */
    int dirfd;                     /* the image's directory, opened once; -1: none */
    NbdsImage *image;
    uint64_t size;                 /* the image's size */
    GPtrArray *bitmaps;            /* NbdsBitmap * */
    GPtrArray *removed;            /* NbdsBitmap *: removed while served, still read */
    const char *inconsistent_reason;
    int fd;                        /* the sidecar while served for writing, else -1 */
    GMutex sync_lock;
};

static void bitmap_free(NbdsBitmap *bm)
{
    if (bm) {
        g_free(bm->name);
        g_free(bm->words);
        g_free(bm->page_dirty);
        g_free(bm);
    }
}

static NbdsBitmap *bitmap_new(const char *name, uint32_t granularity, uint64_t size)
{
    NbdsBitmap *bm = g_new0(NbdsBitmap, 1);

    bm->name = g_strdup(name);
    bm->granularity = granularity;
    bm->enabled = true;
    bm->nbits = (size + granularity - 1) / granularity;
    bm->nwords = (bm->nbits + 63) / 64;
    bm->words = g_new0(uint64_t, MAX(bm->nwords, 1));
    bm->page_dirty = g_new0(uint8_t, MAX((bm->nwords + WORDS_PER_PAGE - 1) / WORDS_PER_PAGE, 1));
    return bm;
}

char *nbds_bitmap_sidecar_path(const char *image_path)
{
    return g_strconcat(image_path, ".bitmaps", NULL);
}

void nbds_bitmaps_free(NbdsBitmapSet *set)
{
    if (!set) {
        return;
    }
    if (set->fd >= 0) {
        close(set->fd);
    }
    if (set->dirfd >= 0) {
        close(set->dirfd);
    }
    g_ptr_array_unref(set->bitmaps);
    g_ptr_array_unref(set->removed);
    g_mutex_clear(&set->sync_lock);
    g_free(set->path);
    g_free(set->name);
    g_free(set);
}

const char *nbds_bitmaps_inconsistent_reason(const NbdsBitmapSet *set)
{
    return set->inconsistent_reason;
}

guint nbds_bitmaps_count(const NbdsBitmapSet *set) { return set->bitmaps->len; }
NbdsBitmap *nbds_bitmaps_get(NbdsBitmapSet *set, guint i)
{
    return g_ptr_array_index(set->bitmaps, i);
}

NbdsBitmap *nbds_bitmaps_find(NbdsBitmapSet *set, const char *name)
{
    for (guint i = 0; i < set->bitmaps->len; i++) {
        NbdsBitmap *bm = g_ptr_array_index(set->bitmaps, i);
        if (strcmp(bm->name, name) == 0) {
            return bm;
        }
    }
    return NULL;
}

/* ---- bits ---- */

static inline bool bit_get(const NbdsBitmap *bm, uint64_t bit)
{
    return __atomic_load_n(&bm->words[bit / 64], __ATOMIC_RELAXED) >> (bit % 64) & 1;
}

static void set_bits(NbdsBitmap *bm, uint64_t first, uint64_t last)
{
    for (uint64_t w = first / 64; w <= last / 64; w++) {
        uint64_t lo = w == first / 64 ? first % 64 : 0;
        uint64_t hi = w == last / 64 ? last % 64 : 63;
        uint64_t mask = (hi == 63 ? ~UINT64_C(0) : (UINT64_C(1) << (hi + 1)) - 1) &
                        ~((UINT64_C(1) << lo) - 1);
        /* Skip the atomic write (and the page flag) when already set: cheap re-writes. */
        if ((__atomic_load_n(&bm->words[w], __ATOMIC_RELAXED) & mask) != mask) {
            __atomic_fetch_or(&bm->words[w], mask, __ATOMIC_RELAXED);
            __atomic_store_n(&bm->page_dirty[w / WORDS_PER_PAGE], 1, __ATOMIC_RELEASE);
        }
    }
}

/* First bit >= START whose value is VALUE, or nbits. */
static uint64_t find_bit(const NbdsBitmap *bm, uint64_t start, bool value)
{
    while (start < bm->nbits) {
        uint64_t w = __atomic_load_n(&bm->words[start / 64], __ATOMIC_RELAXED);
        if (!value) {
            w = ~w;
        }
        w &= ~UINT64_C(0) << (start % 64);
        if (w) {
            return MIN(start / 64 * 64 + __builtin_ctzll(w), bm->nbits);
        }
        start = (start / 64 + 1) * 64;
    }
    return bm->nbits;
}

void nbds_bitmaps_mark(NbdsBitmapSet *set, uint64_t offset, uint64_t len)
{
    if (!set || len == 0) {
        return;
    }
    for (guint i = 0; i < set->bitmaps->len; i++) {
        NbdsBitmap *bm = g_ptr_array_index(set->bitmaps, i);
        if (bm->enabled && !bm->inconsistent) {
            nbds_bitmap_set(bm, offset, len);
        }
    }
}

bool nbds_bitmaps_any_enabled(const NbdsBitmapSet *set)
{
    for (guint i = 0; set && i < set->bitmaps->len; i++) {
        if (((NbdsBitmap *)g_ptr_array_index(set->bitmaps, i))->enabled) {
            return true;
        }
    }
    return false;
}

int nbds_bitmap_extents(NbdsBitmapSet *set, const NbdsBitmap *bm, NbdsExtents *e)
{
    if (bm->inconsistent) {
        nbds_extents_add(e, e->end - e->next, NBDS_STATE_DIRTY);
        return 0;
    }
    while (!nbds_extents_done(e)) {
        uint64_t run_end = nbds_bitmap_run_end(bm, e->next, set->size);

        nbds_extents_add(e, run_end - e->next,
                         nbds_bitmap_test(bm, e->next) ? NBDS_STATE_DIRTY : 0);
    }
    return 0;
}

void nbds_bitmap_info(const NbdsBitmapSet *set, const NbdsBitmap *bm, NbdsBitmapInfo *info)
{
    uint64_t dirty = 0;

    info->name = bm->name;
    info->granularity = bm->granularity;
    info->enabled = bm->enabled;
    info->consistent = !bm->inconsistent;
    if (bm->inconsistent) {
        info->dirty_bytes = set->size;
        return;
    }
    for (uint64_t w = 0; w < bm->nwords; w++) {
        dirty += __builtin_popcountll(bm->words[w]);
    }
    dirty *= bm->granularity;
    /* The last granule may run past the end of the image. */
    if (bm->nbits && bit_get(bm, bm->nbits - 1)) {
        dirty -= bm->nbits * bm->granularity - set->size;
    }
    info->dirty_bytes = dirty;
}

/* ---- edits ---- */

bool nbds_bitmap_name_valid(const char *name, GError **error)
{
    size_t len = strlen(name);

    if (len == 0 || len > NBDS_BITMAP_MAX_NAME) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "bitmap name must be 1 to %d bytes long", NBDS_BITMAP_MAX_NAME);
        return false;
    }
    if (!g_utf8_validate(name, len, NULL)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "bitmap name is not valid UTF-8");
        return false;
    }
    /* Names become file names under the mount's dirty/ directory. */
    for (const char *p = name; *p; p++) {
        if (*p == '/' || (unsigned char)*p < 0x20 || *p == 0x7f) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                        "bitmap name '%s' contains '/' or a control character", name);
            return false;
        }
    }
    if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "bitmap name cannot be '%s'", name);
        return false;
    }
    return true;
}

bool nbds_bitmaps_add(NbdsBitmapSet *set, const char *name, uint32_t granularity,
                      GError **error)
{
    if (!nbds_bitmap_name_valid(name, error)) {
        return false;
    }
    if (granularity < NBDS_BITMAP_MIN_GRANULARITY || granularity > NBDS_BITMAP_MAX_GRANULARITY ||
        (granularity & (granularity - 1))) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                    "granularity %u is not a power of two from 512 to 64 MiB", granularity);
        return false;
    }
    if (nbds_bitmaps_find(set, name)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_EXISTS, "bitmap '%s' already exists", name);
        return false;
    }
    if (set->image && nbds_image_is_block_device(set->image)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_SUPPORTED,
                    "%s is a block device: bitmaps need a regular file (a block device's "
                    "changes made while it is not served cannot be detected)",
                    nbds_image_path(set->image));
        return false;
    }
    if (set->bitmaps->len >= NBDS_BITMAP_MAX_COUNT) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NO_SPACE,
                    "an image can have at most %d bitmaps", NBDS_BITMAP_MAX_COUNT);
        return false;
    }
    g_ptr_array_add(set->bitmaps, bitmap_new(name, granularity, set->size));
    return true;
}

void nbds_bitmaps_remove(NbdsBitmapSet *set, NbdsBitmap *bm)
{
    guint i;

    /* Kept until the set is freed: clients of a server may still be reading it. */
    if (g_ptr_array_find(set->bitmaps, bm, &i)) {
        g_ptr_array_add(set->removed, g_ptr_array_steal_index(set->bitmaps, i));
    }
}

static const char *const edit_names[] = {
    [NBDS_BITMAP_ADD] = "add", [NBDS_BITMAP_REMOVE] = "remove", [NBDS_BITMAP_CLEAR] = "clear",
    [NBDS_BITMAP_ENABLE] = "enable", [NBDS_BITMAP_DISABLE] = "disable",
};

const char *nbds_bitmap_edit_name(NbdsBitmapEdit edit)
{
    return edit_names[edit];
}

bool nbds_bitmap_edit_parse(const char *name, NbdsBitmapEdit *edit)
{
    for (size_t i = 0; i < G_N_ELEMENTS(edit_names); i++) {
        if (strcmp(name, edit_names[i]) == 0) {
            *edit = (NbdsBitmapEdit)i;
            return true;
        }
    }
    return false;
}

NbdsBitmap *nbds_bitmaps_edit(NbdsBitmapSet *set, NbdsBitmapEdit edit, const char *name,
                              uint32_t granularity, GError **error)
{
    NbdsBitmap *bm;

    if (edit == NBDS_BITMAP_ADD) {
        return nbds_bitmaps_add(set, name, granularity, error) ? nbds_bitmaps_find(set, name)
                                                               : NULL;
    }
    bm = nbds_bitmaps_find(set, name);
    if (!bm) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND, "no bitmap named '%s'", name);
        return NULL;
    }
    switch (edit) {
    case NBDS_BITMAP_REMOVE:
        nbds_bitmaps_remove(set, bm);
        break;
    case NBDS_BITMAP_CLEAR:
        nbds_bitmap_clear(set, bm);
        break;
    case NBDS_BITMAP_ENABLE:
    case NBDS_BITMAP_DISABLE:
        nbds_bitmap_set_enabled(bm, edit == NBDS_BITMAP_ENABLE);
        break;
    case NBDS_BITMAP_ADD:
        g_assert_not_reached();
    }
    return bm;
}

NbdsBitmap *nbds_bitmap_new(uint32_t granularity, uint64_t size)
{
    NbdsBitmap *bm = bitmap_new("", granularity, size);

    bm->enabled = false;
    return bm;
}

NbdsBitmap *nbds_bitmap_copy(const NbdsBitmap *bm, uint64_t size)
{
    NbdsBitmap *copy = bitmap_new(bm->name, bm->granularity, size);

    for (uint64_t w = 0; w < bm->nwords; w++) {
        copy->words[w] = __atomic_load_n(&bm->words[w], __ATOMIC_RELAXED);
    }
    copy->inconsistent = bm->inconsistent;
    copy->enabled = false;
    return copy;
}

bool nbds_bitmap_test(const NbdsBitmap *bm, uint64_t offset)
{
    return bit_get(bm, offset / bm->granularity);
}

uint64_t nbds_bitmap_run_end(const NbdsBitmap *bm, uint64_t offset, uint64_t limit)
{
    uint64_t bit = offset / bm->granularity;
    uint64_t end = find_bit(bm, bit + 1, !bit_get(bm, bit)) * (uint64_t)bm->granularity;

    return MIN(end, limit);
}

uint64_t nbds_bitmap_next_set(const NbdsBitmap *bm, uint64_t offset, uint64_t limit)
{
    uint64_t end = find_bit(bm, offset / bm->granularity, true) * (uint64_t)bm->granularity;

    return MIN(end, limit);
}

void nbds_bitmap_set(NbdsBitmap *bm, uint64_t offset, uint64_t len)
{
    if (len && bm->nbits) {
        set_bits(bm, offset / bm->granularity,
                 MIN((offset + len - 1) / bm->granularity, bm->nbits - 1));
    }
}

void nbds_bitmap_merge(NbdsBitmap *into, const NbdsBitmap *from)
{
    uint64_t size = from->nbits * (uint64_t)from->granularity;

    /* By byte ranges: INTO may have been re-created with another granularity. */
    for (uint64_t pos = 0; pos < size;) {
        uint64_t end = nbds_bitmap_run_end(from, pos, size);
        if (nbds_bitmap_test(from, pos)) {
            nbds_bitmap_set(into, pos, end - pos);
        }
        pos = end;
    }
    into->inconsistent |= from->inconsistent;
}

void nbds_bitmap_free(NbdsBitmap *bm)
{
    bitmap_free(bm);
}

void nbds_bitmap_clear(NbdsBitmapSet *set, NbdsBitmap *bm)
{
    (void)set;
    memset(bm->words, 0, MAX(bm->nwords, 1) * 8);
    bm->inconsistent = false;
}

void nbds_bitmap_set_enabled(NbdsBitmap *bm, bool enabled)
{
    bm->enabled = enabled;
}

/* ---- the sidecar file ---- */

static void put_le16(uint8_t *p, uint16_t v) { v = htole16(v); memcpy(p, &v, 2); }
static void put_le32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static void put_le64(uint8_t *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }
static uint16_t get_le16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return le16toh(v); }
static uint32_t get_le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }
static uint64_t get_le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }

static void sha256(const uint8_t *data, size_t len, uint8_t out[32])
{
    g_autoptr(GChecksum) sum = g_checksum_new(G_CHECKSUM_SHA256);
    gsize n = 32;

    g_checksum_update(sum, data, len);
    g_checksum_get_digest(sum, out, &n);
}

/* Words of BM from WORD (for COUNT words) as little-endian bytes into OUT. */
static void words_to_le(const NbdsBitmap *bm, uint64_t word, uint64_t count, uint8_t *out)
{
    for (uint64_t i = 0; i < count; i++) {
        put_le64(out + 8 * i, __atomic_load_n(&bm->words[word + i], __ATOMIC_RELAXED));
    }
}

static uint64_t data_len(const NbdsBitmap *bm)
{
    return bm->nwords * 8;
}

/*
 * Lay out and serialise the whole sidecar; IN_USE sets the flag.  Returns
 * the file's bytes and stores each bitmap's data offset.
 */
static GByteArray *serialise(NbdsBitmapSet *set, bool in_use)
{
    uint64_t dir_len = 0, total;
    struct stat st;
    uint8_t *buf, *ent;

    for (guint i = 0; i < set->bitmaps->len; i++) {
        NbdsBitmap *bm = g_ptr_array_index(set->bitmaps, i);
        dir_len += ENTRY_SIZE + strlen(bm->name);
    }
    total = HEADER_SIZE + dir_len;
    for (guint i = 0; i < set->bitmaps->len; i++) {
        NbdsBitmap *bm = g_ptr_array_index(set->bitmaps, i);
        bm->data_offset = (total + PAGE - 1) / PAGE * PAGE;
        total = bm->data_offset + data_len(bm);
    }
    buf = g_malloc0(total);

    ent = buf + HEADER_SIZE;
    for (guint i = 0; i < set->bitmaps->len; i++) {
        NbdsBitmap *bm = g_ptr_array_index(set->bitmaps, i);
        size_t nlen = strlen(bm->name);
        put_le16(ent, nlen);
        ent[2] = (bm->enabled ? ENTRY_ENABLED : 0) | (bm->inconsistent ? ENTRY_INCONSISTENT : 0);
        put_le32(ent + 4, bm->granularity);
        put_le64(ent + 8, bm->nbits);
        put_le64(ent + 16, bm->data_offset);
        put_le64(ent + 24, data_len(bm));
        memcpy(ent + ENTRY_SIZE, bm->name, nlen);
        ent += ENTRY_SIZE + nlen;
        words_to_le(bm, 0, bm->nwords, buf + bm->data_offset);
    }

    memcpy(buf, MAGIC, 8);
    put_le32(buf + 8, VERSION);
    put_le32(buf + 12, in_use ? FLAG_IN_USE : 0);
    put_le64(buf + 16, set->size);
    if (set->image && fstat(nbds_image_fd(set->image), &st) == 0) {
        put_le64(buf + 24, st.st_mtim.tv_sec);
        put_le32(buf + 32, st.st_mtim.tv_nsec);
    }
    put_le32(buf + 36, set->bitmaps->len);
    put_le64(buf + 40, total - HEADER_SIZE);
    sha256(buf + HEADER_SIZE, dir_len, buf + 48);
    sha256(buf + HEADER_SIZE + dir_len, total - HEADER_SIZE - dir_len, buf + 80);
    put_le64(buf + 112, dir_len);
    sha256(buf, 128, buf + 128);
    return g_byte_array_new_take(buf, total);
}

static bool write_all(int fd, const uint8_t *p, size_t len)
{
    while (len > 0) {
        ssize_t r = write(fd, p, len);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            return false;
        }
        p += r;
        len -= r;
    }
    return true;
}

static bool file_error(GError **error, const char *path, int err)
{
    g_set_error(error, G_IO_ERROR, g_io_error_from_errno(err), "%s: %s", path,
                g_strerror(err));
    return false;
}

/*
 * A new file for the sidecar's next version, beside it in the directory:
 * a fresh random name, created exclusively, never through a symlink.
 * Its name goes to *TMP.  -1 with errno on failure.
 */
static int create_temporary(NbdsBitmapSet *set, char **tmp)
{
    for (int attempt = 0; attempt < 100; attempt++) {
        g_autofree char *name = g_strdup_printf(".%s.%08x%08x", set->name, g_random_int(),
                                                g_random_int());
        int fd = openat(set->dirfd, name,
                        O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (fd >= 0) {
            *tmp = g_steal_pointer(&name);
            return fd;
        }
        if (errno != EEXIST) {
            return -1;
        }
    }
    errno = EEXIST;
    return -1;
}

/*
 * Replace the sidecar atomically (a new file, fsync, rename, fsync of the
 * directory).  With IN_USE the new file stays open for in-place page writes.
 */
static bool save(NbdsBitmapSet *set, bool in_use, GError **error)
{
    g_autoptr(GByteArray) bytes = NULL;
    g_autofree char *tmp = NULL;
    int fd;

    if (set->bitmaps->len == 0 && !in_use) {
        if (unlinkat(set->dirfd, set->name, 0) < 0 && errno != ENOENT) {
            return file_error(error, set->path, errno);
        }
        return fsync(set->dirfd) == 0 || file_error(error, set->path, errno);
    }
    bytes = serialise(set, in_use);
    fd = create_temporary(set, &tmp);
    if (fd < 0 || !write_all(fd, bytes->data, bytes->len) || fsync(fd) < 0 ||
        renameat(set->dirfd, tmp, set->dirfd, set->name) < 0) {
        int err = errno;
        if (fd >= 0) {
            close(fd);
            unlinkat(set->dirfd, tmp, 0);
        }
        return file_error(error, set->path, err);
    }
    /* The rename itself must be durable before we rely on the new file. */
    if (fsync(set->dirfd) < 0) {
        int err = errno;
        close(fd);
        return file_error(error, set->path, err);
    }
    if (set->fd >= 0) {
        close(set->fd);
        set->fd = -1;
    }
    if (in_use) {
        set->fd = fd;
        for (guint i = 0; i < set->bitmaps->len; i++) {
            NbdsBitmap *bm = g_ptr_array_index(set->bitmaps, i);
            memset(bm->page_dirty, 0, MAX((bm->nwords + WORDS_PER_PAGE - 1) / WORDS_PER_PAGE, 1));
        }
    } else {
        close(fd);
    }
    return true;
}

bool nbds_bitmaps_save(NbdsBitmapSet *set, GError **error)
{
    return save(set, false, error);
}

NbdsBitmap *nbds_bitmaps_edit_in_use(NbdsBitmapSet *set, NbdsBitmapEdit edit, const char *name,
                                     uint32_t granularity, bool *saved, GError **error)
{
    NbdsBitmap *bm;

    /* A FLUSH's sync walks the same list. */
    g_mutex_lock(&set->sync_lock);
    bm = nbds_bitmaps_edit(set, edit, name, granularity, error);
    *saved = bm && save(set, true, error);
    g_mutex_unlock(&set->sync_lock);
    return bm;
}

int nbds_bitmaps_sync(NbdsBitmapSet *set)
{
    uint8_t page[PAGE];
    bool wrote = false;
    int err = 0;

    if (!set || set->fd < 0) {
        return 0;
    }
    g_mutex_lock(&set->sync_lock);
    for (guint i = 0; i < set->bitmaps->len && !err; i++) {
        NbdsBitmap *bm = g_ptr_array_index(set->bitmaps, i);
        uint64_t npages = (bm->nwords + WORDS_PER_PAGE - 1) / WORDS_PER_PAGE;
        for (uint64_t p = 0; p < npages; p++) {
            uint64_t first = p * WORDS_PER_PAGE;
            uint64_t count = MIN(WORDS_PER_PAGE, bm->nwords - first);
            /* Clear the flag first: a mark landing meanwhile sets it again. */
            if (!__atomic_exchange_n(&bm->page_dirty[p], 0, __ATOMIC_ACQ_REL)) {
                continue;
            }
            words_to_le(bm, first, count, page);
            if (pwrite(set->fd, page, count * 8, bm->data_offset + first * 8) != (ssize_t)(count * 8)) {
                err = errno ? errno : EIO;
                __atomic_store_n(&bm->page_dirty[p], 1, __ATOMIC_RELEASE);
                break;
            }
            wrote = true;
        }
    }
    if (!err && wrote && fdatasync(set->fd) < 0) {
        err = errno;
    }
    g_mutex_unlock(&set->sync_lock);
    return err;
}

bool nbds_bitmaps_close(NbdsBitmapSet *set, GError **error)
{
    bool ok = save(set, false, error);
    nbds_bitmaps_free(set);
    return ok;
}

/* ---- loading ---- */

static bool corrupt(GError **error, const char *path, const char *what)
{
    g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                "%s: %s; the bitmaps cannot be trusted, so the image is not served with "
                "them (move the file away to drop them, and take a full backup next)",
                path, what);
    return false;
}

/* Check the header of a version 2 file; its directory length goes to *DIR_LEN. */
static bool check_v2(NbdsBitmapSet *set, const uint8_t *buf, size_t len, uint64_t *dir_len,
                     GError **error)
{
    uint8_t digest[32];
    uint64_t body_len;

    sha256(buf, 128, digest);
    if (memcmp(digest, buf + 128, 32) != 0) {
        return corrupt(error, set->path, "header checksum mismatch");
    }
    body_len = get_le64(buf + 40);
    *dir_len = get_le64(buf + 112);
    if (body_len != len - HEADER_SIZE || *dir_len > body_len) {
        return corrupt(error, set->path, "truncated or extended file");
    }
    sha256(buf + HEADER_SIZE, *dir_len, digest);
    if (memcmp(digest, buf + 48, 32) != 0) {
        return corrupt(error, set->path, "directory checksum mismatch");
    }
    if (!(get_le32(buf + 12) & FLAG_IN_USE)) {
        sha256(buf + HEADER_SIZE + *dir_len, body_len - *dir_len, digest);
        if (memcmp(digest, buf + 80, 32) != 0) {
            return corrupt(error, set->path, "data checksum mismatch");
        }
    }
    return true;
}

/* Check the header of a version 1 file (closed cleanly: one sum covers it all). */
static bool check_v1(NbdsBitmapSet *set, const uint8_t *buf, size_t len, GError **error)
{
    uint8_t digest[32];

    sha256(buf, 96, digest);
    if (memcmp(digest, buf + 96, 32) != 0) {
        return corrupt(error, set->path, "header checksum mismatch");
    }
    if (get_le64(buf + 40) != len - V1_HEADER_SIZE) {
        return corrupt(error, set->path, "truncated or extended file");
    }
    if (get_le32(buf + 12) & FLAG_IN_USE) {
        return corrupt(error, set->path, "a version 1 file left in use by a server that did "
                       "not shut down cleanly, which cannot be verified");
    }
    sha256(buf + V1_HEADER_SIZE, len - V1_HEADER_SIZE, digest);
    if (memcmp(digest, buf + 48, 32) != 0) {
        return corrupt(error, set->path, "checksum mismatch");
    }
    return true;
}

bool nbds_bitmaps_parse(NbdsBitmapSet *set, const uint8_t *buf, size_t len,
                        NbdsSidecarState *state, GError **error)
{
    uint32_t version, count;
    uint64_t dir_end, data_start, pos, dir_len = 0;

    if (len < V1_HEADER_SIZE || memcmp(buf, MAGIC, 8) != 0) {
        return corrupt(error, set->path, "not an nbdfs bitmap file");
    }
    version = get_le32(buf + 8);
    if (version == 1) {
        if (!check_v1(set, buf, len, error)) {
            return false;
        }
        /* Version 1 records no directory length: entries only have to fit the file. */
        pos = data_start = V1_HEADER_SIZE;
        dir_end = len;
    } else if (version == VERSION) {
        if (len < HEADER_SIZE || !check_v2(set, buf, len, &dir_len, error)) {
            return len < HEADER_SIZE ? corrupt(error, set->path, "truncated file") : false;
        }
        pos = HEADER_SIZE;
        dir_end = data_start = HEADER_SIZE + dir_len;
    } else {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_SUPPORTED,
                    "%s: bitmap file version %u; this nbdfs reads versions 1 and %d",
                    set->path, version, VERSION);
        return false;
    }
    state->in_use = get_le32(buf + 12) & FLAG_IN_USE;
    state->size = get_le64(buf + 16);
    state->mtime_sec = (int64_t)get_le64(buf + 24);
    state->mtime_nsec = get_le32(buf + 32);
    count = get_le32(buf + 36);
    if (count > NBDS_BITMAP_MAX_COUNT) {
        return corrupt(error, set->path, "too many bitmaps");
    }

    for (uint32_t i = 0; i < count; i++) {
        uint16_t nlen;
        uint32_t gran;
        uint64_t nbits, off, dlen;
        g_autofree char *name = NULL;
        NbdsBitmap *bm;

        if (dir_end - pos < ENTRY_SIZE) {
            return corrupt(error, set->path, "directory overruns its length");
        }
        nlen = get_le16(buf + pos);
        gran = get_le32(buf + pos + 4);
        nbits = get_le64(buf + pos + 8);
        off = get_le64(buf + pos + 16);
        dlen = get_le64(buf + pos + 24);
        if (dir_end - pos - ENTRY_SIZE < nlen) {
            return corrupt(error, set->path, "directory overruns its length");
        }
        name = g_strndup((const char *)buf + pos + ENTRY_SIZE, nlen);
        if (strlen(name) != nlen || !nbds_bitmap_name_valid(name, NULL) ||
            gran < NBDS_BITMAP_MIN_GRANULARITY || gran > NBDS_BITMAP_MAX_GRANULARITY ||
            (gran & (gran - 1)) || nbits != (state->size + gran - 1) / gran ||
            dlen != (nbits + 63) / 64 * 8 || off < data_start || off > len || dlen > len - off ||
            nbds_bitmaps_find(set, name)) {
            return corrupt(error, set->path, "invalid bitmap entry");
        }
        bm = bitmap_new(name, gran, state->size);
        bm->enabled = buf[pos + 2] & ENTRY_ENABLED;
        bm->inconsistent = buf[pos + 2] & ENTRY_INCONSISTENT;
        for (uint64_t w = 0; w < bm->nwords; w++) {
            bm->words[w] = get_le64(buf + off + 8 * w);
        }
        if (bm->nbits % 64) {
            bm->words[bm->nwords - 1] &= (UINT64_C(1) << (bm->nbits % 64)) - 1;
        }
        g_ptr_array_add(set->bitmaps, bm);
        pos += ENTRY_SIZE + nlen;
    }
    if (version == VERSION && pos != dir_end) {
        return corrupt(error, set->path, "directory length does not match its entries");
    }
    return true;
}

/* Was the image written without us knowing?  Then every bitmap is all dirty. */
static void check_consistency(NbdsBitmapSet *set, const NbdsSidecarState *state,
                              const struct stat *st)
{
    if (state->in_use) {
        set->inconsistent_reason = "the server writing the image did not shut down cleanly";
    } else if (state->size != set->size) {
        set->inconsistent_reason = "the image's size changed while it was not served";
    } else if (st->st_mtim.tv_sec != state->mtime_sec ||
               st->st_mtim.tv_nsec != state->mtime_nsec) {
        set->inconsistent_reason = "the image was modified while it was not served";
    }
    if (!set->inconsistent_reason) {
        return;
    }
    for (guint i = 0; i < set->bitmaps->len; i++) {
        NbdsBitmap *bm = g_ptr_array_index(set->bitmaps, i);
        if (state->size != set->size) {
            /* Re-size to the image: every bit counts as dirty anyway. */
            NbdsBitmap *fresh = bitmap_new(bm->name, bm->granularity, set->size);
            fresh->enabled = bm->enabled;
            g_ptr_array_index(set->bitmaps, i) = fresh;
            bitmap_free(bm);
            bm = fresh;
        }
        bm->inconsistent = true;
    }
}

NbdsBitmapSet *nbds_bitmaps_new(const char *path, uint64_t size)
{
    NbdsBitmapSet *set = g_new0(NbdsBitmapSet, 1);

    set->path = g_strdup(path);
    set->name = g_path_get_basename(path);
    set->dirfd = -1;
    set->size = size;
    set->fd = -1;
    set->bitmaps = g_ptr_array_new_with_free_func((GDestroyNotify)bitmap_free);
    set->removed = g_ptr_array_new_with_free_func((GDestroyNotify)bitmap_free);
    g_mutex_init(&set->sync_lock);
    return set;
}

/* Read the whole sidecar (NAME in DIRFD) without following a symlink; ENOENT: none. */
static bool read_sidecar(NbdsBitmapSet *set, GByteArray **out, GError **error)
{
    g_autoptr(GByteArray) bytes = g_byte_array_new();
    struct stat st;
    int fd = openat(set->dirfd, set->name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);

    if (fd < 0) {
        if (errno == ENOENT) {
            *out = NULL;
            return true;
        }
        if (errno == ELOOP) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                        "%s: is a symbolic link, which nbdfs does not follow here (make it "
                        "the file itself)", set->path);
            return false;
        }
        return file_error(error, set->path, errno);
    }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                    "%s: not a regular file", set->path);
        return false;
    }
    for (;;) {
        uint8_t chunk[65536];
        ssize_t n = read(fd, chunk, sizeof(chunk));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            int err = errno;
            close(fd);
            return file_error(error, set->path, err);
        }
        if (n == 0) {
            break;
        }
        g_byte_array_append(bytes, chunk, n);
    }
    close(fd);
    *out = g_steal_pointer(&bytes);
    return true;
}

NbdsBitmapSet *nbds_bitmaps_load(NbdsImage *img, bool for_writing, GError **error)
{
    g_autofree char *path = nbds_bitmap_sidecar_path(nbds_image_path(img));
    g_autofree char *dir = g_path_get_dirname(path);
    g_autoptr(NbdsBitmapSet) set = nbds_bitmaps_new(path, nbds_image_size(img));
    g_autoptr(GByteArray) bytes = NULL;
    NbdsSidecarState state;
    struct stat st;

    set->image = img;
    /* The image's path was resolved when it was opened: this is its real directory. */
    set->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (set->dirfd < 0) {
        file_error(error, dir, errno);
        return NULL;
    }
    if (!read_sidecar(set, &bytes, error)) {
        return NULL;
    }
    if (!bytes) {
        return g_steal_pointer(&set);
    }
    if (nbds_image_is_block_device(img)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_NOT_SUPPORTED,
                    "%s: a block device cannot have bitmaps (changes made while it is not "
                    "served could not be detected): move the file away", path);
        return NULL;
    }
    if (!nbds_bitmaps_parse(set, bytes->data, bytes->len, &state, error)) {
        return NULL;
    }
    if (fstat(nbds_image_fd(img), &st) < 0) {
        file_error(error, nbds_image_path(img), errno);
        return NULL;
    }
    check_consistency(set, &state, &st);
    /* Before the first write: a crash from now on must leave the flag behind. */
    if (for_writing && set->bitmaps->len && !save(set, true, error)) {
        return NULL;
    }
    return g_steal_pointer(&set);
}
