/*
 * libFuzzer target: the bitmap sidecar loader.  Each input is written as the
 * sidecar of a small raw image and loaded the way a server or a bitmap
 * command loads it (nbds_bitmaps_load: reading, every checksum, the
 * directory, the consistency checks); what loads is then used: counted,
 * and walked for block status over the whole image.  Seeds: sidecars
 * written by nbdfs (clean, in use, version 1).
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bitmap.h"
#include "image.h"

#define IMAGE_SIZE (8u << 20)

static NbdsImage *img;
static char *sidecar;

static void quiet_log(const char *domain, GLogLevelFlags level, const char *message,
                      gpointer data)
{
    (void)domain; (void)level; (void)message; (void)data;
}

static void teardown(void)
{
    g_autofree char *path = img ? g_strdup(nbds_image_path(img)) : NULL;

    if (sidecar) {
        unlink(sidecar);
    }
    g_clear_pointer(&img, nbds_image_close);
    if (path) {
        unlink(path);
        g_autofree char *dir = g_path_get_dirname(path);
        rmdir(dir);
    }
    g_free(sidecar);
}

static void setup(void)
{
    g_autoptr(GError) error = NULL;
    char dir[] = "/tmp/nbdfs-fuzz-sidecar-XXXXXX";
    g_autofree char *path = NULL;
    int fd;

    g_log_set_default_handler(quiet_log, NULL);
    g_assert(mkdtemp(dir));
    path = g_build_filename(dir, "disk.img", NULL);
    fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    g_assert(fd >= 0 && ftruncate(fd, IMAGE_SIZE) == 0);
    close(fd);
    img = nbds_image_open(path, true, &error);
    g_assert_no_error(error);
    sidecar = nbds_bitmap_sidecar_path(nbds_image_path(img));
    atexit(teardown);
}

static void sum(const uint8_t *p, size_t len, uint8_t *out)
{
    g_autoptr(GChecksum) c = g_checksum_new(G_CHECKSUM_SHA256);
    gsize n = 32;

    g_checksum_update(c, p, len);
    g_checksum_get_digest(c, out, &n);
}

/*
 * A copy of a version 2 file whose checksums are made right, so that the
 * structural checks behind them are reached too (a mutation almost always
 * breaks a SHA-256).  NULL if DATA is too short to be one.
 */
static uint8_t *with_valid_sums(const uint8_t *data, size_t size)
{
    uint8_t *copy;
    uint64_t dir_len;

    if (size < 160 || memcmp(data, "NBDFSBMP", 8) != 0) {
        return NULL;
    }
    copy = g_memdup2(data, size);
    memcpy(&dir_len, copy + 112, 8);
    dir_len = GUINT64_FROM_LE(dir_len);
    if (dir_len <= size - 160) {
        sum(copy + 160, dir_len, copy + 48);
        sum(copy + 160 + dir_len, size - 160 - dir_len, copy + 80);
    }
    sum(copy, 128, copy + 128);
    return copy;
}

/* Load DATA as the sidecar and use what loads. */
static void load(const uint8_t *data, size_t size)
{
    g_autoptr(GError) error = NULL;
    NbdsBitmapSet *set;
    int fd;

    fd = open(sidecar, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    g_assert(fd >= 0);
    g_assert(write(fd, data, size) == (ssize_t)size);
    close(fd);

    set = nbds_bitmaps_load(img, false, &error);
    if (!set) {
        g_assert(error && error->message[0]);
        return;
    }
    for (guint i = 0; i < nbds_bitmaps_count(set); i++) {
        NbdsBitmap *bm = nbds_bitmaps_get(set, i);
        NbdsBitmapInfo info;
        g_autoptr(NbdsExtents) e = nbds_extents_new(0, IMAGE_SIZE, 4096, false);

        nbds_bitmap_info(set, bm, &info);
        g_assert(info.dirty_bytes <= IMAGE_SIZE);
        g_assert(nbds_bitmap_extents(set, bm, e) == 0);
        g_assert(e->next <= IMAGE_SIZE);
    }
    nbds_bitmaps_free(set);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    g_autofree uint8_t *fixed = NULL;

    if (!img) {
        setup();
    }
    load(data, size);
    fixed = with_valid_sums(data, size);
    if (fixed) {
        load(fixed, size);
    }
    return 0;
}
