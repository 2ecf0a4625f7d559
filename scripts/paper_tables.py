"""Run the paper's CIFAR-10 table rows as a resumable queue, and write their results table.

Every row is one ``mixq train`` process on its own run folder ``RUNS/ROW``; a row whose folder
has ``summary.json`` is done, one with ``last.pt`` is resumed (``--resume``), any other is
started. ``--parallel N`` runs N rows at once (one process each, ``--threads`` threads each);
``--time-limit S`` stops every process after S seconds (SIGTERM; ``last.pt`` is written
atomically at each epoch end, so the next call resumes from the last finished epoch). So the
same command, repeated, finishes the table in calls of any length: the CPU queue here
(``--schedule 15ep``, two 1-thread processes on two cores) and the paper's full 160-epoch
schedule on a GPU (``--schedule full --parallel 8 --time-limit 540``, in calls of under 10
minutes) alike.

    python scripts/paper_tables.py run --runs-dir RUNS --data-dir DATA \\
        --init ../shared/data/cifar10/resnet20-float-30ep.pt --parallel 2 --threads 1
    python scripts/paper_tables.py table --runs-dir RUNS > table.md

Rows and the paper's errors (spec ``docs/method.md`` sections 8.1-8.2) are in :data:`ROWS`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

#: Row -> (table, paper's error % with a float init (uniform or pow-2 column), label).
ROWS: dict[str, tuple[str, float | None, str]] = {
    # Table 3 first: its claims are the paper's headline.
    "u3-w70kb": ("3", 8.59, "Ours (8a), uniform"),
    "p3-w70kb": ("3", 8.53, "Ours (8a), pow-2"),
    "u3-w70kb-amax8kb": ("3", 8.58, "Ours (8a + 8c), uniform"),
    "p3-w70kb-amax8kb": ("3", 11.23, "Ours (8a + 8c), pow-2"),
    "u3-w70kb-asum92kb": ("3", 9.38, "Ours (8a + 8b), uniform"),
    "p3-w70kb-asum92kb": ("3", 11.29, "Ours (8a + 8b), pow-2"),
    "fixed-u-w2": ("3", 10.81, "Fixed 2/32, uniform"),
    "fixed-p-w2": ("3", 8.99, "Fixed 2/32, pow-2"),
    "tqt-u-w2": ("3", 9.47, "TQT 2/32, uniform"),
    "tqt-p-w2": ("3", 8.79, "TQT 2/32, pow-2"),
    "fixed-u-w2a4": ("3", 11.30, "Fixed 2/4, uniform"),
    "fixed-p-w2a4": ("3", 11.62, "Fixed 2/4, pow-2"),
    "tqt-u-w2a4": ("3", 9.62, "TQT 2/4, uniform"),
    "tqt-p-w2a4": ("3", 11.29, "TQT 2/4, pow-2"),
    # Table 1, float-net init column.
    "t1-u3-w-float": ("1", 7.32, "U3 (d, q_max), weights"),
    "t1-p3-w-float": ("1", 7.56, "P3 (q_min, q_max), weights"),
    "t1-u1-w-float": ("1", 8.18, "U1 (b, d), weights"),
    "t1-u2-w-float": ("1", 7.44, "U2 (b, q_max), weights"),
    "t1-p1-w-float": ("1", 23.01, "P1 (b, q_min), weights"),
    "t1-p2-w-float": ("1", 7.90, "P2 (b, q_max), weights"),
    "t1-u3-wa-float": ("1", 7.40, "U3 (d, q_max), weights + activations"),
    "t1-p3-wa-float": ("1", 9.86, "P3 (q_min, q_max), weights + activations"),
    "t1-u1-wa-float": ("1", 9.03, "U1 (b, d), weights + activations"),
    "t1-u2-wa-float": ("1", 7.74, "U2 (b, q_max), weights + activations"),
    "t1-p1-wa-float": ("1", 35.68, "P1 (b, q_min), weights + activations"),
    "t1-p2-wa-float": ("1", 11.68, "P2 (b, q_max), weights + activations"),
}


def preset_name(row: str, schedule: str) -> str:
    """``cifar10/resnet20/15ep/ROW`` for the short schedule, the paper's own preset for full."""
    return f"cifar10/resnet20/{row}" if schedule == "full" else f"cifar10/resnet20/15ep/{row}"


def row_state(run_dir: Path) -> str:
    """``done`` (summary.json), ``partial`` (last.pt) or ``new``."""
    if (run_dir / "summary.json").is_file():
        return "done"
    return "partial" if (run_dir / "last.pt").is_file() else "new"


def train_command(args: argparse.Namespace, row: str, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "mixq.cli", "train", "--run-dir", str(run_dir), "--no-progress"]
    if row_state(run_dir) == "partial":
        cmd.append("--resume")  # with the run's saved config.yaml, as it is
    else:
        cmd += ["--preset", preset_name(row, args.schedule), "--init", args.init]
        cmd += [a for s in args.set for a in ("--set", s)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return cmd


def run_queue(args: argparse.Namespace) -> int:
    """Run every selected row that is not done, ``args.parallel`` at a time."""
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    rows = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows are: {', '.join(ROWS)}")
    todo = [r for r in rows if row_state(runs / r) != "done"]
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    active: dict[str, subprocess.Popen] = {}
    failed: list[str] = []
    while todo or active:
        while todo and len(active) < args.parallel:
            row = todo.pop(0)
            cmd = train_command(args, row, runs / row)
            (runs / row).mkdir(exist_ok=True)
            log = open(runs / row / "train.log", "a")  # noqa: SIM115 (closed with the process)
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            log.flush()
            pre = (lambda: os.nice(args.nice)) if args.nice else None
            active[row] = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=pre
            )
            print(f"started {row} (pid {active[row].pid})", flush=True)
        time.sleep(1.0)
        if deadline is not None and time.monotonic() > deadline:
            for row, proc in active.items():
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                print(f"time limit: stopped {row} ({row_state(runs / row)})", flush=True)
            return 0
        for row, proc in list(active.items()):
            if proc.poll() is not None:
                del active[row]
                ok = proc.returncode == 0 and row_state(runs / row) == "done"
                word = "finished" if ok else "FAILED"
                print(f"{word} {row} (exit {proc.returncode})", flush=True)
                if not ok:
                    failed.append(row)
    if failed:
        print(f"failed rows (see RUNS/ROW/train.log): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_BUDGETS = ("weight", "activation_sum", "activation_max", "activation_peak")


def _budgeted(run_dir: Path) -> bool | None:
    """Whether the run's resolved config sets a memory budget (None: no config.yaml)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    budget = (yaml.safe_load(path.read_text()) or {}).get("budget") or {}
    return any(budget.get(k) is not None for k in _BUDGETS)


def row_result(run_dir: Path) -> dict | None:
    """The delivered numbers of one run: best test error among budget-meeting epochs, sizes,
    and ``rise``, the largest increase of the test error from one epoch to the next (points;
    0 when it never rose): how much the run oscillates, the paper's other Table 1 criterion."""
    rows = _metrics(run_dir)
    if not rows:
        return None
    met = [m for m in rows if m.get("budget_met")]
    best = max(met, key=lambda m: m["test_acc"]) if met else None
    last = rows[-1]
    errs = [100 * (1 - m["test_acc"]) for m in rows]
    return {
        "budgeted": _budgeted(run_dir),
        "rise": max([0.0] + [b - a for a, b in itertools.pairwise(errs)]),
        "epochs": len(rows),
        "state": row_state(run_dir),
        "err": None if best is None else 100 * (1 - best["test_acc"]),
        "best_epoch": None if best is None else best["epoch"],
        "final_err": 100 * (1 - last["test_acc"]),
        "weight_kib": (best or last)["weight_kib"],
        "act_max_kib": (best or last)["act_max_kib"],
        "act_sum_kib": (best or last)["act_sum_kib"],
        "met_epochs": len(met),
        "nonfinite": any(m.get("train_loss") != m.get("train_loss") for m in rows),
    }


def write_table(args: argparse.Namespace) -> int:
    """Markdown: one table per paper table, each row the paper's error next to mixq's."""
    runs = Path(args.runs_dir)
    float_err = args.float_err
    out = []
    for table in ("3", "1"):
        out += [
            f"\n#### Table {table}\n",
            "| row | paper err | mixq err (best epoch) | gap to float | final err | largest rise | "
            "W KiB | A max KiB | A sum KiB | budget met (epochs) | epochs run |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row, (tab, paper, label) in ROWS.items():
            if tab != table:
                continue
            r = row_result(runs / row)
            if r is None:
                started = (runs / row / "config.yaml").is_file()
                what = "started, no epoch finished yet" if started else "not run"
                out.append(f"| {label} (`{row}`) | {paper:.2f}% | {what} | | | | | | | | |")
                continue
            err = "no epoch met the budget" if r["err"] is None else (
                f"{r['err']:.2f}% ({r['best_epoch']})"
            )
            gap = "" if r["err"] is None else f"{r['err'] - float_err:+.2f}"
            state = "" if r["state"] == "done" else " (unfinished)"
            if r["nonfinite"]:
                state += " (non-finite loss)"
            out.append(
                f"| {label} (`{row}`) | {paper:.2f}% | {err} | {gap} | {r['final_err']:.2f}% | "
                f"{r['rise']:.2f} | {r['weight_kib']:.2f} | {r['act_max_kib']:.2f} | "
                f"{r['act_sum_kib']:.2f} | "
                f"{'no budget' if r['budgeted'] is False else r['met_epochs']} | "
                f"{r['epochs']}{state} |"
            )
    print("\n".join(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the rows that are not done (resuming partial ones)")
    r.add_argument("--runs-dir", required=True)
    r.add_argument("--data-dir")
    r.add_argument("--init", required=True, help="the float checkpoint every row starts from")
    r.add_argument("--schedule", choices=("15ep", "full"), default="15ep")
    r.add_argument("--rows", help="comma-separated rows (default: all, Table 3 first)")
    r.add_argument("--parallel", type=int, default=2)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--nice", type=int, default=0, help="niceness of the training processes")
    r.add_argument("--time-limit", type=float, default=0, help="stop all after S seconds")
    r.add_argument("--set", action="append", default=[], help="config override for new rows")
    t = sub.add_parser("table", help="print the results as markdown")
    t.add_argument("--runs-dir", required=True)
    t.add_argument("--float-err", type=float, default=100 - 88.08, help="float start's error %%")
    args = p.parse_args(argv)
    return run_queue(args) if args.cmd == "run" else write_table(args)


if __name__ == "__main__":
    sys.exit(main())
