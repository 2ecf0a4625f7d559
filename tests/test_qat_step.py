"""``mixq.qat``: the QAT recipe's step and parameter groups (docs/method.md 3.6, 1.5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from mixq import quantize_model
from mixq.config import QuantConfig
from mixq.convert import quantizers
from mixq.cost import Budget
from mixq.qat import QATStep, param_groups
from mixq.quant import Pow2Quantizer, UniformQuantizer
from mixq.quant.group import SHARED_DERIVED


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
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = QATStep(model, opt, Budget(), weight_decay=wd, clip=True, compile=compile)
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
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    budget = Budget.parse(weight="1B")
    step = QATStep(model, opt, budget)
    like = torch.zeros(())
    assert torch.equal(step.penalty(like), budget.penalty(model))
    assert float(step.penalty(like)) > 0
    assert step.clip and not QATStep(model, opt).clip  # clip exactly when a budget is set
    off = QATStep(model, opt, Budget())
    assert float(off.penalty(like)) == 0.0


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )
    return quantize_model(net, example_input=torch.randn(2, 2, 6, 6))


def test_step_is_the_recipe_written_out():
    """QATStep(loss) == penalty, backward, decay, clip, SGD step, projection by hand."""
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))
    budget, wd = Budget.parse(weight="40B"), 2e-4
    a, b = _tiny(), _tiny()
    opt_a = torch.optim.SGD(param_groups(a, wd), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(param_groups(b, wd), lr=0.05, momentum=0.9)
    step = QATStep(a, opt_a, budget, weight_decay=wd)
    for _ in range(3):
        loss_a, pen_a = step(nn.functional.cross_entropy(a(x), y))
        loss = nn.functional.cross_entropy(b(x), y)
        pen = budget.penalty(b)
        opt_b.zero_grad()
        (loss + pen).backward()
        for _, q in quantizers(b):
            for p in q.parameters():
                p.grad += wd * p.detach()
            q.clip_grad_()
        opt_b.step()
        for _, q in quantizers(b):
            q.constrain_()
        assert torch.equal(loss_a, loss.detach()) and torch.equal(pen_a, pen.detach())
    assert float(pen_a) > 0
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), n


@pytest.mark.parametrize("decay_norm_and_bias", [True, False])
def test_param_groups(decay_norm_and_bias):
    model = _tiny()
    groups = param_groups(model, 0.1, decay_norm_and_bias)
    names = [g["name"] for g in groups]
    assert names[-1] == "quantizers" and groups[-1]["weight_decay"] == 0.0
    q_ids = {id(p) for p in groups[-1]["params"]}
    assert q_ids == {id(p) for _, q in quantizers(model) for p in q.parameters()}
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    if decay_norm_and_bias:
        assert names == ["weights", "quantizers"] and groups[0]["weight_decay"] == 0.1
    else:
        assert names == ["weights", "norms_and_biases", "quantizers"]
        assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
        assert all(p.ndim <= 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0


@pytest.mark.parametrize("name", ["Functional", "SE", "Residual", "Branches", "MLPBlock",
                                  "TwoBranch"])  # fmt: skip
def test_penalty_on_the_forward_vectors_trains_as_computed_afresh(name):
    """Every hand-written zoo model (functional activations, gates, a reused ReLU, residual adds,
    concatenations, a transformer MLP), every layer input quantized, all four budgets: three
    QATSteps whose penalty reads the forward's stacked parameters give the parameters of three
    steps that stack them again, bit for bit."""
    torch.manual_seed(0)
    net = getattr(zoo, name)()
    x = torch.randn(2, *zoo.SHAPES[type(net)])
    a = quantize_model(net, QuantConfig(activation_sites="inputs"), example_input=x)
    b = copy.deepcopy(a)
    budget = Budget.parse(weight="1B", activation_sum="1B", activation_max="1B",
                          activation_peak="1B")  # fmt: skip
    steps = []
    for m in (a, b):
        opt = torch.optim.SGD(param_groups(m, 2e-4), lr=0.01, momentum=0.9)
        steps.append(QATStep(m, opt, budget, weight_decay=2e-4))
    b.__dict__[SHARED_DERIVED].bitwidths = lambda qs: None  # always stack afresh
    shared, served = a.__dict__[SHARED_DERIVED], []
    own = shared.bitwidths
    shared.bitwidths = lambda qs: served.append(own(qs)) or served[-1]
    for _ in range(3):
        for m, step in zip((a, b), steps, strict=True):
            step(F.cross_entropy(m(x).reshape(2, -1), torch.zeros(2, dtype=torch.long)))
    assert len(served) == 3 and all(v is not None for v in served)
    for (n, p), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, pb), n
