"""Asking a Slurm job's extern-step ``slurmstepd`` to adopt a process, as ``pam_slurm_adopt`` does.

The extern step's slurmstepd (``PrologFlags=Contain``) listens on a unix socket in the node's
``SlurmdSpoolDir`` (``NODE_JOB.4294967292``). Its "add extern pid" request puts a pid into the
step's proctrack container *and* its task and jobacct_gather plugins: the session is then one
of the step's tasks for Slurm's accounting (``sstat``, ``sacct``), which a bare write into the
step's cgroups does not give. We call libslurm's own ``slurm_stepd_connect`` and
``slurm_stepd_add_extern_pid`` (exported by ``libslurm.so``; the prototypes and the
``slurm_step_id_t`` layout are those of Slurm 21.08 to 24.05) through cffi's ABI mode, so the
socket's protocol stays Slurm's. The slurmstepd answers only root and SlurmUser
(``SO_PEERCRED``): the starter, as root, may ask.

The call blocks (a connect and two round trips; the stepd writes cgroups and starts a thread
before it answers: about 0.5 to 15 ms measured): it runs in a worker thread, under a deadline,
never on the event loop.

Must never: block the event loop; load libslurm more than once per process; pass a step other
than the extern step (slurmstepd refuses, and pam_slurm_adopt adopts only there too).
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import trio

#: Slurm's step id of the extern step (``SLURM_EXTERN_CONT``) and its "no value" (``NO_VAL``).
EXTERN_STEP = 0xFFFFFFFC
NO_VAL = 0xFFFFFFFE
#: libslurm sonames whose ``stepd_connect``/``stepd_add_extern_pid`` have the prototypes below
#: (21.08 is .37, 22.05 .38 — Debian 12's, the one tested — 23.02 .39, 23.11 .40, 24.05 .41).
SONAMES = ("libslurm.so.38", "libslurm.so.37", "libslurm.so.39", "libslurm.so.40", "libslurm.so.41")
#: Seconds slurmstepd has to answer before the starter falls back to writing cgroups itself.
TIMEOUT = 5.0

_CDEF = """
typedef struct {
    uint32_t job_id;
    uint32_t step_het_comp;
    uint32_t step_id;
} slurm_step_id_t;
int slurm_stepd_connect(const char *directory, const char *nodename,
                        slurm_step_id_t *step_id, uint16_t *protocol_version);
int slurm_stepd_add_extern_pid(int fd, uint16_t protocol_version, int pid);
"""

_lock = threading.Lock()
_loaded: tuple[Any, Any] | None = None
_why_not = ""


class StepdError(Exception):
    """slurmstepd could not be asked, or refused; the message says why."""


def load() -> tuple[Any, Any]:
    """cffi's FFI and libslurm, opened once per process; ``StepdError`` if not here."""
    global _loaded, _why_not
    with _lock:
        if _loaded is not None:
            return _loaded
        if _why_not:
            raise StepdError(_why_not)
        try:
            import cffi  # type: ignore[import-untyped, unused-ignore]
        except ImportError as exc:  # pragma: no cover - cffi is a dependency
            _why_not = f"cffi: {exc}"
            raise StepdError(_why_not) from None
        ffi: Any = cffi.FFI()
        ffi.cdef(_CDEF)
        errors = []
        for name in SONAMES:
            try:
                lib = ffi.dlopen(name, ffi.RTLD_NOW | ffi.RTLD_LOCAL)
            except OSError as exc:
                errors.append(str(exc).split(":")[-1].strip() or name)
                continue
            _loaded = (ffi, lib)
            return _loaded
        _why_not = f"no libslurm with slurmstepd's API ({', '.join(SONAMES)}): {errors[0]}"
        raise StepdError(_why_not)


def available() -> bool:
    """Whether this process can ask slurmstepd (libslurm loads)."""
    try:
        load()
    except StepdError:
        return False
    return True


def spool_dir(template: str, node: str, host: str | None = None) -> str:
    """``SlurmdSpoolDir`` for ``node``, with Slurm's ``%n`` (node name) and ``%h`` (host)."""
    host = host if host is not None else socket.gethostname().split(".")[0]
    return template.replace("%n", node).replace("%h", host)


def socket_path(spool: str, node: str, job_id: int) -> str:
    """Where the extern step of ``job_id`` listens on ``node`` (as slurmstepd names it)."""
    return os.path.join(spool, f"{node}_{job_id}.{EXTERN_STEP}")


def add_extern_pid(spool: str, node: str, job_id: int, pid: int) -> None:
    """Blocking: have the extern step of ``job_id`` on ``node`` adopt ``pid``, or ``StepdError``."""
    ffi, lib = load()
    if not os.path.exists(socket_path(spool, node, job_id)):
        raise StepdError(f"no extern step socket {socket_path(spool, node, job_id)}")
    step = ffi.new("slurm_step_id_t *", (job_id, NO_VAL, EXTERN_STEP))
    version = ffi.new("uint16_t *")
    fd = lib.slurm_stepd_connect(os.fsencode(spool), node.encode(), step, version)
    if fd < 0:
        err = ffi.errno
        raise StepdError(f"cannot reach the extern step of job {job_id}: {os.strerror(err)}")
    try:
        rc = lib.slurm_stepd_add_extern_pid(fd, version[0], pid)
    finally:
        os.close(fd)
    if rc != 0:
        raise StepdError(f"slurmstepd of job {job_id} did not adopt pid {pid} (rc {rc})")


async def adopt(spool: str, node: str, job_id: int, pid: int) -> None:
    """``add_extern_pid`` in a worker thread, within ``TIMEOUT``; ``StepdError`` otherwise.

    A stepd that hangs keeps only that thread (abandoned): the caller falls back and goes on.
    """
    with trio.move_on_after(TIMEOUT):
        return await trio.to_thread.run_sync(
            add_extern_pid, spool, node, job_id, pid, abandon_on_cancel=True
        )
    raise StepdError(f"slurmstepd of job {job_id} did not answer within {TIMEOUT:g} s")
