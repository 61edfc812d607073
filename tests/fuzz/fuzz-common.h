/*
 * Shared harness of the libFuzzer targets: one real NbdsServer with one
 * export (a sparse image with data and two dirty bitmaps), and a function
 * that plays a client's bytes to it over a socketpair, draining every reply,
 * until the server closes the connection.
 */
#ifndef NBDFS_FUZZ_COMMON_H
#define NBDFS_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* Before the first play: the server requires TLS (PSK), as 'nbdfs serve --tls=require'. */
void fuzz_require_tls(void);

/* Send PREFIX then DATA as one client's byte stream; returns once the server hung up. */
void fuzz_play(const uint8_t *prefix, size_t prefix_len, const uint8_t *data, size_t len);

#endif
