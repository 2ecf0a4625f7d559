"""The ``inductor`` backend: the ``eager`` functions through ``torch.compile`` (PyTorch's own
generated code).

On CUDA, inductor turns each function into fused Triton kernels: the forward
``y = d_q * round(clip(x, x_lo, x_hi) / d_q)`` becomes one elementwise kernel, and the
backward one kernel that writes ``dL/dx`` and reduces ``sum g (y - c) / d_q`` and
``sum_{out} g sign(x)`` (spec 3.1; pow-2: spec 3.5) in the same pass over ``x`` and ``g``,
instead of the eight to twelve separate kernels of the eager PyTorch path. On CPU inductor
generates C++/OpenMP; that is how the path is tested on machines without a GPU
(``tests/quant/test_fast_paths.py``: same values and gradients as ``functional_reference``).

Inputs are dense (contiguous or channels_last) and are passed as 1-D views of their memory,
compiled with ``dynamic=True``: one graph serves every shape and memory format, so the ~20
tensor shapes of a ResNet do not run into dynamo's recompile limit (8 per function). Each
``signed``/``with_zero`` combination is its own top-level function (so its own budget);
``need_x``, the dtype, the device and inductor's size buckets add a few graphs each. The first
call of each costs a compilation (seconds; cached by inductor on disk).

If compilation fails (no Triton, no C++ compiler, an inductor error), :func:`call` warns once,
disables this path for the process and runs the eager PyTorch path instead, so that training
never stops because of it. Select it with ``MIXQ_KERNEL=inductor``; ``auto`` uses it for CUDA
tensors when Triton is importable.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mixq.quant.kernels import eager

#: Inputs are passed as 1-D views of their memory, so they must be dense.
DENSE = True

_lock = threading.Lock()
_compiled: dict[str, Callable[..., Any]] = {}
_failure: list[str] = []  # the reason compilation was disabled, if it was


# One top-level function per flag combination: dynamo counts recompilations per code object
# (limit 8), so that flags, like shapes (dynamic, and flattened to 1-D below), never add up.
def _uniform_fwd_s(x, d_q, x_hi):
    return eager.uniform_fwd(x, d_q, x_hi, True)


def _uniform_fwd_u(x, d_q, x_hi):
    return eager.uniform_fwd(x, d_q, x_hi, False)


def _uniform_bwd_s(x, g, d_q, x_hi, need_x):
    return eager.uniform_bwd(x, g, d_q, x_hi, True, need_x)


def _uniform_bwd_u(x, g, d_q, x_hi, need_x):
    return eager.uniform_bwd(x, g, d_q, x_hi, False, need_x)


def _pow2_fwd_s(x, x_min, x_max):
    return eager.pow2_fwd(x, x_min, x_max, True, False)


def _pow2_fwd_sz(x, x_min, x_max):
    return eager.pow2_fwd(x, x_min, x_max, True, True)


def _pow2_fwd_u(x, x_min, x_max):
    return eager.pow2_fwd(x, x_min, x_max, False, False)


def _pow2_fwd_uz(x, x_min, x_max):
    return eager.pow2_fwd(x, x_min, x_max, False, True)


def _pow2_bwd_s(x, g, x_min, x_max, need_x):
    return eager.pow2_bwd(x, g, x_min, x_max, True, False, need_x)


def _pow2_bwd_sz(x, g, x_min, x_max, need_x):
    return eager.pow2_bwd(x, g, x_min, x_max, True, True, need_x)


def _pow2_bwd_u(x, g, x_min, x_max, need_x):
    return eager.pow2_bwd(x, g, x_min, x_max, False, False, need_x)


def _pow2_bwd_uz(x, g, x_min, x_max, need_x):
    return eager.pow2_bwd(x, g, x_min, x_max, False, True, need_x)


_KERNELS = {f.__name__: f for f in (
    _uniform_fwd_s, _uniform_fwd_u, _uniform_bwd_s, _uniform_bwd_u,
    _pow2_fwd_s, _pow2_fwd_sz, _pow2_fwd_u, _pow2_fwd_uz,
    _pow2_bwd_s, _pow2_bwd_sz, _pow2_bwd_u, _pow2_bwd_uz,
)}  # fmt: skip


def has_triton() -> bool:
    """Whether inductor can generate GPU (Triton) kernels in this environment."""
    try:
        from torch.utils._triton import has_triton as _has_triton
    except ImportError:  # pragma: no cover - very old torch
        return False
    return bool(_has_triton())


def available(device: torch.device) -> bool:
    """Whether the compiled path is enabled for tensors on ``device``.

    False after a compilation failure in this process; on CUDA also without Triton.
    """
    if _failure:
        return False
    if device.type == "cuda":
        return has_triton()
    return device.type == "cpu"


def failure() -> str | None:
    """Why the compiled path was disabled in this process, or None."""
    return _failure[0] if _failure else None


def reset() -> None:
    """Forget compiled functions and any recorded failure (tests; after fixing the toolchain)."""
    with _lock:
        _compiled.clear()
        _failure.clear()


def _get(name: str) -> Callable[..., Any]:
    fn = _compiled.get(name)
    if fn is None:
        with _lock:
            fn = _compiled.get(name)
            if fn is None:
                fn = torch.compile(_KERNELS[name], dynamic=True, fullgraph=True)
                _compiled[name] = fn
    return fn


def _run(name: str, eager: Callable[..., Any], *args: Any) -> Any:
    """The compiled kernel ``name`` on ``args``; ``eager(*args)`` after a compilation failure."""
    if not _failure:
        try:
            return _get(name)(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # an inductor/Triton/compiler failure: fall back, once
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            reason = f"{type(e).__name__}: {first}"
            with _lock:
                if not _failure:
                    _failure.append(reason)
            warnings.warn(
                f"mixq: compiling the fake-quantization kernels failed ({reason}); using the "
                "PyTorch kernels (set MIXQ_KERNEL=eager to skip the attempt)",
                RuntimeWarning,
                stacklevel=4,
            )
    return eager(*args)


def _flat(t: Tensor) -> Tensor:
    """The dense ``t`` (contiguous or channels_last) as a 1-D, detached alias of its memory.

    Detached (no ``_base``, ``requires_grad=False``) so that dynamo's guards see one plain
    tensor whatever ``t`` was a view of or whether it required a gradient.
    """
    return t.as_strided((t.numel(),), (1,)).detach()


def _unflat(y: Tensor, like: Tensor) -> Tensor:
    """The fresh 1-D ``y`` viewed with the shape and strides (memory format) of ``like``."""
    return y.as_strided(like.shape, like.stride())


def uniform_fwd(x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool) -> Tensor:
    """``eager.uniform_fwd`` compiled; ``x`` dense (contiguous or channels_last)."""
    name = "_uniform_fwd_s" if signed else "_uniform_fwd_u"
    return _unflat(_run(name, _KERNELS[name], _flat(x), d_q.detach(), x_hi.detach()), x)


def uniform_bwd(x: Tensor, g: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool, need_x: bool
                ) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
    """``eager.uniform_bwd`` compiled; ``x`` dense and ``g`` laid out like it."""
    name = "_uniform_bwd_s" if signed else "_uniform_bwd_u"
    gx, g_dq, g_hi = _run(name, _KERNELS[name], _flat(x), _flat(g), d_q.detach(), x_hi.detach(),
                          need_x)  # fmt: skip
    return (_unflat(gx, x) if gx is not None else None), g_dq, g_hi


def _pow2_name(kind: str, signed: bool, with_zero: bool) -> str:
    return f"_pow2_{kind}_{'s' if signed else 'u'}{'z' if with_zero else ''}"


def pow2_fwd(x: Tensor, x_min: Tensor, x_max: Tensor, signed: bool, with_zero: bool) -> Tensor:
    """``eager.pow2_fwd`` compiled; ``x`` dense (contiguous or channels_last)."""
    name = _pow2_name("fwd", signed, with_zero)
    return _unflat(_run(name, _KERNELS[name], _flat(x), x_min.detach(), x_max.detach()), x)


def pow2_bwd(x: Tensor, g: Tensor, x_min: Tensor, x_max: Tensor, signed: bool, with_zero: bool,
             need_x: bool) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
    """``eager.pow2_bwd`` compiled; ``x`` dense and ``g`` laid out like it."""
    name = _pow2_name("bwd", signed, with_zero)
    gx, g_min, g_max = _run(name, _KERNELS[name], _flat(x), _flat(g), x_min.detach(),
                            x_max.detach(), need_x)  # fmt: skip
    return (_unflat(gx, x) if gx is not None else None), g_min, g_max


__all__ = ["available", "failure", "has_triton", "pow2_bwd", "pow2_fwd", "reset", "uniform_bwd",
           "uniform_fwd"]  # fmt: skip
