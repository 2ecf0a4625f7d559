"""``benchmarks/step_time_ab.py``: a second mixq tree loads beside this one and both time."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_baseline_tree_loads_apart_and_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script prepends its folders
    spec = importlib.util.spec_from_file_location("step_time_ab", ROOT / "benchmarks" /
                                                  "step_time_ab.py")  # fmt: skip
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    ab.main(["--baseline", str(ROOT), "--batch", "2", "--rounds", "1", "--steps", "1",
             "--warmup", "0", "--variants", "mixq-wa"])  # fmt: skip
    out = capsys.readouterr().out
    assert "base:mixq-wa" in out and "\nmixq-wa" in out and "float" in out
    base = sys.modules["mixq_baseline"]
    assert Path(base.__file__).parent.name == "mixq_baseline"
    assert "mixq_baseline.quant" in sys.modules  # its own quantizers, not this tree's
    for name in [n for n in sys.modules if n.startswith(("mixq_baseline", "step_time"))]:
        del sys.modules[name]  # leave no second mixq behind for the other tests
