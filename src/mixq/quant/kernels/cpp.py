"""The ``cpp`` backend: build ``_cpp_source.SOURCE`` once with the C++ compiler, load it with
``ctypes`` and call it on the raw buffers of dense float32 tensors.

The library is a plain shared object (no Python or libtorch headers), so the first build takes
about a second. It is cached under ``$MIXQ_KERNEL_CACHE`` (default
``$XDG_CACHE_HOME/mixq/kernels`` or ``~/.cache/mixq/kernels``) in a file named by a hash of the
source, the compiler command and the CPU flags (the code is built with ``-march=native``).
With GCC it links ``libgomp.so.1``, which resolves to the OpenMP runtime torch has already
loaded (Linux wheels), so the kernels share torch's thread pool; they use
``torch.get_num_threads()`` threads. Builds are tried with ``-march=native -fopenmp``, then
``-fopenmp``, then neither (single-threaded kernels).

If no compiler is found, the build fails or the library does not load, :func:`library`
returns None (with one warning) and the ``eager`` backend is used instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from mixq.quant.kernels._cpp_source import SOURCE

ABI_VERSION = 3
_FLAGS = ["-O3", "-fno-trapping-math", "-ffp-contract=off", "-Wno-psabi", "-shared", "-fPIC",
          "-std=c++17"]  # fmt: skip
_VARIANTS = [["-march=native", "-fopenmp"], ["-fopenmp"], []]
"""Tried in order: native SIMD + OpenMP threads, then portable, then single-threaded."""

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where compiled kernels are cached."""
    env = os.environ.get("MIXQ_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mixq" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build(cxx: str, out: Path) -> str | None:
    """Compile to ``out`` (atomically); return an error message or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "mixq_kernels.cpp"
        src.write_text(SOURCE)
        tmp_lib = Path(tmp) / out.name
        errors = []
        for extra in _VARIANTS:
            cmd = [cxx, *_FLAGS, *extra, str(src), "-o", str(tmp_lib)]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{' '.join(cmd)}: {e}")
                continue
            if r.returncode == 0:
                os.replace(tmp_lib, out)
                return None
            errors.append(f"{' '.join(cmd)}:\n{r.stderr[-2000:]}")
        return "\n".join(errors)


def _remove_stale(keep: Path) -> None:
    """Delete other builds of the kernels not used for a week (other mixq versions may share
    the cache; a loaded copy stays mapped)."""
    week_ago = time.time() - 7 * 24 * 3600
    for old in keep.parent.glob("mixq_kernels_*.so"):
        with contextlib.suppress(OSError):
            if old != keep and old.stat().st_atime < week_ago:
                old.unlink()


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mixq_abi_version.restype = i32
    cap = ctypes.POINTER(ctypes.c_float)
    lib.mixq_uniform_fwd.argtypes = [p, p, i64, p, p, i32, cap, i32]
    lib.mixq_uniform_bwd.argtypes = [p, p, p, i64, p, p, i32, cap, p, i32]
    lib.mixq_pow2_fwd.argtypes = [p, p, i64, p, p, i32, i32, cap, i32]
    lib.mixq_pow2_bwd.argtypes = [p, p, p, i64, p, p, i32, i32, cap, p, i32]
    for f in ("mixq_uniform_fwd", "mixq_uniform_bwd", "mixq_pow2_fwd", "mixq_pow2_bwd"):
        getattr(lib, f).restype = None


def _load() -> ctypes.CDLL | None:
    if os.environ.get("MIXQ_DISABLE_CPU_KERNEL"):
        return None
    cxx = _compiler()
    if cxx is None:
        warnings.warn("mixq: no C++ compiler found; using the PyTorch kernels", stacklevel=3)
        return None
    key = "\n".join([SOURCE, cxx, " ".join(_FLAGS), str(_VARIANTS), _cpu_flags(),
                     str(ABI_VERSION)])  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / f"mixq_kernels_{digest}.so"
    try:
        if not path.exists():
            err = _build(cxx, path)
            if err is None:
                _remove_stale(path)
            else:
                warnings.warn(f"mixq: building the CPU kernels failed; using the PyTorch "
                              f"kernels.\n{err}", stacklevel=3)  # fmt: skip
                return None
        lib = ctypes.CDLL(str(path))
        _declare(lib)
        if lib.mixq_abi_version() != ABI_VERSION:
            raise OSError("ABI version mismatch")
    except OSError as e:
        warnings.warn(f"mixq: loading the CPU kernels failed ({e}); using the PyTorch kernels",
                      stacklevel=3)  # fmt: skip
        return None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first call), or None when unavailable."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the compiled CPU kernels can be used."""
    return library() is not None


def reset() -> None:
    """Forget the loaded library (tests use this to exercise the fallback)."""
    with _lock:
        _state.clear()


# -- wrappers: dense float32 CPU tensors only (checked by the caller) ----------------------------


#: Inputs must be one dense block of memory (the kernels index ``x`` and ``g`` linearly).
DENSE = True
#: The four functions take ``cap``: quantize ``min(x, cap)`` in the same pass (a ReLU6).
CAP = True


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _cap(cap: float | None) -> ctypes._Pointer | None:
    return None if cap is None else ctypes.pointer(ctypes.c_float(cap))


def _as_shapes(out: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The two sums in ``out`` shaped as the scalars ``a`` and ``b`` (one ``unbind`` when they
    are 0-d, as the quantizers' are: every operation here runs once per quantizer and step)."""
    ga, gb = out.unbind()
    ga = ga if a.dim() == 0 else ga.reshape(a.shape)
    return ga, (gb if b.dim() == 0 else gb.reshape(b.shape))


def uniform_fwd(
    x: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool, cap: float | None = None
) -> Tensor:
    """``y = d_q * round(clip(x, x_lo, x_hi) / d_q)``, of ``min(x, cap)`` when ``cap`` is
    given; ``x`` dense, same layout out."""
    y = torch.empty_like(x)
    library().mixq_uniform_fwd(_ptr(x), _ptr(y), x.numel(), _ptr(d_q), _ptr(x_hi), int(signed),
                               _cap(cap), torch.get_num_threads())  # fmt: skip
    return y


def uniform_bwd(
    x: Tensor, g: Tensor, d_q: Tensor, x_hi: Tensor, signed: bool, need_x: bool,
    cap: float | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
    """``(dL/dx or None, dL/dd_q, dL/dx_hi)``; ``g`` has the layout of ``x``. With ``cap``
    those of ``x -> Q(min(x, cap))``: ``dL/dx`` is 0 where ``x > cap`` (as ``clamp``'s)."""
    gx = torch.empty_like(x) if need_x else None
    out = torch.empty(2, dtype=torch.float32)
    library().mixq_uniform_bwd(_ptr(x), _ptr(g), _ptr(gx) if need_x else None, x.numel(),
                               _ptr(d_q), _ptr(x_hi), int(signed), _cap(cap), _ptr(out),
                               torch.get_num_threads())  # fmt: skip
    return (gx, *_as_shapes(out, d_q, x_hi))


def _at(v: Tensor, i: int) -> int:
    """The address of entry ``i`` of the dense float32 vector ``v``."""
    return v.data_ptr() + 4 * i


def uniform_fwd_at(x: Tensor, d_q: Tensor, x_hi: Tensor, i: int, signed: bool) -> Tensor:
    """:func:`uniform_fwd` with the scalars ``d_q[i]``, ``x_hi[i]`` of two dense float32 vectors
    (a quantizer group's derived values; no 0-d tensors are made)."""
    y = torch.empty_like(x)
    library().mixq_uniform_fwd(_ptr(x), _ptr(y), x.numel(), _at(d_q, i), _at(x_hi, i),
                               int(signed), None, torch.get_num_threads())  # fmt: skip
    return y


def uniform_bwd_at(
    x: Tensor, g: Tensor, d_q: Tensor, x_hi: Tensor, i: int, signed: bool, need_x: bool,
    sums: Tensor, row: int,
) -> Tensor | None:  # fmt: skip
    """:func:`uniform_bwd` with the scalars at entry ``i`` (as :func:`uniform_fwd_at`); the two
    sums go to ``sums[row, 0]``, ``sums[row, 1]`` of a dense ``[n, 2]`` float32 tensor."""
    gx = torch.empty_like(x) if need_x else None
    library().mixq_uniform_bwd(_ptr(x), _ptr(g), _ptr(gx) if need_x else None, x.numel(),
                               _at(d_q, i), _at(x_hi, i), int(signed), None, _at(sums, 2 * row),
                               torch.get_num_threads())  # fmt: skip
    return gx


def pow2_fwd_at(
    x: Tensor, x_min: Tensor, x_max: Tensor, i: int, signed: bool, with_zero: bool
) -> Tensor:
    """:func:`pow2_fwd` with the scalars at entry ``i`` (as :func:`uniform_fwd_at`)."""
    y = torch.empty_like(x)
    library().mixq_pow2_fwd(_ptr(x), _ptr(y), x.numel(), _at(x_min, i), _at(x_max, i),
                            int(signed), int(with_zero), None,
                            torch.get_num_threads())  # fmt: skip
    return y


def pow2_bwd_at(
    x: Tensor, g: Tensor, x_min: Tensor, x_max: Tensor, i: int, signed: bool, with_zero: bool,
    need_x: bool, sums: Tensor, row: int,
) -> Tensor | None:  # fmt: skip
    """:func:`pow2_bwd` with the scalars at entry ``i``, the sums to ``sums[row]``."""
    gx = torch.empty_like(x) if need_x else None
    library().mixq_pow2_bwd(_ptr(x), _ptr(g), _ptr(gx) if need_x else None, x.numel(),
                            _at(x_min, i), _at(x_max, i), int(signed), int(with_zero), None,
                            _at(sums, 2 * row), torch.get_num_threads())  # fmt: skip
    return gx


def pow2_fwd(
    x: Tensor, x_min: Tensor, x_max: Tensor, signed: bool, with_zero: bool,
    cap: float | None = None,
) -> Tensor:  # fmt: skip
    """Power-of-two fake quantization of a dense float32 tensor (of ``min(x, cap)``)."""
    y = torch.empty_like(x)
    library().mixq_pow2_fwd(_ptr(x), _ptr(y), x.numel(), _ptr(x_min), _ptr(x_max), int(signed),
                            int(with_zero), _cap(cap), torch.get_num_threads())  # fmt: skip
    return y


def pow2_bwd(
    x: Tensor, g: Tensor, x_min: Tensor, x_max: Tensor, signed: bool, with_zero: bool,
    need_x: bool, cap: float | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
    """``(dL/dx or None, sum_R1 g s, sum_R3 g s)``; ``g`` has the layout of ``x`` (with
    ``cap``: of ``min(x, cap)``, ``dL/dx`` 0 where ``x > cap``)."""
    gx = torch.empty_like(x) if need_x else None
    out = torch.empty(2, dtype=torch.float32)
    library().mixq_pow2_bwd(_ptr(x), _ptr(g), _ptr(gx) if need_x else None, x.numel(),
                            _ptr(x_min), _ptr(x_max), int(signed), int(with_zero), _cap(cap),
                            _ptr(out),
                            torch.get_num_threads())  # fmt: skip
    return (gx, *_as_shapes(out, x_min, x_max))
