"""Vectorized bit packing of integer codes at any width ``b`` in 1..16 (numpy, no Python loops).

Layout (the ``mixq-packed`` bitstream): element ``i`` occupies stream bits ``[i*b, (i+1)*b)``,
least significant bit first; stream bit ``j`` is bit ``j % 8`` of byte ``j // 8`` (LSB-first
within a byte, numpy's ``bitorder="little"``). A tensor of ``n`` codes takes ``ceil(n*b/8)``
bytes; the unused high bits of the last byte are zero. For ``b = 4`` this is the ONNX INT4
layout (first element in the low nibble); for ``b = 8`` and ``16`` it is plain little-endian.

Signed codes are stored in ``b``-bit two's complement (range ``[-2^(b-1), 2^(b-1) - 1]``),
unsigned codes as plain binary (``[0, 2^b - 1]``). Out-of-range codes raise, never wrap.
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 16
_CHUNK = 1 << 20  # elements per chunk (a multiple of 8 keeps chunks byte-aligned)


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(lo, hi)``: the codes a ``bits``-bit field holds (two's complement when signed)."""
    _check_bits(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def bits_needed(lo: int, hi: int, signed: bool) -> int:
    """The smallest field width holding every code in ``[lo, hi]`` (at least 1)."""
    if signed:
        return max(1, int(max(hi, -lo - 1, 0)).bit_length() + 1)
    if lo < 0:
        raise ValueError(f"unsigned codes cannot be negative (min {lo})")
    return max(1, int(hi).bit_length())


def packed_nbytes(n: int, bits: int) -> int:
    """``ceil(n * bits / 8)``: bytes of ``n`` packed ``bits``-bit codes."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, (int, np.integer)) and 1 <= bits <= MAX_BITS):
        raise ValueError(f"bitwidth {bits!r} must be an integer in [1, {MAX_BITS}]")


def pack_bits(codes: np.ndarray, bits: int, signed: bool) -> bytes:
    """Pack integer ``codes`` (any shape, flattened in C order) into ``bits``-bit fields.

    Args:
        codes: integer array.
        bits: field width, 1..16.
        signed: two's complement fields if True, plain binary otherwise.

    Returns:
        ``ceil(codes.size * bits / 8)`` bytes.

    Raises:
        ValueError: a code outside the field's range, or a bad width.

    Example:
        >>> pack_bits(np.array([1, -1, 0]), 2, signed=True).hex()
        '0d'
    """
    _check_bits(bits)
    flat = np.asarray(codes).reshape(-1)
    if flat.size and not np.issubdtype(flat.dtype, np.integer):
        raise TypeError(f"codes must be integers, got {flat.dtype}")
    lo, hi = code_range(bits, signed)
    if flat.size:
        cmin, cmax = int(flat.min()), int(flat.max())
        if cmin < lo or cmax > hi:
            raise ValueError(
                f"codes in [{cmin}, {cmax}] do not fit {bits}-bit "
                f"{'signed' if signed else 'unsigned'} fields [{lo}, {hi}]"
            )
    fields = (flat.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint32)
    shifts = np.arange(bits, dtype=np.uint32)
    out = []
    for start in range(0, fields.size, _CHUNK):
        chunk = fields[start : start + _CHUNK]
        bitmat = ((chunk[:, None] >> shifts) & 1).astype(np.uint8)
        out.append(np.packbits(bitmat.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def unpack_bits(data: bytes | memoryview, n: int, bits: int, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` codes as ``int32`` (sign-extended when signed).

    Raises:
        ValueError: ``data`` shorter than ``ceil(n * bits / 8)`` bytes, or a bad width.
    """
    _check_bits(bits)
    need = packed_nbytes(n, bits)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size < need:
        raise ValueError(f"need {need} bytes for {n} {bits}-bit codes, got {buf.size}")
    weights = (np.uint32(1) << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    out = np.empty(n, dtype=np.int32)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        b0 = start * bits // 8  # start is a multiple of 8: byte-aligned
        raw = buf[b0 : b0 + packed_nbytes(m, bits)]
        bitvec = np.unpackbits(raw, count=m * bits, bitorder="little")
        vals = bitvec.reshape(m, bits).astype(np.uint32) @ weights
        out[start : start + m] = vals.astype(np.int32)
    if signed:
        half = 1 << (bits - 1)
        out = np.where(out >= half, out - (1 << bits), out).astype(np.int32)
    return out
