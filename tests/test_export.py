"""Export: bit-packed files (bit-exact reload, size = the memory model), ONNX run by
onnxruntime and QONNX run by the qonnx executor (both through PyTorch's exporter), batch-norm
folding on any exportable model, errors, and the CLI command."""

from __future__ import annotations

import argparse
import json
import struct
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixq.config import LayerOverride, QuantConfig, SiteConfig
from mixq.convert import quantize_model, quantizers
from mixq.cost import weight_bits
from mixq.export import (
    ExportError,
    ExportWarning,
    PackedFormatError,
    export,
    fold_bn,
    format_fold_report,
    load_packed,
    read_metadata,
    read_packed,
)
from mixq.export.bitpack import code_range, unpack_bits
from mixq.layers import QuantAct, QuantLinear
from mixq.models import mobilenet_v2, resnet20, smallcnn
from mixq.quant import Pow2Quantizer, UniformQuantizer
from zoo import SHAPES as ZOO_SHAPES
from zoo import Functional

try:  # the ONNX tests need the optional extra mixq[onnx]; the packed format does not
    import onnx
    import onnxruntime as ort
except ImportError:  # pragma: no cover - depends on the environment
    onnx = ort = None
needs_onnx = pytest.mark.skipif(onnx is None, reason="needs pip install 'mixq[onnx]'")


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def _r20(spec: str, overrides=()) -> nn.Module:
    cfg = QuantConfig(weight=SiteConfig(spec), activation=SiteConfig(spec), overrides=overrides)
    m = _randomize_bn(quantize_model(resnet20(), cfg))
    m.mixq_arch = {"name": "resnet20", "kwargs": {"num_classes": 10}}
    return m


MIXED = tuple(
    LayerOverride(p, weight=SiteConfig(bits=b), activation=SiteConfig(bits=b))
    for p, b in (("layer1.*", 2), ("layer2.*", 3), ("layer3.0.*", 5), ("layer3.1.*", 7))
)


@pytest.fixture(scope="module")
def r20_mixed():
    return _r20("uniform/d_qmax", MIXED)


@pytest.fixture(scope="module")
def r20_pow2():
    return _r20("pow2/qmin_qmax")


@pytest.fixture(scope="module")
def mbv2():
    cfg = QuantConfig(input_shape=(3, 32, 32))
    return _randomize_bn(quantize_model(mobilenet_v2(num_classes=10, width_mult=0.25), cfg))


def _x(*shape, grid: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    return torch.round(x * 8) / 8 if grid else x


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# -- packed ------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["r20_mixed", "r20_pow2"])
def test_packed_reload_is_bit_exact(which, request, tmp_path):
    model = request.getfixturevalue(which)
    res = export(model, tmp_path / "m.mxq")
    loaded = load_packed(tmp_path / "m.mxq")
    assert _same(model, loaded, _x(4, 3, 32, 32))
    assert float(weight_bits(loaded).detach()) == res.weight_bits
    assert res.weight_bits == float(weight_bits(model).detach())
    assert [q.bitwidth for _, q in quantizers(loaded)] == [q.bitwidth for _, q in quantizers(model)]
    assert {m.numel for m in loaded.modules() if isinstance(m, QuantAct)} != {None}


def test_mixed_bitwidths_are_what_the_test_wants(r20_mixed):
    bits = {q.bitwidth for n, q in quantizers(r20_mixed) if n.endswith("weight_quantizer")}
    assert {2, 3, 5, 7} <= bits


@pytest.mark.parametrize("which", ["r20_mixed", "r20_pow2"])
def test_payload_is_the_weight_memory_and_codes_fit(which, request, tmp_path):
    model = request.getfixturevalue(which)
    res = export(model, tmp_path / "m.mxq")
    manifest, payload = read_packed(tmp_path / "m.mxq")
    packed = [e for e in manifest["tensors"] if e["storage"] == "packed"]
    n_bits = [(int(np.prod(e["shape"])), e["bits"]) for e in packed]
    assert (
        res.quantized_bytes == manifest["quantized_bytes"] == sum(-(-n * b // 8) for n, b in n_bits)
    )
    wb = float(weight_bits(model).detach())
    assert sum(n * b for n, b in n_bits) == wb  # every weight and bias is quantized here
    assert wb / 8 <= res.quantized_bytes <= wb / 8 + len(packed)
    assert res.file_bytes < 1.2 * res.quantized_bytes + 16_000  # BN floats + manifest only
    for e in packed:
        assert e["bits"] == e["declared_bitwidth"] and not e["widened"]
        signed = e["encoding"] == "twos_complement"
        n = int(np.prod(e["shape"]))
        chunk = payload[e["offset"] : e["offset"] + e["nbytes"]]
        codes = unpack_bits(chunk, n, e["bits"], signed)
        lo, hi = code_range(e["bits"], signed)
        assert lo <= codes.min() and codes.max() <= hi
        if e["kind"] == "uniform":
            assert np.abs(codes).max() <= e["k"]
        else:
            assert (codes & ((1 << e["m_bits"]) - 1)).max() <= e["L"]


@pytest.mark.parametrize("mode", ["relu", "inputs"])
@pytest.mark.parametrize("cls", list(ZOO_SHAPES), ids=lambda c: c.__name__)
def test_packed_reload_keeps_every_activation_site(cls, mode, tmp_path):
    """Functional ReLUs quantized at their reader, ``QuantOut`` sites and shared input
    quantizers come back: same outputs bit for bit, same site table and memory."""
    from mixq.cost import activation_bits
    from mixq.layers import QuantOut, input_quantizer
    from mixq.sites import table_of

    torch.manual_seed(3)
    x = torch.randn(2, *ZOO_SHAPES[cls])
    model = quantize_model(cls(), QuantConfig(activation_sites=mode), example_input=x[:1]).eval()
    g = torch.Generator().manual_seed(4)
    for _, q in quantizers(model):  # away from the initial values, so a default would differ
        for p in q.parameters():
            p.data.mul_(0.7 + 0.6 * torch.rand((), generator=g))
        q.constrain_()
    export(model, tmp_path / "m.mxq", example_input=x[:1])
    loaded = load_packed(tmp_path / "m.mxq", model=cls())
    assert _same(model, loaded, x)
    readers = [n for n, m in model.named_modules() if input_quantizer(m) is not None]
    assert readers == [n for n, m in loaded.named_modules() if input_quantizer(m) is not None]
    outs = [n for n, m in model.named_modules() if isinstance(m, QuantOut)]
    assert outs == [n for n, m in loaded.named_modules() if isinstance(m, QuantOut)]
    assert (mode == "inputs" or cls is Functional) == bool(readers or outs)
    groups = {id(input_quantizer(loaded.get_submodule(n))) for n in readers}
    assert len(groups) == len({id(input_quantizer(model.get_submodule(n))) for n in readers})
    old, new = table_of(model), table_of(loaded)
    assert [(s.name, s.numel, s.counted) for s in old.sites] == [
        (s.name, s.numel, s.counted) for s in new.sites
    ]
    assert [s.quantizer.bitwidth if s.quantizer else None for s in old.sites] == [
        s.quantizer.bitwidth if s.quantizer else None for s in new.sites
    ]
    for how in ("sum", "max", "peak"):
        assert activation_bits(model, how).item() == activation_bits(loaded, how).item()


def test_b_qmax_overflow_is_stored_with_one_more_bit(tmp_path):
    model = _r20("uniform/b_qmax")
    q = model.conv1.weight_quantizer
    q.q_max.data.fill_(0.95)  # d = pow2round(0.95 / 7) = 0.125, k = round(7.6) = 8 = 2^(4-1)
    model.conv1.weight.data[0, 0, 0, 0] = 2.0
    assert (q.bitwidth, q.levels) == (4, 8)
    with pytest.warns(ExportWarning, match="need 5 bits"):
        export(model, tmp_path / "m.mxq")
    entry = next(
        e for e in read_packed(tmp_path / "m.mxq")[0]["tensors"] if e["name"] == "conv1.weight"
    )
    assert (entry["bits"], entry["declared_bitwidth"], entry["widened"]) == (5, 4, True)
    assert _same(model, load_packed(tmp_path / "m.mxq"), _x(2, 3, 32, 32))


def test_skeletons_float_or_quantized(r20_mixed, tmp_path):
    model = _r20("uniform/d_qmax", MIXED)
    del model.mixq_arch
    export(model, tmp_path / "m.mxq")
    with pytest.raises(PackedFormatError, match="model=skeleton"):
        load_packed(tmp_path / "m.mxq")
    x = _x(2, 3, 32, 32)
    assert _same(model, load_packed(tmp_path / "m.mxq", model=resnet20()), x)
    assert _same(model, load_packed(tmp_path / "m.mxq", model=quantize_model(resnet20())), x)
    with pytest.raises(PackedFormatError, match="skeleton"):
        load_packed(tmp_path / "m.mxq", model=mobilenet_v2(num_classes=10))


def _rewrite(path, manifest, payload, flags=1, version=1):
    blob = json.dumps(manifest).encode()
    blob = zlib.compress(blob) if flags else blob
    path.write_bytes(struct.pack("<8sIIQ", b"MIXQPACK", version, flags, len(blob)) + blob + payload)


def test_packed_errors(r20_pow2, tmp_path):
    with pytest.raises(ExportError, match="float model"):
        export(resnet20(), tmp_path / "f.mxq")
    with pytest.raises(ExportError, match="unknown export format"):
        export(r20_pow2, tmp_path / "f.x", "tflite")
    path = tmp_path / "m.mxq"
    export(r20_pow2, path)
    data = path.read_bytes()
    manifest, payload = read_packed(path)
    cases = {
        "truncated": data[: len(data) - 100],
        "not a mixq-packed": b"PK\x03\x04" + data[4:],
        "checksum mismatch": data[:-10] + bytes([data[-10] ^ 1]) + data[-9:],
        "corrupt manifest": data[:30] + b"\x00\x01" + data[32:],
        "trailing": data + b"\x00",
    }
    for match, blob in cases.items():
        path.write_bytes(blob)
        with pytest.raises(PackedFormatError, match=match):
            load_packed(path)
    _rewrite(path, {**manifest, "format": "other"}, payload)
    with pytest.raises(PackedFormatError, match="unknown format 'other'"):
        read_packed(path)
    _rewrite(path, manifest, payload, version=2)
    with pytest.raises(PackedFormatError, match="version 2"):
        read_packed(path)
    bad = {
        **manifest,
        "tensors": [{**manifest["tensors"][0], "nbytes": 3}, *manifest["tensors"][1:]],
    }
    _rewrite(path, bad, payload, flags=0)  # an uncompressed manifest is read too
    with pytest.raises(PackedFormatError, match="corrupt tensor entry"):
        load_packed(path)


# -- ONNX and QONNX (PyTorch's exporter) ------------------------------------------------------
class Hand(nn.Module):
    """Features of public code that the old fx translator could not export: padding="same",
    tuple unpacking of chunk (not fx-traceable), SiLU/GELU/sigmoid/tanh, clamp, transpose,
    unsqueeze, mean, x.view(x.size(0), -1), LayerNorm + Linear, residual add, cat."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding="same"), nn.BatchNorm2d(8)
        self.r1 = nn.ReLU()
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.r2, self.silu, self.sig, self.gelu = nn.ReLU6(), nn.SiLU(), nn.Sigmoid(), nn.GELU()
        self.fc1, self.ln, self.fc2 = nn.Linear(4 * 8 * 8, 16), nn.LayerNorm(16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r1(self.bn1(self.c1(x)))
        a, b = self.r2(self.bn2(self.c2(x))).chunk(2, dim=1)
        x = torch.cat([self.silu(a) * self.sig(b), F.gelu(a).clamp(-1, 1)], 1) + x
        x = F.max_pool2d(x, 2).transpose(2, 3).mean(1, keepdim=True).unsqueeze(1).squeeze(1)
        x = torch.cat([x, torch.tanh(x), F.silu(x), torch.sigmoid(x)], 1)
        x = x.view(x.size(0), -1)
        return self.fc2(self.gelu(self.ln(self.fc1(x))))


class InputSite(nn.Module):
    """A quantizer on a layer *input* (signed, not after a ReLU) of a kind export/ never names:
    the exporter must emit it from the quantizer alone. The float identity-like fc passes the
    site's output through unchanged."""

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        fc = nn.Linear(12, 5, bias=False)
        fc.weight.data = torch.eye(5, 12)
        self.q, self.fc = q, QuantLinear.from_float(fc, None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.q(x))


def _hand(spec: str) -> nn.Module:
    cfg = QuantConfig(input_shape=(3, 16, 16), weight=SiteConfig(spec), activation=SiteConfig(spec))
    return _randomize_bn(quantize_model(Hand(), cfg))


def _ort(path, x: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _qonnx_run(path, x: torch.Tensor) -> np.ndarray:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    mw = ModelWrapper(str(path))
    i, o = mw.graph.input[0].name, mw.graph.output[0].name
    return np.concatenate([execute_onnx(mw, {i: x[k : k + 1].numpy()})[o] for k in range(len(x))])


def _meta(proto) -> dict:
    return read_metadata(proto)


def check_parity(model: nn.Module, out: np.ndarray, x: torch.Tensor) -> None:
    """Argmax agreement 100% and outputs equal up to float rounding (an activation whose
    pre-activation differs by an ulp can land one step away: allow a few steps' worth)."""
    with torch.no_grad():
        y = model(x).numpy()
    assert out.shape == y.shape
    np.testing.assert_array_equal(out.argmax(1), y.argmax(1))
    assert np.abs(out - y).max() <= 0.02 * np.abs(y).max()


def _act_quantizers(model: nn.Module) -> dict[str, int]:
    wq = {id(getattr(m, a)) for m in model.modules() for a in ("weight_quantizer", "bias_quantizer")
          if getattr(m, a, None) is not None}  # fmt: skip
    return {n: q.bitwidth for n, q in quantizers(model) if id(q) not in wq}


@needs_onnx
@pytest.mark.parametrize("which", ["r20_mixed", "r20_pow2", "mbv2", "smallcnn"])
def test_onnxruntime_parity_on_the_zoo(which, request, tmp_path):
    if which == "smallcnn":
        cfg = QuantConfig(input_shape=(3, 32, 32))
        model = _randomize_bn(quantize_model(smallcnn(in_channels=3), cfg))
    else:
        model = request.getfixturevalue(which)
    x = _x(3, 3, 32, 32)  # batch 3: the file's batch dimension is symbolic
    res = export(model, tmp_path / "m.onnx", "onnx", example_input=x[:1])
    proto = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    check_parity(model, _ort(tmp_path / "m.onnx", x), x)
    tensors = _meta(proto)["mixq.tensors"]
    width = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8}
    for name, t in tensors.items():  # stored in the narrowest ONNX integer type that fits
        assert width[t["storage"]] == (4 if t["bits"] <= 4 else 8), name
    # every activation quantizer is in the file with its learned bitwidth
    acts = _act_quantizers(model)
    assert {k: v["bitwidth"] for k, v in _meta(proto)["mixq.activations"].items()} \
        == acts  # fmt: skip
    nodes = {p.value: n for n in proto.graph.node for p in n.metadata_props
             if p.key == "mixq.activation"}  # fmt: skip
    if which != "r20_pow2":  # uniform activations: one QuantizeLinear each
        assert set(nodes) == set(acts)
        for name, n in nodes.items():
            assert n.op_type == "QuantizeLinear"
            assert {p.key: p.value for p in n.metadata_props}["mixq.bitwidth"] == str(acts[name])
    if which == "r20_mixed":  # no float copy of a quantized weight: file ~ integer payload
        stored = sum(p.numel() * width[tensors[n]["storage"]] for n, p in model.named_parameters()
                     if n in tensors) / 8  # fmt: skip
        assert stored < res.file_bytes < stored + 50_000  # + float BNs (14 KB), graph, metadata


@needs_onnx
@pytest.mark.parametrize("cls", list(ZOO_SHAPES), ids=lambda c: c.__name__)
def test_onnx_of_every_site_equals_the_model(cls, tmp_path):
    """``activation_sites="inputs"``: layer-input quantizers and ``QuantOut`` sites are in the
    ONNX file (one node each, with its bitwidth), and ``ties="away"`` gives mixq's outputs."""
    torch.manual_seed(5)
    x = torch.randn(3, *ZOO_SHAPES[cls])
    model = quantize_model(cls(), QuantConfig(activation_sites="inputs"), example_input=x[:1])
    model.eval()
    export(model, tmp_path / "m.onnx", "onnx", example_input=x[:1], ties="away")
    proto = onnx.load(tmp_path / "m.onnx")
    with torch.no_grad():
        assert np.array_equal(_ort(tmp_path / "m.onnx", x), model(x).numpy())
    acts = _act_quantizers(model)
    assert {k: v["bitwidth"] for k, v in _meta(proto)["mixq.activations"].items()} \
        == acts  # fmt: skip


class SignedHead(nn.Module):
    """A signed activation (hard-swish, tanh) flattened into a classifier, as MobileNetV3."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(3, 8, 3), act, nn.Linear(8 * 36, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1).unsqueeze(1).transpose(1, 2)[..., 0])


@needs_onnx
@pytest.mark.parametrize("opset", [18, 21, 25])
@pytest.mark.parametrize("act", [nn.Hardswish, nn.Tanh, nn.ReLU6])
def test_signed_activation_before_a_view_runs_in_onnxruntime(act, opset, tmp_path):
    """onnxruntime's QDQ propagation breaks ``DequantizeLinear(INT8) -> Reshape`` (opset >= 21):
    the exporter puts the pair after the views, and the file loads with every optimization."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    model = quantize_model(SignedHead(act()), QuantConfig(activation_sites="inputs"),
                           example_input=x[:1]).eval()  # fmt: skip
    export(model, tmp_path / "m.onnx", "onnx", example_input=x[:1], ties="away", opset=opset)
    proto = onnx.load(tmp_path / "m.onnx")
    producer = {o: n for n in proto.graph.node for o in n.output}
    views = [n for n in proto.graph.node if n.op_type in ("Reshape", "Flatten", "Transpose",
                                                             "Squeeze", "Unsqueeze")]  # fmt: skip
    assert views and all(producer[v.input[0]].op_type != "DequantizeLinear" for v in views)
    with torch.no_grad():  # _ort: onnxruntime's default session, ORT_ENABLE_ALL
        assert np.array_equal(_ort(tmp_path / "m.onnx", x), model(x).numpy())


@needs_onnx
def test_folded_onnx_with_exact_ties_equals_folded_model(r20_mixed, tmp_path):
    folded, report = fold_bn(r20_mixed)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(r.bitwidth_old == r.bitwidth_new for r in report) and len(report) == 19
    assert "conv1" in format_fold_report(report)
    x = _x(2, 3, 32, 32, grid=True)  # on a grid: every sum is exact, so ties are real ties
    export(folded, tmp_path / "f.onnx", "onnx", ties="away")
    with torch.no_grad():
        np.testing.assert_array_equal(_ort(tmp_path / "f.onnx", x), folded(x).numpy())
    export(r20_mixed, tmp_path / "f.mxq", fold_bn=True)
    assert _same(folded, load_packed(tmp_path / "f.mxq"), x)


@needs_onnx
@pytest.mark.parametrize("spec", ["uniform/d_qmax", "pow2/qmin_qmax"])
def test_hand_model_onnx_qonnx_and_folding(spec, tmp_path):
    model = _hand(spec)
    with pytest.raises(Exception, match=r"control flow|cannot be iterated|Proxy"):
        torch.fx.symbolic_trace(model)  # the old translator's capture fails
    x = _x(3, 3, 16, 16)
    export(model, tmp_path / "h.onnx", "onnx", example_input=x[:1])
    check_parity(model, _ort(tmp_path / "h.onnx", x), x)
    folded, report = fold_bn(model, example_input=x[:1])  # the same per-layer report
    assert [(r.conv, r.bn) for r in report] == [("c1", "bn1"), ("c2", "bn2")]
    assert all(r.bitwidth_old == r.bitwidth_new for r in report)
    with torch.no_grad():
        y, yf = model(x), folded(x)
    assert (y.argmax(1) == yf.argmax(1)).float().mean() >= 2 / 3
    pytest.importorskip("qonnx", reason="the qonnx executor is in the optional 'qonnx' extra")
    export(model, tmp_path / "h.qonnx", "qonnx", example_input=x[:1])
    check_parity(model, _qonnx_run(tmp_path / "h.qonnx", x), x)


@needs_onnx
@pytest.mark.parametrize("q", [UniformQuantizer("d_qmax", signed=True, d=0.25, q_max=1.5),
                               UniformQuantizer("d_qmax", signed=False, d=2**-8, q_max=3.0),
                               Pow2Quantizer("qmin_qmax", signed=True, q_min=0.125, q_max=2.0)],
                         ids=["uniform", "uniform-10bit", "pow2"])  # fmt: skip
def test_any_quantizer_site_is_exported_exactly(q, tmp_path):
    model = InputSite(q).eval()
    x = _x(64, 12) * 2  # crosses every level, both signs, and clips
    x[0, :8] = torch.tensor([0.125, -0.375, 0.625, 1.375, -1.375, 0.0, 2.9, -3.1])  # ties, clip
    # pow-2 decision thresholds q_min 2^(j - 1/2) and the float32 values on either side
    thr = np.float32([0.125 * 2 ** (j - 0.5) for j in range(5)])
    near = np.concatenate([thr, np.nextafter(thr, np.inf), np.nextafter(thr, -np.inf)])
    x[1:4, :5] = torch.from_numpy(near.reshape(3, 5))
    x[4:7, :5] = -torch.from_numpy(near.reshape(3, 5))
    export(model, tmp_path / "s.onnx", "onnx", example_input=x[:1], ties="away")
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_array_equal(_ort(tmp_path / "s.onnx", x), ref)
    proto = onnx.load(tmp_path / "s.onnx")
    assert list(_meta(proto)["mixq.activations"]) == ["q"]
    if q.kind == "uniform":  # signed 3-bit codes: INT8; unsigned 10-bit (768 levels): UINT16
        (n,) = (n for n in proto.graph.node if n.op_type == "QuantizeLinear")
        zp = next(i for i in proto.graph.initializer if i.name == n.input[2])
        tp = onnx.TensorProto
        assert zp.data_type == (tp.INT8 if q.signed else tp.UINT16)


@needs_onnx
def test_qonnx_structure_executor_and_fixed_batch(tmp_path):
    from mixq.export.qonnx_export import QONNX_DOMAIN, quant_to_standard_onnx

    cfg = QuantConfig(input_shape=(3, 16, 16))
    model = _randomize_bn(quantize_model(smallcnn(in_channels=3), cfg))
    x = _x(2, 3, 16, 16)
    export(model, tmp_path / "m.qonnx", "qonnx", example_input=x[:1])
    proto = onnx.load(tmp_path / "m.qonnx")
    onnx.checker.check_model(proto)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # fixed: qonnx
    quant = [n for n in proto.graph.node if n.op_type == "Quant"]
    assert all(n.domain == QONNX_DOMAIN and len(n.input) == 4 for n in quant)
    assert len(quant) == sum(1 for _ in quantizers(model))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    w = next(n for n in quant if any(p.key == "mixq.tensor" for p in n.metadata_props))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in w.attribute}
    assert attrs == {"signed": 1, "narrow": 1, "rounding_mode": b"ROUND"}
    assert float(inits[w.input[3]]) == model.conv1.weight_quantizer.bitwidth
    # the float values initializer carries the tensor's name, not a constant the node also reads
    name = {p.key: p.value for p in w.metadata_props}["mixq.tensor"]
    assert w.input[0] == name and inits[name].shape == model.get_parameter(name).shape
    lowered = tmp_path / "lowered.onnx"
    lowered.write_bytes(quant_to_standard_onnx(proto).SerializeToString())
    check_parity(model, np.concatenate([_ort(lowered, x[k : k + 1]) for k in range(2)]), x)
    export(model, tmp_path / "b.onnx", "onnx", example_input=x[:1], batch=2)
    proto = onnx.load(tmp_path / "b.onnx")
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    check_parity(model, _ort(tmp_path / "b.onnx", x), x)
    pytest.importorskip("qonnx", reason="the qonnx executor is in the optional 'qonnx' extra")
    check_parity(model, _qonnx_run(tmp_path / "m.qonnx", x), x)


@needs_onnx
@pytest.mark.parametrize("which", ["4bit", "2bit"])
def test_file_size_is_the_report(which, tmp_path):
    """More than 100 KB of 4-bit weights (2-bit at opset 25): the ONNX file is at most 1.15x
    the report; 2-bit tensors are stored as INT2 from opset 25, as INT4 before."""
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 128), nn.ReLU(),
                        nn.Linear(128, 10))  # fmt: skip
    bits, opset = (4, 21) if which == "4bit" else (2, 25)
    cfg = QuantConfig(input_shape=(784,), weight=SiteConfig(bits=bits))
    model = quantize_model(mlp, cfg).eval()
    res = export(model, tmp_path / "m.onnx", "onnx", example_input=_x(1, 784), ties="away",
                 opset=opset)  # fmt: skip
    report = res.weight_bits / 8
    assert report > 50_000 and res.file_bytes <= 1.15 * report, (res.file_bytes, report)
    tensors = _meta(onnx.load(tmp_path / "m.onnx"))["mixq.tensors"]
    want = {(2, 25): "INT2", (4, 21): "INT4"}[(bits, opset)]
    assert {t["storage"] for n, t in tensors.items() if n.endswith("weight")} == {want}
    x = _x(4, 784, grid=True)  # exact sums: ORT equals PyTorch bit for bit with ties="away"
    with torch.no_grad():
        np.testing.assert_array_equal(_ort(tmp_path / "m.onnx", x), model(x).numpy())


@needs_onnx
@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "folded"])
def test_resnet20_file_size_is_the_report(fold, tmp_path):
    """ResNet-20 at 4 bits (134 KB of weights): the graph and metadata stay within the 15%
    (node names dropped, values renamed, metadata as tables); unfolded, its float batch norms
    (not quantized weights, not in the report) come on top."""
    model = _r20("uniform/d_qmax")
    x = _x(3, 3, 32, 32)
    res = export(model, tmp_path / "m.onnx", "onnx", fold_bn=fold, example_input=x[:1])
    proto = onnx.load(tmp_path / "m.onnx")
    report = res.weight_bits / 8
    float_bytes = sum(i.ByteSize() for i in proto.graph.initializer
                      if i.data_type == onnx.TensorProto.FLOAT)  # fmt: skip
    assert report > 100_000 and res.file_bytes - float_bytes <= 1.15 * report
    if fold:
        assert res.file_bytes <= 1.15 * report, (res.file_bytes, report)
    else:
        assert float_bytes > 8_000  # the 688 batch-norm channels, 3 vectors each at least
    names = {i.name for i in proto.graph.initializer}
    tensors = _meta(proto)["mixq.tensors"]
    assert "layer1.0.conv1.weight" in tensors and "layer1.0.conv1.weight" in names
    assert all(n.name == "" for n in proto.graph.node)
    if not fold:  # folded parity (its ties) is test_hand_model_onnx_qonnx_and_folding's
        check_parity(model, _ort(tmp_path / "m.onnx", x), x)


def test_metadata_tables_round_trip():
    from mixq.export.onnx_export import TABLE_KEYS, _tables

    class Proto:  # the two fields read_metadata reads
        def __init__(self, props):
            self.metadata_props = [type("P", (), {"key": k, "value": v}) for k, v in props]

    recs = {"a": {"kind": "uniform", "d": 0.5, "bit_set": None}, "b": {"kind": "pow2", "L": 3},
            "c": {"kind": "uniform", "d": 0.25, "bit_set": [4, 8]}}
    props = [(k, json.dumps(_tables(recs))) for k in TABLE_KEYS] + [("mixq.ties", "away")]
    out = read_metadata(Proto(props))
    assert out["mixq.tensors"] == recs and out["mixq.activations"] == recs
    assert out["mixq.ties"] == "away"
    assert len(_tables(recs)) == 2  # one table per set of fields


@needs_onnx
def test_logit_scale_hook_is_exported(tmp_path):
    from mixq.train.build import add_logit_scale

    model = add_logit_scale(_r20("uniform/d_qmax"))
    model.logit_scale.data.fill_(2.5)
    x = _x(2, 3, 32, 32)
    export(model, tmp_path / "m.mxq")
    assert _same(model, load_packed(tmp_path / "m.mxq"), x)
    export(model, tmp_path / "m.onnx", "onnx")
    check_parity(model, _ort(tmp_path / "m.onnx", x), x)


@needs_onnx
def test_older_opset_uses_int8(tmp_path):
    cfg = QuantConfig(input_shape=(3, 16, 16))
    model = _randomize_bn(quantize_model(smallcnn(in_channels=3), cfg))
    x = _x(2, 3, 16, 16)
    outs = []
    for opset in (18, 21):
        export(model, tmp_path / "m.onnx", "onnx", opset=opset, example_input=x[:1])
        proto = onnx.load(tmp_path / "m.onnx")
        storage = {t["storage"] for t in _meta(proto)["mixq.tensors"].values()}
        assert storage == ({"INT4"} if opset == 21 else {"INT8"})
        outs.append(_ort(tmp_path / "m.onnx", x))
    np.testing.assert_array_equal(*outs)


class _Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.r = nn.Conv2d(3, 4, 3), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.r(self.c(x))
        if y.sum() > 0:  # data-dependent control flow
            return y * 2
        return y


class _Eig(_Branch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(self.r(self.c(x))[:, :, :4, :4]).real  # no ONNX op


@needs_onnx
def test_onnx_errors(r20_mixed, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="float model"):
        export(resnet20(), tmp_path / "f.onnx", "onnx")
    with pytest.raises(ValueError, match="ties"):
        export(r20_mixed, tmp_path / "f.onnx", "onnx", ties="up")
    with pytest.raises(ExportError, match="opset 13 is too old"):
        export(r20_mixed, tmp_path / "f.onnx", "onnx", opset=13)
    with pytest.raises(ExportError, match="batch=0"):
        export(r20_mixed, tmp_path / "f.onnx", "onnx", batch=0)
    x = _x(1, 3, 8, 8)
    branch = quantize_model(_Branch(), QuantConfig(input_shape=(3, 8, 8))).eval()
    msg = r"data-dependent.*test_export.py\", line \d+.*torch\.cond"
    with pytest.raises(ExportError, match=msg):
        export(branch, tmp_path / "f.onnx", "onnx", example_input=x)
    eig = quantize_model(_Eig(), QuantConfig(input_shape=(3, 8, 8))).eval()
    with pytest.raises(ExportError, match=r"aten\.linalg_eig.*test_export.py\", line \d+"):
        export(eig, tmp_path / "f.onnx", "onnx", example_input=x)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"mixq\[onnx\]"):
        export(r20_mixed, tmp_path / "f.onnx", "onnx")


@needs_onnx
def test_cli_export(tmp_path, capsys):
    from mixq.cli import export as export_cmd
    from mixq.train.build import build_model
    from mixq.train.checkpoint import save_checkpoint
    from mixq.train.config import TrainConfig

    cfg = TrainConfig.from_data({"model": {"name": "smallcnn", "kwargs": {"in_channels": 3}},
                                 "data": {"name": "synthetic"}, "quant": {}})  # fmt: skip
    model = build_model(cfg, input_shape=(3, 8, 8), num_classes=10, load_init=False)
    ckpt = tmp_path / "last.pt"
    save_checkpoint(ckpt, {"config": cfg.to_dict(), "model": model.state_dict(),
                           "input_shape": [3, 8, 8], "num_classes": 10})  # fmt: skip
    parser = argparse.ArgumentParser()
    export_cmd.add_parser(parser.add_subparsers())
    for fmt, extra in (("packed", []), ("onnx", []), ("onnx", ["--fold-bn", "--ties", "away"]),
                       ("qonnx", ["--batch", "4"])):  # fmt: skip
        out = tmp_path / f"m.{fmt}"
        args = parser.parse_args(["export", str(ckpt), "--format", fmt, "-o", str(out), *extra])
        assert args.func(args) == 0 and out.is_file()
        text = capsys.readouterr().out
        assert f"wrote {out}" in text and ("re-quantized" in text) == ("--fold-bn" in extra)
        size = out.stat().st_size
        assert f"file {size} bytes" in text and "report" in text  # side by side
        bn = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        note = f"{bn} batch-norm channels are stored as float32"
        assert (note in text) == (fmt == "onnx" and not extra) and bn > 0
    proto = onnx.load(tmp_path / "m.qonnx")
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    # folding gave conv2 and conv3 identical all-zero biases: PyTorch's optimizer merged them
    tensors = _meta(onnx.load(tmp_path / "m.onnx"))["mixq.tensors"]
    assert tensors["conv3.bias"].get("merged") or "storage" in tensors["conv3.bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same(model.eval(), load_packed(tmp_path / "m.packed"), _x(2, 3, 8, 8))


def test_a_failed_export_write_leaves_the_old_file(tmp_path, monkeypatch):
    """Exports are written atomically: a write that fails midway keeps the previous file and
    leaves no temporary file behind."""
    import mixq.export.files as files

    model = quantize_model(smallcnn(in_channels=3), QuantConfig(input_shape=(3, 8, 8))).eval()
    path = tmp_path / "m.mxq"
    export(model, path)
    before = path.read_bytes()

    def broken(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", broken)
    with torch.no_grad():
        model.conv1.weight.mul_(2)  # a different file, were it written
    with pytest.raises(OSError, match="No space"):
        export(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mxq"]
