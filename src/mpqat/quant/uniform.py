"""Uniform quantizers with a learned step size (LSQ, Esser et al. 2020).

* :class:`LSQWeightQuantizer`: signed weights, one step per tensor or per output neuron, the step
  snapped to a dyadic number ``m * 2**-e`` (16-bit mantissa) so that integer inference is exact.
* :class:`Pow2ActQuantizer`: activations (signed inputs or unsigned post-ReLU), one step per
  tensor or per feature, each step a power of two ``2**k`` learned in the log domain.

Power-of-two activation steps are our deviation from LSQ (which learns any real step): they let
per-feature activation scales be aligned by shifts inside an integer dot product (METHODS.md §1.6,
option (a)), so uniform and neuron-level models export to the same integer-only graph.

Bit-widths are tensors whose shape broadcasts against the quantized tensor: ``[1, 1]`` per tensor,
``[out, 1]`` per neuron for weights, ``[features]`` per feature for activations.

Example:
    >>> import torch
    >>> q = LSQWeightQuantizer(out_features=3, in_features=4, bits=4)
    >>> w = torch.randn(3, 4)
    >>> q.initialize(w)
    >>> q(w).shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mpqat.quant.functional import (
    act_int_range,
    grad_scale,
    quantize_act_int,
    quantize_weight_int,
    round_ste,
    snap_mantissa,
    weight_int_range,
)


class LSQWeightQuantizer(nn.Module):
    """Signed uniform weight quantizer with a learned step per tensor or per output neuron."""

    def __init__(self, out_features: int, in_features: int, bits: int, per_neuron: bool = True) -> None:
        super().__init__()
        rows = out_features if per_neuron else 1
        self.per_neuron = per_neuron
        self.in_features = in_features
        self.register_buffer("bit_widths", torch.full((rows, 1), float(bits)))
        self.step = nn.Parameter(torch.ones(rows, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """LSQ init ``2*mean|w|/sqrt(Q_P)``; at 1 bit the absmean ``mean|w|`` (XNOR scale)."""
        dims = 1 if self.per_neuron else (0, 1)
        mean_abs = weight.abs().mean(dim=dims, keepdim=True).reshape(-1, 1).clamp_min(1e-8)
        qmax = weight_int_range(self.bit_widths)
        lsq = 2 * mean_abs / torch.sqrt(qmax)
        self.step.copy_(torch.where(self.bit_widths <= 1, mean_abs, lsq))
        self.initialized.fill_(True)

    def scale(self) -> torch.Tensor:
        """Per-row step as a dyadic number (what the integer graph stores), shape ``[rows, 1]``."""
        n = self.in_features * (self.step.shape[0] if not self.per_neuron else 1)
        g = 1.0 / math.sqrt(n * float(weight_int_range(self.bit_widths).max()))
        return snap_mantissa(grad_scale(self.step, g).abs().clamp_min(1e-12))

    def bits(self) -> torch.Tensor:
        """Hard bit-width per output neuron, shape ``[out]`` or ``[1]``."""
        return self.bit_widths.reshape(-1)

    def expected_bits(self) -> torch.Tensor:
        """Differentiable bit-width (equal to :meth:`bits` for a fixed-bit quantizer)."""
        return self.bits()

    def integer_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer weight codes (float-valued), shape of ``weight``."""
        return quantize_weight_int(weight, self.scale().to(weight.dtype), self.bit_widths.to(weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.initialize(weight)
        return self.integer_codes(weight) * self.scale().to(weight.dtype)


class Pow2ActQuantizer(nn.Module):
    """Activation quantizer with a learned power-of-two step per tensor or per feature.

    ``signed=False`` (after a ReLU) maps to ``[0, 2**b - 1]`` and so also applies the ReLU;
    ``signed=True`` maps to the symmetric range ``[-(2**(b-1)-1), 2**(b-1)-1]``.
    The step is initialised from the first training batch with LSQ's rule ``2*mean|x|/sqrt(Q_P)``.
    """

    def __init__(self, features: int, bits: int, signed: bool, per_feature: bool = False) -> None:
        super().__init__()
        size = features if per_feature else 1
        self.signed = signed
        self.per_feature = per_feature
        self.features = features
        self.register_buffer("bit_widths", torch.full((size,), float(bits)))
        self.log2_step = nn.Parameter(torch.zeros(size))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-driven init of the step from a calibration batch ``x`` of shape ``[batch, features]``."""
        flat = x.detach().reshape(-1, self.features).abs()
        mean_abs = flat.mean(0) if self.per_feature else flat.mean().reshape(1)
        _, qmax = act_int_range(self.bit_widths, self.signed)
        step = 2 * mean_abs.clamp_min(1e-6) / torch.sqrt(qmax.clamp_min(1.0))
        self.log2_step.copy_(torch.log2(step))
        self.initialized.fill_(True)

    def exponents(self) -> torch.Tensor:
        """Integer exponents ``k`` of the steps ``2**k`` (shape ``[features]`` or ``[1]``)."""
        return torch.floor(self.log2_step.detach() + 0.5).to(torch.int64)

    def step(self) -> torch.Tensor:
        """Power-of-two step with a straight-through gradient to ``log2_step`` (LSQ grad scale applied)."""
        _, qmax = act_int_range(self.bit_widths, self.signed)
        n = self.features if not self.per_feature else 1
        g = 1.0 / math.sqrt(n * float(qmax.max().clamp_min(1.0)))
        return torch.pow(2.0, round_ste(grad_scale(self.log2_step, g)))

    def bits(self) -> torch.Tensor:
        """Hard bit-width per feature, shape ``[features]`` or ``[1]``."""
        return self.bit_widths

    def expected_bits(self) -> torch.Tensor:
        """Differentiable bit-width (equal to :meth:`bits` for a fixed-bit quantizer)."""
        return self.bits()

    def integer_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer activation codes (float-valued)."""
        return quantize_act_int(x, self.step().to(x.dtype), self.bit_widths.to(x.device), self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.initialize(x)
        return self.integer_codes(x) * self.step().to(x.dtype)
