"""``mixq.quant.bound``: the layers' weights and biases fake-quantized in one node per group.

The reference is the per-layer path (each layer calling its own quantizers, as without
``share_derived``): forward values, weight gradients and quantizer-parameter gradients must be
equal bit for bit when each layer runs once per forward, and a layer whose quantizer is hooked,
patched, not float32 or not run must fall back to (or behave as) the per-layer path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixq.config import LayerOverride, QuantConfig, SiteConfig
from mixq.convert import quantize_model, quantizers
from mixq.qat import QATStep, param_groups
from mixq.quant import bound, kernels
from mixq.quant.group import share_derived
from mixq.repair import capture_inputs


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


CONFIGS = {
    "d_qmax": QuantConfig(),
    "mixed": QuantConfig(
        bias=SiteConfig(quantizer="uniform/b_qmax"),
        overrides=(
            LayerOverride("3", weight=SiteConfig(quantizer="pow2/qmin_qmax")),
            LayerOverride("5", weight=SiteConfig(quantizer="pow2/b_qmin", learnable=False)),
            LayerOverride("9", weight=SiteConfig(quantizer="uniform/b_d", pow2_step=False)),
        ),
    ),
    "inputs": QuantConfig(activation_sites="inputs", weight=SiteConfig(quantizer="pow2/qmin_qmax")),
}


def _model(config: QuantConfig, seed: int = 0) -> nn.Module:
    m = quantize_model(_net(seed), config, example_input=torch.randn(2, 3, 8, 8))
    return m.to(memory_format=torch.channels_last)


def _pair(config: QuantConfig) -> tuple[nn.Module, nn.Module]:
    """The same model twice: batched (``share_derived``) and per layer (no hooks)."""
    a = _model(config)
    b = copy.deepcopy(a)
    share_derived(a, [q for _, q in quantizers(a)])
    return a, b


@pytest.fixture
def calls(monkeypatch):
    """How many tensors :class:`bound._FakeQuantBound` quantized (0: the per-layer path)."""
    n = [0]
    fwd = bound._FakeQuantBound.forward

    def counting(ctx, uniform, spec, use, a, b, *ts):
        n[0] += len(ts)
        return fwd(ctx, uniform, spec, use, a, b, *ts)

    monkeypatch.setattr(bound._FakeQuantBound, "forward", staticmethod(counting))
    return n


def _n_bound(model: nn.Module) -> int:
    """The model's quantized weight and bias tensors."""
    return sum(q is not None for m in model.modules()
               for q in (getattr(m, "weight_quantizer", None),
                         getattr(m, "bias_quantizer", None)))  # fmt: skip


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_grads(ga: dict, gb: dict) -> None:
    assert ga.keys() == gb.keys()
    for n in ga:
        assert (ga[n] is None) == (gb[n] is None), n
        if ga[n] is not None:
            assert torch.equal(ga[n], gb[n]), n


@pytest.mark.parametrize("name", list(CONFIGS))
def test_values_and_gradients_equal_the_per_layer_path(name, calls):
    if not kernels.implementation("cpp").available():
        pytest.skip("needs the C++ kernels (the only backend this path uses)")
    a, b = _pair(CONFIGS[name])
    x = torch.randn(3, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    ya, yb = a(x), b(x)
    assert calls[0] == _n_bound(a) > 0  # every weight and bias went through the batch
    assert torch.equal(ya, yb)
    (ya.square().sum()).backward()
    (yb.square().sum()).backward()
    _assert_same_grads(_grads(a), _grads(b))
    assert all(m.__dict__.get("_mixq_shared_tensors") is None for m in a.modules())  # released


@pytest.mark.parametrize("name", list(CONFIGS))
def test_qat_steps_equal_the_per_layer_path(name, calls):
    """Several full steps (penalty, clip, projection, SGD): the same model bit for bit."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    models, steps = [], []
    from mixq.cost import Budget

    for batched in (True, False):
        m = _model(CONFIGS[name])
        opt = torch.optim.SGD(param_groups(m, 2e-4), lr=0.05, momentum=0.9)
        step = QATStep(m, opt, Budget.parse(weight="150B"), weight_decay=2e-4)
        if not batched:
            step.shared._found = {}  # every layer calls its quantizers
        models.append(m)
        steps.append(step)
    for _ in range(3):
        for m, step in zip(models, steps, strict=True):
            step(F.cross_entropy(m(x), y))
        _assert_same_grads(_grads(models[0]), _grads(models[1]))
    assert calls[0] > 0
    for (n, pa), pb in zip(models[0].state_dict().items(), models[1].state_dict().values(),
                           strict=True):  # fmt: skip
        assert torch.equal(pa, pb), n


def test_a_layer_not_run_gives_no_gradient(calls):
    a, b = _pair(CONFIGS["d_qmax"])
    x = torch.randn(2, 3, 8, 8)

    for m in (a, b):  # the Linear (layer 9) never runs; the model's hooks still quantize it
        m[9].forward = lambda t: t.sum(dim=1, keepdim=True)
    a(x).sum().backward()
    b(x).sum().backward()
    assert calls[0] > 0
    assert a[9].weight.grad is None and a[9].weight_quantizer.d.grad is None
    _assert_same_grads(_grads(a), _grads(b))


def test_a_layer_run_twice_sums_both_uses(calls):
    a, b = _pair(QuantConfig())
    for m in (a, b):
        m.insert(6, m[5])  # the 1x1 conv twice (8 -> 8 channels)
    x = torch.randn(2, 3, 8, 8)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    ga, gb = _grads(a), _grads(b)
    for n in ga:  # the reused layer's sums are added in another order
        assert (ga[n] is None) == (gb[n] is None), n
        if ga[n] is not None:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6)


def test_hooked_or_patched_quantizers_keep_their_call(calls):
    """Hooks on the quantizers (``repair.capture_inputs``) see every call, as without batching;
    a hook on one quantizer takes that one out of the batch only; a quantizer whose forward is
    patched on the instance runs its patch."""
    a, _ = _pair(QuantConfig())
    x = torch.randn(2, 3, 8, 8)
    seen = capture_inputs(a, x)
    assert calls[0] == 0
    assert torch.equal(seen["0.weight_quantizer"], a[0].weight.detach())
    a.train()
    wq = a[0].weight_quantizer
    got = []
    h = wq.register_forward_pre_hook(lambda m, args: got.append(args[0]))
    a(x)
    h.remove()
    assert calls[0] == _n_bound(a) - 1 and len(got) == 1  # all others went through the batch
    calls[0] = 0
    hit = []
    fwd = type(wq).forward
    wq.forward = lambda t, cap=None: hit.append(1) or fwd(wq, t, cap)
    a(x)
    assert hit and calls[0] == _n_bound(a) - 1


def test_other_dtypes_and_backends_use_the_per_layer_path(calls):
    a, b = _pair(QuantConfig())
    a.double()
    b.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(a(x), b(x))
    assert calls[0] == 0
    a.float()
    b.float()
    with kernels.use("eager"):
        assert torch.equal(a(x.float()), b(x.float()))
    assert calls[0] == 0


def test_no_grad_values_serve_only_no_grad(calls):
    a, b = _pair(QuantConfig())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert calls[0] > 0
    hook = a._forward_pre_hooks[next(iter(a._forward_pre_hooks))]
    with torch.no_grad():
        hook(a, (x,))  # tensors made without gradients, then a forward that needs them
    out = a[0](x)
    out.sum().backward()
    assert a[0].weight.grad is not None and a[0].weight_quantizer.d.grad is not None
    for m in a.modules():
        m.__dict__.pop("_mixq_shared_tensors", None)


def test_deepcopy_binds_the_copy(calls):
    a, _ = _pair(QuantConfig())
    c = copy.deepcopy(a)
    c(torch.randn(2, 3, 8, 8)).sum().backward()
    assert calls[0] > 0
    assert all(p.grad is None for p in a.parameters())
    assert all(p.grad is not None for _, q in quantizers(c) for p in q.parameters())


def test_tracers_see_the_per_layer_calls(calls):
    """``torch.jit.trace`` (the TorchScript ONNX exporter's tracer) records the layers' own
    quantizer calls, not the batch node, and the traced module gives the same outputs."""
    a, b = _pair(QuantConfig())
    a.eval()
    b.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(a, (x,), check_trace=False)
    assert calls[0] == 0
    assert torch.equal(traced(x), b(x))
