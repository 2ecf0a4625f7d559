"""Side-by-side budget evidence of finished runs: the constrained sizes at every epoch end, and
what each run delivered (``best.pt``: accuracy, size, how the budget was met).

    python scripts/budget_evidence.py dual-s0=runs/dual-s0 fixed-s0=runs/fixed-s0 ... > table.md

Each argument is ``LABEL=RUN_DIR`` (a ``mixq train`` run folder with ``config.yaml``,
``metrics.jsonl`` and, when finished, ``summary.json``). Sizes are in KiB; a size over its
budget (``config.yaml``'s ``budget``; 1 KB = 1024 bytes, as in
``mixq.cost.parse_size``) is marked **over**.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from mixq.cost import parse_size
from mixq.train.budget_run import SIZE_METRICS as MEASURES


def budgets(run: Path) -> dict[str, float]:
    """``{budget key: budget in KiB}`` of the run's set budgets that ``metrics.jsonl`` logs."""
    budget = yaml.safe_load((run / "config.yaml").read_text()).get("budget") or {}
    if budget.get("activation_peak") is not None:
        print(f"note: {run}: the activation peak budget is not logged per epoch; not shown",
              file=sys.stderr)  # fmt: skip
    return {k: parse_size(budget[k]) / 1024 for k in MEASURES if budget.get(k) is not None}


def rows(run: Path) -> list[dict]:
    """The run's per-epoch metrics (the last row of an epoch logged twice, after a resume)."""
    by_epoch = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_epoch[r["epoch"]] = r
    return [by_epoch[e] for e in sorted(by_epoch)]


def cell(r: dict, limits: dict[str, float]) -> str:
    parts, over = [], False
    for key, limit in limits.items():
        v = r.get(MEASURES[key])
        if v is None:
            parts.append("-")
            continue
        parts.append(f"{v:.2f}")
        over |= v > limit * (1 + 1e-9)
    text = " / ".join(parts) + (" **over**" if over else "")
    return text + (" (frozen)" if r.get("bits_frozen") else "")


def delivered(label: str, run: Path, limits: dict[str, float]) -> str:
    path = run / "summary.json"
    if not path.is_file():
        return f"| {label} | not finished | | | |"
    s = json.loads(path.read_text())
    best, final = s.get("best") or {}, s["final"]
    sizes = " / ".join(f"{best.get(MEASURES[k]):.2f}" for k in limits
                       if best.get(MEASURES[k]) is not None)  # fmt: skip
    met = all(best.get(MEASURES[k], 0) <= lim * (1 + 1e-9) for k, lim in limits.items())
    freeze = ((s.get("budget_control") or {}).get("freeze")) or {}
    how = freeze.get("how", "selection (fixed lambda)")
    if freeze.get("changes"):
        how += ": " + ", ".join(f"{c['site']} {c['from_bits']}->{c['to_bits']}"
                                for c in freeze["changes"])  # fmt: skip
    acc = best.get("acc")
    return (f"| {label} | {100 * acc:.2f}% (epoch {best.get('epoch')}) | {sizes} "
            f"{'met' if met else '**not met**'} | {100 * final['test_acc']:.2f}% | {how} |"
            if acc is not None else f"| {label} | no epoch met the budget | | "
            f"{100 * final['test_acc']:.2f}% | {how} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    args = p.parse_args(argv)
    runs = []
    for a in args.runs:
        label, sep, path = a.partition("=")
        if not sep or not (Path(path) / "metrics.jsonl").is_file():
            p.error(f"{a!r}: expected LABEL=RUN_DIR with RUN_DIR/metrics.jsonl")
        runs.append((label, Path(path)))
    limits = budgets(runs[0][1])
    for label, run in runs[1:]:
        if budgets(run) != limits:
            p.error(f"{label}: budgets {budgets(run)} differ from {runs[0][0]}'s {limits}")
    data = {label: rows(run) for label, run in runs}
    epochs = sorted({r["epoch"] for rs in data.values() for r in rs})
    what = " / ".join(f"{k} (budget {v:.2f})" for k, v in limits.items())
    print(f"Constrained sizes (KiB) at each epoch end: {what}\n")
    print("| epoch | " + " | ".join(label for label, _ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for e in epochs:
        cells = []
        for label, _ in runs:
            r = next((r for r in data[label] if r["epoch"] == e), None)
            cells.append("" if r is None else cell(r, limits))
        print(f"| {e} | " + " | ".join(cells) + " |")
    print("\n| run | delivered best.pt | its sizes (KiB) | last epoch | how the budget was met |")
    print("|---|---|---|---|---|")
    for label, run in runs:
        print(delivered(label, run, limits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
