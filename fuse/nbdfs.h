/* The nbdfs command: one binary, one file per subcommand. */
#ifndef NBDFS_H
#define NBDFS_H

#include <stdbool.h>

#include <stdio.h>

#include <glib.h>

/* Each subcommand's entry point: argv[0] is the subcommand's name. */
int nbdfs_cmd_serve(int argc, char **argv);
int nbdfs_cmd_mount(int argc, char **argv);
/* The libfuse nbdfs runs with, and what it lets the mount do ("libfuse 3.18.3, ..."). */
char *nbdfs_mount_fuse_version(void);
int nbdfs_cmd_umount(int argc, char **argv);
int nbdfs_cmd_info(int argc, char **argv);
int nbdfs_cmd_bitmap(int argc, char **argv);
int nbdfs_cmd_backup(int argc, char **argv);

/* From now on log messages go to syslog (a daemon whose stderr is gone). */
void nbdfs_log_use_syslog(void);
bool nbdfs_log_to_syslog(void);

/* mount-helper.c: was nbdfs run as a mount helper (mount.nbdfs, or by mount.fuse3)? */
bool nbdfs_is_mount_helper(int argc, char **argv);
/* Mount as mount(8) asks: SOURCE MOUNTPOINT [-o OPTIONS]. */
int nbdfs_mount_helper(int argc, char **argv);
bool nbdfs_is_subcommand(const char *name);

/* Print "nbdfs SUBCOMMAND: MESSAGE" on stderr. */
void nbdfs_error(const char *subcommand, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

/*
 * Parse ARGV with ENTRIES for SUBCOMMAND (usage line PARAMS, description
 * SUMMARY); on an error prints it, naming the culprit, and returns false.
 */
gboolean nbdfs_parse_options(const char *subcommand, const char *params, const char *summary,
                             const GOptionEntry *entries, int *argc, char ***argv);

/*
 * Take "[ CMD ARGS... ]" (a server to start, as libnbd's tools write it) out
 * of ARGV into *COMMAND (NULL if none); ARGV closes up.  FALSE, said, when
 * the brackets are wrong.
 */
gboolean nbdfs_split_command(const char *subcommand, int *argc, char **argv, char ***command);

/*
 * The subcommand ARGV[1] of GROUP ("bitmap", "backup") in TABLE: N structs
 * of STRIDE bytes, each starting with its name (const char *).  Returns -1
 * with *WHICH set when found; otherwise the exit status, having printed
 * USAGE (no subcommand, --help) or an error.
 */
int nbdfs_pick_subcommand(const char *group, int argc, char **argv, const void *table,
                          size_t n, size_t stride, void (*usage)(FILE *out), size_t *which);

/* Append S as a JSON string (UTF-8 passes through; quotes and controls escaped). */
void nbdfs_json_string(GString *out, const char *s);

/* "65536", "64K", "64KiB", "256M", "1G" -> bytes, at most MAX; FALSE if not a size. */
gboolean nbdfs_parse_size(const char *s, guint64 max, guint64 *out);

/* --format FMT: only "raw" (or none: detect, and refuse other formats). */
gboolean nbdfs_check_format(const char *subcommand, const char *format);

/*
 * Fork; the parent exits once the child calls nbdfs_daemon_ready() (0) or
 * dies (1).  Returns the child's end of the ready pipe.  Call before any
 * thread starts.
 */
int nbdfs_daemonize(const char *subcommand);
/* Tell the waiting parent we are ready; stdout (and stderr unless KEEP_STDERR) go away. */
bool nbdfs_daemon_ready(int *ready_fd, bool keep_stderr);

#endif /* NBDFS_H */
