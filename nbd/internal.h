/*
 * Internal interfaces of the NBD server, grouped by the file that defines them.
 * Reading order: server.c (exports, listeners, connections) -> conn.c (socket
 * I/O) -> handshake.c (greeting and options) -> meta-context.c -> transmission.c
 * (requests) -> reply.c (reply framing) -> block-status.c -> image.c.
 */
#ifndef NBDS_INTERNAL_H
#define NBDS_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include <glib.h>

#include "bitmap.h"
#include "extents.h"
#include "image.h"
#include "protocol.h"
#include "server.h"
#include "wire.h"

/* Largest option a client may send us with data we parse (longer: ERR_TOO_BIG). */
#define NBDS_MAX_OPTION_LEN  (64u << 10)
/* Requests served at once per connection, and the bytes they may hold. */
#define NBDS_MAX_IN_FLIGHT       64
#define NBDS_MAX_IN_FLIGHT_BYTES (64u << 20)
/* What any request costs at least (its work item, a small reply). */
#define NBDS_REQUEST_OVERHEAD    4096u

typedef struct NbdsConn NbdsConn;
typedef struct NbdsImageControl NbdsImageControl;
typedef struct NbdsBackupView NbdsBackupView;

/* ---- image-control.c ---- */

/* A control socket for EXP's image (IMAGE.control); the thread starts later. */
bool nbds_image_control_add(NbdsServer *s, NbdsExport *exp, GError **error);
/* Close and remove the control sockets; no command runs after it returns. */
void nbds_image_control_stop(NbdsServer *s);
/* Append an "info" line of words (NULL-terminated) to a command's answer. */
void nbds_control_info(GString *out, const char *first, ...) G_GNUC_NULL_TERMINATED;

/* ---- tls.c ---- */

typedef struct NbdsTls NbdsTls;

/* Credentials from CREDS_DIR (x509, qemu's layout) and/or PSK_FILE; errors name the file. */
NbdsTls *nbds_tls_new(const char *creds_dir, const char *psk_file, bool verify_peer,
                      const char *psk_user, GError **error);
void nbds_tls_free(NbdsTls *t);
/* The TLS handshake on C's socket, within C's deadline; false (logged) if it failed. */
bool nbds_tls_start(NbdsConn *c);
void nbds_tls_end(NbdsConn *c);
/* The record layer (blocking; -1 with errno on failure, 0 at the end). */
ssize_t nbds_tls_recv(NbdsConn *c, void *buf, size_t len);
ssize_t nbds_tls_send(NbdsConn *c, const void *buf, size_t len);
/* Decrypted bytes wait inside GnuTLS (a poll on the socket would not see them). */
bool nbds_tls_pending(NbdsConn *c);

/* ---- budget.c ---- */

/* Bytes held for clients, server-wide (see budget.c). */
typedef struct {
    GMutex lock;                   /* a leaf lock */
    GCond cond;                    /* a charge was released */
    uint64_t limit;                /* --max-buffered */
    uint64_t floor;                /* each connection's own share */
    uint64_t pool_limit, pool_used;   /* what connections hold above their floor */
    uint64_t total, peak;          /* held in all (statistics) */
} NbdsBudget;

void nbds_budget_init(NbdsBudget *b, uint64_t limit, unsigned max_connections);
void nbds_budget_clear(NbdsBudget *b);
/*
 * Charge one request of COST bytes to C, waiting while C (or the server) is
 * over budget.  Only C's reader calls it.  False if C broke meanwhile.
 */
bool nbds_budget_reserve(NbdsConn *c, uint64_t cost);
/* Give back BYTES (and, with REQUEST, the request itself). */
void nbds_budget_release(NbdsConn *c, uint64_t bytes, bool request);
/* Charge BYTES that exist already (a queued reply): never waits. */
void nbds_budget_charge(NbdsConn *c, uint64_t bytes);
/* Wake every reader waiting for budget (a connection broke). */
void nbds_budget_wake(NbdsServer *s);

/* ---- meta-context.c ---- */

typedef struct NbdsMetaContext NbdsMetaContext;

/* Fill E (its range, cap and mode are set) with CTX's status; 0 or an errno. */
typedef int (*NbdsExtentsFn)(NbdsExport *exp, const NbdsMetaContext *ctx, NbdsExtents *e);

/* A metadata context an export offers; its id is its index in exp->contexts. */
struct NbdsMetaContext {
    char *name;                    /* "base:allocation", "qemu:dirty-bitmap:b0" */
    NbdsExtentsFn extents;
    gpointer opaque;
    bool removed;                  /* offered no more; still answered to who has it */
};

void nbds_meta_context_free(NbdsMetaContext *ctx);
/* Offer a context NAME answered by EXTENTS (with OPAQUE in ctx->opaque). */
void nbds_meta_add(NbdsExport *exp, const char *name, NbdsExtentsFn extents, gpointer opaque);
void nbds_meta_add_base_allocation(NbdsExport *exp);
/* One qemu:dirty-bitmap:NAME context per bitmap of exp->bitmaps. */
void nbds_meta_add_bitmaps(NbdsExport *exp);
/*
 * A bitmap added or removed while served: contexts are only ever appended
 * (ids stay valid for connected clients); a removed one is offered no more
 * but still answers the clients that selected it.
 */
void nbds_meta_add_bitmap(NbdsExport *exp, NbdsBitmap *bm);
void nbds_meta_remove_bitmap(NbdsExport *exp, NbdsBitmap *bm);
/* The context with id ID (< what the caller negotiated). */
NbdsMetaContext *nbds_meta_context_get(NbdsExport *exp, uint32_t id);

/* Handle NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT; DATA is the whole option. */
int nbds_meta_handle_option(NbdsConn *c, uint32_t option, const uint8_t *data,
                            uint32_t len);
/* Forget the selection (GO of another export, failed SET). */
void nbds_meta_clear(NbdsConn *c);

/* ---- server.c ---- */

struct NbdsExport {
    char *name;
    char *description;
    NbdsImage *image;
    NbdsBitmapSet *bitmaps;        /* dirty bitmaps of the image (may be empty) */
    bool read_only;
    GRWLock contexts_lock;         /* contexts: appended while served */
    GPtrArray *contexts;           /* NbdsMetaContext *, index = context id */
    /*
     * Held shared by every write-type request around its marks and its I/O,
     * exclusively by a command that must see no write half done (a bitmap
     * edit, a backup's start): a write is wholly before or after it.
     * Writer-preferring (GRWLock is not, on glibc): a steady stream of
     * writes cannot starve a command.
     */
    pthread_rwlock_t gate;
    GPtrArray *views;              /* NbdsBackupView * of this image; changed under gate */
    NbdsBackupView *view;          /* set when this export is a backup view */
    char *untracked_writer;        /* under gate: who writes the image without us, or NULL */
    int refs;                      /* references held by connections (export, meta_export) */
    int clients;                   /* connections in transmission on it */
};


struct NbdsServer {
    NbdsServerConfig config;
    /*
     * NbdsExport *; [0] is also the default export.  Backup views come and
     * go while served: the list is read and changed under exports_lock, and
     * an export is freed only when no connection holds a reference.
     */
    GPtrArray *exports;
    GMutex exports_lock;
    GCond exports_cond;            /* an export's refs dropped */
    GArray *listen_fds;            /* int */
    GThreadPool *workers;          /* runs requests of every connection */

    GMutex lock;                   /* protects what follows */
    GCond cond;
    GList *conns;                  /* NbdsConn *, live connections */
    unsigned n_conns;
    unsigned n_refusing;           /* over-cap clients being turned away */
    GPtrArray *finished;           /* GThread * of ended connections, to be joined */
    gint shutting_down;            /* atomic: read by connections without the lock */

    NbdsBudget budget;             /* bytes held for all clients */
    NbdsTls *tls;                  /* credentials, when TLS is offered */
    NbdsImageControl *control;     /* the images' control sockets, or NULL */
};

/* A listening unix socket at PATH with permissions MODE (born owner-only); -1 on error. */
int nbds_listen_unix_path(const char *path, unsigned mode, GError **error);

/* The export NAME with a reference for the caller, or NULL.  "" is the default export. */
NbdsExport *nbds_server_ref_export(NbdsServer *server, const char *name);
void nbds_export_unref(NbdsServer *server, NbdsExport *exp);
/* A connection starts (DELTA 1) or ends (-1) its transmission phase on EXP. */
void nbds_export_count_client(NbdsServer *server, NbdsExport *exp, int delta);
/* The export NAME (exports_lock held), or NULL. */
NbdsExport *nbds_server_find_export_locked(NbdsServer *server, const char *name);
/* A new export of IMG (not owned when VIEW is set), with base:allocation. */
NbdsExport *nbds_export_new(const char *name, NbdsImage *img, bool read_only);
void nbds_export_free(NbdsExport *exp);
uint16_t nbds_export_flags(const NbdsExport *exp);

/* An export's bytes: the image's, or a backup view's (backup.c).  0 or an errno. */
int nbds_export_pread(NbdsExport *exp, void *buf, uint64_t len, uint64_t offset);
int nbds_export_next_run(NbdsExport *exp, uint64_t offset, uint64_t end, bool *is_hole,
                         uint64_t *run_end);

/* ---- backup.c ---- */

/*
 * Before a write-type request changes [OFFSET, +LEN) of EXP (its gate held
 * shared): the old data every backup view of EXP still needs goes to the
 * view's scratch file.  A view that cannot keep it breaks; the write goes on.
 */
void nbds_backup_before_write(NbdsExport *exp, uint64_t offset, uint64_t len);
/* Control commands (see image-control.c); ARGV after "backup". */
bool nbds_backup_command(NbdsServer *s, NbdsExport *exp, char **argv, GString *out,
                         GError **error);
/* At shutdown, once no client is left: end every view as an abort would. */
void nbds_backup_abort_all(NbdsServer *s);
int nbds_backup_view_pread(NbdsBackupView *v, void *buf, uint64_t len, uint64_t offset);
int nbds_backup_view_next_run(NbdsBackupView *v, uint64_t offset, uint64_t end,
                              bool *is_hole, uint64_t *run_end);

/* ---- conn.c ---- */

struct NbdsConn {
    NbdsServer *server;
    int fd;
    char *peer;                    /* for log messages */
    gint64 deadline;               /* monotonic us; 0 = none (handshake limit) */
    bool refuse;                   /* over the connection cap: answer options with POLICY */
    gpointer tls;                  /* the gnutls session once STARTTLS succeeded */

    /* Negotiated state. */
    bool no_zeroes;
    NbdsHeaderMode mode;
    bool structured;               /* STRUCTURED_REPLY acknowledged (EH supersedes it) */
    NbdsExport *export;            /* after GO / EXPORT_NAME */
    uint16_t eflags;

    /* Metadata context selection (meta-context.c). */
    NbdsExport *meta_export;       /* the export named by the last SET, or NULL */
    bool *meta_selected;           /* [meta_len]: by context id */
    unsigned meta_len;             /* contexts the export had at the SET */
    unsigned meta_count;           /* how many are selected */

    /*
     * Transmission (transmission.c, reply.c).  Workers send replies straight
     * to the socket when it takes them at once, and never wait for it: what
     * a client is too slow to take waits in out_queue for the connection's
     * writer thread (started the first time), so a client that stops reading
     * stalls only itself, and no worker.
     */
    GMutex send_lock;              /* serialises workers' non-blocking direct sends */
    GMutex lock;                   /* protects what follows */
    GCond cond;
    unsigned in_flight;            /* requests being run by workers */
    gint64 last_activity;          /* monotonic us: last request received or answered */
    GQueue out_queue;              /* NbdsOutBuf *, replies waiting for the socket */
    uint64_t out_bytes;            /* bytes in out_queue */
    GThread *writer;
    bool writer_stop;
    gint broken;                   /* atomic: a send failed, stop reading and close */

    /* budget.c (under the budget's lock): what this client holds. */
    uint64_t held;
    unsigned requests;
};

NbdsConn *nbds_conn_new(NbdsServer *server, int fd);
void nbds_conn_free(NbdsConn *c);

/* Read or write exactly LEN bytes; false on EOF, error or the handshake deadline. */
bool nbds_conn_read(NbdsConn *c, void *buf, size_t len);
bool nbds_conn_write(NbdsConn *c, const void *buf, size_t len);
/* Consumes IOV: its entries are advanced as bytes are sent. */
bool nbds_conn_writev(NbdsConn *c, struct iovec *iov, int iovcnt);
/* Step IOV past N bytes that were sent (empties skipped, a partial entry trimmed). */
void nbds_iov_advance(struct iovec **iov, int *iovcnt, size_t n);
/* Read and discard LEN bytes without allocating LEN. */
bool nbds_conn_skip(NbdsConn *c, uint64_t len);

/* ---- handshake.c ---- */

/* Greeting and option haggling; true when transmission may start. */
bool nbds_handshake(NbdsConn *c);

/* Send one option reply with DATA, or an error reply with a printf message. */
bool nbds_opt_reply(NbdsConn *c, uint32_t option, uint32_t reply, const void *data,
                    size_t len);
bool nbds_opt_error(NbdsConn *c, uint32_t option, uint32_t reply, const char *fmt, ...)
    G_GNUC_PRINTF(4, 5);

/* ---- transmission.c ---- */

/* Serve requests until DISC, EOF or a broken stream; waits for work in flight. */
void nbds_transmission(NbdsConn *c);
/* GThreadPool function: runs one request (NbdsWork *). */
void nbds_work_run(gpointer work, gpointer server);

/* ---- reply.c ---- */

/*
 * Reply helpers.  Each reply (all its chunks) goes out whole, so chunks of
 * different requests may interleave but never tear.  They return false when
 * the socket failed (the connection is then marked broken).
 */
bool nbds_reply_ok(NbdsConn *c, const NbdsRequest *req);
bool nbds_reply_error(NbdsConn *c, const NbdsRequest *req, uint32_t nbd_error,
                      const char *fmt, ...) G_GNUC_PRINTF(4, 5);
/* Send prepared chunks (headers included); blocks briefly at most.  Consumes IOV. */
bool nbds_reply_send(NbdsConn *c, struct iovec *iov, int iovcnt);
/*
 * The same, taking OWNED (g_malloc'd, OWNED_LEN bytes, into which IOV's data
 * entries point, or NULL): what the client cannot take at once is queued
 * without copying it, and OWNED is freed once sent.
 */
bool nbds_reply_send_owned(NbdsConn *c, struct iovec *iov, int iovcnt, gpointer owned,
                           size_t owned_len);
/* After the last reply: wait until the queue is on the wire, stop the writer. */
void nbds_reply_drain(NbdsConn *c);
/* Encode one chunk header for REQ into BUF; returns its size. */
size_t nbds_chunk_header(NbdsConn *c, const NbdsRequest *req, uint16_t flags,
                         uint16_t type, uint64_t length, void *buf);
/* Simple reply with optional data. */
bool nbds_reply_simple(NbdsConn *c, const NbdsRequest *req, uint32_t error,
                       const void *data, size_t len);

/* errno from the backend -> NBDS_E* on the wire. */
uint32_t nbds_errno_to_wire(int err);

/* ---- block-status.c ---- */

/*
 * Parse and check a block-status payload (8-byte effect length, then 4-byte
 * context ids).  SELECTED[i] tells whether id i was negotiated (N entries).
 * On success stores the effect length and the ids (at most N) and returns 0;
 * otherwise returns NBDS_EINVAL with *WHY set.
 */
uint32_t nbds_block_status_parse_payload(const uint8_t *payload, size_t len,
                                         const bool *selected, size_t n,
                                         uint64_t *effect_length, uint32_t *ids,
                                         size_t *n_ids, const char **why);

/* The most memory one BLOCK_STATUS request can take (budget.c charges it first). */
uint64_t nbds_block_status_cost(const NbdsConn *c, bool req_one);

/*
 * Answer BLOCK_STATUS for [REQ->offset, +LENGTH) with the contexts IDS (all
 * selected ones in id order when N_IDS is 0): one chunk per context.
 */
bool nbds_block_status_reply(NbdsConn *c, const NbdsRequest *req, uint64_t length,
                             const uint32_t *ids, size_t n_ids);

#endif /* NBDS_INTERNAL_H */
