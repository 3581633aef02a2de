"""The Slurm bench's judgement of where a session landed (bench/bench_slurm.py), on real text.

No timing here: these are the parsers that decide whether the report may say that a path
(ssh-to-job, srun, ssh through pam_slurm_adopt) put its session into the job's extern step.
The samples are what Debian's Slurm 22.05.8 printed on this machine.
"""

from __future__ import annotations

import pathlib
import sys

# Appended, not inserted: no bench module may shadow one the other tests import.
sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import bench_slurm

LISTPIDS = """\
PID      JOBID    STEPID   LOCALID GLOBALID
-1       1        extern   0       0
2152     1        extern   -       -
2729     1        extern   -       -
17937    1        0        0       0
2159     1        batch    0       0
"""

CGROUP_EXTERN = """\
6:freezer:/slurm_n1/uid_1007/job_1/step_extern
5:devices:/
0::/
"""


def test_adopted_session_is_extern() -> None:
    """A shell listed by listpids in the extern step and in step_extern's cgroup is adopted."""
    rec = bench_slurm.adoption_of(f"pid=2729\n{CGROUP_EXTERN}{LISTPIDS}", "1")
    assert rec == {
        "pid": 2729,
        "step": "extern",
        "cgroup": "/slurm_n1/uid_1007/job_1/step_extern",
        "in_job": True,
        "extern": True,
    }


def test_srun_step_is_in_job_but_not_extern() -> None:
    """An srun task (step 0) is in the job but not adopted into its extern step."""
    cg = "6:freezer:/slurm_n1/uid_1007/job_1/step_0\n"
    rec = bench_slurm.adoption_of(f"pid=17937\n{cg}{LISTPIDS}", "1")
    assert (rec["step"], rec["in_job"], rec["extern"]) == ("0", True, False)


def test_unlisted_or_other_job_is_not_in_job() -> None:
    """A pid Slurm does not list, or a cgroup of another job, never counts as adopted."""
    missing = bench_slurm.adoption_of(f"pid=4242\n{CGROUP_EXTERN}{LISTPIDS}", "1")
    assert (missing["in_job"], missing["extern"]) == (False, False)
    other = bench_slurm.adoption_of(f"pid=2729\n{CGROUP_EXTERN}{LISTPIDS}", "11")
    assert (other["cgroup"], other["in_job"], other["extern"]) == ("", False, False)
    assert bench_slurm.adoption_of("", "1")["pid"] == 0


def test_pam_stack_denies_unadopted_logins() -> None:
    """The namespace sshd's PAM stack names the module, the node, and denies on failure."""
    text = bench_slurm.pam_service_file("/usr/lib/security/pam_slurm_adopt.so", "n7")
    account = [line for line in text.splitlines() if line.startswith("account")]
    assert len(account) == 1
    words = account[0].split()
    assert words[1:3] == ["required", "/usr/lib/security/pam_slurm_adopt.so"]
    assert {"action_adopt_failure=deny", "action_no_jobs=deny", "nodename=n7"} <= set(words)
    assert "auth     required pam_deny.so" in text
