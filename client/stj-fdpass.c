/*
 * stj-fdpass: ssh-to-job's ProxyCommand helper (ProxyUseFdpass yes).
 *
 * ssh runs it with the name of ssh-to-job's one-shot abstract unix socket. It receives the
 * already verified session socket from ssh-to-job (SCM_RIGHTS), passes it to ssh on its
 * stdout (SCM_RIGHTS again) and exits: ssh then talks to sshd over that socket directly.
 *
 * It is C only because it runs once per session on the critical path: a Python helper costs
 * ~20 ms of interpreter start-up, this one well under 1 ms. It never reads or writes a byte of
 * the session itself. client/_fdproxy.py is the same helper in Python, used when this binary
 * is missing.
 */
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

/* Whether the ssh that ran us is gone (its end of our stdout closed): ssh-to-job stops an ssh
 * it started ahead of a session that then failed, and nobody is left to tell. */
static int ssh_gone(void)
{
    struct pollfd p = {.fd = STDOUT_FILENO, .events = POLLOUT};
    return poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR | POLLNVAL));
}

static int fail(const char *what)
{
    int saved = errno;
    if (!ssh_gone())
        fprintf(stderr, "ssh-to-job proxy: %s: %s\n", what, strerror(saved));
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fputs("ssh-to-job proxy: expected one argument\n", stderr);
        return 2;
    }
    size_t len = strlen(argv[1]);
    struct sockaddr_un addr;
    if (len == 0 || len + 1 > sizeof addr.sun_path) {
        fputs("ssh-to-job proxy: socket name too long\n", stderr);
        return 2;
    }
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    /* Abstract namespace: a leading NUL, then the name, no terminator. */
    memcpy(addr.sun_path + 1, argv[1], len);
    socklen_t addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len);

    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return fail("socket");
    struct timeval tv = {.tv_sec = 30, .tv_usec = 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(s, (struct sockaddr *)&addr, addrlen) < 0)
        return fail("could not reach ssh-to-job");

    char byte;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    if (recvmsg(s, &msg, MSG_CMSG_CLOEXEC) < 0)
        return fail("could not get the session socket");
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (c == NULL || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
        c->cmsg_len != CMSG_LEN(sizeof(int))) {
        if (!ssh_gone())
            fputs("ssh-to-job proxy: ssh-to-job sent no socket\n", stderr);
        return 1;
    }
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);

    /* Hand it to ssh: stdout is the socketpair ssh made for ProxyUseFdpass. */
    byte = '\0';
    memset(&msg, 0, sizeof msg);
    memset(&control, 0, sizeof control);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (sendmsg(STDOUT_FILENO, &msg, 0) < 0)
        return fail("could not pass the socket to ssh");
    return 0;
}
