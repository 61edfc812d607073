/*
 * Internal interfaces of `nbdfs mount` (and the connection code `nbdfs info`
 * shares), grouped by the file that defines them.  Reading order:
 * cmd-mount.c (command line, daemon, FUSE session) -> nbd-client.c (libnbd
 * handles, reconnection, completion -> reply) -> loop.c (the worker
 * threads) -> write-behind.c (writes in flight) -> block-status.c (extent
 * queries over extent-cache.c) -> inodes.c (the fixed tree) -> ops-export.c
 * (the export file) -> ops-dirty.c (the dirty/ files).
 *
 * Thread model (loop.c): one worker thread per NBD connection reads FUSE
 * requests and issues their NBD commands on its own connection; the replies
 * come back to the same thread, whose completion callbacks answer FUSE.
 * Operations that need an answer before they can reply (lseek, st_blocks,
 * the dirty files, a write over one still in flight) drive their own
 * connection in a nested loop meanwhile.
 */
#ifndef NBDFS_MOUNT_H
#define NBDFS_MOUNT_H

#define FUSE_USE_VERSION 35

#include <stdbool.h>
#include <stdint.h>
#include <signal.h>
#include <time.h>

#include <fuse_lowlevel.h>
#include <glib.h>
#include <libnbd.h>

#include "extent-cache.h"
#include "server.h"

/* Seconds a connection may take to connect and negotiate. */
#define NBDFS_HANDSHAKE_TIMEOUT 30
/* Largest FUSE read/write request we ask the kernel for. */
#define NBDFS_MAX_FUSE_IO (1u << 20)

/* ---- nbd-client.c: sources and handles ---- */

/* Where an export comes from: an NBD URI, or a local raw image served in-process. */
typedef struct {
    char *spec;                    /* as the user wrote it */
    char *image;                   /* local image path; NULL for a URI */
    NbdsServer *server;            /* local image: the bundled server */
} NbdfsSource;

/* A URI is anything with "://"; everything else names a local image, opened now. */
NbdfsSource *nbdfs_source_open(const char *spec, bool read_only, GError **error);
void nbdfs_source_free(NbdfsSource *src);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NbdfsSource, nbdfs_source_free)

/* A handle with our settings; OPT_MODE stops the handshake before NBD_OPT_GO. */
struct nbd_handle *nbdfs_handle_new(bool opt_mode, GError **error);
/* Connect H to SRC and wait (bounded) until it negotiates or is ready. */
bool nbdfs_source_connect(NbdfsSource *src, struct nbd_handle *h, GError **error);

/* Completion of an asynchronous option, polled with nbdfs_option_wait(). */
typedef struct {
    bool done;
    int error;
} NbdfsOption;

nbd_completion_callback nbdfs_option_callback(NbdfsOption *opt);
/* Wait (bounded) for the option whose issue returned R; WHAT names it in errors. */
bool nbdfs_option_wait(struct nbd_handle *h, int r, NbdfsOption *opt, const char *what,
                       GError **error);

/* libnbd's last error as a GError, prefixed with WHAT. */
void nbdfs_set_nbd_error(GError **error, const char *what);

/* ---- nbd-client.c: the mount's connections ---- */

/* One libnbd handle, driven by the worker thread that owns it (loop.c). */
typedef struct {
    struct nbd_handle *nbd;        /* only the owner reads or replaces it */
    unsigned index;
    int wake_fd;                   /* eventfd: wakes the owner (a waiter's condition changed) */
    gint dead;                     /* set by the owner when the connection failed */
    gpointer replacement;          /* a new handle the reconnect thread made, for the owner */
    gint64 retry_at;               /* reconnect thread: next attempt (monotonic us) */
    unsigned backoff;              /* reconnect thread: seconds to wait after a failure */
} NbdfsConn;

/* A metadata context the mount tracks, with its extent cache. */
typedef struct {
    char *name;                    /* "base:allocation", "qemu:dirty-bitmap:NAME" */
    const char *bitmap;            /* NAME, inside name; NULL for base:allocation */
    bool served;                   /* negotiated; if not, all data (and never dirty) */
    NbdfsExtentCache *cache;

    /* Bytes st_blocks counts (allocated / dirty), valid for one cache generation. */
    GMutex total_lock;
    bool total_valid;
    uint64_t total_generation;
    uint64_t total;

    /* ops-dirty.c: sizes of NAME.map and NAME.json when last rendered (total_lock). */
    uint64_t text_size[2];
} NbdfsContext;

typedef struct NbdfsPending NbdfsPending;

typedef struct {
    NbdfsSource *source;
    NbdfsConn **conns;
    unsigned n_conns;
    guint next_conn;               /* round robin */

    /* The export, as the server described it. */
    char *export_name;
    uint64_t size;
    bool read_only;
    bool can_flush, can_fua, can_trim, can_zero, can_payload, extended;
    uint64_t min_block;            /* requests are aligned to this (>= 1) */
    uint64_t max_io;               /* largest READ/WRITE sent */
    NbdfsContext *allocation;      /* base:allocation */
    GPtrArray *bitmaps;            /* NbdfsContext *, one per qemu:dirty-bitmap: */
    NbdfsPending *pending;         /* writes answered before the server finished them */

    /* Reconnection of a remote export (nbd-client.c). */
    GThread *reconnect_thread;
    GMutex reconnect_lock;
    GCond reconnect_cond;
    bool reconnect_stop;

    /* The file system. */
    struct fuse_session *session;
    char *file_name;
    bool keep_cache;               /* nobody else can change the export */
    struct timespec start_time;
    int ready_fd;                  /* background mode: told once FUSE is initialised */
} NbdfsMount;

/*
 * Open CONNECTIONS handles to m->source (fewer if the server does not allow
 * multi-conn), negotiating base:allocation and every dirty bitmap, and fill
 * in the export's properties.
 */
bool nbdfs_client_connect(NbdfsMount *m, unsigned connections, GError **error);
/* Disconnect (bounded) and free the handles, once the workers are gone. */
void nbdfs_client_stop(NbdfsMount *m);

/*
 * A remote export whose server went away: a thread reconnects dead
 * connections with bounded back-off (1 s doubling to 30 s), to the same
 * export of the same size, and hands each new handle to the connection's
 * owner, which installs it with nbdfs_conn_adopt_replacement().
 */
void nbdfs_client_start_reconnect(NbdfsMount *m);
void nbdfs_client_stop_reconnect(NbdfsMount *m);
/* In the owner: install a replacement handle if one is ready; true if so. */
bool nbdfs_conn_adopt_replacement(NbdfsMount *m, NbdfsConn *c);

/* The errno a FUSE caller gets for a libnbd or server error. */
int nbdfs_errno(int err);

/*
 * Fetch block status of CTX from OFFSET on (one request, as large a range as
 * the protocol allows).  Appends NbdfsExtent to EXTENTS starting at *START.
 * Returns 0 or an errno.
 */
int nbdfs_client_block_status(NbdfsMount *m, NbdfsContext *ctx, uint64_t offset,
                              GArray *extents, uint64_t *start);

/*
 * One FUSE request served by one or more NBD commands.  The reply goes out
 * from the completion of the last command: the data, the write count, or
 * success; or the first error.  Write-type commands invalidate the extent
 * caches before the reply, so the caller's next lseek sees their effect.
 */
typedef enum {
    NBDFS_REPLY_DATA,
    NBDFS_REPLY_WRITE,
    NBDFS_REPLY_NONE,
} NbdfsReplyKind;

typedef struct NbdfsIo NbdfsIo;

/* A request with a buffer of BUF_SIZE bytes (zero-filled if ZEROED). */
NbdfsIo *nbdfs_io_new(NbdfsMount *m, fuse_req_t req, NbdfsReplyKind kind, size_t buf_size,
                      bool zeroed);
char *nbdfs_io_buffer(NbdfsIo *io);
/* Free MEM (malloc'd) with the request: its data may then be written from it. */
void nbdfs_io_adopt(NbdfsIo *io, void *mem);
/* Reply with the LENGTH bytes of the buffer from OFFSET (default: all of it). */
void nbdfs_io_reply_slice(NbdfsIo *io, size_t offset, size_t length);
/* Commands: each is split into requests the server accepts. */
void nbdfs_io_pread(NbdfsIo *io, size_t buf_offset, uint64_t offset, uint64_t length);
void nbdfs_io_pwrite(NbdfsIo *io, const void *data, uint64_t offset, uint64_t length,
                     uint32_t flags);
void nbdfs_io_zero(NbdfsIo *io, uint64_t offset, uint64_t length, uint32_t flags);
void nbdfs_io_flush(NbdfsIo *io);
/* Fail the request with ERR (once the commands already issued complete). */
void nbdfs_io_fail(NbdfsIo *io, int err);
/* The error recorded so far (a command that could not even be sent), or 0. */
int nbdfs_io_error(NbdfsIo *io);
/* Its writes are pending (write-behind.c) until they complete. */
void nbdfs_io_write_behind(NbdfsIo *io);
/* Done issuing: the reply follows the last completion (maybe already now). */
void nbdfs_io_submit(NbdfsIo *io);

/* ---- loop.c ---- */

/*
 * Serve the FUSE session with one worker thread per connection until it is
 * unmounted or one of STOP_SIGNALS (blocked in every thread) arrives.
 */
int nbdfs_loop_run(NbdfsMount *m, const sigset_t *stop_signals, GError **error);
/* The calling worker's connection (outside the workers: round robin). */
NbdfsConn *nbdfs_loop_conn(NbdfsMount *m);
bool nbdfs_loop_owns(NbdfsConn *c);
/*
 * The buffer (malloc'd by libfuse) holding the request being served, if DATA
 * points into it: the caller now owns it and frees it.  Saves copying a write.
 */
void *nbdfs_loop_take_request_buffer(const void *data);
/* Drive the calling worker's connection until DONE(DATA): a nested loop. */
void nbdfs_loop_wait(NbdfsMount *m, bool (*done)(gpointer), gpointer data);
/* Wake C's owner; every worker (conditions other threads wait for changed). */
void nbdfs_conn_wake(NbdfsConn *c);
void nbdfs_loop_wake_all(NbdfsMount *m);

/* ---- write-behind.c ---- */

NbdfsPending *nbdfs_pending_new(void);
void nbdfs_pending_free(NbdfsPending *p);
/* Reserve [OFFSET, +LENGTH) for a write: waits for overlapping writes and for room. */
void nbdfs_pending_begin(NbdfsMount *m, uint64_t offset, uint64_t length);
/* That write is over: ERR is 0 or its errno. */
void nbdfs_pending_end(NbdfsMount *m, uint64_t offset, uint64_t length, int err);
/* Wait until no pending write overlaps [OFFSET, +LENGTH). */
void nbdfs_pending_wait_range(NbdfsMount *m, uint64_t offset, uint64_t length);
/* Wait until no write is pending; with TAKE_ERROR return (and forget) a failure. */
int nbdfs_pending_drain(NbdfsMount *m, bool take_error);

/* ---- block-status.c ---- */

NbdfsContext *nbdfs_context_new(const char *name, uint64_t export_size);
void nbdfs_context_free(NbdfsContext *ctx);

/* Does STATUS read as data (lseek)?  base:allocation: not ZERO; a bitmap: DIRTY. */
bool nbdfs_status_is_data(const NbdfsContext *ctx, uint64_t status);

/* Status at OFFSET (< size) and the end of its run; fetched when not cached. */
int nbdfs_status_at(NbdfsMount *m, NbdfsContext *ctx, uint64_t offset, uint64_t *status,
                    uint64_t *end);
/* SEEK_DATA (DATA) or SEEK_HOLE from OFFSET: 0 and *RESULT, or ENXIO or an errno. */
int nbdfs_seek(NbdfsMount *m, NbdfsContext *ctx, uint64_t offset, bool data, uint64_t *result);
/* Bytes st_blocks counts: allocated (base:allocation), dirty (a bitmap). */
int nbdfs_counted_bytes(NbdfsMount *m, NbdfsContext *ctx, uint64_t *bytes);
/* The same if known without asking the server. */
bool nbdfs_counted_bytes_cached(NbdfsContext *ctx, uint64_t *bytes);

/* Called for each run of one status, adjacent equal runs merged; false stops. */
typedef bool (*NbdfsRunFn)(uint64_t offset, uint64_t length, uint64_t status, gpointer data);
int nbdfs_for_each_run(NbdfsMount *m, NbdfsContext *ctx, uint64_t start, uint64_t end,
                       NbdfsRunFn fn, gpointer data);

/* The export changed over [OFFSET, OFFSET + LENGTH) through the mount. */
void nbdfs_contexts_changed(NbdfsMount *m, uint64_t offset, uint64_t length);

/* ---- inodes.c ---- */

/*
 * Inodes: 1 the root, 2 the export, 3 dirty/, then three per bitmap:
 * NAME.map, NAME.json, NAME.img.
 */
enum {
    NBDFS_INO_ROOT = 1,
    NBDFS_INO_EXPORT = 2,
    NBDFS_INO_DIRTY = 3,
    NBDFS_INO_FIRST_BITMAP = 4,
};

typedef enum {
    NBDFS_DIRTY_MAP,
    NBDFS_DIRTY_JSON,
    NBDFS_DIRTY_IMG,
    NBDFS_DIRTY_KINDS
} NbdfsDirtyKind;

extern const struct fuse_lowlevel_ops nbdfs_ops;

/* The file name given to the export: "dirty" is taken by the directory. */
bool nbdfs_valid_file_name(const char *name);

/* The type and permission bits of INO. */
mode_t nbdfs_node_mode(NbdfsMount *m, fuse_ino_t ino);
/* Common attributes of every inode (owner, times, link count). */
void nbdfs_fill_attr(NbdfsMount *m, fuse_ino_t ino, mode_t mode, struct stat *st);

/* ---- ops-export.c ---- */

int nbdfs_export_getattr(NbdfsMount *m, struct stat *st);
void nbdfs_export_open(fuse_req_t req, NbdfsMount *m, struct fuse_file_info *fi);
void nbdfs_export_setattr(fuse_req_t req, NbdfsMount *m, struct stat *attr, int to_set);
void nbdfs_export_read(fuse_req_t req, NbdfsMount *m, size_t size, off_t off);
void nbdfs_export_write(fuse_req_t req, NbdfsMount *m, const char *buf, size_t size, off_t off,
                        int open_flags);
void nbdfs_export_fsync(fuse_req_t req, NbdfsMount *m);
void nbdfs_export_flush(fuse_req_t req, NbdfsMount *m);
void nbdfs_export_fallocate(fuse_req_t req, NbdfsMount *m, int mode, off_t off, off_t length);
void nbdfs_export_lseek(fuse_req_t req, NbdfsMount *m, off_t off, int whence);

/* ---- ops-dirty.c ---- */

/* QUICK (a lookup): no block-status request, sizes as last seen. */
int nbdfs_dirty_getattr(NbdfsMount *m, fuse_ino_t ino, NbdfsContext *bitmap,
                        NbdfsDirtyKind kind, bool quick, struct stat *st);
void nbdfs_dirty_open(fuse_req_t req, NbdfsMount *m, NbdfsContext *bitmap, NbdfsDirtyKind kind,
                      struct fuse_file_info *fi);
void nbdfs_dirty_read(fuse_req_t req, NbdfsMount *m, NbdfsContext *bitmap, NbdfsDirtyKind kind,
                      size_t size, off_t off, struct fuse_file_info *fi);
void nbdfs_dirty_lseek(fuse_req_t req, NbdfsMount *m, NbdfsContext *bitmap, NbdfsDirtyKind kind,
                       off_t off, int whence, struct fuse_file_info *fi);
void nbdfs_dirty_release(struct fuse_file_info *fi);

/* ---- cmd-mount.c ---- */

/* FUSE init: tune the connection and, in the background, release the waiting parent. */
void nbdfs_session_init(void *userdata, struct fuse_conn_info *conn);

#endif /* NBDFS_MOUNT_H */
