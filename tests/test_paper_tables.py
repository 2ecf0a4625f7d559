"""``scripts/paper_tables.py``: the resumable queue of paper-table runs, on a tiny schedule.

The real rows train ResNet-20 on CIFAR-10 for 15 (or 160) epochs; here two rows run for two
epochs of two steps on synthetic data, so the queue, the time limit, the resume of a partial
row and the results table are exercised end to end with real ``mixq train`` processes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mixq.models import resnet20

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paper_tables.py"
TINY = ["data.name=synthetic", "data.synthetic_train=16", "data.synthetic_test=8",
        "data.batch_size=8", "data.eval_batch_size=8", "max_steps_per_epoch=2",
        "optim.epochs=2"]  # fmt: skip


@pytest.fixture(scope="module")
def pt():
    spec = importlib.util.spec_from_file_location("paper_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["paper_tables"] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(pt, runs: Path, init: Path, rows: str, *extra: str) -> int:
    argv = ["run", "--runs-dir", str(runs), "--init", str(init), "--rows", rows, *extra]
    return pt.main(argv + [a for s in TINY for a in ("--set", s)])


def test_queue_time_limit_resume_and_table(pt, tmp_path, capsys):
    init = tmp_path / "float.pt"
    torch.save(resnet20().state_dict(), init)
    runs = tmp_path / "runs"
    rows = "u3-w70kb,fixed-u-w2"
    # a limit that stops both processes before they finish
    assert _run(pt, runs, init, rows, "--time-limit", "2") == 0
    assert {pt.row_state(runs / r) for r in rows.split(",")} <= {"new", "partial"}
    assert _run(pt, runs, init, rows) == 0  # picks both up again and finishes them
    assert all(pt.row_state(runs / r) == "done" for r in rows.split(","))
    # a row killed after an epoch is resumed, not restarted: its config.yaml is reused
    row = runs / "u3-w70kb"
    (row / "summary.json").unlink()
    lines = (row / "metrics.jsonl").read_text().splitlines()
    assert pt.row_state(row) == "partial" and len(lines) == 2
    cmd = pt.train_command(pt.main.__globals__["argparse"].Namespace(
        schedule="15ep", init=str(init), set=[], data_dir=None), "u3-w70kb", row)
    assert "--resume" in cmd and "--init" not in cmd
    assert _run(pt, runs, init, "u3-w70kb") == 0
    assert pt.row_state(row) == "done"
    assert (row / "metrics.jsonl").read_text().splitlines() == lines  # nothing trained twice
    capsys.readouterr()
    assert pt.main(["table", "--runs-dir", str(runs)]) == 0
    table = capsys.readouterr().out
    assert "| Ours (8a), uniform (`u3-w70kb`) | 8.59% |" in table
    assert "| Fixed 2/32, uniform (`fixed-u-w2`) | 10.81% |" in table
    assert "| largest rise |" in table
    fixed = next(line for line in table.splitlines() if "`fixed-u-w2`" in line)
    learned = next(line for line in table.splitlines() if "`u3-w70kb`" in line)
    assert "| no budget |" in fixed and "no budget" not in learned
    assert "not run" in table  # the other rows
    summary = json.loads((row / "summary.json").read_text())
    assert summary["final"]["epoch"] == 2


def test_largest_rise_and_budget_columns(pt, tmp_path):
    """The oscillation column (the largest epoch-to-epoch increase of the test error) and
    whether the run's config sets a budget at all."""
    run = tmp_path / "t1-u1-w-float"
    run.mkdir()
    accs = [0.80, 0.85, 0.82, 0.86, 0.855]  # errors 20, 15, 18, 14, 14.5: rises 3 and 0.5
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": i + 1, "test_acc": a, "budget_met": True, "train_loss": 0.5,
                    "weight_kib": 200.0, "act_max_kib": 64.0, "act_sum_kib": 736.0}) + "\n"
        for i, a in enumerate(accs)))  # fmt: skip
    r = pt.row_result(run)
    assert r["rise"] == pytest.approx(3.0) and r["err"] == pytest.approx(14.0)
    one = {"epoch": 1, "test_acc": 0.9, "budget_met": True, "train_loss": 0.5,
           "weight_kib": 1.0, "act_max_kib": 1.0, "act_sum_kib": 1.0}  # fmt: skip
    (run / "metrics.jsonl").write_text(json.dumps(one))
    assert pt.row_result(run)["rise"] == 0.0
    assert pt.row_result(run)["budgeted"] is None  # no config.yaml
    (run / "config.yaml").write_text("budget:\n  weight: null\n  activation_max: null\n")
    assert pt.row_result(run)["budgeted"] is False
    (run / "config.yaml").write_text("budget:\n  weight: 70KB\n  activation_max: null\n")
    assert pt.row_result(run)["budgeted"] is True


def test_unknown_row_is_refused(pt, tmp_path):
    with pytest.raises(SystemExit, match="unknown rows"):
        pt.main(["run", "--runs-dir", str(tmp_path), "--init", "x.pt", "--rows", "u4-w1kb"])
