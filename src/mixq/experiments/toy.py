"""The paper's first experiment (Uhlich et al. 2020, Sec. 4 / Fig. 3): fit each parametrization
of the learned quantizers to samples of a standard normal distribution.

Each of the six signed (weight) quantizers U1 ``b_d``, U2 ``b_qmax``, U3 ``d_qmax``, P1 ``b_qmin``,
P2 ``b_qmax`` and P3 ``qmin_qmax`` is initialised from the same ``n`` samples ``x ~ N(0, 1)`` by
the weight rule of spec section 6 (``init_from_tensor(x, b=b0)``, which gives all three members
of a family the same step, range and bitwidth) and trained by plain gradient descent
(``torch.optim.SGD``, no momentum, no weight decay, one learning rate for all six)::

    L(theta) = 1/n * sum_i (Q(x_i; theta) - x_i)^2        (the full-batch MSE, no factor 1/2)
    theta   <- project(theta - lr * grad L(theta))        (``constrain_()`` after every step)

The paper minimises ``E[1/2 (Q - x)^2]``; our loss is twice that, so our ``lr`` equals the
paper's learning rate divided by 2.

The oscillation measure of a curve ``MSE_0..MSE_T`` is its total climb in decades::

    rise = sum_t max(0, log10 MSE_{t+1} - log10 MSE_t)

which is 0 exactly when the MSE never increases; a step that overshoots and then returns adds its
height to ``rise`` once. ``ups`` counts the steps whose MSE increased (relative change > 1e-6).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixq.quant import Pow2Quantizer, Quantizer, UniformQuantizer

#: ``(label, kind, parametrization, parameters)`` of the six quantizers, in the paper's order.
PARAMETRIZATIONS: tuple[tuple[str, str, str, str], ...] = (
    ("U1", "uniform", "b_d", "(b, d)"),
    ("U2", "uniform", "b_qmax", "(b, q_max)"),
    ("U3", "uniform", "d_qmax", "(d, q_max)"),
    ("P1", "pow2", "b_qmin", "(b, q_min)"),
    ("P2", "pow2", "b_qmax", "(b, q_max)"),
    ("P3", "pow2", "qmin_qmax", "(q_min, q_max)"),
)

# lr 0.1: the smallest of {0.01, 0.03, 0.1, ...} at which P3's q_min crosses a power-of-two
# threshold within 300 steps. The uniform ordering (U3 lowest, U1 oscillating) holds for every lr
# in [0.01, 3]; below 0.01 nothing moves in 300 steps and all three of a family tie.
DEFAULT_STEPS = 300
DEFAULT_LR = 0.1
DEFAULT_SAMPLES = 10_000
_UP_TOL = 1e-6  # relative MSE increase that counts as an "up" step (float noise is ~1e-7)


@dataclass
class Curve:
    """The training curve of one parametrization.

    Attributes:
        label: ``"U1"`` .. ``"P3"``.
        kind: ``"uniform"`` or ``"pow2"``.
        parametrization: e.g. ``"d_qmax"``.
        mse: ``steps + 1`` values; ``mse[t]`` is the loss at the parameters after ``t`` steps.
        bitwidth: the integer bitwidth at the same points.
        params: the final raw parameters, e.g. ``{"d": 0.0039, "q_max": 3.51}``.
    """

    label: str
    kind: str
    parametrization: str
    mse: list[float]
    bitwidth: list[int]
    params: dict[str, float] = field(default_factory=dict)

    @property
    def final_mse(self) -> float:
        """``MSE_T``, the loss after the last step."""
        return self.mse[-1]

    @property
    def final_bitwidth(self) -> int:
        """The bitwidth after the last step."""
        return self.bitwidth[-1]

    @property
    def tail_mse(self) -> float:
        """Mean MSE over the second half of the curve (robust to where an oscillation ends)."""
        tail = self.mse[len(self.mse) // 2 :]
        return sum(tail) / len(tail)

    @property
    def rise(self) -> float:
        """``sum_t max(0, log10 MSE_{t+1} - log10 MSE_t)``: total climb in decades."""
        logs = [math.log10(max(m, 1e-30)) for m in self.mse]
        return sum(max(0.0, b - a) for a, b in itertools.pairwise(logs))

    @property
    def ups(self) -> int:
        """Number of steps with ``MSE_{t+1} > (1 + 1e-6) MSE_t``."""
        return sum(b > a * (1.0 + _UP_TOL) for a, b in itertools.pairwise(self.mse))

    def summary(self) -> dict[str, Any]:
        """The scalar results (one table row) as a plain dict."""
        return {
            "label": self.label,
            "kind": self.kind,
            "parametrization": self.parametrization,
            "final_mse": self.final_mse,
            "tail_mse": self.tail_mse,
            "final_bitwidth": self.final_bitwidth,
            "rise": self.rise,
            "ups": self.ups,
            "params": self.params,
        }


@dataclass
class ToyResult:
    """Outcome of :func:`run_toy`: the settings and one :class:`Curve` per parametrization."""

    steps: int
    lr: float
    n: int
    seed: int
    b0: int
    curves: list[Curve]

    def curve(self, key: str) -> Curve:
        """The curve named ``key``: a label (``"U3"``) or a spec (``"uniform/d_qmax"``)."""
        for c in self.curves:
            if key in (c.label, f"{c.kind}/{c.parametrization}"):
                return c
        raise KeyError(f"no curve {key!r}; use one of {[c.label for c in self.curves]}")

    def family(self, kind: str) -> list[Curve]:
        """The three curves of ``"uniform"`` or ``"pow2"``."""
        return [c for c in self.curves if c.kind == kind]

    def to_dict(self, curves: bool = True) -> dict[str, Any]:
        """JSON-ready dict: settings, per-parametrization summaries and (optionally) curves."""
        out: dict[str, Any] = {
            "experiment": "toy: fit quantizers to N(0,1) samples (Uhlich et al. 2020, Fig. 3)",
            "loss": "mean((Q(x) - x)^2)",
            "optimizer": "SGD (no momentum, no weight decay), constrain_() after every step",
            "oscillation": "rise = sum_t max(0, log10 MSE_{t+1} - log10 MSE_t) [decades]",
            "steps": self.steps,
            "lr": self.lr,
            "samples": self.n,
            "seed": self.seed,
            "b0": self.b0,
            "results": [c.summary() for c in self.curves],
        }
        if curves:
            out["curves"] = [asdict(c) for c in self.curves]
        return out


def _make(kind: str, parametrization: str) -> Quantizer:
    cls = UniformQuantizer if kind == "uniform" else Pow2Quantizer
    return cls(parametrization, signed=True)


def _fit(q: Quantizer, x: torch.Tensor, steps: int, lr: float) -> tuple[list[float], list[int]]:
    opt = torch.optim.SGD(q.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    mse: list[float] = []
    bits: list[int] = []
    for t in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = (q(x) - x).square().mean()
        mse.append(float(loss.detach()))
        bits.append(q.bitwidth)
        if t == steps:
            break
        loss.backward()
        opt.step()
        q.constrain_()
    return mse, bits


def run_toy(
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    n: int = DEFAULT_SAMPLES,
    seed: int = 0,
    b0: int = 4,
) -> ToyResult:
    """Fit all six quantizers to ``n`` samples of ``N(0, 1)`` (see the module docstring).

    Args:
        steps: gradient steps per quantizer (full batch).
        lr: the learning rate shared by all six parametrizations.
        n: number of samples.
        seed: seed of the sample generator (the run is otherwise deterministic).
        b0: initial bitwidth of ``init_from_tensor`` (``d0 = 2^floor(log2(max|x| /
            (2^(b0-1) - 1)))``, ``q_max0 = d0 (2^(b0-1) - 1)``, pow-2 ``q_max0`` rounded to a
            power of two and ``q_min0 = q_max0 / 2^(2^(b0-1) - 1)``).

    Returns:
        A :class:`ToyResult` with one :class:`Curve` per parametrization.

    Raises:
        ValueError: on a non-positive ``steps``/``lr``, ``n < 2`` or ``b0`` outside [2, 8].
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    if not 2 <= b0 <= 8:
        raise ValueError(f"b0 must be in [2, 8] (the weight bitwidth bounds), got {b0}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float32)
    curves = []
    for label, kind, parametrization, _ in PARAMETRIZATIONS:
        q = _make(kind, parametrization)
        q.init_from_tensor(x, b=b0)
        mse, bits = _fit(q, x, steps, lr)
        params = {name: float(getattr(q, name).detach()) for name in q.param_names}
        curves.append(Curve(label, kind, parametrization, mse, bits, params))
    return ToyResult(steps=steps, lr=lr, n=n, seed=seed, b0=b0, curves=curves)


def format_table(result: ToyResult) -> str:
    """An aligned text table with one row per parametrization, plus the settings and legend."""
    header = ("param.", "theta", "family", "final MSE", "mean MSE 2nd half", "bits", "rise", "ups")
    names = {label: theta for label, _, _, theta in PARAMETRIZATIONS}
    rows = [
        (
            f"{c.label} {c.parametrization}",
            names.get(c.label, ""),
            c.kind,
            f"{c.final_mse:.4e}",
            f"{c.tail_mse:.4e}",
            str(c.final_bitwidth),
            f"{c.rise:.3f}",
            str(c.ups),
        )
        for c in result.curves
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    left = {0, 1, 2}

    def fmt(r: tuple[str, ...]) -> str:
        cells = (
            s.ljust(w) if i in left else s.rjust(w)
            for i, (s, w) in enumerate(zip(r, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    lines = [
        f"toy: {result.n} samples of N(0,1), seed {result.seed}, {result.b0}-bit init, "
        f"{result.steps} SGD steps, lr {result.lr:g} (same for all)",
        "loss = mean((Q(x) - x)^2); bits = bitwidth after the last step;",
        "rise = sum_t max(0, log10 MSE[t+1] - log10 MSE[t]) (decades climbed, 0 = monotone);",
        "ups = steps at which the MSE increased",
        "",
        fmt(header),
        fmt(tuple("-" * w for w in widths)),
    ]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def plot_curves(result: ToyResult, path: str | Path) -> Path:
    """Save MSE vs. step (log-y), one panel per family, as a PNG at ``path``.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend state).

    Raises:
        ImportError: matplotlib is not installed (``pip install 'mixq[plot]'``).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'mixq[plot]'") from e
    path = Path(path)
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    theta = {label: t for label, _, _, t in PARAMETRIZATIONS}
    panels = (("uniform", "uniform"), ("pow2", "power-of-two"))
    for ax, (kind, title) in zip(fig.subplots(1, 2), panels, strict=True):
        for c in result.family(kind):
            ax.plot(range(len(c.mse)), c.mse, label=f"{c.label} {theta.get(c.label, '')}", lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("MSE")
        ax.set_title(f"{title} quantizer")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"Fit to {result.n} N(0,1) samples, SGD lr {result.lr:g}, {result.b0}-bit init",
        fontsize=10,
    )
    fig.savefig(path, format="png", dpi=100)
    return path
