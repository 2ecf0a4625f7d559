"""``step_time.py`` with a baseline: the same variants on another mixq source tree, in one run.

Before/after comparisons on a shared, loaded machine need both sides interleaved in one process
(separate runs differ by more than the effect). This script loads a second copy of mixq, e.g. a
``git archive`` of ``main``, as the package ``mixq_baseline`` (its ``mixq`` imports rewritten),
builds each ``--variants`` entry from both trees (``base:<name>`` and ``<name>``, one ``float``),
and times them in the interleaved rounds of :func:`step_time.run`.

Example::

    mkdir -p /tmp/base && git archive main | tar -x -C /tmp/base
    python benchmarks/step_time_ab.py --baseline /tmp/base --threads 1 --batch 16 \\
        --variants mixq-wa,mixq-p2 --rounds 9 --steps 5 --count-ops --markdown
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import step_time  # noqa: E402  (this folder's module, after the path is set)

PACKAGE = "mixq_baseline"


def _rewrite(text: str) -> str:
    text = re.sub(r"\bfrom mixq(\.| import)", rf"from {PACKAGE}\1", text)
    return re.sub(r"\bimport mixq\b", f"import {PACKAGE}", text)


def load_baseline(tree: Path) -> types.ModuleType:
    """``step_time`` bound to the mixq of ``tree`` (``tree/src/mixq``), imported as
    ``mixq_baseline``."""
    src = tree / "src" / "mixq"
    if not (src / "__init__.py").is_file():
        raise SystemExit(f"--baseline {tree}: no src/mixq/__init__.py there")
    root = Path(tempfile.mkdtemp(prefix="mixq_ab_"))
    shutil.copytree(src, root / PACKAGE)
    for f in (root / PACKAGE).rglob("*.py"):
        f.write_text(_rewrite(f.read_text()))
    sys.path.insert(0, str(root))
    importlib.import_module(PACKAGE)
    mod = types.ModuleType("step_time_baseline")
    mod.__file__ = str(HERE / "step_time.py")
    sys.modules[mod.__name__] = mod
    code = _rewrite((HERE / "step_time.py").read_text())
    exec(compile(code, mod.__file__, "exec"), mod.__dict__)
    return mod


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="a mixq source tree")
    p.add_argument("--model", choices=sorted(step_time.ARCHS), default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", default="mixq-wa,mixq-p2")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--count-ops", action="store_true")
    args = p.parse_args(argv)
    args.device = "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_baseline(args.baseline)
    step_time.ARCH = base.ARCH = args.model
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 10, (args.batch,), generator=g)
    variants = [step_time.build("float", device)]
    for name in (n.strip() for n in args.variants.split(",") if n.strip()):
        old = base.build(name, device)
        old.name = f"base:{name}"
        variants += [old, step_time.build(name, device)]
    step_time.run(variants, x, y, args.rounds, args.steps, args.warmup)
    if args.count_ops:
        for v in variants:
            v.ops = step_time.count_ops(v, x, y)
    info = step_time.machine_info(device, torch.get_num_threads())
    info["baseline"] = str(args.baseline)
    print(step_time.report(variants, info, args))


if __name__ == "__main__":
    main()
