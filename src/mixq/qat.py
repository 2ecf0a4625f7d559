"""The paper's QAT recipe, one training step (spec 3.6), as the trainer runs it.

:class:`QATStep` does, given the task loss ``L`` of a batch:

1. ``loss = L + P`` with the memory penalty ``P = sum_j lambda * relu(S_j - S0_j)^2``
   (Eq. 10, :meth:`mixq.Budget.penalty`; 0 without a budget), then ``loss.backward()``;
2. for the quantizer parameters ``theta``: ``grad_theta += wd * theta`` (weight decay before
   the clip, the reference order), then under a budget ``clip_grad_()``: ``d_qmax``:
   ``grad <- clip(grad, -d, d)``, ``qmin_qmax``: ``grad <- clip(grad, -q_min, q_min)``;
3. ``optimizer.step()`` (the model weights get their weight decay from the optimizer:
   :func:`param_groups` puts the quantizer parameters in a group without it);
4. ``constrain_()`` on every quantizer: the projection of spec 1.5.

Each quantizer's parameters are 0-d tensors; 1, 2 and 4 and the quantizers' derived scalars in
the forward run for all quantizers together (:mod:`mixq.quant.group`: a handful of operations
per group of quantizers of one parametrization, not dozens per quantizer; the same values bit
for bit), and the penalty reads the parameters the forward stacked, so that its gradient and
the forward's are added once per group. ``compile=True`` runs the penalty, 2 and 4 each as one
``torch.compile``d function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mixq.convert import quantizer_parameters, quantizers
from mixq.cost import Budget
from mixq.quant.base import Quantizer
from mixq.quant.group import QuantizerGroups, check_cached, share_derived


def param_groups(
    model: nn.Module, weight_decay: float = 0.0, decay_norm_and_bias: bool = True
) -> list[dict]:
    """The optimizer's parameter groups for the recipe (decision 6: one optimizer, one lr).

    ``"weights"``: the model's parameters, decayed by the optimizer with ``weight_decay``;
    with ``decay_norm_and_bias=False`` those with ``ndim <= 1`` (batch-norm scales and
    shifts, biases) form a group ``"norms_and_biases"`` without decay (Goyal et al. 2017);
    ``"quantizers"``: every quantizer's trainable parameters with ``weight_decay=0``, since
    :class:`QATStep` adds their decay itself, before the gradient clip (spec 3.6), and
    ``foreach=True``: the update of these ~2 scalars per quantizer runs as a few multi-tensor
    operations instead of a Python loop of four operations per scalar (the same arithmetic;
    torch's default on CPU is the loop).
    """
    qp = quantizer_parameters(model)
    q_ids = {id(p) for p in qp}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in q_ids]
    if decay_norm_and_bias:
        groups = [{"name": "weights", "params": weights, "weight_decay": weight_decay}]
    else:
        groups = [
            {"name": "weights", "params": [p for p in weights if p.ndim > 1],
             "weight_decay": weight_decay},
            {"name": "norms_and_biases", "params": [p for p in weights if p.ndim <= 1],
             "weight_decay": 0.0},
        ]  # fmt: skip
    if qp:
        groups.append({"name": "quantizers", "params": qp, "weight_decay": 0.0, "foreach": True})
    return groups


class QATStep:
    """One step of the recipe (module docstring) for a quantized ``model``.

    Args:
        model: the (unwrapped) quantized model: its quantizers and the penalty's sizes.
        optimizer: built on :func:`param_groups` (or any groups in which the quantizer
            parameters get no decay of their own).
        budget: the memory budget (None or inactive: no penalty).
        weight_decay: decay added to the quantizer gradients before the clip (the paper:
            the same as the weights', 2e-4).
        clip: clip the quantizer gradients (spec 3.6); None: exactly when a budget is set.
        compile: run the penalty and the quantizer updates through ``torch.compile``.

    Example::

        opt = torch.optim.SGD(mixq.param_groups(model, 2e-4), lr=0.03, momentum=0.9)
        step = mixq.QATStep(model, opt, mixq.Budget.parse(weight="70KB"), weight_decay=2e-4)
        for x, y in loader:
            loss, penalty = step(F.cross_entropy(model(x), y))
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        budget: Budget | None = None,
        weight_decay: float = 0.0,
        clip: bool | None = None,
        compile: bool = False,
    ) -> None:
        budget = Budget() if budget is None else budget
        self.model, self.optimizer, self.budget = model, optimizer, budget
        self.quantizers: list[Quantizer] = [q for _, q in quantizers(model)]
        self.weight_decay = float(weight_decay)
        self.clip = budget.active if clip is None else bool(clip)
        self.params = [p for q in self.quantizers for p in q.parameters() if p.requires_grad]
        self.groups = QuantizerGroups(self.quantizers)
        # every forward of the model derives all quantizers' d_q / x_hi (or x_min / x_max) at once
        self.shared = share_derived(model, self.quantizers)
        #: replaces ``budget.penalty(model)`` when set (e.g. ``DualController.penalty``)
        self.penalty_fn: Callable[[], Tensor] | None = None
        #: False turns the penalty off (after the bits are frozen it has nothing to move)
        self.penalty_enabled = True
        wrap: Callable = torch.compile if compile else (lambda f: f)
        self._penalty = wrap(self._penalty_eager)
        self._before = wrap(self._before_eager)
        self._after = wrap(self._after_eager)

    def _penalty_eager(self) -> Tensor:
        if self.penalty_fn is not None:
            return self.penalty_fn()
        return self.budget.penalty(self.model)

    def penalty(self, like: Tensor) -> Tensor:
        """The memory penalty (a 0-d tensor like ``like``; zero without a budget or with
        ``penalty_enabled`` False); ``penalty_fn`` when set, else Eq. 10."""
        if not (self.budget.active and self.penalty_enabled):
            return like.new_zeros(())
        self._check()
        return self._penalty()

    def _check(self) -> None:
        # eagerly, before compiled code that skips it: regroup a quantizer whose bits were
        # frozen or whose bounds changed (O(1) when no quantizer attribute was set)
        self.groups.check()
        check_cached(self.model)

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
                self.groups.clip_grad_()

    def before_optimizer_step(self) -> None:
        """Weight decay then clipping of the quantizer gradients (spec 3.6 steps 3-4)."""
        if self.params and (self.weight_decay or self.clip):
            self._check()
            self._before()

    def _after_eager(self) -> None:
        with torch.no_grad():
            self.groups.constrain_()

    def after_optimizer_step(self) -> None:
        """Project every quantizer's parameters into their bounds (spec 1.5)."""
        if self.quantizers:
            self._check()
            self._after()

    def __call__(self, loss: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 1-4 for the task loss ``loss``; returns ``(loss, penalty)``, detached."""
        penalty = self.penalty(loss)
        self.optimizer.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        self.before_optimizer_step()
        self.optimizer.step()
        self.after_optimizer_step()
        return loss.detach(), penalty.detach()


__all__ = ["QATStep", "param_groups"]
