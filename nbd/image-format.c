/* Image format detection by magic number (see image-format.h). */
#include "image-format.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}

/* Does HEAD (LEN bytes) start with the LEN_MAGIC bytes of MAGIC at OFFSET? */
static int has(const uint8_t *head, size_t len, size_t offset, const char *magic,
               size_t len_magic)
{
    return len >= offset + len_magic && memcmp(head + offset, magic, len_magic) == 0;
}

#define HAS(offset, magic) has(head, len, offset, magic, sizeof(magic) - 1)

const char *nbds_image_format_of(const uint8_t *head, size_t len)
{
    /* Where qemu's block drivers look (block/<format>.c, their probe functions). */
    if (HAS(0, "QFI\xfb") && len >= 8) {
        return be32(head + 4) == 1 ? "qcow" : "qcow2";
    }
    if (HAS(0, "QED\0")) {
        return "qed";
    }
    if (HAS(0, "KDMV") || HAS(0, "COWD") || HAS(0, "# Disk DescriptorFile")) {
        return "vmdk";
    }
    if (HAS(0, "vhdxfile")) {
        return "vhdx";
    }
    if (len >= 0x44 && le32(head + 0x40) == 0xbeda107f) {
        return "vdi";
    }
    if (HAS(0, "conectix")) {
        return "vpc";
    }
    if (HAS(0, "LUKS\xba\xbe")) {
        return "luks";
    }
    if (HAS(0, "WithoutFreeSpace") || HAS(0, "WithouFreSpacExt")) {
        return "parallels";
    }
    if (HAS(0, "Bochs Virtual HD Image")) {
        return "bochs";
    }
    return NULL;
}

const char *nbds_image_format_probe(int fd)
{
    uint8_t head[NBDS_IMAGE_PROBE_SIZE];
    ssize_t n;

    do {
        n = pread(fd, head, sizeof(head), 0);
    } while (n < 0 && errno == EINTR);
    return n > 0 ? nbds_image_format_of(head, (size_t)n) : NULL;
}
