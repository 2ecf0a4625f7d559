"""The fake-quantization backends behind ``mixq.quant.functional``, and which one runs.

Every backend is a module with the same four functions and one flag (the interface
:class:`Backend`): ``uniform_fwd(x, d_q, x_hi, signed) -> y``,
``uniform_bwd(x, g, d_q, x_hi, signed, need_x) -> (dL/dx | None, dL/dd_q, dL/dx_hi)``,
``pow2_fwd(x, x_min, x_max, signed, with_zero) -> y``,
``pow2_bwd(x, g, x_min, x_max, signed, with_zero, need_x) -> (dL/dx | None, dL/dx_min,
dL/dx_max)``, and ``DENSE`` (inputs must be one dense block of memory). All give the values of
``functional_reference.py`` (``tests/quant/test_fast_paths.py``):

* ``"cpp"``: C++/OpenMP kernels built once with the system's compiler and called through
  ``ctypes`` (``cpp.py``; CPU, float32; one fused pass forward, one backward that also reduces
  the two parameter gradients);
* ``"inductor"``: the ``eager`` functions through ``torch.compile``, i.e. PyTorch's own
  generated code (``inductor.py``; fused Triton kernels on CUDA, C++ on CPU);
* ``"eager"``: plain PyTorch operations (``eager.py``; any device and float dtype);
* ``"reference"``: ``functional_reference.py``, the spec written op by op (for tests and
  side-by-side benchmarks).

Measured on this project's 2-core CPU (``benchmarks/kernels.py``, ``docs/speed.md``): ``cpp``
runs the forward + backward of one ResNet-20 activation 1.3-2x faster than ``inductor`` and
5-16x faster than ``eager``, so ``auto`` (the default of the environment variable
``MIXQ_KERNEL``) uses ``cpp`` for float32 CPU tensors when it builds, ``inductor`` for CUDA
tensors when Triton is importable, else ``eager``. ``MIXQ_KERNEL=cpp|inductor|eager|reference``
forces one (``cpp`` errors where it cannot build; ``inductor`` errors on CUDA without Triton
and warns once and falls back to ``eager`` when compilation fails); :func:`set_mode` and
:func:`use` change it at run time. Under ``torch.compile`` (``compile: true``) the ``eager``
path is traced and fused with the rest of the step. The older names ``cpu``, ``compiled`` and
``torch`` still select ``cpp``, ``inductor`` and ``eager``. ``MIXQ_DISABLE_CPU_KERNEL=1``
never builds the ``cpp`` kernels; ``MIXQ_KERNEL_CACHE`` sets where they are cached.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Protocol

import torch
from torch import Tensor

from mixq.quant.kernels import cpp, eager, inductor

MODES = ("auto", "cpp", "inductor", "eager", "reference")
ALIASES = {"cpu": "cpp", "compiled": "inductor", "torch": "eager"}
"""Earlier names of the backends, still accepted."""

_IMPLEMENTATIONS: dict[str, ModuleType] = {"cpp": cpp, "inductor": inductor, "eager": eager}


class Backend(Protocol):
    """What every backend module provides (see the module docstring)."""

    DENSE: bool

    def uniform_fwd(self, x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool) -> Tensor: ...

    def uniform_bwd(
        self, x: Tensor, g: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool, need_x: bool
    ) -> tuple[Tensor | None, Tensor, Tensor]: ...

    def pow2_fwd(
        self, x: Tensor, x_min: Tensor, x_max: Tensor, signed: bool, with_zero: bool
    ) -> Tensor: ...

    def pow2_bwd(
        self, x: Tensor, g: Tensor, x_min: Tensor, x_max: Tensor, signed: bool,
        with_zero: bool, need_x: bool,
    ) -> tuple[Tensor | None, Tensor, Tensor]: ...  # fmt: skip


def _canonical(name: str, what: str) -> str:
    name = ALIASES.get(name, name)
    if name not in MODES:
        raise ValueError(f"{what} {name!r} is not one of {list(MODES)}")
    return name


_mode = _canonical(os.environ.get("MIXQ_KERNEL", "auto").strip().lower() or "auto", "MIXQ_KERNEL")


def mode() -> str:
    """The current mode: ``auto``, ``cpp``, ``inductor``, ``eager`` or ``reference``."""
    return _mode


def set_mode(new: str) -> str:
    """Set the mode (one of ``MODES``, or an alias); returns the previous one."""
    global _mode
    old, _mode = _mode, _canonical(new, "kernel mode")
    return old


def implementation(name: str) -> Backend:
    """The module of backend ``name`` (``cpp``, ``inductor`` or ``eager``)."""
    return _IMPLEMENTATIONS[name]  # type: ignore[return-value]


@contextmanager
def use(new: str) -> Iterator[None]:
    """Use kernel mode ``new`` inside a ``with`` block."""
    old = set_mode(new)
    try:
        yield
    finally:
        set_mode(old)


def _cpu_scalar(s: Tensor) -> bool:
    return s.device.type == "cpu" and s.dtype == torch.float32 and s.numel() == 1


def _cpu_ok(x: Tensor, *scalars: Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and all(_cpu_scalar(s) for s in scalars)
    )


def backend(x: Tensor, *scalars: Tensor) -> str:
    """The backend that handles input ``x`` with scalar parameters ``scalars`` now."""
    if _mode == "reference":
        return "reference"
    if torch.compiler.is_compiling():
        return "eager"  # traceable: under torch.compile the eager path is fused by inductor
    if _mode in ("auto", "cpp") and _cpu_ok(x, *scalars):
        if cpp.available():
            return "cpp"
        if _mode == "cpp":
            raise RuntimeError("MIXQ_KERNEL=cpp but the C++ kernels are unavailable")
    if _mode == "inductor" or (_mode == "auto" and x.device.type == "cuda"):
        if inductor.available(x.device):
            return "inductor"
        if _mode == "inductor" and x.device.type == "cuda" and not inductor.has_triton():
            raise RuntimeError(
                "MIXQ_KERNEL=inductor needs Triton for CUDA tensors (pip install triton), "
                "or use MIXQ_KERNEL=eager"
            )
    return "eager"


def describe() -> str:
    """One line for logs and benchmark headers: the mode and what the CPU path resolves to."""
    if _mode == "reference":
        return "reference"
    if _mode == "inductor":
        why = f" (disabled: {inductor.failure()})" if inductor.failure() else ""
        return f"inductor: torch.compile of the eager path on every device{why}"
    lib = "cpp (C++/OpenMP)" if cpp.available() else "eager (C++ kernels unavailable)"
    cpu_part = f"CPU float32 -> {lib if _mode != 'eager' else 'eager'}"
    if _mode == "eager":
        return f"eager: {cpu_part}; otherwise eager"
    fused = inductor.has_triton() and not inductor.failure()
    gpu = "inductor (Triton)" if fused else "eager"
    return f"{_mode}: {cpu_part}; CUDA -> {gpu}; otherwise eager"


__all__ = [
    "ALIASES", "MODES", "Backend", "backend", "describe", "implementation", "mode", "set_mode",
    "use",
]  # fmt: skip
