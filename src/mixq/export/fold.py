"""Batch-norm folding for deployment: ``BN(conv(x, W) + c)`` becomes ``conv(x, W') + c'``.

With ``s = gamma / sqrt(var + eps)`` per output channel::

    W' = W * s,     c' = (c - mean) * s + beta      (c = 0 when the conv had no bias)

applied to the *float* (latent) weights. A quantized conv's weight quantizer was learned for
``W``, not ``W'``, so it is **re-initialised at the same bitwidth** to cover ``W'``: for uniform
quantizers the candidates are the current range and the steps ``d = 2^floor(e)``, ``2^ceil(e)``,
``e = log2(max|W'| / (2^(b-1) - 1))``, with ``q_max = d (2^(b-1) - 1)`` (a free step: ``d =
max|W'| / (2^(b-1) - 1)``); for power-of-two quantizers the current range and ``q_max`` at the
two powers of two around ``max|W'|`` with ``q_min = q_max / 2^(2^(b-1) - 1)``. The candidate with
the smallest mean squared error on ``W'`` wins (one that the bounds push to another bitwidth
comes last). The new bias gets its own quantizer of the same kind at ``bias_bits``
bits (default 8), initialised from ``c'`` (or stays float with ``bias_bits=None``).

The folded model is therefore a *different* quantized model: its outputs are those of the
folded-and-requantized weights, not of the training model. :func:`fold_bn` reports per layer the
old and new quantizer ranges and the largest weight and bias change against the training model's
effective folded values ``s * Q(W)`` and ``s * (Q(c) - mean) + beta``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mixq.layers import QuantConv2d
from mixq.quant.base import Quantizer
from mixq.quant.registry import make_quantizer


@dataclass
class LayerFold:
    """What folding did to one conv layer (quantizer values ``None`` for a float conv)."""

    conv: str
    bn: str
    bitwidth_old: int | None = None
    bitwidth_new: int | None = None
    old: dict[str, float] = field(default_factory=dict)
    new: dict[str, float] = field(default_factory=dict)
    weight_max_abs_err: float = 0.0
    bias_max_abs_err: float = 0.0
    bias_bits: int | None = None


def _range(q: Quantizer | None) -> dict[str, float]:
    if q is None:
        return {}
    with torch.no_grad():
        a, b = (float(v) for v in q.derived())
    return {"d": a, "q_max": b} if q.kind == "uniform" else {"q_min": a, "q_max": b}


_CONV = "aten.conv2d"
_BN = ("aten.batch_norm", "aten._native_batch_norm_legit_no_training", "aten.native_batch_norm")


def _module(n: Any) -> str | None:
    """The qualified name of the innermost module that called graph node ``n``."""
    stack = n.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _pairs(model: nn.Module, example_input: torch.Tensor | None) -> list[tuple[str, str]]:
    """``(conv, bn)`` module names where a BatchNorm2d consumes only a conv's output.

    The graph comes from ``torch.export`` (quantizers as identities), so any model PyTorch can
    capture is folded; a conv or batch norm module called more than once is left alone (one
    folded weight cannot serve two calls).
    """
    from mixq.export.onnx_export import capture, example_for
    from mixq.export.quant_nodes import plain_mode

    x = example_for(model, example_input)
    was_training = model.training
    model.eval()
    try:
        with plain_mode(model), torch.no_grad():
            graph = capture(model, x, dynamic_batch=False).graph
    finally:
        model.train(was_training)
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    for n in nodes:
        if str(n.target).startswith((_CONV, *_BN)) and _module(n) is not None:
            calls[_module(n)] = calls.get(_module(n), 0) + 1
    out = []
    for n in nodes:
        bn, src = _module(n), n.args[0] if n.args else None
        if not (str(n.target).startswith(_BN) and isinstance(mods.get(bn), nn.BatchNorm2d)):
            continue
        if getattr(src, "op", None) != "call_function" or not str(src.target).startswith(_CONV):
            continue
        conv = _module(src)
        if isinstance(mods.get(conv), nn.Conv2d) and len(src.users) == 1 and \
                calls[conv] == 1 and calls[bn] == 1:  # fmt: skip
            out.append((conv, bn))
    return out


@torch.no_grad()
def _requantize(q: Quantizer, t: torch.Tensor, bits: int, keep: bool = True) -> None:
    """Re-initialise ``q`` for ``t`` at ``bits`` bits: the lowest-MSE range among the two
    powers of two around the covering range and (``keep``) the current one; a candidate that
    the parameter bounds push to another bitwidth comes last."""
    m = float(t.abs().max()) + float(torch.finfo(torch.float32).eps)
    levels = 2 ** (bits - 1) - 1 if q.signed else 2**bits - 1
    e = math.log2(m / levels) if q.kind == "uniform" else math.log2(m)
    if q.kind == "uniform" and not q.pow2_step:
        cands: list[Any] = [m / levels]
    else:
        cands = [2.0 ** math.floor(e), 2.0 ** math.ceil(e)]
    if keep:
        cands.insert(0, {n: getattr(q, n).detach().clone() for n in q.param_names})
    best = None
    for c in cands:
        if isinstance(c, dict):
            for n, v in c.items():
                getattr(q, n).copy_(v)
        else:
            d, q_max = (c, c * levels) if q.kind == "uniform" else (c, c)
            q.set_from_range(bits, q_max, d)
            q.constrain_()
        key = (q.bitwidth != bits, float(((q(t) - t) ** 2).mean()))
        if best is None or key < best[0]:
            best = (key, {n: getattr(q, n).detach().clone() for n in q.param_names})
    for n, v in best[1].items():
        getattr(q, n).copy_(v)


def _new_bias_quantizer(wq: Quantizer) -> Quantizer:
    kw: dict[str, Any] = dict(vars(wq.bounds))
    if wq.kind == "uniform":
        kw["pow2_step"] = wq.pow2_step
    else:
        kw["with_zero"] = wq.with_zero
    q = make_quantizer(f"{wq.kind}/{wq.parametrization}", signed=True, learnable=wq.learnable,
                       **kw)  # fmt: skip
    return q.to(next(wq.parameters()).device)


@torch.no_grad()
def _fold_one(conv: nn.Conv2d, bn: nn.BatchNorm2d, rec: LayerFold, bias_bits: int | None) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{rec.bn}: batch norm without running statistics cannot be folded")
    w = conv.weight
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    s64 = gamma.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shape = (-1,) + (1,) * (w.dim() - 1)
    wq = getattr(conv, "weight_quantizer", None)
    bq = getattr(conv, "bias_quantizer", None)
    c = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    eff_w = (wq(w) if wq else w).double() * s64.view(shape)
    eff_b = ((bq(c) if bq else c).double() - bn.running_mean.double()) * s64 + beta.double()
    new_w = (w.double() * s64.view(shape)).float()
    new_b = ((c.double() - bn.running_mean.double()) * s64 + beta.double()).float()
    w.copy_(new_w)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_b.to(w.device))
    else:
        conv.bias.copy_(new_b)
    if isinstance(conv, QuantConv2d):
        if wq is not None:
            rec.bitwidth_old, rec.old = wq.bitwidth, _range(wq)
            _requantize(wq, w, wq.bitwidth)
            rec.bitwidth_new, rec.new = wq.bitwidth, _range(wq)
            if bq is None and bias_bits is not None:
                bq = _new_bias_quantizer(wq)
        if bq is not None:
            bits = bias_bits if bias_bits is not None else bq.bitwidth
            _requantize(bq, conv.bias, bits, keep=bq.bitwidth == bits)
            rec.bias_bits = bq.bitwidth
        conv.bias_quantizer = bq
    out_w = conv.weight_quantizer(w) if getattr(conv, "weight_quantizer", None) else w
    out_b = bq(conv.bias) if bq is not None else conv.bias
    rec.weight_max_abs_err = float((out_w.double() - eff_w).abs().max())
    rec.bias_max_abs_err = float((out_b.double() - eff_b).abs().max())


def fold_bn(model: nn.Module, *, inplace: bool = False, bias_bits: int | None = 8,
            example_input: torch.Tensor | None = None,
            ) -> tuple[nn.Module, list[LayerFold]]:  # fmt: skip
    """Fold every ``BatchNorm2d`` that directly follows a conv into it (module docstring).

    Args:
        model: a float or quantized model (its batch norms' running statistics are used).
        inplace: modify ``model`` itself instead of a deep copy.
        bias_bits: bitwidth of a newly created bias quantizer (None: keep new biases float).
        example_input: one input batch for the graph capture (default: zeros of the model's
            ``default_input_shape``).

    Returns:
        The folded model (BNs replaced by ``nn.Identity``; names listed in its attribute
        ``mixq_folded_bn``) and one :class:`LayerFold` per folded pair.
    """
    if not inplace:
        model = copy.deepcopy(model)
    report = []
    for conv_name, bn_name in _pairs(model, example_input):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        rec = LayerFold(conv_name, bn_name)
        _fold_one(conv, bn, rec, bias_bits)
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
        report.append(rec)
    model.mixq_folded_bn = [*getattr(model, "mixq_folded_bn", []), *(r.bn for r in report)]
    return model, report


def format_fold_report(report: list[LayerFold]) -> str:
    """A plain-text table of :func:`fold_bn`'s report."""
    lines = [f"{'conv':<28} {'b old->new':>10} {'old range':>22} {'new range':>22} "
             f"{'max|dW|':>9} {'b_bias':>6} {'max|dc|':>9}"]  # fmt: skip

    def rng(r: dict[str, float]) -> str:
        return "/".join(f"{k}={v:.4g}" for k, v in r.items()) or "float"

    for r in report:
        bits = f"{r.bitwidth_old}->{r.bitwidth_new}" if r.bitwidth_old else "float"
        lines.append(f"{r.conv:<28} {bits:>10} {rng(r.old):>22} {rng(r.new):>22} "
                     f"{r.weight_max_abs_err:9.3g} {r.bias_bits or 'float':>6} "
                     f"{r.bias_max_abs_err:9.3g}")  # fmt: skip
    return "\n".join(lines)
