"""Memory model, penalties and op counts (spec 5.1-5.3, paper Table 2 and Eq. 10).

Sizes are checked against the paper's numbers (KiB / MiB with 1 KB = 1024 bytes) and against
exact bit counts ``S = sum_t b_t * numel_t``. The two ImageNet models are converted once each
(one 224x224 dry forward) in module-scoped fixtures.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mixq.config import LayerOverride, QuantConfig, SiteConfig
from mixq.convert import quantize_model, quantizer_parameters, quantizers, record_sizes
from mixq.cost import (
    BITS_PER_KIB,
    Budget,
    activation_bits,
    activation_bits_per_site,
    float_weight_bits,
    layer_ops,
    parse_size,
    scaled_lambda,
    weight_bits,
)
from mixq.layers import QuantAct, QuantConv2d, QuantLinear
from mixq.models import count_conv_fc_params, mobilenet_v2, resnet18, resnet20
from mixq.report import report

BITS_PER_MIB = 8 * 1024**2
R20_WEIGHTS = 268_346  # 19 convs + FC 64x10 + 10 biases (spec 5.3)
R20_ACTS = 188_416  # per-sample elements of the 19 ReLU sites (spec 5.3)
R20_MAX_ACT = 16 * 32 * 32


def _kib(bits: torch.Tensor | float) -> float:
    return float(torch.as_tensor(bits).detach()) / BITS_PER_KIB


def _mib(bits: torch.Tensor | float) -> float:
    return float(torch.as_tensor(bits).detach()) / BITS_PER_MIB


def _convert(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    torch.manual_seed(0)
    return quantize_model(model, config)


@pytest.fixture(scope="module")
def r20() -> nn.Module:
    """ResNet-20 with the paper's default: every weight, bias and activation at 4 bits."""
    torch.manual_seed(0)
    return quantize_model(resnet20())


@pytest.fixture(scope="module")
def r20_w2_float_act() -> nn.Module:
    """ResNet-20, 2-bit weights, float (32-bit) activation sites."""
    torch.manual_seed(0)
    cfg = QuantConfig(weight=SiteConfig(bits=2), activation=SiteConfig(quantizer="float"))
    return quantize_model(resnet20(), cfg)


@pytest.fixture(scope="module")
def r18() -> nn.Module:
    torch.manual_seed(0)
    return quantize_model(resnet18())


@pytest.fixture(scope="module")
def mbv2() -> nn.Module:
    torch.manual_seed(0)
    return quantize_model(mobilenet_v2())


class TwoLayer(nn.Module):
    """conv3x3(3->4, bias) -> ReLU -> flatten -> fc(100->6, bias) -> ReLU, input 3x5x5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.fc = nn.Linear(4 * 5 * 5, 6)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.fc(self.relu1(self.conv(x)).flatten(1)))


def _two_layer() -> nn.Module:
    """TwoLayer with weights (and the conv bias) at 3 bits, fc at 5 bits, relu2 at 6 bits."""
    cfg = QuantConfig(
        weight=SiteConfig(bits=3),
        overrides=(
            LayerOverride("fc", weight=SiteConfig(bits=5)),
            LayerOverride("relu2", activation=SiteConfig(bits=6)),
        ),
        input_shape=(3, 5, 5),
    )
    return _convert(TwoLayer(), cfg)


# -- the paper's sizes ------------------------------------------------------------------------


def test_resnet20_weight_sizes_match_paper(r20, r20_w2_float_act):
    assert count_conv_fc_params(r20) == R20_WEIGHTS
    float_model = _convert(resnet20(), QuantConfig(weight=SiteConfig(quantizer="float")))
    assert weight_bits(float_model).item() == 32 * R20_WEIGHTS == float_weight_bits(r20)
    assert round(_kib(weight_bits(float_model)), 1) == 1048.2
    # 2-bit init really gives bitwidth 2 for every weight and bias quantizer
    wq = [q for n, q in quantizers(r20_w2_float_act) if "weight" in n or "bias" in n]
    assert len(wq) == 21 and {q.bitwidth for q in wq} == {2}
    assert weight_bits(r20_w2_float_act).item() == 2 * R20_WEIGHTS
    assert round(_kib(weight_bits(r20_w2_float_act)), 1) == 65.5
    assert weight_bits(r20).item() == 4 * R20_WEIGHTS


def test_resnet20_activation_sizes_match_paper(r20, r20_w2_float_act):
    fl = r20_w2_float_act
    assert all(m.quantizer is None for m in fl.modules() if isinstance(m, QuantAct))
    assert activation_bits(fl, "sum").item() == 32 * R20_ACTS
    assert _kib(activation_bits(fl, "sum")) == 736.0
    assert _kib(activation_bits(fl, "max")) == 64.0
    assert activation_bits(r20, "sum").item() == 4 * R20_ACTS
    assert _kib(activation_bits(r20, "sum")) == 92.0
    assert activation_bits(r20, "max").item() == 4 * R20_MAX_ACT
    assert _kib(activation_bits(r20, "max")) == 8.0


def test_resnet18_sizes_match_paper(r18):
    n = count_conv_fc_params(r18)
    assert n == 11_679_912  # conv + FC only; torchvision's 11,689,512 includes BN
    assert round(_mib(float_weight_bits(r18)), 2) == 44.56
    assert {q.bitwidth for _, q in quantizers(r18)} == {4}
    assert weight_bits(r18).item() == 4 * n
    assert round(_mib(weight_bits(r18)), 2) == 5.57  # the Fig. 5 weight target
    amax = activation_bits(r18, "max")
    assert amax.item() == 4 * 64 * 112 * 112
    assert round(_mib(amax), 2) == 0.38
    # float: 64x112x112x4 B = 3.06 MiB (the paper prints 3.04, spec 10.14)
    assert round(report(r18).totals.activation_max_float_kib / 1024, 2) == 3.06


def test_mobilenet_v2_sizes_match_paper(mbv2):
    n = count_conv_fc_params(mbv2)
    assert n == 3_470_760
    assert round(_mib(float_weight_bits(mbv2)), 2) == 13.24
    assert weight_bits(mbv2).item() == 4 * n
    assert round(_mib(weight_bits(mbv2)), 2) == 1.65  # the paper's 4-bit weight target
    totals = report(mbv2).totals
    assert totals.activation_max_float_kib * 1024 * 8 == 32 * 96 * 112 * 112
    assert round(totals.activation_max_float_kib / 1024, 2) == 4.59
    assert activation_bits(mbv2, "max").item() == 4 * 96 * 112 * 112
    assert round(_mib(activation_bits(mbv2, "max")), 2) == 0.57


# -- penalty ------------------------------------------------------------------------------------


def _penalty_steps(model: nn.Module, budget: Budget, steps: int, lr: float) -> None:
    """SGD on the penalty alone, with the training loop's gradient clip and projection."""
    qs = [q for _, q in quantizers(model)]
    opt = torch.optim.SGD(quantizer_parameters(model), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        budget.penalty(model).backward()
        for q in qs:
            q.clip_grad_()
        opt.step()
        for q in qs:
            q.constrain_()


def test_penalty_step_lowers_bitwidths_over_budget():
    model = _convert(resnet20())
    budget = Budget.parse(weight="70KB")
    assert budget.penalty(model).item() == pytest.approx(0.1 * (4 * R20_WEIGHTS / 8192 - 70) ** 2)
    w_before = {n: q.bitwidth for n, q in quantizers(model) if q.signed}
    a_before = {n: q.bitwidth for n, q in quantizers(model) if not q.signed}
    _penalty_steps(model, budget, steps=3, lr=0.5)
    w_after = {n: q.bitwidth for n, q in quantizers(model) if q.signed}
    assert _kib(weight_bits(model)) < 4 * R20_WEIGHTS / 8192
    assert all(w_after[n] <= w_before[n] for n in w_before)
    assert sum(w_after.values()) < sum(w_before.values())
    assert {n: q.bitwidth for n, q in quantizers(model) if not q.signed} == a_before


def test_penalty_under_budget_is_zero_and_changes_nothing(r20):
    budget = Budget.parse(weight="200KB", activation_sum="100KB", activation_max="9KB")
    assert budget.satisfied(r20) == {"weight": True, "activation_sum": True,
                                     "activation_max": True}  # fmt: skip
    pen = budget.penalty(r20)
    assert pen.item() == 0.0
    params = quantizer_parameters(r20)
    grads = torch.autograd.grad(pen, params, allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    assert sum(g is not None for g in grads) > 0  # the penalty does depend on the parameters


def test_penalty_value_and_satisfied_by_hand():
    m = _two_layer()
    budget = Budget(weight=100, activation_max=60, lam=0.5)  # bytes: 800 and 480 bits
    expected = 0.5 * ((3366 - 800) / 8192) ** 2 + 0.0  # 400 bits <= 480: no activation term
    assert budget.penalty(m).item() == pytest.approx(expected, rel=1e-6)
    assert budget.satisfied(m) == {"weight": False, "activation_max": True}


# -- memory model by hand ------------------------------------------------------------------------


def test_memory_model_equals_hand_computation():
    m = _two_layer()
    assert isinstance(m.conv, QuantConv2d) and isinstance(m.fc, QuantLinear)
    assert (m.conv.weight_quantizer.bitwidth, m.conv.bias_quantizer.bitwidth) == (3, 3)
    assert (m.fc.weight_quantizer.bitwidth, m.fc.bias_quantizer.bitwidth) == (5, 5)
    # S_w = 3 * (4*3*3*3 + 4) + 5 * (6*100 + 6)
    assert weight_bits(m).item() == 3 * (108 + 4) + 5 * (600 + 6) == 3366
    # S_x: relu1 100 elements at 4 bits, relu2 6 elements at 6 bits
    assert (m.relu1.numel, m.relu2.numel) == (100, 6)
    assert activation_bits_per_site(m).tolist() == [400.0, 36.0]
    assert activation_bits(m, "sum").item() == 436
    assert activation_bits(m, "max").item() == 400
    with pytest.raises(ValueError, match="valid"):
        activation_bits(m, "mean")


def test_max_reduction_gradient_goes_only_to_largest_site():
    m = _two_layer()
    p1 = list(m.relu1.quantizer.parameters())
    p2 = list(m.relu2.quantizer.parameters())
    grads = torch.autograd.grad(activation_bits(m, "max"), p1 + p2, allow_unused=True)
    assert any(g is not None and g.abs().item() > 0 for g in grads[: len(p1)])
    assert all(g is None or g.item() == 0 for g in grads[len(p1) :])


def test_max_reduction_gradient_goes_to_first_of_tied_sites(r20):
    """ResNet-20 at 4 bits: 7 sites tie at 8 KiB; the first (the stem ReLU) gets it all."""
    sites = [(n, mod) for n, mod in r20.named_modules() if isinstance(mod, QuantAct)]
    per_site = activation_bits_per_site(r20)
    assert (per_site == per_site.max()).sum().item() == 7
    params = [mod.quantizer.q_max for _, mod in sites]
    grads = torch.autograd.grad(activation_bits(r20, "max"), params, allow_unused=True)
    got = [n for (n, _), g in zip(sites, grads, strict=True) if g is not None and g.item() != 0]
    assert got == ["relu"]


def test_scaled_lambda(r18):
    assert scaled_lambda(resnet20()) == pytest.approx(0.1, rel=1e-15)
    assert scaled_lambda(r18) == pytest.approx(0.1 * (R20_WEIGHTS / 11_679_912) ** 2)
    assert scaled_lambda(resnet20(), base=1.0) == pytest.approx(1.0)


# -- Table 2 op counts ----------------------------------------------------------------------------


def test_layer_ops_table2_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
    fc = nn.Linear(8 * 5 * 5, 10)
    net = nn.Sequential(conv, dw, nn.Flatten(), fc)
    record_sizes(net, input_shape=(3, 10, 10))
    # MACs = M_l * M_{l-1}/groups * N_l^2 * K_l^2; FC: M_l * M_{l-1}
    expected = {conv: 8 * 3 * 100 * 9, dw: 8 * 1 * 25 * 9, fc: 10 * 200}
    for layer, macs in expected.items():
        ops = layer_ops(layer)
        assert ops == {"macs": macs, "uniform_mul": macs, "uniform_add": macs, "pow2_mul": 0,
                       "pow2_add": 2 * macs}  # fmt: skip
    with pytest.raises(ValueError, match="record_sizes"):
        layer_ops(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError):
        layer_ops(nn.ReLU())


# -- sizes, budgets and their errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("70KB", 70 * 1024), ("92 KiB", 92 * 1024), ("5.4MB", 5.4 * 1024**2), (1024, 1024.0),
     ("1e3B", 1000.0), ("0.57 mib", 0.57 * 1024**2)],
)  # fmt: skip
def test_parse_size(text, nbytes):
    assert parse_size(text) == pytest.approx(nbytes)


@pytest.mark.parametrize("bad", ["-3KB", "0", "abc", "12 parsecs", "", "KB", float("inf"), -1])
def test_parse_size_errors(bad):
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_budget_parse():
    b = Budget.parse(weight="70KB", activation_max="8KB")
    assert (b.weight, b.activation_sum, b.activation_max, b.lam) == (71680.0, None, 8192.0, 0.1)
    assert b.active and not Budget.parse().active
    with pytest.raises(ValueError, match="positive"):
        Budget.parse(activation_sum="-92KB")


def test_impossible_budget_is_rejected(r20):
    with pytest.raises(ValueError, match=r"impossible weight budget 1\.00 KiB.*65\.51 KiB"):
        Budget.parse(weight="1KB").check_feasible(r20)
    with pytest.raises(ValueError, match="impossible activation_max"):
        Budget.parse(activation_max="1KB").check_feasible(r20)  # 1 bit: 2 KiB at least
    Budget.parse(weight="70KB", activation_sum="92KB", activation_max="8KB").check_feasible(r20)


def test_float_weight_bits_counts_biases():
    assert float_weight_bits(TwoLayer()) == 32 * (108 + 4 + 600 + 6)
    assert math.isclose(_kib(float_weight_bits(resnet20())), 1048.2265625)
