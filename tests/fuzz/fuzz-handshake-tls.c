/*
 * libFuzzer target: a client's whole byte stream from the greeting on, to a
 * server that requires TLS: the option loop before TLS (every option but
 * STARTTLS and ABORT refused), STARTTLS, and the TLS handshake fed garbage.
 */
#include "fuzz-common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int once;

    if (!once) {
        fuzz_require_tls();
        once = 1;
    }
    fuzz_play(NULL, 0, data, size);
    return 0;
}
