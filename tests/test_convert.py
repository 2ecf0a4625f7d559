"""Model surgery: ``quantize_model`` / ``to_float``, configs, overrides and their errors.

Converted models are shared through module-scoped fixtures; tests that mutate a model build
their own (ResNet-20 at 32x32 and MobileNetV2 at 64x64 convert in well under a second).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixq.config import ConfigError, LayerOverride, QuantConfig, SiteConfig
from mixq.convert import quantize_model, quantizer_parameters, quantizers, to_float
from mixq.cost import activation_bits, weight_bits
from mixq.layers import QuantAct, QuantConv2d, QuantLinear
from mixq.models import mobilenet_v2, resnet20
from mixq.quant import Pow2Quantizer, UniformQuantizer

SMALL = torch.zeros(1, 3, 64, 64)


@pytest.fixture(scope="module")
def r20() -> nn.Module:
    torch.manual_seed(0)
    return quantize_model(resnet20())


@pytest.fixture(scope="module")
def mbv2_small() -> nn.Module:
    """MobileNetV2 (10 classes) converted with a 64x64 dry forward (fully convolutional)."""
    torch.manual_seed(0)
    return quantize_model(mobilenet_v2(num_classes=10), example_input=SMALL)


def _tiny(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


# -- what gets converted ------------------------------------------------------------------------


def test_default_config_is_the_papers(r20):
    cfg = QuantConfig()
    for site in (cfg.weight, cfg.activation):
        assert (site.quantizer, site.bits, site.learnable, site.pow2_step) == (
            "uniform/d_qmax", 4, True, True)  # fmt: skip
    assert (cfg.bias, cfg.exclude, cfg.overrides, cfg.init_from_weights) == (None, (), (), True)
    # first and last layers quantized too
    assert isinstance(r20.conv1, QuantConv2d) and r20.conv1.weight_quantizer is not None
    assert isinstance(r20.fc, QuantLinear) and r20.fc.bias_quantizer is not None
    for name, q in quantizers(r20):
        assert isinstance(q, UniformQuantizer) and q.parametrization == "d_qmax", name
        assert q.bitwidth == 4, name
    # spec 6: d0 = 2^floor(log2(max|W| / 7)), q_max0 = 7 d0; activations d0 = 2^-3, 1.875
    w = r20.conv1.weight
    d0 = 2.0 ** math.floor(math.log2(w.abs().max().item() / 7))
    assert r20.conv1.weight_quantizer.step == d0
    assert r20.conv1.weight_quantizer.q_max_effective == 7 * d0
    act = r20.relu.quantizer
    assert (act.signed, act.step, act.q_max_effective) == (False, 2.0**-3, 1.875)


def test_resnet20_has_40_quantizers(r20):
    names = [n for n, _ in quantizers(r20)]
    assert len(names) == 40
    assert sum(n.endswith("weight_quantizer") for n in names) == 20
    assert [n for n in names if n.endswith("bias_quantizer")] == ["fc.bias_quantizer"]
    assert sum(isinstance(m, QuantAct) for m in r20.modules()) == 19
    assert not any(type(m) in (nn.Conv2d, nn.Linear, nn.ReLU) for m in r20.modules())


def test_parameters_are_shared_not_copied():
    torch.manual_seed(0)
    model = resnet20()
    conv1, fc, bn1 = model.conv1, model.fc, model.bn1
    n_before = sum(p.numel() for p in model.parameters())
    quantize_model(model)
    assert model.conv1 is not conv1 and model.conv1.weight is conv1.weight
    assert model.fc.weight is fc.weight and model.fc.bias is fc.bias
    assert model.bn1 is bn1
    assert sum(p.numel() for p in model.parameters()) == n_before + 2 * 40


def test_grouped_and_depthwise_conv_converted(mbv2_small):
    torch.manual_seed(0)
    net = _tiny(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, groups=8))
    x = torch.randn(2, 4, 6, 6)
    quantize_model(net, example_input=x)
    g, dw = net[0], net[1]
    assert isinstance(g, QuantConv2d) and isinstance(dw, QuantConv2d)
    assert (g.groups, dw.groups) == (2, 8)
    h = F.conv2d(x, g.weight_quantizer(g.weight), g.bias_quantizer(g.bias), padding=1, groups=2)
    ref = F.conv2d(h, dw.weight_quantizer(dw.weight), dw.bias_quantizer(dw.bias), groups=8)
    assert torch.equal(net(x), ref)
    assert dw.out_shape == (8, 4, 4)
    # MobileNetV2: every conv swapped, 17 of them depthwise
    convs = [m for m in mbv2_small.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m, QuantConv2d) for m in convs) and len(convs) == 52
    assert sum(m.groups == m.in_channels > 1 for m in convs) == 17


def test_overrides_by_pattern_change_parametrization_and_bits():
    cfg = QuantConfig(overrides=(
        LayerOverride("layer1.*", weight=SiteConfig("pow2/qmin_qmax", bits=3),
                      activation=SiteConfig(bits=6)),
        LayerOverride("layer1.0.conv1", weight=SiteConfig(bits=5)),  # later overrides win
    ))  # fmt: skip
    torch.manual_seed(0)
    m = quantize_model(resnet20(), cfg)
    for i in range(3):
        for j in (1, 2):
            q = m.get_submodule(f"layer1.{i}.conv{j}").weight_quantizer
            act = m.get_submodule(f"layer1.{i}.relu{j}").quantizer
            assert act.bitwidth == 6 and isinstance(act, UniformQuantizer)
            if (i, j) == (0, 1):
                assert isinstance(q, UniformQuantizer) and q.bitwidth == 5
            else:
                assert isinstance(q, Pow2Quantizer) and q.parametrization == "qmin_qmax"
                assert q.bitwidth == 3
    q = m.layer2[0].conv1.weight_quantizer
    assert isinstance(q, UniformQuantizer) and q.bitwidth == 4
    assert m.relu.quantizer.bitwidth == 4 and m.layer2[0].relu1.quantizer.bitwidth == 4


def test_exclude_leaves_layer_and_site_float(r20):
    torch.manual_seed(0)
    m = quantize_model(resnet20(), QuantConfig(exclude=("conv1", "relu")))
    assert type(m.conv1) is nn.Conv2d
    assert isinstance(m.relu, QuantAct) and m.relu.quantizer is None
    assert isinstance(m.layer1[0].conv1, QuantConv2d)  # "conv1" matches the full name only
    assert len(list(quantizers(m))) == 38
    # counted at 32 instead of 4 bits: conv1 has 432 weights, its ReLU site 16384 elements
    assert weight_bits(m).item() - weight_bits(r20).item() == 28 * 432
    assert activation_bits(m, "sum").item() - activation_bits(r20, "sum").item() == 28 * 16384
    x = torch.randn(3, 5)
    assert torch.equal(m.relu(x), torch.relu(x))  # a float ReLU, not on a grid


def test_bias_quantizer_initialised_like_the_weights():
    torch.manual_seed(0)
    fc = nn.Linear(8, 4)
    with torch.no_grad():
        fc.bias.mul_(0.01)  # so that an init from the bias itself would differ
    net = quantize_model(_tiny(fc), QuantConfig(weight=SiteConfig(bits=3), input_shape=(8,)))
    wq, bq = net[0].weight_quantizer, net[0].bias_quantizer
    assert wq is not bq
    assert (bq.parametrization, bq.signed, bq.bitwidth) == ("d_qmax", True, 3)
    assert (bq.step, bq.q_max_effective) == (wq.step, wq.q_max_effective)
    own = 2.0 ** math.floor(math.log2(fc.bias.abs().max().item() / 3))
    assert own != wq.step


def test_bias_follows_weight_override_unless_configured():
    ov = (LayerOverride("0", weight=SiteConfig(bits=2)),)
    follows = quantize_model(_tiny(nn.Linear(8, 4)), QuantConfig(overrides=ov, input_shape=(8,)))
    assert follows[0].bias_quantizer.bitwidth == 2
    cfg = QuantConfig(bias=SiteConfig(bits=8), overrides=ov, input_shape=(8,))
    own = quantize_model(_tiny(nn.Linear(8, 4)), cfg)
    assert (own[0].weight_quantizer.bitwidth, own[0].bias_quantizer.bitwidth) == (2, 8)


def test_relu6_site_caps_at_6(mbv2_small):
    assert {m.cap for m in mbv2_small.modules() if isinstance(m, QuantAct)} == {6.0}
    cfg = QuantConfig(activation=SiteConfig(bits=8), input_shape=(1, 2, 2))  # q_max0 = 31.875
    six = quantize_model(_tiny(nn.Conv2d(1, 1, 1), nn.ReLU6()), cfg)[1]
    plain = quantize_model(_tiny(nn.Conv2d(1, 1, 1), nn.ReLU()), cfg)[1]
    x = torch.tensor([-1.0, 3.0, 7.0, 100.0])
    assert six(x).tolist() == [0.0, 3.0, 6.0, 6.0]
    assert plain(x).tolist() == [0.0, 3.0, 7.0, 31.875]
    assert isinstance(six.to_float(), nn.ReLU6) and type(plain.to_float()) is nn.ReLU


# -- equivalence and gradients --------------------------------------------------------------------


@pytest.mark.parametrize("factory", [resnet20, lambda: mobilenet_v2(num_classes=10)],
                         ids=["resnet20", "mobilenet_v2"])  # fmt: skip
def test_to_float_reproduces_float_outputs(factory):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(2, 3, 32, 32)
    params = [id(p) for p in model.parameters()]
    with torch.no_grad():
        y_float = model(x)
        quantize_model(model, example_input=x[:1])
        y_quant = model(x)
        to_float(model)
        y_back = model(x)
    assert not torch.equal(y_quant, y_float)  # conversion did change the function
    assert torch.equal(y_back, y_float)
    assert [id(p) for p in model.parameters()] == params
    assert not any(isinstance(m, (QuantAct, QuantConv2d, QuantLinear)) for m in model.modules())


@pytest.mark.parametrize("which", ["r20", "mbv2_small"])
def test_every_quantizer_parameter_gets_a_gradient(which, request):
    model = request.getfixturevalue(which)
    torch.manual_seed(1)
    size = 32 if which == "r20" else 64
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 3])
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        F.cross_entropy(model(x), y).backward()
        missing = [(n, pn) for n, q in quantizers(model) for pn, p in q.named_parameters()
                   if p.grad is None or not torch.isfinite(p.grad).all()]  # fmt: skip
        assert not missing
        n_params = sum(1 for _ in quantizer_parameters(model))
        n_nonzero = sum(bool(p.grad != 0) for p in quantizer_parameters(model))
        assert n_nonzero > n_params // 2  # gradients are not just zeros
    finally:
        model.zero_grad(set_to_none=True)


# -- errors -------------------------------------------------------------------------------------


def test_unknown_parametrization_names_valid_choices():
    with pytest.raises(ConfigError, match=r"valid: \['b_d', 'b_qmax', 'd_qmax'\].*'d_qmax'"):
        SiteConfig(quantizer="uniform/d_xmax")
    with pytest.raises(ValueError, match="Did you mean 'uniform'"):
        SiteConfig(quantizer="unifrom/d_qmax")
    with pytest.raises(ConfigError, match="pow2/qmin_qmax"):
        SiteConfig(quantizer="d_qmax")
    with pytest.raises(ConfigError, match="bits"):
        SiteConfig(bits=0)


def test_pattern_matching_no_layer_is_an_error():
    for cfg in (QuantConfig(exclude=("layer9.*",)),
                QuantConfig(overrides=(LayerOverride("layer1.*.conv3"),))):  # fmt: skip
        with pytest.raises(ConfigError, match="matches no quantizable layer"):
            quantize_model(resnet20(), cfg)


def test_model_without_quantizable_layer_is_an_error():
    with pytest.raises(ValueError, match="no quantizable layer"):
        quantize_model(_tiny(nn.BatchNorm1d(3), nn.ReLU()), example_input=torch.zeros(2, 3))


def test_converting_twice_is_an_error(r20):
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(r20)
    partly = _tiny(nn.Conv2d(1, 2, 1), nn.ReLU())
    quantize_model(partly, example_input=torch.zeros(1, 1, 2, 2))
    partly.append(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(partly, example_input=torch.zeros(1, 1, 2, 2))


def test_missing_input_shape_is_an_error():
    with pytest.raises(ValueError, match="example_input"):
        quantize_model(_tiny(nn.Linear(3, 2)))


def test_yaml_config_and_unknown_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        "weight: {quantizer: uniform/d_qmax, bits: 2}\n"
        "overrides:\n  - pattern: 'layer1.*'\n    weight: {quantizer: pow2/qmin_qmax}\n"
        "exclude: [fc]\ninput_shape: [3, 32, 32]\n"
    )
    cfg = QuantConfig.from_yaml(good)
    assert cfg.weight.bits == 2 and cfg.exclude == ("fc",) and cfg.input_shape == (3, 32, 32)
    assert cfg.overrides == (LayerOverride("layer1.*", weight=SiteConfig("pow2/qmin_qmax")),)
    for text, hint in (("wieght: {bits: 2}\n", "'weight'"),
                       ("weight: {bitz: 2}\n", "'bits'"),
                       ("overrides:\n  - patern: 'fc'\n", "'pattern'")):  # fmt: skip
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=f"unknown config key.*Did you mean {hint}"):
            QuantConfig.from_yaml(bad)
