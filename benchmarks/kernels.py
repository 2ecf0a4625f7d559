"""Time each fake-quantization backend alone: forward + backward of one activation tensor.

For every backend of :mod:`mixq.quant.kernels` (``cpp``: the C++/OpenMP kernels; ``inductor``:
``torch.compile`` of the eager path, i.e. PyTorch's own generated code; ``eager``: plain
PyTorch operations; ``reference``: the spec op by op), the median time of
``y = fake_quant(x); y.backward(g)`` on a float32 tensor the size of one ResNet-20
activation (``[B, 16, 32, 32]``), uniform and power-of-two, interleaved rounds in one
process::

    OMP_NUM_THREADS=1 python benchmarks/kernels.py --threads 1 --batch 128 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mixq.quant import kernels
from mixq.quant.functional import fake_quant_pow2, fake_quant_uniform

BACKENDS = ("cpp", "inductor", "eager", "reference")


def _ops(x: torch.Tensor) -> dict[str, callable]:
    d, hi = torch.tensor(0.05, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    lo, hi2 = torch.tensor(2.0**-6, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    return {
        "uniform": lambda: fake_quant_uniform(x, d, hi, True),
        "pow2": lambda: fake_quant_pow2(x, lo, hi2, True, True),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=5, help="forward+backward per round and backend")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 16, 32, 32, requires_grad=True)
    g = torch.randn_like(x)
    ops = _ops(x)
    times: dict[tuple[str, str], list[float]] = {}
    for op in ops.values():
        for b in BACKENDS:
            with kernels.use(b):
                for _ in range(3):  # warm-up: builds / compiles
                    op().backward(g)
    for r in range(args.rounds):
        for kind, op in ops.items():
            order = BACKENDS[r % 4:] + BACKENDS[: r % 4]
            for b in order:
                with kernels.use(b):
                    t = time.perf_counter()
                    for _ in range(args.reps):
                        op().backward(g)
                    times.setdefault((kind, b), []).append((time.perf_counter() - t) / args.reps)
    print(f"fake-quant forward+backward, x = [{args.batch}, 16, 32, 32] float32, "
          f"{args.threads} thread(s), median of {args.rounds} rounds; {kernels.describe()}")
    print("| backend | uniform ms | vs eager | pow-2 ms | vs eager |")
    print("|---|---|---|---|---|")
    for b in BACKENDS:
        u = statistics.median(times[("uniform", b)]) * 1e3
        q = statistics.median(times[("pow2", b)]) * 1e3
        ut = statistics.median(times[("uniform", "eager")]) * 1e3
        qt = statistics.median(times[("pow2", "eager")]) * 1e3
        print(f"| {b} | {u:.2f} | {u / ut:.2f}x | {q:.2f} | {q / qt:.2f}x |")


if __name__ == "__main__":
    main()
