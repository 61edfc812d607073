/* seekwalk FILE: walk FILE's data extents with lseek(SEEK_DATA) / lseek(SEEK_HOLE)
 * from offset 0 to the end, and print "<extents> <data bytes> <seconds>".
 *
 * Used by tests/bench/bench.py (workloads W5 and W8) so that the figure is the
 * cost of the lseek calls and not of an interpreter loop around them.
 * Exit status 0 on success, 1 on an lseek error other than ENXIO at the end. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: seekwalk FILE\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        fprintf(stderr, "seekwalk: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    off_t off = 0;
    long long extents = 0, data = 0;
    for (;;) {
        off_t d = lseek(fd, off, SEEK_DATA);
        if (d < 0) {
            if (errno == ENXIO)
                break;
            fprintf(stderr, "seekwalk: SEEK_DATA at %lld: %s\n", (long long)off,
                    strerror(errno));
            return 1;
        }
        off_t h = lseek(fd, d, SEEK_HOLE);
        if (h < 0) {
            fprintf(stderr, "seekwalk: SEEK_HOLE at %lld: %s\n", (long long)d,
                    strerror(errno));
            return 1;
        }
        if (h <= d) {
            fprintf(stderr, "seekwalk: no progress at %lld (hole at %lld)\n",
                    (long long)d, (long long)h);
            return 1;
        }
        extents++;
        data += h - d;
        off = h;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%lld %lld %.6f\n", extents, data, secs);
    close(fd);
    return 0;
}
