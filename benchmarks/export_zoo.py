"""Export the model zoo to ONNX and QONNX and check parity: a markdown table on stdout.

For each model (mixq's own and the hand-written models of ``tests/test_export.py``, plus
third-party models when their packages are installed), converted with the default 4-bit config
(or pow-2) and random batch-norm statistics, in eval mode:

* ``onnx``: file bytes, ratio to the report's weight memory, onnxruntime vs PyTorch on a random
  batch of 8 (argmax agreement, max |diff| / max |y|), with ``ties="away"`` as well; the file
  of the batch-norm-folded model and its ratio to that model's report (``fold_bn=True``);
* ``qonnx``: file bytes and the ``qonnx`` executor vs PyTorch on 2 samples (if installed).

Run: ``OMP_NUM_THREADS=1 python benchmarks/export_zoo.py [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from mixq.config import QuantConfig, SiteConfig
from mixq.convert import quantize_model
from mixq.export import ExportError, export
from mixq.models import mobilenet_v2, resnet18, resnet20, smallcnn


def _bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
    return model.eval()


def zoo() -> dict[str, tuple[callable, tuple[int, ...]]]:
    from test_export import Hand

    models = {
        "resnet20": (resnet20, (3, 32, 32)),
        "resnet18": (lambda: resnet18(num_classes=10), (3, 64, 64)),
        "mobilenet_v2": (lambda: mobilenet_v2(num_classes=10), (3, 32, 32)),
        "smallcnn": (lambda: smallcnn(in_channels=3), (3, 32, 32)),
        "hand (test_export.Hand)": (Hand, (3, 16, 16)),
    }
    try:  # third-party models, when installed (no weights are downloaded)
        import timm

        for name in ("resnet18", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto"):
            models[f"timm {name}"] = (lambda n=name: timm.create_model(n, num_classes=10),
                                      (3, 64, 64))  # fmt: skip
    except ImportError:
        print("timm: not installed (third-party rows skipped)", file=sys.stderr)
    return models


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _qonnx(path: Path, x: torch.Tensor) -> np.ndarray | None:
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx
    except ImportError:
        return None
    mw = ModelWrapper(str(path))
    i, o = mw.graph.input[0].name, mw.graph.output[0].name
    return np.concatenate([execute_onnx(mw, {i: x[k : k + 1].numpy()})[o] for k in range(len(x))])


def _cmp(out: np.ndarray, y: np.ndarray) -> str:
    agree = float((out.argmax(1) == y.argmax(1)).mean())
    return f"{100 * agree:.0f}% / {np.abs(out - y).max() / np.abs(y).max():.1e}"


def row(name: str, make: callable, shape: tuple[int, ...], spec: str, tmp: Path) -> str:
    cfg = QuantConfig(input_shape=shape, weight=SiteConfig(spec), activation=SiteConfig(spec))
    model = _bn(quantize_model(make(), cfg))
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).numpy()
    cells = [name, spec.split("/")[0]]
    try:
        t0 = time.perf_counter()
        res = export(model, tmp / "m.onnx", "onnx", example_input=x[:1])
        secs = time.perf_counter() - t0
        report = res.weight_bits / 8
        cells += [f"{report:,.0f}", f"{res.file_bytes:,}", f"{res.file_bytes / report:.3f}",
                  _cmp(_ort(tmp / "m.onnx", x), y), f"{secs:.0f}"]  # fmt: skip
        export(model, tmp / "a.onnx", "onnx", example_input=x[:1], ties="away")
        cells.append(_cmp(_ort(tmp / "a.onnx", x), y))
        res_f = export(model, tmp / "f.onnx", "onnx", example_input=x[:1], fold_bn=True)
        cells.append(f"{res_f.file_bytes:,} / {res_f.file_bytes / (res_f.weight_bits / 8):.3f}")
        res_q = export(model, tmp / "m.qonnx", "qonnx", example_input=x[:1])
        out_q = _qonnx(tmp / "m.qonnx", x[:2])
        cells += [f"{res_q.file_bytes:,}", "not installed" if out_q is None else _cmp(out_q, y[:2])]
    except ExportError as e:
        cells.append(f"ExportError: {str(e)[:160]}")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="model names (substrings) to run")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    print("| model | quantizer | report bytes | onnx bytes | ratio | ORT argmax / max rel diff "
          "| export s | ORT ties=away | folded onnx bytes / ratio | qonnx bytes "
          "| qonnx executor argmax / diff |")  # fmt: skip
    print("|" + "---|" * 11)
    with tempfile.TemporaryDirectory() as d:
        for name, (make, shape) in zoo().items():
            if args.only and not any(o in name for o in args.only):
                continue
            specs = ["uniform/d_qmax"]
            if name.startswith(("resnet20", "hand")):
                specs.append("pow2/qmin_qmax")
            for spec in specs:
                print(row(name, make, shape, spec, Path(d)), flush=True)


if __name__ == "__main__":
    main()
