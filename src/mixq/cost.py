"""The memory model and penalties of the paper's constraints (8a)-(8c) (spec 5.1, 5.2).

Sizes are in **bits** inside; people get KiB/MiB (1 KB = 1024 bytes, as in the paper).

* weight memory ``S_w = sum_t b_t * numel_t`` over every conv/linear weight and bias ``t``
  (a float, unquantized tensor counts 32 bits; batch norm is not counted);
* activation memory per site ``S_x,l = b_l * numel_l`` (``numel_l`` per sample, recorded by the
  dry forward of ``quantize_model``; the sites are those of :mod:`mixq.sites`), aggregated as
  ``sum_l`` (8b), ``max_l`` (8c) or ``peak = max_k sum_l alive[k, l] S_x,l``, the largest
  memory of the sites alive at once (mixq's addition, the arena a microcontroller needs);
* penalty ``lambda * relu(S - S_0)^2`` with ``S`` in KiB (Eq. 10, decision 7).

Every ``*_bits`` function is a differentiable function of the quantizer parameters only, through
``Quantizer.bitwidth_surrogate()`` (computed for all quantizers at once by
:mod:`mixq.quant.group`, bit for bit the same); its value equals the integer bitwidths of the
report.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixq.layers import QuantAct, QuantOut
from mixq.quant.group import SHARED_DERIVED, cached_groups
from mixq.sites import Site, SiteTable, table_of

FLOAT_BITS = 32
BITS_PER_KIB = 8 * 1024
RESNET20_FLOAT_WEIGHT_BITS = 268_346 * FLOAT_BITS  # spec 5.3: the lambda reference (decision 7)

_UNITS = {"": 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024**2, "mib": 1024**2,
          "gb": 1024**3, "gib": 1024**3}  # fmt: skip


_SIZE_RE = r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*"


def parse_size(value: str | float | int) -> float:
    """Bytes of a size such as ``"70KB"``, ``"5.4 MB"``, ``"92KiB"`` or ``1024`` (bytes).

    KB/KiB = 1024 bytes and MB/MiB = 1024^2 bytes, as the paper uses them.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        num, unit = float(value), ""
    else:
        m = re.fullmatch(_SIZE_RE, str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(
                f"cannot parse size {value!r}: use a number with a unit B, KB, MB or GB "
                "(1 KB = 1024 bytes), e.g. '70KB' or '5.4MB'"
            )
        num, unit = float(m.group(1)), m.group(2).lower()
    if not (num > 0 and math.isfinite(num)):
        raise ValueError(f"size {value!r} must be a positive, finite number of bytes")
    return num * _UNITS[unit]


def _layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            yield name, m


def _weight_tensors(model: nn.Module) -> tuple[list, list[int], int]:
    """``(quantizers, their tensors' numel, numel of the float tensors)`` of the conv/linear
    weights and biases, in module order."""
    qs, numel, flt = [], [], 0
    for _, m in _layers(model):
        for attr in ("weight", "bias"):
            t = getattr(m, attr)
            if t is None:
                continue
            q = getattr(m, f"{attr}_quantizer", None)
            if q is None:
                flt += t.numel()
            else:
                qs.append(q)
                numel.append(t.numel())
    return qs, numel, flt


def bitwidth_surrogates(model: nn.Module, qs: list) -> Tensor:
    """``stack([q.bitwidth_surrogate() for q in qs])``, computed in one batch per group of
    quantizers (:mod:`mixq.quant.group`; equal bit for bit): in a training step on the vectors
    the model's last forward derived (:meth:`mixq.quant.group.SharedDerived.bitwidths`), else
    afresh."""
    shared = model.__dict__.get(SHARED_DERIVED)
    if shared is not None:
        bits = shared.bitwidths(qs)
        if bits is not None:
            return bits
    return cached_groups(model, qs).bitwidths()


def weight_bits(model: nn.Module, bits: Tensor | None = None) -> Tensor:
    """``S_w`` in bits: ``sum b_t * numel_t`` over conv/linear weights and biases (8a).

    ``bits``: the surrogate bitwidths of the weight quantizers in module order, if computed
    already (:meth:`Budget.terms`). The sum of the integer sizes is exact below 2^24 bits.
    """
    return _weight_bits(model, _weight_tensors(model), bits)


def _weight_bits(model: nn.Module, tensors: tuple[list, list[int], int], bits: Tensor | None):
    qs, numel, flt = tensors
    device = _device(model)
    if not qs:
        return torch.as_tensor(0.0 + FLOAT_BITS * flt, device=device)
    b = bitwidth_surrogates(model, qs) if bits is None else bits
    total = (b * _constant(model, numel, b)).sum()
    if flt:
        total = total + FLOAT_BITS * flt
    return torch.as_tensor(total, device=device)


def _constant(model: nn.Module, values: list[int], like: Tensor) -> Tensor:
    """``tensor(values)`` like ``like``, cached on the model (the penalty needs it every step)."""
    cache = model.__dict__.setdefault("_mixq_cost_constants", {})
    key = (tuple(values), like.device, like.dtype)
    t = cache.get(key)
    if t is None:
        if len(cache) > 16:
            cache.clear()
        t = cache[key] = torch.tensor([float(v) for v in values], dtype=like.dtype,
                                      device=like.device)  # fmt: skip
    return t


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def site_table(model: nn.Module) -> SiteTable | None:
    """The model's :class:`~mixq.sites.SiteTable`; None for a model that was never converted.

    Raises:
        ValueError: a converted model without recorded sizes (call ``record_sizes``).
    """
    table = table_of(model)
    if table is None and any(isinstance(m, (QuantAct, QuantOut)) for m in model.modules()):
        raise ValueError("the model's activation sites have no recorded size; run record_sizes")
    return table


def activation_sites(model: nn.Module) -> list[Site]:
    """The counted activation sites with their recorded sizes, in production order."""
    table = site_table(model)
    return [] if table is None else table.counted


def _plan(table: SiteTable, device: torch.device) -> tuple[list, Tensor, Tensor, Tensor]:
    """``(quantizers, index, numel, alive)``: each counted site's bits are
    ``cat(b(quantizers), [32])[index]``; cached per device (shared quantizers computed once)."""
    cache = table.__dict__.setdefault("_plans", {})
    if device not in cache:
        qs: list = []
        pos: dict[int, int] = {}
        idx = []
        for s in table.counted:
            if s.quantizer is None:
                idx.append(-1)
                continue
            if id(s.quantizer) not in pos:
                pos[id(s.quantizer)] = len(qs)
                qs.append(s.quantizer)
            idx.append(pos[id(s.quantizer)])
        index = torch.tensor([len(qs) if i < 0 else i for i in idx], dtype=torch.long)
        numel = torch.tensor([float(s.numel) for s in table.counted])
        cache[device] = (qs, index.to(device), numel.to(device), table.alive.to(device))
    return cache[device]


def activation_bits_per_site(model: nn.Module, bits: Tensor | None = None) -> Tensor:
    """``S_x,l = b_l * numel_l`` for every counted activation site, as a 1-D tensor (bits).

    ``bits``: the surrogate bitwidths of the sites' quantizers in plan order, if computed already.
    """
    device = _device(model)
    table = site_table(model)
    if table is None or not table.counted:
        return torch.zeros(0, device=device)
    qs, index, numel, _ = _plan(table, device)
    float_bits = torch.full((1,), float(FLOAT_BITS), device=device)
    if qs:
        b_q = bitwidth_surrogates(model, qs) if bits is None else bits
        b = torch.cat([b_q, float_bits.to(b_q.dtype)])
    else:
        b = float_bits
    return b[index] * numel


def _site_quantizers(model: nn.Module) -> list:
    """The quantizers of the counted activation sites, in the order of their bits above."""
    table = site_table(model)
    if table is None or not table.counted:
        return []
    return _plan(table, _device(model))[0]


def _peak(per_site: Tensor, alive: Tensor) -> tuple[Tensor, int]:
    per_step = alive @ per_site
    k = int(per_step.detach().argmax())  # the first largest step, as the max reduction
    return per_step[k], k


def activation_bits(model: nn.Module, reduction: str = "sum", bits: Tensor | None = None) -> Tensor:
    """Activation memory in bits: ``sum_l S_x,l`` (8b), ``max_l S_x,l`` (8c) or ``peak``, the
    largest sum of sites alive at once (``max_k sum_l alive[k, l] S_x,l``, :mod:`mixq.sites`).

    For ``max`` and ``peak`` the gradient goes to the first largest site / step (spec 5.2).
    ``bits``: as for :func:`activation_bits_per_site`.
    """
    if reduction not in ("sum", "max", "peak"):
        raise ValueError(f"unknown activation reduction {reduction!r}; valid: "
                         "['max', 'peak', 'sum']")  # fmt: skip
    per_site = activation_bits_per_site(model, bits)
    if per_site.numel() == 0:
        return per_site.new_zeros(())
    if reduction == "sum":
        return per_site.sum()
    if reduction == "max":
        # Index the first argmax instead of ``per_site.max()``: torch splits the gradient of a
        # full max evenly between tied sites, the reference code gives it all to the first.
        return per_site[per_site.detach().argmax()]
    table = site_table(model)
    return _peak(per_site, _plan(table, per_site.device)[3])[0]


def activation_peak_step(model: nn.Module) -> tuple[str, list[str]] | None:
    """``(op at the peak, names of the sites alive there)`` at the current bitwidths."""
    table = site_table(model)
    if table is None or not table.counted:
        return None
    with torch.no_grad():
        per_site = activation_bits_per_site(model)
        _, k = _peak(per_site, _plan(table, per_site.device)[3])
    return table.steps[k], table.alive_at(k)


def min_weight_bits(model: nn.Module) -> float:
    """The smallest ``S_w`` the bounds and bit sets allow (every quantizer at its
    :attr:`~mixq.quant.base.Quantizer.min_bits`: ``b_min``, or the smallest ``bit_set`` member)."""
    total = 0.0
    for _, m in _layers(model):
        for attr in ("weight", "bias"):
            t = getattr(m, attr)
            if t is not None:
                q = getattr(m, f"{attr}_quantizer", None)
                total += (q.min_bits if q else FLOAT_BITS) * t.numel()
    return total


def min_activation_bits(model: nn.Module, reduction: str) -> float:
    """The smallest activation memory (``reduction`` sum, max or peak) the bounds and bit sets
    allow (every site at its ``min_bits``; float sites at 32 bits)."""
    sites = activation_sites(model)
    vals = [(s.quantizer.min_bits if s.quantizer else FLOAT_BITS) * s.numel for s in sites]
    if not vals:
        return 0.0
    if reduction == "peak":
        alive = site_table(model).alive.double()
        return float((alive @ torch.tensor(vals, dtype=torch.float64)).max())
    return sum(vals) if reduction == "sum" else max(vals)


def smallest_sizes(model: nn.Module) -> dict[str, float]:
    """The smallest achievable size in bits of each measure: ``{"weight", "activation_sum",
    "activation_max", "activation_peak"}`` at every quantizer's ``min_bits``."""
    out = {"weight": min_weight_bits(model)}
    for name, reduction in _ACTIVATION_TERMS:
        out[name] = min_activation_bits(model, reduction)
    return out


_ACTIVATION_TERMS = (("activation_sum", "sum"), ("activation_max", "max"),
                     ("activation_peak", "peak"))  # fmt: skip


@dataclass(frozen=True)
class Budget:
    """Memory targets in bytes (None: no constraint). ``lam``: penalty weights (decision 7).

    Attributes:
        weight: (8a) total weight memory.
        activation_sum: (8b) total activation memory.
        activation_max: (8c) largest activation.
        lam: ``lambda`` for sizes in KiB; see :func:`scaled_lambda` for other model sizes.
        activation_peak: the largest activation memory alive at once in one forward (the
            arena a microcontroller runtime needs, :mod:`mixq.sites`).
    """

    weight: float | None = None
    activation_sum: float | None = None
    activation_max: float | None = None
    lam: float = 0.1
    activation_peak: float | None = None

    def __post_init__(self) -> None:
        for name, target in self._targets().items():
            if target is not None and (isinstance(target, bool) or not
                                       (isinstance(target, (int, float)) and target > 0
                                        and math.isfinite(target))):  # fmt: skip
                raise ValueError(f"Budget.{name}={target!r} must be a positive, finite number "
                                 "of bytes (or None: no constraint)")  # fmt: skip
        lam = self.lam
        if isinstance(lam, bool) or not (isinstance(lam, (int, float)) and math.isfinite(lam)
                                         and lam >= 0):  # fmt: skip
            raise ValueError(f"Budget.lam={lam!r} must be a finite number in [0, inf) "
                             "(the penalty weight; typical: 0.1)")  # fmt: skip

    @classmethod
    def parse(cls, weight=None, activation_sum=None, activation_max=None, lam=0.1,
              activation_peak=None) -> Budget:  # fmt: skip
        """Build from sizes such as ``"70KB"`` or a number of bytes; None: no constraint.

        Raises ``ValueError`` for a size that is not positive and finite (0, False and ""
        included: the CLI's rule, there is no "zero means off") and for a ``lam`` that is not
        a finite number >= 0.
        """
        names = ("weight", "activation_sum", "activation_max", "activation_peak")
        given = (weight, activation_sum, activation_max, activation_peak)
        sizes = []
        for name, v in zip(names, given, strict=True):
            if v is None:
                sizes.append(None)
                continue
            if isinstance(v, bool):
                raise ValueError(f"{name}={v!r}: give a size such as '70KB' (or None for no "
                                 "constraint)")  # fmt: skip
            try:
                sizes.append(parse_size(v))
            except ValueError as e:
                raise ValueError(f"{name}: {e} (None: no constraint)") from None
        w, s, m, p = sizes
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise ValueError(f"lam={lam!r} must be a finite number >= 0")
        return cls(w, s, m, lam=float(lam), activation_peak=p)

    def _targets(self) -> dict[str, float | None]:
        names = ("weight", "activation_sum", "activation_max", "activation_peak")
        return {k: getattr(self, k) for k in names}

    @property
    def active(self) -> bool:
        """True when at least one constraint is set."""
        return any(v is not None for v in self._targets().values())

    @property
    def activation_active(self) -> bool:
        """True when an activation constraint (sum, max or peak) is set."""
        return any(getattr(self, k) is not None for k, _ in _ACTIVATION_TERMS)

    def terms(self, model: nn.Module) -> dict[str, tuple[Tensor, float]]:
        """``{name: (size_bits, target_bits)}`` for each set constraint.

        The bitwidth surrogates of every quantizer the terms need are computed in one batch
        (:mod:`mixq.quant.group`).
        """
        weights = _weight_tensors(model) if self.weight is not None else ([], [], 0)
        sites = _site_quantizers(model) if self.activation_active else []
        w_bits = a_bits = None
        if weights[0] and sites:
            bits = bitwidth_surrogates(model, weights[0] + sites)
            w_bits, a_bits = torch.split(bits, [len(weights[0]), len(sites)])
        elif sites:
            a_bits = bitwidth_surrogates(model, sites)
        out = {}
        if self.weight is not None:
            out["weight"] = (_weight_bits(model, weights, w_bits), self.weight * 8)
        for name, reduction in _ACTIVATION_TERMS:
            target = getattr(self, name)
            if target is not None:
                out[name] = (activation_bits(model, reduction, a_bits), target * 8)
        return out

    def check_feasible(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` when a target is below what the bitwidth bounds and bit sets
        allow; the message gives the smallest achievable size of every measure."""
        smallest = smallest_sizes(model)
        bad = [(name, target) for name, target in self._targets().items()
               if target is not None and target * 8 < smallest[name]]  # fmt: skip
        if bad:
            what = "; ".join(f"impossible {name} budget {t / 1024:.2f} KiB (the smallest "
                             f"achievable is {smallest[name] / BITS_PER_KIB:.2f} KiB)"
                             for name, t in bad)  # fmt: skip
            table = ", ".join(f"{k} {v / BITS_PER_KIB:.2f} KiB" for k, v in smallest.items())
            raise ValueError(
                f"{what}. With every quantizer at its smallest allowed "
                f"bitwidth (b_min or the smallest bit_set member) the model needs: {table}. "
                "Raise the budget, lower b_min / allow smaller bitwidths in bit_set, or quantize "
                "the sites that stay float"
            )

    def penalty(self, model: nn.Module) -> Tensor:
        """``sum_j lambda * relu(S_j - S_0,j)^2`` with sizes in KiB (Eq. 10)."""
        total = torch.zeros((), device=_device(model))
        for size, target in self.terms(model).values():
            total = total + self.lam * torch.relu((size - target) / BITS_PER_KIB) ** 2
        return total

    def satisfied(self, model: nn.Module) -> dict[str, bool]:
        """Whether each set constraint holds for the current integer bitwidths."""
        with torch.no_grad():
            return {k: bool(s <= t + 1e-6) for k, (s, t) in self.terms(model).items()}


def float_sites_warning(model: nn.Module, budget: Budget) -> str | None:
    """A warning when an activation budget is set and sites stay float or are not counted
    (the budget then does not bound what the deployed network stores); None otherwise."""
    table = site_table(model)
    if table is None or not budget.activation_active:
        return None
    flt = [s.name for s in table.counted if s.quantizer is None]
    unc = [s.name for s in table.sites if not s.counted and not s.by_convention]
    if not flt and not unc:
        return None
    parts = []
    if flt:
        parts.append(f"{len(flt)} activation site(s) stay float, counted at 32 bits: "
                     + _few(flt))  # fmt: skip
    if unc:
        kib = sum(s.numel for s in table.sites if s.name in unc) * FLOAT_BITS / BITS_PER_KIB
        parts.append(f"{len(unc)} stored tensor(s) are not counted ({kib:.2f} KiB in float32): "
                     + _few(unc))  # fmt: skip
    return ("activation budget: " + "; ".join(parts)
            + ". See the report's activation sites; QuantConfig.activation_sites='inputs' "
            "counts and quantizes every layer input.")  # fmt: skip


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def float_weight_bits(model: nn.Module) -> int:
    """``S_w`` of the float model: 32 bits per conv/linear weight and bias."""
    return sum(FLOAT_BITS * t.numel() for _, m in _layers(model)
               for t in (m.weight, m.bias) if t is not None)  # fmt: skip


def scaled_lambda(model: nn.Module, base: float = 0.1) -> float:
    """Decision 7: ``lambda = base * (S_float(ResNet-20) / S_float(model))^2``."""
    return base * (RESNET20_FLOAT_WEIGHT_BITS / float_weight_bits(model)) ** 2


def layer_ops(m: nn.Module) -> dict[str, int]:
    """Multiplications and additions of a layer (paper Table 2), uniform and pow-2.

    ``MACs = M_l * M_{l-1} / groups * N_l^2 * K_l^2`` (convolution), ``M_l * M_{l-1}``
    (fully connected); uniform: ``mul = add = MACs``; pow-2: ``mul = 0``, ``add = 2 MACs``.
    """
    if isinstance(m, nn.Conv2d):
        out = getattr(m, "out_shape", None)
        if out is None:
            raise ValueError("layer has no recorded output shape; run record_sizes")
        kh, kw = m.kernel_size
        macs = m.out_channels * (m.in_channels // m.groups) * kh * kw * out[-1] * out[-2]
    elif isinstance(m, nn.Linear):
        out = getattr(m, "out_shape", (m.out_features,))
        positions = 1
        for s in out[:-1]:
            positions *= s
        macs = m.out_features * m.in_features * positions
    else:
        raise TypeError(f"no op count for {type(m).__name__}")
    return {"macs": macs, "uniform_mul": macs, "uniform_add": macs, "pow2_mul": 0,
            "pow2_add": 2 * macs}  # fmt: skip


__all__ = [
    "Budget",
    "activation_bits",
    "activation_bits_per_site",
    "activation_peak_step",
    "activation_sites",
    "bitwidth_surrogates",
    "float_sites_warning",
    "float_weight_bits",
    "layer_ops",
    "parse_size",
    "scaled_lambda",
    "smallest_sizes",
    "weight_bits",
]
