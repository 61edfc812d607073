/*
 * LD_PRELOAD shim for the FUA fallback test: pwritev2() refuses RWF_DSYNC
 * (EOPNOTSUPP, as on a kernel or file system without it) and every
 * fdatasync() is logged to the file named by $NBDFS_SHIM_LOG before it runs.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
/* Both names are defined here: keep the headers from renaming one into the other. */
#undef _FILE_OFFSET_BITS
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

typedef ssize_t (*PwriteFn)(int, const struct iovec *, int, off_t, int);

static ssize_t refuse_dsync(const char *name, int fd, const struct iovec *iov, int iovcnt,
                            off_t offset, int flags)
{
    PwriteFn real = (PwriteFn)dlsym(RTLD_NEXT, name);

    if (flags & RWF_DSYNC) {
        errno = EOPNOTSUPP;
        return -1;
    }
    return real(fd, iov, iovcnt, offset, flags);
}

/* Programs built with 64-bit file offsets call the second name. */
ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags)
{
    return refuse_dsync("pwritev2", fd, iov, iovcnt, offset, flags);
}

ssize_t pwritev64v2(int fd, const struct iovec *iov, int iovcnt, off64_t offset, int flags)
{
    return refuse_dsync("pwritev64v2", fd, iov, iovcnt, offset, flags);
}

int fdatasync(int fd)
{
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    const char *path = getenv("NBDFS_SHIM_LOG");

    if (path) {
        int log = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (log >= 0) {
            char line[32];
            int n = snprintf(line, sizeof(line), "fdatasync %d\n", fd);
            if (write(log, line, n) != n) {
                abort();
            }
            close(log);
        }
    }
    return real(fd);
}
