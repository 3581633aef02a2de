"""``ssh job-32.0`` and editors (VS Code Remote-SSH): a ProxyCommand for ``ssh_config``.

``stj ssh-config`` prints a ``Host job-*`` block whose ProxyCommand is this module. For each
connection it asks the broker for a session into the job named by the host word, presents
the capability, verifies the starter's signed host key and adds it to a private known_hosts
for that host name (pinned per session by signature, never trusted on first use), then passes
the session socket to ssh (``ProxyUseFdpass``) and exits.

Unlike ``ssh-to-job``, ssh here loads its identity from ssh_config, so the client key is a
per-user key kept in ``~/.config/ssh-to-job/`` (0600 in 0700; made on first use; it never
leaves this host). Editors open several connections at once: known_hosts is appended to
under a lock and keeps only the newest entries of each host.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import shlex
import signal
import socket
import sys

from ssh_to_job import wire

from ._broker import BrokerClient, BrokerUnavailable, die, find_socket, printable
from .ssh_to_job import SessionError, SlurmJobId, generate_key, open_session, parse_job

PREFIX = "job-"
KEEP = 16


def config_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    d = pathlib.Path(base) / "ssh-to-job"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if d.stat().st_mode & 0o077:
        d.chmod(0o700)
    return d


def user_key(d: pathlib.Path) -> str:
    """The public line of the per-user key, made on first use."""
    private, pub = d / "id_ed25519", d / "id_ed25519.pub"
    if not private.exists():
        priv_bytes, public = generate_key("")
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, priv_bytes)
        finally:
            os.close(fd)
        pub.write_text(public + "\n")
    return pub.read_text().strip()


def pin(d: pathlib.Path, host: str, host_key: str) -> None:
    """Add ``host host_key`` to our known_hosts, keeping the newest KEEP entries per host."""
    path = d / "known_hosts"
    with open(d / "known_hosts.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        mine = [ln for ln in lines if ln.split(" ", 1)[0] == host]
        others = [ln for ln in lines if ln.split(" ", 1)[0] != host]
        mine = [*mine[-(KEEP - 1) :], f"{host} {host_key}"]
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join([*others, *mine]) + "\n")
        os.replace(tmp, path)


def ssh_config_block(name: str | None, config: str | None = None, pool: str = "") -> str:
    """The ``Host job-*`` block, with the pool's socket baked in as found now (from -name,
    $STJ_STATE_DIR or the config): editors run ssh without this shell's environment.

    With ``pool`` (``BROKER:PORT``, on a laptop) the block reaches that remote pool instead,
    and the laptop files' location (``$XDG_CONFIG_HOME`` if set) is baked in as well."""
    d = config_dir()
    user_key(d)
    proxy = [sys.executable, "-P", "-m", "ssh_to_job.client.ideproxy"]
    known_hosts = d / "known_hosts"
    if pool:
        from ._remote import ca_path, known_hosts_path, parse_pool

        host, port = parse_pool(pool)
        if cert_checked(host, port, d):
            known_hosts = known_hosts_path(host, port, d)
        if not ca_path(host, port, d).exists():
            raise ValueError(
                f"no pool CA for {host}:{port} yet: run 'stj pool-ca --trust {host}:{port} FILE' "
                "first (FILE from 'stj pool-ca' on a host of the pool)"
            )
        if os.environ.get("XDG_CONFIG_HOME"):
            proxy = ["env", f"XDG_CONFIG_HOME={os.environ['XDG_CONFIG_HOME']}", *proxy]
        proxy += ["-pool", f"{host}:{port}"]
    else:
        proxy += ["-name", str(find_socket(name, config).absolute())]
    cmd = " ".join(shlex.quote(p) for p in proxy) + " %n"
    checked = (
        "Host keys: certificates of the pool's host CA (@cert-authority), checked by ssh."
        if known_hosts != d / "known_hosts"
        else "Host keys are pinned per session by the starter's signature."
    )
    return f"""\
# ssh-to-job: `ssh job-32.0` opens a fresh session into job 32.0, `ssh job-slurm-1234`
# into Slurm job 1234 (also for VS Code Remote-SSH). {checked}
Host {PREFIX}*
  ProxyCommand {cmd}
  ProxyUseFdpass yes
  IdentityFile "{d}/id_ed25519"
  IdentitiesOnly yes
  IdentityAgent none
  UserKnownHostsFile "{known_hosts}"
  GlobalKnownHostsFile "{known_hosts}"
  StrictHostKeyChecking yes
  UpdateHostKeys no
  CheckHostIP no
  ControlMaster no
  ControlPath none
  PasswordAuthentication no
  KbdInteractiveAuthentication no
"""


def cert_checked(host: str, port: int, d: pathlib.Path) -> bool:
    """Whether the pool at ``host:port`` has an ``@cert-authority`` line here: then plain ssh
    checks each session's host certificate itself and nothing is pinned per session."""
    from ._remote import known_hosts_path

    try:
        return known_hosts_path(host, port, d).read_text().startswith("@cert-authority ")
    except OSError:
        return False


def refuse(message: str, code: int = 1) -> int:
    """Say why in one line, and spare the user OpenSSH's fd-passing complaints.

    A ProxyCommand that passes no socket makes ssh add two lines of its own ("mm_receive_fd:
    ..." and "proxy dialer did not pass back a connection") after ours. ssh has not touched
    the terminal yet at this point, so ending it with SIGTERM loses nothing and leaves our
    line as the only one; it still exits with a failure status.
    """
    print(f"ssh-to-job: {printable(message)}", file=sys.stderr, flush=True)
    parent = os.getppid()
    try:
        is_ssh = pathlib.Path(f"/proc/{parent}/comm").read_text().strip() == "ssh"
    except OSError:
        is_ssh = False
    if is_ssh:
        os.kill(parent, signal.SIGTERM)
    return code


def _pool_address(pool: str) -> tuple[str, int]:
    from ._remote import parse_pool

    return parse_pool(pool)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    name = pool = None
    if len(args) == 3 and args[0] in ("-name", "--name"):
        name, args = args[1], args[2:]
    elif len(args) == 3 and args[0] in ("-pool", "--pool"):
        pool, args = args[1], args[2:]
    if len(args) != 1 or not args[0].startswith(PREFIX):
        return die(
            "usage: python -m ssh_to_job.client.ideproxy [-name broker | -pool BROKER:PORT] "
            f"{PREFIX}CLUSTER.PROC | {PREFIX}slurm-JOB",
            2,
        )
    host = args[0]
    try:
        # ``job-slurm-1234`` (also ``_7``, ``+1``, ``+node017``) names a Slurm job.
        jid: wire.JobId | SlurmJobId = parse_job(host[len(PREFIX) :])
    except ValueError as exc:
        return refuse(str(exc), 2)
    if isinstance(jid, wire.JobId) and jid.node:
        return refuse(f"job {jid.one} has no node {jid.node} (its only node is 0)", 2)
    d = config_dir()
    public = user_key(d)
    try:
        if pool:  # a remote pool (see _remote): TLS, a signed request, a relayed socket
            from ._remote import request_session

            reply, fd = request_session(pool, jid.one, public)
        else:
            with BrokerClient(find_socket(name)) as bc:
                reply, fd = bc.ssh(wire.SshRequest(job=jid.one, client_key=public))
    except BrokerUnavailable as exc:
        return refuse(str(exc))
    if isinstance(reply, wire.Error):
        return refuse(reply.message)
    if not isinstance(reply, wire.SshGrant) or fd is None:
        return refuse(f"the broker answered {reply.TYPE!r} to a session request")
    with socket.socket(fileno=fd) as session:
        try:
            ready = open_session(session, reply, ())
        except (SessionError, OSError, wire.ProtocolError) as exc:
            return refuse(f"job {reply.job}: {exc}")
        if not (pool and cert_checked(*_pool_address(pool), d)):
            pin(d, host, ready.host_key)
        out = socket.socket(fileno=os.dup(1))
        socket.send_fds(out, [b"\0"], [session.fileno()])
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
