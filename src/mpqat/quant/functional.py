"""Pure quantization functions with straight-through gradients.

The rounding rule of the whole project is *round half up*: ``floor(x + 0.5)``. The integer
engine, the ONNX export and the C export use the same rule, so training and deployment agree
bit for bit (``torch.round`` rounds half to even and would not).

Example:
    >>> import torch
    >>> round_half_up(torch.tensor([0.5, 1.5, -0.5, -1.5]))
    tensor([ 1.,  2.,  0., -1.])
"""

from __future__ import annotations

import torch

#: Number of mantissa bits kept in a weight scale, so that every scale is a dyadic number
#: ``m * 2**-e`` with an integer ``m < 2**MANTISSA_BITS`` (see :func:`snap_mantissa`).
MANTISSA_BITS = 16


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties toward +inf (the project-wide rounding rule)."""
    return torch.floor(x + 0.5)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """:func:`round_half_up` in the forward pass, identity gradient in the backward pass."""
    return x + (round_half_up(x) - x).detach()


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``x`` unchanged, with its gradient multiplied by ``scale`` (LSQ's gradient scale)."""
    scaled = x * scale
    return (x - scaled).detach() + scaled


def snap_mantissa(x: torch.Tensor, bits: int = MANTISSA_BITS) -> torch.Tensor:
    """Round positive scales to ``m * 2**e`` with an integer mantissa ``m < 2**bits``; STE gradient.

    A weight scale snapped this way multiplies integers exactly in float64, which is what makes
    the float evaluation path and the integer engine agree bit for bit.
    """
    mantissa, exponent = torch.frexp(x.detach())
    snapped = torch.ldexp(round_half_up(mantissa * 2.0**bits), exponent - bits)
    return x + (snapped.to(x.dtype) - x).detach()


def snapped_value(x: torch.Tensor, bits: int = MANTISSA_BITS) -> torch.Tensor:
    """The value of :func:`snap_mantissa` for positive normal ``x`` (no gradient), in fewer kernels.

    For float32 the magnitude is rounded half up to ``bits`` significant bits by integer arithmetic
    on the IEEE-754 representation (two kernels instead of seven; a carry moves into the exponent);
    other dtypes take the ``frexp``/``ldexp`` route of :func:`snap_mantissa`.

    Example:
        >>> x = torch.tensor([0.1234567, 3.0, 1e-5])
        >>> torch.equal(snapped_value(x), snap_mantissa(x))
        True
    """
    x = x.detach()
    if x.dtype == torch.float32 and bits < 24:
        drop = 24 - bits  # float32 has 24 significant bits
        raw = x.contiguous().view(torch.int32)
        return ((raw + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(round_half_up(mantissa * 2.0**bits), exponent - bits).to(x.dtype)


def dyadic_parts(scale: torch.Tensor, bits: int = MANTISSA_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Split snapped scales into integer mantissas and exponents: ``scale == m * 2**-e`` exactly.

    Example:
        >>> m, e = dyadic_parts(torch.tensor([0.75]))
        >>> float(m[0] * 2.0 ** -e[0])
        0.75
    """
    mantissa, exponent = torch.frexp(scale.detach().double())
    m = round_half_up(mantissa * 2.0**bits).to(torch.int64)
    e = (bits - exponent).to(torch.int64)
    # Strip trailing zero bits so that mantissas stay as small as possible.
    while True:
        even = (m % 2 == 0) & (m != 0)
        if not bool(even.any()):
            break
        m = torch.where(even, m // 2, m)
        e = torch.where(even, e - 1, e)
    return m, e


def weight_int_range(bits: torch.Tensor) -> torch.Tensor:
    """Largest integer magnitude of a signed weight at ``bits`` (restricted symmetric range).

    1 bit is binary (+-1); b >= 2 bits use ``[-(2**(b-1)-1), 2**(b-1)-1]`` so that zero is a level
    and the range is symmetric (2 bits = ternary).
    """
    bits = bits.to(torch.float32)
    return torch.where(bits <= 1, torch.ones_like(bits), 2.0 ** (bits - 1) - 1)


def quantize_weight_int(w: torch.Tensor, step: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Integer codes of ``w`` at ``step`` and ``bits`` (broadcastable), with a straight-through gradient.

    At 1 bit the code is ``sign(w)`` with ``sign(0) = +1``; otherwise ``clamp(round(w/step))``.
    The result is float-valued (integers), differentiable w.r.t. ``w`` and ``step`` as in LSQ.
    """
    qmax = weight_int_range(bits).to(w.dtype)
    scaled = w / step
    binary = torch.where(w.detach() >= 0, torch.ones_like(w), -torch.ones_like(w))
    # STE for the binary case: gradient of the clipped identity (as in XNOR/BNN training).
    binary = torch.clamp(scaled, -1.0, 1.0) + (binary - torch.clamp(scaled, -1.0, 1.0)).detach()
    multi = torch.clamp(round_ste(scaled), -qmax, qmax)
    return torch.where(bits.to(w.device) <= 1, binary, multi)


def act_int_range(bits: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(qmin, qmax) of an activation at ``bits``: unsigned ``[0, 2**b-1]``, signed ``[-(2**(b-1)-1), 2**(b-1)-1]``."""
    bits = bits.to(torch.float32)
    if signed:
        qmax = 2.0 ** (bits - 1) - 1
        return -qmax, qmax
    return torch.zeros_like(bits), 2.0**bits - 1


def quantize_act_int(x: torch.Tensor, step: torch.Tensor, bits: torch.Tensor, signed: bool) -> torch.Tensor:
    """Integer codes of an activation ``x`` at ``step`` and ``bits``; STE through rounding (LSQ gradient)."""
    qmin, qmax = act_int_range(bits, signed)
    return torch.clamp(round_ste(x / step), qmin.to(x.dtype), qmax.to(x.dtype))
