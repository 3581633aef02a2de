"""Where a command finds its pool, with nothing but ``os`` and (given a file) ``tomllib``.

``ssh-to-job``'s session path needs one setting of the config file, ``[pool] state_dir``, to
find the broker's socket; building the daemons' frozen config objects for it would load attrs
into every session (~30 ms of CPU). So the client reads ``[pool]`` here, with the checks of
``_config.parse_config`` for that section and the file's shape, and leaves the ``[broker]`` and
``[starter]`` keys to the daemons that use them (and to ``stj``, which checks the whole file),
as the repeat-command front (``client/_mux.py``) does.
"""

from __future__ import annotations

import os

ENV_STATE_DIR = "STJ_STATE_DIR"
ENV_CONFIG = "STJ_CONFIG"
SYSTEM_CONFIG = "/etc/ssh-to-job/config.toml"
SYSTEM_STATE_DIR = "/var/lib/ssh-to-job"


def _error(message: str) -> Exception:
    from ._config import ConfigError  # only on this path: it loads attrs

    return ConfigError(message)


def config_state_dir(path: str | None = None) -> str:
    """``[pool] state_dir`` of the config file (``path``, else ``$STJ_CONFIG``, else /etc's if
    it exists), "" when unset or there is no file; ``ConfigError`` as ``load_config`` raises
    it for an unreadable file, bad TOML, an unknown section or a bad ``[pool]``."""
    if path is None:
        path = os.environ.get(ENV_CONFIG) or None
        if path is None:
            if not os.path.exists(SYSTEM_CONFIG):
                return ""
            path = SYSTEM_CONFIG
    try:
        with open(path, encoding="utf-8") as f:
            # Stat before reading: a file changed after this stat does not match the key
            # its contents are remembered under.
            st = os.fstat(f.fileno())
            key = [
                os.path.abspath(path),
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            ]
            known = _remembered(key)
            if known is not None:
                return known
            text = f.read()
    except OSError as exc:
        raise _error(f"cannot read config {path}: {exc.strerror}") from None
    raw, state_dir = parse_pool(text)
    for where in ("broker", "starter"):
        if not isinstance(raw.get(where, {}), dict):
            raise _error(f"[{where}] must be a table")
    _remember(key, state_dir)
    return state_dir


#: In the user's runtime directory: the last config file that passed config_state_dir's checks
#: (path, device, inode, size, mtime and ctime in ns) and its state_dir. Parsing TOML loads
#: tomllib, typing and datetime: ~8 ms of every session and ``stj`` command on a host with a
#: config file, for an answer that changes only when the file does.
CONFIG_MEMO = "config-state-dir"
_MEMO_MAX = 1 << 14
_MEMO_TAG = "ssh-to-job config memo 1"


def runtime_base() -> str:
    """The per-uid runtime directory's path (``$XDG_RUNTIME_DIR`` if it is ours, else
    ``$TMPDIR`` or /tmp, then ``ssh-to-job-UID``); made and checked by the client."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isdir(base) or os.stat(base).st_uid != os.getuid():
        base = os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, f"ssh-to-job-{os.getuid()}")


def private_runtime_dir() -> str | None:
    """The runtime directory if it exists, is a real directory, ours and 0700; else None
    (someone else may have made that predictable /tmp name first)."""
    import stat

    d = runtime_base()
    try:
        st = os.lstat(d)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return d


def _remembered(key: list[object]) -> str | None:
    import stat

    d = private_runtime_dir()
    if d is None:
        return None
    try:
        fd = os.open(os.path.join(d, CONFIG_MEMO), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > _MEMO_MAX:
            return None
        fields = os.read(fd, _MEMO_MAX + 1).decode("utf-8", "surrogateescape").split("\0")
    except OSError:
        return None
    finally:
        os.close(fd)
    if fields[:1] != [_MEMO_TAG] or fields[1:-1] != [str(k) for k in key]:
        return None
    return fields[-1]


def _remember(key: list[object], state_dir: str) -> None:
    """Best effort: a memo that cannot be written only means the next command parses again.
    Its fields are separated by NUL, which no path holds (nor a usable state_dir)."""
    d = private_runtime_dir()
    fields = [_MEMO_TAG, *(str(k) for k in key), state_dir]
    if d is None or any("\0" in f for f in fields):
        return
    tmp = os.path.join(d, f"{CONFIG_MEMO}.{os.getpid()}")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.write(fd, "\0".join(fields).encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(d, CONFIG_MEMO))
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def parse_pool(text: str) -> tuple[dict[str, object], str]:
    """A config file's TOML (its sections checked) and its ``[pool] state_dir``: the part of
    ``_config.parse_config`` that needs neither attrs nor the daemons' config classes."""
    import tomllib  # only when there is a file: keeps every command's start-up lean

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _error(f"config is not valid TOML: {exc}") from None
    unknown = set(raw) - {"pool", "broker", "starter"}
    if unknown:
        raise _error(f"unknown section(s) {sorted(unknown)} (known: pool, broker, starter)")
    pool = raw.get("pool", {})
    if not isinstance(pool, dict) or set(pool) - {"state_dir"}:
        raise _error("[pool] knows only state_dir")
    state_dir = pool.get("state_dir", "")
    if not isinstance(state_dir, str):
        raise _error("pool.state_dir must be a string")
    return raw, state_dir


def default_state_dir() -> str:
    """``_config.default_state_dir()`` as a string."""
    if os.getuid() == 0:
        return SYSTEM_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "ssh-to-job")


def broker_socket(name: str | None = None, config_path: str | None = None) -> str:
    """Where the broker listens: ``-name`` (a state directory or the socket itself), then
    ``$STJ_STATE_DIR``, the config's ``[pool] state_dir``, your own pool's, the system's."""
    if name:
        return os.path.join(name, "broker.sock") if os.path.isdir(name) else name
    # The file is read (and its shape checked) even when $STJ_STATE_DIR decides, as
    # ``_config.load_config`` always was on this path.
    configured = config_state_dir(config_path)
    explicit = os.environ.get(ENV_STATE_DIR) or configured
    if explicit:
        return os.path.join(explicit, "broker.sock")
    personal = os.path.join(default_state_dir(), "broker.sock")
    system = os.path.join(SYSTEM_STATE_DIR, "broker.sock")
    if os.path.exists(personal) or not os.path.exists(system):
        return personal
    return system
