"""Graph capture (``torch.fx``, quantized layers as leaves) and a small ONNX graph builder.

The ONNX exporters do not go through ``torch.onnx.export``: its TorchScript path is deprecated
and stops at opset 20 (no INT4), and the dynamo path needs ``onnxscript`` and a slow
``torch.export``. Instead :func:`trace` captures the module graph with ``torch.fx`` (the
quantized layers ``QuantConv2d``/``QuantLinear``/``QuantAct`` stay leaves, so their quantizers
are visible), and :mod:`mixq.export.emit` writes one ONNX node group per graph node through a
:class:`GraphBuilder`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from mixq.export.errors import ExportError, require_onnx
from mixq.layers import QuantAct, QuantConv2d, QuantLinear, scale_logits

_LEAVES = (QuantConv2d, QuantLinear, QuantAct)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` graph of ``model`` with the mixq layers and ``torch.nn`` modules as leaves.

    Raises:
        ExportError: the model's forward has data-dependent control flow fx cannot trace.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        raise ExportError(
            f"cannot capture the graph of {type(model).__name__} with torch.fx ({e}); the ONNX "
            "exporters and BN folding need a forward without data-dependent control flow"
        ) from e
    return fx.GraphModule(model, graph)


def output_scale(model: nn.Module) -> torch.Tensor | None:
    """The ``logit_scale`` that :func:`mixq.layers.add_logit_scale` applies through a forward
    hook (None without one). Any other hook raises: exporters would silently drop it."""
    scale = None
    for name, m in model.named_modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        for h in hooks:
            if m is model and h is scale_logits:
                scale = model.logit_scale.detach().float().cpu()
                continue
            raise ExportError(
                f"module {name or type(model).__name__!r} has a forward hook ({h!r}) that the "
                "exporters cannot reproduce; remove it before exporting"
            )
    return scale


def shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Run ``example_input`` through ``gm`` and store ``node.meta['shape']`` on tensor nodes."""

    class _Interp(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                n.meta["shape"] = tuple(out.shape)
            return out

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _Interp(gm).run(example_input)
    finally:
        gm.train(was_training)


class GraphBuilder:
    """Accumulates ONNX nodes, initializers and metadata with unique names.

    Args:
        opset: the default-domain opset to target.
        domains: extra ``{domain: version}`` opset imports (e.g. QONNX's).
    """

    def __init__(self, opset: int, domains: dict[str, int] | None = None) -> None:
        self.onnx = require_onnx()
        self.opset = opset
        self.domains = dict(domains or {})
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.metadata: dict[str, Any] = {}
        self._used: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def fresh(self, base: str) -> str:
        """A tensor name not used yet, derived from ``base``."""
        name = base.replace("/", ".") or "t"
        i = 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def initializer(self, base: str, array: np.ndarray | Any) -> str:
        """Add an initializer (a numpy array or a ready ``TensorProto``); returns its name."""
        name = self.fresh(base)
        if isinstance(array, np.ndarray):
            proto = self.onnx.numpy_helper.from_array(array.copy(order="C"), name)
        else:
            proto = array
            proto.name = name
        self.initializers.append(proto)
        return name

    def const(self, base: str, value: Any, dtype: Any = np.float32) -> str:
        """A constant initializer from a Python scalar or list (shared per name and value)."""
        arr = np.asarray(value, dtype=dtype)
        key = (base, arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(base, arr)
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], base: str, domain: str = "", **attrs: Any) -> str:
        """Append one single-output node; returns the output name."""
        out = self.fresh(base)
        node = self.onnx.helper.make_node(
            op_type, inputs, [out], name=self.fresh(f"{base}/{op_type}"), domain=domain, **attrs
        )
        self.nodes.append(node)
        return out

    def model(self, inputs: list[tuple[str, tuple]], outputs: list[tuple[str, tuple]],
              name: str) -> Any:  # fmt: skip
        """The ``ModelProto`` (batch dimension symbolic ``N``), checked by ``onnx.checker``."""
        helper, tp = self.onnx.helper, self.onnx.TensorProto

        def info(n: str, shape: tuple) -> Any:
            dims = ["N", *shape[1:]] if shape else None
            return helper.make_tensor_value_info(n, tp.FLOAT, dims)

        graph = helper.make_graph(
            self.nodes, name, [info(*i) for i in inputs], [info(*o) for o in outputs],
            self.initializers,
        )  # fmt: skip
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="mixq")
        model.ir_version = helper.find_min_ir_version_for([opsets[0]], ignore_unknown=True)
        for key, value in self.metadata.items():
            entry = model.metadata_props.add()
            entry.key = key
            entry.value = (
                value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            )
        self.onnx.checker.check_model(model)
        return model
