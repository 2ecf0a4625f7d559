"""``mixq.qat.QuantizerStep``: the quantizer side of a step (docs/method.md 3.6, 1.5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixq import quantize_model
from mixq.convert import quantizers
from mixq.cost import Budget
from mixq.qat import QuantizerStep
from mixq.quant import Pow2Quantizer, UniformQuantizer


def _setup():
    """A d_qmax and a qmin_qmax quantizer with gradients that the clip and the decay change."""
    u = UniformQuantizer("d_qmax", d=0.25, q_max=1.0)
    p = Pow2Quantizer("qmin_qmax", q_min=0.125, q_max=2.0)
    grads = {
        (u, "d"): 0.24,
        (u, "q_max"): -3.0,
        (p, "q_min"): 0.12,
        (p, "q_max"): 0.5,
    }
    for (q, name), g in grads.items():
        getattr(q, name).grad = torch.tensor(g)
    return u, p, grads


@pytest.mark.parametrize("compile", [False, True])
def test_decay_then_clip_then_projection(compile):
    """grad <- clip(grad + wd * theta, -bound, bound), bound = |d| (U3) or |q_min| (P3); the
    decay comes first (reference order): clip-then-decay would give other values here."""
    u, p, grads = _setup()
    wd = 0.1
    model = nn.ModuleList([u, p])
    step = QuantizerStep(model, [u, p], Budget(), weight_decay=wd, clip=True, compile=compile)
    step.before_optimizer_step()
    for (q, name), g in grads.items():
        theta = float(getattr(q, name).detach())
        bound = float(getattr(q, q.param_names[0]).detach().abs())
        want = min(max(g + wd * theta, -bound), bound)
        other = min(max(g, -bound), bound) + wd * theta  # the wrong order
        got = float(getattr(q, name).grad)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (name, got, want)
        assert abs(other - want) > 1e-3  # the order is observable on every one
    with torch.no_grad():  # an update that leaves the bounds and crosses d over q_max
        u.d.fill_(5.0)
        u.q_max.fill_(0.5)
    step.after_optimizer_step()
    lo, hi = u.bounds.range("q_max")
    assert float(u.d) <= float(u.q_max) and lo < float(u.q_max) < hi
    assert float(u.d) < u.bounds.range("d")[1]


def test_penalty_is_the_budget_penalty_and_zero_without_budget():
    model = quantize_model(
        nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU()), example_input=torch.randn(1, 2, 4, 4)
    )
    qs = [q for _, q in quantizers(model)]
    budget = Budget.parse(weight="1B")
    step = QuantizerStep(model, qs, budget)
    like = torch.zeros(())
    assert torch.equal(step.penalty(like), budget.penalty(model))
    assert float(step.penalty(like)) > 0
    off = QuantizerStep(model, qs, Budget())
    assert float(off.penalty(like)) == 0.0
