"""``mixq.quant.group``: the batched scalar work equals the per-quantizer path bit for bit.

The reference is each quantizer's own ``derived()``, ``bitwidth_surrogate()``, ``constrain_()``
and ``clip_grad_()`` (spec 1.3, 1.5, 2.3, 3.6, 5.2) and, for the penalty, the per-quantizer sums
of ``mixq.cost`` before batching (written out below). Values are compared bit for bit
(``torch.equal`` on the float32 bit patterns); gradients too where every quantizer is used once
(the summation order is then the same), else to float32 rounding.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixq.config import LayerOverride, QuantConfig, SiteConfig
from mixq.convert import quantize_model, quantizers
from mixq.cost import BITS_PER_KIB, FLOAT_BITS, Budget, _layers, _plan, site_table
from mixq.qat import QATStep, param_groups
from mixq.quant import Pow2Quantizer, UniformQuantizer
from mixq.quant.group import QuantizerGroups, batchable, share_derived

SPECS = [
    (UniformQuantizer, "b_d"),
    (UniformQuantizer, "b_qmax"),
    (UniformQuantizer, "d_qmax"),
    (Pow2Quantizer, "b_qmax"),
    (Pow2Quantizer, "b_qmin"),
    (Pow2Quantizer, "qmin_qmax"),
]
#: per-member bounds: defaults, float32-inexact ones, a bitwidth fixed by b_min = b_max
BOUNDS = [{}, {"b_min": 3.0, "b_max": 6.0, "q_max_max": 6.1, "d_min": 0.003}, {"b_min": 2.0,
          "b_max": 2.0}]  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a.float()), _bits(b.float()))


def _random_raw(q, g: torch.Generator) -> None:
    """Raw values in and around the bounds, crossing pairs, ties of pow2round and round."""
    with torch.no_grad():
        for name in q.param_names:
            lo, hi = q.bounds.range(name)
            u = float(torch.rand((), generator=g))
            if name == "b":
                v = [lo - 0.7, hi + 0.4, 2.5, 3.5, lo + u * (hi - lo)][int(u * 5)]
            else:
                k = int(torch.randint(-12, 6, (), generator=g))
                v = [2.0 ** (k + 0.5), 2.0**k, lo * 0.5, hi * 2.0, lo + u * (min(hi, 9) - lo)][
                    int(torch.randint(0, 5, (), generator=g))
                ]
                v = float(torch.tensor(v).nextafter(torch.tensor(math.inf if u > 0.5 else 0.0)))
            getattr(q, name).fill_(v)


def _zoo(seed: int = 0, n_each: int = 3) -> list:
    """Every parametrization, signed and unsigned, several bounds, flags, learnable=False."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for cls, p in SPECS:
        for signed in (True, False):
            for i in range(n_each):
                kw = dict(BOUNDS[i % len(BOUNDS)])
                if signed and kw.get("b_min", 2.0) < 2.0:
                    kw["b_min"] = 2.0
                if not signed and "q_max_max" not in kw:
                    kw["q_max_max"] = 255.0
                extra = {}
                if cls is UniformQuantizer and i == 1:
                    extra["pow2_step"] = False
                if cls is Pow2Quantizer and i == 2:
                    extra["with_zero"] = signed  # the other convention
                q = cls(p, signed=signed, learnable=(i != 2), **extra, **kw)
                _random_raw(q, g)
                out.append(q)
    return out


def _ref_grads(qs, fn) -> list:
    for q in qs:
        for prm in q.parameters():
            prm.grad = None
    fn().backward()
    return [None if p.grad is None else p.grad.clone() for q in qs for p in q.parameters()]


def test_zoo_covers_every_case():
    qs = _zoo()
    assert {(type(q), q.parametrization, q.signed) for q in qs} == {
        (c, p, s) for c, p in SPECS for s in (True, False)
    }
    assert all(batchable(q) for q in qs)
    groups = QuantizerGroups(qs)
    # (class, parametrization, pow2_step): 6 parametrizations + uniform without pow2 step
    assert len(groups.groups) == 9 and not groups.solo


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_derived_values_and_gradients_bit_for_bit(seed):
    qs = _zoo(seed)
    ref = copy.deepcopy(qs)
    by_id = {id(q): (a, b) for q, a, b in QuantizerGroups(qs).derived()}  # in group order
    assert sorted(by_id) == sorted(map(id, qs))
    got = [by_id[id(q)] for q in qs]
    w = torch.randn(len(qs), 2, generator=torch.Generator().manual_seed(seed))
    for (a, b), r in zip(got, ref, strict=True):
        ra, rb = r.derived()
        assert _same(a, ra) and _same(b, rb), r
    loss = sum(w[i, 0] * a + w[i, 1] * b for i, (a, b) in enumerate(got))
    loss.backward()
    want = _ref_grads(ref, lambda: sum(w[i, 0] * r.derived()[0] + w[i, 1] * r.derived()[1]
                                       for i, r in enumerate(ref)))  # fmt: skip
    have = [None if p.grad is None else p.grad for q in qs for p in q.parameters()]
    for h, r in zip(have, want, strict=True):
        assert (h is None) == (r is None)
        if h is not None:
            # each derived() of the reference is its own graph; the batch sums a and b first
            torch.testing.assert_close(h, r, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bitwidth_surrogates_and_gradients_bit_for_bit(seed):
    qs = _zoo(seed)
    ref = copy.deepcopy(qs)
    got = QuantizerGroups(qs).bitwidths()
    want = torch.stack([r.bitwidth_surrogate() for r in ref])
    assert _same(got, want)  # NaN too, where raw pairs crossed (projection not yet applied)
    w = torch.randn(len(qs), generator=torch.Generator().manual_seed(seed))
    (w * got).sum().backward()
    want_g = _ref_grads(ref, lambda: (w * torch.stack([r.bitwidth_surrogate() for r in ref])).sum())
    have = [p.grad for q in qs for p in q.parameters()]
    for h, r, p in zip(have, want_g, [p for q in qs for p in q.parameters()], strict=True):
        if not p.requires_grad:
            continue
        assert (h is None) == (r is None)  # U1/U2/P1/P2: the penalty never reaches d / q_max
        if h is not None:
            assert _same(h, r)


def test_pow2round_ties_bit_for_bit():
    """Steps at and next to 2^(k + 1/2), where round(log2 v) flips: batched == scalar."""
    vals = []
    for k in range(-8, 0):
        t = torch.tensor(2.0 ** (k + 0.5))
        for _ in range(8):
            vals += [float(t)]
            t = t.nextafter(torch.tensor(0.0))
    qs = [UniformQuantizer("d_qmax", d=2.0**-8, q_max=1.0) for _ in vals]
    for q, v in zip(qs, vals, strict=True):
        q.d.data.fill_(v)
    got = QuantizerGroups(qs).derived()
    assert [q for q, _, _ in got] == qs  # one group: list order
    for (q, a, _), v in zip(got, vals, strict=True):
        assert _same(a, q.derived()[0]), v


@pytest.mark.parametrize("seed", [0, 1])
def test_projection_bit_for_bit(seed):
    qs = _zoo(seed)
    ref = copy.deepcopy(qs)
    QuantizerGroups(qs).constrain_()
    for r in ref:
        r.constrain_()
    for q, r in zip(qs, ref, strict=True):
        for n in q.param_names:
            assert _same(getattr(q, n), getattr(r, n)), (q, n)


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_clip_bit_for_bit(seed):
    qs = _zoo(seed)
    g = torch.Generator().manual_seed(seed)
    ref = copy.deepcopy(qs)
    for q, r in zip(qs, ref, strict=True):
        for i, (p, pr) in enumerate(zip(q.parameters(), r.parameters(), strict=True)):
            if i == 1 and q is qs[3]:
                continue  # a parameter without gradient
            p.grad = torch.randn((), generator=g) * 4
            pr.grad = p.grad.clone()
    before = [None if p.grad is None else p.grad.clone() for q in qs for p in q.parameters()]
    QuantizerGroups(qs).clip_grad_()
    for r in ref:
        r.clip_grad_()
    for q, r in zip(qs, ref, strict=True):
        for p, pr in zip(q.parameters(), r.parameters(), strict=True):
            assert (p.grad is None) == (pr.grad is None)
            if p.grad is not None:
                assert _same(p.grad, pr.grad)
    after = [p.grad for q in qs for p in q.parameters()]
    pairs = zip(after, before, strict=True)
    changed = sum(a is not None and not torch.equal(a, b) for a, b in pairs)
    assert changed >= 4  # the clip bites on several members


class _OwnProjection(UniformQuantizer):
    """A subclass with its own projection (as an allowed-bit-set quantizer might have)."""

    def constrain_(self) -> None:
        super().constrain_()
        with torch.no_grad():
            self.q_max.clamp_(max=0.5)


def test_overridden_or_extended_quantizers_keep_their_own_path():
    a = _OwnProjection("d_qmax", d=0.25, q_max=3.0)
    b = UniformQuantizer("d_qmax", d=0.25, q_max=3.0)
    b.bit_set = (2, 4)  # an attribute this module does not know: not batched
    c = UniformQuantizer("d_qmax", d=0.25, q_max=3.0)
    c.derived = lambda: (torch.tensor(1.0), torch.tensor(2.0))  # instance override
    plain = UniformQuantizer("d_qmax", d=0.25, q_max=3.0)
    groups = QuantizerGroups([a, b, c, plain])
    assert not batchable(a) and not batchable(b) and not batchable(c) and batchable(plain)
    assert groups.solo == [0, 1, 2] and groups.batched == [plain]
    groups.constrain_()
    assert a.q_max.item() == 0.5 and plain.q_max.item() == 3.0
    assert [q for q, _, _ in groups.derived()] == [plain]
    assert _same(groups.bitwidths(), torch.stack([q.bitwidth_surrogate() for q in (a, b, c,
                                                                                   plain)]))


def test_regrouped_when_a_quantizer_changes():
    q = UniformQuantizer("d_qmax", d=0.25, q_max=3.0)
    groups = QuantizerGroups([q])
    assert float(groups.bitwidths()[0]) == q.bitwidth == 5
    q.bounds = type(q.bounds)(**{**q.bounds.__dict__, "q_max_max": 1.0})
    assert float(groups.bitwidths()[0]) == q.bitwidth == 4
    q.bit_set = (2,)
    groups.bitwidths()
    assert groups.solo == [0]


def test_mixed_order_and_duplicates():
    qs = _zoo(3, n_each=1)
    order = qs[::-1] + qs[:2]
    got = QuantizerGroups(order).bitwidths()
    assert _same(got, torch.stack([q.bitwidth_surrogate() for q in order]))


def test_op_count_does_not_grow_with_the_number_of_quantizers():
    """The batched work is a fixed number of ATen operations per group, not per quantizer."""
    from torch.profiler import ProfilerActivity, profile

    def count(n: int) -> int:
        qs = [UniformQuantizer("d_qmax", signed=i % 2 == 0) for i in range(n)]
        for q in qs:
            for p in q.parameters():
                p.grad = torch.ones(())
        groups = QuantizerGroups(qs)
        groups.bitwidths()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            derived = groups.derived()
            (groups.bitwidths().sum() + sum(a + b for _, a, b in derived)).backward()
            groups.clip_grad_()
            groups.constrain_()
        top = [e for e in prof.events() if e.name.startswith("aten::")
               and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]  # fmt: skip
        # what remains per quantizer: the loss's own adds, autograd's accumulation into p.grad
        return len(top) - sum(e.name in ("aten::add", "aten::add_", "aten::detach") for e in top)

    n = count(4)
    assert n == count(40) and n < 100, n


# -- inside a model: the forward, QATStep, the penalty ---------------------------------------------


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


MIXED = QuantConfig(
    overrides=(
        LayerOverride("2", weight=SiteConfig(quantizer="pow2/qmin_qmax"),
                      activation=SiteConfig(quantizer="pow2/qmin_qmax")),
        LayerOverride("3", weight=SiteConfig(quantizer="uniform/b_qmax", bounds={"b_max": 6.0})),
        LayerOverride("5", weight=SiteConfig(quantizer="pow2/b_qmin", learnable=False),
                      activation=SiteConfig(quantizer="uniform/b_d", pow2_step=False)),
    ),
)  # fmt: skip
INPUTS = QuantConfig(activation_sites="inputs", weight=SiteConfig(quantizer="pow2/qmin_qmax"))


def _model(config: QuantConfig, seed: int = 0) -> nn.Module:
    return quantize_model(_net(seed), config, example_input=torch.randn(2, 3, 8, 8))


def _reference_terms(model: nn.Module, budget: Budget) -> dict:
    """``Budget.terms`` as it was computed per quantizer before batching."""
    out = {}
    if budget.weight is not None:
        total = 0.0
        for _, m in _layers(model):
            for attr in ("weight", "bias"):
                t = getattr(m, attr)
                if t is None:
                    continue
                q = getattr(m, f"{attr}_quantizer", None)
                total = total + (FLOAT_BITS * t.numel() if q is None
                                 else q.bitwidth_surrogate() * t.numel())  # fmt: skip
        out["weight"] = torch.as_tensor(total)
    table = site_table(model)
    qs, index, numel, alive = _plan(table, torch.device("cpu"))
    b = torch.stack([*[q.bitwidth_surrogate() for q in qs], torch.tensor(float(FLOAT_BITS))])
    per_site = b[index] * numel
    if budget.activation_sum is not None:
        out["activation_sum"] = per_site.sum()
    if budget.activation_max is not None:
        out["activation_max"] = per_site[per_site.detach().argmax()]
    if budget.activation_peak is not None:
        steps = alive @ per_site
        out["activation_peak"] = steps[int(steps.detach().argmax())]
    return out


def _reference_penalty(model: nn.Module, budget: Budget) -> torch.Tensor:
    total = torch.zeros(())
    targets = budget._targets()
    for name, size in _reference_terms(model, budget).items():
        total = total + budget.lam * torch.relu((size - targets[name] * 8) / BITS_PER_KIB) ** 2
    return total


BUDGETS = [
    Budget.parse(weight="100B"),
    Budget.parse(weight="100B", activation_max="40B"),
    Budget.parse(activation_sum="100B", activation_peak="60B", activation_max="30B"),
]


@pytest.mark.parametrize("config", [QuantConfig(), MIXED, INPUTS], ids=["d_qmax", "mixed",
                                                                       "inputs"])  # fmt: skip
@pytest.mark.parametrize("budget", BUDGETS, ids=["w", "w+max", "sum+peak+max"])
def test_penalty_bit_for_bit(config, budget):
    a = _model(config)
    b = copy.deepcopy(a)
    got = budget.penalty(a)
    want = _reference_penalty(b, budget)
    assert _same(got, want) and float(got) > 0
    for name, (size, _) in budget.terms(a).items():
        assert _same(size, _reference_terms(b, budget)[name]), name
    got.backward()
    want.backward()
    for (n, p), pr in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (p.grad is None) == (pr.grad is None), n
        if p.grad is not None:
            assert _same(p.grad, pr.grad), n


@pytest.mark.parametrize("config", [QuantConfig(), MIXED, INPUTS], ids=["d_qmax", "mixed",
                                                                       "inputs"])  # fmt: skip
@pytest.mark.parametrize("budget", BUDGETS, ids=["w", "w+max", "sum+peak+max"])
def test_penalty_after_a_forward_reads_its_vectors(config, budget):
    """After a forward with gradients the penalty's surrogates come from the forward's stacked
    parameters (no second stack of them), with the values and gradients of the reference."""
    a = _model(config)
    b = copy.deepcopy(a)
    share_derived(a, [q for _, q in quantizers(a)])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    out = a(x).square().sum()
    with pytest.MonkeyPatch.context() as mp:  # the fresh path must not run
        mp.setattr(QuantizerGroups, "bitwidths", lambda self: pytest.fail("stacked again"))
        got = budget.penalty(a)
    want = _reference_penalty(b, budget)
    assert _same(got, want) and float(got) > 0
    (out + got).backward()
    (b(x).square().sum() + want).backward()
    for (n, p), pr in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (p.grad is None) == (pr.grad is None), n
        if p.grad is not None:
            assert _same(p.grad, pr.grad), n


def test_penalty_computed_afresh_when_the_forward_vectors_cannot_serve():
    """No gradients, a quantizer outside the forward, a parameter changed in place since the
    forward (an optimizer step): the penalty stacks the parameters again (current values)."""
    a = _model(QuantConfig())
    qs = [q for _, q in quantizers(a)]
    shared = share_derived(a, qs)
    budget = Budget.parse(weight="150B")
    a(torch.randn(2, 3, 8, 8))
    assert shared.bitwidths(qs) is not None
    with torch.no_grad():
        assert shared.bitwidths(qs) is None
    assert shared.bitwidths([*qs, UniformQuantizer("d_qmax")]) is None
    with torch.no_grad():
        qs[0].q_max.mul_(0.5)
    assert shared.bitwidths(qs) is None
    want = _reference_penalty(copy.deepcopy(a), budget)
    assert _same(budget.penalty(a), want)
    shared.remove()
    a(torch.randn(2, 3, 8, 8))
    assert shared.bitwidths(qs) is None  # hooks removed: no forward vectors


def test_a_quantizer_only_the_penalty_reads_gets_its_gradient():
    """A member of the forward's groups that no layer called gets the penalty's gradient (the
    forward alone would give it none), equal to its own surrogate's."""
    model = _model(QuantConfig())
    qs = [q for _, q in quantizers(model)]
    extra = UniformQuantizer("d_qmax")
    ref = copy.deepcopy(extra)
    model[0].unused = extra
    shared = share_derived(model, [*qs, extra])
    out = model(torch.randn(2, 3, 8, 8)).sum()
    bits = shared.bitwidths([extra, qs[1]])
    assert bits is not None and _same(bits[0], ref.bitwidth_surrogate())
    (out + 3.0 * bits[0]).backward()
    (3.0 * ref.bitwidth_surrogate()).backward()
    for p, pr in zip(extra.parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and _same(p.grad, pr.grad)


def _reference_step(model, opt, budget, wd, x, y):
    """Spec 3.6 written out per quantizer (no batching anywhere)."""
    loss = F.cross_entropy(model(x), y)
    pen = _reference_penalty(model, budget)
    opt.zero_grad(set_to_none=True)
    (loss + pen).backward()
    for _, q in quantizers(model):
        for p in q.parameters():
            if p.grad is not None:
                p.grad.add_(p.detach(), alpha=wd)  # the decay's own kernel, as QATStep's
        q.clip_grad_()
    opt.step()
    for _, q in quantizers(model):
        q.constrain_()
    return loss.detach(), pen.detach()


@pytest.mark.parametrize("config", [QuantConfig(), MIXED, INPUTS], ids=["d_qmax", "mixed",
                                                                       "inputs"])  # fmt: skip
def test_qat_step_equals_the_per_quantizer_recipe(config):
    """Forward with the batch's derived scalars, penalty, clip, projection: the same model,
    bit for bit, after several steps (each quantizer runs once per forward here)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    budget, wd = Budget.parse(weight="150B", activation_max="40B"), 2e-4
    a = _model(config)
    b = copy.deepcopy(a)
    keys = list(a.state_dict())
    opt_a = torch.optim.SGD(param_groups(a, wd), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(param_groups(b, wd), lr=0.05, momentum=0.9)
    for group in opt_b.param_groups:
        group["foreach"] = False  # the reference: torch's per-tensor loop
    step = QATStep(a, opt_a, budget, weight_decay=wd)
    assert not step.groups.solo and len(step.groups.groups) >= 1
    for _ in range(4):
        got = step(F.cross_entropy(a(x), y))
        want = _reference_step(b, opt_b, budget, wd, x, y)
        assert _same(got[0], want[0]) and _same(got[1], want[1])
        for (n, p), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            assert (p.grad is None) == (pb.grad is None), n
            if p.grad is not None:
                assert _same(p.grad, pb.grad), n
    assert float(got[1]) > 0
    assert list(a.state_dict()) == keys  # checkpoints keep their keys
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), n
    # a checkpoint of the batched model loads into a fresh one and gives the same forward
    c = _model(config, seed=1)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.eval()(x), a.eval()(x))


def test_forward_reads_the_batch_and_unused_quantizers_get_no_gradient():
    model = _model(QuantConfig())
    qs = [q for _, q in quantizers(model)]
    seen = []
    fwd = type(qs[0]).forward

    def spy(self, x):
        seen.append(self.__dict__.get("_mixq_shared") is not None)
        return fwd(self, x)

    extra = UniformQuantizer("d_qmax")  # in the groups, never called by the forward
    model[0].unused = extra  # a child that no forward calls
    share_derived(model, [*qs, extra])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UniformQuantizer, "forward", spy)
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert seen and all(seen)
    assert all(q.__dict__.get("_mixq_shared") is None for q in qs)  # taken back after
    assert all(p.grad is not None for q in qs for p in q.parameters())
    assert all(p.grad is None for p in extra.parameters())  # as per quantizer


def test_forward_values_equal_without_batching_and_no_grad_falls_back():
    a = _model(MIXED)
    b = copy.deepcopy(a)
    share_derived(a, [q for _, q in quantizers(a)])
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(a(x), b(x))
    # derived without gradients, used in a part of the forward that wants them: recomputed
    with torch.no_grad():
        shared = [q for _, q in quantizers(a)]
        a._forward_pre_hooks[next(iter(a._forward_pre_hooks))](a, (x,))
    with torch.enable_grad():
        out = a[0](x)
    out.sum().backward()
    assert a[0].weight_quantizer.d.grad is not None
    for q in shared:
        q.__dict__.pop("_mixq_shared", None)


def test_deepcopy_keeps_the_hooks_on_the_copy():
    a = _model(QuantConfig())
    share_derived(a, [q for _, q in quantizers(a)])
    b = copy.deepcopy(a)
    b(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(p.grad is None for p in a.parameters())
    assert all(p.grad is not None for _, q in quantizers(b) for p in q.parameters())


def test_a_model_copies_and_pickles_after_a_training_forward(tmp_path):
    """The forward's vectors (not graph leaves) stay with the original: a copy made mid-step
    (EMA, best-model snapshot) trains and computes its penalty from its own forward."""
    a = _model(QuantConfig())
    share_derived(a, [q for _, q in quantizers(a)])
    x = torch.randn(2, 3, 8, 8)
    a(x)
    b = copy.deepcopy(a)
    torch.save(a, tmp_path / "model.pt")
    budget = Budget.parse(weight="150B")
    (b(x).sum() + budget.penalty(b)).backward()
    assert all(p.grad is None for p in a.parameters())
    assert all(p.grad is not None for _, q in quantizers(b) for p in q.parameters())


def test_compiled_groups_equal_eager():
    """The traceable spellings (``torch.compile``) give the same values."""
    qs = _zoo(4, n_each=1)
    ref = copy.deepcopy(qs)
    groups = QuantizerGroups(qs)
    torch.compile(groups.constrain_)()
    for r in ref:
        r.constrain_()
    for q, r in zip(qs, ref, strict=True):
        for n in q.param_names:
            assert _same(getattr(q, n), getattr(r, n))
    got = torch.compile(groups.bitwidths)()
    assert _same(got, torch.stack([r.bitwidth_surrogate() for r in ref]))


def test_bit_sets_and_frozen_bits_keep_the_per_quantizer_path():
    """Issue 20's allowed bit sets and frozen bits change the formulas: those quantizers leave
    the batch (on construction or when frozen later) and get exactly their own results."""
    with_set = UniformQuantizer("b_d", b=5.4, d=0.1, bit_set=(4, 8))
    frozen = UniformQuantizer("d_qmax", d=0.1, q_max=2.0)
    plain = UniformQuantizer("d_qmax", d=0.1, q_max=2.0)
    groups = QuantizerGroups([with_set, frozen, plain])
    assert groups.solo == [0]
    frozen.freeze_bits_()
    with torch.no_grad():
        frozen.q_max.fill_(9.0)  # an update that would leave the frozen bitwidth
        plain.q_max.fill_(9.0)
    want = [q.bitwidth for q in (with_set, frozen, plain)]
    groups.constrain_()
    assert groups.solo == [0, 1]
    assert frozen.bitwidth == frozen.frozen_bits and plain.bitwidth > frozen.frozen_bits
    assert float(groups.bitwidths()[0]) == want[0] == 4  # the member nearest to b = 5.4
    frozen.unfreeze_bits_()
    groups.constrain_()
    assert groups.solo == [0]  # back in the batch
