"""Export of trained mixed-precision models: bit-packed files, ONNX (QDQ) and QONNX.

* ``"packed"`` (:mod:`mixq.export.packed`): every quantized tensor as integer codes packed at
  its learned bitwidth plus a JSON manifest, one file; :func:`load_packed` rebuilds a model
  whose outputs equal the fake-quantized model's bit for bit. The quantized payload is
  ``sum ceil(numel * b / 8)`` bytes: the weight memory of :func:`mixq.cost.weight_bits` up to
  one byte of padding per tensor.
* ``"onnx"`` and ``"qonnx"`` (:mod:`mixq.export.onnx_export`): the graph is captured by
  PyTorch's own exporter (``torch.export`` + ``torch.onnx.export(..., dynamo=True)``), so every
  op PyTorch exports is exported; each quantizer emits its own quantization nodes
  (:mod:`mixq.export.quant_nodes`). ``onnx``: opset 21 QDQ with integer weight initializers
  (INT4/INT8/INT16 + ``DequantizeLinear``; pow-2 weights as codes + a level-table ``Gather``)
  and ``Clip`` + QuantizeLinear/DequantizeLinear activations, run by onnxruntime. ``qonnx``:
  QONNX ``Quant`` nodes for FINN-style flows (float weight initializers followed by ``Quant``,
  as Brevitas writes them), run by the ``qonnx`` package's executor.

ONNX ``QuantizeLinear`` and QONNX ``Quant`` round activation ties ``x/d = m + 1/2`` half to even,
mixq half away from zero; ``ties="away"`` adds the nodes that reproduce mixq exactly
(:func:`mixq.export.quant_nodes.away_ties`). Behind a float batch norm ties are rare; after BN
folding they are common (the pre-activations are exact sums of grid values).

``fold_bn=True`` first folds batch norms into the preceding convs and re-quantizes the folded
weights (:mod:`mixq.export.fold`): the file then describes that folded model, not the training
model. The ONNX formats need the optional ``onnx`` extra (``pip install 'mixq[onnx]'``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mixq.cost import weight_bits
from mixq.export.bitpack import pack_bits, packed_nbytes, unpack_bits
from mixq.export.errors import ExportError, ExportWarning, PackedFormatError
from mixq.export.fold import LayerFold, fold_bn, format_fold_report
from mixq.export.fold import fold_bn as _fold_bn
from mixq.export.onnx_export import read_metadata
from mixq.export.packed import check_quantized, load_packed, read_packed, save_packed

FORMATS = ("packed", "onnx", "qonnx")


@dataclass
class ExportResult:
    """What :func:`export` wrote.

    Attributes:
        path: the file.
        format: ``"packed"``, ``"onnx"`` or ``"qonnx"``.
        file_bytes: size of the file.
        weight_bits: ``mixq.cost.weight_bits`` of the exported (possibly folded) model.
        quantized_bytes: packed format only: bytes of the bit-packed quantized tensors, i.e.
            ``sum ceil(numel * b / 8)`` (``weight_bits / 8`` up to byte padding).
        fold: per-layer report of batch-norm folding (empty without ``fold_bn``).
    """

    path: Path
    format: str
    file_bytes: int
    weight_bits: float
    quantized_bytes: int | None = None
    fold: list[LayerFold] = field(default_factory=list)


def export(
    model: nn.Module,
    path: str | Path,
    format: Literal["packed", "onnx", "qonnx"] = "packed",
    *,
    fold_bn: bool = False,
    example_input: torch.Tensor | None = None,
    opset: int | None = None,
    ties: Literal["even", "away"] = "even",
    batch: int | str | None = "default",
) -> ExportResult:
    """Export a quantized (``mixq.quantize_model``-converted) model to ``path``.

    Args:
        model: the quantized model (not modified; BN folding works on a copy).
        path: output file.
        format: ``"packed"``, ``"onnx"`` or ``"qonnx"``.
        fold_bn: fold batch norms into the preceding convs and re-quantize (see
            :mod:`mixq.export.fold`); the export then matches the folded model.
        example_input: one input batch for shape recording (default: zeros of the model's
            ``default_input_shape``).
        opset: ONNX opset, >= 18 (default 21 for ``onnx``, 18 for ``qonnx``).
        ties: ONNX formats: how activation ties ``x/d = m + 1/2`` round: ``"even"`` (plain
            QuantizeLinear / Quant) or ``"away"`` (extra nodes, exactly as mixq).
        batch: ONNX formats: ``None`` (symbolic batch dimension), an int (fixed), or
            ``"default"``: symbolic for ``onnx``, the example input's batch for ``qonnx``.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ExportError: a float (unconverted) model, an unknown format, an unsupported op.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; valid: {list(FORMATS)}")
    check_quantized(model)
    report: list[LayerFold] = []
    if fold_bn:
        model, report = _fold_bn(model, example_input=example_input)
    was_training = model.training
    model.eval()
    path = Path(path)
    quantized = None
    try:
        if format == "packed":
            shape = tuple(example_input.shape[1:]) if example_input is not None else None
            quantized = save_packed(model, path, input_shape=shape)["quantized_bytes"]
        else:
            from mixq.export.onnx_export import export_onnx

            export_onnx(model, path, format=format, example_input=example_input, opset=opset,
                        ties=ties, batch=batch)  # fmt: skip
    finally:
        model.train(was_training)
    bits = float(weight_bits(model).detach())
    return ExportResult(path, format, path.stat().st_size, bits, quantized, report)


__all__ = [
    "FORMATS",
    "ExportError",
    "ExportResult",
    "ExportWarning",
    "LayerFold",
    "PackedFormatError",
    "export",
    "fold_bn",
    "format_fold_report",
    "load_packed",
    "pack_bits",
    "packed_nbytes",
    "read_metadata",
    "read_packed",
    "save_packed",
    "unpack_bits",
]
