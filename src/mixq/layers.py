"""Quantized layers: module swaps that share the float layer's ``Parameter``s.

``QuantConv2d`` / ``QuantLinear`` compute ``f(Q_w(W) * x + Q_b(c))`` (paper Eq. 7, with a separate
bias quantizer as the reference code, decision 4). ``QuantAct`` replaces an ``nn.ReLU`` or
``nn.ReLU6``: an unsigned quantizer clips to ``[0, x_hi]``, which *is* the ReLU (decision 5);
ReLU6 adds the cap at 6 first. A ``QuantAct`` without quantizer is a float activation site, kept
so that the memory model can count it at 32 bits. None of these layers has math of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixq.quant.base import SHARED_TENSORS, Quantizer
from mixq.quant.bound import shared_tensor


def _quantized_weight_bias(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(Q_w(W), Q_b(bias))`` of a quantized layer (a float tensor where no quantizer); the
    tensors quantized in batch for this model forward where they were
    (:mod:`mixq.quant.bound`)."""
    wq, bq = layer.weight_quantizer, layer.bias_quantizer
    w, b = layer.weight, layer.bias
    if SHARED_TENSORS in layer.__dict__:
        sw, sb = shared_tensor(layer, "weight"), shared_tensor(layer, "bias")
    else:
        sw = sb = None
    if wq is not None:
        w = sw if sw is not None else wq(w)
    if b is not None and bq is not None:
        b = sb if sb is not None else bq(b)
    return w, b


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight and bias pass through their own quantizers, and whose input
    passes through ``input_quantizer`` when its activation site is quantized at the reader
    (``QuantConfig.activation_sites``; one quantizer object shared by every reader of a site)."""

    weight_quantizer: Quantizer | None
    bias_quantizer: Quantizer | None
    input_quantizer: Quantizer | None  # a child module when set (see forward)
    _mixq_reads_shared_tensors = True  # forward reads them (mixq.quant.bound.READS_SHARED)

    @classmethod
    def from_float(
        cls, conv: nn.Conv2d, weight_q: Quantizer | None, bias_q: Quantizer | None
    ) -> QuantConv2d:
        """Wrap ``conv``, sharing its ``weight`` and ``bias`` Parameters (no copy)."""
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"padding_mode={conv.padding_mode!r} is not supported by QuantConv2d; use "
                "'zeros' or exclude the layer from quantization"
            )
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
        )
        q.weight, q.bias = conv.weight, conv.bias
        q.weight_quantizer = weight_q
        q.bias_quantizer = bias_q if conv.bias is not None else None
        return q

    def to_float(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` sharing this layer's Parameters."""
        c = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device="meta",
        )
        c.weight, c.bias = self.weight, self.bias
        return c

    def forward(self, x: Tensor) -> Tensor:
        """``conv(Q_x(x), Q_w(W), Q_b(bias))``."""
        # A child module lives in ``_modules``; a layer without one has no such entry.
        q = self._modules.get("input_quantizer")
        if q is not None:
            x = q(x)
        w, b = _quantized_weight_bias(self)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose weight and bias pass through their own quantizers (and its input
    through ``input_quantizer``, as :class:`QuantConv2d`)."""

    weight_quantizer: Quantizer | None
    bias_quantizer: Quantizer | None
    input_quantizer: Quantizer | None  # a child module when set (see forward)
    _mixq_reads_shared_tensors = True  # forward reads them (mixq.quant.bound.READS_SHARED)

    @classmethod
    def from_float(
        cls, fc: nn.Linear, weight_q: Quantizer | None, bias_q: Quantizer | None
    ) -> QuantLinear:
        """Wrap ``fc``, sharing its ``weight`` and ``bias`` Parameters (no copy)."""
        q = cls(fc.in_features, fc.out_features, fc.bias is not None, device="meta")
        q.weight, q.bias = fc.weight, fc.bias
        q.weight_quantizer = weight_q
        q.bias_quantizer = bias_q if fc.bias is not None else None
        return q

    def to_float(self) -> nn.Linear:
        """The plain ``nn.Linear`` sharing this layer's Parameters."""
        fc = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        fc.weight, fc.bias = self.weight, self.bias
        return fc

    def forward(self, x: Tensor) -> Tensor:
        """``Q_x(x) @ Q_w(W)^T + Q_b(bias)``."""
        # A child module lives in ``_modules``; a layer without one has no such entry.
        q = self._modules.get("input_quantizer")
        if q is not None:
            x = q(x)
        return F.linear(x, *_quantized_weight_bias(self))


ACTIVATIONS: dict[type[nn.Module], float | None] = {nn.ReLU: None, nn.ReLU6: 6.0}
"""Activation modules that an unsigned quantizer replaces, with their upper cap."""


class QuantAct(nn.Module):
    """An activation site: ``Q_x(min(x, cap))`` with an unsigned quantizer (it is the ReLU), or
    the float activation when ``quantizer`` is None (counted at 32 bits).

    Attributes:
        quantizer: the unsigned activation quantizer, or None for a float site.
        cap: 6.0 for a replaced ``nn.ReLU6``, else None.
        numel: elements per sample at this site (recorded by one dry forward).
    """

    def __init__(self, quantizer: Quantizer | None, cap: float | None = None) -> None:
        super().__init__()
        if quantizer is not None and quantizer.signed:
            raise ValueError("an activation quantizer replacing a ReLU must be unsigned")
        self.quantizer = quantizer
        self.cap = cap
        self.numel: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Quantize (which includes the ReLU) or apply the float activation."""
        if self.quantizer is None:
            return F.relu6(x) if self.cap == 6.0 else F.relu(x)
        if self.cap is None:
            return self.quantizer(x)
        return self.quantizer(x, cap=self.cap)  # Q(min(x, cap)), one kernel pass

    def to_float(self) -> nn.Module:
        """The original ``nn.ReLU`` / ``nn.ReLU6``."""
        return nn.ReLU6() if self.cap == 6.0 else nn.ReLU()

    def extra_repr(self) -> str:
        return f"cap={self.cap}, numel={self.numel}" + ("" if self.quantizer else ", float")


class QuantOut(nn.Module):
    """``Q_x(f(x))``: an activation module ``f`` (SiLU, GELU, hard-swish, a sigmoid gate, ...)
    whose output gets a learned quantizer, signed unless ``f`` is known to be non-negative.

    Used by ``activation_sites="inputs"`` for the activation modules that are not a ReLU/ReLU6
    (those are fused into :class:`QuantAct`). Each call of a reused module is its own site; all
    calls share this quantizer.

    Attributes:
        act: the wrapped activation module (its Parameters, e.g. PReLU's, are kept).
        quantizer: the activation quantizer, or None (a float site).
        quantizer_signed: whether the quantizer is signed (False: ``f >= 0``).
    """

    def __init__(self, act: nn.Module, quantizer: Quantizer | None, signed: bool) -> None:
        super().__init__()
        if quantizer is not None and quantizer.signed != signed:
            raise ValueError("QuantOut: the quantizer's sign does not match signed=")
        self.act = act
        self.quantizer = quantizer
        self.quantizer_signed = bool(signed)

    def forward(self, x: Tensor) -> Tensor:
        """``Q_x(act(x))``, or ``act(x)`` without quantizer."""
        y = self.act(x)
        return y if self.quantizer is None else self.quantizer(y)

    def to_float(self) -> nn.Module:
        """The wrapped activation module."""
        return self.act


QUANT_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}
"""The module-swap mapping: float layer type -> quantized layer type."""


def input_quantizer(layer: nn.Module) -> Quantizer | None:
    """The quantizer of a quantized layer's input site, or None."""
    return layer._modules.get("input_quantizer")


def scale_logits(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The forward hook of :func:`add_logit_scale`: ``output * module.logit_scale``."""
    return output * module.logit_scale


def add_logit_scale(model: nn.Module) -> nn.Module:
    """Register a learnable scalar ``logit_scale`` (init 1) that multiplies the model output.

    The reference code's ``scale_layer`` for pow-2 runs (spec 7.1); it is trained and weight
    decayed like every parameter. :func:`logit_scale_of` finds it again.
    """
    model.register_parameter("logit_scale", nn.Parameter(torch.ones(())))
    model.register_forward_hook(scale_logits)
    model.mixq_logit_scale = True
    return model


def logit_scale_of(model: nn.Module) -> torch.Tensor | None:
    """The scalar that :func:`add_logit_scale` multiplies ``model``'s output by, else None."""
    if getattr(model, "mixq_logit_scale", False):
        return model.logit_scale
    return None
