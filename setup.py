"""Build hook: compile the LD_PRELOAD shim (preload/stjshim.c) into preload/libstjshim.so,
the ProxyCommand helper (client/stj-fdpass.c) into client/stj-fdpass, the jobs' reaper
(starter/stj-reaper.c) into starter/stj-reaper, the sshd spawner (starter/stj-spawn.c) into
starter/libstjspawn.so, and the ``ssh-to-job`` command itself
(client/stj-front.c, installed as a script beside the Python client ``ssh-to-job-py``).

All metadata lives in pyproject.toml. The shim is a plain C shared object that depends only on
libc (it is preloaded into sshd, so it must not be a Python extension); it is built with the
system C compiler (``$CC``, else ``cc``) when the package is built or installed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution
from setuptools.errors import CompileError

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "preload" / "stjshim.c"
VERSION_SCRIPT = HERE / "preload" / "stjshim.map"
LIBRARY = "libstjshim.so"
CFLAGS = [
    "-shared",
    "-fPIC",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fvisibility=hidden",
]
LDFLAGS = ["-Wl,-z,now", "-Wl,--as-needed"]

NO_COMPILER = (
    "ssh-to-job: building the LD_PRELOAD shim (preload/stjshim.c) needs a C compiler, and "
    "{what}. Install one (Debian/Ubuntu: apt-get install gcc libc6-dev; RHEL: dnf install "
    "gcc glibc-devel) or point $CC at it, then install ssh-to-job again."
)


def compiler() -> list[str]:
    """The C compiler command: $CC (may carry arguments, e.g. 'ccache gcc') or cc."""
    argv = shlex.split(os.environ.get("CC", "")) or ["cc"]
    if shutil.which(argv[0]) is None:
        raise CompileError(NO_COMPILER.format(what=f"{argv[0]!r} was not found"))
    return argv


FDPASS_SOURCE = HERE / "client" / "stj-fdpass.c"
FDPASS = "stj-fdpass"
REAPER_SOURCE = HERE / "starter" / "stj-reaper.c"
REAPER = "stj-reaper"
SPAWN_SOURCE = HERE / "starter" / "stj-spawn.c"
SPAWN = "libstjspawn.so"


def compile_program(source: Path, out: Path, what: str, defines: tuple[str, ...] = ()) -> None:
    """A plain C program, so it starts in well under a millisecond."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    flags = [f"-D{d}" for d in defines]
    argv = [*compiler(), "-O2", "-Wall", "-Wextra", "-Werror", *flags, "-o", str(tmp), str(source)]
    print(f"building {what}:", shlex.join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CompileError(
            f"ssh-to-job: compiling {source.name} failed:\n{proc.stdout}{proc.stderr}"
        )
    tmp.chmod(0o755)
    tmp.replace(out)


def compile_fdpass(out: Path) -> None:
    """The ProxyCommand helper (on the critical path of every session)."""
    compile_program(FDPASS_SOURCE, out, "the proxy helper")


def compile_reaper(out: Path) -> None:
    """The first process of every job: keeps its exit status for a restarted starter."""
    compile_program(REAPER_SOURCE, out, "the job reaper")


def compile_spawn(out: Path) -> None:
    """The starter's clone3 spawner for sshd, loaded with cffi in ABI mode (libc only)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    argv = [*compiler(), *CFLAGS, *LDFLAGS, "-o", str(tmp), str(SPAWN_SOURCE)]
    print("building the sshd spawner:", shlex.join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CompileError(
            f"ssh-to-job: compiling {SPAWN_SOURCE.name} failed:\n{proc.stdout}{proc.stderr}"
        )
    tmp.chmod(0o755)
    tmp.replace(out)


def compile_shim(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    argv = [
        *compiler(),
        *CFLAGS,
        f"-Wl,--version-script={VERSION_SCRIPT}",
        *LDFLAGS,
        "-o",
        str(tmp),
        str(SOURCE),
    ]
    print("building the shim:", shlex.join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as e:
        raise CompileError(NO_COMPILER.format(what=f"running {argv[0]!r} failed: {e}")) from e
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CompileError(
            f"ssh-to-job: compiling the LD_PRELOAD shim failed (exit {proc.returncode}):\n"
            f"{proc.stdout}{proc.stderr}\n"
            "Is the C library's development package installed (Debian: libc6-dev)?"
        )
    tmp.chmod(0o755)
    tmp.replace(out)


class BuildPyWithShim(build_py):
    """build_py that also compiles the shim into the built ``preload`` package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            # Editable installs import preload/ from the source tree: build it there.
            compile_shim(HERE / "preload" / LIBRARY)
            compile_fdpass(HERE / "client" / FDPASS)
            compile_reaper(HERE / "starter" / REAPER)
            compile_spawn(HERE / "starter" / SPAWN)
        else:
            compile_shim(Path(self.build_lib) / "ssh_to_job" / "preload" / LIBRARY)
            compile_fdpass(Path(self.build_lib) / "ssh_to_job" / "client" / FDPASS)
            compile_reaper(Path(self.build_lib) / "ssh_to_job" / "starter" / REAPER)
            compile_spawn(Path(self.build_lib) / "ssh_to_job" / "starter" / SPAWN)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs: list[str] = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(str(Path(self.build_lib) / "ssh_to_job" / "preload" / LIBRARY))
            outputs.append(str(Path(self.build_lib) / "ssh_to_job" / "client" / FDPASS))
            outputs.append(str(Path(self.build_lib) / "ssh_to_job" / "starter" / REAPER))
            outputs.append(str(Path(self.build_lib) / "ssh_to_job" / "starter" / SPAWN))
        return outputs


FRONT_SOURCE = HERE / "client" / "stj-front.c"
FRONT = "ssh-to-job"
CLI = "stj"


# setuptools re-exports no build_scripts of its own: take the command class it would run.
build_scripts = Distribution().get_command_class("build_scripts")


class BuildScriptsWithFront(build_scripts):  # type: ignore[misc,valid-type]
    """The ``ssh-to-job`` on PATH is the compiled front (client/stj-front.c): a repeat command
    through a live master never starts Python; everything else execs ``ssh-to-job-py`` (the
    ``[project.scripts]`` entry point) found beside it. ``stj`` is that front built with
    ``CLI_ONLY``: it execs ``stj-py`` beside it. install_scripts copies the build
    directory as it is, so pip installs the binary like any script, in venvs and elsewhere."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.scripts = self.scripts or []

    def run(self) -> None:
        super().run()
        out = Path(self.build_dir) / FRONT
        compile_program(FRONT_SOURCE, out, "the ssh-to-job front")
        # `stj`: the same front without its repeat path, starting `stj-py` isolated.
        compile_program(FRONT_SOURCE, out.with_name(CLI), "the stj front", ("CLI_ONLY",))


install_scripts = Distribution().get_command_class("install_scripts")


class InstallScriptsWithFront(install_scripts):  # type: ignore[misc,valid-type]
    """setuptools' install_scripts copies built scripts only when ``scripts`` lists some: copy
    the front too (into the wheel's scripts, which pip installs beside the entry points)."""

    def run(self) -> None:
        super().run()
        if not self.distribution.scripts:
            self.outfiles = [*self.outfiles, *self.copy_tree(self.build_dir, self.install_dir)]


class BinaryDistribution(Distribution):
    """The wheel carries a native library: tag it for this platform, not py3-none-any."""

    def has_ext_modules(self) -> bool:
        return True

    def has_scripts(self) -> bool:
        # The front is built, not listed in ``scripts``: build_scripts and install_scripts
        # must run anyway.
        return True


setup(
    cmdclass={
        "build_py": BuildPyWithShim,
        "build_scripts": BuildScriptsWithFront,
        "install_scripts": InstallScriptsWithFront,
    },
    distclass=BinaryDistribution,
)
