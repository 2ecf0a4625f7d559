"""Activation sites found from the traced dry forward (mixq.sites, spec 5.1-5.2, decision 5).

Every model of tests/zoo.py against a hand list: the sites, their per-sample sizes, which are
counted, quantized (signed / unsigned) or float, the peak memory alive at once, finite gradients
for every quantizer parameter with every site quantized, and an exact ``to_float``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixq.config import ConfigError, LayerOverride, QuantConfig, SiteConfig
from mixq.convert import quantize_model, quantizers, to_float
from mixq.cost import (
    Budget,
    activation_bits,
    activation_bits_per_site,
    activation_peak_step,
    float_sites_warning,
)
from mixq.layers import QuantOut
from mixq.models import resnet20
from mixq.report import report
from mixq.sites import table_of
from zoo import SE, SHAPES, Branches, Functional, MLPBlock, Residual, TwoBranch

# name -> (elements per sample, state): "u"/"s" quantized unsigned/signed, "f" float (32 bits),
# "-" stored but not counted. Sizes by hand from the layer shapes in tests/zoo.py.
HAND = {
    (Functional, "relu"): {"input": (3 * 64, "-"), ":relu": (4 * 64, "u"), ":silu": (6 * 16, "f"),
                           ":gelu": (10, "f")},
    (Functional, "inputs"): {"input": (192, "s"), ":relu": (256, "u"), ":silu": (96, "s"),
                             ":gelu": (10, "s")},
    (SE, "relu"): {"input": (108, "-"), "act": (8 * 36, "f"), "pool": (8, "-"), "relu": (2, "u"),
                   "gate": (8, "f"), ":mean": (8, "-")},
    (SE, "inputs"): {"input": (108, "s"), "act": (288, "s"), "pool": (8, "s"), "relu": (2, "u"),
                     "gate": (8, "u"), ":mean": (8, "s")},
    (Residual, "relu"): {"input": (100, "-"), "relu#1": (100, "u"), "relu#2": (100, "u"),
                         ":adaptive_avg_pool2d": (4, "-")},
    (Residual, "inputs"): {"input": (100, "s"), "relu#1": (100, "u"), "relu#2": (100, "u"),
                           ":adaptive_avg_pool2d": (4, "u")},
    (Branches, "relu"): {"input": (48, "-"), ":relu": (128, "f"), ":chunk[1]": (64, "-"),
                         ":tanh": (64, "f"), ":cat": (128, "-"), ":split[0]": (48, "-"),
                         ":split[1]": (48, "-")},
    (Branches, "inputs"): {"input": (48, "s"), ":relu": (128, "f"), ":chunk[1]": (64, "u"),
                           ":tanh": (64, "f"), ":cat": (128, "s"), ":split[0]": (48, "s"),
                           ":split[1]": (48, "s")},
    (MLPBlock, "relu"): {"norm": (40, "-"), "act": (80, "f"), ":mean": (8, "-")},
    (MLPBlock, "inputs"): {"norm": (40, "s"), "act": (80, "s"), ":mean": (8, "s")},
    (TwoBranch, "relu"): {"input": (16, "-"), "relu0": (32, "u"), "relu_a": (48, "u"),
                          "relu_b": (20, "u"), ":cat": (68, "-")},
    (TwoBranch, "inputs"): {"input": (16, "s"), "relu0": (32, "u"), "relu_a": (48, "u"),
                            "relu_b": (20, "u"), ":cat": (68, "u")},
}  # fmt: skip

# Peak in bits at 4 bits per quantized site and 32 per float site, and the op where it occurs.
PEAKS = {
    # chain: conv2 reads the F.relu output while writing the SiLU output (float)
    (Functional, "relu"): (4 * 256 + 32 * 96, ":silu"),
    (Functional, "inputs"): (4 * (192 + 256), ":relu"),
    # residual block: the block input is held for the add while the branch runs
    (Residual, "relu"): (4 * (100 + 100), "relu#2"),
    (Residual, "inputs"): (4 * (100 + 100 + 100), "relu#2"),
    # concatenation: the F.relu output stays alive (its first half goes to the cat) next to
    # the tanh output and the cat itself
    (Branches, "inputs"): (32 * 128 + 32 * 64 + 4 * 128, ":cat"),
    # two branches: the stem output is held until the second branch has read it
    (TwoBranch, "relu"): (4 * (32 + 48 + 20), "relu_b"),
    (TwoBranch, "inputs"): (4 * (48 + 20 + 68), ":cat"),
}

CASES = sorted(HAND, key=lambda k: (k[0].__name__, k[1]))


def _convert(cls: type[nn.Module], mode: str, **cfg) -> nn.Module:
    torch.manual_seed(0)
    m = cls()
    x = torch.randn(1, *SHAPES[cls])
    return quantize_model(m, QuantConfig(activation_sites=mode, **cfg), example_input=x)


def _state(site) -> str:
    if not site.counted:
        return "-"
    if site.quantizer is None:
        return "f"
    return "s" if site.quantizer.signed else "u"


@pytest.mark.parametrize(("cls", "mode"), CASES, ids=lambda v: getattr(v, "__name__", v))
def test_sites_equal_the_hand_list(cls, mode):
    table = table_of(_convert(cls, mode))
    got = {s.name: (s.numel, _state(s)) for s in table.sites}
    assert got == HAND[(cls, mode)]
    for s in table.sites:  # every listed non-quantized site says why
        assert bool(s.note) == (_state(s) in "f-"), s.name


@pytest.mark.parametrize(("cls", "mode"), CASES, ids=lambda v: getattr(v, "__name__", v))
def test_sum_and_max_equal_the_hand_counts(cls, mode):
    m = _convert(cls, mode)
    bits = {"u": 4, "s": 4, "f": 32}
    per = [n * bits[st] for n, st in HAND[(cls, mode)].values() if st != "-"]
    assert activation_bits_per_site(m).tolist() == per
    assert activation_bits(m, "sum").item() == sum(per)
    assert activation_bits(m, "max").item() == max(per)
    t = report(m).totals
    assert t.activation_sum_kib * 8192 == sum(per) and t.activation_max_kib * 8192 == max(per)
    assert t.activation_peak_kib * 8192 == activation_bits(m, "peak").item()


@pytest.mark.parametrize(("cls", "mode"), sorted(PEAKS, key=lambda k: (k[0].__name__, k[1])),
                         ids=lambda v: getattr(v, "__name__", v))  # fmt: skip
def test_peak_equals_the_hand_count(cls, mode):
    m = _convert(cls, mode)
    bits, where = PEAKS[(cls, mode)]
    assert activation_bits(m, "peak").item() == bits
    assert activation_peak_step(m)[0] == where
    assert report(m).totals.activation_peak_at == where


def test_peak_alive_sites_of_two_branches():
    m = _convert(TwoBranch, "relu")
    assert activation_peak_step(m) == ("relu_b", ["relu0", "relu_a", "relu_b"])


@pytest.mark.parametrize("cls", list(SHAPES), ids=lambda c: c.__name__)
def test_every_quantizer_gets_a_finite_gradient_and_to_float_is_exact(cls):
    torch.manual_seed(1)
    x = torch.randn(3, *SHAPES[cls])
    m = cls()
    ref = m(x)
    quantize_model(m, QuantConfig(activation_sites="inputs"), example_input=x[:1])
    budget = Budget.parse(activation_sum="1B", activation_peak="1B", activation_max="1B")
    loss = m(x).square().mean() + budget.penalty(m)
    loss.backward()
    params = [(n, p) for n, q in quantizers(m) for n, p in q.named_parameters(prefix=n)]
    assert params
    for n, p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    to_float(m)
    assert not any(isinstance(mod, QuantOut) for mod in m.modules())
    assert table_of(m) is None
    assert torch.equal(m(x), ref)


def test_reused_relu_is_one_site_per_call_sharing_a_quantizer():
    table = table_of(_convert(Residual, "relu"))
    r1, r2 = (s for s in table.sites if s.name.startswith("relu#"))
    assert r1.quantizer is r2.quantizer is not None
    assert (r1.consumers, r2.consumers) == (("conv2",), (":adaptive_avg_pool2d",))


def test_functional_relu_is_quantized_unsigned_at_its_reader():
    m = _convert(Functional, "relu")
    s = next(s for s in table_of(m).sites if s.name == ":relu")
    assert s.quantized_at == "conv2" and m.conv2.input_quantizer is s.quantizer
    assert not s.quantizer.signed and s.producer == "function relu in the top-level forward"


def test_overrides_and_exclusions_reach_sites():
    ov = (LayerOverride("gate", activation=SiteConfig(bits=8)),
          LayerOverride(":mean", activation=SiteConfig("pow2/qmin_qmax", bits=3)))  # fmt: skip
    m = _convert(SE, "inputs", overrides=ov, exclude=("pool",))
    sites = {s.name: s for s in table_of(m).sites}
    assert sites["gate"].quantizer.bitwidth == 8 and not sites["gate"].quantizer.signed
    assert sites[":mean"].quantizer.kind == "pow2" and sites[":mean"].quantizer.signed
    assert sites["pool"].quantizer is None and sites["pool"].counted
    assert "pool" in report(m).float_sites


def test_uncounted_removes_a_site_and_the_report_names_it():
    full = activation_bits(_convert(Functional, "inputs"), "sum").item()
    m = _convert(Functional, "inputs", uncounted=("input",))
    assert activation_bits(m, "sum").item() == full - 4 * 192
    rep = report(m)
    assert [a.name for a in rep.uncounted] == ["input"]
    assert "QuantConfig.uncounted 'input'" in rep.uncounted[0].note
    assert "uncounted" in rep.to_csv() and "input" in rep.to_text()


def test_bad_site_config_is_rejected_early():
    with pytest.raises(ConfigError, match="activation_sites"):
        QuantConfig(activation_sites="everything")
    with pytest.raises(ConfigError, match="uncounted pattern 'nope'"):
        _convert(Functional, "inputs", uncounted=("nope",))


def test_float_sites_warn_when_an_activation_budget_is_set():
    m = _convert(SE, "relu")
    budget = Budget.parse(activation_peak="1KB")
    msg = float_sites_warning(m, budget)
    assert "2 activation site(s) stay float" in msg and "act, gate" in msg
    assert "1 stored tensor(s) are not counted" in msg and ":mean" in msg
    assert float_sites_warning(m, Budget.parse(weight="1KB")) is None
    assert "WARNING: activation budget" in report(m, budget).to_text()
    assert float_sites_warning(_convert(SE, "inputs"), budget) is None


def test_paper_resnet20_is_unchanged_and_warning_free():
    """Paper default: 19 ReLU sites, 736 / 92 KiB sum, 64 / 8 KiB max (spec 5.3)."""
    torch.manual_seed(0)
    m = quantize_model(resnet20())
    table = table_of(m)
    assert len(table.counted) == 19
    assert activation_bits(m, "sum").item() / 8192 == 92.0
    assert activation_bits(m, "max").item() / 8192 == 8.0
    assert [s.name for s in table.sites if not s.counted] == ["input", "avgpool"]
    assert float_sites_warning(m, Budget.parse(activation_max="8KB")) is None
    # peak: a block's input (held for the add), its first ReLU and its output, 16x32x32 each
    assert activation_bits(m, "peak").item() == 3 * 16384 * 4
    assert activation_peak_step(m)[0] == "layer1.0.relu2"


def test_peak_budget_parse_penalty_and_feasibility():
    m = _convert(TwoBranch, "relu")
    b = Budget.parse(activation_peak="40B")  # 320 bits < 400
    assert b.activation_peak == 40.0 and b.active and b.activation_active
    assert b.satisfied(m) == {"activation_peak": False}
    assert b.penalty(m).item() == pytest.approx(0.1 * (80 / 8192) ** 2)
    q = m.relu_b.quantizer.q_max
    (g,) = torch.autograd.grad(b.penalty(m), [q])
    assert g.item() != 0  # the peak's sites get the gradient
    with pytest.raises(ValueError, match="impossible activation_peak"):
        Budget.parse(activation_peak="10B").check_feasible(m)  # 1 bit: 100 bits = 12.5 B
    Budget.parse(activation_peak="13B").check_feasible(m)


def test_float_sites_say_why():
    gate = next(s for s in table_of(_convert(SE, "relu")).sites if s.name == "gate")
    assert gate.note == "float: activation_sites='relu' quantizes ReLU/ReLU6 outputs only"
    relu = next(s for s in table_of(_convert(Branches, "inputs")).sites if s.name == ":relu")
    assert relu.note.startswith("float: a functional call that no conv/linear layer reads")
    m = _convert(SE, "inputs", exclude=("gate",))
    gate = next(s for s in table_of(m).sites if s.name == "gate")
    assert gate.quantizer is None and "QuantConfig.exclude" in gate.note


def test_run_config_peak_budget_and_the_warning_before_training():
    from mixq.train.config import BudgetConfig, TrainConfig
    from mixq.train.setup import build_budget

    cfg = TrainConfig(quant=QuantConfig(), budget=BudgetConfig(activation_peak="2KB"))
    with pytest.warns(UserWarning, match=r"activation budget: 2 activation site\(s\) stay float"):
        budget = build_budget(cfg, _convert(SE, "relu"))
    assert budget.activation_peak == 2048.0
    with pytest.raises(ConfigError, match=r"budget\.activation_peak"):
        BudgetConfig(activation_peak="lots")


def test_state_dict_round_trip_and_deepcopy_keep_the_sites():
    """Checkpoints and EMA copies: shared reader quantizers load back, a deep copy's site
    table points at the copy's own quantizers."""
    import copy

    a, b = _convert(Branches, "inputs"), _convert(Branches, "inputs")
    with torch.no_grad():
        for q in (s.quantizer for s in table_of(a).counted if s.quantizer is not None):
            q.q_max.mul_(0.5)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, *SHAPES[Branches])
    assert torch.equal(a(x), b(x))
    assert activation_bits(a, "peak").item() == activation_bits(b, "peak").item()
    c = copy.deepcopy(a)
    own = {id(q) for _, q in quantizers(c)}
    assert all(id(s.quantizer) in own for s in table_of(c).counted if s.quantizer is not None)


def test_non_negative_needs_non_negative_operands():
    """``relu(x) * 2`` and ``relu(x) + relu(y)`` stay >= 0; ``relu(x) * -1``, ``relu(x) - 1``
    and ``relu(x) * gamma`` (a parameter) do not: they get a signed quantizer."""
    from mixq.trace import trace

    class Ops(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(1))

        def forward(self, x):
            r = torch.relu(x)
            return r * 2, r + r, r * -1, torch.add(r, r, alpha=-1), r * self.gamma, r - 1

    g = trace(Ops(), torch.zeros(1, 4))
    assert [g.values[v].nonneg for v in g.outputs] == [True, True, False, False, False, False]
