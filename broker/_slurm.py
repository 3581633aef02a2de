"""``ssh-to-job slurm:JOB``: sessions into the jobs of a Slurm cluster (``[broker] slurm``).

The broker asks Slurm, not its own queue: ``scontrol show job -o JOB`` says who owns the job,
its state and the nodes it runs on (Debian's 22.05 ``squeue --json`` ignores ``--jobs`` and
lists every job of the cluster, too costly per request; see docs/slurm.md). It authorizes the
requester (the job's owner, a Slurm operator: root, SlurmUser and ``slurm_operators``, or a
queue superuser), picks the node (the batch host unless the id names one: ``+INDEX`` into the
allocation or ``+NODE``), and routes the session to the starter named as that node, which
finds the job's processes there and adopts the session into the job (starter/_slurm.py).

Job names: ``slurm:1234`` (or ``slurm-1234``, for rsync, which splits host and path at the
first colon), an array task ``slurm:1234_7``, a node ``slurm:1234+2`` or ``slurm:1234+node7``,
a job step ``slurm:1234.0`` (broker/_slurmstep.py).

Must never: grant a session to anyone but the job's owner, an operator or a superuser; route
a session to a starter that is not the node named by Slurm.
"""

from __future__ import annotations

import logging
import os
import re

import attrs
import trio

from ssh_to_job import wire

# _grant imports this module only when a Slurm request arrives: no cycle at load time.
from ._connections import _KEY_PREFIXES, MAX_CLIENT_KEY, Connections
from ._grant import Refused, Route
from ._jobs import _names_uid, user_name
from ._slurmstep import step_node

log = logging.getLogger("stj.broker")

#: Seconds one Slurm command may take before the request fails.
SLURM_TIMEOUT = 20.0
#: Slurm job states in which nothing runs yet, or no longer.
_WAITING = ("PENDING", "CONFIGURING", "REQUEUED", "RESV_DEL_HOLD", "REQUEUE_HOLD")
_SUSPENDED = ("SUSPENDED", "STOPPED")


def is_slurm(job: str) -> bool:
    return job.startswith(("slurm:", "slurm-"))


@attrs.frozen
class Target:
    """What a client asked for: a job (an array task), maybe a node."""

    job: int
    task: int | None = None
    node: str = ""
    #: A job step (broker/_slurmstep.py): its number, or "batch".
    step: str | None = None

    @property
    def name(self) -> str:
        return f"{self.job}_{self.task}" if self.task is not None else str(self.job)


def parse_target(text: str) -> Target:
    t = wire.parse_slurm_id(text)
    return Target(t.job, t.task, t.node, t.step)


@attrs.frozen
class SlurmJob:
    job_id: int
    owner_uid: int
    owner: str
    state: str
    reason: str
    batch_host: str
    nodes: tuple[str, ...]


class SlurmError(Exception):
    """Slurm could not answer; the message says why."""


def _env(slurm_conf: str) -> dict[str, str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}
    conf = slurm_conf or os.environ.get("SLURM_CONF", "")
    if conf:
        env["SLURM_CONF"] = conf
    return env


async def _run(argv: list[str], slurm_conf: str) -> tuple[int, str, str]:
    try:
        with trio.fail_after(SLURM_TIMEOUT):
            r = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False, env=_env(slurm_conf)
            )
    except (OSError, trio.TooSlowError) as exc:
        raise SlurmError(f"{argv[0]}: {exc or 'timed out'}") from None
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def parse_show_job(text: str) -> dict[str, str]:
    """One line of ``scontrol show job -o``: ``Key=value`` words (values may hold spaces)."""
    out: dict[str, str] = {}
    for part in re.split(r" (?=[A-Za-z][A-Za-z0-9/:_]*=)", text.strip()):
        key, sep, value = part.partition("=")
        if sep:
            out[key] = value
    return out


def _uid_in(text: str) -> int:
    m = re.match(r".*\((\d+)\)$", text)
    return int(m.group(1)) if m else -1


async def lookup(target: Target, slurm_conf: str) -> SlurmJob | None:
    """The job as Slurm's controller sees it; None if Slurm does not know it (any more)."""
    rc, out, err = await _run(["scontrol", "show", "job", "-o", target.name], slurm_conf)
    if rc != 0:
        if "Invalid job id" in err:
            return None
        raise SlurmError(err.strip().removeprefix("slurm_load_jobs error: ") or f"rc {rc}")
    rows = [parse_show_job(line) for line in out.splitlines() if line.strip()]
    if target.task is not None:
        rows = [r for r in rows if r.get("ArrayTaskId") == str(target.task)]
    elif len(rows) > 1:
        tasks = ", ".join(f"{target.job}_{r.get('ArrayTaskId', '?')}" for r in rows[:5])
        raise SlurmError(f"Slurm job {target.job} is an array: name one task ({tasks} ...)")
    if not rows:
        return None
    row = rows[0]
    nodes: tuple[str, ...] = ()
    nodelist = row.get("NodeList", "")
    if nodelist and nodelist != "(null)":
        rc, out, err = await _run(["scontrol", "show", "hostnames", nodelist], slurm_conf)
        if rc != 0:
            raise SlurmError(f"cannot expand node list {nodelist}: {err.strip()}")
        nodes = tuple(out.split())
    return SlurmJob(
        job_id=int(row.get("JobId", "0")),
        owner_uid=_uid_in(row.get("UserId", "")),
        owner=row.get("UserId", "").partition("(")[0],
        state=row.get("JobState", ""),
        reason=row.get("Reason", ""),
        batch_host=row.get("BatchHost", ""),
        nodes=nodes,
    )


_operators: dict[str, int] = {}


async def slurm_user(slurm_conf: str) -> int:
    """SlurmUser's uid (read once per slurm.conf from ``scontrol show config``)."""
    if slurm_conf not in _operators:
        rc, out, _err = await _run(["scontrol", "show", "config"], slurm_conf)
        uid = 0
        for line in out.splitlines() if rc == 0 else ():
            key, _, value = line.partition("=")
            if key.strip() == "SlurmUser":
                uid = max(0, _uid_in(value.strip()))
        _operators[slurm_conf] = uid
    return _operators[slurm_conf]


async def refusal(
    conns: Connections, target: Target, job: SlurmJob | None, uid: int
) -> wire.Error | None:
    """Why ``uid`` may not enter ``job`` now (None: it may)."""
    bc = conns.bc
    if not bc.allow_ssh:
        return wire.Error("ssh_off", "ssh-to-job is turned off in this pool (broker.allow_ssh)")
    if _names_uid(bc.ssh_denied_users, uid):
        return wire.Error(
            "ssh_off",
            f"ssh-to-job is turned off for {user_name(uid)} in this pool (broker.ssh_denied_users)",
        )
    name = f"slurm:{target.name}"
    if job is None:
        return wire.Error(
            "unknown_job",
            f"Slurm does not know job {target.name} (it never existed, or ended long ago)",
        )
    allowed = (
        uid == job.owner_uid
        or uid == 0
        or uid == await slurm_user(bc.slurm_conf)
        or _names_uid(bc.slurm_operators, uid)
        or conns.jobs.is_superuser(uid)
    )
    if not allowed:
        return wire.Error(
            "denied",
            f"Slurm job {target.name} belongs to {job.owner or job.owner_uid}; only its owner, "
            "a Slurm operator or a queue superuser may ssh into it",
        )
    if job.state in _WAITING:
        return wire.Error(
            "idle",
            f"Slurm job {target.name} is pending ({job.reason}); use -auto-retry to wait for it "
            "to start",
        )
    if job.state in _SUSPENDED:
        return wire.Error("suspended", f"Slurm job {target.name} is suspended")
    if job.state != "RUNNING":
        return wire.Error(
            "finished", f"{name} is {job.state.lower()}; there is nothing to connect to"
        )
    return None


def choose_node(target: Target, job: SlurmJob) -> str | wire.Error:
    """The node to enter: the one named (by index or name), else the batch host."""
    if not target.node:
        return job.batch_host or (job.nodes[0] if job.nodes else "")
    if target.node.isdigit():
        i = int(target.node)
        if i >= len(job.nodes):
            return wire.Error(
                "bad_request",
                f"Slurm job {target.name} runs on {len(job.nodes)} node(s) "
                f"({', '.join(job.nodes)}); there is no node {i}",
            )
        return job.nodes[i]
    if target.node not in job.nodes:
        return wire.Error(
            "bad_request",
            f"Slurm job {target.name} does not run on {target.node} (its nodes: "
            f"{', '.join(job.nodes)})",
        )
    return target.node


def host_names(target: Target, job: SlurmJob, node: str) -> tuple[str, ...]:
    """Every name a laptop may give this session's host (``ssh job-slurm-1234``, or
    ``job-slurm:1234``, with ``.STEP`` for a job step): the job as asked and as Slurm numbers
    it, bare only on its default node, and ``+NODE``/``+INDEX`` for the node entered. The
    session's host certificate carries them all, and nothing else: no other job's name, no
    other node's."""
    step = f".{target.step}" if target.step else ""
    bases = dict.fromkeys(
        f"job-slurm{sep}{j}{step}" for sep in "-:" for j in (target.name, job.job_id)
    )
    # Bare: asked with no node (this session is on the default node by definition: for a
    # step, the one its node choice made), or on the node the bare name would choose.
    bare = not target.node or node == choose_node(attrs.evolve(target, node=""), job)
    suffixes = [""] if bare else []
    suffixes += [f"+{node}"] + [f"+{i}" for i, n in enumerate(job.nodes) if n == node]
    names = [b + s for b in bases for s in suffixes]
    # ssh lowercases the host name it checks a certificate against (node names may not be).
    return tuple(dict.fromkeys([*names, *(n.lower() for n in names)]))


async def route(conns: Connections, msg: wire.SshRequest, uid: int) -> Route | Refused:
    """Where an ``SshRequest`` for a Slurm job goes (the node's starter), or why it may not."""
    job: SlurmJob | None = None
    try:
        target = parse_target(msg.job)
    except ValueError as exc:
        return Refused(wire.Error("bad_request", str(exc)), msg.job[:64])
    name = f"slurm:{target.name}"
    error: wire.Error | None = None
    key = msg.client_key
    if len(key) > MAX_CLIENT_KEY or "\n" in key or "\r" in key or not key.startswith(_KEY_PREFIXES):
        error = wire.Error("bad_request", "client_key is not an OpenSSH public key line")
    elif not conns.bc.slurm:
        error = wire.Error(
            "unknown_job", f"this pool has no Slurm backend ([broker] slurm); {name} is unknown"
        )
    else:
        try:
            job = await lookup(target, conns.bc.slurm_conf)
            error = await refusal(conns, target, job, uid)
        except SlurmError as exc:
            error = wire.Error("unavailable", f"cannot ask Slurm about {name}: {exc}")
    if error is None and job is not None:
        try:
            chosen = (
                choose_node(target, job)
                if target.step is None
                else await step_node(
                    job.job_id,
                    target.name,
                    target.step,
                    target.node,
                    job.batch_host,
                    job.nodes,
                    conns.bc.slurm_conf,
                )
            )
        except SlurmError as exc:
            chosen = wire.Error("unavailable", f"cannot ask Slurm about {name}: {exc}")
        if isinstance(chosen, wire.Error):
            error = chosen
        else:
            # The starter gets the job's own number: array tasks and names end here.
            return Route(
                job=f"slurm:{job.job_id}" + (f".{target.step}" if target.step else ""),
                owner_uid=job.owner_uid,
                starter=chosen,
                host_names=host_names(target, job, chosen),
                missing=f"{name} runs on {chosen}, where no ssh-to-job starter is connected",
                where=f" on {chosen}",
            )
    assert error is not None
    return Refused(error, name, job.owner_uid if job is not None else -1)
