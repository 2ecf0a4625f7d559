"""The memory model and penalties of the paper's constraints (8a)-(8c) (spec 5.1, 5.2).

Sizes are in **bits** inside; people get KiB/MiB (1 KB = 1024 bytes, as in the paper).

* weight memory ``S_w = sum_t b_t * numel_t`` over every conv/linear weight and bias ``t``
  (a float, unquantized tensor counts 32 bits; batch norm is not counted);
* activation memory per site ``S_x,l = b_l * numel_l`` (``numel_l`` per sample, recorded by the
  dry forward of ``quantize_model``), aggregated as ``sum_l`` (8b) or ``max_l`` (8c);
* penalty ``lambda * relu(S - S_0)^2`` with ``S`` in KiB (Eq. 10, decision 7).

Every ``*_bits`` function is a differentiable function of the quantizer parameters only, through
``Quantizer.bitwidth_surrogate()``; its value equals the integer bitwidths of the report.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixq.layers import QuantAct

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


def weight_bits(model: nn.Module) -> Tensor:
    """``S_w`` in bits: ``sum b_t * numel_t`` over conv/linear weights and biases (8a)."""
    total: Tensor | float = 0.0
    for _, m in _layers(model):
        for attr in ("weight", "bias"):
            t = getattr(m, attr)
            if t is None:
                continue
            q = getattr(m, f"{attr}_quantizer", None)
            if q is None:
                total = total + FLOAT_BITS * t.numel()
            else:
                total = total + q.bitwidth_surrogate() * t.numel()
    return torch.as_tensor(total, device=_device(model))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def activation_sites(model: nn.Module) -> list[tuple[str, QuantAct]]:
    """The activation sites (``QuantAct`` modules) with their recorded sizes."""
    sites = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantAct)]
    for n, m in sites:
        if m.numel is None:
            raise ValueError(f"activation site {n!r} has no recorded size; run record_sizes")
    return sites


def activation_bits_per_site(model: nn.Module) -> Tensor:
    """``S_x,l = b_l * numel_l`` for every activation site, as a 1-D tensor (bits)."""
    device = _device(model)
    values = []
    for _, m in activation_sites(model):
        if m.quantizer is None:
            b = torch.tensor(float(FLOAT_BITS), device=device)
        else:
            b = m.quantizer.bitwidth_surrogate()
        values.append(b * m.numel)
    return torch.stack(values) if values else torch.zeros(0, device=device)


def activation_bits(model: nn.Module, reduction: str = "sum") -> Tensor:
    """Activation memory in bits: ``sum_l S_x,l`` (8b) or ``max_l S_x,l`` (8c).

    For ``max`` the gradient goes to the first largest site only (spec 5.2).
    """
    per_site = activation_bits_per_site(model)
    if per_site.numel() == 0:
        return per_site.new_zeros(())
    if reduction == "sum":
        return per_site.sum()
    if reduction == "max":
        # Index the first argmax instead of ``per_site.max()``: torch splits the gradient of a
        # full max evenly between tied sites, the reference code gives it all to the first.
        return per_site[per_site.detach().argmax()]
    raise ValueError(f"unknown activation reduction {reduction!r}; valid: ['max', 'sum']")


def min_weight_bits(model: nn.Module) -> float:
    """The smallest ``S_w`` the bounds allow (every quantizer at its ``b_min``)."""
    total = 0.0
    for _, m in _layers(model):
        for attr in ("weight", "bias"):
            t = getattr(m, attr)
            if t is not None:
                q = getattr(m, f"{attr}_quantizer", None)
                total += (q.bounds.b_min if q else FLOAT_BITS) * t.numel()
    return total


def min_activation_bits(model: nn.Module, reduction: str) -> float:
    """The smallest activation memory the bounds allow."""
    vals = [(m.quantizer.bounds.b_min if m.quantizer else FLOAT_BITS) * m.numel
            for _, m in activation_sites(model)]  # fmt: skip
    if not vals:
        return 0.0
    return sum(vals) if reduction == "sum" else max(vals)


@dataclass(frozen=True)
class Budget:
    """Memory targets in bytes (None: no constraint). ``lam``: penalty weights (decision 7).

    Attributes:
        weight: (8a) total weight memory.
        activation_sum: (8b) total activation memory.
        activation_max: (8c) largest activation.
        lam: ``lambda`` for sizes in KiB; see :func:`scaled_lambda` for other model sizes.
    """

    weight: float | None = None
    activation_sum: float | None = None
    activation_max: float | None = None
    lam: float = 0.1

    @classmethod
    def parse(cls, weight=None, activation_sum=None, activation_max=None, lam=0.1) -> Budget:
        """Build from strings such as ``"70KB"``; raises ``ValueError`` for bad sizes."""
        conv = [None if v in (None, "", 0) else parse_size(v)
                for v in (weight, activation_sum, activation_max)]  # fmt: skip
        return cls(*conv, lam=float(lam))

    @property
    def active(self) -> bool:
        """True when at least one constraint is set."""
        return any(v is not None for v in (self.weight, self.activation_sum, self.activation_max))

    def terms(self, model: nn.Module) -> dict[str, tuple[Tensor, float]]:
        """``{name: (size_bits, target_bits)}`` for each set constraint."""
        out = {}
        if self.weight is not None:
            out["weight"] = (weight_bits(model), self.weight * 8)
        if self.activation_sum is not None:
            out["activation_sum"] = (activation_bits(model, "sum"), self.activation_sum * 8)
        if self.activation_max is not None:
            out["activation_max"] = (activation_bits(model, "max"), self.activation_max * 8)
        return out

    def check_feasible(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` when a target is below what the bitwidth bounds allow."""
        mins = {
            "weight": min_weight_bits(model),
            "activation_sum": min_activation_bits(model, "sum"),
            "activation_max": min_activation_bits(model, "max"),
        }
        for name, target in (("weight", self.weight), ("activation_sum", self.activation_sum),
                             ("activation_max", self.activation_max)):  # fmt: skip
            if target is not None and target * 8 < mins[name]:
                raise ValueError(
                    f"impossible {name} budget {target / 1024:.2f} KiB: even with every "
                    f"quantizer at its minimum bitwidth the model needs "
                    f"{mins[name] / BITS_PER_KIB:.2f} KiB; raise the budget or lower b_min"
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
    "float_weight_bits",
    "layer_ops",
    "parse_size",
    "scaled_lambda",
    "weight_bits",
]
