"""`stj ssh-config`: plain `ssh job-N.M` (and so VS Code Remote-SSH) into a running job."""

from __future__ import annotations

import concurrent.futures
import pathlib
import subprocess

from conftest import STJ, Pool, User


def _install_config(pool: Pool, user: User) -> pathlib.Path:
    r = pool.run(user, [STJ, "ssh-config"], check=True)
    assert "Host job-*" in r.stdout
    assert "ProxyUseFdpass yes" in r.stdout
    assert "StrictHostKeyChecking yes" in r.stdout
    cfg = pathlib.Path(user.home) / ".ssh-to-job-test-config"
    cfg.write_text(r.stdout)
    return cfg


def test_plain_ssh_with_generated_config(pool: Pool, users: dict[str, User]) -> None:
    """With the printed block as its config, plain ssh (three at once) lands in the job."""
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    info = pool.wait_state(job, "running")
    cfg = _install_config(pool, a)

    def one(i: int) -> subprocess.CompletedProcess[str]:
        return pool.run(a, ["ssh", "-F", str(cfg), f"job-{job}", f"echo {i} $(id -u) $PWD"])

    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        results = list(ex.map(one, range(3)))
    for i, r in enumerate(results):
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [str(i), str(a.uid), info["scratch"]]
    conf = pathlib.Path(a.home) / ".config" / "ssh-to-job"
    assert oct(conf.stat().st_mode & 0o777) == "0o700"
    assert oct((conf / "id_ed25519").stat().st_mode & 0o777) == "0o600"
    pinned = (conf / "known_hosts").read_text().splitlines()
    assert len(pinned) >= 3
    assert all(line.startswith(f"job-{job} ssh-ed25519 ") for line in pinned[-3:])


def test_ssh_config_refuses_other_users_job(pool: Pool, users: dict[str, User]) -> None:
    """The ssh_config path goes through the same authorization: b cannot enter a's job."""
    a, b = users["a"], users["b"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    pool.wait_state(job, "running")
    cfg = _install_config(pool, b)
    r = pool.run(b, ["ssh", "-F", str(cfg), f"job-{job}", "true"])
    assert r.returncode != 0
    # One line of ours; no internal module names, no OpenSSH fd-passing noise.
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"ssh-to-job: job {job} belongs to {a.name}"), r.stderr
    assert "ideproxy" not in r.stderr
    assert "proxy dialer" not in r.stderr


def test_ssh_config_works_without_the_variables_it_was_made_with(
    pool: Pool, users: dict[str, User]
) -> None:
    """A block made with STJ_STATE_DIR set works from an environment without it (VS Code)."""
    a = users["a"]
    (job,) = pool.submit(a, "/bin/sleep", "300")
    info = pool.wait_state(job, "running")
    cfg = _install_config(pool, a)
    assert str(pool.state / "broker.sock") in cfg.read_text()
    env = {"PATH": "/usr/bin:/bin", "HOME": a.home, "LANG": "C.UTF-8"}
    r = subprocess.run(
        [*a.prefix(), "ssh", "-F", str(cfg), f"job-{job}", "pwd"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd="/tmp",
        check=False,
    )
    assert (r.returncode, r.stdout.strip()) == (0, info["scratch"]), r.stderr
    pool.stj(a, "rm", job)
