"""Budgets that hold: the dual controller, the repair step, frozen bits, bit sets, resume."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from torch import nn

import mixq
from mixq.budget_control import DualController
from mixq.config import ConfigError, LayerOverride, QuantConfig, SiteConfig
from mixq.convert import quantizers
from mixq.cost import Budget, activation_bits, weight_bits
from mixq.export import load_packed, save_packed
from mixq.qat import QATStep, param_groups
from mixq.quant import Pow2Quantizer, UniformQuantizer
from mixq.repair import capture_inputs, relative_error, repair, set_bits_
from mixq.train.build import load_model
from mixq.train.checkpoint import load_checkpoint
from mixq.train.config import TrainConfig
from mixq.train.trainer import fit

FLOAT_ACT = SiteConfig(quantizer="float")


def _mlp(widths, bits=4, activation=FLOAT_ACT, weight=None, overrides=()):
    layers = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    cfg = QuantConfig(weight=weight or SiteConfig(bits=bits), activation=activation,
                      overrides=tuple(overrides))  # fmt: skip
    return mixq.quantize_model(nn.Sequential(*layers[:-1]), cfg,
                               example_input=torch.zeros(1, widths[0]))  # fmt: skip


# -- the dual controller ---------------------------------------------------------------------
def test_dual_step_is_projected_ascent_on_the_relative_violation():
    model = _mlp([8, 8])
    s = float(weight_bits(model))
    budget = Budget(weight=s / 8 / 1.5)  # the model is 1.5x its budget
    ctl = DualController(budget, dual_lr=0.1, margin=0.02)
    pen = ctl.penalty(model)
    assert float(pen) == 0.0  # lambda starts at 0
    ctl.update()
    assert ctl.multipliers()["weight"] == pytest.approx(0.1 * (1.5 - 0.98), rel=1e-6)
    lam = ctl.multipliers()["weight"]
    pen = ctl.penalty(model)  # lambda * S / S_0, the gradient lambda / S_0 * dS/dtheta
    assert float(pen) == pytest.approx(lam * 1.5, rel=1e-6)
    q = model[0].weight_quantizer
    pen.backward()
    s_grad = torch.autograd.grad(weight_bits(model), q.q_max)[0]
    assert float(q.q_max.grad) == pytest.approx(lam / (budget.weight * 8) * float(s_grad), rel=1e-5)
    ctl2 = DualController(Budget(weight=s / 8 * 4), dual_lr=0.1)  # far under: stays at 0
    ctl2.penalty(model)
    ctl2.update()
    assert ctl2.multipliers()["weight"] == 0.0


def _drive(bits: int, avg_bits: float, steps: int = 800) -> list[float]:
    """SGD on a task that wants more bits (each weight's relative quantization error) under
    a weight budget of ``avg_bits`` per parameter, with the dual controller."""
    torch.manual_seed(0)
    model = _mlp([32, 24, 40, 16, 48, 20, 36, 28, 32], bits=bits)
    n = sum(p.numel() for p in model.parameters())
    budget = Budget(weight=avg_bits * n / 8)
    opt = torch.optim.SGD(param_groups(model), lr=0.01, momentum=0.9)
    step = QATStep(model, opt, budget)
    ctl = DualController(budget)
    step.penalty_fn = lambda: ctl.penalty(model)
    layers = [m for m in model.modules() if hasattr(m, "weight_quantizer")]
    ratios = []
    for _ in range(steps):
        loss = sum(((m.weight_quantizer(m.weight) - m.weight.detach()) ** 2).sum()
                   / (m.weight.detach() ** 2).sum() for m in layers)  # fmt: skip
        step(loss)
        ctl.update()
        with torch.no_grad():
            ratios.append(float(weight_bits(model)) / (budget.weight * 8))
    return ratios


@pytest.mark.parametrize(("bits", "avg"), [(8, 4.0), (2, 5.0)], ids=["from-above", "from-below"])
def test_controller_drives_the_size_onto_the_budget(bits, avg):
    ratios = _drive(bits, avg)
    assert abs(ratios[0] - 1) > 0.5  # started far from the budget (2x over / 0.4x under)
    tail = ratios[-300:]
    # settles on the budget: the mean within a few percent; the ripple of single-bit flips
    # (at most ~16% here) is what the freeze + repair removes
    assert 0.93 <= statistics.mean(tail) <= 1.05, statistics.mean(tail)
    assert min(tail) < 1.0 < max(tail) or max(tail) <= 1.0


def test_controller_state_round_trip():
    model = _mlp([8, 8])
    ctl = DualController(Budget(weight=10.0, activation_max=None))
    ctl.penalty(model)
    ctl.update()
    other = DualController(Budget(weight=10.0))
    other.load_state_dict(ctl.state_dict())
    assert torch.equal(other.lam, ctl.lam) and other.lam.dtype == torch.float32
    with pytest.raises(ValueError, match="cannot be loaded"):
        DualController(Budget(weight=10.0, activation_max=10.0)).load_state_dict(ctl.state_dict())
    with pytest.raises(ValueError, match="at least one target"):
        DualController(Budget())


# -- the repair step -------------------------------------------------------------------------
def _two_layers(seed: int = 0):
    torch.manual_seed(seed)
    return _mlp([40, 25, 4], weight=SiteConfig(quantizer="uniform/b_d", bits=4))  # 1025 + 104


def test_repair_lowers_the_cheapest_site_and_lands_under_the_budget():
    model = _two_layers()
    s = float(weight_bits(model))
    big, small = model[0].weight_quantizer, model[2].weight_quantizer
    need = 1000 + 25  # bits to save: one bit of the big weight (1000) and its bias (25)
    budget = Budget(weight=(s - need) / 8)
    inputs = capture_inputs(model, torch.randn(8, 40))
    changes = repair(model, budget, inputs)
    assert all(budget.satisfied(model).values())
    # the big weight's bit first (most memory per error), then the cheapest finisher: the
    # bias (25 bits) or the small weight (100 bits), not a second bit of the big weight
    assert big.bitwidth == 3
    assert s - need - 100 <= float(weight_bits(model)) <= s - need
    assert "0.weight_quantizer" in {c.site for c in changes} and len(changes) == 2
    assert all(c.to_bits == c.from_bits - 1 and c.error >= c.error0 for c in changes)
    assert small.bitwidth in (3, 4)


def test_repair_gives_back_levels_the_greedy_order_did_not_need():
    model = _two_layers()
    small = model[2].weight_quantizer
    # the small layer's weights on its 2-bit grid: lowering it costs no error, so the greedy
    # rule lowers it first; the saving is too small, the big layer must go too, and then the
    # small layer's levels are not needed any more
    with torch.no_grad():
        d = small.step
        model[2].weight.copy_(torch.randint(-1, 2, model[2].weight.shape) * d)
    s = float(weight_bits(model))
    budget = Budget(weight=(s - 1000) / 8)
    changes = repair(model, budget, capture_inputs(model, torch.randn(8, 40)))
    assert all(budget.satisfied(model).values())
    assert small.bitwidth == 4  # given back
    assert model[0].weight_quantizer.bitwidth == 3
    assert "2.weight_quantizer" not in {c.site for c in changes}


def test_repair_of_an_activation_budget_lowers_the_largest_site():
    torch.manual_seed(0)
    model = _mlp([16, 64, 8, 4], activation=SiteConfig(bits=4))  # sites: 64 and 8 values
    amax = float(activation_bits(model, "max"))
    budget = Budget(activation_max=(amax - 64) / 8)
    repair(model, budget, capture_inputs(model, torch.rand(16, 16)))
    assert float(activation_bits(model, "max")) <= budget.activation_max * 8
    acts = [q for n, q in quantizers(model) if not q.signed]
    assert sorted(q.bitwidth for q in acts) == [3, 4]


def test_repair_respects_bit_sets():
    torch.manual_seed(0)
    model = _mlp([40, 25, 4], weight=SiteConfig(bits=8, bit_set=(4, 8)))
    s = float(weight_bits(model))
    budget = Budget(weight=(s - 100) / 8)  # one level down is 8 -> 4, nothing in between
    repair(model, budget, capture_inputs(model, torch.randn(8, 40)))
    bits = {n: q.bitwidth for n, q in quantizers(model)}
    assert set(bits.values()) <= {4, 8} and 4 in bits.values()
    assert all(budget.satisfied(model).values())


def test_repair_refuses_what_it_cannot_reach():
    fixed = SiteConfig(bits=8, learnable=False)
    model = _mlp([40, 25, 4], overrides=[LayerOverride("0", weight=fixed)])
    s = float(weight_bits(model))
    budget = Budget(weight=(s - 3000) / 8)  # only the fixed 8-bit layer could save that much
    with pytest.raises(ValueError, match="cannot repair"):
        repair(model, budget, capture_inputs(model, torch.randn(8, 40)))


@pytest.mark.parametrize("spec", ["uniform/d_qmax", "pow2/qmin_qmax", "uniform/b_d"])
def test_set_bits_takes_the_alternative_with_the_smaller_error(spec):
    torch.manual_seed(0)
    kind, par = spec.split("/")
    q = (UniformQuantizer if kind == "uniform" else Pow2Quantizer)(par, signed=True)
    x = torch.randn(2000) * 0.3
    q.init_from_tensor(x, b=6)
    errs = []
    for b in (5, 4, 3):
        err = set_bits_(q, b, x)
        assert q.bitwidth == b and err == pytest.approx(relative_error(q, x))
        errs.append(err)
    assert errs == sorted(errs)  # fewer bits, more error


# -- frozen bits and bit sets ----------------------------------------------------------------
SPECS = [("uniform", p) for p in ("b_d", "b_qmax", "d_qmax")] + [
    ("pow2", p) for p in ("b_qmax", "b_qmin", "qmin_qmax")]  # fmt: skip


def _quantizer(kind, par, **kw):
    q = (UniformQuantizer if kind == "uniform" else Pow2Quantizer)(par, signed=True, **kw)
    q.init_from_tensor(torch.randn(500) * 0.5, b=4)
    return q


@pytest.mark.parametrize(("kind", "par"), SPECS)
def test_frozen_bits_stay_frozen_under_training_steps(kind, par):
    torch.manual_seed(1)
    q = _quantizer(kind, par)
    x = torch.randn(500) * 0.5
    q.freeze_bits_()
    bits, scale = q.bitwidth, q.derived()[0].item()
    opt = torch.optim.SGD(q.parameters(), lr=0.05, momentum=0.9)
    moved = 0.0
    for _ in range(200):
        opt.zero_grad()
        # a loss that pulls the bitwidth and the range both ways
        loss = ((q(x) - 2 * x) ** 2).mean() + torch.randn(()) * q.bitwidth_surrogate()
        loss.backward()
        opt.step()
        q.constrain_()
        assert q.bitwidth == bits
        moved += sum(float(p.grad.abs()) for p in q.parameters() if p.grad is not None)
    if par in ("d_qmax", "qmin_qmax"):  # the step / smallest magnitude is held
        assert q.derived()[0].item() == scale
    assert moved > 0
    q.unfreeze_bits_()
    assert q.frozen_bits is None and q.held_scale is None


@pytest.mark.parametrize(("kind", "par"), SPECS)
def test_bit_sets_are_respected_by_every_parametrization(kind, par):
    torch.manual_seed(2)
    q = _quantizer(kind, par, bit_set=(2, 4, 8))
    x = torch.randn(500)
    opt = torch.optim.Adam(q.parameters(), lr=0.05)  # steps of ~lr whatever the gradient
    seen = set()
    for i in range(150):
        opt.zero_grad()
        sign = 1.0 if i < 75 else -1.0  # push the bits up, then down (from 4 bits)
        (sign * -q.bitwidth_surrogate() + 0.0 * q(x).sum()).backward()
        opt.step()
        q.constrain_()
        seen.add(q.bitwidth)
    assert seen <= {2, 4, 8} and len(seen) >= 2, seen


def test_bit_set_errors_are_clear():
    with pytest.raises(ConfigError, match=r"bits=4 \(the initial bitwidth\) is not in bit_set"):
        SiteConfig(bits=4, bit_set=(2, 8))
    with pytest.raises(ConfigError, match="non-empty"):
        SiteConfig(bit_set=())
    with pytest.raises(ConfigError, match=r"bit_set \[2, 16\] has \[16\] outside the bitwidth"):
        _mlp([8, 4], weight=SiteConfig(bits=2, bit_set=(2, 16)))
    with pytest.raises(ValueError, match="cannot freeze"):
        UniformQuantizer("d_qmax", bit_set=(4, 8)).freeze_bits_(5)


def test_infeasible_budget_names_the_smallest_sizes():
    model = _mlp([40, 25, 4], weight=SiteConfig(bits=4, bit_set=(4, 8)),
                 activation=SiteConfig(bits=8, bit_set=(8,)))  # fmt: skip
    n = 40 * 25 + 25 + 25 * 4 + 4
    Budget(weight=n * 4 / 8).check_feasible(model)  # all at 4 bits: just feasible
    with pytest.raises(ValueError, match=r"impossible weight budget .*smallest achievable is "
                                         r"0\.55 KiB.*activation_peak"):  # fmt: skip
        Budget(weight=n * 4 / 8 - 1).check_feasible(model)
    with pytest.raises(ValueError, match="impossible activation_peak budget"):
        Budget(activation_peak=20).check_feasible(model)  # 25 values at 8 bits: 25 bytes


def test_packed_export_stores_bit_set_members(tmp_path):
    torch.manual_seed(0)
    model = _mlp([40, 25, 4], weight=SiteConfig(bits=4, bit_set=(4, 8)))
    q = model[0].weight_quantizer
    with torch.no_grad():  # a range of k = 3 levels needs 3 bits: charged and stored in 4
        q.q_max.fill_(3 * q.step)
    q.constrain_()
    assert q.levels == 3 and q.bitwidth == 4
    manifest = save_packed(model, tmp_path / "m.mxq")
    stored = [t["bits"] for t in manifest["tensors"] if t["storage"] == "packed"]
    assert stored and set(stored) <= {4, 8}
    skeleton = nn.Sequential(nn.Linear(40, 25), nn.ReLU(), nn.Linear(25, 4))
    loaded = load_packed(tmp_path / "m.mxq", model=skeleton)
    x = torch.randn(3, 40)
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    assert loaded[0].weight_quantizer.bit_set == (4, 8)


# -- in a training run -----------------------------------------------------------------------
TINY = {
    "name": "tiny",
    "model": {"name": "smallcnn", "kwargs": {"in_channels": 3, "width": 8}},
    "data": {"name": "synthetic", "batch_size": 32, "eval_batch_size": 64,
             "synthetic_train": 128, "synthetic_test": 64},
    "quant": {},
    "budget": {"weight": "2KB", "mode": "dual", "freeze_at": 2},
    "optim": {"lr": 0.05, "epochs": 4, "schedule": "cosine"},
}  # fmt: skip


def _cfg(*over: str) -> TrainConfig:
    return TrainConfig.from_data(TINY, list(over))


def test_config_errors():
    with pytest.raises(ConfigError, match=r"budget\.mode"):
        _cfg("budget.mode=lagrange")
    with pytest.raises(ConfigError, match=r"freeze_at=1\.5"):
        _cfg("budget.freeze_at=1.5")
    with pytest.raises(ConfigError, match="at least one epoch before and after"):
        _cfg("budget.freeze_at=4")
    with pytest.raises(ConfigError, match="need a size target"):
        _cfg("budget.weight=null")
    assert _cfg("budget.freeze_at=0.7").budget.freeze_epoch(4) == 3


@pytest.mark.parametrize("kill", [1, 3], ids=["before-freeze", "after-freeze"])
def test_resume_is_exact_with_the_controller_state(tmp_path, kill_at_epoch, kill):
    cfg = _cfg()
    fit(cfg, tmp_path / "full", progress=False)
    kill_at_epoch(kill, lambda: fit(cfg, tmp_path / "killed", progress=False))
    fit(cfg, tmp_path / "killed", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    ca, cb = a["budget_control"], b["budget_control"]
    assert torch.equal(ca["controller"]["lam"], cb["controller"]["lam"])
    assert float(ca["controller"]["lam"].sum()) > 0
    assert ca["frozen"] == cb["frozen"] and ca["record"] == cb["record"]


def test_a_run_over_budget_at_the_freeze_is_repaired_and_delivers_the_budget(tmp_path):
    # no penalty at all (fixed mode, lam 0): the bits stay near 4 (1.90 KiB), over 1.5 KB
    cfg = _cfg("budget.mode=fixed", "budget.lam=0", "budget.freeze_at=1", "optim.epochs=3",
               "budget.weight=1.5KB")
    summary = fit(cfg, tmp_path, progress=False)
    record = summary["budget_control"]["freeze"]
    assert record["how"] == "repaired" and record["over_before"] == ["weight"]
    assert record["changes"] and all(c["to_bits"] < c["from_bits"] for c in record["changes"])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not rows[0]["budget_met"] and not rows[0]["bits_frozen"]
    assert all(r["budget_met"] and r["bits_frozen"] for r in rows[1:])  # every check after it
    assert summary["best"]["epoch"] > 1 and summary["report_of"] == "best.pt"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["budget_control"]["freeze"]["how"] == "repaired"
    assert "repaired by lowering" in (tmp_path / "report.txt").read_text()
    assert (tmp_path / "budget_sizes.png").is_file()
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["budget_control"]["frozen"]



def test_the_moving_average_gets_the_repaired_frozen_bits(tmp_path):
    cfg = _cfg("budget.mode=fixed", "budget.lam=0", "budget.freeze_at=1", "optim.epochs=3",
               "budget.weight=1.5KB", "optim.ema_decay=0.9")  # fmt: skip
    summary = fit(cfg, tmp_path, progress=False)
    assert summary["budget_control"]["freeze"]["how"] == "repaired"
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["budget_met"] for r in rows[1:])  # the average is what is checked
    model, ckpt = load_model(tmp_path / "best.pt")  # the average, as delivered
    assert {n: q.bitwidth for n, q in quantizers(model)} == ckpt["budget_control"]["frozen"]


def test_compiled_dual_run_with_a_freeze_matches_eager(tmp_path):
    """``compile: true``: the dual penalty and the frozen-bits projection run compiled too."""
    over = ["optim.epochs=2", "budget.freeze_at=1", "max_steps_per_epoch=3", "budget.weight=1.5KB"]
    fit(_cfg(*over), tmp_path / "eager", progress=False)
    fit(_cfg(*over, "compile=true"), tmp_path / "compiled", progress=False)
    a = load_checkpoint(tmp_path / "eager" / "last.pt")
    b = load_checkpoint(tmp_path / "compiled" / "last.pt")
    for k, v in a["model"].items():
        if v.is_floating_point():
            # float rounding of fused kernels, compounded by the batch-norm re-estimation
            torch.testing.assert_close(b["model"][k], v, rtol=1e-3, atol=5e-3, msg=k)
    ca, cb = a["budget_control"], b["budget_control"]
    torch.testing.assert_close(cb["controller"]["lam"], ca["controller"]["lam"])
    assert float(ca["controller"]["lam"].sum()) > 0
    assert ca["frozen"] == cb["frozen"] and ca["record"]["how"] == cb["record"]["how"] == "repaired"
    sites = [[(c["site"], c["to_bits"]) for c in r["record"]["changes"]] for r in (ca, cb)]
    assert sites[0] == sites[1]


def test_an_impossible_budget_is_refused_before_training(tmp_path):
    cfg = _cfg("budget.weight=0.5KB")  # the tiny CNN needs 0.95 KiB at 2 bits
    with pytest.raises(ValueError, match=r"impossible weight budget 0\.50 KiB .*smallest "
                                         r"achievable is 0\.9"):  # fmt: skip
        fit(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()
