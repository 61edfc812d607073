/* Shared harness of the fuzz targets.  See fuzz-common.h. */
#include "fuzz-common.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bitmap.h"
#include "server.h"

static NbdsServer *server;
static bool require_tls;

void fuzz_require_tls(void)
{
    require_tls = true;
}

static void quiet_log(const char *domain, GLogLevelFlags level, const char *message,
                      gpointer data)
{
    (void)domain; (void)level; (void)message; (void)data;
}

/* At exit: a clean shutdown, so no server thread or buffer is left for LSan. */
static void teardown(void)
{
    g_clear_pointer(&server, nbds_server_free);
}

static void setup(void)
{
    g_autoptr(GError) error = NULL;
    char path[] = "/tmp/nbdfs-fuzz-XXXXXX";
    int fd = mkstemp(path);
    NbdsImage *img;
    NbdsBitmapSet *set;

    g_log_set_default_handler(quiet_log, NULL);
    signal(SIGPIPE, SIG_IGN);
    g_assert(fd >= 0);
    /* 8 MiB: data at 1 MiB, a hole elsewhere; room for the fuzzer's writes. */
    g_assert(ftruncate(fd, 8 << 20) == 0);
    g_assert(pwrite(fd, "nbdfs", 5, 1 << 20) == 5);
    close(fd);

    img = nbds_image_open(path, false, &error);
    g_assert_no_error(error);
    set = nbds_bitmaps_load(img, false, &error);
    g_assert_no_error(error);
    g_assert(nbds_bitmaps_add(set, "b0", 65536, &error));
    g_assert(nbds_bitmaps_add(set, "b1", 512, &error));
    g_assert(nbds_bitmaps_save(set, &error));
    nbds_bitmaps_free(set);
    nbds_image_close(img);

    if (require_tls) {
        /* A PSK made now (no key is kept anywhere), read once by the server. */
        char psk[] = "/tmp/nbdfs-fuzz-psk-XXXXXX";
        int pfd = mkstemp(psk);
        g_autofree char *line = g_strdup_printf("fuzz:%08x%08x%08x%08x\n", g_random_int(),
                                                g_random_int(), g_random_int(), g_random_int());
        g_assert(pfd >= 0 && write(pfd, line, strlen(line)) == (ssize_t)strlen(line));
        close(pfd);
        server = nbds_server_new(&(NbdsServerConfig){
            .max_connections = 4,
            .handshake_limit = 5,
            .threads = 4,
            .tls = NBDS_TLS_REQUIRE,
            .tls_psk = psk,
        }, &error);
        unlink(psk);
    } else {
        server = nbds_server_new(&(NbdsServerConfig){
            .max_connections = 4,
            .handshake_limit = 5,
            .threads = 4,
        }, &error);
    }
    g_assert_no_error(error);
    g_assert(nbds_server_add_export(server, path, &error));
    g_assert_no_error(error);
    atexit(teardown);
    /* The files can go now: the server holds them open. */
    unlink(path);
    {
        g_autofree char *sidecar = nbds_bitmap_sidecar_path(path);
        unlink(sidecar);
    }
}

typedef struct {
    int fd;
    const uint8_t *prefix, *data;
    size_t prefix_len, len;
} Feed;

static void write_all(int fd, const uint8_t *p, size_t len)
{
    while (len > 0) {
        ssize_t r = send(fd, p, len, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            return;        /* the server hung up: fine */
        }
        p += r;
        len -= r;
    }
}

static void *feeder(void *arg)
{
    Feed *f = arg;

    write_all(f->fd, f->prefix, f->prefix_len);
    write_all(f->fd, f->data, f->len);
    shutdown(f->fd, SHUT_WR);
    return NULL;
}

void fuzz_play(const uint8_t *prefix, size_t prefix_len, const uint8_t *data, size_t len)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    int sv[2];
    char buf[65536];
    pthread_t t;
    Feed f;

    pthread_once(&once, setup);
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        abort();
    }
    nbds_server_serve_fd(server, sv[0]);
    f = (Feed){ sv[1], prefix, data, prefix_len, len };
    pthread_create(&t, NULL, feeder, &f);
    /* Drain replies until the server closes its end: the connection is over. */
    while (read(sv[1], buf, sizeof(buf)) > 0) {
    }
    pthread_join(t, NULL);
    close(sv[1]);
    /* Every allocation of the connection is gone before the next input. */
    nbds_server_wait_idle(server);
}
