"""quantize_model, one training step, the report and to_float over third-party models.

Not a test and not a dependency of mixq: it runs the models of the packages that happen to be
installed (timm; install it without another torch, e.g.
``pip install --no-deps --target .thirdparty timm`` and run with ``PYTHONPATH=.thirdparty``)
plus the project's own hand-written zoo (tests/zoo.py), with random weights, and prints one
table: the activation sites found (counted / quantized / float / not counted), the activation
sum, max and peak at 4 bits, whether every quantizer parameter got a finite gradient, and
whether ``to_float`` restores the float outputs exactly.

timm imports ``torchvision`` at import time for a few names its models do not use here; when
torchvision is missing this script installs an import stub for it (printed in the output).

    OMP_NUM_THREADS=1 PYTHONPATH=.thirdparty .venv/bin/python benchmarks/third_party_models.py
"""

from __future__ import annotations

import argparse
import copy
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

from mixq import quantize_model
from mixq.config import QuantConfig
from mixq.convert import quantizers, to_float
from mixq.cost import BITS_PER_KIB, Budget, activation_bits
from mixq.qat import param_groups
from mixq.report import report
from mixq.sites import table_of

TIMM_MODELS = {  # name -> create_model kwargs; CNNs at 64x64, the ViT with 32x32 and patch 4
    "resnet18": {},
    "efficientnet_b0": {},
    "mobilenetv3_small_100": {},
    "mobilenetv2_100": {},
    "ghostnet_100": {},
    "densenet121": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
}


def _stub_torchvision() -> bool:
    """Make ``import torchvision.*`` succeed with placeholder names (timm imports a few)."""
    if importlib.util.find_spec("torchvision") is not None:
        return False

    class Meta(type(nn.Module)):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return f"{cls.__name__}.{name}"

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            cls = Meta(name, (nn.Module,), {})
            setattr(self, name, cls)
            return cls

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            m = Stub(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())
    return True


def _models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import zoo

    out = [(f"zoo.{c.__name__}", c(), s) for c, s in zoo.SHAPES.items()]
    from mixq.models import mobilenet_v2, resnet20

    out += [("mixq.resnet20", resnet20(), (3, 32, 32)),
            ("mixq.mobilenet_v2", mobilenet_v2(num_classes=10), (3, 64, 64))]  # fmt: skip
    if importlib.util.find_spec("timm") is not None:
        if _stub_torchvision():
            print("note: torchvision is not installed; an import stub stands in for it")
        import timm

        for name, kw in TIMM_MODELS.items():
            shape = (3, 32, 32) if "vit" in name else (3, 64, 64)
            out.append((f"timm.{name}", timm.create_model(name, num_classes=10, **kw), shape))
    else:
        print("note: timm is not installed; only the project's own models are run")
    return out


def _run(name: str, model: nn.Module, shape: tuple[int, ...], mode: str) -> dict:
    torch.manual_seed(0)
    x = torch.randn(2, *shape)
    t0 = time.perf_counter()
    quantize_model(model, QuantConfig(activation_sites=mode), example_input=x[:1])
    t_conv = time.perf_counter() - t0
    table = table_of(model)
    counted = table.counted
    budget = Budget.parse(activation_sum="1KB", activation_peak="1KB")
    opt = torch.optim.SGD(param_groups(model), lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else out[0]
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1])) + budget.penalty(model)
    opt.zero_grad()
    loss.backward()
    params = [p for _, q in quantizers(model) for p in q.parameters() if p.requires_grad]
    finite = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)
    t_step = time.perf_counter() - t0
    rep = report(model, budget)
    assert rep.totals.activation_sum_kib * BITS_PER_KIB == float(activation_bits(model, "sum"))
    return {
        "model": name, "mode": mode,
        "sites": len(table.sites), "counted": len(counted),
        "quantized": sum(s.quantizer is not None for s in counted),
        "float": sum(s.quantizer is None for s in counted),
        "uncounted": len(table.sites) - len(counted),
        "sum": rep.totals.activation_sum_kib, "max": rep.totals.activation_max_kib,
        "peak": rep.totals.activation_peak_kib, "peak_at": rep.totals.activation_peak_at,
        "finite": finite and bool(torch.isfinite(loss)), "t_conv": t_conv, "t_step": t_step,
    }  # fmt: skip


def _exact_to_float(model: nn.Module, shape: tuple[int, ...], mode: str) -> bool:
    """``to_float(quantize_model(m))`` gives the float outputs of ``m`` bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(2, *shape)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    quantize_model(model, QuantConfig(activation_sites=mode), example_input=x[:1])
    to_float(model)
    model.eval()
    with torch.no_grad():
        return bool(torch.equal(model(x), ref))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", default=["relu", "inputs"])
    ap.add_argument("--only", nargs="*", default=None, help="model names to run (substrings)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    header = (f"{'model':<28} {'mode':<6} {'sites':>5} {'cnt':>4} {'q':>4} {'flt':>4} "
              f"{'unc':>4} {'sum KiB':>9} {'max KiB':>8} {'peak KiB':>9} {'peak at':<28} "
              f"{'grads':<6} {'to_float':<8} {'conv s':>6} {'step s':>6}")  # fmt: skip
    rows = []
    for name, model, shape in _models():
        if args.only and not any(o in name for o in args.only):
            continue
        for mode in args.modes:
            m = copy.deepcopy(model)
            try:
                r = _run(name, m, shape, mode)
                r["exact"] = _exact_to_float(copy.deepcopy(model), shape, mode)
                rows.append(
                    f"{r['model']:<28} {mode:<6} {r['sites']:>5} {r['counted']:>4} "
                    f"{r['quantized']:>4} {r['float']:>4} {r['uncounted']:>4} {r['sum']:>9.2f} "
                    f"{r['max']:>8.2f} {r['peak']:>9.2f} {str(r['peak_at'])[:28]:<28} "
                    f"{'finite' if r['finite'] else 'BAD':<6} "
                    f"{'exact' if r['exact'] else 'DIFF':<8} "
                    f"{r['t_conv']:>6.2f} {r['t_step']:>6.2f}"
                )  # fmt: skip
            except Exception as e:  # one table row per model, whatever breaks
                rows.append(f"{name:<28} {mode:<6} FAILED: {type(e).__name__}: {str(e)[:120]}")
            print(rows[-1], flush=True)
    print()
    print(f"torch {torch.__version__}, 1 thread, batch 2, random weights, 4-bit start")
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
