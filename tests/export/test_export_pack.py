"""Bit-packing round-trips for every width (property-based)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqat.export import pack

WIDTHS = list(range(0, 17))


@st.composite
def values_at_width(draw, signed: bool):
    bits = draw(st.sampled_from(WIDTHS))
    lo, hi = pack.value_range(bits, signed)
    n = draw(st.integers(0, 300))
    if signed and bits == 1:
        vals = draw(st.lists(st.sampled_from([-1, 1]), min_size=n, max_size=n))
    else:
        vals = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    return bits, np.array(vals, dtype=np.int64)


@settings(max_examples=300, deadline=None)
@given(values_at_width(signed=True))
def test_signed_round_trip(case) -> None:
    bits, values = case
    buf = pack.pack_values(values, bits, signed=True)
    assert len(buf) == pack.packed_nbytes(len(values), bits)
    assert np.array_equal(pack.unpack_values(buf, bits, len(values), signed=True), values)


@settings(max_examples=300, deadline=None)
@given(values_at_width(signed=False))
def test_unsigned_round_trip(case) -> None:
    bits, values = case
    buf = pack.pack_values(values, bits, signed=False)
    assert len(buf) == pack.packed_nbytes(len(values), bits)
    assert np.array_equal(pack.unpack_values(buf, bits, len(values), signed=False), values)


@pytest.mark.parametrize("bits", range(1, 17))
def test_every_width_extremes(bits: int) -> None:
    lo, hi = pack.value_range(bits, signed=True)
    values = np.array([lo, hi, lo, hi, hi, lo, lo], dtype=np.int64)
    if bits >= 2:
        values = np.concatenate([values, [0, 1, -1]])
    buf = pack.pack_values(values, bits, signed=True)
    assert np.array_equal(pack.unpack_values(buf, bits, len(values), signed=True), values)


def test_binary_encoding_and_bit_order() -> None:
    # -1 -> 0, +1 -> 1, least significant bit first
    assert pack.pack_values(np.array([1, -1, -1, -1, -1, -1, -1, -1, 1]), 1, signed=True) == bytes([0b00000001, 0b1])
    # two's complement at 4 bits, low nibble first
    assert pack.pack_values(np.array([-1, 2]), 4, signed=True) == bytes([0x2F])
    assert pack.pack_values(np.array([0x1234]), 16, signed=False) == bytes([0x34, 0x12])


@st.composite
def row_matrices(draw):
    out = draw(st.integers(1, 12))
    n_in = draw(st.integers(1, 9))
    row_bits = np.array(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 16]), min_size=out, max_size=out)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    codes = np.zeros((out, n_in), dtype=np.int64)
    for j, b in enumerate(row_bits):
        if b == 1:
            codes[j] = rng.choice([-1, 1], size=n_in)
        elif b >= 2:
            lo, hi = pack.value_range(int(b), signed=True)
            codes[j] = rng.integers(lo, hi + 1, size=n_in)
    return codes, row_bits


@settings(max_examples=200, deadline=None)
@given(row_matrices())
def test_grouped_rows_round_trip(case) -> None:
    codes, row_bits = case
    buf = pack.pack_rows(codes, row_bits)
    assert len(buf) == pack.packed_rows_nbytes(row_bits, codes.shape[1])
    # at most one padding byte per group on top of the exact bit budget
    budget = int(row_bits.sum()) * codes.shape[1]
    assert budget / 8 <= len(buf) <= budget / 8 + len(pack.row_groups(row_bits))
    assert np.array_equal(pack.unpack_rows(buf, codes.shape, row_bits), codes)


def test_row_order_is_stable_grouping() -> None:
    bits = np.array([8, 1, 4, 1, 8, 2])
    assert pack.row_order(bits).tolist() == [1, 3, 5, 2, 0, 4]
    assert pack.row_groups(bits) == [(1, 2), (2, 1), (4, 1), (8, 2)]


def test_out_of_range_values_are_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        pack.pack_values(np.array([8]), 4, signed=True)
    with pytest.raises(ValueError, match="-1 or \\+1"):
        pack.pack_values(np.array([0]), 1, signed=True)
    with pytest.raises(ValueError, match="not supported"):
        pack.pack_values(np.array([0]), 17, signed=True)
    with pytest.raises(ValueError, match="need"):
        pack.unpack_values(b"\x00", 4, 3, signed=True)
