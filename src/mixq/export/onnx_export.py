"""Standard ONNX (QDQ) export that onnxruntime runs.

* **Uniform weights and biases**: the exact integer codes as an ``INT4`` (bitwidth <= 4,
  opset >= 21; two codes per byte), ``INT8`` or ``INT16`` (opset >= 21) initializer, then
  ``DequantizeLinear`` with the per-tensor scale ``d`` (zero point 0): ``d * code``, the
  fake-quantized tensor bit for bit.
* **Power-of-two weights**: the fields ``(s << m_bits) | m`` of :mod:`mixq.export.codes` as a
  ``UINT4``/``UINT8``/``UINT16`` initializer, ``Cast`` to ``INT32`` and ``Gather`` from the table
  of the ``2^b`` level values (exact powers of two): small files, exact values.
* **Uniform activations** (a ``QuantAct``, which *is* the ReLU): ``Clip(x, 0, K d)``,
  ``QuantizeLinear`` to ``UINT8`` (``UINT16`` when ``K > 255``, opset >= 21) and
  ``DequantizeLinear``, ``K = round(min(cap, x_hi) / d)`` (``cap = 6`` for a ReLU6). ONNX
  rounds ties half to even, mixq half away from zero: they differ only where ``x / d`` is
  exactly ``m + 1/2``; ``ties="away"`` inserts :func:`mixq.export.actops.away_ties` to match
  mixq exactly (at the price of a graph that QDQ-fusing runtimes no longer fuse).
* **Power-of-two activations**: elementwise ops, ``e = Clip(Round(Log(a / q_min) / ln 2), 0,
  L)`` and a ``Gather`` from ``[0, q_min, 2 q_min, ..., q_max]`` (zero below ``q_min/sqrt 2``).
  ``Log`` is not ``log2``: an input within float rounding of a decision threshold ``q_min *
  2^(e + 1/2)`` may land on the neighbouring level.

``metadata_props``: ``mixq.tensors`` (per tensor: kind, bitwidth, stored bits and ONNX type,
``d``/``k`` or ``q_min``/``q_max``/``L``/``exponent_min``), ``mixq.activations``, ``mixq.arch``,
``mixq.rounding``, ``mixq.ties``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mixq.export.actops import (
    act_record,
    away_ties,
    check_ties,
    code_value,
    float_act,
    pow2_act,
    uniform_code_bound,
)
from mixq.export.bitpack import pack_bits
from mixq.export.codes import decode, encode
from mixq.export.emit import Backend, Emitter
from mixq.export.errors import ExportError
from mixq.export.graph import GraphBuilder, output_scale, shapes, trace
from mixq.export.packed import check_quantized
from mixq.layers import QuantAct
from mixq.quant.base import Quantizer

DEFAULT_OPSET = 21
ROUNDING_NOTE = (
    "mixq rounds half away from zero; ONNX QuantizeLinear (and QONNX Quant ROUND) round half "
    "to even. Weights are stored as exact integer codes (no difference); an activation differs "
    "only where x/d is exactly m + 1/2."
)


class QDQBackend:
    """Integer initializers + ``DequantizeLinear`` (uniform) or ``Gather`` (pow-2) for weights,
    ``Clip`` + QuantizeLinear/DequantizeLinear for uniform activations."""

    def __init__(self, opset: int, ties: str = "even") -> None:
        self.opset = opset
        self.ties = check_ties(ties)
        self.tensors: dict[str, Any] = {}
        self.activations: dict[str, Any] = {}

    def _int_type(self, b: GraphBuilder, bits: int, signed: bool) -> tuple[int, Any]:
        tp = b.onnx.TensorProto
        if bits <= 4 and self.opset >= 21:
            return (tp.INT4, None) if signed else (tp.UINT4, None)
        if bits <= 8:
            return (tp.INT8, np.int8) if signed else (tp.UINT8, np.uint8)
        if self.opset < 21:
            raise ExportError(f"{bits}-bit codes need 16-bit integer tensors: use opset >= 21")
        return (tp.INT16, np.dtype("<i2")) if signed else (tp.UINT16, np.dtype("<u2"))

    def _codes(self, b: GraphBuilder, name: str, codes: np.ndarray, bits: int,
               signed: bool) -> str:  # fmt: skip
        dtype, npdt = self._int_type(b, bits, signed)
        raw = pack_bits(codes, 4, signed) if npdt is None else codes.astype(npdt).tobytes()
        proto = b.onnx.helper.make_tensor("codes", dtype, list(codes.shape), raw, raw=True)
        self.tensors[name]["storage"] = b.onnx.TensorProto.DataType.Name(dtype)
        return b.initializer(f"{name}_quantized", proto)

    def weight(self, b: GraphBuilder, name: str, t: Tensor, q: Quantizer | None) -> str:
        if q is None:
            self.tensors[name] = {"kind": "float", "bits": 32}
            return b.initializer(name, t.detach().float().cpu().numpy())
        enc = encode(name, q, t)
        self.tensors[name] = {k: v for k, v in enc.meta.items() if k != "quantizer"}
        codes = self._codes(b, name, enc.codes, enc.bits, enc.signed)
        if q.kind == "uniform":
            scale = b.const(f"{name}_scale", enc.meta["d"])
            return b.op("DequantizeLinear", [codes, scale], name)
        # pow-2: the field (sign << m_bits | m) indexes a table of the 2^bits level values
        fields = np.arange(1 << enc.bits)
        valid = (fields & ((1 << enc.meta["m_bits"]) - 1)) <= enc.meta["L"] + enc.meta["with_zero"]
        table = decode(enc.meta, np.where(valid, fields, 0), (fields.size,)).numpy()
        idx = b.op("Cast", [codes], f"{name}_index", to=b.onnx.TensorProto.INT32)
        return b.op("Gather", [b.initializer(f"{name}_levels", table), idx], name, axis=0)

    def act(self, b: GraphBuilder, x: str, m: QuantAct, name: str) -> str:
        self.activations[name] = act_record(m)
        if m.quantizer is None:
            return float_act(b, x, m, name)
        if m.quantizer.kind == "pow2":
            return pow2_act(b, x, m, name)
        d, K = uniform_code_bound(m)
        if K > 65535 or (K > 255 and self.opset < 21):
            raise ExportError(f"{name}: activation codes up to {K} need UINT16 (opset >= 21)")
        np_type = np.uint8 if K <= 255 else np.uint16
        hi = b.const(f"{name}.hi", code_value(K, d))
        y = b.op("Clip", [x, b.const("zero", 0.0), hi], f"{name}.clip")
        if self.ties == "away":
            y = away_ties(b, y, d, name)
        scale = b.const(f"{name}.scale", d)
        zp = b.initializer(f"{name}.zero_point", np.zeros((), dtype=np_type))
        qx = b.op("QuantizeLinear", [y, scale, zp], f"{name}.quantized")
        return b.op("DequantizeLinear", [qx, scale, zp], name)


def example_for(model: nn.Module, example_input: Tensor | None) -> Tensor:
    """``example_input`` or ``zeros(1, *model.default_input_shape)``."""
    if example_input is not None:
        return example_input.detach().float().cpu()
    shape = getattr(model, "default_input_shape", None)
    if shape is None:
        raise ExportError("pass example_input=... (the model has no default_input_shape)")
    return torch.zeros(1, *shape)


def build_model(model: nn.Module, builder: GraphBuilder, backend: Backend,
                example_input: Tensor | None) -> Any:  # fmt: skip
    """Trace ``model``, emit it through ``backend`` and return the checked ``ModelProto``."""
    check_quantized(model)
    x = example_for(model, example_input)
    scale = output_scale(model)
    gm = trace(model)
    shapes(gm, x)
    inputs, outputs = Emitter(gm, builder, backend, scale).run(tuple(x.shape))
    arch = getattr(model, "mixq_arch", None)
    if arch is not None:
        builder.metadata["mixq.arch"] = arch
    builder.metadata["mixq.rounding"] = ROUNDING_NOTE
    builder.metadata["mixq.ties"] = backend.ties
    return builder.model(inputs, outputs, type(model).__name__)


def export_onnx(model: nn.Module, path: str | Path, *, example_input: Tensor | None = None,
                opset: int | None = None, ties: str = "even") -> Any:  # fmt: skip
    """Write ``model`` as a QDQ ONNX file (module docstring); returns the ``ModelProto``.

    Args:
        model: a quantized model, in eval mode.
        path: output file.
        example_input: one batch for shape recording (default: zeros of
            ``model.default_input_shape``); the batch dimension is symbolic in the file.
        opset: default-domain opset, 13..; 21 (the default) or newer for INT4/INT16 tensors.
        ties: ``"even"`` (plain QDQ: ONNX rounds activation ties half to even) or ``"away"``
            (extra nodes make activation ties round half away from zero, as mixq).
    """
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < 13:
        raise ExportError(f"opset {opset} is too old; use 13 or newer (21 for INT4/INT16)")
    builder = GraphBuilder(opset)
    backend = QDQBackend(opset, ties)
    builder.metadata.update({"mixq.format": "onnx-qdq", "mixq.tensors": backend.tensors,
                             "mixq.activations": backend.activations})  # fmt: skip
    proto = build_model(model, builder, backend, example_input)
    Path(path).write_bytes(proto.SerializeToString())
    return proto
