/* stj-reaper: the first process of every job, so that a job's exit status outlives its starter.
 *
 * Usage: stj-reaper STATUS_FD REPORT_FD GO_FD PROGRAM [ARG...]
 *
 * The starter execs this (already in the job's cgroup, session and uid) with three inherited
 * descriptors: STATUS_FD, a file in the starter's private state directory; REPORT_FD, a pipe
 * back to the starter; GO_FD, a pipe from the starter. It forks, reports "pid N" on REPORT_FD
 * at once, and the child waits for one byte on GO_FD before it execs PROGRAM: the starter sends
 * it only once its durable record of the job is written. A starter that dies in between closes
 * GO_FD unwritten, the child never execs, and "unstarted" goes to STATUS_FD: a job never runs
 * without a record, so a restarted starter never has to kill (and the pool rerun) a job that
 * had already begun. Then REPORT_FD gets "ok" (exec'd) or "error ERRNO", STATUS_FD gets
 * "running", and at the end "exit N" or "signal N". A starter that was restarted meanwhile is
 * not this process's parent, so it learns the status from that file.
 *
 * Must never: leave any of the descriptors open in the job; die of a signal meant for the
 * job's process group (the job's exit status would be lost); depend on anything but libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int parse_fd(const char *s) {
    char *end = NULL;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || v < 0 || v > 65535) {
        return -1;
    }
    return (int)v;
}

static void put(int fd, const char *text) {
    size_t len = strlen(text);
    while (len > 0) {
        ssize_t n = write(fd, text, len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return;
        }
        text += n;
        len -= (size_t)n;
    }
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: stj-reaper STATUS_FD REPORT_FD GO_FD PROGRAM [ARG...]\n");
        return 126;
    }
    int status_fd = parse_fd(argv[1]);
    int report_fd = parse_fd(argv[2]);
    int go_fd = parse_fd(argv[3]);
    if (status_fd < 0 || report_fd < 0 || go_fd < 0) {
        fprintf(stderr, "stj-reaper: bad descriptor arguments\n");
        return 126;
    }
    int errpipe[2];
    if (pipe2(errpipe, O_CLOEXEC) != 0) {
        return 126;
    }
    pid_t child = fork();
    if (child < 0) {
        char line[64];
        snprintf(line, sizeof line, "error %d\n", errno);
        put(report_fd, line);
        return 126;
    }
    if (child == 0) {
        close(errpipe[0]);
        close(status_fd);
        close(report_fd);
        char go = 0;
        ssize_t n;
        do {
            n = read(go_fd, &go, 1);
        } while (n < 0 && errno == EINTR);
        close(go_fd);
        if (n != 1) {
            int never = -1; /* the starter went away before it recorded the job */
            (void)!write(errpipe[1], &never, sizeof never);
            _exit(126);
        }
        execvp(argv[4], &argv[4]);
        int e = errno;
        (void)!write(errpipe[1], &e, sizeof e);
        _exit(127);
    }
    close(errpipe[1]);
    close(go_fd);
    {
        char first[64];
        snprintf(first, sizeof first, "pid %d\n", (int)child);
        put(report_fd, first);
    }
    /* Signals aimed at the job's process group must not cost us its status; the job itself
     * got the default dispositions back at its exec. */
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGQUIT, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    int exec_errno = 0;
    ssize_t got;
    do {
        got = read(errpipe[0], &exec_errno, sizeof exec_errno);
    } while (got < 0 && errno == EINTR);
    close(errpipe[0]);
    char line[64];
    int failed = got == (ssize_t)sizeof exec_errno;
    if (failed && exec_errno == -1) {
        snprintf(line, sizeof line, "error 0\n");
    } else if (failed) {
        snprintf(line, sizeof line, "error %d\n", exec_errno);
    } else {
        snprintf(line, sizeof line, "ok\n");
        put(status_fd, "running\n");
    }
    put(report_fd, line);
    close(report_fd);
    int st = 0;
    while (waitpid(child, &st, 0) < 0) {
        if (errno != EINTR) {
            return 126;
        }
    }
    if (failed && exec_errno == -1) {
        put(status_fd, "unstarted\n");
        return 126;
    }
    if (failed) {
        snprintf(line, sizeof line, "error %d\n", exec_errno);
        put(status_fd, line);
        return 127;
    }
    if (WIFSIGNALED(st)) {
        snprintf(line, sizeof line, "signal %d\n", WTERMSIG(st));
        put(status_fd, line);
        return 128 + WTERMSIG(st);
    }
    snprintf(line, sizeof line, "exit %d\n", WEXITSTATUS(st));
    put(status_fd, line);
    return WEXITSTATUS(st);
}
