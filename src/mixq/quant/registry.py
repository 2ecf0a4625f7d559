"""Registry of quantizer kinds, and parsing of ``kind/parametrization`` spec strings."""

from __future__ import annotations

import difflib
from typing import Any

from mixq.quant.base import Quantizer, check_parametrization
from mixq.quant.pow2 import Pow2Quantizer
from mixq.quant.uniform import UniformQuantizer

QUANTIZER_KINDS: dict[str, type[Quantizer]] = {
    "uniform": UniformQuantizer,
    "pow2": Pow2Quantizer,
}


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``"uniform/d_qmax"`` into ``("uniform", "d_qmax")``, validating both parts."""
    kind, sep, parametrization = spec.partition("/")
    if not sep:
        raise ValueError(
            f"quantizer spec {spec!r} must look like 'uniform/d_qmax' or 'pow2/qmin_qmax'"
        )
    if kind not in QUANTIZER_KINDS:
        hint = difflib.get_close_matches(kind, list(QUANTIZER_KINDS), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(
            f"unknown quantizer kind {kind!r}; valid: {sorted(QUANTIZER_KINDS)}.{extra}"
        )
    check_parametrization(kind, parametrization)
    return kind, parametrization


def make_quantizer(spec: str, *, signed: bool, **kwargs: Any) -> Quantizer:
    """Build the quantizer named by ``spec`` (e.g. ``"pow2/qmin_qmax"``)."""
    kind, parametrization = parse_spec(spec)
    return QUANTIZER_KINDS[kind](parametrization, signed=signed, **kwargs)
