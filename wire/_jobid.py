"""Job ids: ``cluster``, ``cluster.proc`` or ``cluster.proc.node``, as HTCondor spells them,
and Slurm jobs as ssh-to-job names them (``slurm:1234_7.0+n2``)."""

from __future__ import annotations

import re

import attrs

# [0-9], not \d: \d also matches other scripts' digits ("١٢"), which int() would accept.
_JOB_RE = re.compile(r"^([0-9]{1,12})(?:\.([0-9]{1,9}))?(?:\.([0-9]{1,9}))?$")


@attrs.frozen
class JobId:
    cluster: int
    proc: int | None = None
    node: int | None = None

    def __str__(self) -> str:
        if self.proc is None:
            return str(self.cluster)
        return f"{self.cluster}.{self.proc}"

    @property
    def one(self) -> str:
        """The single job this id names for ssh: a bare cluster means proc 0."""
        return f"{self.cluster}.{self.proc or 0}"

    def matches(self, job_id: str) -> bool:
        cluster, _, proc = job_id.partition(".")
        if int(cluster) != self.cluster:
            return False
        return self.proc is None or int(proc) == self.proc


def parse_job_id(text: str) -> JobId:
    m = _JOB_RE.match(text.strip())
    if not m:
        raise ValueError(
            f"{text!r} is not a job id (expected cluster, cluster.proc or cluster.proc.node)"
        )
    cluster, proc, node = m.groups()
    return JobId(
        int(cluster),
        None if proc is None else int(proc),
        None if node is None else int(node),
    )


#: A Slurm job as ssh-to-job names it: ``slurm:JOB``, an array task ``_TASK``, a job step
#: ``.STEP`` (a number, or ``batch``), a node of the allocation ``+INDEX`` or ``+NODE``.
#: ``slurm-`` is the same as ``slurm:`` (rsync splits host and path at the first colon).
_SLURM_RE = re.compile(
    r"slurm[:-]([0-9]{1,10})(?:_([0-9]{1,10}))?(?:\.([0-9]{1,9}|batch))?"
    r"(?:\+([A-Za-z0-9][A-Za-z0-9._-]{0,63}))?"
)


@attrs.frozen
class SlurmId:
    """A Slurm job, array task or job step, maybe on a named node (docs/slurm.md)."""

    job: int
    task: int | None = None
    #: A job step: its number as a string, or "batch"; None for the job itself.
    step: str | None = None
    #: A node of the allocation: its position (digits) or its NodeName; "" for the default.
    node: str = ""

    @property
    def name(self) -> str:
        """The job (or array task) as Slurm names it: ``1234`` or ``1234_7``."""
        return f"{self.job}_{self.task}" if self.task is not None else str(self.job)

    @property
    def step_name(self) -> str:
        """The job or its step as Slurm names it: ``1234``, ``1234_7.0``, ``1234.batch``."""
        return self.name if self.step is None else f"{self.name}.{self.step}"

    def __str__(self) -> str:
        return f"slurm:{self.step_name}" + (f"+{self.node}" if self.node else "")


def parse_slurm_id(text: str) -> SlurmId:
    """``slurm:JOB[_TASK][.STEP][+NODE]`` (or ``slurm-...``), or ``ValueError`` saying so."""
    m = _SLURM_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(
            f"{text!r} is not a Slurm job (slurm:JOB, slurm:JOB_TASK for an array task, "
            "slurm:JOB.STEP for a job step, +INDEX or +NODE for a node of its allocation)"
        )
    job, task, step, node = m.groups()
    if step is not None and step.isdigit():
        step = str(int(step))  # as Slurm reads it: 007 is step 7
    return SlurmId(int(job), None if task is None else int(task), step, node or "")
