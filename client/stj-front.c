/*
 * stj-front: the `ssh-to-job` command on PATH. It does one thing itself, the repeat-command
 * fast path of client/_mux.py (`repeat_argv`): when the user's ControlMaster for the job is
 * alive, exec `ssh -F <the master's client config> ... ssh-to-job CMD` (or scp, sftp). For
 * everything else it execs the Python client, `ssh-to-job-py` beside it, with the original
 * argv unchanged; so does it whenever it is unsure (a config file beyond a plain subset of
 * TOML, a non-ASCII byte, a -ssh value that needs shell-like quoting, any error): the Python
 * client decides again with the same rules and does the full work. It exists only because
 * Python's start-up (~14 ms) was half of a repeat command's time (docs/performance.md).
 *
 * Built a second time with -DCLI_ONLY as the `stj` command: it only execs `stj-py`, the
 * Python CLI beside it, the isolated way below (site and sitecustomize cost every `stj`
 * command 3-5 ms); none of the repeat path is compiled in.
 *
 * Never: a decision Python's repeat_argv would not make (tests/test_mux.py runs both on a
 * table of argv and compares), a socket outside the user's own 0700 runtime directory, or
 * a secret on a command line (there is none: the argv holds a config file's path). It reads
 * no file but the pool's config file, and writes none.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifdef CLI_ONLY
#define PYTHON_CLIENT "stj-py"
#define COMMAND "stj"
#else
#define PYTHON_CLIENT "ssh-to-job-py"
#define COMMAND "ssh-to-job"
#endif
#define HOST "ssh-to-job"
#define MAX_WORDS 64

static char **orig_argv;

/* The Python client's interpreter in isolated mode without the site module: `python -I -S
 * <site-packages>/ssh_to_job/client/_boot.py SCRIPT ARGS...`, where python is the one on
 * `script`'s first line (`#!/abs/path/python`, as pip writes it into a venv) and site-packages
 * its venv's. site and the system's sitecustomize cost every cold session 3-5 ms, and the
 * client needs neither (nor PYTHONPATH and friends). Returns if any of that does not hold:
 * the script then runs as usual. */
static void exec_isolated(const char *script)
{
    char line[PATH_MAX + 3];
    FILE *f = fopen(script, "re");
    if (f == NULL)
        return;
    char *got = fgets(line, sizeof line, f);
    fclose(f);
    if (got == NULL || strncmp(line, "#!/", 3) != 0)
        return;
    size_t len = strcspn(line, "\n");
    if (line[len] != '\n')
        return; /* longer than a path */
    line[len] = '\0';
    const char *interp = line + 2;
    const char *base = strrchr(interp, '/') + 1;
    if (strpbrk(interp, " \t\r") != NULL || strncmp(base, "python", 6) != 0 ||
        access(interp, X_OK) != 0)
        return; /* not a plain Python: an interpreter with arguments, pip's /bin/sh trampoline */
    /* <venv>/bin/python3 -> <venv>/lib/python3.N/site-packages/ssh_to_job/client/_boot.py */
    char root[PATH_MAX];
    size_t rlen = (size_t)(base - 1 - interp);
    if (rlen == 0 || rlen >= sizeof root)
        return;
    memcpy(root, interp, rlen);
    root[rlen] = '\0';
    char *up = strrchr(root, '/');
    if (up == NULL || (size_t)(up - root) + sizeof "/lib" > sizeof root)
        return;
    strcpy(up, "/lib");
    DIR *lib = opendir(root);
    if (lib == NULL)
        return;
    char boot[PATH_MAX];
    int found = 0;
    struct dirent *e;
    while (!found && (e = readdir(lib)) != NULL) {
        if (strncmp(e->d_name, "python3.", 8) != 0)
            continue;
        int n = snprintf(boot, sizeof boot, "%s/%s/site-packages/ssh_to_job/client/_boot.py", root,
                         e->d_name);
        found = n > 0 && (size_t)n < sizeof boot && access(boot, R_OK) == 0;
    }
    closedir(lib);
    if (!found)
        return;
    int argc = 0;
    while (orig_argv[argc] != NULL)
        argc++;
    char **argv = calloc((size_t)argc + 5, sizeof *argv);
    if (argv == NULL)
        return;
    int i = 0;
    argv[i++] = (char *)interp;
    argv[i++] = "-I";
    argv[i++] = "-S";
    argv[i++] = boot;
    argv[i++] = (char *)script;
    for (int k = 1; k < argc; k++)
        argv[i++] = orig_argv[k];
    argv[i] = NULL;
    execv(interp, argv);
    free(argv);
}

/* The Python client with the original argv: everything this front does not do itself. */
static void __attribute__((noreturn)) full(void)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash != NULL && (size_t)(slash - self) + 1 + sizeof PYTHON_CLIENT <= sizeof self) {
            strcpy(slash + 1, PYTHON_CLIENT);
            exec_isolated(self);
            execv(self, orig_argv);
        }
    }
    /* No /proc, or the client is not beside us (a copied binary): PATH decides. */
    execvp(PYTHON_CLIENT, orig_argv);
    fprintf(stderr, COMMAND ": cannot run the Python client %s: %s\n", PYTHON_CLIENT,
            strerror(errno));
    exit(1);
}

#ifdef CLI_ONLY
int main(int argc, char **argv)
{
    (void)argc;
    orig_argv = argv;
    full();
}
#else

/* ---------------------------------------------------------------- SHA-256 (FIPS 180-4) */

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(uint32_t h[8], const unsigned char *p)
{
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i];
        t1 += w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
}

static void sha256(const unsigned char *msg, size_t len, unsigned char out[32])
{
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                     0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    size_t done = 0;
    for (; len - done >= 64; done += 64)
        sha256_block(h, msg + done);
    unsigned char tail[128] = {0};
    size_t rest = len - done;
    memcpy(tail, msg + done, rest);
    tail[rest] = 0x80;
    size_t blocks = rest + 1 + 8 <= 64 ? 1 : 2;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        tail[blocks * 64 - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (size_t i = 0; i < blocks; i++)
        sha256_block(h, tail + 64 * i);
    for (int i = 0; i < 32; i++)
        out[i] = (unsigned char)(h[i / 4] >> (24 - 8 * (i % 4)));
}

/* -------------------------------------------------------------- the repeat_argv rules */

/* Bytes Python would treat alike: any other byte (non-ASCII, control) sends us to it. */
static int plain(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e)
            return 0;
    return 1;
}

static const char *env(const char *name)
{
    const char *v = getenv(name);
    return v != NULL && *v ? v : NULL;
}

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* os.path.join(a, b) for a relative b; 0 when it does not fit. */
static int join(char *out, size_t size, const char *a, const char *b)
{
    size_t la = strlen(a);
    const char *sep = la == 0 || a[la - 1] == '/' ? "" : "/";
    int n = snprintf(out, size, "%s%s%s", a, sep, b);
    return n >= 0 && (size_t)n < size;
}

static int exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* 1 to `most` ASCII digits, and their value. */
static int ascii_number(const char *p, size_t len, size_t most, unsigned long long *v)
{
    if (len == 0 || len > most)
        return 0;
    *v = 0;
    for (size_t j = 0; j < len; j++) {
        if (p[j] < '0' || p[j] > '9')
            return 0;
        *v = *v * 10 + (unsigned long long)(p[j] - '0');
    }
    return 1;
}

static int alnum(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* _mux._slurm_one, slurm:JOB[_TASK][.STEP][+NODE] as str(wire.parse_slurm_id) spells it;
 * without str.strip() (any whitespace: Python decides). */
static int slurm_one(const char *text, char *out, size_t size)
{
    const char *p = text + 6, *plus = strchr(p, '+');
    const char *end = plus ? plus : p + strlen(p);
    if (plus) {
        const char *node = plus + 1;
        size_t ln = strlen(node);
        if (ln == 0 || ln > 64 || !alnum(node[0]))
            return 0;
        for (size_t j = 0; j < ln; j++)
            if (!alnum(node[j]) && node[j] != '.' && node[j] != '_' && node[j] != '-')
                return 0;
    }
    const char *dot = memchr(p, '.', (size_t)(end - p));
    const char *head_end = dot ? dot : end;
    const char *under = memchr(p, '_', (size_t)(head_end - p));
    unsigned long long job, task = 0, step = 0;
    if (!ascii_number(p, (size_t)((under ? under : head_end) - p), 10, &job))
        return 0;
    if (under && !ascii_number(under + 1, (size_t)(head_end - under - 1), 10, &task))
        return 0;
    int batch = 0;
    if (dot) {
        size_t ls = (size_t)(end - dot - 1);
        batch = ls == 5 && !memcmp(dot + 1, "batch", 5);
        if (!batch && !ascii_number(dot + 1, ls, 9, &step))
            return 0;
    }
    char t[24] = "", s[24] = "";
    if (under)
        snprintf(t, sizeof t, "_%llu", task);
    if (dot && batch)
        snprintf(s, sizeof s, ".batch");
    else if (dot)
        snprintf(s, sizeof s, ".%llu", step);
    int m = snprintf(out, size, "slurm:%llu%s%s%s%s", job, t, s, plus ? "+" : "",
                     plus ? plus + 1 : "");
    return m > 0 && (size_t)m < size;
}

/* _mux.job_one, restricted to ASCII digits and dots or a Slurm job (anything else: Python
 * decides). */
static int job_one(const char *text, char *out, size_t size)
{
    if (!strncmp(text, "slurm:", 6) || !strncmp(text, "slurm-", 6))
        return slurm_one(text, out, size);
    const char *parts[3];
    size_t lens[3];
    int n = 0;
    const char *start = text;
    for (const char *p = text;; p++) {
        if (*p == '.' || *p == '\0') {
            if (n == 3)
                return 0;
            parts[n] = start;
            lens[n++] = (size_t)(p - start);
            if (*p == '\0')
                break;
            start = p + 1;
        } else if (*p < '0' || *p > '9') {
            return 0;
        }
    }
    static const size_t most[3] = {12, 9, 1};
    unsigned long long v[2] = {0, 0};
    for (int i = 0; i < n; i++) {
        if (lens[i] == 0 || lens[i] > most[i])
            return 0;
        if (i < 2)
            for (size_t j = 0; j < lens[i]; j++)
                v[i] = v[i] * 10 + (unsigned long long)(parts[i][j] - '0');
    }
    if (n == 3 && parts[2][0] != '0')
        return 0;
    int m = snprintf(out, size, "%llu.%llu", v[0], v[1]);
    return m > 0 && (size_t)m < size;
}

/* shlex.split for the words it splits on spaces alone; 0 (Python decides) for any quoting,
 * escape, comment-like or other whitespace character, or too many words. */
static int split_words(char *s, char **words, int *count)
{
    static const char ok[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                             "0123456789_./,:=+@%- ";
    if (!*s || strspn(s, ok) != strlen(s))
        return 0;
    int n = 0;
    for (char *tok = strtok(s, " "); tok != NULL; tok = strtok(NULL, " ")) {
        if (n == MAX_WORDS)
            return 0;
        words[n++] = tok;
    }
    *count = n;
    return n > 0;
}

static int lower_starts(const char *s, const char *prefix)
{
    for (; *prefix; s++, prefix++)
        if (*s == '\0' || (*s | 0x20) != *prefix)
            return 0;
    return 1;
}

/* _mux.usable(words, None), the off switch included. */
static int usable(char **words, int n)
{
    const char *off = getenv("SSH_TO_JOB_MUX");
    if (off != NULL && (!strcmp(off, "0") || !strcmp(off, "no") || !strcmp(off, "off")))
        return 0;
    const char *prog = base_name(words[0]);
    if (strcmp(prog, "ssh") && strcmp(prog, "scp") && strcmp(prog, "sftp"))
        return 0;
    for (int i = 1; i < n; i++) {
        const char *w = words[i];
        if (!strncmp(w, "-o", 2)) {
            const char *opt = w[2] ? w + 2 : i + 1 < n ? words[i + 1] : "";
            if (lower_starts(opt, "forwardagent") || lower_starts(opt, "forwardx11") ||
                lower_starts(opt, "control") || lower_starts(opt, "proxy"))
                return 0;
        } else if (w[0] == '-' && w[1] != '-' && strpbrk(w + 1, "AXYSM") != NULL) {
            return 0;
        }
    }
    return 1;
}

/* ------------------------------------------------- the config file's [pool] state_dir */

/* A strict subset of TOML: blank and comment lines, `[table]` headers, and one-line
 * `key = value` pairs inside a table whose value is a string without escapes, a boolean, a
 * decimal number, or a one-line array of those. Every file it accepts, tomllib reads to the
 * same [pool] state_dir; anything else (escapes, dotted or quoted keys, multi-line values,
 * dates, a duplicate key or table, non-ASCII, CR) returns -1: Python reads it. */

#define MAX_KEYS 512

static const char *skip_ws(const char *p)
{
    while (*p == ' ' || *p == '\t')
        p++;
    return p;
}

static const char *bare_key(const char *p)
{
    while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
           *p == '_' || *p == '-')
        p++;
    return p;
}

static int digits(const char **p)
{
    const char *start = *p;
    while (**p >= '0' && **p <= '9')
        (*p)++;
    return *p > start;
}

/* One scalar: its end, or NULL. A string's text (quotes excluded) goes to *text, *len. */
static const char *scalar(const char *p, const char **text, size_t *len)
{
    *text = NULL;
    if (*p == '"' || *p == '\'') {
        char quote = *p++;
        if (*p == quote && p[1] == quote)
            return NULL; /* a multi-line string */
        const char *start = p;
        while (*p && *p != quote) {
            if (*p == '\\' || ((unsigned char)*p < 0x20 && *p != '\t'))
                return NULL;
            p++;
        }
        if (*p != quote)
            return NULL;
        *text = start;
        *len = (size_t)(p - start);
        return p + 1;
    }
    if (!strncmp(p, "true", 4))
        return p + 4;
    if (!strncmp(p, "false", 5))
        return p + 5;
    if (*p == '+' || *p == '-')
        p++;
    if (*p == '0')
        p++;
    else if (!digits(&p))
        return NULL;
    if (*p == '.') {
        p++;
        if (!digits(&p))
            return NULL;
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        if (!digits(&p))
            return NULL;
    }
    return p;
}

/* The end of a value (a scalar or a one-line array of scalars), or NULL. */
static const char *value(const char *p, const char **text, size_t *len)
{
    if (*p != '[')
        return scalar(p, text, len);
    p = skip_ws(p + 1);
    while (*p != ']') {
        const char *ignored;
        size_t n;
        p = scalar(p, &ignored, &n);
        if (p == NULL)
            return NULL;
        p = skip_ws(p);
        if (*p == ',')
            p = skip_ws(p + 1);
        else if (*p != ']')
            return NULL;
    }
    *text = NULL;
    return p + 1;
}

/* The end of a line after its content: optional blanks and comment; NULL for anything else. */
static const char *line_end(const char *p)
{
    p = skip_ws(p);
    if (*p == '#')
        p += strcspn(p, "\n");
    return *p == '\n' || *p == '\0' ? p : NULL;
}

/* 1 and the state_dir (possibly "") in out; -1 where Python must read the file. */
static int config_state_dir(const char *path, char *out, size_t size)
{
    static char buf[65536];
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    int big = !feof(f);
    fclose(f);
    if (big)
        return -1;
    buf[n] = '\0';
    for (size_t k = 0; k < n; k++)
        if ((unsigned char)buf[k] > 0x7e || ((unsigned char)buf[k] < 0x20 && buf[k] != '\t' &&
                                              buf[k] != '\n'))
            return -1;
    /* Tables and keys seen, as "table" and "table.key": TOML forbids defining either twice. */
    static char seen[MAX_KEYS][128];
    int nseen = 0;
    char table[64] = "";
    out[0] = '\0';
    for (const char *p = buf; *p;) {
        p = skip_ws(p);
        const char *end;
        char name[128];
        if (*p == '#' || *p == '\n' || *p == '\0') {
            end = line_end(p);
        } else if (*p == '[') {
            const char *k = skip_ws(p + 1);
            const char *ke = bare_key(k);
            const char *close = skip_ws(ke);
            if (ke == k || (size_t)(ke - k) >= sizeof table || *close != ']')
                return -1;
            snprintf(table, sizeof table, "%.*s", (int)(ke - k), k);
            snprintf(name, sizeof name, "%s", table);
            end = line_end(close + 1);
        } else {
            const char *ke = bare_key(p);
            const char *eq = skip_ws(ke);
            if (ke == p || !table[0] || *eq != '=' || (size_t)(ke - p) > 60)
                return -1;
            const char *text;
            size_t len;
            const char *ve = value(skip_ws(eq + 1), &text, &len);
            if (ve == NULL)
                return -1;
            snprintf(name, sizeof name, "%s.%.*s", table, (int)(ke - p), p);
            if (!strcmp(name, "pool.state_dir")) {
                if (text == NULL || len >= size)
                    return -1; /* not a string: Python's full path says what is wrong */
                memcpy(out, text, len);
                out[len] = '\0';
            }
            end = line_end(ve);
        }
        if (end == NULL)
            return -1;
        if (*p != '#' && *p != '\n' && *p != '\0') {
            for (int k = 0; k < nseen; k++)
                if (!strcmp(seen[k], name))
                    return -1;
            if (nseen == MAX_KEYS)
                return -1;
            snprintf(seen[nseen++], sizeof seen[0], "%s", name);
        }
        p = *end ? end + 1 : end;
    }
    return 1;
}

/* _mux.broker_socket: 0 where Python must decide (a config file outside the subset above). */
static int broker_socket(const char *name, char *out, size_t size)
{
    struct stat st;
    if (name != NULL) {
        if (stat(name, &st) == 0 && S_ISDIR(st.st_mode))
            return join(out, size, name, "broker.sock");
        return snprintf(out, size, "%s", name) < (int)size;
    }
    const char *state = env("STJ_STATE_DIR");
    if (state != NULL)
        return join(out, size, state, "broker.sock");
    const char *config = env("STJ_CONFIG");
    if (config != NULL || exists("/etc/ssh-to-job/config.toml")) {
        char state_dir[PATH_MAX];
        if (config_state_dir(config ? config : "/etc/ssh-to-job/config.toml", state_dir,
                             sizeof state_dir) < 0)
            return 0;
        if (state_dir[0])
            return join(out, size, state_dir, "broker.sock");
    }
    static const char system_sock[] = "/var/lib/ssh-to-job/broker.sock";
    if (getuid() == 0)
        return snprintf(out, size, "%s", system_sock) < (int)size;
    char personal[PATH_MAX];
    const char *xdg = env("XDG_STATE_HOME");
    if (xdg != NULL) {
        if (!join(personal, sizeof personal, xdg, "ssh-to-job/broker.sock"))
            return 0;
    } else {
        /* os.path.expanduser("~/.local/state") with HOME set; unset: Python decides. */
        const char *home = getenv("HOME");
        if (home == NULL)
            return 0;
        size_t lh = strlen(home);
        while (lh > 0 && home[lh - 1] == '/')
            lh--;
        int n = snprintf(personal, sizeof personal, "%.*s/.local/state/ssh-to-job/broker.sock",
                         (int)lh, home);
        if (n < 0 || (size_t)n >= sizeof personal)
            return 0;
    }
    const char *pick = exists(personal) || !exists(system_sock) ? personal : system_sock;
    return snprintf(out, size, "%s", pick) < (int)size;
}

/* _mux._private_base: the user's own runtime directory, 0700, never made here. */
static int private_base(char *out, size_t size)
{
    uid_t uid = getuid();
    struct stat st;
    const char *base = env("XDG_RUNTIME_DIR");
    if (base == NULL || stat(base, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != uid) {
        base = env("TMPDIR");
        if (base == NULL)
            base = "/tmp";
    }
    char leaf[64];
    snprintf(leaf, sizeof leaf, "ssh-to-job-%u", (unsigned)uid);
    if (!join(out, size, base, leaf))
        return 0;
    if (lstat(out, &st) != 0)
        return 0;
    return S_ISDIR(st.st_mode) && st.st_uid == uid && (st.st_mode & 077) == 0;
}

/* _mux.alive, without its clean-up: a socket nobody answers on sends us to Python, which
 * removes it. */
static int alive(const char *path)
{
    struct sockaddr_un addr;
    if (strlen(path) >= sizeof addr.sun_path)
        return 0;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    strcpy(addr.sun_path, path);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return 0;
    int ok = connect(s, (struct sockaddr *)&addr, sizeof addr) == 0;
    close(s);
    return ok;
}

int main(int argc, char **argv)
{
    orig_argv = argv;
    char *ssh = NULL, *name = NULL, *shells = NULL;
    int i = 1;
    for (; i < argc; i++) {
        char *arg = argv[i];
        if (arg[0] != '-' || !strcmp(arg, "-"))
            break;
        if (!strcmp(arg, "--")) {
            i++;
            break;
        }
        char *key = arg;
        while (*key == '-')
            key++;
        char *eq = strchr(key, '=');
        size_t klen = eq ? (size_t)(eq - key) : strlen(key);
        /* The options a repeat command may have: _mux._WITH_ARG. */
        static const char *const with_arg[] = {"name", "ssh", "shells", "l", "p", "o"};
        int which = -1;
        for (int k = 0; k < 6; k++)
            if (strlen(with_arg[k]) == klen && !strncmp(key, with_arg[k], klen))
                which = k;
        if (which < 0)
            full();
        char *value;
        if (eq) {
            value = eq + 1;
        } else {
            if (++i >= argc)
                full();
            value = argv[i];
        }
        if (which == 0)
            name = value;
        else if (which == 1)
            ssh = value;
        else if (which == 2)
            shells = value;
    }
    if (i >= argc)
        full();
    char job[128];
    char *host = strrchr(argv[i], '@');
    if (!job_one(host ? host + 1 : argv[i], job, sizeof job))
        full();

    char *words[MAX_WORDS];
    int nwords = 1;
    char ssh_copy[1024];
    words[0] = "ssh";
    if (ssh != NULL && *ssh) {
        if (snprintf(ssh_copy, sizeof ssh_copy, "%s", ssh) >= (int)sizeof ssh_copy)
            full();
        if (!split_words(ssh_copy, words, &nwords))
            full();
    }
    if (!usable(words, nwords))
        full();
    char **command = argv + i + 1;
    int ncommand = argc - i - 1;
    const char *prog = base_name(words[0]);
    /* An interactive login is a person, not a loop: the full path (see _mux.repeat_argv). */
    if (ncommand == 0 && !strcmp(prog, "ssh"))
        full();

    /* The socket's name: sha256(realpath(broker) NUL job NUL shells), as _mux._name. */
    char wanted[1024];
    wanted[0] = '\0';
    size_t wl = 0;
    if (shells != NULL) {
        const char *p = shells;
        while (*p) {
            size_t len = strcspn(p, ",");
            if (len > 0) {
                if (wl + (wl > 0) + len >= sizeof wanted)
                    full();
                if (wl > 0)
                    wanted[wl++] = ',';
                memcpy(wanted + wl, p, len);
                wl += len;
                wanted[wl] = '\0';
            }
            p += len;
            if (*p == ',')
                p++;
        }
    }
    if (wl == 0 && env("SHELL") != NULL) {
        if (snprintf(wanted, sizeof wanted, "%s", getenv("SHELL")) >= (int)sizeof wanted)
            full();
    }
    char broker[PATH_MAX], real[PATH_MAX], base[PATH_MAX];
    if (!broker_socket(name != NULL && *name ? name : NULL, broker, sizeof broker))
        full();
    /* A broker path that does not resolve (gone, a loop): Python's realpath decides. */
    if (realpath(broker, real) == NULL || !plain(real) || !plain(wanted))
        full();
    if (!private_base(base, sizeof base))
        full();
    char key[PATH_MAX + 1200];
    size_t lr = strlen(real), lj = strlen(job), ls = strlen(wanted);
    memcpy(key, real, lr);
    key[lr] = '\0';
    memcpy(key + lr + 1, job, lj);
    key[lr + 1 + lj] = '\0';
    memcpy(key + lr + 2 + lj, wanted, ls);
    unsigned char digest[32];
    sha256((const unsigned char *)key, lr + 2 + lj + ls, digest);
    char leaf[32] = "mux-";
    for (int k = 0; k < 10; k++)
        snprintf(leaf + 4 + 2 * k, 3, "%02x", digest[k]);
    char path[PATH_MAX], cfg[PATH_MAX + 8];
    if (!join(path, sizeof path, base, leaf))
        full();
    snprintf(cfg, sizeof cfg, "%s.cfg", path);
    if (!alive(path) || !exists(cfg))
        full();

    /* _mux.command_argv: the argv ssh_to_job.build_argv would run, with the master's config. */
    char **again = malloc(sizeof *again * (size_t)(nwords + ncommand + 5));
    if (again == NULL)
        full();
    int n = 0;
    again[n++] = words[0];
    again[n++] = "-F";
    again[n++] = cfg;
    for (int k = 1; k < nwords; k++)
        again[n++] = words[k];
    if (!strcmp(prog, "ssh"))
        again[n++] = HOST;
    for (int k = 0; k < ncommand; k++)
        again[n++] = command[k];
    if (!strcmp(prog, "sftp"))
        again[n++] = HOST;
    again[n] = NULL;
    execvp(again[0], again);
    full(); /* the full path says what is wrong */
}
#endif
