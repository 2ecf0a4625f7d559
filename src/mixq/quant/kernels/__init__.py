"""Selection of the fake-quantization kernels used by ``mixq.quant.functional``.

Backends (all give the values of ``functional_reference.py``; see ``tests/quant/
test_fast_paths.py``):

* ``"cpu"``: the compiled C++/OpenMP kernels of ``cpu.py`` (CPU, float32, one fused pass each
  for the forward and the backward);
* ``"compiled"``: the functions of ``torch_path.py`` through ``torch.compile`` (``compiled.py``;
  fused Triton kernels on CUDA, inductor C++ on CPU);
* ``"torch"``: the pure-PyTorch fast path of ``torch_path.py`` (any device and float dtype);
* ``"reference"``: ``functional_reference.py``, the spec written op by op (the implementation
  before the fast paths; kept for tests and side-by-side benchmarks).

The mode comes from the environment variable ``MIXQ_KERNEL`` (default ``auto``: ``cpu`` where it
applies and has been built, ``compiled`` for CUDA tensors when Triton is importable, else
``torch``) and can be changed at run time with
:func:`set_mode` or, for a block, :func:`use`. ``MIXQ_KERNEL=cpu`` requires the compiled
kernels (an error if they cannot be built) where they apply; ``MIXQ_KERNEL=compiled`` uses the
compiled path on every device (an error on CUDA without Triton; a compilation failure warns
once and falls back to ``torch``). Under ``torch.compile`` the
PyTorch path is used (traceable). ``MIXQ_DISABLE_CPU_KERNEL=1`` never builds the compiled
kernels; ``MIXQ_KERNEL_CACHE`` sets where they are cached (see ``cpu.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from mixq.quant.kernels import compiled, cpu

MODES = ("auto", "cpu", "compiled", "torch", "reference")

_mode = os.environ.get("MIXQ_KERNEL", "auto").strip().lower() or "auto"
if _mode not in MODES:
    raise ValueError(f"MIXQ_KERNEL={_mode!r} is not one of {list(MODES)}")


def mode() -> str:
    """The current mode: ``auto``, ``cpu``, ``compiled``, ``torch`` or ``reference``."""
    return _mode


def set_mode(new: str) -> str:
    """Set the mode (one of ``MODES``); returns the previous one."""
    global _mode
    if new not in MODES:
        raise ValueError(f"kernel mode {new!r} is not one of {list(MODES)}")
    old, _mode = _mode, new
    return old


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
        return "torch"  # traceable: under torch.compile the PyTorch path is fused by inductor
    if _mode in ("auto", "cpu") and _cpu_ok(x, *scalars):
        if cpu.available():
            return "cpu"
        if _mode == "cpu":
            raise RuntimeError("MIXQ_KERNEL=cpu but the compiled CPU kernels are unavailable")
    if _mode == "compiled" or (_mode == "auto" and x.device.type == "cuda"):
        if compiled.available(x.device):
            return "compiled"
        if _mode == "compiled" and x.device.type == "cuda" and not compiled.has_triton():
            raise RuntimeError(
                "MIXQ_KERNEL=compiled needs Triton for CUDA tensors (pip install triton), "
                "or use MIXQ_KERNEL=torch"
            )
    return "torch"


def describe() -> str:
    """One line for logs and benchmark headers: the mode and what the CPU path resolves to."""
    if _mode == "reference":
        return "reference"
    if _mode == "compiled":
        why = f" (disabled: {compiled.failure()})" if compiled.failure() else ""
        return f"compiled: torch.compile of the PyTorch path on every device{why}"
    lib = "compiled C++/OpenMP" if cpu.available() else "PyTorch (compiled kernels unavailable)"
    cpu_part = f"CPU float32 -> {lib if _mode != 'torch' else 'PyTorch'}"
    if _mode == "torch":
        return f"torch: {cpu_part}; otherwise PyTorch"
    fused = compiled.has_triton() and not compiled.failure()
    gpu = "torch.compile (Triton)" if fused else "PyTorch"
    return f"{_mode}: {cpu_part}; CUDA -> {gpu}; otherwise PyTorch"


__all__ = ["MODES", "backend", "describe", "mode", "set_mode", "use"]
