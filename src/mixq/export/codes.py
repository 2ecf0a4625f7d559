"""Integer codes of quantized tensors, and quantizers described as plain data (and back).

Uniform (spec 1.2): ``code = round_half_away(clip(x, x_lo, x_hi) / d_q)``, an integer in
``[-k, k]`` (signed) or ``[0, k]`` (unsigned), ``k = round(x_hi / d_q)``; the fake-quantized
value is exactly ``code * d_q`` (float32), which is how every exporter dequantizes.

Power-of-two (spec 2.2): ``y = s * q_min * 2^e`` with ``e`` in ``[0, L]``, ``L =
log2(q_max / q_min)``; the code is the field ``(s << m_bits) | m`` with the sign bit ``s`` (1 for
negative, only when signed) above an ``m_bits``-wide magnitude index ``m = e`` (``m = e + 1``
and ``m = 0`` for an exact zero when the quantizer has a zero level).

Every encoding is checked at export time: decoding it must give the fake-quantized tensor
bit for bit, or :class:`ExportError` is raised.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mixq.export.bitpack import MAX_BITS, bits_needed
from mixq.export.errors import ExportError, ExportWarning, PackedFormatError
from mixq.quant.base import Quantizer
from mixq.quant.registry import QUANTIZER_KINDS
from mixq.quant.ste import round_half_away


def quantizer_spec(q: Quantizer) -> dict[str, Any]:
    """Everything needed to rebuild ``q`` exactly: raw parameters, bounds, flags, and (for
    readers) the derived quantities ``d, x_hi, k`` (uniform) or ``q_min, q_max, L`` (pow-2)."""
    spec: dict[str, Any] = {
        "kind": q.kind,
        "parametrization": q.parametrization,
        "signed": q.signed,
        "learnable": q.learnable,
        "params": {n: float(getattr(q, n).detach()) for n in q.param_names},
        "bounds": dataclasses.asdict(q.bounds),
        "bitwidth": q.bitwidth,
        "bit_set": list(q.bit_set) if q.bit_set is not None else None,
    }
    with torch.no_grad():
        a, b = (float(v) for v in q.derived())
    if q.kind == "uniform":
        spec.update(pow2_step=q.pow2_step, d=a, x_hi=b, k=q.levels)
    elif q.kind == "pow2":
        spec.update(with_zero=q.with_zero, q_min=a, q_max=b, L=q.exponent_span)
    else:  # pragma: no cover - only two kinds exist
        raise ExportError(f"unknown quantizer kind {q.kind!r}")
    return spec


def build_quantizer(spec: dict[str, Any]) -> Quantizer:
    """Rebuild the quantizer of :func:`quantizer_spec`; its derived values must match."""
    try:
        cls = QUANTIZER_KINDS[spec["kind"]]
        kwargs: dict[str, Any] = {"signed": spec["signed"], "learnable": spec["learnable"],
                                  "bit_set": spec.get("bit_set")}  # fmt: skip
        if spec["kind"] == "uniform":
            kwargs["pow2_step"] = spec["pow2_step"]
        else:
            kwargs["with_zero"] = spec["with_zero"]
        q = cls(spec["parametrization"], **kwargs, **spec["bounds"])
        for name, value in spec["params"].items():
            getattr(q, name).data.fill_(float(value))
        keys = ("d", "x_hi") if spec["kind"] == "uniform" else ("q_min", "q_max")
        expected = tuple(float(spec[k]) for k in keys)
    except (KeyError, TypeError, ValueError) as e:
        raise PackedFormatError(f"corrupt quantizer description {spec!r}: {e!r}") from None
    with torch.no_grad():
        got = tuple(float(v) for v in q.derived())
    if got != expected or q.bitwidth != spec["bitwidth"]:
        raise PackedFormatError(
            f"quantizer rebuilt from the manifest gives {keys}={got}, bitwidth {q.bitwidth}; "
            f"the manifest says {expected}, bitwidth {spec['bitwidth']}"
        )
    return q


@dataclass
class Encoded:
    """A quantized tensor as integer codes.

    Attributes:
        codes: integer array (tensor shape) of the stored fields.
        bits: field width actually stored (>= the quantizer's bitwidth).
        signed: whether ``codes`` are two's complement (uniform signed) or plain binary.
        meta: the manifest fields describing the encoding.
    """

    codes: np.ndarray
    bits: int
    signed: bool
    meta: dict[str, Any]


def _stored_bits(name: str, declared: int, needed: int,
                 bit_set: tuple[int, ...] | None = None) -> int:  # fmt: skip
    """``declared`` when the codes fit (the usual case), else ``needed`` with a warning;
    with a ``bit_set`` the stored width is always a member (a target runs only those)."""
    if bit_set is not None:
        if declared not in bit_set:
            raise ExportError(f"{name}: bitwidth {declared} is not in its bit_set {list(bit_set)}")
        if needed > declared:
            wider = [b for b in bit_set if b >= needed]
            if not wider:
                raise ExportError(
                    f"{name}: its codes need {needed} bits, more than its bit_set "
                    f"{list(bit_set)} allows"
                )
            needed = wider[0]
    if max(needed, declared) > MAX_BITS:
        raise ExportError(
            f"{name}: bitwidth {declared} (codes need {needed} bits); the exporters support "
            f"at most {MAX_BITS} bits"
        )
    if needed <= declared:
        return declared
    warnings.warn(
        f"{name}: its codes need {needed} bits but the quantizer's bitwidth (charged by the "
        f"memory model) is {declared}; stored with {needed} bits (spec 1.3: with U2 'b_qmax' "
        "the level index k = round(x_hi/d) can reach 2^(b-1), one level more than b bits hold)",
        ExportWarning,
        stacklevel=3,
    )
    return needed


@torch.no_grad()
def encode(name: str, q: Quantizer, t: Tensor) -> Encoded:
    """Integer codes of ``q(t)``; raises :class:`ExportError` if they do not reproduce it."""
    y = q(t.detach().float()).cpu()
    spec = quantizer_spec(q)
    declared = spec["bitwidth"]
    if q.kind == "uniform":
        d_q = q.derived()[0].float().cpu()
        codes = round_half_away(y / d_q)  # y = code * d_q: the division is exact or nearly
        arr = codes.to(torch.int64).numpy()
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        bits = _stored_bits(name, declared, bits_needed(lo, hi, q.signed), q.bit_set)
        enc = Encoded(arr, bits, q.signed, {})
        enc.meta = {"encoding": "twos_complement" if q.signed else "unsigned", "d": spec["d"],
                    "k": spec["k"]}  # fmt: skip
    else:
        x_min = float(q.derived()[0])
        mag = y.abs()
        neg = (y < 0).to(torch.int64)
        nz = mag > 0
        e = torch.where(nz, torch.log2(torch.where(nz, mag, 1.0) / x_min), 0.0)
        e = torch.round(e).to(torch.int64)
        m = (e + 1) * nz if q.with_zero else e
        m_needed = (spec["L"] + int(q.with_zero)).bit_length()
        bits = _stored_bits(name, declared, int(q.signed) + m_needed, q.bit_set)
        m_bits = bits - int(q.signed)
        arr = ((neg << m_bits) | m).numpy() if q.signed else m.numpy()
        enc = Encoded(arr, bits, False, {})
        enc.meta = {"encoding": "sign_exponent" if q.signed else "exponent", "m_bits": m_bits,
                    "q_min": spec["q_min"], "q_max": spec["q_max"], "L": spec["L"],
                    "with_zero": q.with_zero,
                    "exponent_min": round(math.log2(spec["q_min"]))}  # fmt: skip
    enc.meta.update(kind=q.kind, signed=q.signed, bits=enc.bits, declared_bitwidth=declared,
                    widened=enc.bits != declared, quantizer=spec)  # fmt: skip
    if not torch.equal(decode(enc.meta, enc.codes, tuple(y.shape)), y):
        raise ExportError(f"{name}: the integer codes do not reproduce the fake-quantized tensor")
    return enc


def decode(meta: dict[str, Any], codes: np.ndarray, shape: tuple[int, ...]) -> Tensor:
    """Dequantize stored codes (as :func:`encode` describes them) to a float32 tensor."""
    c = torch.from_numpy(np.asarray(codes, dtype=np.int64).reshape(shape))
    if meta["kind"] == "uniform":
        d = torch.tensor(meta["d"], dtype=torch.float32)
        return c.to(torch.float32) * d
    m_bits = int(meta["m_bits"])
    m = c & ((1 << m_bits) - 1)
    neg = (c >> m_bits) & 1 if meta["signed"] else torch.zeros_like(c)
    e = m - 1 if meta["with_zero"] else m
    x_min = torch.tensor(meta["q_min"], dtype=torch.float32)
    mag = torch.ldexp(x_min, e.clamp(min=0).to(torch.float32))
    if meta["with_zero"]:
        mag = torch.where(m == 0, 0.0, mag)
    return torch.where(neg.bool(), -mag, mag)
