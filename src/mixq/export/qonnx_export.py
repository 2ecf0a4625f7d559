"""QONNX: ``Quant`` nodes (domain ``qonnx.custom_op.general``) for FINN-style flows.

``Quant(x, scale, zeropt, bitwidth; signed, narrow, rounding_mode)`` computes ``scale *
round(clamp(x / scale + zeropt, min_int, max_int)) - zeropt`` (a fake quantization). The file
is written by :func:`mixq.export.onnx_export.export_onnx` with ``format="qonnx"``; the node
groups are in :mod:`mixq.export.quant_nodes` (uniform weights: float ``d * code`` initializers
and ``Quant(d, 0, b, signed=1, narrow=1)``; uniform activations: ``Quant(d, 0, b, signed,
narrow=signed)``; power-of-two tensors: float constants and elementwise ops).

``rounding_mode="ROUND"``: QONNX's reference implementation rounds with ``np.round``, half to
even (the spec lists ``HALF_UP``, but the qonnx executor does not implement it); the difference
is limited to exact ties ``x / d = m + 1/2``, and ``ties="away"`` removes it. onnxruntime cannot
run ``Quant`` nodes; use qonnx / FINN, or :func:`quant_to_standard_onnx` to lower them to
standard ops for a check.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixq.export.errors import require_onnx

QONNX_DOMAIN = "qonnx.custom_op.general"


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
        nodes += [helper.make_node(op, ins, [out], name=f"{n.name or o}/{op}")
                  for op, ins, out in steps]  # fmt: skip
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [o for o in model.opset_import if o.domain != QONNX_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model
