"""Quantizers in *export mode*: each quantizer module emits its own ONNX nodes.

PyTorch's exporter (``torch.export`` + ``torch.onnx``) captures the whole model; mixq only
changes what its quantizers compute while :func:`export_mode` is active. Each quantizer gets a
forward whose ops the exporter turns into exact ONNX nodes (``torch.onnx.ops.symbolic`` for the
quantization nodes, plain torch ops for the rest). The fake-quantization kernels are not traced.

A quantizer is a **tensor quantizer** when it is the attribute ``<p>_quantizer`` of a module
with a parameter ``<p>`` (``weight_quantizer``/``bias_quantizer`` of the quantized layers): its
output does not depend on the input, so the quantized tensor is stored (:mod:`mixq.export.codes`)
and the forward ignores its argument. **Every other quantizer is an activation quantizer**,
wherever it sits in the model, so a new kind of activation site is exported without any change
here. Formats:

``"onnx"`` (QDQ):

* uniform tensor: integer codes (``INT8``/``INT16``, narrowed to ``INT4`` after export when
  they fit, see :mod:`mixq.export.onnx_export`) and ``DequantizeLinear(codes, d)``: ``d *
  code``, the fake-quantized tensor bit for bit;
* power-of-two tensor: the fields ``(s << m_bits) | m`` of :mod:`mixq.export.codes` (``UINT8``,
  narrowed to ``UINT4``), ``Cast`` and a ``Gather`` from the table of the ``2^bits`` levels;
* uniform activation: ``Clip(x, -K d or 0, K d)``, ``QuantizeLinear`` (``UINT8``/``INT8``,
  16-bit above) and ``DequantizeLinear`` with ``K = round(x_hi / d)``: rounding is monotone, so
  ``round(clip(x, x_hi) / d) = min(round(clip(x, K d) / d), K)`` and the clip at ``K d`` is exact.

``"qonnx"``: uniform tensors as float ``d * code`` initializers followed by ``Quant(scale=d,
zeropt=0, bitwidth, signed=1, narrow=1)`` (as Brevitas writes them); uniform activations as
``Quant(scale=d, zeropt=0, bitwidth, signed, narrow=signed)`` with a ``Clip`` first where ``K`` is
below the bitwidth's largest code; power-of-two tensors as float constants (QONNX has no
power-of-two quantizer).

Both formats: **power-of-two activations** (:func:`pow2_act`) as comparisons against the exact
float32 decision thresholds; **ties** (:func:`away_ties`): ONNX ``QuantizeLinear`` and QONNX
``Quant`` round half to even, mixq half away from zero; ``ties="away"`` first moves exact ties
``x / d = m + 1/2`` a quarter step away from zero, which leaves every other value alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mixq.export.bitpack import bits_needed
from mixq.export.codes import decode, encode, quantizer_spec
from mixq.export.errors import ExportError
from mixq.quant.base import Quantizer

QONNX_QUANT = "qonnx.custom_op.general::Quant"
TIES = ("even", "away")
_BUFFER = "export_"


def check_ties(ties: str) -> str:
    """Validate the ``ties`` option (``"even"`` or ``"away"``)."""
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} must be one of {list(TIES)}")
    return ties


def tensor_quantizers(model: nn.Module) -> dict[int, tuple[str, Tensor]]:
    """``id(quantizer) -> (tensor name, tensor)`` for every tensor (weight/bias) quantizer."""
    out = {}
    for name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            q = getattr(m, f"{pname}_quantizer", None)
            if isinstance(q, Quantizer):
                out[id(q)] = (f"{name}.{pname}" if name else pname, p)
    return out


def code_value(code: int, d: float) -> float:
    """``code * d`` computed in float32, as the fake quantizer computes it."""
    return float(torch.tensor(float(code)) * torch.tensor(d))


def _f32_at_least(v: float) -> float:
    """The smallest float32 ``>= v`` (``v`` a float64)."""
    f = np.float32(v)
    return float(np.nextafter(f, np.float32(np.inf)) if float(f) < v else f)


def away_ties(y: Tensor, d: float) -> Tensor:
    """``y`` with exact ties ``y / d = m + 1/2`` moved ``d / 4`` away from zero."""
    t = y / d
    s = torch.sign(t)
    tie = ((t - torch.round(t)) * s == 0.5).to(y.dtype)
    return y + tie * s * (d / 4)


def pow2_act(q: Quantizer) -> Callable[[Tensor], Tensor]:
    """A power-of-two activation as torch ops that export exactly (both formats).

    ``a = max(x, 0)`` (``|x|`` when signed), magnitude ``sum_j [a >= t_j] inc_j`` (+ ``q_min``
    without a zero level): ``t_j`` the smallest float32 at or above the decision threshold
    ``q_min 2^(j - 1/2)`` (``q_min / sqrt 2`` for the zero level), ``inc_j`` the step to the
    next level (a power of two, so every partial sum is exact). Same decisions as the float64
    ``log2`` of :func:`mixq.quant.functional_reference.pow2_magnitude`.
    """
    with torch.no_grad():
        q_min = float(q.derived()[0])
    L, zero, signed = q.exponent_span, q.with_zero, q.signed
    thr = [_f32_at_least(q_min * 2.0 ** (j + 0.5)) for j in range(L)]
    inc = [q_min * 2.0**j for j in range(L)]
    if zero:
        thr, inc = [_f32_at_least(q_min / math.sqrt(2.0)), *thr], [q_min, *inc]
    q.register_buffer(_BUFFER + "thresholds", torch.tensor(thr), persistent=False)
    q.register_buffer(_BUFFER + "steps", torch.tensor(inc), persistent=False)
    base = 0.0 if zero else q_min

    def forward(x: Tensor) -> Tensor:
        a = x.abs() if signed else x.clamp(min=0.0)
        above = (a.unsqueeze(-1) >= q.export_thresholds).to(x.dtype)
        mag = (above * q.export_steps).sum(-1) + base
        return torch.where(x < 0, -mag, mag) if signed else mag

    return forward


class Emitter:
    """Builds the export-mode forward of each quantizer and records what it stores.

    Args:
        fmt: ``"onnx"`` or ``"qonnx"``.
        opset: the default-domain opset of the file.
        ties: ``"even"`` or ``"away"`` (activations).

    Attributes:
        tensors: per stored tensor, the manifest of :func:`mixq.export.codes.encode` (kind,
            bits, ``d``/``k`` or ``q_min``/``q_max``/``L``) plus ``initializer`` (the codes'
            initializer name) and, after export, ``storage`` (its ONNX type).
        activations: per activation quantizer, its spec (kind, bitwidth, ``d``...).
    """

    def __init__(self, fmt: str, opset: int, ties: str = "even") -> None:
        self.fmt, self.opset, self.ties = fmt, opset, check_ties(ties)
        self.tensors: dict[str, dict[str, Any]] = {}
        self.activations: dict[str, dict[str, Any]] = {}

    def _sym(self, op: str, inputs: tuple, like: Tensor | tuple, dtype: torch.dtype,
             attrs: dict | None = None, props: dict | None = None) -> Tensor:  # fmt: skip
        shape = like.shape if isinstance(like, Tensor) else like
        version = 1 if op == QONNX_QUANT else self.opset
        return torch.onnx.ops.symbolic(op, inputs, attrs, dtype=dtype, shape=shape,
                                       version=version, metadata_props=props)  # fmt: skip

    def _qonnx_quant(self, q: Quantizer, x: Tensor, bits: int, signed: bool,
                     props: dict) -> Tensor:  # fmt: skip
        ins = (x, q.export_scale, q.export_zeropt, q.export_bitwidth)
        attrs = {"signed": int(signed), "narrow": int(signed), "rounding_mode": "ROUND"}
        return self._sym(QONNX_QUANT, ins, x, x.dtype, attrs, props)

    def _buffers(self, q: Quantizer, **tensors: Tensor) -> None:
        for k, v in tensors.items():
            q.register_buffer(_BUFFER + k, v, persistent=False)

    def tensor(self, qname: str, q: Quantizer, name: str, t: Tensor) -> Callable:
        """The forward of the quantizer of tensor ``name`` (it ignores its input)."""
        enc = encode(name, q, t)
        rec = {k: v for k, v in enc.meta.items() if k != "quantizer"}
        self.tensors[name] = rec
        props = {"mixq.tensor": name, "mixq.bitwidth": str(enc.bits)}
        shape = tuple(t.shape)
        if self.fmt == "qonnx":
            values = decode(enc.meta, enc.codes, shape)
            rec["storage"] = "FLOAT"
            if q.kind == "pow2":
                self._buffers(q, values=values)
                return lambda x: q.export_values
            bw = torch.tensor(float(enc.bits))
            self._buffers(q, values=values, scale=torch.tensor(enc.meta["d"]),
                          zeropt=torch.tensor(0.0), bitwidth=bw)  # fmt: skip
            return lambda x: self._qonnx_quant(q, q.export_values, enc.bits, True, props)
        rec["initializer"] = f"{qname}.{_BUFFER}codes"
        if q.kind == "uniform":
            dt = torch.int8 if enc.bits <= 8 else torch.int16
            self._buffers(q, codes=torch.from_numpy(enc.codes).to(dt),
                          scale=torch.tensor(enc.meta["d"]))  # fmt: skip
            return lambda x: self._sym("DequantizeLinear", (q.export_codes, q.export_scale),
                                       shape, torch.float32, props=props)  # fmt: skip
        # pow-2: the field (sign << m_bits | m) indexes the table of the 2^bits level values
        fields = np.arange(1 << enc.bits)
        valid = (fields & ((1 << enc.meta["m_bits"]) - 1)) <= enc.meta["L"] + enc.meta["with_zero"]
        table = decode(enc.meta, np.where(valid, fields, 0), (fields.size,))
        dt = torch.uint8 if enc.bits <= 8 else torch.int32
        self._buffers(q, codes=torch.from_numpy(enc.codes).to(dt), levels=table)
        return lambda x: self._sym("Gather", (q.export_levels, q.export_codes.to(torch.int64)),
                                   shape, torch.float32, {"axis": 0}, props)  # fmt: skip

    def activation(self, name: str, q: Quantizer) -> Callable:
        """The forward of activation quantizer ``name``."""
        spec = quantizer_spec(q)
        self.activations[name] = {k: v for k, v in spec.items()
                                  if k not in ("params", "bounds", "learnable")}  # fmt: skip
        if q.kind == "pow2":
            return pow2_act(q)
        d, K, signed = spec["d"], spec["k"], q.signed
        lo_code = -K if signed else 0
        lo, hi = code_value(lo_code, d), code_value(K, d)
        bits = max(q.bitwidth, bits_needed(lo_code, K, signed))
        props = {"mixq.activation": name, "mixq.bitwidth": str(q.bitwidth)}
        ties = self.ties
        if self.fmt == "qonnx":
            full = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
            self._buffers(q, scale=torch.tensor(d), zeropt=torch.tensor(0.0),
                          bitwidth=torch.tensor(float(bits)))  # fmt: skip

            def qonnx_forward(x: Tensor) -> Tensor:
                y = x.clamp(lo, hi) if full > K else x
                y = away_ties(y, d) if ties == "away" else y
                return self._qonnx_quant(q, y, bits, signed, props)

            return qonnx_forward
        if bits > 16 or (bits > 8 and self.opset < 21):
            raise ExportError(f"{name}: {bits}-bit activation codes need 16-bit QuantizeLinear "
                              "(opset >= 21); at most 16 bits are supported")  # fmt: skip
        if bits <= 8:
            zp_type = torch.int8 if signed else torch.uint8
        else:
            zp_type = torch.int16 if signed else torch.uint16
        self._buffers(q, scale=torch.tensor(d), zero_point=torch.zeros((), dtype=zp_type))

        def qdq_forward(x: Tensor) -> Tensor:
            y = x.clamp(lo, hi)
            y = away_ties(y, d) if ties == "away" else y
            c = self._sym("QuantizeLinear", (y, q.export_scale, q.export_zero_point), x,
                          zp_type, props=props)  # fmt: skip
            return self._sym("DequantizeLinear", (c, q.export_scale, q.export_zero_point), x,
                             x.dtype)  # fmt: skip

        return qdq_forward


def _patch(model: nn.Module, forwards: Callable[[str, Quantizer], Callable],
           patched: list[Quantizer]) -> None:  # fmt: skip
    for name, q in model.named_modules():
        if isinstance(q, Quantizer) and "forward" not in q.__dict__:
            patched.append(q)
            q.forward = _with_cap(forwards(name, q))


def _with_cap(forward: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    """``forward`` with the quantizers' ``cap`` argument: ``forward(min(x, cap))``."""

    def capped(x: Tensor, cap: float | None = None) -> Tensor:
        return forward(x if cap is None else x.clamp(max=cap))

    return capped


def _restore(patched: list[Quantizer]) -> None:
    for q in patched:
        q.__dict__.pop("forward", None)
        for k in [k for k in q._buffers if k.startswith(_BUFFER)]:
            del q._buffers[k]


@contextmanager
def export_mode(model: nn.Module, emitter: Emitter) -> Iterator[Emitter]:
    """Within the block, every quantizer of ``model`` computes its export-mode forward."""
    tensors = tensor_quantizers(model)

    def forward(name: str, q: Quantizer) -> Callable:
        if id(q) in tensors:
            return emitter.tensor(name, q, *tensors[id(q)])
        return emitter.activation(name, q)

    patched: list[Quantizer] = []
    try:
        with torch.no_grad():
            _patch(model, forward, patched)
        yield emitter
    finally:
        _restore(patched)


@contextmanager
def plain_mode(model: nn.Module) -> Iterator[None]:
    """Within the block, every quantizer is the identity (for graph capture of the structure)."""
    patched: list[Quantizer] = []
    try:
        _patch(model, lambda name, q: lambda x: x, patched)
        yield
    finally:
        _restore(patched)
