"""One dry forward, recorded tensor by tensor: who produced each activation and who read it.

:func:`trace` runs the model once under a :class:`torch.overrides.TorchFunctionMode` (which sees
every ``torch`` function, ``torch.nn.functional`` call and tensor method) plus global module
hooks (which see every module call). The result is a list of :class:`Op` in execution order and
a :class:`Value` per activation tensor: its producer, its readers, its per-sample element count
and whether it is known to be non-negative. Leaf modules (no children, or a mixq layer) are one
op each; the calls inside them are not recorded. Parameters, buffers and constants are not
activations. Ops that only re-label storage (``view``, ``reshape``, ``flatten``, ``permute``,
eval-mode dropout, ...) do not create a new value: their output *is* the input's value, so
``x.view(x.size(0), -1)`` read by a linear layer is the pooled tensor itself. Each call of a
reused module, and each in-place update, creates a new value.

This module records; :mod:`mixq.sites` decides which values are activation sites (spec 5.1).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from mixq.layers import QuantAct, QuantConv2d, QuantLinear, QuantOut

LAYERS = (nn.Conv2d, nn.Linear)
"""Quantizable layers (their inputs are activation sites; ``QuantConv2d`` etc. subclass them)."""

#: Activation functions by call name (functional, ``torch.*`` and tensor-method spellings).
ACTIVATION_FUNCTIONS = frozenset(
    {"relu", "relu_", "relu6", "silu", "silu_", "gelu", "hardswish", "hardswish_", "hardsigmoid",
     "hardsigmoid_", "sigmoid", "sigmoid_", "tanh", "tanh_", "elu", "elu_", "leaky_relu",
     "leaky_relu_", "mish", "softplus", "selu", "celu", "glu", "softmax", "log_softmax",
     "hardtanh", "hardtanh_", "prelu", "rrelu", "logsigmoid", "softsign", "tanhshrink",
     "threshold"}
)  # fmt: skip
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.ELU, nn.LeakyReLU, nn.Mish, nn.Softplus, nn.SELU, nn.CELU, nn.GLU, nn.Softmax,
    nn.LogSoftmax, nn.Hardtanh, nn.PReLU, nn.RReLU, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
    nn.Threshold, QuantAct, QuantOut,
)  # fmt: skip
RELU_FUNCTIONS = frozenset({"relu", "relu_", "relu6"})

#: Producers whose output is >= 0 for every input (an unsigned quantizer then loses nothing).
#: SiLU (min -0.278), GELU (-0.17), hard-swish (-0.375), mish, ELU, tanh are *not* among them.
NONNEG_FUNCTIONS = frozenset(
    {"relu", "relu_", "relu6", "sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "softmax",
     "softplus", "exp", "abs", "sqrt", "square", "rsqrt"}
)  # fmt: skip
NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softplus, QuantAct)

#: Non-negative when every activation input is (pooling, selection, sums and products).
NONNEG_PRESERVING = frozenset(
    {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
     "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d",
     "_max_pool2d", "max_pool2d_with_indices", "adaptive_max_pool2d_with_indices", "cat",
     "concat", "concatenate", "stack", "chunk", "split", "tensor_split", "unbind", "narrow",
     "__getitem__", "select", "index_select", "add", "__add__", "__radd__", "__iadd__", "add_",
     "mul", "__mul__", "__rmul__", "__imul__", "mul_", "mean", "sum", "amax", "max", "pad",
     "interpolate", "upsample", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "roll",
     "repeat", "tile", "expand_as", "repeat_interleave"}
)  # fmt: skip
NONNEG_PRESERVING_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.PixelShuffle, nn.ChannelShuffle,
    nn.ZeroPad2d,
)  # fmt: skip

#: Sums and products: non-negative only when their numbers (``x * -1``, ``alpha=-1``) are too.
ARITHMETIC = frozenset(
    {"add", "__add__", "__radd__", "__iadd__", "add_", "mul", "__mul__", "__rmul__", "__imul__",
     "mul_"}
)  # fmt: skip

#: Ops whose outputs are parts of their input (views): the input stays stored while they are.
PART_FUNCTIONS = frozenset(
    {"chunk", "split", "tensor_split", "unbind", "narrow", "__getitem__", "select"}
)

#: Ops whose output is the same stored tensor as their (first) input: no new value.
ALIAS_FUNCTIONS = frozenset(
    {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
     "squeeze_", "unsqueeze_", "permute", "transpose", "t", "swapaxes", "movedim", "contiguous",
     "expand", "detach", "clone", "to", "float", "type", "dropout", "dropout1d", "dropout2d",
     "dropout3d", "alpha_dropout", "feature_alpha_dropout", "__get__", "identity", "mT"}
)  # fmt: skip
ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.AlphaDropout)  # fmt: skip


@dataclass
class Value:
    """One stored activation tensor of the dry forward.

    Attributes:
        index: position in :attr:`Graph.values`.
        producer: index of the producing op (an ``"input"`` op for a network input).
        numel: elements per sample (``numel / batch``).
        shape: per-sample shape of the tensor as produced.
        nonneg: True when every element is known to be >= 0 for any input.
        readers: indices of the ops that read it, in execution order.
        name: its producer's name, ``[i]`` appended for the i-th output of a multi-output op
            (``:chunk[1]``).
    """

    index: int
    producer: int
    numel: int
    shape: tuple[int, ...]
    nonneg: bool
    readers: list[int] = field(default_factory=list)
    name: str = ""


@dataclass
class Op:
    """One recorded call: a leaf module call, a functional call, or a network input.

    Attributes:
        index: position in :attr:`Graph.ops` (execution order).
        name: a unique, human-readable name: the module path (``layer1.0.relu``; ``relu#2`` for
            the second call of a reused module) or the call and the module it ran in
            (``layer1.0:add``, ``:flatten`` at the top level); ``input`` for the network input.
        kind: ``"module"``, ``"function"`` or ``"input"``.
        target: the module type name or the function name.
        module: the module path (the calling module for a function; "" at the top).
        inputs: indices of the activation values read.
        outputs: indices of the values produced (aliases are not listed).
        layer: True for a conv/linear layer call.
        activation: True for an activation call (module or function).
        relu: True for a ReLU/ReLU6 (module or function).
    """

    index: int
    name: str
    kind: str
    target: str
    module: str
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    layer: bool = False
    activation: bool = False
    relu: bool = False


@dataclass
class Graph:
    """The recorded dry forward: ``ops`` in execution order, ``values``, the ``outputs`` values
    of the model and the leaf module objects by op index (``modules``)."""

    ops: list[Op]
    values: list[Value]
    outputs: list[int]
    modules: dict[int, nn.Module]

    def producer(self, v: int) -> Op | None:
        """The op that produced value ``v`` (None for a network input)."""
        op = self.ops[self.values[v].producer]
        return None if op.kind == "input" else op


def _is_leaf(m: nn.Module) -> bool:
    """One op: a layer, a mixq module, or a childless ``torch.nn`` module (BatchNorm2d, ReLU,
    ...). A user's own childless module (timm's ``GELU``, a LayerScale) is looked into like a
    container, so that the functional calls in it are seen."""
    if isinstance(m, (QuantConv2d, QuantLinear, QuantAct, QuantOut, *LAYERS)):
        return True
    return type(m).__module__.startswith("torch.") and not any(True for _ in m.children())


def _fname(func: Any) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a tensor property such as ``x.T`` or ``x.data``
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", "__get__") if owner is not None else name
        return "__get__" if name in ("T", "mT", "H", "data") else name
    return name


def _negative_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x < 0


class _Recorder(TorchFunctionMode):
    """Records functional calls; module calls arrive through the global hooks below."""

    def __init__(self, model: nn.Module, batch: int) -> None:
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.batch = batch
        self.ops: list[Op] = []
        self.values: list[Value] = []
        self.of: dict[int, int] = {}  # id(tensor) -> value index
        self.keep: list[Tensor] = []  # keeps recorded tensors alive so that ids stay unique
        self.stack: list[str] = []
        self.depth = 0  # > 0 inside a leaf module or our own bookkeeping: record nothing
        self.modules: dict[int, nn.Module] = {}

    def _tensors(self, obj: Any) -> list[Tensor]:
        return [t for t in tree_flatten(obj)[0] if isinstance(t, Tensor)]

    def _inputs(self, args: Any) -> list[int]:
        seen: list[int] = []
        for t in self._tensors(args):
            v = self.of.get(id(t))
            if v is not None and v not in seen:
                seen.append(v)
        return seen

    def _preserves_nonneg(self, target: str, args: Any) -> bool:
        """Every tensor read is a non-negative activation (a parameter, e.g. a cls token or a
        LayerScale gamma, may be negative), and for sums and products every number is >= 0."""
        leaves = tree_flatten(args)[0]
        for t in leaves:
            if isinstance(t, Tensor):
                v = self.of.get(id(t))
                if v is None or not self.values[v].nonneg:
                    return False
            elif target in ARITHMETIC and _negative_number(t):
                return False
        return True

    def add_input(self, t: Tensor) -> None:
        op = Op(len(self.ops), "input", "input", "input", "")
        self.ops.append(op)
        self._new_value(op, t, nonneg=False)

    def _new_value(self, op: Op, t: Tensor, nonneg: bool) -> None:
        n = t.numel()
        per_sample = n // self.batch if t.dim() and n % self.batch == 0 else n
        shape = tuple(t.shape[1:]) if t.dim() else ()
        v = Value(len(self.values), op.index, per_sample, shape, nonneg)
        self.values.append(v)
        op.outputs.append(v.index)
        self.of[id(t)] = v.index
        self.keep.append(t)

    def record(self, name: str, kind: str, target: str, module: str, args: Any, out: Any,
               *, alias: bool, nonneg_out: bool | None, layer: bool = False,
               activation: bool = False, relu: bool = False) -> None:  # fmt: skip
        """One op; ``nonneg_out`` None means "non-negative iff every input is"."""
        inputs = self._inputs(args)
        outs = self._tensors(out)
        if not inputs or not outs:
            return  # no activation involved (parameters, constants, shapes)
        in_ids = {id(t) for t in self._tensors(args)}
        if alias:
            for t in outs:
                if id(t) not in self.of or id(t) in in_ids:
                    self.of[id(t)] = inputs[0]
                    self.keep.append(t)
            return
        if nonneg_out is None:
            nonneg_out = self._preserves_nonneg(target, args)
        op = Op(len(self.ops), name, kind, target, module, inputs, layer=layer,
                activation=activation, relu=relu)  # fmt: skip
        self.ops.append(op)
        for v in inputs:
            self.values[v].readers.append(op.index)
        for t in outs:
            self._new_value(op, t, nonneg_out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        self.depth += 1
        try:
            name = _fname(func)
            base = name.rstrip("_") if name.endswith("_") and not name.startswith("_") else name
            if name in ("clamp", "clamp_min", "clip", "clamp_", "clamp_min_"):
                lo = kwargs.get("min", args[1] if len(args) > 1 else None)
                nonneg = (isinstance(lo, (int, float)) and lo >= 0) or None
            elif name in NONNEG_FUNCTIONS or base in NONNEG_FUNCTIONS:
                nonneg = True
            elif name in NONNEG_PRESERVING or base in NONNEG_PRESERVING:
                nonneg = None
            else:
                nonneg = False
            if nonneg is None and name == "pad" and kwargs.get("value", 0) not in (0, None):
                nonneg = False
            act = name in ACTIVATION_FUNCTIONS
            module = self.stack[-1] if self.stack else ""
            self.record(f"{module}:{name}", "function", name, module, (args, kwargs), out,
                        alias=name in ALIAS_FUNCTIONS, nonneg_out=nonneg, activation=act,
                        relu=name in RELU_FUNCTIONS)  # fmt: skip
        finally:
            self.depth -= 1
        return out

    def pre_hook(self, m: nn.Module, args: Any) -> None:
        if self.depth:
            if _is_leaf(m):
                self.depth += 1  # matched by post_hook
            return
        self.stack.append(self.names.get(id(m), type(m).__name__))
        if _is_leaf(m):
            self.depth += 1

    def post_hook(self, m: nn.Module, args: Any, out: Any) -> None:
        leaf = _is_leaf(m)
        if leaf:
            self.depth -= 1
        if self.depth:
            return
        path = self.stack.pop()
        if not leaf:
            return
        self.depth += 1
        try:
            self._record_module(m, path, args, out)
        finally:
            self.depth -= 1

    def _record_module(self, m: nn.Module, path: str, args: Any, out: Any) -> None:
        if isinstance(m, QuantOut):
            nonneg: bool | None = not m.quantizer_signed
        elif isinstance(m, NONNEG_MODULES):
            nonneg = True
        elif isinstance(m, NONNEG_PRESERVING_MODULES):
            nonneg = None
        else:
            nonneg = False
        if isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6):
            nonneg = m.min_val >= 0
        ins = {id(t) for t in self._tensors(args)}
        same = any(id(t) in ins for t in self._tensors(out))
        alias = isinstance(m, ALIAS_MODULES) or (same and not isinstance(m, ACTIVATION_MODULES))
        n_before = len(self.ops)
        self.record(path, "module", type(m).__name__, path, args, out, alias=alias,
                    nonneg_out=nonneg, layer=isinstance(m, LAYERS),
                    activation=isinstance(m, ACTIVATION_MODULES),
                    relu=isinstance(m, (nn.ReLU, nn.ReLU6, QuantAct)))  # fmt: skip
        if len(self.ops) > n_before:
            self.modules[n_before] = m


def _unique_names(ops: list[Op]) -> None:
    """``name#k`` (1-based, in call order) for names that occur more than once."""
    counts = Counter(op.name for op in ops)
    seen: Counter[str] = Counter()
    for op in ops:
        if counts[op.name] > 1:
            seen[op.name] += 1
            op.name = f"{op.name}#{seen[op.name]}"


@torch.no_grad()
def trace(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> Graph:
    """Run ``model`` once (eval mode, no gradient) and record every activation op and value.

    Args:
        model: any ``nn.Module`` whose forward takes ``example_input`` (a tensor or a tuple of
            positional tensors).
        example_input: one batch; per-sample sizes are ``numel / batch`` (batch = dim 0).

    Returns:
        The :class:`Graph` of the forward.
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    batch = int(inputs[0].shape[0]) if inputs[0].dim() else 1
    rec = _Recorder(model, max(batch, 1))
    for t in inputs:
        rec.add_input(t)
    from torch.nn.modules import module as module_mod

    h1 = module_mod.register_module_forward_pre_hook(rec.pre_hook)
    h2 = module_mod.register_module_forward_hook(rec.post_hook)
    was_training = model.training
    model.eval()
    try:
        with rec:
            out = model(*inputs)
    finally:
        h1.remove()
        h2.remove()
        model.train(was_training)
    outputs = rec._inputs(out)
    _unique_names(rec.ops)
    for op in rec.ops:
        for i, v in enumerate(op.outputs):
            rec.values[v].name = op.name if len(op.outputs) == 1 else f"{op.name}[{i}]"
    return Graph(rec.ops, rec.values, outputs, rec.modules)


__all__ = ["PART_FUNCTIONS", "Graph", "Op", "Value", "trace"]
