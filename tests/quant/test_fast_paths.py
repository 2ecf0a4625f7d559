"""The fast fake-quantization paths against ``functional_reference`` (spec section 3).

Every backend of ``mixq.quant.kernels`` (the compiled CPU kernels when they build, the
pure-PyTorch path always) must give the reference's forward values bit for bit (a zero may
differ in sign, as ATen's own vector and scalar loops do), the same input gradient bit for bit,
and the same two parameter sums up to summation order. Inputs include ties, zeros, values on
the clip bounds and on the pow-2 decision thresholds, subnormals and infinities, in contiguous,
channels_last and strided layouts, with sizes below and above the multi-thread grain.
"""

from __future__ import annotations

import functools
import math
import os
import types
import warnings

import pytest
import torch

from mixq.quant import Pow2Quantizer, UniformQuantizer, kernels
from mixq.quant.functional import fake_quant_pow2, fake_quant_uniform
from mixq.quant.functional_reference import (
    fake_quant_pow2_reference,
    fake_quant_uniform_reference,
    round_half_away_reference,
)
from mixq.quant.kernels import cpp, inductor
from mixq.quant.ste import round_half_away

BACKENDS = ["cpp", "eager"]


def _backend_or_skip(name: str) -> str:
    if name == "cpp" and not cpp.available():
        pytest.skip("compiled CPU kernels unavailable (no compiler)")
    return name


def _nextafter(v: float, toward: float) -> float:
    t = torch.tensor(v, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(toward, dtype=torch.float32)))


def _around(vals: list[float]) -> list[float]:
    """Each value, the floats just below and above it, and the negatives of all of them."""
    out = []
    for v in vals:
        out += [v, _nextafter(v, -math.inf), _nextafter(v, math.inf)]
    return out + [-v for v in out]


def _fill(fixed: torch.Tensor, rnd: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """All ``fixed`` values plus random ones, shuffled, ``max(n, ...)`` rounded up to 12."""
    total = -(-max(n, fixed.numel()) // 12) * 12
    x = torch.cat([fixed, rnd[: total - fixed.numel()]]).float()
    return x[torch.randperm(total, generator=torch.Generator().manual_seed(seed))]


def _uniform_probe(d_q: float, x_hi: float, n: int) -> torch.Tensor:
    k = torch.arange(-12, 13, dtype=torch.float64)
    special = _around([0.0, x_hi, 2 * x_hi, d_q / 2, 1.5 * d_q, 2.5 * d_q, 1e-40])
    special += [math.inf, -math.inf, -0.0]
    fixed = torch.cat([k * d_q, (k + 0.5) * d_q, torch.tensor(special, dtype=torch.float64)])
    rnd = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    return _fill(fixed, rnd * x_hi, n, n)


def _pow2_probe(x_min: float, x_max: float, n: int) -> torch.Tensor:
    e = torch.arange(-20, 21, dtype=torch.float64)
    geo = (torch.exp2(e) * math.sqrt(2.0)).tolist()  # decision thresholds sqrt2 * 2^k
    special = _around([0.0, x_min, x_max, x_min / math.sqrt(2.0), 2.0**-130, 2.0**20 * 1.5])
    special += _around([float(torch.tensor(x_min) * 0.70710677), *geo])
    fixed = torch.tensor([*special, math.inf, -math.inf], dtype=torch.float64)
    rnd = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    return _fill(fixed, rnd.sign() * torch.exp2(rnd.abs() * 3 - 6), n, n + 1)


LAYOUTS = ["flat", "nchw", "channels_last", "strided"]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (1-D, numel divisible by 4*3) arranged as ``layout``; values in the same order."""
    if layout == "flat":
        return x.clone()
    n = x.numel() // 12
    t = x.reshape(n, 3, 2, 2)
    if layout == "nchw":
        return t.clone()
    if layout == "channels_last":
        return t.clone().contiguous(memory_format=torch.channels_last)
    big = torch.zeros(n, 6, 2, 2)
    big[:, ::2] = t
    return big[:, ::2]  # a non-dense view


def _grads(fn, x, scalars, g):
    """``(y, dL/dx, [dL/ds])`` for ``L = sum(g * fn(x, *s))``; a strided ``x`` stays strided."""
    base = x._base if x._base is not None else x
    leaf = base.detach().clone().requires_grad_(True)
    xv = leaf.as_strided(x.shape, x.stride(), x.storage_offset())
    ps = [s.detach().clone().requires_grad_(True) for s in scalars]
    y = fn(xv, *ps)
    y.backward(g)
    gx = leaf.grad.as_strided(x.shape, x.stride(), x.storage_offset())
    return y.detach(), gx, [p.grad for p in ps]


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that +0 and -0 count as equal (NaN equals NaN)."""
    bits = a.contiguous().view(torch.int32) == b.contiguous().view(torch.int32)
    return bool((bits | (a == b) | (a.isnan() & b.isnan())).all())


def _check(fast_fn, ref_fn, x, scalars, terms):
    """Compare a backend with the reference: values, x-gradient, and the two sums."""
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(x.device)
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        g = g.contiguous(memory_format=torch.channels_last)
    y1, gx1, (a1, b1) = _grads(fast_fn, x, scalars, g)
    y0, gx0, (a0, b0) = _grads(ref_fn, x, scalars, g)
    assert _same_values(y1, y0)
    assert _same_values(gx1, gx0)
    for fast, ref, t in zip((a1, b1), (a0, b0), terms(x, g), strict=True):
        bound = float(t.abs().sum()) * 1e-6 + 1e-30  # summation-order error of a float32 sum
        assert fast.shape == ref.shape
        assert abs(float(fast) - float(ref)) <= bound, (float(fast), float(ref), bound)


def _uniform_terms(d_q, x_hi, signed):
    def terms(x, g):
        x, g = x.double(), g.double()
        c = x.clamp(-x_hi if signed else 0.0, x_hi)
        y = round_half_away_reference(c / d_q) * d_q
        return g * (y - c) / d_q, g

    return terms


def _pow2_terms(x, g):
    return g, g


SMALL, LARGE = 12 * 9, 12 * 3001  # a tail shorter than a SIMD block; above the threading grain
U_PARAMS = [(0.125, 0.95), (2.0**-6, 0.25), (0.1, 1.0)]  # d_q, x_hi (0.1: not a power of two)
P_PARAMS = [(2.0**-6, 1.0), (2.0**-3, 2.0**-3), (0.3, 5.0)]  # x_min, x_max
U_CASES = [(lay, SMALL, *p) for lay in LAYOUTS for p in U_PARAMS] + [
    ("channels_last", LARGE, *U_PARAMS[0]), ("strided", LARGE, *U_PARAMS[2])]  # fmt: skip
P_CASES = [(lay, SMALL, *p) for lay in LAYOUTS for p in P_PARAMS] + [
    ("channels_last", LARGE, *P_PARAMS[0]), ("flat", LARGE, *P_PARAMS[2])]  # fmt: skip


def _check_uniform(x, d_q, x_hi, signed):
    """The active path's uniform fake-quant against the spec's reference (values, gradients)."""
    scalars = [torch.tensor(d_q, device=x.device), torch.tensor(x_hi, device=x.device)]
    _check(
        lambda x, a, b: fake_quant_uniform(x, a, b, signed),
        lambda x, a, b: fake_quant_uniform_reference(x, a, b, signed),
        x, scalars, _uniform_terms(d_q, x_hi, signed),
    )  # fmt: skip


def _check_pow2(x, x_min, x_max, signed, with_zero):
    """The active path's pow-2 fake-quant against the spec's reference (values, gradients)."""
    scalars = [torch.tensor(x_min, device=x.device), torch.tensor(x_max, device=x.device)]
    _check(
        lambda x, a, b: fake_quant_pow2(x, a, b, signed, with_zero),
        lambda x, a, b: fake_quant_pow2_reference(x, a, b, signed, with_zero),
        x, scalars, _pow2_terms,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("layout,n,d_q,x_hi", U_CASES)
def test_uniform_matches_reference(backend, signed, layout, n, d_q, x_hi):
    with kernels.use(_backend_or_skip(backend)):
        _check_uniform(_layout(_uniform_probe(d_q, x_hi, n), layout), d_q, x_hi, signed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed,with_zero", [(True, False), (False, True), (True, True),
                                              (False, False)])  # fmt: skip
@pytest.mark.parametrize("layout,n,x_min,x_max", P_CASES)
def test_pow2_matches_reference(backend, signed, with_zero, layout, n, x_min, x_max):
    with kernels.use(_backend_or_skip(backend)):
        x = _layout(_pow2_probe(x_min, x_max, n), layout)
        _check_pow2(x, x_min, x_max, signed, with_zero)


CAPS = [6.0, 0.5, 0.125]  # above, inside and at the low end of the clip ranges below


def _capped_probe(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``x`` with the cap itself, its neighbours and values far above it in front."""
    near = torch.tensor(_around([cap, 2 * cap, 100.0 * cap])[:9])
    return torch.cat([near, x[: x.numel() - near.numel()]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("n", [SMALL, LARGE])
def test_capped_uniform_is_quantize_of_clamp(backend, signed, cap, n):
    """``cap=c`` (a fused ReLU6) gives ``Q(clamp(x, max=c))``'s values and input gradient bit
    for bit (clamp passes the gradient where ``x <= c``) and its parameter sums."""
    d_q, x_hi = U_PARAMS[0]
    with kernels.use(_backend_or_skip(backend)):
        x = _layout(_capped_probe(_uniform_probe(d_q, x_hi, n), cap), "channels_last")
        scalars = [torch.tensor(d_q), torch.tensor(x_hi)]
        terms = _uniform_terms(d_q, x_hi, signed)
        _check(
            lambda x, a, b: fake_quant_uniform(x, a, b, signed, cap=cap),
            lambda x, a, b: fake_quant_uniform_reference(x.clamp(max=cap), a, b, signed),
            x, scalars, lambda x, g: terms(x.clamp(max=cap), g),
        )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed,with_zero", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("cap", CAPS)
def test_capped_pow2_is_quantize_of_clamp(backend, signed, with_zero, cap):
    x_min, x_max = P_PARAMS[0]
    with kernels.use(_backend_or_skip(backend)):
        x = _layout(_capped_probe(_pow2_probe(x_min, x_max, LARGE), cap), "flat")
        _check(
            lambda x, a, b: fake_quant_pow2(x, a, b, signed, with_zero, cap=cap),
            lambda x, a, b: fake_quant_pow2_reference(x.clamp(max=cap), a, b, signed, with_zero),
            x, [torch.tensor(x_min), torch.tensor(x_max)], _pow2_terms,
        )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,signed,with_zero", [("uniform", True, False),
                                                   ("uniform", False, False),
                                                   ("pow2", True, False), ("pow2", False, True),
                                                   ("pow2", False, False)])  # fmt: skip
def test_capped_nan_inputs_match_clamp(backend, kind, signed, with_zero):
    """NaN stays NaN through the cap, and its input gradient is 0 (clamp's ``x <= c`` fails)."""
    x = torch.tensor([math.nan, 0.3, -math.nan, 7.0, 6.0, -0.7, 0.0] * 10)
    s = [torch.tensor(0.25), torch.tensor(8.0)]
    if kind == "uniform":
        fast = functools.partial(_uniform_fn, fake_quant_uniform, signed, cap=6.0)
        ref = functools.partial(_uniform_fn, fake_quant_uniform_reference, signed)
    else:
        fast = functools.partial(fake_quant_pow2, signed=signed, with_zero=with_zero, cap=6.0)
        ref = functools.partial(fake_quant_pow2_reference, signed=signed, with_zero=with_zero)
    with kernels.use(_backend_or_skip(backend)):
        y1, gx1, _ = _grads(fast, x, s, torch.ones_like(x))
        y0, gx0, _ = _grads(lambda x, a, b: ref(x.clamp(max=6.0), a, b), x, s, torch.ones_like(x))
    assert _same_values(y1, y0) and _same_values(gx1, gx0)
    assert float(gx1[0]) == 0.0 and float(gx1[3]) == 0.0


def _uniform_fn(fn, signed, x, a, b, **kw):
    return fn(x, a, b, signed, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inputs_propagate_like_reference(backend):
    with kernels.use(_backend_or_skip(backend)):
        x = torch.tensor([math.nan, 0.3, -math.nan, 2.0, -0.7, 0.0] * 10)
        s = [torch.tensor(0.25), torch.tensor(1.0)]
        for signed in (True, False):
            fast = functools.partial(_uniform_fn, fake_quant_uniform, signed)
            ref = functools.partial(_uniform_fn, fake_quant_uniform_reference, signed)
            y1, gx1, _ = _grads(fast, x, s, torch.ones_like(x))
            y0, gx0, _ = _grads(ref, x, s, torch.ones_like(x))
            assert _same_values(y1, y0) and _same_values(gx1, gx0)
            for wz in (True, False):
                y1 = fake_quant_pow2(x, *s, signed, wz)
                y0 = fake_quant_pow2_reference(x, *s, signed, wz)
                assert _same_values(y1, y0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_use_torch_path_and_match(dtype):
    x = (torch.randn(600, generator=torch.Generator().manual_seed(3)) * 2).to(dtype)
    x[:4] = torch.tensor([0.0, 0.0625, -0.1875, 1.0])
    for signed in (True, False):
        s = [torch.tensor(0.125, dtype=dtype), torch.tensor(0.9, dtype=dtype)]
        assert _same_values(fake_quant_uniform(x, *s, signed).float(),
                            fake_quant_uniform_reference(x, *s, signed).float())  # fmt: skip
        p = [torch.tensor(2.0**-5, dtype=dtype), torch.tensor(1.0, dtype=dtype)]
        y = fake_quant_pow2(x, *p, signed, not signed)
        assert _same_values(y.float(), fake_quant_pow2_reference(x, *p, signed, not signed).float())


def test_gradients_only_where_needed():
    """A backward with ``x`` frozen (or scalars frozen) still gives the other gradients."""
    for backend in ["eager"] + (["cpp"] if cpp.available() else []):
        with kernels.use(backend):
            x = torch.randn(100)
            d = torch.tensor(0.125, requires_grad=True)
            h = torch.tensor(0.9, requires_grad=True)
            fake_quant_uniform(x, d, h).sum().backward()
            assert d.grad is not None and h.grad is not None
            x.requires_grad_(True)
            fake_quant_pow2(x, d.detach(), h.detach()).sum().backward()
            assert x.grad is not None


def test_quantizer_modules_agree_across_backends():
    """The learned quantizers give the same outputs and parameter gradients on every backend."""
    x = torch.randn(8, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    results = {}
    for backend in ["reference", "eager", "inductor"] + (["cpp"] if cpp.available() else []):
        with kernels.use(backend):
            torch.manual_seed(0)
            qs = [UniformQuantizer("d_qmax", signed=False), Pow2Quantizer("qmin_qmax", signed=True),
                  UniformQuantizer("b_qmax", signed=True, b=3.0, q_max=1.1)]  # fmt: skip
            out = []
            for q in qs:
                xi = x.clone().requires_grad_(True)
                y = q(xi)
                (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
                out.append((y.detach(), xi.grad, [getattr(q, n).grad for n in q.param_names]))
            results[backend] = out
    ref = results.pop("reference")
    for res in results.values():
        for (y, gx, gp), (y0, gx0, gp0) in zip(res, ref, strict=True):
            assert _same_values(y, y0) and _same_values(gx, gx0)
            for a, b in zip(gp, gp0, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (0, 3, 2, 2), ()])
def test_empty_and_scalar_inputs(backend, shape):
    with kernels.use(_backend_or_skip(backend)):
        x = torch.full(shape, 0.3)
        s = [torch.tensor(0.25), torch.tensor(1.0)]
        for fast, ref in ((fake_quant_uniform, fake_quant_uniform_reference),
                          (fake_quant_pow2, fake_quant_pow2_reference)):  # fmt: skip
            y1, gx1, (a1, b1) = _grads(fast, x, s, torch.ones(shape))
            y0, gx0, (a0, b0) = _grads(ref, x, s, torch.ones(shape))
            assert y1.shape == shape and _same_values(y1, y0) and _same_values(gx1, gx0)
            assert torch.equal(a1, a0) and torch.equal(b1, b0)


def test_channels_last_output_keeps_layout():
    if not cpp.available():
        pytest.skip("compiled CPU kernels unavailable")
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = fake_quant_uniform(x, torch.tensor(0.25), torch.tensor(1.0), False)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_cpu_reductions_are_deterministic():
    if not cpp.available():
        pytest.skip("compiled CPU kernels unavailable")
    x = torch.randn(200_000)
    g = torch.randn(200_000)
    d, h = torch.tensor(0.125), torch.tensor(1.0)
    r = [cpp.uniform_bwd(x, g, d, h, True, True)[1] for _ in range(3)]
    assert all(torch.equal(r[0], t) for t in r)


# -- the torch.compile path (Triton on CUDA; tested here through inductor's C++ backend) ---------

C_U_CASES = [(lay, SMALL, *U_PARAMS[2]) for lay in LAYOUTS]
C_U_CASES += [("channels_last", LARGE, *U_PARAMS[0])]
C_P_CASES = [("flat", SMALL, *P_PARAMS[0]), ("channels_last", LARGE, *P_PARAMS[2]),
             ("strided", SMALL, *P_PARAMS[1])]  # fmt: skip


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""The compiled path is also checked on a GPU (Triton) where one is present."""


@pytest.fixture
def compiled_mode():
    """``MIXQ_KERNEL=compiled`` for the test; fails the test if compilation fell back."""
    with kernels.use("inductor"):
        yield
    assert inductor.failure() is None, inductor.failure()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("layout,n,d_q,x_hi", C_U_CASES)
def test_compiled_uniform_matches_reference(compiled_mode, device, signed, layout, n, d_q, x_hi):
    x = _layout(_uniform_probe(d_q, x_hi, n), layout).to(device)
    assert kernels.backend(x, torch.tensor(d_q, device=device)) == "inductor"
    _check_uniform(x, d_q, x_hi, signed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("signed,with_zero", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("layout,n,x_min,x_max", C_P_CASES)
def test_compiled_pow2_matches_reference(compiled_mode, device, signed, with_zero, layout, n,
                                         x_min, x_max):  # fmt: skip
    x = _layout(_pow2_probe(x_min, x_max, n), layout).to(device)
    assert kernels.backend(x, torch.tensor(x_min, device=device)) == "inductor"
    _check_pow2(x, x_min, x_max, signed, with_zero)


def test_compiled_path_reuses_one_graph_across_shapes(compiled_mode):
    """``dynamic=True``: new activation sizes do not recompile (dynamo's limit is 8)."""
    from torch._dynamo.utils import counters

    s = [torch.tensor(0.125), torch.tensor(1.0)]
    fake_quant_uniform(torch.randn(2, 4, 3, 3), *s, False)
    before = counters["stats"]["unique_graphs"]
    for n, c, h in [(3, 8, 5), (7, 16, 9), (1, 2, 17), (5, 32, 4), (9, 3, 11)]:
        x = torch.randn(n, c, h, h)
        assert torch.equal(fake_quant_uniform(x, *s, False),
                           fake_quant_uniform_reference(x, *s, False))  # fmt: skip
    assert counters["stats"]["unique_graphs"] == before


def test_compiled_path_falls_back_with_one_warning(monkeypatch):
    """A compilation failure warns once, disables the path and still gives correct values."""

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: no working C++ compiler")

    inductor.reset()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    try:
        x = _layout(_uniform_probe(0.125, 0.9, 120), "channels_last")
        s = [torch.tensor(0.125), torch.tensor(0.9)]
        with kernels.use("inductor"), warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert kernels.backend(x, *s) == "inductor"
            y = fake_quant_uniform(x, *s, True)
            assert "no working C++ compiler" in (inductor.failure() or "")
            assert kernels.backend(x, *s) == "eager"  # disabled for the rest of the process
            y2 = fake_quant_uniform(x, *s, True)
            assert "disabled: RuntimeError" in kernels.describe()
        assert [str(m.message) for m in w if "compiling" in str(m.message)] == [
            "mixq: compiling the fake-quantization kernels failed (RuntimeError: inductor: no "
            "working C++ compiler); using the PyTorch kernels (set MIXQ_KERNEL=eager to skip "
            "the attempt)"
        ]
        ref = fake_quant_uniform_reference(x, *s, True)
        assert _same_values(y, ref) and _same_values(y2, ref)
    finally:
        inductor.reset()
    assert inductor.failure() is None


def test_compiled_mode_needs_triton_for_cuda_tensors(monkeypatch):
    """``auto`` picks the compiled path for CUDA tensors only with Triton; ``compiled`` insists."""
    monkeypatch.setattr(inductor, "has_triton", lambda: False)
    # backend() only reads .device and .dtype: a stand-in for a CUDA tensor, no GPU needed
    x = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    with kernels.use("auto"):
        assert kernels.backend(x) == "eager"
    with kernels.use("inductor"), pytest.raises(RuntimeError, match="needs Triton"):
        kernels.backend(x)
    monkeypatch.setattr(inductor, "has_triton", lambda: True)
    with kernels.use("auto"):
        assert kernels.backend(x) == "inductor"


# -- pinned semantics ---------------------------------------------------------------------------


def test_round_half_away_matches_reference_on_bit_patterns():
    """``ste.round_half_away`` (3 ops) equals the 5-op reference on a sweep of all exponents."""
    u = torch.arange(0, 2**32, 997 * 17, dtype=torch.int64)
    x = (u - (u >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)
    x = torch.cat([x[~x.isnan()], torch.tensor([0.5, -0.5, 2.5, -2.5, 0.49999997, 8388609.0])])
    assert _same_values(round_half_away(x), round_half_away_reference(x))
    assert torch.equal(round_half_away(x.double()), round_half_away_reference(x.double()))


def _bit_patterns() -> torch.Tensor:
    """Floats of every exponent and sign (a stride through all 2^32 bit patterns, no NaN), and
    the halves and neighbours where rounding decides."""
    u = torch.arange(0, 2**32, 997 * 17, dtype=torch.int64)
    x = (u - (u >= 2**31).long() * 2**32).to(torch.int32).view(torch.float32)
    edge = [0.5, -0.5, 2.5, -2.5, 0.49999997, 8388609.0, 8388608.5, -16777215.0]
    return torch.cat([x[~x.isnan()], torch.tensor(edge)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_rounding_matches_reference_on_bit_patterns(backend):
    """The backends' ``round(c / d_q)`` on every exponent: ``d_q = 1`` and a range wide enough to
    clip nothing but infinities leaves the rounding itself (the C++ kernels' one-instruction
    ``trunc`` with AVX, the int32 round trip without)."""
    x = _bit_patterns()
    x = x[x.isfinite()]
    with kernels.use(_backend_or_skip(backend)):
        for d_q in (1.0, 2.0**-3, 2.0**5):
            a, b = torch.tensor(d_q), torch.tensor(3.0e38)
            assert _same_values(fake_quant_uniform(x, a, b, True),
                                fake_quant_uniform_reference(x, a, b, True))  # fmt: skip


# the step sizes where c / d_q = c * (1 / d_q) must hold or is not used: powers of two at the
# ends of the float range (1 / 2^-127 is a float, 1 / 2^-128 is not; 2^-149 is the smallest
# subnormal), their float neighbours, and steps that are no power of two
EXTREME_STEPS = [2.0**-127, 2.0**-126, 2.0**-128, 2.0**-149, 2.0**100, 2.0**120,
                 math.nextafter(2.0**-20, 1.0), math.nextafter(0.5, 0.0), 0.75, 3.0e-39]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_q", EXTREME_STEPS)
def test_uniform_matches_reference_at_extreme_steps(backend, d_q):
    """Values, gradients and sums at extreme power-of-two steps and their neighbours, on inputs
    spread over many multiples of the step (the kernel multiplies by ``1 / d_q`` exactly when
    that reciprocal is a float and ``d_q`` a power of two, and divides otherwise)."""
    d_q = float(torch.tensor(d_q))  # as float32
    g = torch.Generator().manual_seed(3)
    halves = (torch.arange(-100, 100, dtype=torch.float64) + 0.5) * d_q  # where rounding decides
    near = torch.tensor(_around(halves.float().tolist()))  # with their float neighbours
    x = torch.cat([torch.randn(12 * 401, generator=g) * min(40.0 * d_q, 2.0e37), near])
    assert x.isfinite().all()  # 2^120 * 100 is still a float
    x_hi = float(torch.tensor(min(30.0 * d_q, 3.0e38)))
    with kernels.use(_backend_or_skip(backend)):
        for signed in (True, False):
            _check_uniform(x, d_q, x_hi, signed)


def test_pow2_rounding_threshold_is_the_exact_geometric_mean():
    """``|x|`` rounds to ``2^(k+1)`` iff ``|x| > sqrt2 * 2^k`` (float32 log2 would misround at
    large ``k``); the zero-pruning threshold is exactly ``x_min / sqrt2``."""
    for k in (-10, 0, 3, 20):
        t = math.sqrt(2.0) * 2.0**k
        below, above = _nextafter(t, 0.0), _nextafter(t, math.inf)
        x = torch.tensor([below, above])
        for backend in ["reference", "eager"] + (["cpp"] if cpp.available() else []):
            with kernels.use(backend):
                y = fake_quant_pow2(x, torch.tensor(2.0**-30), torch.tensor(2.0**30))
            assert y.tolist() == [2.0**k, 2.0 ** (k + 1)], backend
    x_min = 2.0**-4
    t = x_min / math.sqrt(2.0)
    x = torch.tensor([_nextafter(t, 0.0), _nextafter(t, math.inf)])
    for backend in ["reference", "eager"] + (["cpp"] if cpp.available() else []):
        with kernels.use(backend):
            y = fake_quant_pow2(x, torch.tensor(x_min), torch.tensor(1.0), False, True)
        assert y.tolist() == [0.0, x_min], backend


# -- selection and fallback -------------------------------------------------------------------


def test_mode_selection_and_env_names():
    assert kernels.mode() in kernels.MODES
    with kernels.use("reference"):
        assert kernels.backend(torch.zeros(3), torch.tensor(1.0)) == "reference"
    with kernels.use("eager"):
        assert kernels.backend(torch.zeros(3), torch.tensor(1.0)) == "eager"
    with kernels.use("inductor"):
        assert kernels.backend(torch.zeros(3), torch.tensor(1.0)) == "inductor"
    with kernels.use("auto"):
        assert kernels.backend(torch.zeros(3, dtype=torch.float64)) == "eager"
    with pytest.raises(ValueError, match="not one of"):
        kernels.set_mode("fast")


@pytest.fixture
def broken_compiler(monkeypatch, tmp_path):
    """A session in which building the CPU kernels fails (compiler ``false``, empty cache)."""
    monkeypatch.delenv("MIXQ_DISABLE_CPU_KERNEL", raising=False)
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("MIXQ_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp, "_compiler", lambda: "false")
    cpp.reset()
    yield
    cpp.reset()


def test_fallback_when_the_compiler_fails(broken_compiler):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert not cpp.available()
    assert any("building the CPU kernels failed" in str(m.message) for m in w)
    x = _layout(_uniform_probe(0.125, 0.9, 120), "channels_last")
    with kernels.use("auto"):
        assert kernels.backend(x, torch.tensor(0.125)) == "eager"
        _check(
            lambda x, a, b: fake_quant_uniform(x, a, b, False),
            lambda x, a, b: fake_quant_uniform_reference(x, a, b, False),
            x, [torch.tensor(0.125), torch.tensor(0.9)], _uniform_terms(0.125, 0.9, False),
        )  # fmt: skip
    with kernels.use("cpp"), pytest.raises(RuntimeError, match="unavailable"):
        fake_quant_uniform(x, torch.tensor(0.125), torch.tensor(0.9))


def test_fallback_without_compiler(monkeypatch):
    monkeypatch.delenv("MIXQ_DISABLE_CPU_KERNEL", raising=False)
    monkeypatch.setattr(cpp, "_compiler", lambda: None)
    cpp.reset()
    try:
        with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
            assert cpp.library() is None
        with kernels.use("auto"):
            x = torch.randn(50)
            y = fake_quant_pow2(x, torch.tensor(0.125), torch.tensor(2.0))
            assert _same_values(y, fake_quant_pow2_reference(x, torch.tensor(0.125),
                                                             torch.tensor(2.0)))  # fmt: skip
    finally:
        cpp.reset()


def test_compiled_library_is_cached(tmp_path, monkeypatch):
    if cpp._compiler() is None or os.environ.get("MIXQ_DISABLE_CPU_KERNEL"):
        pytest.skip("no C++ compiler, or the compiled kernels are disabled")
    monkeypatch.setenv("MIXQ_KERNEL_CACHE", str(tmp_path))
    cpp.reset()
    try:
        assert cpp.available()
        built = list(tmp_path.glob("mixq_kernels_*.so"))
        assert len(built) == 1
        mtime = built[0].stat().st_mtime_ns
        cpp.reset()
        assert cpp.available()
        assert built[0].stat().st_mtime_ns == mtime
    finally:
        cpp.reset()


def test_portable_single_threaded_build_matches_reference(tmp_path, monkeypatch):
    """The last-resort build (no ``-march=native``, no OpenMP) gives the same results."""
    if cpp._compiler() is None or os.environ.get("MIXQ_DISABLE_CPU_KERNEL"):
        pytest.skip("no C++ compiler, or the compiled kernels are disabled")
    monkeypatch.setenv("MIXQ_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp, "_VARIANTS", [[]])
    cpp.reset()
    try:
        with kernels.use("cpp"):
            x = _layout(_uniform_probe(0.125, 0.95, LARGE), "channels_last")
            _check(
                lambda x, a, b: fake_quant_uniform(x, a, b, True),
                lambda x, a, b: fake_quant_uniform_reference(x, a, b, True),
                x, [torch.tensor(0.125), torch.tensor(0.95)], _uniform_terms(0.125, 0.95, True),
            )  # fmt: skip
            x = _layout(_pow2_probe(2.0**-6, 1.0, SMALL), "strided")
            _check(
                lambda x, a, b: fake_quant_pow2(x, a, b, False, True),
                lambda x, a, b: fake_quant_pow2_reference(x, a, b, False, True),
                x, [torch.tensor(2.0**-6), torch.tensor(1.0)], _pow2_terms,
            )  # fmt: skip
    finally:
        cpp.reset()


def test_earlier_backend_names_are_aliases():
    """``cpu``/``compiled``/``torch`` (the names before ``cpp``/``inductor``/``eager``) still
    select the same backends; every backend module has the one interface."""
    for old, new in kernels.ALIASES.items():
        with kernels.use(old):
            assert kernels.mode() == new
    for name in ("cpp", "inductor", "eager"):
        impl = kernels.implementation(name)
        assert all(callable(getattr(impl, f)) for f in
                   ("uniform_fwd", "uniform_bwd", "pow2_fwd", "pow2_bwd"))  # fmt: skip
        assert isinstance(impl.DENSE, bool)
    with pytest.raises(ValueError, match="not one of"):
        kernels.set_mode("gpu")
