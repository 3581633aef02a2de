"""Which part of ssh_to_job may import which: the one readable place, enforced on every module.

docs/architecture.md draws the same table. An edge that is not listed here fails the suite, so
a daemon cannot creep into the client's start-up, trio cannot creep into ``wire``, and no part
reaches into another's private modules.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

import ssh_to_job

PACKAGE = pathlib.Path(ssh_to_job.__file__).parent

#: part -> what it may import besides the standard library and itself.
#: Parts are subpackages of ssh_to_job; other names are third-party distributions.
ALLOWED: dict[str, frozenset[str]] = {
    # The protocol, sans-IO: no trio, no sockets, no other part.
    "wire": frozenset({"attrs", "nacl"}),
    # Config, key files, logging, the pool CA and join tokens: shared by every process, so no
    # trio (cryptography for the PKI; imported only by what issues or checks certificates).
    "common": frozenset({"wire", "attrs", "cryptography"}),
    # The daemons' trio adapter.
    "transport": frozenset({"wire", "trio"}),
    # The shim's Python half: opened with cffi, spoken to over a socket.
    "preload": frozenset({"attrs", "cffi"}),
    "broker": frozenset({"wire", "common", "transport", "trio", "attrs", "cryptography"}),
    "starter": frozenset(
        {"wire", "common", "transport", "preload", "trio", "attrs", "cryptography", "cffi"}
    ),
    # The client: blocking, lean start-up; never a daemon, never the daemons' adapter.
    # (cryptography only for -keygen-options rsa/ecdsa, imported when asked for.)
    "client": frozenset({"wire", "common", "attrs", "cryptography"}),
    # The package root holds only its docstring and version.
    "": frozenset(),
}

#: Private modules of another part that a part may still import (none: use the public API).
PRIVATE_OK: frozenset[tuple[str, str]] = frozenset()


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _part(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else ""


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the module, nested ones included."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    pkg = list(rel.parts[:-1])  # the package a relative import starts from (also for __init__)
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            if mod == "ssh_to_job":
                out += [(node.lineno, f"ssh_to_job.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def _edges() -> list[tuple[str, str, str, int]]:
    """(part, imported thing, module file, line) for every import that leaves the stdlib."""
    edges = []
    for path in _modules():
        part = _part(path)
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if top == "ssh_to_job":
                parts = name.split(".")
                # ssh_to_job.<part>...; anything else is the root's metadata (__version__).
                target = parts[1] if len(parts) > 1 and parts[1] in ALLOWED else ""
                if target in (part, ""):
                    continue
                if any(p.startswith("_") for p in parts[2:]) and (part, name) not in PRIVATE_OK:
                    edges.append((part, name + " (private)", str(path), line))
                    continue
                edges.append((part, target, str(path), line))
            else:
                edges.append((part, top, str(path), line))
    return edges


def test_every_module_belongs_to_a_known_part() -> None:
    """A new subpackage must be given its place in ALLOWED (and in docs/architecture.md)."""
    assert {_part(p) for p in _modules()} <= set(ALLOWED)


def test_no_import_crosses_a_boundary() -> None:
    """Every import of every installed module is an edge the architecture allows."""
    bad = [
        f"{where}:{line}: {part or 'ssh_to_job'} imports {what}"
        for part, what, where, line in _edges()
        if what not in ALLOWED[part]
    ]
    assert not bad, "imports outside the allowed set:\n" + "\n".join(bad)


def test_the_checker_sees_real_edges() -> None:
    """The walk finds the edges we know exist, so an empty result above means something."""
    edges = {(part, what) for part, what, _w, _l in _edges()}
    assert ("starter", "preload") in edges
    assert ("broker", "transport") in edges
    assert ("client", "wire") in edges
    assert ("wire", "attrs") in edges


@pytest.mark.parametrize(
    ("part", "forbidden"),
    [
        ("client", "broker"),
        ("client", "starter"),
        ("client", "transport"),
        ("client", "trio"),
        ("wire", "trio"),
        ("common", "trio"),
        ("broker", "starter"),
        ("starter", "broker"),
    ],
)
def test_forbidden_edges_stay_forbidden(part: str, forbidden: str) -> None:
    """The edges the design rules out are not in the table by mistake."""
    assert forbidden not in ALLOWED[part]


def test_the_installed_package_is_under_test() -> None:
    """The suite imports the installed package (with its built shim), not the source tree."""
    assert "site-packages" in PACKAGE.parts
    assert (PACKAGE / "preload" / "libstjshim.so").is_file()


def test_one_top_level_name() -> None:
    """The install adds exactly one importable name, ssh_to_job, to site-packages."""
    site = PACKAGE.parent
    ours = set()
    for dist in site.glob("ssh_to_job-*.dist-info"):
        record = (dist / "RECORD").read_text().splitlines()
        ours |= {line.split(",")[0].split("/")[0] for line in record}
    tops = {t for t in ours if not t.endswith(".dist-info") and t != ".." and t != "../.."}
    assert tops == {"ssh_to_job"}
