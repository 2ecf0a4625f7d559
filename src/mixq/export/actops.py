"""ONNX node groups for activation sites, shared by the QDQ and the QONNX exporters.

* float sites: ``Relu`` / ``Clip(0, 6)``;
* uniform sites: the largest code ``K = round(min(cap, x_hi) / d)`` (:func:`uniform_code_bound`)
  bounds a ``Clip(x, 0, K d)``; ``round(min(x, x_hi) / d) = min(round(x / d), K)`` because
  rounding is monotone, so clipping at ``K d`` instead of ``x_hi`` changes nothing;
* optional exact ties (:func:`away_ties`): ONNX ``QuantizeLinear`` and QONNX ``Quant`` round half
  to even, mixq half away from zero. Ties are rare behind a float batch norm but common when the
  pre-activation is an exact sum of grid values (folded BN: ~1% of the activations of a 4-bit
  ResNet-20), so ``ties="away"`` adds ``c + (d/2) * [c/d - round(c/d) == 1/2]`` before the
  quantizer, which moves exactly the ties to ``(m + 1) d`` and leaves every other value alone;
* power-of-two sites: :func:`pow2_act`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mixq.export.codes import quantizer_spec
from mixq.export.graph import GraphBuilder
from mixq.layers import QuantAct
from mixq.quant.ste import round_half_away

TIES = ("even", "away")


def check_ties(ties: str) -> str:
    """Validate the ``ties`` option (``"even"`` or ``"away"``)."""
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} must be one of {list(TIES)}")
    return ties


def away_ties(b: GraphBuilder, c: str, d: float, name: str) -> str:
    """``c`` with exact ties ``c = (m + 1/2) d`` (``c >= 0``) moved up to ``(m + 1) d``."""
    t = b.op("Div", [c, b.const(f"{name}.scale", d)], f"{name}.t")
    frac = b.op("Sub", [t, b.op("Round", [t], f"{name}.t_even")], f"{name}.frac")
    tie = b.op("Equal", [frac, b.const("half", 0.5)], f"{name}.tie")
    step = b.op("Cast", [tie], f"{name}.tie_f", to=b.onnx.TensorProto.FLOAT)
    return b.op("Add", [c, b.op("Mul", [step, b.const(f"{name}.half_step", d / 2)],
                                f"{name}.nudge")], f"{name}.ties_away")  # fmt: skip


def float_act(b: GraphBuilder, x: str, m: QuantAct, name: str) -> str:
    """A float activation site: ``Relu`` or ``Clip(0, 6)``."""
    if m.cap is None:
        return b.op("Relu", [x], name)
    return b.op("Clip", [x, b.const("zero", 0.0), b.const(f"{name}.cap", float(m.cap))], name)


def uniform_code_bound(m: QuantAct) -> tuple[float, int]:
    """``(d, K)``: the step and the largest code of an unsigned uniform site (cap included)."""
    q = m.quantizer
    with torch.no_grad():
        d, x_hi = (v.float() for v in q.derived())
        hi = torch.minimum(x_hi, torch.tensor(float(m.cap))) if m.cap is not None else x_hi
        return float(d), int(round_half_away(hi / d))


def code_value(code: int, d: float) -> float:
    """``code * d`` computed in float32, as the fake quantizer computes it."""
    return float(torch.tensor(float(code)) * torch.tensor(d))


def pow2_act(b: GraphBuilder, x: str, m: QuantAct, name: str) -> str:
    """An unsigned power-of-two site with elementwise ops and a level-table ``Gather``."""
    q = m.quantizer
    with torch.no_grad():
        x_min = q.derived()[0].float()
        thr = float(x_min * (1.0 / math.sqrt(2.0)))
    L = q.exponent_span
    a = float_act(b, x, m, f"{name}.relu")
    t = b.op("Div", [a, b.const(f"{name}.q_min", float(x_min))], f"{name}.ratio")
    log2 = b.op("Mul", [b.op("Log", [t], f"{name}.ln"), b.const("inv_ln2", 1 / math.log(2))],
                f"{name}.log2")  # fmt: skip
    e = b.op("Clip", [b.op("Round", [log2], f"{name}.round"), b.const("zero", 0.0),
                      b.const(f"{name}.L", float(L))], f"{name}.exponent")  # fmt: skip
    levels = [float(x_min) * 2.0**i for i in range(L + 1)]
    if q.with_zero:
        e1 = b.op("Add", [e, b.const("one", 1.0)], f"{name}.index")
        below = b.op("Less", [a, b.const(f"{name}.zero_threshold", thr)], f"{name}.below")
        e = b.op("Where", [below, b.const("zero", 0.0), e1], f"{name}.index0")
        levels = [0.0, *levels]
    idx = b.op("Cast", [e], f"{name}.index_i64", to=b.onnx.TensorProto.INT64)
    table = b.initializer(f"{name}.levels", np.asarray(levels, dtype=np.float32))
    return b.op("Gather", [table, idx], name, axis=0)


def act_record(m: QuantAct) -> dict[str, Any]:
    """Metadata of one activation site."""
    rec: dict[str, Any] = {"cap": m.cap}
    if m.quantizer is None:
        rec["kind"] = "float"
        return rec
    spec = quantizer_spec(m.quantizer)
    rec.update({k: v for k, v in spec.items() if k not in ("params", "bounds", "learnable")})
    if m.quantizer.kind == "uniform":
        rec["code_max"] = uniform_code_bound(m)[1]
    return rec
