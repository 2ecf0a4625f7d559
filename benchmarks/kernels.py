"""Time each fake-quantization backend alone: forward + backward of one activation tensor.

For every backend of :mod:`mixq.quant.kernels` (``cpp``: the C++/OpenMP kernels; ``inductor``:
``torch.compile`` of the eager path, i.e. PyTorch's own generated code; ``eager``: plain
PyTorch operations; ``reference``: the spec op by op), the median time of
``y = fake_quant(x); y.backward(g)`` on a float32 tensor the size of one ResNet-20
activation (``[B, 16, 32, 32]``), uniform and power-of-two, interleaved rounds in one
process. ``uniform`` has a step that is no power of two (``d_q = 0.05``), ``uniform 2^k`` the
power-of-two step of every ``pow2_step`` quantizer (the paper's default, ``d_q = 2^-4``).

``--baseline DIR`` also builds the C++ kernels of another mixq source tree (e.g. ``git archive``
of the code before a change) and times them as the backend ``cpp@baseline``, interleaved with
this tree's, after checking that both give the same outputs bit for bit::

    OMP_NUM_THREADS=1 python benchmarks/kernels.py --threads 1 --batch 128 --rounds 7
    mkdir -p /tmp/base && git archive main | tar -x -C /tmp/base
    OMP_NUM_THREADS=1 python benchmarks/kernels.py --threads 1 --batch 16 --rounds 15 \
        --backends cpp --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import runpy
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from mixq.quant import kernels
from mixq.quant.functional import fake_quant_pow2, fake_quant_uniform
from mixq.quant.kernels import cpp

BACKENDS = ("cpp", "inductor", "eager", "reference")
BASELINE = "cpp@baseline"


def _ops(x: torch.Tensor) -> dict[str, callable]:
    d, hi = torch.tensor(0.05, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    d2, hi3 = torch.tensor(2.0**-4, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    lo, hi2 = torch.tensor(2.0**-6, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    return {
        "uniform": lambda: fake_quant_uniform(x, d, hi, True),
        "uniform 2^k": lambda: fake_quant_uniform(x, d2, hi3, True),
        "pow2": lambda: fake_quant_pow2(x, lo, hi2, True, True),
    }


def build_baseline(tree: Path, out_dir: Path) -> ctypes.CDLL:
    """Compile the C++ kernel source of the mixq tree ``tree`` (same flags as this one's)."""
    src = tree / "src" / "mixq" / "quant" / "kernels" / "_cpp_source.py"
    source = runpy.run_path(str(src))["SOURCE"]  # a module of one string constant
    cxx = cpp._compiler()
    if cxx is None:
        raise SystemExit("--baseline: no C++ compiler")
    out = out_dir / "mixq_kernels_baseline.so"
    own, cpp.SOURCE = cpp.SOURCE, source  # _build compiles the module's SOURCE
    try:
        err = cpp._build(cxx, out)
    finally:
        cpp.SOURCE = own
    if err is not None:
        raise SystemExit(f"--baseline: building {src} failed:\n{err}")
    lib = ctypes.CDLL(str(out))
    cpp._declare(lib)
    if lib.mixq_abi_version() != cpp.ABI_VERSION:
        raise SystemExit(f"--baseline: {src} has another kernel ABI than this tree")
    return lib


@contextlib.contextmanager
def _backend(name: str, baseline: ctypes.CDLL | None) -> Iterator[None]:
    """Select ``name``; ``cpp@baseline`` is the ``cpp`` backend on the baseline's library."""
    if name != BASELINE:
        with kernels.use(name):
            yield
        return
    own = cpp.library
    cpp.library = lambda: baseline
    try:
        with kernels.use("cpp"):
            yield
    finally:
        cpp.library = own


def _check_same(ops: dict, g: torch.Tensor, x: torch.Tensor, baseline: ctypes.CDLL) -> None:
    """Outputs and gradients of ``cpp`` and ``cpp@baseline`` equal bit for bit."""
    for kind, op in ops.items():
        res = []
        for b in ("cpp", BASELINE):
            with _backend(b, baseline):
                x.grad = None
                y = op()
                y.backward(g)
                res.append((y.detach().clone(), x.grad.clone()))
        (y0, g0), (y1, g1) = res
        if not (torch.equal(y0, y1) and torch.equal(g0, g1)):
            raise SystemExit(f"{kind}: this tree's cpp kernels differ from the baseline's")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=5, help="forward+backward per round and backend")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list")
    p.add_argument("--baseline", type=Path, default=None,
                   help=f"a mixq source tree whose C++ kernels to time as {BASELINE}")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 16, 32, 32, requires_grad=True)
    g = torch.randn_like(x)
    ops = _ops(x)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    tmp = tempfile.TemporaryDirectory()
    baseline = None
    if args.baseline is not None:
        baseline = build_baseline(args.baseline, Path(tmp.name))
        _check_same(ops, g, x, baseline)
        backends.append(BASELINE)
    times: dict[tuple[str, str], list[float]] = {}
    for op in ops.values():
        for b in backends:
            with _backend(b, baseline):
                for _ in range(3):  # warm-up: builds / compiles
                    op().backward(g)
    for r in range(args.rounds):
        for kind, op in ops.items():
            k = r % len(backends)
            for b in backends[k:] + backends[:k]:
                with _backend(b, baseline):
                    t = time.perf_counter()
                    for _ in range(args.reps):
                        op().backward(g)
                    times.setdefault((kind, b), []).append((time.perf_counter() - t) / args.reps)
    print(f"fake-quant forward+backward, x = [{args.batch}, 16, 32, 32] float32, "
          f"{args.threads} thread(s), median of {args.rounds} rounds; {kernels.describe()}")
    ref = "eager" if "eager" in backends else backends[0]
    print("| backend | " + " | ".join(f"{k} ms | vs {ref}" for k in ops) + " |")
    print("|---|" + "---|---|" * len(ops))
    for b in backends:
        cells = []
        for kind in ops:
            t = statistics.median(times[(kind, b)]) * 1e3
            cells += [f"{t:.3f}", f"{t / (statistics.median(times[(kind, ref)]) * 1e3):.2f}x"]
        print(f"| {b} | " + " | ".join(cells) + " |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
