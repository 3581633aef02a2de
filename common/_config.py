"""The pool's configuration: one TOML file, read into frozen objects that reject unknown keys.

Parsing is separate from finding the file, so tests build configs from strings. Where things
live (the state directory) is resolved in one place, ``state_dir_for``, with the documented
precedence: command line, then ``STJ_STATE_DIR``, then the file, then the default.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import attrs

from . import _where
from ._where import ENV_CONFIG as ENV_CONFIG
from ._where import ENV_STATE_DIR as ENV_STATE_DIR

SYSTEM_CONFIG = pathlib.Path(_where.SYSTEM_CONFIG)
SYSTEM_STATE_DIR = pathlib.Path(_where.SYSTEM_STATE_DIR)


class ConfigError(ValueError):
    """The configuration file is malformed or names an unknown key."""


def _between(low: float, high: float) -> Any:
    """An attrs validator: ``low <= value <= high``; the error names the field and the range."""

    def check(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
        if isinstance(value, bool) or not low <= value <= high:
            raise ValueError(
                f"{attribute.name} must be between {low:g} and {high:g}, not {value!r}"
            )

    return check


_SECONDS = _between(0.001, 86400 * 365)


#: The broker's TLS port unless configured (a personal pool, ``stj pool``, takes a free one).
DEFAULT_PORT = 9620


@attrs.frozen
class BrokerConfig:
    host: str = "127.0.0.1"
    #: 0: pick a free port and record it in ``<state>/broker.addr`` (``stj pool`` does this
    #: unless ``port`` or ``listen`` is configured).
    port: int = attrs.field(default=DEFAULT_PORT, validator=_between(0, 65535))
    #: ``HOST:PORT`` the TLS port listens on; overrides ``host`` and ``port`` when set.
    listen: str = ""
    #: Queue superusers besides root: user names or numeric uids.
    superusers: tuple[str, ...] = ()
    #: Seconds a capability stays valid (at most 60).
    capability_lifetime: int = attrs.field(default=30, validator=_between(1, 60))
    #: Seconds to wait for a starter to dial in a session connection.
    session_timeout: float = attrs.field(default=15.0, validator=_SECONDS)
    #: Seconds a peer has to send a whole frame once it has started.
    frame_timeout: float = attrs.field(default=10.0, validator=_SECONDS)
    max_frame: int = attrs.field(default=1 << 20, validator=_between(4096, 64 << 20))
    #: Connections open at once, per uid on the unix socket (root is not capped) and per
    #: address on TCP until the peer has authenticated as a starter. Past it, the newest
    #: connection gets an error frame and is closed.
    max_connections_per_uid: int = attrs.field(default=64, validator=_between(1, 1 << 20))
    #: Connections open at once in total, on each of the unix socket and TCP (same rules).
    max_connections: int = attrs.field(default=1024, validator=_between(1, 1 << 20))
    #: Live jobs (idle, running, suspended, held) one user may have in the queue.
    max_jobs_per_user: int = attrs.field(default=10_000, validator=_between(1, 1 << 40))
    #: Bytes one submit (its encoded spec) may take; a cluster's spec is stored once.
    max_submit_bytes: int = attrs.field(default=256 << 10, validator=_between(1024, 64 << 20))
    #: Seconds an ssh-to-job (or output) request waits for a job's starter that is
    #: reconnecting before it answers "starter not connected".
    starter_wait: float = attrs.field(default=5.0, validator=_between(0, 3600))
    #: Whether anyone may ssh into jobs in this pool at all.
    allow_ssh: bool = True
    #: Users (names or uids) who may not ssh into any job here, their own included.
    ssh_denied_users: tuple[str, ...] = ()
    #: Append the broker's log to this file instead of stderr ("": stderr, for journald).
    log_file: str = ""
    #: Days session records (stj history --sessions) are kept.
    session_record_days: float = attrs.field(default=90.0, validator=_between(0.01, 36500))
    # -- added by the multi-host work (TLS control channels, the pool CA; common._pki) --
    #: Where the pool CA, the broker's certificate, the issued/revoked lists and the join
    #: tokens live; default: ``<state>/pki`` (made 0700).
    pki_dir: str = ""
    #: DNS names and IP addresses starters dial the broker by: the broker certificate's
    #: subject alternative names (only checked by starters that set ``check_hostname``).
    cert_hosts: tuple[str, ...] = ()
    #: Days a certificate the broker issues stays valid (renewed when a third is left).
    cert_days: int = attrs.field(default=90, validator=_between(1, 3650))
    #: Seconds a new TCP connection has to finish its TLS handshake.
    handshake_timeout: float = attrs.field(default=10.0, validator=_between(0.1, 600))
    #: Default lifetime of ``stj token create`` tokens, in seconds (at most a week).
    token_ttl: float = attrs.field(default=600.0, validator=_between(1, 7 * 86400))
    #: Accept enrolment (join tokens) on the TLS port; off: only already enrolled starters.
    allow_enrollment: bool = True
    # -- Slurm backend (broker/_slurm.py, docs/slurm.md) --
    #: Serve ``ssh-to-job slurm:JOB``: ask Slurm who owns a job and where it runs.
    slurm: bool = False
    #: The slurm.conf Slurm's commands read ("": $SLURM_CONF, else Slurm's default).
    slurm_conf: str = ""
    #: Slurm operators besides root and SlurmUser (names or uids): they may enter any job.
    slurm_operators: tuple[str, ...] = ()
    # -- spare attach connections (starter/_spare.py; docs/security.md, "Standby connections") --
    #: Seconds a starter's spare attach connection (``attach_standby``) may wait for its
    #: session; past it the broker closes it. Starters must replace theirs sooner
    #: (``[starter] spare_refresh``).
    standby_lifetime: float = attrs.field(default=300.0, validator=_between(1, 3600))
    #: Spare attach connections one starter may hold open at once; past it the newest is
    #: refused. 0: refuse every spare (starters then dial per session).
    standby_per_starter: int = attrs.field(default=4, validator=_between(0, 64))


@attrs.frozen
class StarterConfig:
    name: str = ""
    slots: int = attrs.field(default=4, validator=_between(1, 100_000))
    #: ``host:port`` of the broker; default: read from ``<state>/broker.addr``.
    broker: str = ""
    execute_dir: str = ""
    sshd: str = "/usr/sbin/sshd"
    sftp_server: str = "/usr/lib/openssh/sftp-server"
    use_shim: bool = True
    use_cgroups: bool = True
    #: How a session's sshd starts: "clone3" straight into its session cgroup where it can
    #: (starter/stj-spawn.c), else "fork" and a cgroup write in the child (subprocess).
    spawn: str = attrs.field(default="clone3", validator=attrs.validators.in_(("clone3", "fork")))
    #: After the job's main process exits, open sessions may go on this long (seconds).
    session_grace: float = attrs.field(default=3600.0, validator=_between(0, 86400 * 365))
    #: A failed job submitted with hold_on_failure stays this long for debugging (seconds).
    debug_hold_time: float = attrs.field(default=3600.0, validator=_SECONDS)
    #: Seconds a client has to present its capability on a new session socket.
    session_timeout: float = attrs.field(default=15.0, validator=_SECONDS)
    #: Let sessions forward ports and X11 (both only ever bind loopback inside the job's host).
    allow_forwarding: bool = True
    #: Let sessions forward the user's ssh agent (ssh -A). Off by default: the agent would be
    #: usable by every process of the job's uid for as long as the session lasts.
    allow_agent_forwarding: bool = False
    reconnect_max: float = attrs.field(default=5.0, validator=_SECONDS)
    #: On SIGTERM/SIGINT, leave running jobs to the next starter on this state directory
    #: (service upgrades) instead of ending them.
    keep_jobs_on_stop: bool = attrs.field(
        default=False, validator=attrs.validators.instance_of(bool)
    )
    #: Append the starter's log to this file instead of stderr ("": stderr, for journald).
    log_file: str = ""
    #: After a session's sshd ends, what it started (a remote command whose client was
    #: interrupted) gets this long to end before the session's processes are killed (seconds).
    session_end_grace: float = attrs.field(default=2.0, validator=_between(0, 3600))
    #: Repeat commands: seconds a client's ssh may idle as a ControlMaster into a job after
    #: its last command, so that the next ones skip the broker and the key exchange (one
    #: capability per burst). 0 turns it off: sshd then allows one session per connection.
    mux_persist: float = attrs.field(default=10.0, validator=_between(0, 600))
    # -- added by the multi-host work (TLS control channels, the pool CA; common._pki) --
    #: Where the starter keeps the pool CA, its key and certificate after enrolment;
    #: default: ``<state>/pki`` (made 0700).
    pki_dir: str = ""
    #: Seconds the broker has to finish the TLS handshake of a new connection.
    handshake_timeout: float = attrs.field(default=10.0, validator=_between(0.1, 600))
    #: Also check that the broker's certificate names the host in ``broker`` (its pool id and
    #: role are always checked).
    check_hostname: bool = False
    # -- Slurm backend (starter/_slurm.py, docs/slurm.md) --
    #: "queue": run the pool's own jobs; "slurm": run none, enter the Slurm jobs on this node
    #: (the starter's name must then be the node's Slurm NodeName).
    backend: str = attrs.field(default="queue", validator=attrs.validators.in_(("queue", "slurm")))
    #: The slurm.conf Slurm's commands read ("": $SLURM_CONF, else Slurm's default).
    slurm_conf: str = ""
    # -- spare attach connections (starter/_spare.py) --
    #: Attach connections kept dialled and authenticated (TLS) ahead of sessions, so that a
    #: session skips the dial and the handshake. 0: dial one per session.
    spare_attach: int = attrs.field(default=1, validator=_between(0, 16))
    #: Seconds after which a spare is replaced by a fresh one; must stay under the broker's
    #: ``standby_lifetime`` (default 300), or spares die unused.
    spare_refresh: float = attrs.field(default=120.0, validator=_between(1, 3600))


@attrs.frozen
class PoolConfig:
    state_dir: str = ""
    broker: BrokerConfig = BrokerConfig()
    starter: StarterConfig = StarterConfig()


def _build(cls: type[Any], data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table")
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"unknown key {key!r} in [{where}] (known: {', '.join(fields)})")
        want = f.default.__class__ if f.default is not attrs.NOTHING else str
        if isinstance(f.default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
                raise ConfigError(f"{where}.{key} must be a list of names or numbers")
            value = tuple(str(v) for v in value)
        elif want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{where}.{key} must be of type {want.__name__}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"[{where}] {exc}") from None


def parse_config(text: str) -> PoolConfig:
    sections, state_dir = _where.parse_pool(text)
    raw: dict[str, Any] = sections
    broker: BrokerConfig = _build(BrokerConfig, raw.get("broker", {}), "broker")
    starter: StarterConfig = _build(StarterConfig, raw.get("starter", {}), "starter")
    return PoolConfig(state_dir=state_dir, broker=broker, starter=starter)


def load_config(path: str | os.PathLike[str] | None = None) -> PoolConfig:
    """Read the config file: ``path``, else ``$STJ_CONFIG``, else /etc's if it exists."""
    if path is None:
        env = os.environ.get(ENV_CONFIG)
        if env:
            path = env
        elif SYSTEM_CONFIG.exists():
            path = SYSTEM_CONFIG
        else:
            return PoolConfig()
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return parse_config(text)


def default_state_dir() -> pathlib.Path:
    if os.getuid() == 0:
        return SYSTEM_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return pathlib.Path(base) / "ssh-to-job"


def state_dir_for(cli: str | None, config: PoolConfig) -> pathlib.Path:
    if cli:
        return pathlib.Path(cli).absolute()
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return pathlib.Path(env).absolute()
    if config.state_dir:
        return pathlib.Path(config.state_dir)
    return default_state_dir()
