"""Translate a traced model (``torch.fx``) into ONNX nodes, one handler per op.

Quantization is delegated to a *backend* (:class:`Backend`): it turns each weight/bias into an
ONNX tensor name (an integer initializer + ``DequantizeLinear``, a float constant, or a QONNX
``Quant`` node) and each :class:`~mixq.layers.QuantAct` into its node group. Everything else is
plain ONNX: ``Conv``, ``Gemm``/``MatMul``, ``BatchNormalization``, ``Relu``, ``Clip``, ``Add``,
pooling, ``Flatten``, ``Pad``, ``Slice``, ``Concat``. An op outside this set raises
:class:`ExportError` naming it.
"""

from __future__ import annotations

import operator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from mixq.export.errors import ExportError
from mixq.export.graph import GraphBuilder
from mixq.layers import QuantAct
from mixq.quant.base import Quantizer

_INT64_MAX = 2**63 - 1


class Backend(Protocol):
    """How quantized tensors and activation sites become ONNX nodes."""

    def weight(self, b: GraphBuilder, name: str, t: Tensor, q: Quantizer | None) -> str:
        """The ONNX name of the (dequantized) float tensor ``q(t)`` (``t`` when ``q`` is None)."""
        ...

    def act(self, b: GraphBuilder, x: str, m: QuantAct, name: str) -> str:
        """The output of activation site ``m`` applied to ``x``."""
        ...


def _arg(n: fx.Node, i: int, key: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(key, default)


def _pair(v: Any) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v), int(v)]


def _rank(n: Any) -> int:
    shape = n.meta.get("shape") if isinstance(n, fx.Node) else None
    if shape is None:
        raise ExportError(f"no recorded shape for {n}; pass example_input")
    return len(shape)


class Emitter:
    """Walks the fx graph and writes ONNX nodes through ``builder`` and ``backend``."""

    def __init__(self, gm: fx.GraphModule, builder: GraphBuilder, backend: Backend,
                 output_scale: Tensor | None = None) -> None:  # fmt: skip
        self.gm, self.b, self.backend = gm, builder, backend
        self.output_scale = output_scale
        self.modules = dict(gm.named_modules())
        self.env: dict[str, str] = {}

    def val(self, a: Any, base: str = "c") -> str:
        """ONNX name of an fx argument (a graph value or a numeric constant)."""
        if isinstance(a, fx.Node):
            return self.env[a.name]
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return self.b.const(base, float(a))
        raise ExportError(f"unsupported argument {a!r} in the traced graph")

    def run(self, input_shape: tuple) -> tuple[list, list]:
        """Emit every node; returns the graph ``(inputs, outputs)`` as ``(name, shape)``."""
        inputs, outputs = [], []
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                if inputs:
                    raise ExportError("only models with a single tensor input can be exported")
                self.env[n.name] = self.b.fresh("input")
                inputs.append((self.env[n.name], input_shape))
            elif n.op == "get_attr":
                t = operator.attrgetter(n.target)(self.gm)
                self.env[n.name] = self.b.initializer(n.target, t.detach().cpu().numpy())
            elif n.op == "call_module":
                self.env[n.name] = self.module(n, self.modules[n.target], n.target)
            elif n.op in ("call_function", "call_method"):
                self.env[n.name] = self.function(n)
            elif n.op == "output":
                outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
                for i, o in enumerate(outs):
                    base = "output" if i == 0 else f"output{i}"
                    if self.output_scale is not None and i == 0:
                        s = self.b.const("logit_scale", float(self.output_scale))
                        name = self.b.op("Mul", [self.val(o), s], base)
                    else:
                        name = self.b.op("Identity", [self.val(o)], base)
                    outputs.append((name, o.meta.get("shape", ())))
        return inputs, outputs

    # -- modules ------------------------------------------------------------------------------
    def module(self, n: fx.Node, m: nn.Module, name: str) -> str:
        x = self.val(n.args[0]) if n.args else None
        b = self.b
        if isinstance(m, QuantAct):
            return self.backend.act(b, x, m, name)
        if isinstance(m, nn.Conv2d):
            return self.conv(m, name, x)
        if isinstance(m, nn.Linear):
            return self.linear(m, name, x, _rank(n.args[0]))
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            return self.batchnorm(m, name, x)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return x
        if isinstance(m, nn.ReLU):
            return b.op("Relu", [x], name)
        if isinstance(m, nn.ReLU6):
            return b.op("Clip", [x, b.const("zero", 0.0), b.const("six", 6.0)], name)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self.global_pool(m.output_size, x, name)
        if isinstance(m, nn.MaxPool2d) and not m.return_indices:
            s = m.stride if m.stride is not None else m.kernel_size
            pad = _pair(m.padding)
            return b.op("MaxPool", [x], name, kernel_shape=_pair(m.kernel_size), strides=_pair(s),
                        pads=pad + pad, dilations=_pair(m.dilation),
                        ceil_mode=int(m.ceil_mode))  # fmt: skip
        if isinstance(m, nn.AvgPool2d) and m.divisor_override is None:
            s = m.stride if m.stride is not None else m.kernel_size
            pad = _pair(m.padding)
            return b.op("AveragePool", [x], name, kernel_shape=_pair(m.kernel_size),
                        strides=_pair(s), pads=pad + pad, ceil_mode=int(m.ceil_mode),
                        count_include_pad=int(m.count_include_pad))  # fmt: skip
        if isinstance(m, nn.Flatten):
            return self.flatten(x, m.start_dim, m.end_dim, name)
        raise ExportError(f"module {name!r} ({type(m).__name__}) is not supported by the ONNX "
                          "exporters")  # fmt: skip

    def conv(self, m: nn.Conv2d, name: str, x: str) -> str:
        if m.padding_mode != "zeros" or m.padding == "same":
            raise ExportError(f"{name}: only zero padding with explicit sizes is supported")
        pad = [0, 0] if m.padding == "valid" else _pair(m.padding)
        ins = [x, self.backend.weight(self.b, f"{name}.weight", m.weight,
                                      getattr(m, "weight_quantizer", None))]  # fmt: skip
        if m.bias is not None:
            ins.append(self.backend.weight(self.b, f"{name}.bias", m.bias,
                                           getattr(m, "bias_quantizer", None)))  # fmt: skip
        return self.b.op("Conv", ins, name, kernel_shape=_pair(m.kernel_size),
                         strides=_pair(m.stride), pads=pad + pad, dilations=_pair(m.dilation),
                         group=m.groups)  # fmt: skip

    def linear(self, m: nn.Linear, name: str, x: str, rank: int) -> str:
        w = self.backend.weight(self.b, f"{name}.weight", m.weight,
                                getattr(m, "weight_quantizer", None))  # fmt: skip
        bias = None
        if m.bias is not None:
            bias = self.backend.weight(self.b, f"{name}.bias", m.bias,
                                       getattr(m, "bias_quantizer", None))  # fmt: skip
        if rank == 2:
            return self.b.op("Gemm", [x, w] + ([bias] if bias else []), name, transB=1)
        y = self.b.op("MatMul", [x, self.b.op("Transpose", [w], f"{name}.wT")], name)
        return self.b.op("Add", [y, bias], name) if bias else y

    def batchnorm(self, m: nn.modules.batchnorm._BatchNorm, name: str, x: str) -> str:
        if m.running_mean is None or m.running_var is None:
            raise ExportError(f"{name}: batch norm without running statistics")
        c = m.num_features
        gamma = m.weight if m.weight is not None else torch.ones(c)
        beta = m.bias if m.bias is not None else torch.zeros(c)
        ins = [x] + [self.b.initializer(f"{name}.{k}", t.detach().float().cpu().numpy())
                     for k, t in (("weight", gamma), ("bias", beta), ("running_mean",
                                  m.running_mean), ("running_var", m.running_var))]  # fmt: skip
        return self.b.op("BatchNormalization", ins, name, epsilon=float(m.eps))

    def global_pool(self, size: Any, x: str, name: str) -> str:
        if size not in (1, (1, 1), [1, 1]):
            raise ExportError(f"{name}: adaptive pooling to {size} (only to 1x1) is unsupported")
        return self.b.op("GlobalAveragePool", [x], name)

    def flatten(self, x: str, start: int, end: int, name: str) -> str:
        if start != 1 or end != -1:
            raise ExportError(f"{name}: only flatten(x, 1) is supported")
        return self.b.op("Flatten", [x], name, axis=1)

    # -- functions and methods ----------------------------------------------------------------
    def function(self, n: fx.Node) -> str:
        t, b, name = n.target, self.b, n.name
        binary = {
            operator.add: "Add",
            torch.add: "Add",
            "add": "Add",
            operator.mul: "Mul",
            torch.mul: "Mul",
            "mul": "Mul",
            operator.sub: "Sub",
            operator.truediv: "Div",
        }
        if t in binary and not n.kwargs:
            return b.op(binary[t], [self.val(n.args[0]), self.val(n.args[1])], name)
        x = self.val(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if t in (torch.flatten, "flatten"):
            return self.flatten(x, _arg(n, 1, "start_dim", 0), _arg(n, 2, "end_dim", -1), name)
        if t in (F.relu, torch.relu, "relu"):
            return b.op("Relu", [x], name)
        if t is F.relu6:
            return b.op("Clip", [x, b.const("zero", 0.0), b.const("six", 6.0)], name)
        if t is F.adaptive_avg_pool2d:
            return self.global_pool(_arg(n, 1, "output_size"), x, name)
        if t in ("contiguous",) or (t is F.dropout and not _arg(n, 2, "training", True)):
            return x
        if t is F.pad:
            return self.pad(n, x)
        if t is operator.getitem:
            return self.slice(n, x)
        if t is torch.cat:
            ins = [self.val(a) for a in n.args[0]]
            return b.op("Concat", ins, name, axis=int(_arg(n, 1, "dim", 0)))
        raise ExportError(f"{n.op} {getattr(t, '__name__', t)!r} is not supported by the ONNX "
                          "exporters")  # fmt: skip

    def pad(self, n: fx.Node, x: str) -> str:
        pad, mode = list(_arg(n, 1, "pad")), _arg(n, 2, "mode", "constant")
        value = _arg(n, 3, "value", None) or 0.0
        if mode != "constant":
            raise ExportError(f"{n.name}: F.pad mode {mode!r} is unsupported (only 'constant')")
        r = _rank(n.args[0])
        begin, end = [0] * r, [0] * r
        for i in range(len(pad) // 2):
            begin[r - 1 - i], end[r - 1 - i] = pad[2 * i], pad[2 * i + 1]
        pads = self.b.const("pads", begin + end, dtype="int64")
        return self.b.op("Pad", [x, pads, self.b.const("pad_value", float(value))], n.name,
                         mode="constant")  # fmt: skip

    def slice(self, n: fx.Node, x: str) -> str:
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        starts, ends, axes, steps = [], [], [], []
        for axis, s in enumerate(idx):
            if not isinstance(s, slice) or any(isinstance(v, fx.Node)
                                               for v in (s.start, s.stop, s.step)):  # fmt: skip
                raise ExportError(f"{n.name}: only constant slices (x[:, :, ::2]) are supported")
            if s == slice(None):
                continue
            step = 1 if s.step is None else int(s.step)
            if step <= 0:
                raise ExportError(f"{n.name}: negative slice steps are unsupported")
            starts.append(0 if s.start is None else int(s.start))
            ends.append(_INT64_MAX if s.stop is None else int(s.stop))
            axes.append(axis)
            steps.append(step)
        if not axes:
            return x
        c = self.b.const
        ins = [x, c("starts", starts, "int64"), c("ends", ends, "int64"),
               c("axes", axes, "int64"), c("steps", steps, "int64")]  # fmt: skip
        return self.b.op("Slice", ins, n.name)
