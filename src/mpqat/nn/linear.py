"""``QuantLinear``: a linear layer with a weight quantizer and an input activation quantizer.

Two forward paths:

* training mode: float32 fake quantization with straight-through gradients; the bias is rounded
  to the accumulator grid (weight scale x smallest input step) with a straight-through gradient,
  as the integer graph stores it;
* eval mode: the *exact* path. It computes in float64 with integer codes, dyadic weight scales,
  power-of-two activation steps and the bias rounded to the accumulator grid, so every product and
  sum is exact. Its outputs are therefore exactly what the integer graph computes
  (``mpqat.export``), as long as the accumulator bound checked at export time holds.

Example:
    >>> import torch
    >>> from mpqat.quant import LSQWeightQuantizer, Pow2ActQuantizer
    >>> layer = QuantLinear(torch.nn.Linear(4, 2),
    ...                     LSQWeightQuantizer(2, 4, bits=4), Pow2ActQuantizer(4, bits=8, signed=True))
    >>> _ = layer.train()(torch.randn(8, 4))       # initialises scales from data
    >>> layer.eval()(torch.randn(8, 4)).dtype
    torch.float64
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mpqat.kernels.nmp import fused_nmp_linear
from mpqat.quant.functional import round_half_up, round_ste

_transforms_active = torch._C._are_functorch_transforms_active


class _RoundToGrid(torch.autograd.Function):
    """``round_half_up(b / unit) * unit`` with a straight-through gradient: the values and gradients
    of ``round_ste(b / unit) * unit`` (``unit`` constant) in four kernels forward and two backward."""

    @staticmethod
    def forward(ctx, b, unit):  # noqa: D102  (autograd API)
        ctx.save_for_backward(unit)
        return torch.div(b, unit).add_(0.5).floor_().mul_(unit)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (unit,) = ctx.saved_tensors
        return (grad * unit).div_(unit), None


def round_to_grid(b: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Round ``b`` to the nearest multiple of ``unit`` (half up), straight-through gradient to ``b``.

    ``unit`` gets no gradient. This is how the training path rounds a bias to the accumulator grid.

    Example:
        >>> round_to_grid(torch.tensor([0.3, 0.74]), torch.tensor(0.25)).tolist()
        [0.25, 0.75]
    """
    unit = unit.detach()
    if _transforms_active():  # vmap/grad of torch.func: the plain straight-through graph
        return round_ste(b / unit) * unit
    return _RoundToGrid.apply(b, unit)


def training_accumulator_step(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``layer.accumulator_step()`` in ``dtype`` for the training path: ``scale * 2**min(k)``.

    Quantizers that cache their per-step tensors say so with ``cached_scale()`` (weights: the
    per-row dyadic step) and ``cached_min_step()`` (activations: the smallest step ``2**min(k)``);
    their product is exact in float32, so it equals ``accumulator_step()`` rounded to ``dtype``,
    without its float64 round trip. Other quantizers fall back to ``accumulator_step()``.
    """
    cached_scale = getattr(layer.weight_quant, "cached_scale", None)
    cached_min_step = getattr(layer.act_quant, "cached_min_step", None)
    if cached_scale is None or cached_min_step is None or _transforms_active():
        return layer.accumulator_step().to(dtype)
    return (cached_scale().reshape(-1) * cached_min_step()).to(dtype)


class QuantLinear(nn.Module):
    """Linear layer whose weights and inputs are quantized by the given quantizer modules.

    The weight quantizer must provide ``forward``, ``scale()`` (per-row dyadic step),
    ``integer_codes``, ``bits()`` and ``expected_bits()``; the activation quantizer ``forward``,
    ``exponents()``, ``step()``, ``integer_codes``, ``bits()``, ``expected_bits()`` and ``signed``.
    """

    def __init__(self, linear: nn.Linear, weight_quant: nn.Module, act_quant: nn.Module) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.weight_quant = weight_quant
        self.act_quant = act_quant

    def macs(self) -> int:
        """Multiply-accumulates per sample."""
        return self.in_features * self.out_features

    def accumulator_step(self) -> torch.Tensor:
        """Value of one accumulator unit per output neuron: ``w_scale_j * 2**min(k_i)``, float64 ``[out]``."""
        k_min = int(self.act_quant.exponents().min())
        w_scale = self.weight_quant.scale().detach().double().reshape(-1)
        w_scale = w_scale.expand(self.out_features) if w_scale.numel() == 1 else w_scale
        return w_scale * 2.0**k_min

    def quantized_bias(self) -> torch.Tensor | None:
        """Bias rounded to the accumulator grid (float64), as the integer graph stores it."""
        if self.bias is None:
            return None
        unit = self.accumulator_step()
        return round_half_up(self.bias.detach().double() / unit) * unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._exact_forward(x)
        fused = fused_nmp_linear(self, x)  # learned-bit quantizers: one fused kernel (mpqat.kernels)
        if fused is not None:
            return fused
        x_q = self.act_quant(x)
        w_q = self.weight_quant(self.weight)
        bias = self.bias
        if bias is not None:
            bias = round_to_grid(bias, training_accumulator_step(self, bias.dtype))
        return F.linear(x_q, w_q, bias)

    @torch.no_grad()
    def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        x_q = self.act_quant.integer_codes(x64) * self.act_quant.step().detach().double()
        w64 = self.weight.detach().double()
        w_q = self.weight_quant.integer_codes(w64) * self.weight_quant.scale().detach().double()
        return F.linear(x_q, w_q, self.quantized_bias())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
