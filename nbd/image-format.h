/*
 * Image format detection: the magic numbers qemu-img probes for, so that an
 * image of another format (qcow2, vmdk, ...) is never served as raw bytes by
 * mistake: a write through it would corrupt the container.
 */
#ifndef NBDS_IMAGE_FORMAT_H
#define NBDS_IMAGE_FORMAT_H

#include <stddef.h>
#include <stdint.h>

/* Bytes of the image's start the probe looks at. */
#define NBDS_IMAGE_PROBE_SIZE 512

/*
 * The format HEAD (the first LEN bytes of an image, LEN <= the probe size)
 * announces, as qemu names it ("qcow2", "vmdk", ...); NULL if none: raw.
 */
const char *nbds_image_format_of(const uint8_t *head, size_t len);

/* The same for the image open on FD; NULL for raw, or if it cannot be read. */
const char *nbds_image_format_probe(int fd);

#endif /* NBDS_IMAGE_FORMAT_H */
