"""The README's library example runs as written (and trains: the report shows learned bits)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_library_example_runs(capsys):
    import sklearn  # noqa: F401  (the example reads the digits; the test extras have it)
    code = _blocks()[0]
    assert "mixq.QATStep" in code and "quantize_model" in code
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "weight" in out.lower() and namespace["budget"].active
    assert namespace["step"].quantizers  # the recipe ran over the model's quantizers


def test_quantizer_example_values():
    import torch

    code = _blocks()[1]
    lines = [ln.split("#")[0].strip() for ln in code.splitlines()]
    ns: dict = {"torch": torch}
    exec("import mixq", ns)
    exec(lines[0], ns)
    assert eval(lines[1], ns).tolist() == [0.25, -0.75, 0.0]
    assert eval(lines[2], ns) == 3
