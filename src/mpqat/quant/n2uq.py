"""Distribution-aware activation quantizer: learned non-uniform thresholds, uniform integer outputs.

ADQ's activation quantizer is N2UQ's LTQ (Liu et al., CVPR 2022; METHODS.md §2.1): the input is cut
at learned, non-uniformly spaced thresholds ``T_1 < ... < T_L`` (``L = 2**b - 1``) and the output is
the *uniform* integer ``k = #{T_k <= x}`` in ``[0, L]``, times an output step. The deployed model
therefore still sees plain unsigned integer activations; only the requantization compares the
accumulator with per-channel integer thresholds instead of shifting it (FINN-style multi-threshold).

Parametrisation (as LTQ, in units of a reference step ``u``):

* ``start`` and interval lengths ``a_1..a_L`` (clamped at ``>= 1e-3``); bin ``k`` is
  ``[e_k, e_k + a_k)`` with ``e_k = start + sum_{m<k} a_m``; the thresholds are the bin mid-points
  ``T_k = u * (e_k + a_k / 2)``;
* forward: the hard code ``#{T_k <= x}`` times the output step;
* backward (generalized STE): the gradient of the piecewise-linear compander
  ``f(x) = (k - 1) + (x/u - e_k) / a_k`` in bin ``k`` (0 below ``start``, ``L`` above the last bin),
  i.e. slope ``1 / (u a_k)`` inside bin ``k``; ``start`` and ``a_k`` get their gradients through ``f``.

Ours (not N2UQ's): the output step is a learned power of two (``2**round(log2_step)``, LSQ's
gradient scale, as :class:`~mpqat.quant.uniform.Pow2ActQuantizer`) instead of N2UQ's free ``gamma2``,
so that :class:`~mpqat.nn.QuantLinear`'s exact eval path (``integer_codes(x) * step()``) and the
integer graph stay exact; ``u`` is set at init (a power of two from the first batch, LSQ's rule
``2*mean|x|/sqrt(2**b-1)``) with ``start = 0`` and ``a_k = 1``: the quantizer starts as exactly the
uniform power-of-two quantizer and then learns where to put its thresholds. For post-ReLU inputs
only (unsigned codes); the eval path compares in float64 with :meth:`ThresholdActQuantizer.thresholds`
(snapped to a 16-bit mantissa, ours, so that they are stored in a few bytes).

Example:
    >>> import torch
    >>> q = ThresholdActQuantizer(features=4, bits=2)
    >>> x = torch.rand(64, 4) * 3
    >>> _ = q.train()(x)                                  # initialises u from the batch
    >>> q.thresholds().shape, bool((q.thresholds().diff() > 0).all())
    (torch.Size([1, 3]), True)
    >>> codes = q.integer_codes(x.double())
    >>> int(codes.min()) >= 0 and int(codes.max()) <= 3
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mpqat.errors import ConfigError
from mpqat.quant.functional import grad_scale, round_ste, snap_mantissa

#: Smallest interval length (in units of the reference step), N2UQ's clamp.
MIN_INTERVAL = 1e-3
MAX_THRESHOLD_BITS = 8


def _count_at_most(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``#{k : thresholds[j, k] <= x[..., j]}`` for x ``[..., F]`` and sorted thresholds ``[F or 1, L]`` (int64)."""
    if thresholds.shape[0] == 1:
        return torch.bucketize(x.contiguous(), thresholds[0].contiguous(), right=True)
    features = thresholds.shape[0]
    flat = x.reshape(-1, features).transpose(0, 1).contiguous()  # [F, N]
    counts = torch.searchsorted(thresholds.contiguous(), flat, right=True)
    return counts.transpose(0, 1).reshape(x.shape)


class ThresholdActQuantizer(nn.Module):
    """N2UQ-style activation quantizer: learned thresholds per tensor (or feature), unsigned uniform codes."""

    signed = False

    def __init__(self, features: int, bits: int, per_feature: bool = False) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_THRESHOLD_BITS:
            raise ConfigError(f"bits={bits!r} is not supported: threshold activations need 1..{MAX_THRESHOLD_BITS} bits")
        size = features if per_feature else 1
        self.features = features
        self.per_feature = per_feature
        levels = 2**bits - 1
        self.register_buffer("bit_widths", torch.full((size,), float(bits)))
        self.start = nn.Parameter(torch.zeros(size))
        self.intervals = nn.Parameter(torch.ones(size, levels))
        self.log2_step = nn.Parameter(torch.zeros(size))
        self.register_buffer("unit", torch.ones(size, dtype=torch.float64))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def levels(self) -> int:
        """Number of thresholds ``L = 2**b - 1`` (the largest code)."""
        return self.intervals.shape[1]

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Uniform start: ``u = 2**round(log2(2*mean|x|/sqrt(L)))``, ``start = 0``, ``a_k = 1``, output step ``u``."""
        flat = x.detach().reshape(-1, self.features).abs().double()
        mean_abs = flat.mean(0) if self.per_feature else flat.mean().reshape(1)
        step = 2 * mean_abs.clamp_min(1e-6) / math.sqrt(self.levels)
        exponent = torch.floor(torch.log2(step) + 0.5)
        self.unit.copy_(torch.pow(2.0, exponent))
        self.log2_step.copy_(exponent.float())
        self.start.zero_()
        self.intervals.fill_(1.0)
        self.initialized.fill_(True)

    def _edges(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Bin starts ``e_k`` and clamped lengths ``a_k`` (``[S, L]``, in units of ``u``)."""
        a = self.intervals.to(dtype).clamp_min(MIN_INTERVAL)
        e = self.start.to(dtype)[:, None] + torch.cumsum(a, dim=1) - a
        return e, a

    def thresholds(self) -> torch.Tensor:
        """Thresholds ``T_k`` in input units, float64 ``[S, L]`` (``S`` = features or 1), non-decreasing.

        Snapped to dyadic numbers with a 16-bit mantissa (relative change below 2**-16), so that the
        integer graph stores them in a few bytes; the eval path and the export both use these values.
        """
        e, a = self._edges(torch.float64)
        raw = (e + a / 2).detach() * self.unit[:, None]
        return torch.where(raw == 0, raw, snap_mantissa(raw.abs().clamp_min(1e-300)) * raw.sign())

    def exponents(self) -> torch.Tensor:
        """Integer exponents of the output steps ``2**k`` (``[S]``)."""
        return torch.floor(self.log2_step.detach() + 0.5).to(torch.int64)

    def step(self) -> torch.Tensor:
        """Power-of-two output step with a straight-through gradient to ``log2_step`` (LSQ grad scale)."""
        n = self.features if not self.per_feature else 1
        g = 1.0 / math.sqrt(n * self.levels)
        return torch.pow(2.0, round_ste(grad_scale(self.log2_step, g)))

    def bits(self) -> torch.Tensor:
        """Hard bit-width, ``[S]``."""
        return self.bit_widths

    def expected_bits(self) -> torch.Tensor:
        """Same as :meth:`bits` (fixed width)."""
        return self.bits()

    def extra_metadata_bits(self) -> int:
        """Storage of the thresholds: 32 bits (16-bit mantissa, exponent) per stored threshold."""
        return self.intervals.shape[0] * self.levels * 32

    def integer_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Unsigned codes ``#{T_k <= x}`` (float-valued, no gradient), compared in float64."""
        return _count_at_most(x.detach().double(), self.thresholds()).to(x.dtype)

    def _bins(self, xs: torch.Tensor, e: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(#{e_k <= xs}, #{e_k + a_k/2 <= xs})`` from ONE search over the interleaved edges.

        ``e_0 <= m_0 <= e_1 <= m_1 ...`` (``m_k = e_k + a_k/2``, ``a_k > 0``), so with ``c`` merged edges
        at most ``xs`` there are ``ceil(c/2)`` starts and ``floor(c/2)`` mid-points below it. Falls back
        to two searches if rounding ever broke the interleaving.
        """
        e, mid = e.detach(), (e + a / 2).detach()
        merged = torch.stack((e, mid), dim=2).reshape(e.shape[0], -1)
        if bool((merged[:, 1:] >= merged[:, :-1]).all()):
            count = _count_at_most(xs.detach(), merged)
            return (count + 1) >> 1, count >> 1  # shifts: integer floor division is slow on CPU
        return _count_at_most(xs.detach(), e), _count_at_most(xs.detach(), mid)  # pragma: no cover

    def _companded(self, xs: torch.Tensor, e: torch.Tensor, a: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        k = (starts.clamp(1, self.levels) - 1)  # 0-based bin
        if e.shape[0] == 1:
            e_k, a_k = e[0][k], a[0][k]
        else:
            feature = torch.arange(self.features).expand_as(k)
            e_k, a_k = e[feature, k], a[feature, k]
        return k.to(xs.dtype) + torch.clamp((xs - e_k) / a_k, 0.0, 1.0)

    def compander(self, x: torch.Tensor) -> torch.Tensor:
        """The piecewise-linear ``f(x)`` whose gradient is the G-STE (same shape as ``x``)."""
        e, a = self._edges(x.dtype)
        xs = x / self.unit.to(x.dtype)
        starts, _ = self._bins(xs, e, a)
        return self._companded(xs, e, a, starts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.initialize(x)
        e, a = self._edges(x.dtype)
        xs = x / self.unit.to(x.dtype)
        starts, hard = self._bins(xs, e, a)
        f = self._companded(xs, e, a, starts)
        codes = f + (hard.to(x.dtype) - f).detach()
        return codes * self.step().to(x.dtype)

    def extra_repr(self) -> str:
        return f"features={self.features}, bits={int(self.bit_widths[0])}, per_feature={self.per_feature}"
