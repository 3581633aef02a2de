"""Side by side: the set-up and throughput figures of several ``./dev bench`` runs.

For runs of the same phases with one path toggled each (``--starter-option 'use_shim =
false'``, ``'use_cgroups = false'``, ``taskset -c 0 ./dev bench``): each run pairs ssh-to-job
with the floor inside itself, so the ratios compare across runs even when the machine's load
moved between them. Usage: ``python bench/compare_runs.py NAME=results/X.json ...``.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

CASES = ("cat down", "cat up", "scp down", "scp up", "rsync down", "rsync up")


def _ratio(r: dict[str, Any] | None) -> str:
    if not r or "median" not in r:
        return "–"
    return f"{r['median']:.2f} [{r['p25']:.2f}–{r['p75']:.2f}]"


def table(runs: dict[str, dict[str, Any]]) -> str:
    names = list(runs)
    out = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    setup = {n: r["phases"].get("setup", {}) for n, r in runs.items()}
    for kex in ("ssh-to-job", "ssh-to-job curve25519"):
        cells = []
        for n in names:
            s = setup[n].get(kex)
            f = setup[n].get("floor" + kex[len("ssh-to-job") :])
            if not s or not f:
                cells.append("–")
                continue
            cells.append(
                f"{s['wall']['median'] * 1000:.0f} / {f['wall']['median'] * 1000:.0f} ms, "
                f"{_ratio(s.get('ratio'))}×; CPU {s['cpu']['median'] * 1000:.0f} / "
                f"{f['cpu']['median'] * 1000:.0f} ms"
            )
        out.append(f"| set-up, {kex} / floor | " + " | ".join(cells) + " |")
    for case in CASES:
        cells = []
        for n in names:
            row = runs[n]["phases"].get("throughput", {}).get("cases", {}).get(case)
            if not row:
                cells.append("–")
                continue
            st = row.get("stream_ratio")
            cells.append(
                f"{_ratio(row.get('ratio'))}; stream {st:.2f}" if st else _ratio(row.get("ratio"))
            )
        out.append(f"| {case}: end to end [p25–p75]; streaming | " + " | ".join(cells) + " |")
    loads = []
    for n in names:
        at = runs[n].get("loadavg_at_phase_start", {})
        loads.append(", ".join(f"{k} {v:.2f}" for k, v in at.items()) or "–")
    out.append("| 1-min load at phase starts | " + " | ".join(loads) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    runs: dict[str, dict[str, Any]] = {}
    for arg in argv:
        name, _, path = arg.partition("=")
        runs[name] = json.loads(pathlib.Path(path).read_text())
    sys.stdout.write(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
