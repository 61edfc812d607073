/* Going to the background once ready, for 'nbdfs serve --fork' and 'nbdfs mount'. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "nbdfs.h"

int nbdfs_daemonize(const char *subcommand)
{
    int pipefd[2];
    pid_t pid;
    char c;

    if (pipe2(pipefd, O_CLOEXEC) < 0) {
        nbdfs_error(subcommand, "pipe: %s", g_strerror(errno));
        exit(1);
    }
    pid = fork();
    if (pid < 0) {
        nbdfs_error(subcommand, "fork: %s", g_strerror(errno));
        exit(1);
    }
    if (pid > 0) {
        ssize_t r;
        close(pipefd[1]);
        /* One byte means ready; EOF means the child failed (it said why). */
        do {
            r = read(pipefd[0], &c, 1);
        } while (r < 0 && errno == EINTR);
        if (r == 1) {
            exit(0);
        }
        waitpid(pid, NULL, 0);     /* whatever it set up is gone when it exits */
        exit(1);
    }
    close(pipefd[0]);
    setsid();
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        close(null);
    }
    return pipefd[1];
}

bool nbdfs_daemon_ready(int *ready_fd, bool keep_stderr)
{
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    bool ok;

    /* Detached for good: the caller's pipes must not wait for us. */
    if (null >= 0) {
        dup2(null, STDOUT_FILENO);
        if (!keep_stderr) {
            dup2(null, STDERR_FILENO);
        }
        close(null);
    }
    ok = write(*ready_fd, "", 1) == 1;
    close(*ready_fd);
    *ready_fd = -1;
    return ok;
}
