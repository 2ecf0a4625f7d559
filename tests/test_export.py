"""Export: bit-packed files (bit-exact reload, size = the memory model), ONNX run by
onnxruntime, QONNX structure, batch-norm folding, errors, and the CLI command."""

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
    read_packed,
)
from mixq.export.bitpack import code_range, unpack_bits
from mixq.layers import QuantAct
from mixq.models import mobilenet_v2, resnet20

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
    cfg = QuantConfig(input_shape=(3, 64, 64))
    return _randomize_bn(quantize_model(mobilenet_v2(num_classes=10), cfg))


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


# -- ONNX --------------------------------------------------------------------------------------
def _session(proto, extra=()):
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for name in extra:
        proto.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _site_inputs(proto, sites):
    """The pre-activation tensor of each site: input 0 of the site's first node."""
    out = {}
    for node in proto.graph.node:
        for s in sites:
            rest = node.name[len(s) :]
            if (
                s not in out
                and node.name.startswith(s)
                and rest[:1] in "./"
                and rest[1:2].isalpha()
            ):
                out[s] = node.input[0]
    return out


def check_onnx_parity(model, proto, x, exact_sites=True):
    """Sites: ORT output == mixq quantizer of ORT's own pre-activation (bit for bit, or at most
    ties / Log-threshold cases); quantized weights exact; end to end close."""
    sites = {n: m for n, m in model.named_modules() if isinstance(m, QuantAct) and m.quantizer}
    pre = _site_inputs(proto, sites)
    weights = [
        f"{n}.weight" for n, m in model.named_modules() if getattr(m, "weight_quantizer", None)
    ]
    sess = _session(proto, [*pre.values(), *sites, *weights])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x.numpy()}), strict=True))
    mismatches, total = 0, 0
    with torch.no_grad():
        for s, m in sites.items():
            ref = m(torch.from_numpy(outs[pre[s]])).numpy()
            mismatches += int((ref != outs[s]).sum())
            total += ref.size
        for w in weights:
            mod = model.get_submodule(w[: -len(".weight")])
            np.testing.assert_array_equal(outs[w], mod.weight_quantizer(mod.weight).numpy())
        y = model(x).numpy()
    assert mismatches == 0 if exact_sites else mismatches <= 1e-5 * total
    scale = np.abs(y).max()
    assert np.abs(outs[names[0]] - y).max() <= 0.1 * scale
    return np.abs(outs[names[0]] - y).max() / scale


@needs_onnx
@pytest.mark.parametrize("which", ["r20_mixed", "r20_pow2", "mbv2"])
def test_onnxruntime_parity(which, request, tmp_path):
    model = request.getfixturevalue(which)
    x = _x(2, 3, 64, 64) if which == "mbv2" else _x(2, 3, 32, 32)
    res = export(model, tmp_path / "m.onnx", "onnx", example_input=x[:1])
    proto = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(proto, full_check=True)
    check_onnx_parity(model, proto, x, exact_sites=which == "r20_mixed")
    meta = {p.key: p.value for p in proto.metadata_props}
    tensors = json.loads(meta["mixq.tensors"])
    assert all(
        t["bits"] == t["declared_bitwidth"] for t in tensors.values() if "declared_bitwidth" in t
    )
    if which == "r20_mixed":  # integer initializers: 4 or 8 bits per weight, no float copy
        width = {"INT4": 4, "INT8": 8}
        assert {t["storage"] for t in tensors.values()} <= set(width)
        stored = sum(p.numel() * width[tensors[n]["storage"]] for n, p in model.named_parameters()
                     if n in tensors) / 8  # fmt: skip
        assert stored < res.file_bytes < stored + 60_000  # + BN floats, graph, metadata


@needs_onnx
def test_folded_onnx_with_exact_ties_equals_folded_model(r20_mixed, tmp_path):
    folded, report = fold_bn(r20_mixed)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(r.bitwidth_old == r.bitwidth_new for r in report) and len(report) == 19
    assert "conv1" in format_fold_report(report)
    x = _x(2, 3, 32, 32, grid=True)  # on a grid: every sum is exact, so ties are real ties
    export(r20_mixed, tmp_path / "f.onnx", "onnx", fold_bn=True, ties="away")
    sess = _session(onnx.load(tmp_path / "f.onnx"))
    with torch.no_grad():
        np.testing.assert_array_equal(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0],
                                      folded(x).numpy())  # fmt: skip
    export(r20_mixed, tmp_path / "f.mxq", fold_bn=True)
    assert _same(folded, load_packed(tmp_path / "f.mxq"), x)


@needs_onnx
def test_qonnx_structure_and_lowered_parity(r20_mixed, tmp_path):
    from mixq.export.qonnx_export import QONNX_DOMAIN, quant_to_standard_onnx

    export(r20_mixed, tmp_path / "m.qonnx", "qonnx")
    proto = onnx.load(tmp_path / "m.qonnx")
    onnx.checker.check_model(proto)
    quant = [n for n in proto.graph.node if n.op_type == "Quant"]
    assert all(n.domain == QONNX_DOMAIN and len(n.input) == 4 for n in quant)
    assert len(quant) == sum(1 for _ in quantizers(r20_mixed))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in quant[0].attribute}
    assert attrs == {"signed": 1, "narrow": 1, "rounding_mode": b"ROUND"}
    assert float(inits[quant[0].input[3]]) == r20_mixed.conv1.weight_quantizer.bitwidth
    check_onnx_parity(r20_mixed, quant_to_standard_onnx(proto), _x(2, 3, 32, 32))


@needs_onnx
def test_logit_scale_hook_is_exported(tmp_path):
    from mixq.train.build import add_logit_scale

    model = add_logit_scale(_r20("uniform/d_qmax"))
    model.logit_scale.data.fill_(2.5)
    x = _x(2, 3, 32, 32)
    export(model, tmp_path / "m.mxq")
    assert _same(model, load_packed(tmp_path / "m.mxq"), x)
    export(model, tmp_path / "m.onnx", "onnx")
    sess = _session(onnx.load(tmp_path / "m.onnx"))
    with torch.no_grad():
        y = model(x).numpy()
    assert np.abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - y).max() < 0.1
    model.register_forward_hook(lambda *a: None)
    with pytest.raises(ExportError, match="forward hook"):
        export(model, tmp_path / "h.onnx", "onnx")


@needs_onnx
def test_older_opset_uses_int8(r20_mixed, tmp_path):
    x = _x(2, 3, 32, 32)
    outs = []
    for opset in (13, 21):
        export(r20_mixed, tmp_path / "m.onnx", "onnx", opset=opset)
        proto = onnx.load(tmp_path / "m.onnx")
        storage = {t.get("storage") for t in json.loads(proto.metadata_props[1].value).values()}
        assert ("INT4" in storage) == (opset == 21)
        sess = _session(proto)
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    np.testing.assert_array_equal(*outs)


@needs_onnx
def test_onnx_errors(r20_mixed, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="float model"):
        export(resnet20(), tmp_path / "f.onnx", "onnx")
    with pytest.raises(ValueError, match="ties"):
        export(r20_mixed, tmp_path / "f.onnx", "onnx", ties="up")
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
    for fmt, extra in (("packed", []), ("onnx", ["--fold-bn", "--ties", "away"]), ("qonnx", [])):
        out = tmp_path / f"m.{fmt}"
        args = parser.parse_args(["export", str(ckpt), "--format", fmt, "-o", str(out), *extra])
        assert args.func(args) == 0 and out.is_file()
        text = capsys.readouterr().out
        assert f"wrote {out}" in text and ("re-quantized" in text) == bool(extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _same(model.eval(), load_packed(tmp_path / "m.packed"), _x(2, 3, 8, 8))
