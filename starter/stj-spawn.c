/* The starter's spawner for a session's sshd: clone3(CLONE_INTO_CGROUP | CLONE_PIDFD), then,
 * in the child, only raw system calls until execve.
 *
 * Why: starting sshd with subprocess and a Python preexec_fn that writes "0" into the session
 * cgroup's cgroup.procs moves the child across cgroups, which takes the kernel's
 * cgroup_threadgroup_rwsem for writing and waits for an RCU grace period (5 to 40 ms, the
 * largest share of a session's set-up on the execute side). clone3 with CLONE_INTO_CGROUP
 * (Linux 5.7) starts the child in the target cgroup: there is no move, and the child is never
 * counted in the starter's cgroup, not even for an instruction.
 *
 * On x86-64 the child shares the starter's memory until it execs (CLONE_VM | CLONE_VFORK, on a
 * stack of its own, as glibc's posix_spawn does): copying the page tables of a 40 MB Python
 * process for a child that execs at once costs several milliseconds, often ten. Elsewhere the
 * child is a copy (no CLONE_VM). Either way it is made by a raw system call: glibc's fork
 * handlers do not run, so glibc in the child still believes the starter's other threads exist.
 * Anything that would act on "all threads" (glibc's setuid family, which signals each thread to
 * switch it too) or take a lock (malloc, stdio) is off limits; the child uses raw system calls
 * for the id switch, writes only to its own stack (and errno), and reads only memory the
 * parent prepared before the clone. All signals are blocked around the clone, so no handler
 * of the starter's (Python's, which would write to shared memory) runs in the child.
 *
 * Must never: return into Python in the child; exec with the starter's ids, signal mask or
 * descriptors; leave a child unreaped when it reports a failure.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif
#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif

#define STJ_EXPORT __attribute__((visibility("default")))

/* Where the child failed: the parent turns it into an OSError naming the step. */
enum { STAGE_FDS = 1, STAGE_SIGNALS, STAGE_SETSID, STAGE_IDS, STAGE_CHDIR, STAGE_EXEC };

#define MAX_KEEP 16

struct report {
    int32_t stage;
    int32_t err;
};

static void fail(int pipe_w, int stage) {
    struct report r = {stage, errno};
    ssize_t n;
    do {
        n = write(pipe_w, &r, sizeof r);
    } while (n < 0 && errno == EINTR);
    _exit(127);
}

/* Close every descriptor from `lo` up, except the sorted `keep` ones. */
static int close_others(const int *keep, int nkeep, int lo) {
    for (int i = 0; i <= nkeep; i++) {
        unsigned int hi = i < nkeep ? (unsigned int)keep[i] - 1 : ~0U;
        if (i < nkeep && keep[i] < lo)
            continue;
        if ((unsigned int)lo <= hi && syscall(SYS_close_range, lo, hi, 0) < 0) {
            if (errno != ENOSYS)
                return -1;
            /* Before Linux 5.9: a bounded loop is async-signal-safe too. */
            long max = sysconf(_SC_OPEN_MAX);
            unsigned int top = hi < (unsigned long)max ? hi : (unsigned int)max;
            for (unsigned int fd = lo; fd <= top && fd < (unsigned int)max; fd++)
                close((int)fd);
        }
        if (i < nkeep)
            lo = keep[i] + 1;
    }
    return 0;
}

struct plan {
    const char *path;
    char *const *argv;
    char *const *envp;
    const int *std;
    const int *keep;
    int nkeep;
    int change_ids;
    uid_t uid;
    gid_t gid;
    const gid_t *groups;
    int ngroups;
    int pipe_w;
};

static void child(const char *path, char *const argv[], char *const envp[], const int std[3],
                  const int *keep_in, int nkeep, int change_ids, uid_t uid, gid_t gid,
                  const gid_t *groups, int ngroups, int pipe_w) {
    int src[3] = {std[0], std[1], std[2]};
    int keep[MAX_KEEP + 1];
    int n = 0;

    /* A source below 3 that is not already in place could be overwritten by an earlier dup2:
     * move it out of the way first. */
    for (int i = 0; i < 3; i++) {
        if (src[i] < 3 && src[i] != i) {
            src[i] = fcntl(src[i], F_DUPFD_CLOEXEC, 3);
            if (src[i] < 0)
                fail(pipe_w, STAGE_FDS);
        }
    }
    for (int i = 0; i < 3; i++) {
        if (src[i] == i) {
            if (fcntl(i, F_SETFD, 0) < 0)
                fail(pipe_w, STAGE_FDS);
        } else if (dup2(src[i], i) < 0) {
            fail(pipe_w, STAGE_FDS);
        }
    }
    /* The kept descriptors plus the report pipe (close-on-exec), sorted, for close_others. */
    for (int i = 0; i < nkeep; i++) {
        if (fcntl(keep_in[i], F_SETFD, 0) < 0)
            fail(pipe_w, STAGE_FDS);
        keep[n++] = keep_in[i];
    }
    keep[n++] = pipe_w;
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && keep[j - 1] > keep[j]; j--) {
            int t = keep[j];
            keep[j] = keep[j - 1];
            keep[j - 1] = t;
        }
    if (close_others(keep, n, 3) < 0)
        fail(pipe_w, STAGE_FDS);

    /* Handlers are reset by execve, ignored signals are not: sshd must start with the
     * defaults and an empty mask, whatever the starter set. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP)
            sigaction(sig, &dfl, NULL); /* EINVAL for glibc's internal ones: ignored */
    }
    sigset_t none;
    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, NULL) < 0)
        fail(pipe_w, STAGE_SIGNALS);

    if (setsid() < 0)
        fail(pipe_w, STAGE_SETSID);

    if (change_ids) {
        /* Raw calls: glibc's wrappers would try to switch threads this child does not have. */
        if (syscall(SYS_setgroups, (size_t)ngroups, groups) < 0 ||
            syscall(SYS_setresgid, gid, gid, gid) < 0 || syscall(SYS_setresuid, uid, uid, uid) < 0)
            fail(pipe_w, STAGE_IDS);
    }
    /* Belt and braces: the switch must have stuck. A starter that is not root runs jobs as
     * itself only (its gid stays its own, as with the fork path). */
    uid_t ru, eu, su;
    gid_t rg, eg, sg;
    if (syscall(SYS_getresuid, &ru, &eu, &su) < 0 || syscall(SYS_getresgid, &rg, &eg, &sg) < 0 ||
        ru != uid || eu != uid || su != uid ||
        (change_ids && (rg != gid || eg != gid || sg != gid))) {
        struct report r = {STAGE_IDS, EPERM};
        ssize_t w = write(pipe_w, &r, sizeof r);
        (void)w;
        _exit(126);
    }

    if (chdir("/") < 0)
        fail(pipe_w, STAGE_CHDIR);
    execve(path, argv, envp);
    fail(pipe_w, STAGE_EXEC);
}

static int child_main(void *arg) {
    const struct plan *p = arg;
    child(p->path, p->argv, p->envp, p->std, p->keep, p->nkeep, p->change_ids, p->uid, p->gid,
          p->groups, p->ngroups, p->pipe_w);
    return 127; /* not reached: child() execs or exits */
}

#if defined(__x86_64__)
#define STJ_CLONE_VM 1
#define STACK_SIZE (64 * 1024)

/* clone3 with the child on `args->stack`: it must not return into the caller's frames (they are
 * the parent's, and so is the memory), so it calls fn(arg) from here and exits with its value.
 * Returns the child's pid, or -errno. */
static long clone3_run(struct clone_args *args, int (*fn)(void *), void *arg) {
    long ret;
    register int (*r12)(void *) __asm__("r12") = fn;
    register void *r13 __asm__("r13") = arg;
    __asm__ volatile("syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     /* the child, on its own 16-byte aligned stack */
                     "xor %%ebp, %%ebp\n\t"
                     "mov %%r13, %%rdi\n\t"
                     "call *%%r12\n\t"
                     "mov %%eax, %%edi\n\t"
                     "mov %[exit], %%eax\n\t"
                     "syscall\n\t"
                     "hlt\n"
                     "1:"
                     : "=a"(ret)
                     : "a"((long)SYS_clone3), "D"(args), "S"(sizeof *args), "r"(r12), "r"(r13),
                       [exit] "i"(SYS_exit)
                     : "rcx", "r11", "memory");
    return ret;
}
#endif

/* Start `path` in the cgroup `cgroup_fd` (a directory descriptor) with fds 0-2 from `std`, the
 * `keep` descriptors (each >= 3) left open at their numbers, everything else closed.
 *
 * Returns the child's pid (its pidfd in *pidfd) once it has exec'ed. On failure returns -1 with
 * *err the errno and *stage 0 if clone3 itself failed (no child: the caller may fall back),
 * else the step the child failed at (the child is reaped). */
STJ_EXPORT int stj_spawn(const char *path, char *const argv[], char *const envp[], int cgroup_fd,
                         const int std[3], const int *keep, int nkeep, int change_ids,
                         unsigned int uid, unsigned int gid, const unsigned int *groups,
                         int ngroups, int *pidfd, int *err, int *stage) {
    int pipefd[2];
    sigset_t all, old;
    struct clone_args args;
    long pid;
    int clone_errno = 0;

    *stage = 0;
    *err = 0;
    *pidfd = -1;
    if (nkeep < 0 || nkeep > MAX_KEEP || ngroups < 0) {
        *err = EINVAL;
        return -1;
    }
    for (int i = 0; i < nkeep; i++) {
        if (keep[i] < 3) {
            *err = EBADF;
            return -1;
        }
    }
    if (pipe2(pipefd, O_CLOEXEC) < 0) {
        *err = errno;
        return -1;
    }
    memset(&args, 0, sizeof args);
    args.flags = CLONE_PIDFD | CLONE_INTO_CGROUP;
    args.pidfd = (uint64_t)(uintptr_t)pidfd;
    args.exit_signal = SIGCHLD;
    args.cgroup = (uint64_t)cgroup_fd;

    struct plan plan = {path, argv, envp, std, keep, nkeep, change_ids, (uid_t)uid, (gid_t)gid,
                        (const gid_t *)groups, ngroups, pipefd[1]};
#ifdef STJ_CLONE_VM
    void *stack = mmap(NULL, STACK_SIZE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) {
        *err = errno;
        close(pipefd[0]);
        close(pipefd[1]);
        return -1;
    }
    args.flags |= CLONE_VM | CLONE_VFORK;
    args.stack = (uint64_t)(uintptr_t)stack;
    args.stack_size = STACK_SIZE;
#endif

    /* No signal handler of the starter's may run in the child before it resets them (Python's
     * would write to the starter's wakeup descriptor, and to its memory). */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
#ifdef STJ_CLONE_VM
    /* The child's id switch marks the memory it shares with us non-dumpable (that is what
     * keeps the job's processes out of it until the exec): give the starter its own back. */
    int dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
    /* Returns once the child has exec'ed or exited (CLONE_VFORK). */
    pid = clone3_run(&args, child_main, &plan);
    if (pid < 0) {
        clone_errno = (int)-pid;
        pid = -1;
    }
    if (dumpable > 0 && prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != dumpable)
        prctl(PR_SET_DUMPABLE, dumpable, 0, 0, 0);
    munmap(stack, STACK_SIZE);
#else
    pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid == 0)
        child_main(&plan);
    clone_errno = errno;
#endif
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(pipefd[1]);
    if (pid < 0) {
        close(pipefd[0]);
        *err = clone_errno;
        return -1;
    }

    /* EOF: the child exec'ed (the pipe was close-on-exec). A report: it failed and exits. */
    struct report r;
    ssize_t got;
    do {
        got = read(pipefd[0], &r, sizeof r);
    } while (got < 0 && errno == EINTR);
    close(pipefd[0]);
    if (got == 0)
        return (int)pid;
    if (got == (ssize_t)sizeof r) {
        *stage = r.stage;
        *err = r.err;
    } else {
        *stage = STAGE_EXEC;
        *err = got < 0 ? errno : EIO;
    }
    int status;
    while (waitpid((pid_t)pid, &status, 0) < 0 && errno == EINTR) {
    }
    close(*pidfd);
    *pidfd = -1;
    return -1;
}
