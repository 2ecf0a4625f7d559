"""QONNX export: ``Quant`` nodes (domain ``qonnx.custom_op.general``) for FINN-style flows.

``Quant(x, scale, zeropt, bitwidth; signed, narrow, rounding_mode)`` computes ``scale *
round(clamp(x / scale + zeropt, min_int, max_int)) - zeropt`` (a fake quantization). mixq maps:

* **uniform weights/biases**: the dequantized float values ``d * code`` as initializer, then
  ``Quant(scale=d, zeropt=0, bitwidth=b, signed=1, narrow=1)``: symmetric codes ``[-k, k]`` with
  ``k <= 2^(b-1) - 1`` (``b`` is the stored width, i.e. one more bit for a U2 overflow);
* **uniform activations**: ``Quant(scale=d, zeropt=0, bitwidth=b, signed=0, narrow=0)``, which
  also clamps negatives to 0 (it is the ReLU); when the largest code ``K = round(min(cap, x_hi)
  / d)`` is below ``2^b - 1`` a ``Clip(x, 0, K d)`` comes first;
* **power-of-two tensors**: QONNX has no power-of-two quantizer: weights are float constants
  (exponent range and bitwidth in ``metadata_props``), activations the elementwise ops of
  :func:`mixq.export.onnx_export.pow2_act`.

``rounding_mode="ROUND"``: QONNX's reference implementation rounds with ``np.round``, half to
even (the spec lists ``HALF_UP``, which would match mixq's half-away-from-zero for these
non-negative activations, but the qonnx executor does not implement it); the difference is
limited to exact ties ``x / d = m + 1/2``, and ``ties="away"`` removes it
(:func:`mixq.export.actops.away_ties`). onnxruntime cannot run ``Quant`` nodes; use qonnx /
FINN, or :func:`quant_to_standard_onnx` to lower them to standard ops for a check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
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
from mixq.export.bitpack import bits_needed
from mixq.export.codes import decode, encode
from mixq.export.errors import require_onnx
from mixq.export.graph import GraphBuilder
from mixq.export.onnx_export import build_model
from mixq.layers import QuantAct
from mixq.quant.base import Quantizer

QONNX_DOMAIN = "qonnx.custom_op.general"
DEFAULT_QONNX_OPSET = 13


class QonnxBackend:
    """``Quant`` nodes for uniform tensors; float constants / elementwise ops for pow-2."""

    rounding_mode = "ROUND"

    def __init__(self, ties: str = "even") -> None:
        self.ties = check_ties(ties)
        self.tensors: dict[str, Any] = {}
        self.activations: dict[str, Any] = {}

    def _quant(self, b: GraphBuilder, x: str, name: str, d: float, bits: int, signed: bool,
               narrow: bool) -> str:  # fmt: skip
        ins = [x, b.const(f"{name}.scale", d), b.const("zeropt", 0.0),
               b.const(f"{name}.bitwidth", float(bits))]  # fmt: skip
        return b.op("Quant", ins, name, domain=QONNX_DOMAIN, signed=int(signed),
                    narrow=int(narrow), rounding_mode=self.rounding_mode)  # fmt: skip

    def weight(self, b: GraphBuilder, name: str, t: Tensor, q: Quantizer | None) -> str:
        if q is None:
            self.tensors[name] = {"kind": "float", "bits": 32}
            return b.initializer(name, t.detach().float().cpu().numpy())
        enc = encode(name, q, t)
        self.tensors[name] = {k: v for k, v in enc.meta.items() if k != "quantizer"}
        values = b.initializer(f"{name}_float", decode(enc.meta, enc.codes, tuple(t.shape)).numpy())
        if q.kind == "pow2":
            self.tensors[name]["storage"] = "float32 (dequantized power-of-two values)"
            return values
        return self._quant(b, values, name, enc.meta["d"], enc.bits, q.signed, q.signed)

    def act(self, b: GraphBuilder, x: str, m: QuantAct, name: str) -> str:
        self.activations[name] = act_record(m)
        if m.quantizer is None:
            return float_act(b, x, m, name)
        if m.quantizer.kind == "pow2":
            return pow2_act(b, x, m, name)
        d, K = uniform_code_bound(m)
        bits = max(m.quantizer.bitwidth, bits_needed(0, K, False))
        if (1 << bits) - 1 > K:
            hi = b.const(f"{name}.hi", code_value(K, d))
            x = b.op("Clip", [x, b.const("zero", 0.0), hi], f"{name}.clip")
        if self.ties == "away":
            x = away_ties(b, x, d, name)
        return self._quant(b, x, name, d, bits, False, False)


def export_qonnx(model: nn.Module, path: str | Path, *, example_input: Tensor | None = None,
                 opset: int | None = None, ties: str = "even") -> Any:  # fmt: skip
    """Write ``model`` as a QONNX file (module docstring); returns the ``ModelProto``.

    Args:
        model: a quantized model, in eval mode.
        path: output file.
        example_input: one batch for shape recording.
        opset: default-domain opset (default 13).
        ties: ``"even"`` (QONNX ``ROUND``) or ``"away"`` (extra nodes round activation ties
            half away from zero first, as mixq).
    """
    opset = DEFAULT_QONNX_OPSET if opset is None else int(opset)
    builder = GraphBuilder(opset, {QONNX_DOMAIN: 1})
    backend = QonnxBackend(ties)
    builder.metadata.update({"mixq.format": "qonnx", "mixq.tensors": backend.tensors,
                             "mixq.activations": backend.activations})  # fmt: skip
    proto = build_model(model, builder, backend, example_input)
    Path(path).write_bytes(proto.SerializeToString())
    return proto


def quant_to_standard_onnx(proto: Any) -> Any:
    """A copy of a QONNX model whose ``Quant`` nodes are lowered to standard ONNX ops.

    ``Quant`` becomes ``Mul(Round(Clip(Div(x, scale), min_int, max_int)), scale)`` (zero point
    0, ``Round`` half to even as QONNX's ``ROUND``); for checking a QONNX file with onnxruntime.
    """
    onnx = require_onnx()
    helper, nph = onnx.helper, onnx.numpy_helper
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    inits = {i.name: nph.to_array(i) for i in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        if n.op_type != "Quant" or n.domain != QONNX_DOMAIN:
            nodes.append(n)
            continue
        x, scale, _, bw = n.input
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        bits = int(inits[bw])
        signed, narrow = attrs.get("signed", 1), attrs.get("narrow", 0)
        lo = -(2 ** (bits - 1)) + int(narrow) if signed else 0
        hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1 - int(narrow)
        lo_n, hi_n = f"{n.output[0]}.lo", f"{n.output[0]}.hi"
        model.graph.initializer.extend(
            [nph.from_array(np.array(v, np.float32), k) for k, v in ((lo_n, lo), (hi_n, hi))]
        )
        o = n.output[0]
        steps = (
            ("Div", [x, scale], o + ".div"),
            ("Clip", [o + ".div", lo_n, hi_n], o + ".clip"),
            ("Round", [o + ".clip"], o + ".round"),
            ("Mul", [o + ".round", scale], o),
        )
        nodes += [helper.make_node(op, ins, [out], name=f"{n.name}/{op}") for op, ins, out in steps]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [o for o in model.opset_import if o.domain != QONNX_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model
