"""Tests for the model zoo in :mod:`mixq.models`."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from mixq.models import (
    MODELS,
    count_conv_fc_params,
    create_model,
    mobilenet_v2,
    resnet18,
    resnet20,
    smallcnn,
)
from mixq.models.mobilenetv2 import _make_divisible
from mixq.models.resnet_cifar import BasicBlockA, CifarResNet, ShortcutA

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def r20() -> nn.Module:
    torch.manual_seed(0)
    return resnet20().eval()


@pytest.fixture(scope="module")
def r18() -> nn.Module:
    torch.manual_seed(0)
    return resnet18().eval()


@pytest.fixture(scope="module")
def mnv2() -> nn.Module:
    torch.manual_seed(0)
    return mobilenet_v2().eval()


# ------------------------------------------- expected torchvision layouts (independent)


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{s}": (() if s == "num_batches_tracked" else (c,)) for s in BN_SUFFIXES}


def torchvision_resnet18_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of ``torchvision.models.resnet18`` (from its documented layout)."""
    sd: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inp = 64
    for li, (planes, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)], start=1):
        for b in range(2):
            p = f"layer{li}.{b}"
            block_in = inp if b == 0 else planes
            sd[f"{p}.conv1.weight"] = (planes, block_in, 3, 3)
            sd.update(_bn(f"{p}.bn1", planes))
            sd[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            sd.update(_bn(f"{p}.bn2", planes))
            if b == 0 and (stride != 1 or block_in != planes):
                sd[f"{p}.downsample.0.weight"] = (planes, block_in, 1, 1)
                sd.update(_bn(f"{p}.downsample.1", planes))
        inp = planes
    sd["fc.weight"] = (num_classes, 512)
    sd["fc.bias"] = (num_classes,)
    return sd


def torchvision_mobilenet_v2_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of ``torchvision.models.mobilenet_v2`` (width 1.0)."""
    sd: dict[str, tuple[int, ...]] = {"features.0.0.weight": (32, 3, 3, 3)}
    sd.update(_bn("features.0.1", 32))
    setting = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
    idx, inp = 1, 32
    for t, c, n in setting:
        for _ in range(n):
            p, hid = f"features.{idx}.conv", inp * t
            j = 0
            if t != 1:
                sd[f"{p}.0.0.weight"] = (hid, inp, 1, 1)
                sd.update(_bn(f"{p}.0.1", hid))
                j = 1
            sd[f"{p}.{j}.0.weight"] = (hid, 1, 3, 3)
            sd.update(_bn(f"{p}.{j}.1", hid))
            sd[f"{p}.{j + 1}.weight"] = (c, hid, 1, 1)
            sd.update(_bn(f"{p}.{j + 2}", c))
            idx, inp = idx + 1, c
    sd["features.18.0.weight"] = (1280, 320, 1, 1)
    sd.update(_bn("features.18.1", 1280))
    sd["classifier.1.weight"] = (num_classes, 1280)
    sd["classifier.1.bias"] = (num_classes,)
    return sd


def cifar_resnet_conv_fc(depth: int, num_classes: int = 10) -> int:
    """Closed-form conv + FC parameter count of a CIFAR ResNet with option-A shortcuts."""
    n = (depth - 2) // 6
    convs = 3 * 16 * 9
    convs += 2 * n * 16 * 16 * 9
    convs += 16 * 32 * 9 + (2 * n - 1) * 32 * 32 * 9
    convs += 32 * 64 * 9 + (2 * n - 1) * 64 * 64 * 9
    return convs + 64 * num_classes + num_classes


# ---------------------------------------------------------------------- parameter counts


def test_resnet20_param_count(r20: nn.Module) -> None:
    assert count_conv_fc_params(r20) == 268_346
    assert count_conv_fc_params(r20.fc) == 650
    assert cifar_resnet_conv_fc(20) == 268_346
    # 32-bit weights: 268,346 * 4 B = 1048.2 KiB (as in Uhlich et al., Table 1).
    assert round(268_346 * 32 / 8 / 1024, 1) == 1048.2


@pytest.mark.parametrize("depth", [32, 56])
def test_deeper_cifar_resnets_param_count(depth: int) -> None:
    model = create_model(f"resnet{depth}")
    assert count_conv_fc_params(model) == cifar_resnet_conv_fc(depth)


def test_resnet18_param_count(r18: nn.Module) -> None:
    # torchvision's advertised 11,689,512 parameters *include* the 9,600 BN affine
    # parameters (4,800 BN channels x 2). Conv + FC only: 11,166,912 + 513,000.
    conv = sum(m.weight.numel() for m in r18.modules() if isinstance(m, nn.Conv2d))
    assert conv == 11_166_912
    assert count_conv_fc_params(r18.fc) == 513_000
    assert count_conv_fc_params(r18) == 11_679_912
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512
    # 11,679,912 * 4 B / 2**20 = 44.56 MiB, the paper's "44.56 MB" for float ResNet-18.
    assert round(11_679_912 * 4 / 2**20, 2) == 44.56


def test_mobilenet_v2_param_count(mnv2: nn.Module) -> None:
    assert count_conv_fc_params(mnv2) == 3_470_760
    assert count_conv_fc_params(mnv2.classifier) == 1_281_000
    # torchvision's advertised 3,504,872 parameters include BN affine parameters.
    assert sum(p.numel() for p in mnv2.parameters()) == 3_504_872
    assert round(3_470_760 * 4 / 2**20, 2) == 13.24


def test_count_conv_fc_params_ignores_bn() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 4))
    assert count_conv_fc_params(model) == (2 * 3 * 9 + 3) + (3 * 4 + 4)


# ------------------------------------------------------------------ torchvision layouts


def test_resnet18_state_dict_matches_torchvision(r18: nn.Module) -> None:
    expected = torchvision_resnet18_shapes()
    sd = r18.state_dict()
    assert len(expected) == 122
    assert len(sd) == 122
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    for key in ("layer4.1.bn2.running_var", "layer2.0.downsample.0.weight", "fc.bias"):
        assert key in sd
    # A torchvision-shaped checkpoint loads strictly.
    fake = {k: torch.randn(s) if s else torch.tensor(7) for k, s in expected.items()}
    copy.deepcopy(r18).load_state_dict(fake, strict=True)


def test_mobilenet_v2_state_dict_matches_torchvision(mnv2: nn.Module) -> None:
    expected = torchvision_mobilenet_v2_shapes()
    sd = mnv2.state_dict()
    assert len(expected) == 314
    assert len(sd) == 314
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    for key in (
        "features.17.conv.2.weight",
        "features.1.conv.1.weight",
        "features.18.0.weight",
        "classifier.1.weight",
    ):
        assert key in sd
    fake = {k: torch.randn(s) if s else torch.tensor(7) for k, s in expected.items()}
    copy.deepcopy(mnv2).load_state_dict(fake, strict=True)
    assert isinstance(mnv2.classifier[0], nn.Dropout)
    assert mnv2.classifier[0].p == 0.2


def test_make_divisible_matches_torchvision() -> None:
    assert _make_divisible(32 * 1.0, 8) == 32
    assert _make_divisible(32 * 0.35, 8) == 16  # 11.2 -> 8 < 0.9 * 11.2 -> 16
    assert _make_divisible(1280 * max(1.0, 1.4), 8) == 1792
    assert _make_divisible(3, 8) == 8


def test_mobilenet_v2_init(mnv2: nn.Module) -> None:
    fc = mnv2.classifier[1]
    assert torch.all(fc.bias == 0)
    assert 0.008 < fc.weight.std().item() < 0.012


# --------------------------------------------------------------------- forward / shapes


@contextlib.contextmanager
def count_calls(model: nn.Module, kind: type[nn.Module]) -> Iterator[dict[str, int]]:
    """Count forward calls of every ``kind`` submodule of ``model`` (keyed by name)."""
    calls: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, kind):
            calls[name] = 0

            def hook(_m: nn.Module, _i: object, _o: object, name: str = name) -> None:
                calls[name] += 1

            handles.append(m.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    ("fixture", "kind", "n_act", "in_shape", "out_shape"),
    [
        ("r20", nn.ReLU, 19, (2, 3, 32, 32), (2, 10)),
        ("r18", nn.ReLU, 17, (1, 3, 224, 224), (1, 1000)),
        ("mnv2", nn.ReLU6, 35, (1, 3, 224, 224), (1, 1000)),
    ],
)
def test_forward_and_distinct_activations(
    request: pytest.FixtureRequest,
    fixture: str,
    kind: type[nn.Module],
    n_act: int,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
) -> None:
    model = request.getfixturevalue(fixture)
    assert tuple(model.default_input_shape) == in_shape[1:]
    # Distinct instances: the de-duplicated and raw module listings agree.
    acts = [m for m in model.modules() if isinstance(m, kind)]
    raw = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, kind)]
    assert len(acts) == len(raw) == n_act
    with torch.no_grad(), count_calls(model, kind) as calls:
        out = model(torch.randn(in_shape))
    assert out.shape == out_shape
    assert torch.isfinite(out).all()
    # Every activation module is applied exactly once per forward pass.
    assert len(calls) == n_act
    assert set(calls.values()) == {1}


@pytest.mark.parametrize(
    ("name", "kind", "in_shape"),
    [
        ("resnet20", nn.ReLU, (2, 3, 32, 32)),
        ("smallcnn", nn.ReLU, (2, 1, 8, 8)),
        ("mobilenet_v2", nn.ReLU6, (1, 3, 32, 32)),
    ],
)
def test_all_nonlinearities_are_modules(
    name: str, kind: type[nn.Module], in_shape: tuple[int, ...]
) -> None:
    """With every activation module replaced by Identity the (eval) network is affine.

    This catches any functional ``F.relu`` hidden in a forward pass.
    """
    torch.manual_seed(0)
    model = create_model(name).eval()
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, kind):
                setattr(parent, child_name, nn.Identity())
    x1, x2 = torch.randn(in_shape), torch.randn(in_shape)
    zero = torch.zeros(in_shape)
    with torch.no_grad():
        lhs = model(x1 + x2) + model(zero)
        rhs = model(x1) + model(x2)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_smallcnn_shapes_and_relus() -> None:
    model = smallcnn().eval()
    assert model.default_input_shape == (1, 8, 8)
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    wide = smallcnn(num_classes=5, in_channels=3, width=8)
    assert wide.default_input_shape == (3, 8, 8)
    assert wide(torch.randn(1, 3, 8, 8)).shape == (1, 5)
    assert count_conv_fc_params(wide) == 3 * 8 * 9 + 8 * 16 * 9 + 16 * 16 * 9 + 16 * 5 + 5


# ---------------------------------------------------------------- option-A shortcut


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    sc = ShortcutA(16, 32, stride=2)
    assert not list(sc.parameters())
    out = sc(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.all(out[:, :8] == 0)
    assert torch.all(out[:, 24:] == 0)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])


def test_option_a_block_stride2() -> None:
    block = BasicBlockA(16, 32, stride=2).eval()
    assert isinstance(block.shortcut, ShortcutA)
    assert block.relu1 is not block.relu2
    x = torch.randn(2, 16, 8, 8)
    assert block(x).shape == (2, 32, 4, 4)
    # With the residual branch silenced, the block is ReLU(shortcut(x)).
    nn.init.zeros_(block.conv2.weight)
    with torch.no_grad():
        out = block(x)
    expected = torch.zeros(2, 32, 4, 4)
    expected[:, 8:24] = torch.relu(x[:, :, ::2, ::2])
    torch.testing.assert_close(out, expected)


def test_resnet20_structure(r20: nn.Module) -> None:
    shortcuts = [n for n, m in r20.named_modules() if isinstance(m, ShortcutA)]
    assert shortcuts == ["layer2.0.shortcut", "layer3.0.shortcut"]
    stages = [r20.layer1, r20.layer2, r20.layer3]
    assert [s[0].conv1.out_channels for s in stages] == [16, 32, 64]
    assert [len(s) for s in stages] == [3, 3, 3]
    assert [r20.layer2[0].conv1.stride, r20.layer3[0].conv1.stride] == [(2, 2), (2, 2)]
    assert all(m.bias is None for m in r20.modules() if isinstance(m, nn.Conv2d))
    assert r20.fc.bias is not None


# ---------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert set(MODELS) == {
        "resnet20",
        "resnet32",
        "resnet56",
        "resnet18",
        "mobilenet_v2",
        "smallcnn",
    }


def test_create_model_num_classes() -> None:
    assert create_model("resnet20").fc.out_features == 10
    assert create_model("resnet20", num_classes=100).fc.out_features == 100
    assert create_model("smallcnn", num_classes=3, width=4).fc.out_features == 3


def test_create_model_unknown_name() -> None:
    with pytest.raises(ValueError, match="valid choices") as info:
        create_model("resnet21")
    msg = str(info.value)
    for name in MODELS:
        assert name in msg
    assert "Did you mean" in msg
    with pytest.raises(ValueError, match="mobilenet_v2"):
        create_model("mobilenetv2")


def test_bad_depth() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth=21)


# ----------------------------------------------------------------- digits training


def test_smallcnn_learns_digits() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    torch.manual_seed(0)
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    tr, te = perm[:1400], perm[1400:]
    model = smallcnn()
    opt = torch.optim.Adam(model.parameters(), 5e-3)
    epochs, bs = 8, 64
    steps = epochs * ((len(tr) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps)
    for _ in range(epochs):
        model.train()
        order = tr[torch.randperm(len(tr))]
        for i in range(0, len(order), bs):
            idx = order[i : i + bs]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
    assert acc > 0.95


def test_zero_init_residual_starts_every_block_as_its_shortcut():
    """``zero_init_residual=True``: every ``bn2.weight`` is 0, so in training mode each block
    computes ``relu(shortcut(x) + bn2.bias) = relu(shortcut(x))`` at initialisation; the
    default keeps the scales at 1 (the paper's networks)."""
    torch.manual_seed(0)
    model = resnet20(zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlockA)]
    assert len(blocks) == 9
    x = torch.randn(4, 16, 8, 8).abs()
    for block in blocks:
        assert (block.bn2.weight == 0).all()
    b = blocks[0]
    torch.testing.assert_close(b(x), torch.relu(b.shortcut(x)))
    default = resnet20()
    assert all((m.bn2.weight == 1).all() for m in default.modules() if isinstance(m, BasicBlockA))
    assert create_model("resnet20", zero_init_residual=True).layer3[2].bn2.weight.sum() == 0
