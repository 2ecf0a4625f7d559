"""``mixq export``: write a trained checkpoint as a bit-packed file, ONNX (QDQ) or QONNX.

See :mod:`mixq.export` for the formats. ``--fold-bn`` folds batch norms into the preceding
convolutions and re-quantizes their weights at the same bitwidths; the file then describes the
folded model (the per-layer changes are printed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``export`` on the ``mixq`` sub-parsers and set its ``func``."""
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint: bit-packed file, ONNX (onnxruntime) or QONNX (FINN)",
        description=(
            "Export a trained mixq checkpoint. 'packed': integer codes bit-packed at the learned "
            "bitwidths + JSON manifest (load with mixq.export.load_packed); 'onnx': standard "
            "ONNX with integer weights and QuantizeLinear/DequantizeLinear activations; "
            "'qonnx': QONNX Quant nodes. The ONNX formats need pip install 'mixq[onnx]'."
        ),
    )
    p.add_argument("checkpoint", help="a mixq checkpoint (from mixq train)")
    p.add_argument("--format", choices=("packed", "onnx", "qonnx"), default="packed",
                   help="output format (default: %(default)s)")  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file")
    p.add_argument(
        "--fold-bn",
        action="store_true",
        help="fold batch norms into the convs and re-quantize the folded weights",
    )
    p.add_argument("--opset", type=int, help="ONNX opset, >= 18 (default: 21 onnx, 18 "
                   "qonnx; 25 stores <= 2-bit weights as INT2)")  # fmt: skip
    p.add_argument("--batch", default="default", metavar="N|dynamic",
                   help="ONNX formats: batch dimension of the file: 'dynamic' (symbolic, the "
                        "onnx default) or a fixed size N (qonnx default 1: the qonnx executor "
                        "refuses a symbolic batch)")  # fmt: skip
    p.add_argument("--ties", choices=("even", "away"), default="even",
                   help="ONNX formats: activation ties x/d = m + 1/2 round half to even (plain "
                        "QDQ, default) or half away from zero as mixq (extra nodes)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint, export it, print sizes (and the BN-folding report)."""
    from mixq.cost import float_weight_bits
    from mixq.export import export, format_fold_report
    from mixq.train.build import load_model

    out, src = Path(args.output), Path(args.checkpoint)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ValueError(f"-o {args.output!r} is the input checkpoint: exporting would overwrite "
                         "it; give another output file")  # fmt: skip
    if out.is_dir():
        raise ValueError(f"-o {args.output!r} is a directory: give an output file name")
    model, _ = load_model(args.checkpoint)
    batch: int | str | None = args.batch
    if batch == "dynamic":
        batch = None
    elif batch != "default":
        try:
            batch = int(batch)
        except ValueError:
            raise SystemExit(f"--batch {batch!r}: give 'dynamic' or a positive int") from None
    try:
        result = export(model, args.output, args.format, fold_bn=args.fold_bn,
                        opset=args.opset, ties=args.ties, batch=batch)  # fmt: skip
    except ImportError as e:
        raise RuntimeError(str(e)) from e
    info = {
        "output": str(result.path),
        "format": result.format,
        "file_bytes": result.file_bytes,
        "weight_bytes_report": result.weight_bits / 8,
        "float_weight_bytes": float_weight_bits(model) / 8,
        "quantized_payload_bytes": result.quantized_bytes,
        "folded_bn": [vars(r) for r in result.fold],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    report = info["weight_bytes_report"]
    print(f"wrote {info['output']} ({result.format}): file {result.file_bytes} bytes, report "
          f"weight memory {report:.0f} bytes ({result.file_bytes / report:.3f}x; float "
          f"{info['float_weight_bytes']:.0f} bytes)")  # fmt: skip
    if result.format == "qonnx":
        print("note: QONNX stores weights as float32 values followed by Quant nodes (its "
              "convention), so its file is about 32/b times the report")  # fmt: skip
    if result.format == "onnx" and (args.opset or 21) < 25 and (n2 := _two_bit_tensors(model)):
        print(f"note: {n2} tensors of <= 2 bits are stored as INT4 (ONNX's narrowest type before "
              "opset 25); --opset 25 stores them as INT2")  # fmt: skip
    if result.format == "onnx" and not result.fold and (bn := _bn_channels(model)):
        print(f"note: {bn} batch-norm channels are stored as float32 (about {16 * bn} bytes, "
              "not in the report); --fold-bn folds them into the convolutions")  # fmt: skip
    if result.quantized_bytes is not None:
        print(f"bit-packed quantized tensors: {result.quantized_bytes} bytes")
    if result.fold:
        print("batch norm folded; weights re-quantized at the same bitwidths (the export matches "
              "the folded model, not the training model):")  # fmt: skip
        print(format_fold_report(result.fold))
        if args.format != "packed" and args.ties == "even":
            print("note: folded pre-activations often sit exactly on rounding ties; --ties away "
                  "makes the ONNX activations round exactly as mixq does")  # fmt: skip
    return 0


def _two_bit_tensors(model) -> int:
    """How many quantized weights and biases have a bitwidth of at most 2."""
    qs = [getattr(m, a, None) for m in model.modules() for a in ("weight_quantizer",
                                                                 "bias_quantizer")]  # fmt: skip
    return sum(1 for q in qs if q is not None and q.bitwidth <= 2)


def _bn_channels(model) -> int:
    """Channels of the model's batch norms (ONNX stores 4 float32 vectors of that length)."""
    from torch import nn

    bn = nn.modules.batchnorm._BatchNorm
    return sum(m.num_features for m in model.modules() if isinstance(m, bn))
