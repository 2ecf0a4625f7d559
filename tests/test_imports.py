"""The import rule of ``docs/architecture.md``, checked on the source by an AST walk.

Each *unit* (``mixq.<unit>``: a top-level module or sub-package) may import only the units
listed for it in :data:`ALLOWED`; the library never imports the application (``train``,
``cli``, ``experiments``); the units' import graph has no cycle; and no function-local import
of a mixq module hides an edge, except in the CLI (commands import what they need when they
run, so ``mixq --help`` stays fast) and for modules that need an optional extra.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mixq"

#: unit -> the units it may import (besides itself). The library is everything but the last
#: three entries.
ALLOWED: dict[str, set[str]] = {
    "quant": set(),
    "progress": set(),
    "models": set(),
    "data": {"progress"},
    "config": {"quant"},
    "layers": {"quant"},
    "trace": {"layers", "quant"},
    "sites": {"layers", "quant", "trace"},
    "convert": {"config", "layers", "quant", "sites", "trace"},
    "cost": {"config", "convert", "layers", "quant", "sites", "trace"},
    "report": {"config", "convert", "cost", "layers", "quant", "sites", "trace"},
    "qat": {"config", "convert", "cost", "layers", "quant", "sites", "trace"},
    "budget_control": {"config", "convert", "cost", "layers", "quant", "sites", "trace"},
    "repair": {"config", "convert", "cost", "layers", "quant", "sites", "trace"},
    "export": {"config", "convert", "cost", "layers", "models", "quant", "sites", "trace"},
    "__init__": {"config", "convert", "cost", "layers", "qat", "quant", "report", "sites"},
    # the application
    "experiments": {"quant", "layers", "convert", "cost"},
    "train": {
        "budget_control", "config", "convert", "cost", "data", "export", "layers", "models",
        "progress", "qat", "quant", "repair", "report", "sites", "trace",
    },
    "cli": {
        "budget_control", "config", "convert", "cost", "data", "experiments", "export",
        "layers", "models", "progress", "qat", "quant", "repair", "report", "sites", "trace",
        "train",
    },
}

#: Modules imported inside a function because they need an optional extra (onnx).
OPTIONAL = {"mixq.export.onnx_export", "mixq.export.qonnx_export", "mixq.export.quant_nodes"}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC)
    if rel.parts == ("__init__.py",):
        return "__init__"
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(module, line, at_module_level)`` for every import of a mixq module in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in tree.body:  # imports under `if TYPE_CHECKING:` / try blocks count as top level
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "mixq":
                names = [f"mixq.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(n, node.lineno, id(node) in top) for n in names if n.split(".")[0] == "mixq"]
    return out


def _graph() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> the places (``file:line``)."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(SRC.rglob("*.py")):
        unit = _unit(path)
        for module, line, _ in _imports(path):
            target = module.split(".")[1] if "." in module else "__init__"
            if target != unit:
                graph.setdefault(unit, {}).setdefault(target, []).append(f"{path.name}:{line}")
    return graph


def test_every_unit_has_a_rule():
    units = {_unit(p) for p in SRC.rglob("*.py")}
    assert units == set(ALLOWED), f"add the new unit(s) to ALLOWED: {units ^ set(ALLOWED)}"


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_imports_follow_the_rule(unit):
    bad = {t: where for t, where in _graph().get(unit, {}).items() if t not in ALLOWED[unit]}
    assert not bad, f"mixq.{unit} imports units outside its rule: {bad}"


def test_no_cycle_between_units():
    graph = {u: set(ts) for u, ts in _graph().items()}
    state: dict[str, int] = {}

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for t in graph.get(u, ()):
            if state.get(t) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, u, t])}")
            if t not in state:
                visit(t, [*path, u])
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [])


def test_library_never_imports_the_application():
    library = set(ALLOWED) - {"train", "cli", "experiments"}
    for unit in library:
        assert not ALLOWED[unit] & {"train", "cli", "experiments"}, unit


def test_no_function_local_mixq_imports():
    hidden = []
    for path in SRC.rglob("*.py"):
        if _unit(path) == "cli":
            continue
        hidden += [
            f"{path.relative_to(SRC)}:{line} imports {m}"
            for m, line, top in _imports(path)
            if not top and m not in OPTIONAL
        ]
    assert not hidden, "function-local imports of mixq modules: " + "; ".join(hidden)


def test_the_checker_sees_a_violation(tmp_path):
    """The walk finds imports at any depth (so the tests above can fail)."""
    f = tmp_path / "m.py"
    f.write_text("import torch\ndef f():\n    from mixq.train import fit\nfrom mixq import cost\n")
    found = _imports(f)
    assert ("mixq.train", 3, False) in found and ("mixq.cost", 4, True) in found
