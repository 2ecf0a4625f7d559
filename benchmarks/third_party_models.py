"""quantize_model, one training step, the report, to_float and export over third-party models.

Not a test and not a dependency of mixq: it runs the models of the packages that happen to be
installed (timm; install it without another torch, e.g.
``pip install --no-deps --target .thirdparty timm``; HuggingFace transformers, which does not
ask for torch: ``pip install --target .thirdparty-hf transformers``; run with
``PYTHONPATH=.thirdparty:.thirdparty-hf``) plus the project's own hand-written zoo
(tests/zoo.py), with random weights, and prints one table: the activation sites found
(counted / quantized / float / not counted), the activation sum, max and peak at 4 bits,
whether every quantizer parameter got a finite gradient, whether ``to_float`` restores the
float outputs exactly, whether the weights quantized in one node per group (``share_derived``,
as in training) give the outputs and gradients of the per-layer calls bit for bit (and how many
tensors were batched), whether the packed file reloads into a float skeleton with the same
outputs bit for bit, and the largest difference between onnxruntime running the ONNX export
(``ties="away"``) and the quantized model in PyTorch (``--no-export`` leaves both out).

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
import tempfile
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
from mixq.quant.group import share_derived
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


def _hf_models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Tiny HuggingFace image classifiers (random weights, small configs)."""
    import transformers as T

    cfgs = {
        "resnet": (T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                  num_labels=10), T.ResNetForImageClassification, 64),
        "mobilenet_v2": (T.MobileNetV2Config(depth_multiplier=0.35, image_size=64,
                                             num_labels=10),
                         T.MobileNetV2ForImageClassification, 64),
        "vit": (T.ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=128, num_labels=10),
                T.ViTForImageClassification, 32),
        "convnext": (T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                      num_labels=10),
                     T.ConvNextForImageClassification, 64),
    }  # fmt: skip
    return [(f"hf.{k}", cls(cfg).eval(), (3, r, r)) for k, (cfg, cls, r) in cfgs.items()]


def _models() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import zoo

    out = [(f"zoo.{c.__name__}", c(), s) for c, s in zoo.SHAPES.items()]
    from mixq.models import mobilenet_v2, resnet20

    out += [("mixq.resnet20", resnet20(), (3, 32, 32)),
            ("mixq.mobilenet_v2", mobilenet_v2(num_classes=10), (3, 64, 64))]  # fmt: skip
    # before the torchvision stub: transformers reads torchvision's version when it is importable
    hf = importlib.util.find_spec("transformers") is not None
    hf_models = _hf_models() if hf else []
    if importlib.util.find_spec("timm") is not None:
        if _stub_torchvision():
            print("note: torchvision is not installed; an import stub stands in for it")
        import timm

        for name, kw in TIMM_MODELS.items():
            shape = (3, 32, 32) if "vit" in name else (3, 64, 64)
            out.append((f"timm.{name}", timm.create_model(name, num_classes=10, **kw), shape))
    else:
        print("note: timm is not installed; its models are not run")
    if not hf:
        print("note: transformers is not installed; the HuggingFace models are not run")
    return out + hf_models


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


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
    logits = _logits(out)
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


def _batched_equal(model: nn.Module, shape: tuple[int, ...], mode: str) -> str:
    """Weights and biases quantized in one node per group (``share_derived``, as ``QATStep``
    does) against each layer calling its quantizers: ``exact (N)`` when the outputs and every
    gradient are equal bit for bit (eval mode, no dropout), N the tensors bound to a group."""
    torch.manual_seed(0)
    x = torch.randn(2, *shape)
    quantize_model(model, QuantConfig(activation_sites=mode), example_input=x[:1])
    ref = copy.deepcopy(model)
    shared = share_derived(model, [q for _, q in quantizers(model)])
    n = len(shared._found)
    outs = []
    for m in (model, ref):
        m.eval()
        out = _logits(m(x))
        out.square().sum().backward()
        outs.append((out.detach(), [p.grad for p in m.parameters()]))
    (ya, ga), (yb, gb) = outs
    same = torch.equal(ya, yb) and all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(ga, gb, strict=True)
    )
    return f"{'exact' if same else 'DIFF'} ({n})"


def _exact_to_float(model: nn.Module, shape: tuple[int, ...], mode: str) -> bool:
    """``to_float(quantize_model(m))`` gives the float outputs of ``m`` bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(2, *shape)
    model.eval()
    with torch.no_grad():
        ref = _logits(model(x))
    quantize_model(model, QuantConfig(activation_sites=mode), example_input=x[:1])
    to_float(model)
    model.eval()
    with torch.no_grad():
        return bool(torch.equal(_logits(model(x)), ref))


def _export(model: nn.Module, float_model: nn.Module, shape: tuple[int, ...], mode: str,
            tmp: Path) -> tuple[str, str]:  # fmt: skip
    """(packed, onnx) columns: ``exact`` / ``DIFF`` for the packed reload into a float
    skeleton, onnxruntime's largest difference from PyTorch (or the error)."""
    from mixq.export import export, load_packed

    torch.manual_seed(1)
    x = torch.randn(2, *shape)
    model.eval()
    with torch.no_grad():
        ref = _logits(model(x))
    try:
        export(model, tmp / "m.mxq", example_input=x[:1])
        loaded = load_packed(tmp / "m.mxq", model=copy.deepcopy(float_model))
        with torch.no_grad():
            packed = "exact" if torch.equal(_logits(loaded(x)), ref) else "DIFF"
    except Exception as e:
        packed = f"{type(e).__name__}"
    try:
        import onnxruntime as ort

        export(model, tmp / "m.onnx", "onnx", example_input=x[:1], ties="away")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(tmp / "m.onnx"), opts)
        y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        onnx = f"{float(abs(torch.from_numpy(y) - ref).max()):.1e}"
    except Exception as e:
        onnx = f"{type(e).__name__}: {str(e)[:60]}"
    return packed, onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", default=["relu", "inputs"])
    ap.add_argument("--only", nargs="*", default=None, help="model names to run (substrings)")
    ap.add_argument("--no-export", action="store_true", help="leave out the export columns")
    args = ap.parse_args()
    torch.set_num_threads(1)
    header = (f"{'model':<28} {'mode':<6} {'sites':>5} {'cnt':>4} {'q':>4} {'flt':>4} "
              f"{'unc':>4} {'sum KiB':>9} {'max KiB':>8} {'peak KiB':>9} {'peak at':<28} "
              f"{'grads':<6} {'to_float':<8} {'batched':<11} {'conv s':>6} {'step s':>6}"
              + ("" if args.no_export else f" {'packed':<7} onnx max|diff|"))  # fmt: skip
    rows = []
    for name, model, shape in _models():
        if args.only and not any(o in name for o in args.only):
            continue
        for mode in args.modes:
            m = copy.deepcopy(model)
            try:
                r = _run(name, m, shape, mode)
                r["exact"] = _exact_to_float(copy.deepcopy(model), shape, mode)
                r["batched"] = _batched_equal(copy.deepcopy(model), shape, mode)
                ex = ""
                if not args.no_export:
                    with tempfile.TemporaryDirectory() as tmp:
                        packed, onnx = _export(m, model, shape, mode, Path(tmp))
                    ex = f" {packed:<7} {onnx}"
                rows.append(
                    f"{r['model']:<28} {mode:<6} {r['sites']:>5} {r['counted']:>4} "
                    f"{r['quantized']:>4} {r['float']:>4} {r['uncounted']:>4} {r['sum']:>9.2f} "
                    f"{r['max']:>8.2f} {r['peak']:>9.2f} {str(r['peak_at'])[:28]:<28} "
                    f"{'finite' if r['finite'] else 'BAD':<6} "
                    f"{'exact' if r['exact'] else 'DIFF':<8} {r['batched']:<11} "
                    f"{r['t_conv']:>6.2f} {r['t_step']:>6.2f}{ex}"
                )  # fmt: skip
            except Exception as e:  # one table row per model, whatever breaks
                rows.append(f"{name:<28} {mode:<6} FAILED: {type(e).__name__}: {str(e)[:120]}")
            print(rows[-1], flush=True)
    print()
    print(f"torch {torch.__version__}, 1 thread, batch 2, random weights, 4-bit start")
    if not args.no_export:
        print("packed: reload into a float skeleton, outputs bit for bit; onnx: onnxruntime "
              "vs PyTorch, ties='away'")
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
