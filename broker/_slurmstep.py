"""``ssh-to-job slurm:JOB.STEP``: which nodes a running Slurm job step is on, and which to enter.

A session into a step enters the job (it is adopted into the job's extern step, as
``pam_slurm_adopt`` adopts) with that step's environment, working directory and processes, on
a node where the step runs. The controller says where: ``scontrol show step -o JOB`` lists the
job's live steps with their ``NodeList``. (Debian's 22.05 ``scontrol show step JOB.STEP``
cannot be trusted to filter: ``JOB.batch`` answers step 0, and an array task's ``JOB_T.0``
answers every step, so the broker asks for the job's steps and picks the one named.)

Must never: route a step session to a node the step does not run on; accept a step Slurm does
not list as running.
"""

from __future__ import annotations

import re

from ssh_to_job import wire


async def step_node(
    job_id: int,
    name: str,
    step: str,
    node: str,
    batch_host: str,
    nodes: tuple[str, ...],
    slurm_conf: str,
) -> str | wire.Error:
    """The node on which to enter step ``step`` of the running job ``job_id`` (``name`` as the
    user named it): ``node`` (an index into ``nodes``, the allocation, or a NodeName) if the
    step runs there, else the batch host if it does, else the step's first node."""
    from ._slurm import SlurmError, _run, parse_show_job

    rc, out, err = await _run(["scontrol", "show", "step", "-o", str(job_id)], slurm_conf)
    if rc != 0 and "Invalid job id" not in err:
        raise SlurmError(err.strip() or f"scontrol show step: rc {rc}")
    steps = {}
    for line in out.splitlines() if rc == 0 else ():
        row = parse_show_job(line)
        _, _, sid = row.get("StepId", "").rpartition(".")
        if sid and row.get("State", "RUNNING") == "RUNNING":
            steps[sid] = row.get("NodeList", "")
    if step not in steps:
        running = sorted((s for s in steps if s != "extern"), key=lambda s: (not s.isdigit(), s))
        return wire.Error(
            "finished",
            f"Slurm job {name} has no running step {step} "
            f"(running: {', '.join(running) or 'none'})",
        )
    step_nodes = await _hostnames(steps[step], slurm_conf)
    if not node:
        return batch_host if batch_host in step_nodes else step_nodes[0]
    chosen = node
    if node.isdigit():
        i = int(node)
        if i >= len(nodes):
            return wire.Error(
                "bad_request",
                f"Slurm job {name} runs on {len(nodes)} node(s) ({', '.join(nodes)}); "
                f"there is no node {i}",
            )
        chosen = nodes[i]
    if chosen not in step_nodes:
        return wire.Error(
            "bad_request",
            f"step {name}.{step} does not run on {chosen} (its nodes: {', '.join(step_nodes)})",
        )
    return chosen


async def _hostnames(nodelist: str, slurm_conf: str) -> tuple[str, ...]:
    from ._slurm import SlurmError, _run

    if re.fullmatch(r"[A-Za-z0-9._-]+", nodelist):
        return (nodelist,)
    rc, out, err = await _run(["scontrol", "show", "hostnames", nodelist], slurm_conf)
    if rc != 0 or not out.split():
        raise SlurmError(f"cannot expand node list {nodelist}: {err.strip()}")
    return tuple(out.split())
