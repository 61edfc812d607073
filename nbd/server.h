/*
 * nbdfs's NBD server library: the public interface used by `nbdfs serve` and
 * by `nbdfs mount` (which serves a local image in-process over socketpairs).
 *
 * Public names use the nbds_ prefix: libnbd owns nbd_ and is linked into the
 * same binary.
 */
#ifndef NBDS_SERVER_H
#define NBDS_SERVER_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>

typedef struct NbdsServer NbdsServer;
typedef struct NbdsExport NbdsExport;

typedef enum {
    NBDS_TLS_OFF,                  /* STARTTLS refused */
    NBDS_TLS_ON,                   /* offered; plain clients served too */
    NBDS_TLS_REQUIRE,              /* nothing but STARTTLS and ABORT before TLS */
} NbdsTlsMode;

typedef struct {
    bool read_only;                /* every export read-only */
    unsigned max_connections;      /* past it new clients are refused politely; 0 = no cap */
    unsigned handshake_limit;      /* seconds a client may take to negotiate; 0 = none */
    unsigned idle_limit;           /* seconds a client may send nothing (none in flight); 0 = none */
    unsigned threads;              /* worker threads; 0 = a default */
    bool any_format;               /* serve images whose magic says qcow2, vmdk... as raw */
    uint64_t max_buffered;         /* bytes held for all clients at most; 0 = the default */
    NbdsTlsMode tls;
    const char *tls_creds;         /* x509 directory: ca-cert.pem, server-cert.pem, ... */
    const char *tls_psk;           /* psktool's file */
    bool tls_verify_peer;          /* x509: client certificates signed by the CA required */
    const char *tls_psk_user;      /* PSK: only this user may connect */
    bool control;                  /* IMAGE.control for bitmap and backup commands */
} NbdsServerConfig;

#define NBDS_DEFAULT_MAX_CONNECTIONS 128
#define NBDS_DEFAULT_HANDSHAKE_LIMIT 10
/* What all clients together may make the server hold (budget.c). */
#define NBDS_DEFAULT_MAX_BUFFERED (UINT64_C(256) << 20)
#define NBDS_MIN_MAX_BUFFERED (UINT64_C(128) << 20)
/* Time limits (seconds) the server accepts: a day; more is surely a mistake. */
#define NBDS_MAX_TIME_LIMIT 86400

/* A server; NULL (ERROR set) if its TLS credentials cannot be loaded. */
NbdsServer *nbds_server_new(const NbdsServerConfig *config, GError **error);

/*
 * Serve the raw image at PATH under its base name; the first export added is
 * also the default export "".  The image is opened and locked now, so a
 * missing or busy image is reported before any client connects.  An image
 * of another format (qcow2, ...) is refused unless the config's any_format.
 */
NbdsExport *nbds_server_add_export(NbdsServer *server, const char *path, GError **error);
/* The descriptor EXP's image is served from (the server's: not to be closed). */
int nbds_export_image_fd(const NbdsExport *exp);
/*
 * From now on the image is written without the server (FUSE passthrough
 * of the mount that serves it), so no bitmap may track it: true if none is
 * enabled; from then on enabling or adding one is refused, naming WHY.
 */
bool nbds_export_allow_untracked_writes(NbdsExport *exp, const char *why);

/* Listening sockets: a unix socket, TCP, or an already listening fd (socket activation). */
/* A unix socket at PATH with permissions MODE (it is created owner-only first). */
bool nbds_server_listen_unix(NbdsServer *server, const char *path, unsigned mode,
                             GError **error);
bool nbds_server_listen_tcp(NbdsServer *server, const char *address, const char *port,
                            GError **error);
bool nbds_server_listen_fd(NbdsServer *server, int fd, GError **error);

/*
 * Start answering on the images' control sockets (config.control), so that
 * `nbdfs bitmap` and `nbdfs backup` reach this server.
 */
bool nbds_server_start_control(NbdsServer *server, GError **error);

/*
 * Accept clients on the listening sockets until STOP_FD becomes readable (a
 * signalfd, a pipe or an eventfd), then stop accepting.
 */
void nbds_server_run(NbdsServer *server, int stop_fd);

/* Serve one already connected client (takes ownership of FD): in-process use. */
void nbds_server_serve_fd(NbdsServer *server, int fd);

/* Wait until no client is connected (every connection thread has ended). */
void nbds_server_wait_idle(NbdsServer *server);

/*
 * Stop: close listeners, end every connection once its requests in flight are
 * answered, flush every export.  Returns false if a flush failed.
 */
bool nbds_server_shutdown(NbdsServer *server);
void nbds_server_free(NbdsServer *server);

/* Write all of BUF to the socket FD, blocking (a control client waits for it); gives up on error. */
void nbds_send_all(int fd, const char *buf, size_t len);
/*
 * For `nbdfs bitmap` and `nbdfs backup`: send the request ARGV to the
 * server holding IMAGE, through IMAGE.control; the words of each "info"
 * line of its answer go to INFO (a GStrv each).  False with ERROR: the
 * server's message, or why no server answers (G_IO_ERROR_NOT_CONNECTED);
 * messages do not name IMAGE.
 */
bool nbds_image_control_call(const char *image, const char *const *argv, GPtrArray *info,
                             GError **error);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NbdsServer, nbds_server_free)

#endif /* NBDS_SERVER_H */
