/*
 * libstjshim.so: the ssh-to-job LD_PRELOAD shim.
 *
 * The starter runs `/usr/sbin/sshd -i -e -f cfg` as the job's uid with LD_PRELOAD pointing at
 * this library. Batch jobs often run as uids that have no passwd entry, a nologin shell or no
 * home directory; sshd then refuses the login ("Invalid user") or runs every command through
 * nologin. This library answers getpwnam()/getpwuid() (and the _r variants) for the uid the
 * process runs as, with an entry the starter hands it at start-up, and can hide the "tty"
 * group so that a non-root sshd does not try to chown its pty to gid 5.
 *
 * Protocol (docs/shim.md has the full text):
 *   SSH_TO_JOB_SHIM_FD unset   -> every lookup passes through to libc; nothing else happens.
 *   SSH_TO_JOB_SHIM_FD=<n>     -> n must be an open socket (n >= 3). The constructor reads
 *                                 "key=value\n" lines up to a line "end\n" (16 KiB at most),
 *                                 validates them, writes "ok <pid>\n" (or "err <msg>\n" and
 *                                 exits 126), then waits for one byte: "g" lets the program
 *                                 start (after closing n and removing SSH_TO_JOB_SHIM_FD and
 *                                 LD_PRELOAD from the environment); anything else, or EOF,
 *                                 exits 126.
 *
 * Depends on libc only (dlsym is in libc since glibc 2.34), exports only the six interposed
 * functions (see stjshim.map), and loads under LD_BIND_NOW=1.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define STJ_EXPORT __attribute__((visibility("default")))

#define STJ_ENV_FD "SSH_TO_JOB_SHIM_FD"
#define STJ_CFG_MAX 16384
#define STJ_EXIT 126

/* ------------------------------------------------------------------------------------------ */
/* Configuration: written once by the constructor, before main(), then only read.             */

static int cfg_active;    /* 1 once a configuration was accepted */
static uid_t cfg_uid;
static gid_t cfg_gid;
static int cfg_hide_tty;
static char *cfg_name;
static char *cfg_home;
static char *cfg_shell;
static char *cfg_gecos;
static char cfg_buf[STJ_CFG_MAX + 1];
static char cfg_passwd_field[] = "x";
static struct passwd cfg_pw; /* returned by getpwnam()/getpwuid(), like libc's static entry */

/* ------------------------------------------------------------------------------------------ */
/* The real libc functions, resolved lazily with dlsym(RTLD_NEXT).                             */

typedef struct passwd *(*getpwnam_fn)(const char *);
typedef struct passwd *(*getpwuid_fn)(uid_t);
typedef int (*getpwnam_r_fn)(const char *, struct passwd *, char *, size_t, struct passwd **);
typedef int (*getpwuid_r_fn)(uid_t, struct passwd *, char *, size_t, struct passwd **);
typedef struct group *(*getgrnam_fn)(const char *);
typedef int (*getgrnam_r_fn)(const char *, struct group *, char *, size_t, struct group **);

enum { R_GETPWNAM, R_GETPWUID, R_GETPWNAM_R, R_GETPWUID_R, R_GETGRNAM, R_GETGRNAM_R, R_COUNT };

static const char *const real_names[R_COUNT] = {
    "getpwnam", "getpwuid", "getpwnam_r", "getpwuid_r", "getgrnam", "getgrnam_r",
};
/* A generic function pointer type: ISO C allows casting it to any other function type. */
typedef void (*any_fn)(void);
static any_fn real_fns[R_COUNT];

/* Racing threads may both call dlsym; they store the same pointer, so that is harmless. */
static any_fn real(int which)
{
    any_fn fn = __atomic_load_n(&real_fns[which], __ATOMIC_ACQUIRE);
    if (fn == NULL) {
        void *sym = dlsym(RTLD_NEXT, real_names[which]);
        memcpy(&fn, &sym, sizeof fn); /* POSIX: a data pointer from dlsym holds a function */
        if (fn != NULL)
            __atomic_store_n(&real_fns[which], fn, __ATOMIC_RELEASE);
    }
    return fn;
}

/* ------------------------------------------------------------------------------------------ */
/* Small I/O helpers (no stdio: the constructor runs before main and must stay simple).       */

static void write_all(int fd, const char *s, size_t n, int is_socket)
{
    while (n > 0) {
        ssize_t w = is_socket ? send(fd, s, n, MSG_NOSIGNAL) : write(fd, s, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        s += w;
        n -= (size_t)w;
    }
}

/* Append src to dst (capacity cap, always NUL-terminated), replacing unprintable bytes. */
static void append(char *dst, size_t cap, const char *src)
{
    size_t len = strlen(dst);
    for (; *src != '\0' && len + 1 < cap; src++, len++) {
        unsigned char c = (unsigned char)*src;
        dst[len] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    dst[len] = '\0';
}

static void append_uint(char *dst, size_t cap, unsigned long v)
{
    char digits[24];
    size_t i = sizeof digits - 1;
    digits[i] = '\0';
    do {
        digits[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0 && i > 0);
    append(dst, cap, &digits[i]);
}

/* A configuration error: tell the starter on the socket, then exit. */
__attribute__((noreturn)) static void refuse(int fd, const char *msg, const char *detail)
{
    char line[512] = "err ";
    append(line, sizeof line - 1, msg);
    if (detail != NULL) {
        append(line, sizeof line - 1, ": ");
        append(line, sizeof line - 1, detail);
    }
    size_t n = strlen(line);
    line[n++] = '\n';
    write_all(fd, line, n, 1);
    _exit(STJ_EXIT);
}

/* The environment variable itself is bad: there is no channel, so say it on stderr. */
__attribute__((noreturn)) static void refuse_env(const char *value, const char *why)
{
    char line[256] = "stjshim: " STJ_ENV_FD "=";
    append(line, sizeof line - 1, value);
    append(line, sizeof line - 1, ": ");
    append(line, sizeof line - 1, why);
    size_t n = strlen(line);
    line[n++] = '\n';
    write_all(2, line, n, 0);
    _exit(STJ_EXIT);
}

/* ------------------------------------------------------------------------------------------ */
/* Parsing and validation.                                                                     */

/* Decimal, no sign, at most max. Returns 0 on success. */
static int parse_uint(const char *s, unsigned long max, unsigned long *out)
{
    unsigned long v = 0;
    if (*s == '\0')
        return -1;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        unsigned long d = (unsigned long)(*s - '0');
        if (v > (max - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

static int is_absolute_path(const char *s)
{
    return s[0] == '/' && strchr(s, ':') == NULL;
}

/* Read from fd until a line "end\n"; return the length of the text before that line. */
static size_t read_config(int fd)
{
    size_t len = 0;  /* bytes in cfg_buf */
    size_t line = 0; /* start of the first line not yet checked */
    for (;;) {
        if (len == STJ_CFG_MAX)
            refuse(fd, "configuration larger than 16384 bytes", NULL);
        ssize_t r = read(fd, cfg_buf + len, STJ_CFG_MAX - len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            refuse(fd, "cannot read the configuration", strerror(errno));
        }
        if (r == 0)
            refuse(fd, "configuration ended before the line 'end'", NULL);
        len += (size_t)r;
        for (;;) {
            char *nl = memchr(cfg_buf + line, '\n', len - line);
            if (nl == NULL)
                break;
            size_t end = (size_t)(nl - cfg_buf);
            if (end - line == 3 && memcmp(cfg_buf + line, "end", 3) == 0) {
                if (end + 1 != len)
                    refuse(fd, "data after the line 'end'", NULL);
                return line;
            }
            line = end + 1;
        }
    }
}

static void parse_config(int fd, size_t len)
{
    int seen_uid = 0, seen_gid = 0, seen_hide = 0;
    unsigned long v;

    if (memchr(cfg_buf, '\0', len) != NULL)
        refuse(fd, "configuration contains a NUL byte", NULL);
    cfg_buf[len] = '\0';

    char *p = cfg_buf;
    while (*p != '\0') {
        char *nl = strchr(p, '\n'); /* every line before "end" ends with '\n' */
        *nl = '\0';
        char *eq = strchr(p, '=');
        if (eq == NULL)
            refuse(fd, "line without '='", p);
        *eq = '\0';
        char *key = p;
        char *val = eq + 1;
        p = nl + 1;

        if (strcmp(key, "uid") == 0) {
            if (seen_uid++)
                refuse(fd, "duplicate key", key);
            if (parse_uint(val, (unsigned long)(uid_t)-1 - 1, &v) != 0)
                refuse(fd, "uid is not a valid uid", val);
            cfg_uid = (uid_t)v;
        } else if (strcmp(key, "gid") == 0) {
            if (seen_gid++)
                refuse(fd, "duplicate key", key);
            if (parse_uint(val, (unsigned long)(gid_t)-1 - 1, &v) != 0)
                refuse(fd, "gid is not a valid gid", val);
            cfg_gid = (gid_t)v;
        } else if (strcmp(key, "hide_tty_group") == 0) {
            if (seen_hide++)
                refuse(fd, "duplicate key", key);
            if (strcmp(val, "1") == 0)
                cfg_hide_tty = 1;
            else if (strcmp(val, "0") == 0)
                cfg_hide_tty = 0;
            else
                refuse(fd, "hide_tty_group must be 1 or 0", val);
        } else {
            char **slot;
            if (strcmp(key, "name") == 0)
                slot = &cfg_name;
            else if (strcmp(key, "home") == 0)
                slot = &cfg_home;
            else if (strcmp(key, "shell") == 0)
                slot = &cfg_shell;
            else if (strcmp(key, "gecos") == 0)
                slot = &cfg_gecos;
            else
                refuse(fd, "unknown key", key);
            if (*slot != NULL)
                refuse(fd, "duplicate key", key);
            *slot = val;
        }
    }

    if (!seen_uid)
        refuse(fd, "missing key", "uid");
    if (!seen_gid)
        refuse(fd, "missing key", "gid");
    if (!seen_hide)
        refuse(fd, "missing key", "hide_tty_group");
    if (cfg_name == NULL)
        refuse(fd, "missing key", "name");
    if (cfg_home == NULL)
        refuse(fd, "missing key", "home");
    if (cfg_shell == NULL)
        refuse(fd, "missing key", "shell");

    if (cfg_uid != getuid() || cfg_uid != geteuid()) {
        char detail[96] = "configured ";
        append_uint(detail, sizeof detail, (unsigned long)cfg_uid);
        append(detail, sizeof detail, ", running as ");
        append_uint(detail, sizeof detail, (unsigned long)getuid());
        refuse(fd, "uid is not the uid this process runs as", detail);
    }
    if (cfg_name[0] == '\0' || strchr(cfg_name, ':') != NULL)
        refuse(fd, "name must be non-empty and contain no ':'", NULL);
    if (!is_absolute_path(cfg_home))
        refuse(fd, "home must be an absolute path without ':'", NULL);
    if (!is_absolute_path(cfg_shell))
        refuse(fd, "shell must be an absolute path without ':'", NULL);
    if (cfg_gecos == NULL)
        cfg_gecos = cfg_name;
    else if (strchr(cfg_gecos, ':') != NULL)
        refuse(fd, "gecos must contain no ':'", NULL);
}

/* ------------------------------------------------------------------------------------------ */
/* The constructor.                                                                            */

__attribute__((constructor)) static void stjshim_init(void)
{
    const char *env = getenv(STJ_ENV_FD);
    if (env == NULL)
        return; /* not configured: pure pass-through */

    unsigned long v;
    if (parse_uint(env, INT_MAX, &v) != 0 || strlen(env) > 10)
        refuse_env(env, "not a decimal file descriptor number");
    int fd = (int)v;
    if (fd < 3)
        refuse_env(env, "must be 3 or more (0-2 are stdin/stdout/stderr)");
    struct stat st;
    if (fcntl(fd, F_GETFD) == -1 || fstat(fd, &st) != 0)
        refuse_env(env, "file descriptor is not open");
    if (!S_ISSOCK(st.st_mode))
        refuse_env(env, "file descriptor is not a socket");

    size_t len = read_config(fd);
    parse_config(fd, len);

    cfg_pw.pw_name = cfg_name;
    cfg_pw.pw_passwd = cfg_passwd_field;
    cfg_pw.pw_uid = cfg_uid;
    cfg_pw.pw_gid = cfg_gid;
    cfg_pw.pw_gecos = cfg_gecos;
    cfg_pw.pw_dir = cfg_home;
    cfg_pw.pw_shell = cfg_shell;
    cfg_active = 1;

    char ok[40] = "ok ";
    append_uint(ok, sizeof ok - 1, (unsigned long)getpid());
    size_t n = strlen(ok);
    ok[n++] = '\n';
    write_all(fd, ok, n, 1);

    char go;
    ssize_t r;
    do {
        r = read(fd, &go, 1);
    } while (r < 0 && errno == EINTR);
    if (r != 1 || go != 'g')
        _exit(STJ_EXIT);

    close(fd);
    unsetenv(STJ_ENV_FD);
    unsetenv("LD_PRELOAD");
}

/* ------------------------------------------------------------------------------------------ */
/* The interposed lookups.                                                                     */

static int fill_passwd(struct passwd *pw, char *buf, size_t buflen, struct passwd **result)
{
    const char *fields[5] = {cfg_name, cfg_passwd_field, cfg_gecos, cfg_home, cfg_shell};
    size_t sizes[5];
    size_t need = 0;
    for (int i = 0; i < 5; i++) {
        sizes[i] = strlen(fields[i]) + 1;
        need += sizes[i];
    }
    if (buflen < need) {
        *result = NULL;
        errno = ERANGE;
        return ERANGE;
    }
    char *copies[5];
    for (int i = 0; i < 5; i++) {
        copies[i] = buf;
        memcpy(buf, fields[i], sizes[i]);
        buf += sizes[i];
    }
    pw->pw_name = copies[0];
    pw->pw_passwd = copies[1];
    pw->pw_uid = cfg_uid;
    pw->pw_gid = cfg_gid;
    pw->pw_gecos = copies[2];
    pw->pw_dir = copies[3];
    pw->pw_shell = copies[4];
    *result = pw;
    return 0;
}

static struct passwd *static_passwd(void)
{
    /* Refresh every time, in case a caller scribbled on the last answer. */
    cfg_pw.pw_name = cfg_name;
    cfg_pw.pw_passwd = cfg_passwd_field;
    cfg_pw.pw_uid = cfg_uid;
    cfg_pw.pw_gid = cfg_gid;
    cfg_pw.pw_gecos = cfg_gecos;
    cfg_pw.pw_dir = cfg_home;
    cfg_pw.pw_shell = cfg_shell;
    return &cfg_pw;
}

static int is_hidden_group(const char *name)
{
    return cfg_active && cfg_hide_tty && name != NULL && strcmp(name, "tty") == 0;
}

STJ_EXPORT struct passwd *getpwnam(const char *name)
{
    if (cfg_active && strcmp(name, cfg_name) == 0)
        return static_passwd();
    getpwnam_fn fn = (getpwnam_fn)real(R_GETPWNAM);
    if (fn == NULL) {
        errno = ENOSYS;
        return NULL;
    }
    return fn(name);
}

STJ_EXPORT struct passwd *getpwuid(uid_t uid)
{
    if (cfg_active && uid == cfg_uid)
        return static_passwd();
    getpwuid_fn fn = (getpwuid_fn)real(R_GETPWUID);
    if (fn == NULL) {
        errno = ENOSYS;
        return NULL;
    }
    return fn(uid);
}

STJ_EXPORT int getpwnam_r(const char *name, struct passwd *pw, char *buf, size_t buflen,
                          struct passwd **result)
{
    if (cfg_active && strcmp(name, cfg_name) == 0)
        return fill_passwd(pw, buf, buflen, result);
    getpwnam_r_fn fn = (getpwnam_r_fn)real(R_GETPWNAM_R);
    if (fn == NULL) {
        *result = NULL;
        return ENOSYS;
    }
    return fn(name, pw, buf, buflen, result);
}

STJ_EXPORT int getpwuid_r(uid_t uid, struct passwd *pw, char *buf, size_t buflen,
                          struct passwd **result)
{
    if (cfg_active && uid == cfg_uid)
        return fill_passwd(pw, buf, buflen, result);
    getpwuid_r_fn fn = (getpwuid_r_fn)real(R_GETPWUID_R);
    if (fn == NULL) {
        *result = NULL;
        return ENOSYS;
    }
    return fn(uid, pw, buf, buflen, result);
}

STJ_EXPORT struct group *getgrnam(const char *name)
{
    if (is_hidden_group(name)) {
        errno = 0;
        return NULL;
    }
    getgrnam_fn fn = (getgrnam_fn)real(R_GETGRNAM);
    if (fn == NULL) {
        errno = ENOSYS;
        return NULL;
    }
    return fn(name);
}

STJ_EXPORT int getgrnam_r(const char *name, struct group *gr, char *buf, size_t buflen,
                          struct group **result)
{
    if (is_hidden_group(name)) {
        *result = NULL;
        return 0;
    }
    getgrnam_r_fn fn = (getgrnam_r_fn)real(R_GETGRNAM_R);
    if (fn == NULL) {
        *result = NULL;
        return ENOSYS;
    }
    return fn(name, gr, buf, buflen, result);
}
