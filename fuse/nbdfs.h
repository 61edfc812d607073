/* The nbdfs command: one binary, one file per subcommand. */
#ifndef NBDFS_H
#define NBDFS_H

#include <glib.h>

/* Each subcommand's entry point: argv[0] is the subcommand's name. */
int nbdfs_cmd_serve(int argc, char **argv);
int nbdfs_cmd_mount(int argc, char **argv);
int nbdfs_cmd_info(int argc, char **argv);
int nbdfs_cmd_bitmap(int argc, char **argv);

/* Print "nbdfs SUBCOMMAND: MESSAGE" on stderr. */
void nbdfs_error(const char *subcommand, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

/*
 * Parse ARGV with ENTRIES for SUBCOMMAND (usage line PARAMS, description
 * SUMMARY); on an error prints it, naming the culprit, and returns false.
 */
gboolean nbdfs_parse_options(const char *subcommand, const char *params, const char *summary,
                             const GOptionEntry *entries, int *argc, char ***argv);

#endif /* NBDFS_H */
