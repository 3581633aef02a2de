"""Job ids: ``cluster``, ``cluster.proc`` or ``cluster.proc.node``, as HTCondor spells them."""

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
