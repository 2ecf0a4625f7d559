"""The per-layer report: rows, totals against ``mixq.cost``, budget checks and renderers."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import torch
from torch import nn

from mixq.config import LayerOverride, QuantConfig, SiteConfig
from mixq.convert import quantize_model, quantizers
from mixq.cost import BITS_PER_KIB, Budget, activation_bits, float_weight_bits, weight_bits
from mixq.models import resnet20, smallcnn
from mixq.report import Report, report

# ResNet-20 MACs per sample, M_l * M_{l-1} * K^2 * N_l^2 (Table 2): stem, 3 stages of 6 convs
# (the first conv of stages 2 and 3 is strided and widens the channels), FC
R20_MACS = (16 * 3 * 9 * 32**2
            + 6 * 16 * 16 * 9 * 32**2
            + 32 * 16 * 9 * 16**2 + 5 * 32 * 32 * 9 * 16**2
            + 64 * 32 * 9 * 8**2 + 5 * 64 * 64 * 9 * 8**2
            + 10 * 64)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """ResNet-20: stage 3 pow-2 at 3 bits, one float activation site, the rest the default."""
    torch.manual_seed(0)
    cfg = QuantConfig(
        overrides=(LayerOverride("layer3.*", weight=SiteConfig("pow2/qmin_qmax", bits=3)),),
        exclude=("layer2.0.relu1",),
    )
    return quantize_model(resnet20(), cfg)


@pytest.fixture(scope="module")
def budget() -> Budget:
    return Budget.parse(weight="70KB", activation_sum="200KB")


@pytest.fixture(scope="module")
def rep(model, budget) -> Report:
    return report(model, budget)


def _kib(bits: torch.Tensor) -> float:
    return bits.detach().item() / BITS_PER_KIB


def test_rows_follow_the_quantizers(model, rep):
    assert [r.name for r in rep.layers] == [n for n, m in model.named_modules()
                                            if isinstance(m, (nn.Conv2d, nn.Linear))]  # fmt: skip
    assert len(rep.layers) == 20 and len(rep.activations) == 19
    conv = next(r for r in rep.layers if r.name == "layer1.0.conv1")
    q = model.layer1[0].conv1.weight_quantizer
    assert (conv.type, conv.quantizer, conv.bits) == ("conv", "uniform/d_qmax", q.bitwidth)
    assert (conv.d, conv.q_min, conv.q_max) == (q.step, None, q.q_max_effective)
    assert (conv.n_weights, conv.n_bias, conv.bias_bits) == (2304, 0, None)
    p2 = next(r for r in rep.layers if r.name == "layer3.1.conv2")
    q = model.layer3[1].conv2.weight_quantizer
    assert (p2.quantizer, p2.bits, p2.d) == ("pow2/qmin_qmax", 3, None)
    assert (p2.q_min, p2.q_max) == (q.q_min_effective, q.q_max_effective)
    fc = rep.layers[-1]
    assert (fc.name, fc.type, fc.n_bias, fc.bias_bits, fc.kib) == ("fc", "linear", 10, 4,
                                                                    650 * 4 / 8192)  # fmt: skip
    act = rep.activations[0]
    assert (act.name, act.numel, act.bits, act.d, act.q_max) == ("relu", 16384, 4, 2**-3, 1.875)
    flt = next(a for a in rep.activations if a.name == "layer2.0.relu1")
    assert (flt.quantizer, flt.bits, flt.kib, flt.d) == ("float", 32, 32.0, None)


def test_totals_equal_cost_model(model, rep):
    t = rep.totals
    assert t.weight_kib == pytest.approx(_kib(weight_bits(model)), rel=1e-12)
    assert t.activation_sum_kib == pytest.approx(_kib(activation_bits(model, "sum")), rel=1e-12)
    assert t.activation_max_kib == _kib(activation_bits(model, "max")) == 32.0
    assert t.activation_max_site == "layer2.0.relu1"
    assert t.weight_float_kib == float_weight_bits(model) / BITS_PER_KIB == 1048.2265625
    assert t.compression == pytest.approx(1048.2265625 / t.weight_kib)
    assert (t.activation_sum_float_kib, t.activation_max_float_kib) == (736.0, 64.0)


def test_float_totals_equal_a_float_model():
    """The report's float32 columns equal the cost of a model whose sites really are float."""
    torch.manual_seed(0)
    cfg = QuantConfig(weight=SiteConfig(quantizer="float"), activation=SiteConfig("float"))
    fl = quantize_model(resnet20(), cfg)
    t = report(fl).totals
    assert t.weight_kib == t.weight_float_kib == _kib(weight_bits(fl))
    assert t.activation_sum_kib == t.activation_sum_float_kib == _kib(activation_bits(fl, "sum"))
    assert t.activation_max_float_kib == _kib(activation_bits(fl, "max"))
    assert t.compression == 1.0


def test_macs_and_table2_ops(rep):
    assert rep.totals.macs == sum(r.macs for r in rep.layers) == R20_MACS == 40_551_040
    for r in rep.layers:
        if r.quantizer.startswith("pow2/"):
            assert (r.mul, r.add) == (0, 2 * r.macs), r.name
        else:
            assert r.mul == r.add == r.macs, r.name
    pow2_macs = sum(r.macs for r in rep.layers if r.name.startswith("layer3."))
    assert rep.totals.mul == R20_MACS - pow2_macs
    assert rep.totals.add == R20_MACS + pow2_macs


def test_layer_types():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=8),
                        nn.Conv2d(8, 8, 1, groups=2), nn.Flatten(), nn.Linear(8, 2))  # fmt: skip
    quantize_model(net, example_input=torch.zeros(1, 4, 3, 3))
    assert [r.type for r in report(net).layers] == ["conv", "dwconv", "gconv", "linear"]


def test_budget_rows(model, budget, rep):
    assert [(b.constraint, b.met) for b in rep.budget] == list(budget.satisfied(model).items())
    assert [(b.constraint, b.met) for b in rep.budget] == [("weight", False),
                                                          ("activation_sum", True)]  # fmt: skip
    w = rep.budget[0]
    assert (w.size_kib, w.target_kib) == (rep.totals.weight_kib, 70.0)
    assert report(model).budget == [] and report(model, Budget()).budget == []


def test_first_last_and_float_sites(rep):
    assert (rep.first_layer, rep.last_layer) == ("conv1", "fc")
    assert rep.layers[0].first and rep.layers[-1].last
    assert sum(r.first or r.last for r in rep.layers) == 2
    assert rep.float_sites == ["layer2.0.relu1"]
    notes = "\n".join(rep.notes)
    assert "first layer: conv1 is quantized" in notes and "last layer: fc is quantized" in notes
    torch.manual_seed(0)
    m = quantize_model(resnet20(), QuantConfig(exclude=("conv1", "layer3.2.relu2")))
    r = report(m)
    assert r.float_sites == ["conv1", "layer3.2.relu2"]
    assert "first layer: conv1 is float (NOT quantized)" in "\n".join(r.notes)
    assert r.layers[0].kib == 432 * 32 / 8192


def test_report_of_an_unconverted_model():
    r = report(smallcnn())
    assert {x.quantizer for x in r.layers} == {"float"} and r.activations == []
    assert r.totals.compression == 1.0
    assert r.layers[0].macs is None and r.layers[-1].macs == r.layers[-1].n_weights  # FC: no shape
    assert (r.totals.macs, r.totals.mul, r.totals.add) == (None, None, None)
    assert "conv1" in r.to_text()


def test_text_lists_every_layer_and_site(rep):
    text = rep.to_text()
    for name in [r.name for r in rep.layers] + [a.name for a in rep.activations]:
        assert name in text, name
    for word in ("Totals", "compression", "NOT MET", "met", "[first]", "[last]", "40,551,040",
                 "1048.23", "pow2/qmin_qmax"):  # fmt: skip
        assert word in text, word
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("layer "))
    width = len(lines[header])
    assert all(len(line) == width for line in lines[header + 1 : header + 22])  # aligned


def test_json_round_trips(rep):
    data = json.loads(rep.to_json())
    assert data == rep.to_dict()
    assert list(data) == ["layers", "activations", "totals", "budget", "first_layer",
                          "last_layer", "float_sites", "notes", "uncounted",
                          "activation_sites"]  # fmt: skip
    assert data["totals"]["weight_kib"] == rep.totals.weight_kib
    assert [x["name"] for x in data["layers"]][:2] == ["conv1", "layer1.0.conv1"]
    assert data["activations"][7]["quantizer"] == "float"


def test_csv_has_header_and_one_row_per_layer_and_site(rep):
    rows = list(csv.reader(io.StringIO(rep.to_csv())))
    assert rows[0][:5] == ["section", "name", "type", "quantizer", "bits"]
    body = rows[1:]
    assert len(body) == 20 + 19 + 2 + 1  # layers, sites, not counted (input, avgpool), peak
    names = [x.name for x in rep.layers] + [a.name for a in rep.activations]
    assert [r[1] for r in body] == [*names, "input", "avgpool", rep.totals.activation_peak_at]
    assert [r[0] for r in body[-3:]] == ["uncounted", "uncounted", "peak"]
    assert sum(r[0] == "layer" for r in body) == 20
    by_name = {r[1]: dict(zip(rows[0], r, strict=True)) for r in body if r[0] != "peak"}
    assert by_name["fc"]["numel"] == "650" and by_name["layer2.0.relu1"]["bits"] == "32"


def test_plot_writes_png(rep, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (pip install 'mixq[plot]')")
    path = rep.plot(tmp_path / "bits.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_plot_without_matplotlib_says_how_to_install(rep, tmp_path, monkeypatch):
    for name in [k for k in sys.modules if k == "matplotlib" or k.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'mixq\[plot\]'"):
        rep.plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_bitwidths_track_the_quantizers(model):
    """Changing a quantizer changes the report (the rows are not cached)."""
    q = model.fc.weight_quantizer
    saved = {k: v.clone() for k, v in q.state_dict().items()}
    try:
        with torch.no_grad():
            q.q_max.fill_(q.step * 31)  # k = 31 levels: 6 bits signed
        assert report(model).layers[-1].bits == 6 == dict(quantizers(model))[
            "fc.weight_quantizer"].bitwidth  # fmt: skip
    finally:
        q.load_state_dict(saved)
