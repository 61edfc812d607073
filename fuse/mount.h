/*
 * Internal interfaces of `nbdfs mount` (and the connection code `nbdfs info`
 * shares), grouped by the file that defines them.  Reading order:
 * cmd-mount.c (command line, daemon, FUSE session) -> loop.c (the mount's
 * lifetime: FUSE threads, the orderly stop) -> conn.c (one I/O thread per
 * NBD connection, request deadlines) -> nbd-client.c (sources, handshake,
 * reconnection, FUSE requests served by NBD commands) -> write-behind.c
 * (writes in flight) -> open-files.c (write errors and durability per open
 * file) -> block-status.c (extent queries over extent-cache.c) -> exports.c
 * (one export, or --all) -> inodes.c (the tree) -> ops-export.c (the
 * export file) -> ops-dirty.c (the dirty/ files) -> control.c (`nbdfs
 * umount` waiting for the daemon).
 *
 * THREAD MODEL.  It is deadlock-free by construction; every rule below is
 * what makes it so, so keep them.
 *
 *   I/O threads (conn.c), one per NBD connection, are the only threads that
 *   drive a connection: they poll its socket and an eventfd, call
 *   nbd_aio_notify_read/write, and so run every completion callback.  They
 *   never wait for anything but their own socket, eventfd and the deadline
 *   of the oldest command in flight on their connection.  A command the
 *   server has not answered by its deadline (--timeout) kills the
 *   connection: libnbd then fails every command in flight on it at once.
 *
 *   FUSE threads (loop.c), a fixed pool, read requests from /dev/fuse and
 *   issue NBD commands on any live connection (libnbd's handle lock makes
 *   that safe; sending never blocks).  Data requests are answered from the
 *   completion callbacks, in an I/O thread.  An operation that needs an
 *   answer first (lseek, st_blocks, the dirty files, read-modify-write, a
 *   write over one in flight, O_DSYNC without FUA) waits on a condition
 *   variable for a completion.  That wait always ends: the I/O thread that
 *   drives the command answers it or fails it by its deadline, whatever any
 *   FUSE thread does.  A read of a local raw image is the one exception:
 *   the FUSE thread preads the image itself (exports.c keeps the
 *   descriptor), a local file, with no connection involved, once no write
 *   in flight overlaps it (that wait ends like the others; the pread itself
 *   is bounded by the image's file system, not by --timeout); with FUSE
 *   passthrough the kernel reads it and the read never reaches us (and with
 *   --passthrough=all writes too: lseek then asks the image, no connection).
 *   The first open registers the image with the kernel; with --passthrough=all
 *   that waits for the export's write gate (the server's writes in flight,
 *   which never wait for a FUSE thread); concurrent opens wait for that
 *   first one (g_once), never for anything else.
 *
 *   Completion callbacks never call libnbd (the handle lock is held there)
 *   and take only leaf locks: a leaf lock is held for a few instructions,
 *   never across a wait, a libnbd call or another lock.  Every nbdfs lock
 *   is a leaf, except a connection's handle_lock, which FUSE threads hold
 *   (for reading) only around one nbd_aio_* call and which no callback
 *   takes.
 *
 *   With --all an export is opened by the first FUSE thread that needs it
 *   (exports.c): that thread drives the new handles' handshakes itself,
 *   bounded by --timeout, and holds no lock meanwhile; other FUSE threads
 *   wanting the same export wait on open_cond for that bounded open.
 *
 *   The main thread (loop.c) only waits for the end (unmount, a signal) and
 *   runs the orderly stop; the reconnect thread (nbd-client.c) makes new
 *   handles for dead connections, bounded and cancellable, and hands them
 *   to their I/O threads.
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

/* FUSE passthrough: fuse_passthrough_open() and fuse_file_info.backing_id. */
#define NBDFS_HAVE_PASSTHROUGH \
    (FUSE_MAJOR_VERSION > 3 || (FUSE_MAJOR_VERSION == 3 && FUSE_MINOR_VERSION >= 16))

/* Default --timeout: seconds the server may take to answer a request or a handshake. */
#define NBDFS_DEFAULT_TIMEOUT 30
/* Largest FUSE read/write request we ask the kernel for. */
#define NBDFS_MAX_FUSE_IO (1u << 20)

/* ---- nbd-client.c: sources and handles ---- */

/* ---- spawn.c: a server started for the mount ---- */

typedef struct NbdfsSpawned NbdfsSpawned;

/* Start ARGV by socket activation on a private unix socket; errors name the command. */
NbdfsSpawned *nbdfs_spawn_start(char **argv, GError **error);
const char *nbdfs_spawn_socket(const NbdfsSpawned *s);
/* If the server died, start it again (the reconnect thread calls this). */
bool nbdfs_spawn_ensure(NbdfsSpawned *s, GError **error);
/* Why the server is gone ("qemu-nbd exited with status 1"), or NULL while it runs. */
char *nbdfs_spawn_exit_reason(NbdfsSpawned *s);
/*
 * Stop it (SIGTERM, then SIGKILL after a grace) and remove its socket.
 * True if it ended cleanly (status 0, or by the SIGTERM).
 */
bool nbdfs_spawn_free(NbdfsSpawned *s);

/* ---- nbd-client.c: sources and handles ---- */

/*
 * Where an export comes from: an NBD URI, a local raw image served
 * in-process, or a server started for the mount (qemu-nbd for an image of
 * another format, or the user's [ CMD ]).
 */
typedef struct {
    char *spec;                    /* as the user wrote it */
    char *image;                   /* local image path; NULL for a URI or a command */
    char *format;                  /* the image's format ("raw", "qcow2", ...) */
    NbdsServer *server;            /* local raw image: the bundled server */
    NbdsExport *export;            /* the same: its export */
    int image_fd;                  /* the same: its image (the server's descriptor), or -1 */
    NbdfsSpawned *spawned;         /* a server started for us */
    GPtrArray *skipped_bitmaps;    /* persistent bitmaps qemu cannot export (char *) */
    bool shut_down;
} NbdfsSource;

/*
 * COMMAND (argv, or NULL): start it and connect to it.  Else a URI is
 * anything with "://"; everything else names a local image: raw ones are
 * opened now by the bundled server; others (detected by their magic, as
 * qemu-img does, or named by FORMAT) are served by qemu-nbd with every
 * persistent bitmap.  FORMAT "raw" serves any file's bytes as they are.
 */
NbdfsSource *nbdfs_source_open(const char *spec, char **command, bool read_only,
                               const char *format, GError **error);
/*
 * Start connecting H to SRC (the handshake follows: nbdfs_source_connect),
 * asking for EXPORT_NAME (NULL: the one the source names).
 */
bool nbdfs_source_dial(NbdfsSource *src, const char *export_name, struct nbd_handle *h,
                       GError **error);
/* The NBD URI URI asking for the export NAME instead; NULL if URI cannot be parsed. */
char *nbdfs_uri_with_export(const char *uri, const char *name);
/* Socket buffers for maximal FUSE writes in one send. */
void nbdfs_enlarge_socket_buffers(int fd);
/* Stop serving: a local image is flushed, its bitmaps saved; false if that failed. */
bool nbdfs_source_shutdown(NbdfsSource *src);
void nbdfs_source_free(NbdfsSource *src);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(NbdfsSource, nbdfs_source_free)

/* A handle with our settings; OPT_MODE stops the handshake before NBD_OPT_GO. */
struct nbd_handle *nbdfs_handle_new(bool opt_mode, GError **error);
/*
 * Connect H to SRC, asking for EXPORT_NAME (NULL: the source's), and wait
 * until it negotiates or is ready: at most TIMEOUT_S seconds, and no longer
 * than until CANCEL_FD (if >= 0) is readable.
 */
bool nbdfs_source_connect(NbdfsSource *src, const char *export_name, struct nbd_handle *h,
                          unsigned timeout_s, int cancel_fd, GError **error);
/*
 * The exports H (negotiating) lists with NBD_OPT_LIST, as NbdfsExportEntry;
 * NULL with ERROR if the server will not list them.
 */
typedef struct {
    char *name;
    char *description;             /* NULL if none */
} NbdfsExportEntry;
void nbdfs_export_entry_free(NbdfsExportEntry *e);
GPtrArray *nbdfs_list_exports(struct nbd_handle *h, unsigned timeout_s, GError **error);
/* Leave negotiation politely (NBD_OPT_ABORT), waiting two seconds at most. */
void nbdfs_end_negotiation(struct nbd_handle *h);

/* Completion of an asynchronous option, polled with nbdfs_option_wait(). */
typedef struct {
    bool done;
    int error;
} NbdfsOption;

nbd_completion_callback nbdfs_option_callback(NbdfsOption *opt);
/* Wait (TIMEOUT_S at most) for the option whose issue returned R; WHAT names it. */
bool nbdfs_option_wait(struct nbd_handle *h, int r, NbdfsOption *opt, const char *what,
                       unsigned timeout_s, GError **error);

/* libnbd's last error as a GError, prefixed with WHAT. */
void nbdfs_set_nbd_error(GError **error, const char *what);

/* ---- conn.c: one connection and its I/O thread ---- */

typedef struct NbdfsMount NbdfsMount;
typedef struct NbdfsIo NbdfsIo;

typedef struct {
    NbdfsMount *m;
    unsigned index;
    /*
     * nbd: only replaced by the I/O thread, holding handle_lock for writing;
     * FUSE threads hold it for reading around each nbd_aio_* call.
     */
    GRWLock handle_lock;
    struct nbd_handle *nbd;
    int wake_fd;                   /* eventfd: the I/O thread re-reads its state */
    GThread *thread;
    gint dead;                     /* the connection failed; a replacement may come */
    gint stop;                     /* orderly stop: disconnect and end the thread */
    gpointer replacement;          /* a new handle from the reconnect thread */

    /* Commands in flight, oldest first (NbdfsCmd), for deadlines. */
    GMutex inflight_lock;
    GQueue inflight;

    /* Reconnect thread only. */
    gint64 retry_at;               /* next attempt (monotonic us) */
    unsigned backoff;              /* seconds to wait after a failure */
    char *last_failure;            /* why the last attempt failed */
} NbdfsConn;

NbdfsConn *nbdfs_conn_new(NbdfsMount *m, struct nbd_handle *h, unsigned index,
                          GError **error);
/* After nbdfs_conn_stop_thread(): close the handle, free everything. */
void nbdfs_conn_free(NbdfsConn *c);
/* Start the I/O thread (false if the system refuses a thread). */
bool nbdfs_conn_start_thread(NbdfsConn *c, GError **error);
/*
 * Orderly end: the I/O thread sends NBD_CMD_DISC if the connection is up,
 * waits a moment for the server to take it, and ends.  Call on every
 * connection with JOIN false (so all disconnect at once), then with JOIN
 * true to wait for the thread.
 */
void nbdfs_conn_stop_thread(NbdfsConn *c, bool join);
/* Wake the I/O thread (its state or the deadlines changed). */
void nbdfs_conn_wake(NbdfsConn *c);
/* Kill the connection now, failing what is in flight (the stop's last resort). */
void nbdfs_conn_abort(NbdfsConn *c);
bool nbdfs_conn_alive(NbdfsConn *c);

/* One NBD command of an NbdfsIo. */
typedef enum {
    NBDFS_CMD_READ,
    NBDFS_CMD_WRITE,
    NBDFS_CMD_ZERO,
    NBDFS_CMD_FLUSH,
    NBDFS_CMD_BLOCK_STATUS,
} NbdfsCmdKind;

typedef struct {
    NbdfsCmdKind kind;
    void *buf;                     /* READ: filled; WRITE: sent */
    uint64_t count, offset;
    uint32_t flags;                /* LIBNBD_CMD_FLAG_* */
    const char *context;           /* BLOCK_STATUS: the one context wanted */
    nbd_extent64_callback extents; /* BLOCK_STATUS */
} NbdfsCommand;

/*
 * Issue CMD for IO on a live connection (round robin).  The command holds a
 * reference on IO until libnbd is done with it; a failure (no live
 * connection, libnbd refused) is recorded in IO.
 */
void nbdfs_conn_issue(NbdfsMount *m, NbdfsIo *io, const NbdfsCommand *cmd);

/* ---- nbd-client.c: the mount's connections ---- */

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

/* What must not change when a connection is remade: the export's identity. */
typedef struct {
    char *canonical_name;          /* NBD_INFO_NAME, or the name asked for */
    char *description;             /* NBD_INFO_DESCRIPTION, or NULL */
    uint64_t size;
    bool read_only, can_flush, can_fua, can_trim, can_zero, can_fast_zero, can_cache,
        can_df, can_multi_conn, can_payload;
    bool structured, extended;     /* header mode */
    int64_t block_size[3];         /* minimum, preferred, maximum (0: none advertised) */
} NbdfsExportIdentity;

typedef struct NbdfsPending NbdfsPending;
typedef struct NbdfsFile NbdfsFile;
typedef struct NbdfsFs NbdfsFs;

/* exports.c: an export's life in the mount (--all opens them on first use). */
typedef enum {
    NBDFS_EXPORT_CLOSED,
    NBDFS_EXPORT_OPENING,          /* a FUSE thread is connecting */
    NBDFS_EXPORT_OPEN,
    NBDFS_EXPORT_FAILED,           /* tried again after a pause */
} NbdfsExportState;

/* One export of the mount (the mount's only one, or one directory under --all). */
struct NbdfsMount {
    NbdfsFs *fs;
    fuse_ino_t ino_base;           /* its inode numbers: ino_base + those of inodes.c */
    char *dir_name;                /* --all: its directory; NULL otherwise */
    char *ask_name;                /* the export name asked for; NULL: the source's */
    NbdfsExportState state;        /* fs->open_lock */
    gint64 failed_at;              /* monotonic us, when FAILED */

    NbdfsSource *source;           /* the fs's */
    int image_fd;                  /* a local raw image, our own descriptor of it; or -1 */
    gsize backing_once;            /* image_fd registered for passthrough (once) ... */
    int backing_id;                /* ... as this backing id (0: the kernel refused) */
    NbdfsConn **conns;
    unsigned n_conns;
    guint next_conn;               /* round robin */
    unsigned timeout;              /* --timeout: seconds a request may take */

    /* The export, as the server described it. */
    char *export_name;
    NbdfsExportIdentity identity;
    uint64_t size;
    bool read_only;
    bool can_flush, can_fua, can_trim, can_zero, can_payload, extended;
    uint64_t min_block;            /* requests are aligned to this (>= 1) */
    uint64_t max_io;               /* largest READ/WRITE sent */
    NbdfsContext *allocation;      /* base:allocation */
    GPtrArray *bitmaps;            /* NbdfsContext *, one per qemu:dirty-bitmap: */
    NbdfsPending *pending;         /* writes answered before the server finished them */

    /* Requests alive (NbdfsIo), for the orderly stop. */
    GMutex ios_lock;
    GCond ios_cond;
    unsigned ios_alive;

    /* open-files.c: open files, write errors, what is durable. */
    GMutex files_lock;
    GQueue files;                  /* NbdfsFile: the open files */
    uint64_t write_seq;            /* writes completed so far */
    uint64_t flushed_seq;          /* writes a successful FLUSH covered */
    unsigned write_failures;       /* writes that failed (exit status) */
    unsigned unreported_failures;  /* of those, never reported to an application */
    unsigned lost_unflushed;       /* connections lost with unflushed writes */

    /* Reconnection (nbd-client.c). */
    GThread *reconnect_thread;
    GMutex reconnect_lock;
    GCond reconnect_cond;
    bool reconnect_stop;
    int reconnect_cancel_fd;       /* eventfd: ends a handshake in progress */

    char *file_name;
    bool keep_cache;               /* nobody else can change the export */
};

/* --passthrough: what of a local raw image the kernel may do without nbdfs. */
typedef enum {
    NBDFS_PASSTHROUGH_OFF,
    NBDFS_PASSTHROUGH_READS,       /* read a read-only mount's image (the default) */
    NBDFS_PASSTHROUGH_ALL,         /* also read and write a writable mount's image */
} NbdfsPassthrough;

/* The file system: one export, or (--all) a directory per export of a server. */
struct NbdfsFs {
    NbdfsSource *source;
    bool all;
    GPtrArray *exports;            /* NbdfsMount *, in the server's order */
    GMutex open_lock;              /* the exports' state */
    GCond open_cond;               /* an export finished opening */
    bool stopping;                 /* open_lock: open no more exports */

    /* What the command line asked of every export. */
    char *file_name;               /* --name */
    bool read_only;
    unsigned connections;
    unsigned timeout;
    NbdfsPassthrough passthrough_mode;   /* --passthrough */

    /*
     * FUSE passthrough (libfuse >= 3.16, Linux >= 6.9) was negotiated: opens
     * of a local raw image hand the kernel the image, which then reads (and,
     * mounted writable, writes) it without asking us.  Cleared if the kernel
     * refuses a file.
     */
    gint passthrough;
    /*
     * Writes may reach the image without us (writable passthrough, set when
     * the image is first registered): what we cache of its allocation cannot
     * be trusted (lseek asks the image), and fsync always flushes.
     */
    gint untracked_writes;

    struct fuse_session *session;
    char *mountpoint;
    struct timespec start_time;
    int ready_fd;                  /* background mode: told once FUSE is initialised */
    int ended_fd;                  /* eventfd: a FUSE thread saw the session end */
    int control_fd;                /* control.c: listening for `nbdfs umount` */
    GArray *control_waiters;       /* control.c: their connections (int) */
};

/* ---- exports.c ---- */

/* An export of FS asking for ASK_NAME (NULL: the source's), not connected yet. */
NbdfsMount *nbdfs_fs_add_export(NbdfsFs *fs, const char *ask_name, const char *dir_name);
/*
 * Connect to it and start its threads; the file name comes from --name, the
 * image or the export's name.
 */
bool nbdfs_fs_open_export(NbdfsMount *m, GError **error);
/*
 * --all: open the export on first use (a FUSE thread, bounded by the
 * timeout; others wanting it wait for that one).  0, or the errno to reply.
 */
int nbdfs_fs_export_ready(NbdfsMount *m);
/*
 * --all: one export per name the server lists, each with a directory name
 * made safe and unique.  False with ERROR if it lists none or will not.
 */
bool nbdfs_fs_list_exports(NbdfsFs *fs, GError **error);
/* Is M open?  (After the FUSE threads ended, or under fs->open_lock.) */
bool nbdfs_fs_export_is_open(NbdfsMount *m);
/* Stop opening exports: the orderly stop began. */
void nbdfs_fs_stop_opening(NbdfsFs *fs);
/* Stop the export's threads and connections (the source stays). */
void nbdfs_fs_close_export(NbdfsMount *m);
void nbdfs_fs_free_export(NbdfsMount *m);

/*
 * Open CONNECTIONS handles to m->source (fewer if the server does not allow
 * multi-conn), negotiating base:allocation and every dirty bitmap, and fill
 * in the export's properties.  The I/O threads are not started yet.
 */
bool nbdfs_client_connect(NbdfsMount *m, unsigned connections, GError **error);
/* Start every connection's I/O thread. */
bool nbdfs_client_start(NbdfsMount *m, GError **error);
/* Disconnect every connection at once (bounded), end the I/O threads, free. */
void nbdfs_client_stop(NbdfsMount *m);

/*
 * A thread remakes dead connections with bounded back-off (1 s doubling to
 * 30 s), only to the same export (nbdfs_export_identity_diff), and hands
 * each new handle to its connection's I/O thread.
 */
bool nbdfs_client_start_reconnect(NbdfsMount *m, GError **error);
void nbdfs_client_stop_reconnect(NbdfsMount *m);
/* A connection died: the reconnect thread should look at it. */
void nbdfs_client_connection_died(NbdfsMount *m);
/* In C's I/O thread: install a replacement handle if one is ready; true if so. */
bool nbdfs_conn_adopt_replacement(NbdfsConn *c);

/* The identity of the export H is connected to; free with nbdfs_export_identity_clear. */
void nbdfs_export_identity_read(struct nbd_handle *h, NbdfsExportIdentity *id);
void nbdfs_export_identity_clear(NbdfsExportIdentity *id);
/* What differs between A (as first seen) and B, in words; NULL if nothing. */
char *nbdfs_export_identity_diff(const NbdfsExportIdentity *a, const NbdfsExportIdentity *b);

/* The errno a FUSE caller gets for a libnbd or server error. */
int nbdfs_errno(int err);

/*
 * Fetch block status of CTX from OFFSET on (one request, as large a range as
 * the protocol allows).  Appends NbdfsExtent to EXTENTS starting at *START.
 * Returns 0 or an errno.  Waits for the answer.
 */
int nbdfs_client_block_status(NbdfsMount *m, NbdfsContext *ctx, uint64_t offset,
                              GArray *extents, uint64_t *start);

/*
 * One FUSE request served by one or more NBD commands.  The reply goes out
 * from the completion of the last command: the data, the write count, or
 * success; or the first error.  Write-type commands invalidate the extent
 * caches before the reply, so the caller's next lseek sees their effect.
 * A request without a FUSE reply (REQ NULL) may instead be waited for.
 */
typedef enum {
    NBDFS_REPLY_DATA,
    NBDFS_REPLY_WRITE,
    NBDFS_REPLY_NONE,
} NbdfsReplyKind;

/* A request with a buffer of BUF_SIZE bytes (zero-filled if ZEROED). */
NbdfsIo *nbdfs_io_new(NbdfsMount *m, fuse_req_t req, NbdfsReplyKind kind, size_t buf_size,
                      bool zeroed);
char *nbdfs_io_buffer(NbdfsIo *io);
/* Read into (or write from) BUF, which the caller owns, instead. */
void nbdfs_io_set_buffer(NbdfsIo *io, char *buf);
/* Free MEM (malloc'd) with the request: its data may then be written from it. */
void nbdfs_io_adopt(NbdfsIo *io, void *mem);
/*
 * DATA: reply with the LENGTH bytes of the buffer from OFFSET (default: all
 * of it).  WRITE: reply that LENGTH bytes were written.
 */
void nbdfs_io_reply_slice(NbdfsIo *io, size_t offset, size_t length);
/* Commands: each is split into requests the server accepts. */
void nbdfs_io_pread(NbdfsIo *io, size_t buf_offset, uint64_t offset, uint64_t length);
void nbdfs_io_pwrite(NbdfsIo *io, const void *data, uint64_t offset, uint64_t length,
                     uint32_t flags);
void nbdfs_io_zero(NbdfsIo *io, uint64_t offset, uint64_t length, uint32_t flags);
/* FLUSH, asked for by ISSUER (NULL: the mount itself), who gets its error in the reply. */
void nbdfs_io_flush(NbdfsIo *io, NbdfsFile *issuer);
/*
 * Fail the request with ERR (once the commands already issued complete): a
 * failure known without the server (nothing to send it on, a bad request).
 */
void nbdfs_io_fail(NbdfsIo *io, int err);
/* The server failed one of its commands with ERR (conn.c). */
void nbdfs_io_command_failed(NbdfsIo *io, int err);
/*
 * The error known without the server so far (nbdfs_io_fail: a command that
 * could not even be sent), or 0; not what the server answered, which may
 * or may not have arrived yet.
 */
int nbdfs_io_error(NbdfsIo *io);
/*
 * Its writes came from FILE (NULL: from the page cache, any writer) and
 * reserve [OFFSET, +LENGTH) of the write-behind table (already reserved by
 * the caller) until they complete.
 */
void nbdfs_io_set_writer(NbdfsIo *io, NbdfsFile *file, bool reserved, uint64_t offset,
                         uint64_t length);
/* Done issuing: the reply follows the last completion (maybe already now). */
void nbdfs_io_submit(NbdfsIo *io);
/* Done issuing a request without a FUSE reply: wait for it; 0 or its errno. */
int nbdfs_io_run(NbdfsIo *io);
/* The reference each NBD command of IO holds (conn.c). */
void nbdfs_io_ref(NbdfsIo *io);
void nbdfs_io_unref(NbdfsIo *io);

/* ---- loop.c ---- */

/*
 * Serve the FUSE session until it is unmounted, one of STOP_SIGNALS (blocked
 * in every thread) arrives, or it fails; then stop in order: sync dirty
 * pages (if still mounted), stop reading requests, let those in flight end
 * (at most --timeout), FLUSH what was written, disconnect.  The caller then
 * unmounts and destroys the session.  Returns 0, or -1 with ERROR.
 */
int nbdfs_loop_run(NbdfsFs *fs, const sigset_t *stop_signals, GError **error);
/*
 * The buffer (malloc'd by libfuse) holding the request being served, if DATA
 * points into it: the caller now owns it and frees it.  Saves copying a write.
 */
void *nbdfs_loop_take_request_buffer(const void *data);

/* ---- write-behind.c ---- */

/*
 * Writes answered before the server finished them, by range and in the
 * order they were reserved.  Waits here are on a condition variable,
 * signalled from completions: they end within the request timeout.
 */
NbdfsPending *nbdfs_pending_new(void);
void nbdfs_pending_free(NbdfsPending *p);
/* Reserve [OFFSET, +LENGTH) for a write: waits for overlapping writes and for room. */
void nbdfs_pending_begin(NbdfsMount *m, uint64_t offset, uint64_t length);
/* That write is over. */
void nbdfs_pending_end(NbdfsMount *m, uint64_t offset, uint64_t length);
/* Wait until no pending write overlaps [OFFSET, +LENGTH). */
void nbdfs_pending_wait_range(NbdfsMount *m, uint64_t offset, uint64_t length);
/* Wait until every write reserved before this call has completed. */
void nbdfs_pending_drain(NbdfsMount *m);

/* ---- open-files.c ---- */

/*
 * Write errors with the kernel's semantics: a failed write's error reaches
 * the open file description that wrote it (every one open for writing, for
 * a write-back from the page cache, whose writer is unknown), once at its
 * next fsync and once at its next close; no other description ever sees it.
 * A connection lost while writes were not yet flushed fails the next fsync
 * of every description that wrote them.
 */
NbdfsFile *nbdfs_file_open(NbdfsMount *m, bool writable);
/* The last reference from the kernel: uncollected errors are logged. */
void nbdfs_file_release(NbdfsMount *m, NbdfsFile *f);
NbdfsFile *nbdfs_file_ref(NbdfsFile *f);
void nbdfs_file_unref(NbdfsFile *f);
/*
 * A write from F (NULL: the page cache) completed with ERR (0: success);
 * REPORTED: its caller got the error already (a synchronous write).
 */
void nbdfs_files_write_done(NbdfsMount *m, NbdfsFile *f, int err, bool reported,
                            uint64_t offset, uint64_t length);
/* A FLUSH is being sent: what it will cover, to pass to nbdfs_files_flush_done. */
uint64_t nbdfs_files_flush_begin(NbdfsMount *m);
/* That FLUSH ended with ERR; its failure is already told to ISSUER (may be NULL). */
void nbdfs_files_flush_done(NbdfsMount *m, uint64_t covers, int err, NbdfsFile *issuer);
/* Were writes completed that no successful FLUSH covers? */
bool nbdfs_files_need_flush(NbdfsMount *m);
/* A connection died: unflushed writes may be lost. */
void nbdfs_files_connection_lost(NbdfsMount *m);
/* The error F's fsync (FSYNC) or close reports now, and forget it; 0 if none. */
int nbdfs_file_take_error(NbdfsMount *m, NbdfsFile *f, bool fsync);
/* At the end: log what was lost; false if any write failed or may be lost. */
bool nbdfs_files_final_report(NbdfsMount *m, GString *messages);
/* After the session: forget the files the kernel never released. */
void nbdfs_files_forget(NbdfsMount *m);

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
/* Forget every cached status (the server may have changed behind our back). */
void nbdfs_contexts_forget(NbdfsMount *m);

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
void nbdfs_export_release(NbdfsMount *m, struct fuse_file_info *fi);
void nbdfs_export_setattr(fuse_req_t req, NbdfsMount *m, struct stat *attr, int to_set);
void nbdfs_export_read(fuse_req_t req, NbdfsMount *m, size_t size, off_t off);
void nbdfs_export_write(fuse_req_t req, NbdfsMount *m, const char *buf, size_t size, off_t off,
                        struct fuse_file_info *fi);
void nbdfs_export_fsync(fuse_req_t req, NbdfsMount *m, struct fuse_file_info *fi);
void nbdfs_export_flush(fuse_req_t req, NbdfsMount *m, struct fuse_file_info *fi);
void nbdfs_export_fallocate(fuse_req_t req, NbdfsMount *m, int mode, off_t off, off_t length,
                            struct fuse_file_info *fi);
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

/* ---- control.c ---- */

/*
 * `nbdfs umount` talks to the daemon over a unix socket in the abstract
 * namespace named after the mount's device number, so it needs no file and
 * disappears with the daemon.  Only the daemon's user (or root) may connect.
 * The daemon answers each waiter, after everything is released, with its
 * final messages and "status N".
 */
bool nbdfs_control_listen(NbdfsFs *fs, const char *device, GError **error);
/* A waiter connected (control_fd readable): accept it. */
void nbdfs_control_accept(NbdfsFs *fs);
/* Tell every waiter MESSAGES (lines) and STATUS, and close. */
void nbdfs_control_finish(NbdfsFs *fs, const char *messages, int status);
/* The client: connect to the daemon of the mount on DEVICE ("MAJ:MIN"); -1 on error. */
int nbdfs_control_connect(const char *device, GError **error);
/* Wait (TIMEOUT_S at most) for the daemon's status; its messages go to MESSAGES. */
int nbdfs_control_wait(int fd, unsigned timeout_s, GString *messages, GError **error);

/* ---- mountinfo.c ---- */

/*
 * The topmost mount on MOUNTPOINT (absolute) in /proc/self/mountinfo: its
 * device ("MAJ:MIN") and file system type ("fuse.nbdfs"); false if none.
 * Reads no file of the mount, so a hung mount cannot hang it.
 */
bool nbdfs_mountinfo_find(const char *mountpoint, char **device, char **fstype);

/* ---- cmd-mount.c ---- */

/* FUSE init: tune the connection and, in the background, release the waiting parent. */
void nbdfs_session_init(void *userdata, struct fuse_conn_info *conn);

#endif /* NBDFS_MOUNT_H */
