"""Time one full training step of ResNet-20 (CIFAR, batch 128) for float, mixq and LSQ.

A step is ``zero_grad -> forward -> cross-entropy (+ memory penalty) -> backward ->
(quantizer weight decay and gradient clipping) -> SGD step -> quantizer projection``, the loop
of spec 3.6, run by :class:`mixq.QATStep` on :func:`mixq.param_groups` as the trainer does
(weight decay 2e-4, momentum 0.9). The learned-bitwidth mixq variants add
``Budget.parse(weight="70KB").penalty(model)`` to the loss, clip the quantizer gradients (spec
3.6 step 4) and project every quantizer after the step.

All variants live in one process and are timed in interleaved rounds (warmup, then ``R``
rounds in which every variant runs ``--steps`` steps, in a rotating order), so that the noise of
a shared machine hits them alike. Reported: the median ms/step over the rounds and the median of
the per-round ratios to the float step of the same round.

Variants:

* ``float``: ``mixq.models.resnet20()``.
* ``mixq-w``: uniform ``d_qmax`` weights (and biases) only, activations float.
* ``mixq-wa``: uniform ``d_qmax`` weights and activations (the paper's default).
* ``mixq-p2``: power-of-two ``qmin_qmax`` weights and activations.
* ``mixq-inputs`` (not in the default list): ``activation_sites="inputs"``, every layer input
  and activation output quantized (``--model mobilenet_v2`` for a model where that adds sites).
* ``mixq-wa-static`` / ``mixq-inputs-static`` (not in the default list): ``mixq-wa`` /
  ``mixq-inputs`` with ``learnable=False`` for every quantizer (no quantizer parameter
  trained: no gradients, clip, projection or optimizer work for them; the penalty has nothing
  to move), what the fake quantization costs without the learned scalars.
* ``*-ref``: the same with ``MIXQ_KERNEL=reference`` (the implementation before the fast
  paths), selected per step with :func:`mixq.quant.kernels.use`.
* ``*-eager`` / ``*-inductor``: the same with the eager PyTorch path or its ``torch.compile``
  version (Triton kernels on CUDA; the default on CUDA when Triton is importable), to compare
  the GPU paths side by side. The compilation happens during the warm-up steps.
* ``*-compile`` (``float-compile``, ``mixq-wa-compile``, ``mixq-p2-compile``): the whole step
  compiled, as ``compile: true`` in a training config: ``torch.compile`` of the model and of
  the penalty and the quantizer updates (``mixq.qat.QATStep``).
* ``*-ema`` (``float-ema``, ``mixq-wa-ema``): the same plus the moving average of
  ``optim.ema_decay`` (``AveragedModel.update_parameters`` after every step).
* ``lsq``: ``torch._fake_quantize_learnable_per_tensor_affine`` at 4 bits on the same tensors
  (conv/linear weights signed ``[-8, 7]``, ReLU outputs unsigned ``[0, 15]`` in place of the
  ReLU, as mixq's activation quantizer; LSQ gradient scale ``1/sqrt(numel * q_max)``).
* ``brevitas``: 4-bit ``QuantConv2d``/``QuantReLU``/``QuantLinear``, only if ``import brevitas``
  works (never a mixq dependency).

Example::

    python benchmarks/step_time.py --threads 2 --rounds 7 --steps 3 --markdown
"""

from __future__ import annotations

import argparse
import collections
import datetime
import math
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixq.config import QuantConfig, SiteConfig
from mixq.convert import quantize_model, quantizers
from mixq.cost import Budget
from mixq.models import mobilenet_v2, resnet20
from mixq.qat import QATStep, param_groups
from mixq.quant import kernels

# -- LSQ baseline ------------------------------------------------------------------------------


class LSQ(nn.Module):
    """Per-tensor LSQ fake quantization with torch's fused learnable op.

    ``y = (clamp(round(x / s) + z, q_lo, q_hi) - z) * s`` with learnable ``s`` (and ``z``, kept
    at 0 here by its zero gradient scale), gradient scale ``1 / sqrt(numel * q_hi)``.
    """

    def __init__(self, signed: bool, bits: int = 4, init_scale: float = 0.125) -> None:
        super().__init__()
        self.q_lo = -(2 ** (bits - 1)) if signed else 0
        self.q_hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.scale = nn.Parameter(torch.tensor([init_scale]))
        self.zero_point = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` with the learnable per-tensor affine op."""
        grad_factor = 1.0 / math.sqrt(x.numel() * self.q_hi)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.scale, self.zero_point, self.q_lo, self.q_hi, grad_factor
        )


class LSQConv2d(nn.Conv2d):
    """``nn.Conv2d`` with an LSQ weight quantizer."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.wq(self.weight), self.bias)


class LSQLinear(nn.Linear):
    """``nn.Linear`` with LSQ weight and bias quantizers."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.wq(self.weight), self.bq(self.bias))


def lsq_model(model: nn.Module) -> nn.Module:
    """Swap conv/linear layers for LSQ ones and ReLUs for unsigned LSQ quantizers, in place."""
    for name, m in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if type(m) is nn.Conv2d:
            m.__class__ = LSQConv2d
            m.wq = LSQ(True, init_scale=float(m.weight.detach().abs().max()) / 7)
        elif type(m) is nn.Linear:
            m.__class__ = LSQLinear
            m.wq = LSQ(True, init_scale=float(m.weight.detach().abs().max()) / 7)
            m.bq = LSQ(True, init_scale=float(m.weight.detach().abs().max()) / 7)
        elif type(m) is nn.ReLU:
            setattr(parent, child, LSQ(False))
    return model


def brevitas_model() -> nn.Module | None:
    """ResNet-20 with Brevitas 4-bit layers, or None (with a note) if Brevitas is missing."""
    try:
        import brevitas.nn as qnn
    except Exception as e:  # pragma: no cover - optional
        print(f"note: brevitas variant skipped ({type(e).__name__}: {e})", file=sys.stderr)
        return None
    model = resnet20()
    for name, m in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if type(m) is nn.Conv2d:
            new = qnn.QuantConv2d(
                m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                bias=m.bias is not None, weight_bit_width=4,
            )  # fmt: skip
            setattr(parent, child, new)
        elif type(m) is nn.Linear:
            setattr(parent, child, qnn.QuantLinear(m.in_features, m.out_features, bias=True,
                                                   weight_bit_width=4))  # fmt: skip
        elif type(m) is nn.ReLU:
            setattr(parent, child, qnn.QuantReLU(bit_width=4))
    return model


# -- variants ----------------------------------------------------------------------------------


@dataclass
class Variant:
    """One model + optimizer + step recipe."""

    name: str
    model: nn.Module
    penalty: Budget | None = None
    kernel: str | None = None
    compile: bool = False
    ema: bool = False
    opt: torch.optim.Optimizer = field(init=False)
    quantizers: list = field(init=False)
    times: list[float] = field(default_factory=list)
    peak_mib: float = float("nan")
    ops: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        # as the trainer (mixq.train.setup.build_optimizer): the weights decayed by SGD, the
        # quantizer parameters by QATStep before their gradient clip (spec 3.6)
        groups = param_groups(self.model, 2e-4)
        self.opt = torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
        self.quantizers = [q for _, q in quantizers(self.model)]
        budget = self.penalty or Budget()
        self.qat = QATStep(self.model, self.opt, budget, 2e-4, compile=self.compile)
        self.forward = torch.compile(self.model) if self.compile else self.model
        self.averaged = None
        if self.ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.averaged = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True
            )

    def step(self, x: Tensor, y: Tensor) -> None:
        """One training step (see the module docstring)."""
        ctx = kernels.use(self.kernel) if self.kernel else nullcontext()
        with ctx:
            self.qat(F.cross_entropy(self.forward(x), y))
            if self.averaged is not None:
                self.averaged.update_parameters(self.model)


CONFIGS: dict[str, QuantConfig] = {
    "mixq-w": QuantConfig(activation=SiteConfig(quantizer="float")),
    "mixq-wa": QuantConfig(),
    "mixq-inputs": QuantConfig(activation_sites="inputs"),
    "mixq-wa-static": QuantConfig(
        weight=SiteConfig(learnable=False), activation=SiteConfig(learnable=False)
    ),
    "mixq-inputs-static": QuantConfig(
        activation_sites="inputs",
        weight=SiteConfig(learnable=False),
        activation=SiteConfig(learnable=False),
    ),
    "mixq-p2": QuantConfig(
        weight=SiteConfig(quantizer="pow2/qmin_qmax"),
        activation=SiteConfig(quantizer="pow2/qmin_qmax"),
    ),
}

KERNEL_SUFFIXES = {"-ref": "reference", "-eager": "eager", "-inductor": "inductor",
                   "-torch": "eager", "-compiled": "inductor"}  # fmt: skip
"""Variant suffix -> kernel backend (``-torch`` / ``-compiled``: the earlier names)."""
ALL = ["float", "mixq-w", "mixq-wa", "mixq-p2", "mixq-w-ref", "mixq-wa-ref", "mixq-p2-ref",
       "lsq", "brevitas"]  # fmt: skip
EXTRA = [f"{b}{s}" for b in ("mixq-w", "mixq-wa", "mixq-p2")
         for s in ("-eager", "-inductor", "-torch", "-compiled")]  # fmt: skip
EXTRA += ["float-compile", "mixq-wa-compile", "mixq-p2-compile", "float-ema", "mixq-wa-ema"]
EXTRA += ["mixq-inputs", "mixq-wa-static", "mixq-inputs-static"]

#: ``--model``: the network every variant is built from (input 3x32x32).
ARCHS = {"resnet20": resnet20, "mobilenet_v2": lambda: mobilenet_v2(num_classes=10)}
ARCH = "resnet20"
"""Also accepted by ``--variants`` (not in the default list)."""


def build(name: str, device: torch.device) -> Variant | None:
    """The variant ``name`` on ``device`` in channels_last, or None when unavailable."""
    torch.manual_seed(0)
    budget = Budget.parse(weight="70KB")
    for suffix, flag in (("-compile", "compile"), ("-ema", "ema")):  # the base variant, plus
        if name.endswith(suffix):
            v = build(name.removesuffix(suffix), device)
            return (
                None if v is None else Variant(name, v.model, v.penalty, v.kernel, **{flag: True})
            )
    net = ARCHS[ARCH]
    if name == "float":
        model, penalty, kernel = net(), None, None
    elif name.startswith("mixq") and name not in ALL + EXTRA:
        raise ValueError(f"unknown variant {name!r}; valid: {ALL + EXTRA}")
    elif name.startswith("mixq"):
        suffix = next((s for s in KERNEL_SUFFIXES if name.endswith(s)), "")
        base = name.removesuffix(suffix) if suffix else name
        model = quantize_model(net(), CONFIGS[base], example_input=torch.zeros(1, 3, 32, 32))
        penalty, kernel = budget, KERNEL_SUFFIXES.get(suffix)
    elif name == "lsq":
        model, penalty, kernel = lsq_model(net()), None, None
    elif name == "brevitas":
        model, penalty, kernel = brevitas_model(), None, None
        if model is None:
            return None
    else:
        raise ValueError(f"unknown variant {name!r}; valid: {ALL + EXTRA}")
    model = model.to(device=device, memory_format=torch.channels_last).train()
    return Variant(name, model, penalty, kernel)


# -- timing ------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(variants: list[Variant], x: Tensor, y: Tensor, rounds: int, steps: int,
        warmup: int) -> None:  # fmt: skip
    """Warm up every variant, then time ``rounds`` interleaved rounds of ``steps`` steps."""
    device = x.device
    for v in variants:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            v.step(x, y)
        _sync(device)
        if device.type == "cuda":
            v.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # fmt: skip
        for v in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                v.step(x, y)
            _sync(device)
            v.times.append((time.perf_counter() - t0) * 1e3 / steps)


def machine_info(device: torch.device, threads: int) -> dict[str, str]:
    """CPU/GPU model, threads, torch version, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": f"{cpu} ({torch.backends.cpu.get_cpu_capability()})",
        "threads": str(threads),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mixq kernel": kernels.describe(),
        "model": ARCH,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def report(variants: list[Variant], info: dict[str, str], args: argparse.Namespace) -> str:
    """The result table (plain text or markdown)."""
    base = next((v for v in variants if v.name == "float"), None)
    cuda = args.device == "cuda"
    head = ["variant", "ms/step (median)", "min", "ratio to float"] + (["peak MiB"] if cuda else [])
    ops = args.count_ops
    head += (["ATen ops/step"] + (["CUDA kernels/step"] if cuda else [])) if ops else []
    rows = []
    for v in variants:
        med = statistics.median(v.times)
        ratio = "n/a"
        if base is not None:
            per_round = [a / b for a, b in zip(v.times, base.times, strict=True)]
            ratio = f"{statistics.median(per_round):.2f}x"
        row = [v.name, f"{med:.1f}", f"{min(v.times):.1f}", ratio]
        if cuda:
            row.append(f"{v.peak_mib:.0f}")
        if ops:
            row += [str(v.ops[0])] + ([str(v.ops[1])] if cuda else [])
        rows.append(row)
    lines = [f"{k}: {val}" for k, val in info.items()]
    lines.append(f"batch {args.batch}, 3x32x32, channels_last, {args.rounds} rounds x "
                 f"{args.steps} steps, warmup {args.warmup}, device {args.device}")  # fmt: skip
    if args.markdown:
        lines = [f"- {line}" for line in lines] + [""]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def profile(v: Variant, x: Tensor, y: Tensor, rows: int) -> None:
    """Print the torch.profiler table of two steps of ``v`` (after a warmup step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    v.step(x, y)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with tprofile(activities=acts) as prof:
        for _ in range(2):
            v.step(x, y)
    key = "self_cuda_time_total" if x.is_cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def count_ops(v: Variant, x: Tensor, y: Tensor) -> tuple[int, int]:
    """``(top-level ATen ops, CUDA kernels)`` of one step of ``v`` after two warm-up steps.

    Top-level ATen ops (those not called by another ATen op) are what eager mode dispatches
    one by one; on a GPU each is at least one kernel launch, so their count bounds the launch
    overhead of a step. CUDA kernels are counted on a GPU only (0 on CPU).
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    for _ in range(2):
        v.step(x, y)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with tprofile(activities=acts) as prof:
        v.step(x, y)
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU"]
    top = [e for e in aten if not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
    kernels_ = [e for e in events if e.device_type.name == "CUDA"]
    v.ops_by_name = collections.Counter(e.name for e in top)
    return len(top), len(kernels_)


def ops_beyond_float(variants: list[Variant], rows: int = 12) -> str:
    """Per variant, the top-level ATen ops it dispatches beyond float, by name (``--count-ops``):
    where a step's extra dispatches go."""
    base = next(v for v in variants if v.name == "float").ops_by_name
    lines = []
    for v in variants:
        if v.name != "float":
            extra = (v.ops_by_name - base).most_common(rows)
            lines.append(f"{v.name} beyond float: " + ", ".join(f"{n[6:]} {c}" for n, c in extra))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=sorted(ARCHS), default="resnet20",
                   help="the network of every variant (32x32 input)")  # fmt: skip
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--variants", default=",".join(ALL), help=f"comma list of {ALL} (also {EXTRA})")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--profile", default=None, help="profile one variant instead of timing")
    p.add_argument("--profile-rows", type=int, default=30)
    p.add_argument(
        "--count-ops", action="store_true", help="add ATen ops (CUDA kernels) of one step"
    )
    args = p.parse_args(argv)
    global ARCH
    ARCH = args.model
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    if args.profile:
        v = build(args.profile, device)
        if v is None:
            p.error(f"variant {args.profile} is unavailable")
        profile(v, x, y, args.profile_rows)
        return
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if "float" not in names:
        names.insert(0, "float")
    variants = [v for v in (build(n, device) for n in names) if v is not None]
    run(variants, x, y, args.rounds, args.steps, args.warmup)
    if args.count_ops:
        for v in variants:
            v.ops = count_ops(v, x, y)
    print(report(variants, machine_info(device, torch.get_num_threads()), args))
    if args.count_ops:
        print(ops_beyond_float(variants))


if __name__ == "__main__":
    main()
