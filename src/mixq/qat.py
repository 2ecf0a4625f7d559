"""The quantizer parts of one training step (spec 3.6), eager or through ``torch.compile``.

Around ``optimizer.step()`` the recipe does, for the quantizer parameters ``theta``:

1. ``grad_theta += wd * theta`` (weight decay before the clip, reference order);
2. under a memory budget, ``clip_grad_()``: ``d_qmax``: ``grad <- clip(grad, -d, d)``,
   ``qmin_qmax``: ``grad <- clip(grad, -q_min, q_min)``;
3. after the update, ``constrain_()``: the projection of spec 1.5.

Each quantizer's parameters are 0-d tensors, so in eager mode these are a few tiny operations
per quantizer (~40 quantizers in ResNet-20): negligible on a CPU, but each is a kernel launch
on a GPU. :class:`QuantizerStep` with ``compile=True`` runs 1+2 and 3 each as one
``torch.compile``d function (a handful of fused kernels for all quantizers), and likewise the
memory penalty (Eq. 10) through :meth:`QuantizerStep.penalty`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from mixq.cost import Budget
from mixq.quant.base import Quantizer


class QuantizerStep:
    """Penalty, gradient decay/clip and projection for ``quantizers`` of ``model``.

    Args:
        model: the (unwrapped) quantized model, for the penalty.
        quantizers: its quantizers.
        budget: the memory budget (its penalty is 0 when inactive).
        weight_decay: decay added to the quantizer gradients before the clip.
        clip: clip the quantizer gradients (spec 3.6 step 4).
        compile: run each part through ``torch.compile``.
    """

    def __init__(
        self,
        model: nn.Module,
        quantizers: Sequence[Quantizer],
        budget: Budget,
        weight_decay: float = 0.0,
        clip: bool = False,
        compile: bool = False,
    ) -> None:
        self.model, self.quantizers, self.budget = model, list(quantizers), budget
        self.weight_decay, self.clip = float(weight_decay), bool(clip)
        self.params = [p for q in self.quantizers for p in q.parameters() if p.requires_grad]
        wrap: Callable = torch.compile if compile else (lambda f: f)
        self._penalty = wrap(self._penalty_eager)
        self._before = wrap(self._before_eager)
        self._after = wrap(self._after_eager)

    def _penalty_eager(self) -> Tensor:
        return self.budget.penalty(self.model)

    def penalty(self, like: Tensor) -> Tensor:
        """The memory penalty (a 0-d tensor like ``like``; zero without a budget)."""
        return self._penalty() if self.budget.active else like.new_zeros(())

    def _before_eager(self) -> None:
        # no_grad as a block, not a decorator: dynamo would see the decorator's one code object
        # for both _before and _after and recompile between them
        with torch.no_grad():
            if self.weight_decay:
                with_grad = [p for p in self.params if p.grad is not None]
                if with_grad:
                    grads = [p.grad for p in with_grad]
                    torch._foreach_add_(grads, with_grad, alpha=self.weight_decay)
            if self.clip:
                for q in self.quantizers:
                    q.clip_grad_()

    def before_optimizer_step(self) -> None:
        """Weight decay then clipping of the quantizer gradients (spec 3.6 steps 3-4)."""
        if self.params and (self.weight_decay or self.clip):
            self._before()

    def _after_eager(self) -> None:
        with torch.no_grad():
            for q in self.quantizers:
                q.constrain_()

    def after_optimizer_step(self) -> None:
        """Project every quantizer's parameters into their bounds (spec 1.5)."""
        if self.quantizers:
            self._after()


__all__ = ["QuantizerStep"]
