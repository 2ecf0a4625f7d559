"""Bit packing of integer codes at 1..16 bits: round trip, layout, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mixq.export import bitpack
from mixq.export.bitpack import bits_needed, code_range, pack_bits, packed_nbytes, unpack_bits


@st.composite
def codes_and_width(draw):
    bits = draw(st.integers(1, 16))
    signed = draw(st.booleans())
    lo, hi = code_range(bits, signed)
    codes = draw(st.lists(st.integers(lo, hi), max_size=70))
    return np.array(codes, dtype=np.int64), bits, signed


@given(codes_and_width())
def test_round_trip_any_width(case):
    codes, bits, signed = case
    data = pack_bits(codes, bits, signed)
    assert len(data) == packed_nbytes(codes.size, bits) == -(-codes.size * bits // 8)
    np.testing.assert_array_equal(unpack_bits(data, codes.size, bits, signed), codes)


@given(codes_and_width())
def test_fields_are_lsb_first_twos_complement(case):
    codes, bits, signed = case
    stream = np.unpackbits(
        np.frombuffer(pack_bits(codes, bits, signed), np.uint8), bitorder="little"
    )
    for i, c in enumerate(codes[:8]):
        field = sum(int(b) << j for j, b in enumerate(stream[i * bits : (i + 1) * bits]))
        assert field == (int(c) & ((1 << bits) - 1))
    assert not stream[codes.size * bits :].any()  # padding bits are zero


def test_known_layouts():
    assert pack_bits(np.array([1, -1, 0]), 2, signed=True).hex() == "0d"
    # 4 bits: first code in the low nibble (the ONNX INT4 layout)
    assert pack_bits(np.array([-7, 3, 5]), 4, signed=True) == bytes([0x39, 0x05])
    codes = np.arange(-128, 128)
    assert pack_bits(codes, 8, signed=True) == codes.astype(np.int8).tobytes()
    codes16 = np.array([-32768, -1, 0, 12345, 32767])
    assert pack_bits(codes16, 16, signed=True) == codes16.astype("<i2").tobytes()
    assert (
        pack_bits(np.array([65535, 1]), 16, signed=False) == np.array([65535, 1], "<u2").tobytes()
    )


def test_chunked_packing_matches(monkeypatch):
    rng = np.random.default_rng(0)
    codes = rng.integers(-16, 16, size=1001)
    ref = pack_bits(codes, 5, True)
    monkeypatch.setattr(bitpack, "_CHUNK", 64)
    assert pack_bits(codes, 5, True) == ref
    np.testing.assert_array_equal(unpack_bits(ref, codes.size, 5, True), codes)


def test_bits_needed():
    assert bits_needed(-8, 7, True) == 4
    assert bits_needed(-7, 8, True) == 5  # the U2 overflow level needs one more bit
    assert bits_needed(0, 0, True) == 1
    assert bits_needed(0, 15, False) == 4
    assert bits_needed(0, 16, False) == 5
    with pytest.raises(ValueError):
        bits_needed(-1, 3, False)


@pytest.mark.parametrize(
    ("codes", "bits", "signed", "match"),
    [
        ([8], 4, True, "do not fit"),
        ([-9], 4, True, "do not fit"),
        ([-1], 3, False, "do not fit"),
        ([1], 0, True, "bitwidth"),
        ([1], 17, False, "bitwidth"),
    ],
)
def test_out_of_range_codes_never_wrap(codes, bits, signed, match):
    with pytest.raises(ValueError, match=match):
        pack_bits(np.array(codes), bits, signed)


def test_refusals():
    with pytest.raises(TypeError, match="integers"):
        pack_bits(np.array([0.5]), 4, True)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(b"\x00", 3, 5, True)
