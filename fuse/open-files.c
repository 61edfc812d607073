/*
 * Open files of the export, their write errors and what is durable.
 *
 * Writes are answered before the server has them (write-behind.c), so a
 * failure comes later, and must reach the program that wrote: the kernel's
 * rules for write-back errors, applied per open file description.
 *
 *   - A failed write from description F (FUSE tells which) is reported once
 *     by F's next fsync and once by F's next close (flush), and never to any
 *     other description.  Close reporting does not consume it for fsync: a
 *     forked child closing F's descriptor must not hide it from F's fsync.
 *   - A write-back from the page cache (mmap) has no known writer: its
 *     failure goes to every description open for writing.
 *   - Durability: writes completed are numbered; a successful FLUSH covers
 *     every write completed before it was sent (on any connection: FLUSH
 *     is only relied on across connections with multi-conn).  A connection
 *     that dies while completed writes are not covered may have lost them:
 *     every description that made them gets EIO at its next fsync.
 *   - A failure nobody can be told about any more (the writers closed) is
 *     logged, and every failure makes the daemon's exit status non-zero.
 *
 * files_lock is a leaf lock.
 */
#include "mount.h"

#include <errno.h>

struct NbdfsFile {
    gint refs;
    bool writable;
    bool released;
    int fsync_error;               /* reported by the next fsync */
    int flush_error;               /* reported by the next close */
    uint64_t last_write;           /* seq of its last completed write (0: none) */
    GList link;                    /* in m->files while open */
};

NbdfsFile *nbdfs_file_open(NbdfsMount *m, bool writable)
{
    NbdfsFile *f = g_new0(NbdfsFile, 1);

    f->refs = 1;
    f->writable = writable;
    f->link.data = f;
    g_mutex_lock(&m->files_lock);
    g_queue_push_tail_link(&m->files, &f->link);
    g_mutex_unlock(&m->files_lock);
    return f;
}

NbdfsFile *nbdfs_file_ref(NbdfsFile *f)
{
    g_atomic_int_inc(&f->refs);
    return f;
}

void nbdfs_file_unref(NbdfsFile *f)
{
    if (f && g_atomic_int_dec_and_test(&f->refs)) {
        g_free(f);
    }
}

void nbdfs_file_release(NbdfsMount *m, NbdfsFile *f)
{
    g_mutex_lock(&m->files_lock);
    g_queue_unlink(&m->files, &f->link);
    f->released = true;
    if (f->flush_error) {
        /* Neither fsync nor close reported it. */
        m->unreported_failures++;
        g_warning("a failed write (%s) was never reported: its file was released first",
                  g_strerror(f->flush_error));
    }
    g_mutex_unlock(&m->files_lock);
    nbdfs_file_unref(f);
}

static void set_error(NbdfsFile *f, int err)
{
    if (!f->writable) {
        return;                    /* it cannot have written anything */
    }
    if (!f->fsync_error) {
        f->fsync_error = err;
    }
    if (!f->flush_error) {
        f->flush_error = err;
    }
}

static bool any_writer_locked(NbdfsMount *m)
{
    for (GList *l = m->files.head; l; l = l->next) {
        if (((NbdfsFile *)l->data)->writable) {
            return true;
        }
    }
    return false;
}

void nbdfs_files_write_done(NbdfsMount *m, NbdfsFile *f, int err, bool reported,
                            uint64_t offset, uint64_t length)
{
    g_mutex_lock(&m->files_lock);
    if (!err) {
        uint64_t seq = ++m->write_seq;
        if (!m->can_flush) {
            m->flushed_seq = seq;  /* no FLUSH: durable once answered */
        }
        if (f) {
            f->last_write = seq;
        } else {
            for (GList *l = m->files.head; l; l = l->next) {
                NbdfsFile *w = l->data;
                if (w->writable) {
                    w->last_write = seq;
                }
            }
        }
        g_mutex_unlock(&m->files_lock);
        return;
    }

    m->write_failures++;
    if (reported) {
        g_mutex_unlock(&m->files_lock);
        return;
    }
    if (f && !f->released) {
        set_error(f, nbdfs_errno(err));
    } else if (!f && any_writer_locked(m)) {
        for (GList *l = m->files.head; l; l = l->next) {
            set_error(l->data, nbdfs_errno(err));
        }
    } else {
        m->unreported_failures++;
        g_warning("write of %" G_GUINT64_FORMAT " bytes at %" G_GUINT64_FORMAT
                  " failed (%s), and no open file is left to report it to", length, offset,
                  g_strerror(err));
        g_mutex_unlock(&m->files_lock);
        return;
    }
    g_mutex_unlock(&m->files_lock);
    g_warning("write of %" G_GUINT64_FORMAT " bytes at %" G_GUINT64_FORMAT " failed: %s",
              length, offset, g_strerror(err));
}

uint64_t nbdfs_files_flush_begin(NbdfsMount *m)
{
    uint64_t covers;

    g_mutex_lock(&m->files_lock);
    covers = m->write_seq;
    g_mutex_unlock(&m->files_lock);
    return covers;
}

void nbdfs_files_flush_done(NbdfsMount *m, uint64_t covers, int err, NbdfsFile *issuer)
{
    g_mutex_lock(&m->files_lock);
    if (!err) {
        m->flushed_seq = MAX(m->flushed_seq, covers);
    } else {
        /* What the FLUSH should have made durable may not be: tell its writers. */
        for (GList *l = m->files.head; l; l = l->next) {
            NbdfsFile *f = l->data;
            if (f != issuer && f->last_write > m->flushed_seq && f->last_write <= covers) {
                set_error(f, EIO);
            }
        }
    }
    g_mutex_unlock(&m->files_lock);
    if (err) {
        g_warning("FLUSH failed: %s", g_strerror(err));
    }
}

bool nbdfs_files_need_flush(NbdfsMount *m)
{
    bool need;

    g_mutex_lock(&m->files_lock);
    need = m->write_seq > m->flushed_seq;
    g_mutex_unlock(&m->files_lock);
    return need;
}

void nbdfs_files_connection_lost(NbdfsMount *m)
{
    bool lost;

    g_mutex_lock(&m->files_lock);
    lost = m->write_seq > m->flushed_seq;
    if (lost) {
        for (GList *l = m->files.head; l; l = l->next) {
            NbdfsFile *f = l->data;
            if (f->last_write > m->flushed_seq && !f->fsync_error) {
                f->fsync_error = EIO;
            }
        }
        m->lost_unflushed++;
        /* They are gone or not: nothing covers them any more. */
        m->flushed_seq = m->write_seq;
    }
    g_mutex_unlock(&m->files_lock);
    if (lost) {
        g_warning("writes not yet flushed may be lost with the connection: "
                  "the next fsync of the files that made them fails");
    }
}

int nbdfs_file_take_error(NbdfsMount *m, NbdfsFile *f, bool fsync)
{
    int err;

    g_mutex_lock(&m->files_lock);
    if (fsync) {
        err = f->fsync_error ? f->fsync_error : f->flush_error;
        f->fsync_error = f->flush_error = 0;
    } else {
        err = f->flush_error;
        f->flush_error = 0;
    }
    g_mutex_unlock(&m->files_lock);
    return err;
}

void nbdfs_files_forget(NbdfsMount *m)
{
    NbdfsFile *f;

    while ((f = g_queue_peek_head(&m->files))) {
        g_queue_unlink(&m->files, &f->link);
        f->released = true;
        nbdfs_file_unref(f);
    }
}

bool nbdfs_files_final_report(NbdfsMount *m, GString *messages)
{
    bool ok;

    g_mutex_lock(&m->files_lock);
    /* Files the kernel never released (unmounted first) keep errors nobody saw. */
    for (GList *l = m->files.head; l; l = l->next) {
        if (((NbdfsFile *)l->data)->flush_error) {
            m->unreported_failures++;
        }
    }
    ok = m->write_failures == 0 && m->lost_unflushed == 0;
    if (m->write_failures) {
        g_string_append_printf(messages, "%u write(s) failed", m->write_failures);
        if (m->unreported_failures) {
            g_string_append_printf(messages, ", %u of them never reported to a program",
                                   m->unreported_failures);
        }
        g_string_append(messages, "\n");
    }
    if (m->lost_unflushed) {
        g_string_append_printf(messages, "the connection was lost %u time(s) with writes "
                               "not yet flushed: they may be lost\n", m->lost_unflushed);
    }
    g_mutex_unlock(&m->files_lock);
    return ok;
}
