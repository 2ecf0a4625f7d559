"""Per-layer report of a (quantized) model: bitwidths, ranges, memory and operation counts.

For each conv/linear layer ``l`` (quantized or left in float) the report gives the weight
bitwidth ``b_l^w``, the step ``d_q`` (uniform) or ``q_min`` (power-of-two), the effective
``q_max``, the weight memory ``S_l^w = b_l^w * numel(W_l) + b_l^c * numel(c_l)`` and the
multiply-accumulates of paper Table 2; for each activation site (a ``QuantAct``, the ReLU
position of the reference code) the bitwidth ``b_l^x``, the per-sample element count ``A_l`` and
``S_l^x = b_l^x * A_l``. Totals: ``sum_l S_l^w`` (8a), ``sum_l S_l^x`` (8b), ``max_l S_l^x``
(8c), each next to its float32 value and, when a :class:`~mixq.cost.Budget` is given, its target.
Sizes are in KiB (1 KB = 1024 bytes, as in the paper); float tensors count 32 bits.

Rows follow module-definition order, which is the execution order for the model zoo; the first
and the last conv/linear layer in that order are flagged (the paper quantizes both).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixq.cost import (
    BITS_PER_KIB,
    FLOAT_BITS,
    Budget,
    activation_bits,
    activation_peak_step,
    float_sites_warning,
    layer_ops,
    site_table,
)
from mixq.layers import QuantAct
from mixq.quant.base import Quantizer
from mixq.sites import Site

NOT_QUANTIZED_BY_DESIGN = (
    "the input image, batch norm, residual additions, pooling outputs and the logits stay float "
    "(as in the reference code, spec 7.1)"
)


@dataclass(frozen=True)
class LayerRow:
    """One conv/linear layer. ``d`` is set for uniform, ``q_min`` for pow-2 quantizers.

    ``kib = (bits * n_weights + bias_bits * n_bias) / 8192``; ``macs`` per sample (Table 2),
    ``mul``/``add``: uniform or float ``mul = add = macs``, pow-2 ``mul = 0``, ``add = 2 macs``.
    """

    name: str
    type: str
    quantizer: str
    bits: int
    d: float | None
    q_min: float | None
    q_max: float | None
    bias_quantizer: str | None
    bias_bits: int | None
    n_weights: int
    n_bias: int
    kib: float
    macs: int | None
    mul: int | None
    add: int | None
    first: bool = False
    last: bool = False


@dataclass(frozen=True)
class ActivationRow:
    """One activation site (:mod:`mixq.sites`): ``kib = bits * numel / 8192`` with ``numel``
    per sample; 0 for a site that is not counted (``counted`` False, ``note`` says why)."""

    name: str
    quantizer: str
    numel: int
    bits: int
    d: float | None
    q_min: float | None
    q_max: float | None
    kib: float
    cap: float | None
    producer: str = ""
    consumers: list[str] = field(default_factory=list)
    quantized_at: str = ""
    counted: bool = True
    note: str = ""


@dataclass(frozen=True)
class BudgetRow:
    """One constraint: size and target in KiB, ``met`` as :meth:`Budget.satisfied`."""

    constraint: str
    size_kib: float
    target_kib: float
    met: bool


@dataclass(frozen=True)
class Totals:
    """Model totals; ``compression = weight_float_kib / weight_kib`` (None without layers).

    ``macs``/``mul``/``add`` per sample, None when a layer's output shape was never recorded.
    """

    weight_kib: float
    weight_float_kib: float
    compression: float | None
    activation_sum_kib: float
    activation_sum_float_kib: float
    activation_max_kib: float
    activation_max_float_kib: float
    activation_max_site: str | None
    macs: int | None
    mul: int | None
    add: int | None
    activation_peak_kib: float = 0.0
    activation_peak_float_kib: float = 0.0
    activation_peak_at: str | None = None
    activation_peak_alive: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    """The structured report; render with :meth:`to_text`, :meth:`to_json`, :meth:`to_csv`,
    :meth:`plot`."""

    layers: list[LayerRow]
    activations: list[ActivationRow]
    totals: Totals
    budget: list[BudgetRow] = field(default_factory=list)
    first_layer: str | None = None
    last_layer: str | None = None
    float_sites: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    uncounted: list[ActivationRow] = field(default_factory=list)
    activation_sites: str = "relu"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the JSON document)."""
        return dataclasses.asdict(self)

    def to_json(self, indent: int = 2) -> str:
        """JSON string; keys are the dataclass field names, in declaration order."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_csv(self) -> str:
        """One CSV table: a header, then one row per layer and one per activation site."""
        cols = ["section", "name", "type", "quantizer", "bits", "d", "q_min", "q_max",
                "bias_bits", "numel", "kib", "macs", "mul", "add", "producer", "consumers",
                "quantized_at", "note"]  # fmt: skip
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in self.layers:
            row = {k: v for k, v in dataclasses.asdict(r).items() if k in cols}
            w.writerow({**row, "section": "layer", "numel": r.n_weights + r.n_bias})
        for section, rows in (("activation", self.activations), ("uncounted", self.uncounted)):
            for a in rows:
                row = {k: v for k, v in dataclasses.asdict(a).items() if k in cols}
                w.writerow({**row, "section": section, "type": "act",
                            "consumers": " ".join(a.consumers)})  # fmt: skip
        t = self.totals
        w.writerow({"section": "peak", "name": t.activation_peak_at, "type": "act",
                    "kib": t.activation_peak_kib, "consumers": " ".join(t.activation_peak_alive),
                    "note": "sites alive at the peak"})  # fmt: skip
        return buf.getvalue()

    def to_text(self) -> str:
        """Aligned tables (layers, activation sites), a totals block, budget and notes."""
        out = ["Weights (conv / linear layers)"]
        rows = []
        for r in self.layers:
            tag = " [first]" if r.first else " [last]" if r.last else ""
            rows.append([r.name + tag, r.type, r.quantizer, str(r.bits), _num(r.d or r.q_min),
                         _num(r.q_max), "-" if r.bias_bits is None else str(r.bias_bits),
                         f"{r.n_weights + r.n_bias:,}", f"{r.kib:.2f}", _int(r.macs),
                         _int(r.mul), _int(r.add)])  # fmt: skip
        out += _table(["layer", "type", "quantizer", "b", "d/q_min", "q_max", "b_bias",
                       "#params", "KiB", "MACs", "mul", "add"], rows)  # fmt: skip
        out += ["", f"Activation sites (per sample; activation_sites={self.activation_sites!r})"]
        rows = [[a.name, a.producer, a.quantizer, str(a.bits), _num(a.d or a.q_min),
                 _num(a.q_max), f"{a.numel:,}", f"{a.kib:.2f}", _num(a.cap),
                 ", ".join(a.consumers)] for a in self.activations]  # fmt: skip
        out += _table(["site", "producer", "quantizer", "b", "d/q_min", "q_max", "elements",
                       "KiB", "cap", "read by"], rows, left=(0, 1, 2, 9))  # fmt: skip
        if self.uncounted:
            out += ["", "Stored tensors not counted (float32 size shown)"]
            rows = [[a.name, a.producer, f"{a.numel:,}",
                     f"{a.numel * FLOAT_BITS / BITS_PER_KIB:.2f}", ", ".join(a.consumers),
                     a.note] for a in self.uncounted]  # fmt: skip
            out += _table(["site", "producer", "elements", "KiB", "read by", "why"], rows,
                          left=(0, 1, 4, 5))  # fmt: skip
        t = self.totals
        out += [
            "",
            "Totals",
            f"  weights          {t.weight_kib:12.2f} KiB  (float32 {t.weight_float_kib:.2f} KiB,"
            f" compression {'-' if t.compression is None else f'{t.compression:.2f}'}x)",
            f"  activations sum  {t.activation_sum_kib:12.2f} KiB  "
            f"(float32 {t.activation_sum_float_kib:.2f} KiB)",
            f"  activations max  {t.activation_max_kib:12.2f} KiB  "
            f"(float32 {t.activation_max_float_kib:.2f} KiB) at {t.activation_max_site}",
            f"  activations peak {t.activation_peak_kib:12.2f} KiB  "
            f"(float32 {t.activation_peak_float_kib:.2f} KiB) at {t.activation_peak_at}, "
            f"alive: {', '.join(t.activation_peak_alive)}",
            f"  MACs             {_int(t.macs):>12}  (mul {_int(t.mul)}, add {_int(t.add)})",
        ]
        if self.budget:
            out += ["", "Budget"]
            out += [f"  {b.constraint:<16} {b.size_kib:12.2f} KiB  <= {b.target_kib:.2f} KiB  "
                    f"{'met' if b.met else 'NOT MET'}" for b in self.budget]  # fmt: skip
        out += ["", "Notes"] + [f"  - {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Bar charts of the weight and activation bitwidths per layer (paper Fig. 5), as PNG.

        Raises:
            ImportError: matplotlib is not installed (``pip install 'mixq[plot]'``).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError(
                "Report.plot needs matplotlib; install it with: pip install 'mixq[plot]'"
            ) from e
        n = max(len(self.layers), len(self.activations), 1)
        fig = Figure(figsize=(max(6.0, 0.28 * n + 2.0), 6.5), layout="constrained")
        FigureCanvasAgg(fig)  # the Agg backend, without touching matplotlib's global backend
        axes = fig.subplots(2, 1)
        t = self.totals
        parts = [(f"weight bitwidth (total {t.weight_kib:.2f} KiB)",
                  [r.name for r in self.layers], [r.bits for r in self.layers], "tab:blue"),
                 (f"activation bitwidth (sum {t.activation_sum_kib:.2f} KiB, max "
                  f"{t.activation_max_kib:.2f} KiB)", [a.name for a in self.activations],
                  [a.bits for a in self.activations], "tab:orange")]  # fmt: skip
        for ax, (title, names, bits, color) in zip(axes, parts, strict=True):
            ax.bar(range(len(bits)), bits, color=color)
            ax.set_xticks(range(len(bits)), names, rotation=90, fontsize=7)
            ax.set_ylabel("bits")
            ax.set_title(title, fontsize=10)
            top = max([b for b in bits if b < FLOAT_BITS] + [8]) + 1
            ax.set_ylim(0, top)  # float (32-bit) bars run off the top and are labelled
            for i, b in enumerate(bits):
                if b >= FLOAT_BITS:
                    ax.text(i, top - 0.3, "float", rotation=90, ha="center", va="top",
                            fontsize=7, color="white")  # fmt: skip
        path = Path(path)
        fig.savefig(path, dpi=100)
        return path


def _num(v: float | None) -> str:
    """``2^-5`` for exact powers of two, else 4 significant digits; ``-`` for None."""
    if v is None:
        return "-"
    e = math.log2(v) if v > 0 else 0.5
    return f"2^{int(e)}" if e == int(e) and abs(e) > 2 else f"{v:.4g}"


def _total(values: list[int | None]) -> int | None:
    """The sum, or None when a value is unknown (a layer without recorded output shape)."""
    return None if None in values else sum(values)


def _int(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _table(header: list[str], rows: list[list[str]],
           left: tuple[int, ...] = (0, 1, 2)) -> list[str]:  # fmt: skip
    """Left-aligned text columns (``left``, default the first three), right-aligned numbers."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # fmt: skip

    return ["  " + fmt(header), "  " + "  ".join("-" * w for w in widths)] + [
        "  " + fmt(r) for r in rows
    ]


def _describe(q: Quantizer | None) -> tuple[str, int, float | None, float | None, float | None]:
    """``(spec, bits, d, q_min, q_max)`` of a quantizer; ``("float", 32, ...)`` for None."""
    if q is None:
        return "float", FLOAT_BITS, None, None, None
    spec = f"{q.kind}/{q.parametrization}"
    if q.kind == "uniform":
        return spec, q.bitwidth, q.step, None, q.q_max_effective
    return spec, q.bitwidth, None, q.q_min_effective, q.q_max_effective


def _layer_type(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.groups == 1:
        return "conv"
    return "dwconv" if m.groups == m.in_channels else "gconv"


def _layer_row(name: str, m: nn.Module) -> LayerRow:
    spec, bits, d, q_min, q_max = _describe(getattr(m, "weight_quantizer", None))
    n_w, n_b = m.weight.numel(), (0 if m.bias is None else m.bias.numel())
    b_spec = b_bits = None
    if m.bias is not None:
        b_spec, b_bits, *_ = _describe(getattr(m, "bias_quantizer", None))
    try:
        ops = layer_ops(m)
    except ValueError:  # no recorded output shape (a model that was never converted)
        ops = None
    macs = mul = add = None
    if ops is not None:
        macs = ops["macs"]
        mul, add = (ops["pow2_mul"], ops["pow2_add"]) if spec.startswith("pow2/") else (macs, macs)
    kib = (bits * n_w + (b_bits or 0) * n_b) / BITS_PER_KIB
    return LayerRow(name, _layer_type(m), spec, bits, d, q_min, q_max, b_spec, b_bits, n_w, n_b,
                    kib, macs, mul, add)  # fmt: skip


def _act_row(model: nn.Module, site: Site) -> ActivationRow:
    spec, bits, d, q_min, q_max = _describe(site.quantizer)
    owner = model.get_submodule(site.quantized_at) if site.quantized_at else None
    cap = owner.cap if isinstance(owner, QuantAct) else None
    kib = bits * site.numel / BITS_PER_KIB if site.counted else 0.0
    return ActivationRow(site.name, spec, site.numel, bits, d, q_min, q_max, kib, cap,
                         site.producer, list(site.consumers), site.quantized_at, site.counted,
                         site.note)  # fmt: skip


def _budget_rows(model: nn.Module, budget: Budget, has_sites: bool) -> list[BudgetRow]:
    """One row per set constraint. Without activation sites (a float model) an activation
    constraint is NOT met: its 0 KiB is "not measured", not a memory that fits."""
    with torch.no_grad():
        terms = budget.terms(model)
        met = budget.satisfied(model)
    return [BudgetRow(k, float(s) / BITS_PER_KIB, t / BITS_PER_KIB,
                      met[k] and (has_sites or k == "weight"))
            for k, (s, t) in terms.items()]  # fmt: skip


def _notes(layers: list[LayerRow], acts: list[ActivationRow], float_sites: list[str],
           mode: str, warning: str | None) -> list[str]:  # fmt: skip
    notes = []
    for which, row in (("first", layers[0] if layers else None),
                       ("last", layers[-1] if layers else None)):  # fmt: skip
        if row is not None:
            state = (
                "float (NOT quantized)"
                if row.quantizer == "float"
                else (f"quantized ({row.quantizer}, {row.bits} bits), as in the paper")
            )
            notes.append(f"{which} layer: {row.name} is {state}")
    notes.append("float (unquantized) sites, counted at 32 bits: "
                 + (", ".join(float_sites) if float_sites else "none"))  # fmt: skip
    if warning:
        notes.append("WARNING: " + warning)
    if mode == "relu":
        if acts:
            notes.append("activation sites are the activation outputs (activation_sites='relu'"
                         ", the reference code's ReLU/ReLU6 positions); activation memory is "
                         "per sample")  # fmt: skip
        notes.append(NOT_QUANTIZED_BY_DESIGN)
    else:
        notes.append("activation sites are every conv/linear input and every activation output "
                     "(activation_sites='inputs'); activation memory is per sample")  # fmt: skip
    notes.append("peak: the largest memory of the sites alive at once in one forward (ops "
                 "between stored tensors fused), the arena a sequential runtime needs")  # fmt: skip
    return notes


def report(model: nn.Module, budget: Budget | None = None) -> Report:
    """Build the per-layer :class:`Report` of ``model`` (converted by ``quantize_model``).

    Weight memory ``S_w = sum_t b_t numel_t`` over conv/linear weights and biases, activation
    memory ``S_x,l = b_l A_l`` per site, summed (8b) and maxed (8c); float tensors count 32
    bits. The integer bitwidths used here equal the values of the differentiable sizes of
    :mod:`mixq.cost`.

    Args:
        model: a model converted by :func:`mixq.convert.quantize_model` (a plain float model
            also works: every layer is float and the MAC counts are unknown).
        budget: optional targets; each set constraint is listed with met / not met.

    Returns:
        The report; see :meth:`Report.to_text` for a terminal view.
    """
    layers = [_layer_row(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))]  # fmt: skip
    table = site_table(model)
    all_sites = [_act_row(model, x) for x in (table.sites if table else [])]
    acts = [a for a in all_sites if a.counted]
    uncounted = [a for a in all_sites if not a.counted]
    if layers:
        layers[0] = dataclasses.replace(layers[0], first=True)
        layers[-1] = dataclasses.replace(layers[-1], last=True)
    float_sites = [r.name for r in layers if r.quantizer == "float"]
    float_sites += [f"{r.name}.bias" for r in layers
                    if r.bias_quantizer == "float" and r.quantizer != "float"]  # fmt: skip
    float_sites += [a.name for a in acts if a.quantizer == "float"]
    w_float = sum(r.n_weights + r.n_bias for r in layers) * FLOAT_BITS / BITS_PER_KIB
    w_kib = sum(r.kib for r in layers)
    a_float = [a.numel * FLOAT_BITS / BITS_PER_KIB for a in acts]
    imax = max(range(len(acts)), key=lambda i: acts[i].kib) if acts else None
    peak_at, alive = activation_peak_step(model) or (None, [])
    with torch.no_grad():
        peak_kib = float(activation_bits(model, "peak")) / BITS_PER_KIB
    peak_float = 0.0
    if table is not None and table.counted:
        fl = torch.tensor([float(s.numel * FLOAT_BITS) for s in table.counted])
        peak_float = float((table.alive @ fl).max()) / BITS_PER_KIB
    totals = Totals(
        weight_kib=w_kib,
        weight_float_kib=w_float,
        compression=w_float / w_kib if w_kib else None,
        activation_sum_kib=sum(a.kib for a in acts),
        activation_sum_float_kib=sum(a_float),
        activation_max_kib=acts[imax].kib if acts else 0.0,
        activation_max_float_kib=max(a_float, default=0.0),
        activation_max_site=acts[imax].name if acts else None,
        macs=_total([r.macs for r in layers]),
        mul=_total([r.mul for r in layers]),
        add=_total([r.add for r in layers]),
        activation_peak_kib=peak_kib,
        activation_peak_float_kib=peak_float,
        activation_peak_at=peak_at,
        activation_peak_alive=list(alive),
    )
    mode = table.mode if table else "relu"
    warning = float_sites_warning(model, budget) if budget is not None else None
    if budget is not None and budget.activation_active and not acts:
        warning = ("the model has no activation sites (never quantized with "
                   "mixq.quantize_model): its activation memory is not measured, so the "
                   "activation budget is reported NOT MET")  # fmt: skip
    active = budget is not None and budget.active
    rows = _budget_rows(model, budget, bool(acts)) if active else []
    return Report(
        layers=layers,
        activations=acts,
        totals=totals,
        budget=rows,
        first_layer=layers[0].name if layers else None,
        last_layer=layers[-1].name if layers else None,
        float_sites=float_sites,
        notes=_notes(layers, acts, float_sites, mode, warning),
        uncounted=uncounted,
        activation_sites=mode,
    )


__all__ = ["ActivationRow", "BudgetRow", "LayerRow", "Report", "Totals", "report"]
