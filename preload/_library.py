"""Finding the installed shim and checking that it is fit to preload into sshd."""

from __future__ import annotations

import ctypes
import importlib.resources
import os
import pathlib
import stat
from typing import Any

from ssh_to_job.preload._protocol import ENV_FD, ShimError

LIBRARY_NAME = "libstjshim.so"

SYMBOLS = ("getpwnam", "getpwuid", "getpwnam_r", "getpwuid_r", "getgrnam", "getgrnam_r")
"""What the shim exports, and all it exports."""


class _DlInfo(ctypes.Structure):
    _fields_ = (
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    )


def _libdl() -> Any:
    """libc's dlopen, dlsym, dladdr, dlclose and dlerror, with their C signatures."""
    libc = ctypes.CDLL(None)
    libc.dlopen.argtypes, libc.dlopen.restype = (ctypes.c_char_p, ctypes.c_int), ctypes.c_void_p
    libc.dlsym.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
    libc.dlsym.restype = ctypes.c_void_p
    libc.dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
    libc.dladdr.restype = ctypes.c_int
    libc.dlclose.argtypes, libc.dlclose.restype = (ctypes.c_void_p,), ctypes.c_int
    libc.dlerror.argtypes, libc.dlerror.restype = (), ctypes.c_char_p
    return libc


def shim_path() -> pathlib.Path:
    """The ``libstjshim.so`` installed with this package; ShimError if it is not there."""
    package = __name__.rpartition(".")[0]
    resource = importlib.resources.files(package).joinpath(LIBRARY_NAME)
    if not isinstance(resource, pathlib.Path):
        raise ShimError(
            f"the LD_PRELOAD shim {resource} is not a plain file on disk (zipped install?); "
            "install ssh-to-job as a normal directory package"
        )
    if not resource.is_file():
        raise ShimError(
            f"the LD_PRELOAD shim {resource} is missing: ssh-to-job was installed without "
            "building it. Reinstall it where a C compiler is available "
            "(pip install --force-reinstall ssh-to-job)"
        )
    return resource


def _check_exports(path: pathlib.Path) -> None:
    """Open the shim as the loader will (RTLD_NOW); each symbol must resolve to the shim itself.

    Through libc's own dl* functions with ctypes: nothing else is loaded into the starter."""
    dl = _libdl()
    handle = dl.dlopen(os.fsencode(path), os.RTLD_NOW | os.RTLD_LOCAL)
    if not handle:
        why = (dl.dlerror() or b"unknown error").decode(errors="replace")
        raise ShimError(f"the LD_PRELOAD shim {path} cannot be loaded: {why}")
    try:
        want = os.path.realpath(path)
        for name in SYMBOLS:
            fn = dl.dlsym(handle, name.encode())
            if not fn:
                raise ShimError(f"the LD_PRELOAD shim {path} does not define {name}")
            info = _DlInfo()
            if not dl.dladdr(fn, ctypes.byref(info)) or not info.dli_fname:
                raise ShimError(f"cannot tell where {name} in {path} comes from (dladdr failed)")
            where = os.path.realpath(os.fsdecode(info.dli_fname))
            if where != want:
                raise ShimError(
                    f"the LD_PRELOAD shim {path} does not export {name} itself "
                    f"(it resolves to {where}): it would not interpose it"
                )
    finally:
        dl.dlclose(handle)


def check_shim(path: pathlib.Path | None = None) -> pathlib.Path:
    """Check that ``path`` (default: :func:`shim_path`) is a shim the loader will preload.

    The loader silently ignores an LD_PRELOAD entry containing a space or a colon, so such
    paths are refused here; the file must be a regular file that neither group nor others can
    write, and opening it (dlopen with RTLD_NOW) must resolve all six interposed
    functions to the shim itself. Returns the path.
    """
    path = shim_path() if path is None else pathlib.Path(path)
    text = os.fsdecode(path)
    if not path.is_absolute():
        raise ShimError(f"the LD_PRELOAD shim path {text!r} must be absolute")
    for ch, what in ((" ", "a space"), (":", "a colon"), ("\t", "a tab"), ("\n", "a newline")):
        if ch in text:
            raise ShimError(
                f"the LD_PRELOAD shim path {text!r} contains {what}: the dynamic loader "
                "silently ignores such LD_PRELOAD entries. Install ssh-to-job under a path "
                "without spaces or colons"
            )
    try:
        st = os.stat(path)
    except OSError as e:
        raise ShimError(f"the LD_PRELOAD shim {text} is not usable: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise ShimError(f"the LD_PRELOAD shim {text} is not a regular file")
    if st.st_mode & 0o022:
        raise ShimError(
            f"the LD_PRELOAD shim {text} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): whoever can write it runs code in every "
            f"session's sshd. Fix it with: chmod go-w {text}"
        )
    if ENV_FD in os.environ:
        raise ShimError(
            f"cannot check the shim in a process whose environment sets {ENV_FD}: the shim "
            "would configure itself from that descriptor. Set it only for sshd"
        )
    _check_exports(path)
    return path
