"""Parameter bounds of the quantizers (docs/method.md sections 1.4 and 2.3).

The defaults are the values the reference training script passes in (not its function-signature
defaults, which it always overrides). Every bound can be overridden per quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

MARGIN = 1e-5
"""Projection margin of spec 1.5: keeps raw parameters strictly inside their clip range."""


@dataclass(frozen=True)
class Bounds:
    """Closed ranges ``[lo, hi]`` of the raw parameters ``b``, ``d``, ``q_min`` and ``q_max``."""

    b_min: float
    b_max: float
    d_min: float
    d_max: float
    q_min_min: float
    q_min_max: float
    q_max_min: float
    q_max_max: float

    def __post_init__(self) -> None:
        for name in ("b", "d", "q_min", "q_max"):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if not lo <= hi:
                raise ValueError(f"bound {name}_min={lo} must be <= {name}_max={hi}")
            if name != "b" and lo <= 0:
                raise ValueError(f"bound {name}_min={lo} must be > 0")
        if self.b_min < 1:
            raise ValueError(f"b_min={self.b_min} must be >= 1 bit")

    def range(self, name: str) -> tuple[float, float]:
        """``(lo, hi)`` for the raw parameter ``name`` (``b``, ``d``, ``q_min`` or ``q_max``)."""
        return getattr(self, f"{name}_min"), getattr(self, f"{name}_max")


def default_bounds(kind: str, signed: bool, **overrides: float) -> Bounds:
    """Default bounds for a ``kind`` ('uniform' or 'pow2') quantizer of weights or activations.

    ========== ========================== ==========================
    quantity   weights (signed)            activations (unsigned)
    ========== ========================== ==========================
    b          [2, 8]                      [1, 8]
    d          [2^-8, 1]                   [2^-8, 1]
    q_max      [2^-8, 127]                 [2^-8, 255]
    q_min      [2^-16, 127] (pow-2)        [2^-14, 255] (pow-2)
    ========== ========================== ==========================
    """
    values = {
        "b_min": 2.0 if signed else 1.0,
        "b_max": 8.0,
        "d_min": 2.0**-8,
        "d_max": 1.0,
        "q_min_min": 2.0**-16 if signed else 2.0**-14,
        "q_min_max": 127.0 if signed else 255.0,
        "q_max_min": 2.0**-8,
        "q_max_max": 127.0 if signed else 255.0,
    }
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"unknown bound(s) {sorted(unknown)}; valid: {sorted(values)}")
    values.update({k: float(v) for k, v in overrides.items() if v is not None})
    return Bounds(**values)
