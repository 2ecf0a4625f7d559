"""``scripts/budget_evidence.py``: per-epoch sizes against the budget and what each run delivered,
on hand-written run folders."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "budget_evidence.py"


@pytest.fixture(scope="module")
def be():
    spec = importlib.util.spec_from_file_location("budget_evidence", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["budget_evidence"] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(tmp: Path, name: str, sizes: list[float], frozen_from: int | None, best: dict | None,
         freeze: dict | None, budget: str = "6KB") -> Path:  # fmt: skip
    run = tmp / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"budget": {"weight": budget,
                                                                "activation_max": None}}))
    rows = [{"epoch": e, "test_acc": 0.5 + e / 100, "weight_kib": w, "act_max_kib": 0.5,
             **({"bits_frozen": e >= frozen_from} if frozen_from else {})}
            for e, w in enumerate(sizes, 1)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"final": rows[-1], "best": best or {}}
    if freeze is not None:
        summary["budget_control"] = {"mode": "dual", "freeze": freeze}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_table_marks_every_size_over_budget_and_says_how_it_was_met(be, tmp_path, capsys):
    change = {"site": "conv2.weight_quantizer", "from_bits": 4, "to_bits": 3}
    dual = _run(tmp_path, "dual", [6.5, 5.9, 5.95], 3, {"acc": 0.53, "epoch": 3,
                "weight_kib": 5.95}, {"how": "repaired", "changes": [change]})  # fmt: skip
    fixed = _run(tmp_path, "fixed", [5.0, 6.2, 6.3], None,
                 {"acc": 0.51, "epoch": 1, "weight_kib": 5.0}, None)  # fmt: skip
    assert be.main([f"dual={dual}", f"fixed={fixed}"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split("|")[1].strip(): ln for ln in out.splitlines() if ln.startswith("| ")}
    assert "weight (budget 6.00)" in out
    assert lines["1"].count("**over**") == 1 and "6.50 **over**" in lines["1"]
    assert lines["2"].count("**over**") == 1 and "6.20 **over**" in lines["2"]
    assert "5.95 (frozen)" in lines["3"] and "6.30 **over**" in lines["3"]
    assert "53.00% (epoch 3)" in lines["dual"] and "5.95 met" in lines["dual"]
    assert "repaired: conv2.weight_quantizer 4->3" in lines["dual"]
    assert "selection (fixed lambda)" in lines["fixed"] and "5.00 met" in lines["fixed"]


def test_runs_with_different_budgets_are_refused(be, tmp_path):
    a = _run(tmp_path, "a", [5.0], None, None, None)
    b = _run(tmp_path, "b", [5.0], None, None, None, budget="8KB")
    with pytest.raises(SystemExit):
        be.main([f"a={a}", f"b={b}"])
    with pytest.raises(SystemExit):
        be.main([f"a={tmp_path / 'missing'}"])
