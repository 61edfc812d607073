/* libFuzzer target: a client's whole byte stream from the greeting on. */
#include "fuzz-common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_play(NULL, 0, data, size);
    return 0;
}
