"""Bit-packing of 1..16-bit integer codes, with weight rows grouped by bit-width.

Encoding of one value at ``b`` bits (``u`` is the stored unsigned field):

* unsigned: ``u = v`` (``0 <= v < 2**b``);
* signed, ``b >= 2``: two's complement, ``u = v mod 2**b``;
* signed, ``b == 1`` (binary weights ``-1/+1``): ``u = 0`` for ``-1`` and ``u = 1`` for ``+1``;
* ``b == 0``: nothing is stored; every value is 0 (a pruned row).

Values are laid out back to back, least significant bit first: bit ``j`` of value ``i`` is bit
``(i*b + j) % 8`` of byte ``(i*b + j) // 8`` (the ``bitorder="little"`` of :func:`numpy.packbits`).
The last byte is zero-padded.

A weight matrix ``[out, in]`` is stored *grouped by row bit-width*: the rows are put in the order of
a stable sort of their widths (:func:`row_order`), each group (all rows of one width) is packed as one
row-major bit stream starting on a byte boundary, and the groups follow each other in increasing
width. The permutation is not stored: it is recomputed from the per-row widths, which the file keeps
anyway; unpacking puts every row back at its original index, so the next layer's columns need no
permutation.

Example:
    >>> import numpy as np
    >>> v = np.array([-1, 1, 1, -1, 1], dtype=np.int64)
    >>> buf = pack_values(v, bits=1, signed=True)
    >>> len(buf), unpack_values(buf, bits=1, count=5, signed=True).tolist()
    (1, [-1, 1, 1, -1, 1])
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 16


def _check_bits(bits: int) -> int:
    bits = int(bits)
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bit-width {bits} is not supported: packing handles 0..{MAX_BITS} bits")
    return bits


def value_range(bits: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest value that :func:`pack_values` stores at ``bits`` (two's complement range)."""
    bits = _check_bits(bits)
    if bits == 0:
        return 0, 0
    if signed:
        return (-1, 1) if bits == 1 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return 0, (1 << bits) - 1


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` values take at ``bits`` bits (rounded up to whole bytes)."""
    return (int(count) * _check_bits(bits) + 7) // 8


def to_unsigned(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """The unsigned ``bits``-bit fields that encode ``values`` (see the module docstring)."""
    bits = _check_bits(bits)
    v = np.asarray(values, dtype=np.int64).ravel()
    lo, hi = value_range(bits, signed)
    if v.size and (v.min() < lo or v.max() > hi):
        raise ValueError(f"values outside [{lo}, {hi}] cannot be packed at {bits} bits ({'signed' if signed else 'unsigned'})")
    if bits == 0:
        return np.zeros(v.shape, dtype=np.uint32)
    if signed and bits == 1:
        if np.any(v == 0):
            raise ValueError("1-bit signed values must be -1 or +1")
        return (v > 0).astype(np.uint32)
    return (v & ((1 << bits) - 1)).astype(np.uint32)


def from_unsigned(fields: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Inverse of :func:`to_unsigned`, as ``int64``."""
    bits = _check_bits(bits)
    u = np.asarray(fields).astype(np.int64)
    if bits == 0:
        return np.zeros_like(u)
    if not signed:
        return u
    if bits == 1:
        return 2 * u - 1
    return np.where(u >= (1 << (bits - 1)), u - (1 << bits), u)


def pack_values(values: np.ndarray, bits: int, signed: bool) -> bytes:
    """Pack integer ``values`` (any shape, row-major) into ``ceil(n*bits/8)`` bytes."""
    bits = _check_bits(bits)
    u = to_unsigned(values, bits, signed)
    if bits == 0 or u.size == 0:
        return b""
    if bits == 8:
        return u.astype(np.uint8).tobytes()
    if bits == 16:
        return u.astype("<u2").tobytes()
    planes = ((u[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack_values(buf: bytes | np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """Unpack ``count`` values of ``bits`` bits from ``buf`` (inverse of :func:`pack_values`), as ``int64``."""
    bits = _check_bits(bits)
    raw = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes | bytearray | memoryview) else np.asarray(buf, np.uint8)
    need = packed_nbytes(count, bits)
    if raw.size < need:
        raise ValueError(f"{count} values at {bits} bits need {need} bytes, got {raw.size}")
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    if bits == 8:
        u = raw[:count]
    elif bits == 16:
        u = raw[: 2 * count].view("<u2")
    else:
        planes = np.unpackbits(raw[:need], bitorder="little", count=count * bits).reshape(count, bits)
        u = planes.astype(np.uint32) @ (np.uint32(1) << np.arange(bits, dtype=np.uint32))
    return from_unsigned(u, bits, signed)


def row_order(row_bits: np.ndarray) -> np.ndarray:
    """Storage order of the rows: a stable sort by bit-width (rows of one width stay in index order)."""
    return np.argsort(np.asarray(row_bits, dtype=np.int64), kind="stable")


def row_groups(row_bits: np.ndarray) -> list[tuple[int, int]]:
    """``[(bits, rows), ...]`` in storage order (increasing width)."""
    widths, counts = np.unique(np.asarray(row_bits, dtype=np.int64), return_counts=True)
    return [(int(w), int(c)) for w, c in zip(widths, counts, strict=True)]


def packed_rows_nbytes(row_bits: np.ndarray, in_features: int) -> int:
    """Size of :func:`pack_rows`' output: each group padded to a whole byte."""
    return sum(packed_nbytes(rows * in_features, bits) for bits, rows in row_groups(row_bits))


def pack_rows(codes: np.ndarray, row_bits: np.ndarray, signed: bool = True) -> bytes:
    """Pack a ``[out, in]`` code matrix whose row ``j`` has ``row_bits[j]`` bits, grouped by width.

    Example:
        >>> import numpy as np
        >>> w = np.array([[1, -1, 1], [3, -3, 0], [-1, -1, 1]])
        >>> buf = pack_rows(w, np.array([1, 3, 1]))
        >>> np.array_equal(unpack_rows(buf, w.shape, np.array([1, 3, 1])), w)
        True
    """
    codes = np.asarray(codes, dtype=np.int64)
    row_bits = np.asarray(row_bits, dtype=np.int64).ravel()
    if codes.ndim != 2 or row_bits.shape != (codes.shape[0],):
        raise ValueError(f"pack_rows needs codes [out, in] and one width per row, got {codes.shape} and {row_bits.shape}")
    order = row_order(row_bits)
    chunks = []
    start = 0
    for bits, rows in row_groups(row_bits):
        chunks.append(pack_values(codes[order[start : start + rows]], bits, signed))
        start += rows
    return b"".join(chunks)


def unpack_rows(buf: bytes | np.ndarray, shape: tuple[int, int], row_bits: np.ndarray, signed: bool = True) -> np.ndarray:
    """Inverse of :func:`pack_rows`: the ``[out, in]`` ``int64`` matrix in the original row order."""
    out, n_in = int(shape[0]), int(shape[1])
    row_bits = np.asarray(row_bits, dtype=np.int64).ravel()
    if row_bits.shape != (out,):
        raise ValueError(f"unpack_rows needs one width per row ({out}), got {row_bits.shape}")
    raw = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, bytes | bytearray | memoryview) else np.asarray(buf, np.uint8)
    result = np.zeros((out, n_in), dtype=np.int64)
    order = row_order(row_bits)
    start, offset = 0, 0
    for bits, rows in row_groups(row_bits):
        nbytes = packed_nbytes(rows * n_in, bits)
        block = unpack_values(raw[offset : offset + nbytes], bits, rows * n_in, signed)
        result[order[start : start + rows]] = block.reshape(rows, n_in)
        start += rows
        offset += nbytes
    return result
