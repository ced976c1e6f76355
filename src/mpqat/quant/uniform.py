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

The training forward of both quantizers is one :class:`torch.autograd.Function` each, with the
backward written out: it computes the same values and gradients as the straight-through graph of
:func:`~mpqat.quant.functional.quantize_weight_int` / :func:`~mpqat.quant.functional.quantize_act_int`
(``tests/quant/test_speed_regression.py`` checks both against the recorded autograd results), in a
fraction of the kernels. The step-dependent constants are computed once per optimizer step (cached
by the parameter's version counter).

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
from types import SimpleNamespace

import torch
from torch import nn

from mpqat.quant.functional import (
    act_int_range,
    grad_scale,
    quantize_act_int,
    quantize_weight_int,
    round_ste,
    snap_mantissa,
    snapped_value,
    weight_int_range,
)

LN2 = math.log(2.0)
# Under torch.func transforms (vmap, grad, ...) the quantizers run their plain autograd graph.
_transforms_active = torch._C._are_functorch_transforms_active


def _stamp(*tensors: torch.Tensor) -> tuple:
    """Identity, storage and version counter of each tensor: a cache entry keyed by this (and holding
    the tensors, so that no identity is reused) is stale as soon as one is replaced or modified in place."""
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``grad`` down to ``shape`` the way autograd reduces a broadcast operand (``at::sum_to``)."""
    lead = grad.dim() - len(shape)
    dims = list(range(lead)) + [i for i in range(lead, grad.dim()) if shape[i - lead] == 1 and grad.shape[i] != 1]
    if dims:
        grad = grad.sum(dims, keepdim=True)
    return grad.view(shape) if lead > 0 else grad


class _CachedStep(nn.Module):
    """Caches the tensors derived from the bit-widths (until the buffer changes) and from the step
    parameter (until it or the bit-widths change): the training path computes them once per
    optimizer step."""

    def _cached(self, param: torch.Tensor) -> SimpleNamespace:
        bits = self.bit_widths
        bits_key = _stamp(bits)
        cache = self.__dict__.get("_bits_cache")
        if cache is None or cache[0] != bits_key:
            with torch.no_grad():
                cache = (bits_key, self._compute_bits(bits), bits)
            self.__dict__["_bits_cache"] = cache
        consts = cache[1]
        key = (*_stamp(param), *bits_key)
        cache = self.__dict__.get("_step_cache")
        if cache is None or cache[0] != key:
            if torch.is_grad_enabled():
                with torch.no_grad():
                    cache = (key, self._compute(param.detach(), consts), (param, bits))
            else:
                cache = (key, self._compute(param.detach(), consts), (param, bits))
            self.__dict__["_step_cache"] = cache
        return cache[1]

    def _compute_bits(self, bits: torch.Tensor) -> SimpleNamespace:
        raise NotImplementedError

    def _compute(self, param: torch.Tensor, consts: SimpleNamespace) -> SimpleNamespace:
        raise NotImplementedError

    def _apply(self, *args, **kwargs):  # type: ignore[no-untyped-def]  # .to(), .double(), ...: new tensors
        result = super()._apply(*args, **kwargs)
        self.__dict__.pop("_step_cache", None)
        self.__dict__.pop("_bits_cache", None)
        return result

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_step_cache", None)  # copies and pickles recompute them
        state.pop("_bits_cache", None)
        return state


class _LSQWeight(torch.autograd.Function):
    """LSQ weight fake quantization: ``clamp(round(w / s)) * s`` (``sign(w) * s`` at 1 bit).

    The backward is the straight-through graph's: the weight gets ``G`` inside the clipping range
    (``|w / s| <= 1`` at 1 bit), the step ``sum G * code - G * mask * w / s`` (the output's and the
    division's share, each through ``|.|``, the clamp and the gradient scale)."""

    @staticmethod
    def forward(ctx, weight, step, quant):  # noqa: D102  (autograd API)
        d = quant._cached(step)
        scaled = weight / d.scale
        r = torch.add(scaled, 0.5).floor_()
        multi = torch.maximum(r, d.qmin)
        torch.minimum(multi, d.qmax, out=multi)
        if d.binary == "none":
            code = multi
        else:
            binary = torch.ge(weight, 0.0, out=torch.empty_like(weight)).mul_(2.0).sub_(1.0)
            code = binary if d.binary == "all" else torch.lerp(multi, binary, d.binary_rows)
        ctx.d = d
        ctx.save_for_backward(weight, scaled, r, multi, code)
        return code * d.scale

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        weight, scaled, r, multi, code = ctx.saved_tensors
        d = ctx.d
        grad_code = grad * d.scale
        grad_s2 = _reduce_to(grad * code, d.scale.shape)
        if d.binary == "none":
            mask = torch.eq(r, multi, out=torch.empty_like(r))
        else:
            mask = torch.le(scaled.abs(), 1.0, out=torch.empty_like(scaled))
            if d.binary == "mixed":
                mask = torch.lerp(torch.eq(r, multi, out=torch.empty_like(r)), mask, d.binary_rows)
        grad_scaled = grad_code.mul_(mask)
        grad_w = grad_scaled / d.scale
        grad_s1 = _reduce_to(-grad_scaled * (scaled / d.scale), d.scale.shape)
        # Each of the two uses of the step (divisor and factor): clamp_min mask, d|v|/dv, gradient scale.
        g_step = grad_s1.mul_(d.clamp_mask).mul_(d.sign).mul_(d.g) + grad_s2.mul_(d.clamp_mask).mul_(d.sign).mul_(d.g)
        return grad_w, g_step, None


class LSQWeightQuantizer(_CachedStep):
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

    def _grad_scale(self) -> float:
        n = self.in_features * (self.step.shape[0] if not self.per_neuron else 1)
        return 1.0 / math.sqrt(n * float(weight_int_range(self.bit_widths).max()))

    def scale(self) -> torch.Tensor:
        """Per-row step as a dyadic number (what the integer graph stores), shape ``[rows, 1]``."""
        return snap_mantissa(grad_scale(self.step, self._grad_scale()).abs().clamp_min(1e-12))

    def cached_scale(self) -> torch.Tensor:
        """The value of :meth:`scale` (no gradient), computed once per optimizer step."""
        return self._cached(self.step).scale

    def _compute_bits(self, bits: torch.Tensor) -> SimpleNamespace:
        qmax = weight_int_range(bits).to(self.step.dtype)
        binary_rows = (bits <= 1).to(self.step.dtype)
        binary = "all" if bool(binary_rows.all()) else ("none" if not bool(binary_rows.any()) else "mixed")
        return SimpleNamespace(g=self._grad_scale(), qmax=qmax, qmin=-qmax, binary=binary, binary_rows=binary_rows)

    def _compute(self, step: torch.Tensor, consts: SimpleNamespace) -> SimpleNamespace:
        g = consts.g
        v = grad_scale(step, g)  # the value the autograd graph computes (may differ from step by an ulp)
        magnitude = v.abs()
        return SimpleNamespace(
            scale=snapped_value(magnitude.clamp_min(1e-12)), qmax=consts.qmax, qmin=consts.qmin, binary=consts.binary,
            binary_rows=consts.binary_rows, clamp_mask=(magnitude >= 1e-12).to(step.dtype), sign=torch.sign(v), g=g,
        )

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
        if self.training and not self.initialized:
            self.initialize(weight)
        if self.training and weight.dim() == 2 and not _transforms_active():
            return _LSQWeight.apply(weight, self.step, self)
        return self.integer_codes(weight) * self.scale().to(weight.dtype)


class _Pow2Act(torch.autograd.Function):
    """Power-of-two activation fake quantization ``clamp(round(x / 2**k)) * 2**k``; the backward is
    the straight-through graph's (the step's gradient through ``2**k``, the rounding and the
    gradient scale, from both uses of the step)."""

    @staticmethod
    def forward(ctx, x, log2_step, quant):  # noqa: D102  (autograd API)
        d = quant._cached(log2_step)
        scaled = x / d.step
        r = torch.add(scaled, 0.5).floor_()
        code = torch.maximum(r, d.qmin) if d.signed else r.clamp_min(0.0)
        torch.minimum(code, d.qmax, out=code)
        ctx.d = d
        ctx.save_for_backward(scaled, r, code)
        return code * d.step

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        scaled, r, code = ctx.saved_tensors
        d = ctx.d
        grad_s2 = _reduce_to(grad * code, d.step.shape)
        grad_scaled = (grad * d.step).mul_(torch.eq(r, code, out=torch.empty_like(r)))
        grad_x = grad_scaled / d.step
        grad_s1 = _reduce_to(-grad_scaled * (scaled / d.step), d.step.shape)
        g_log2 = grad_s1.mul_(d.dstep).mul_(d.g) + grad_s2.mul_(d.dstep).mul_(d.g)
        return grad_x, g_log2, None


class Pow2ActQuantizer(_CachedStep):
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

    def _grad_scale(self) -> float:
        _, qmax = act_int_range(self.bit_widths, self.signed)
        n = self.features if not self.per_feature else 1
        return 1.0 / math.sqrt(n * float(qmax.max().clamp_min(1.0)))

    def step(self) -> torch.Tensor:
        """Power-of-two step with a straight-through gradient to ``log2_step`` (LSQ grad scale applied)."""
        return torch.pow(2.0, round_ste(grad_scale(self.log2_step, self._grad_scale())))

    def cached_min_step(self) -> torch.Tensor:
        """``min(step())`` (a 0-d tensor, no gradient), computed once per optimizer step."""
        return self._cached(self.log2_step).min_step

    def _compute_bits(self, bits: torch.Tensor) -> SimpleNamespace:
        qmin, qmax = act_int_range(bits, self.signed)
        dtype = self.log2_step.dtype
        return SimpleNamespace(g=self._grad_scale(), qmin=qmin.to(dtype), qmax=qmax.to(dtype))

    def _compute(self, log2_step: torch.Tensor, consts: SimpleNamespace) -> SimpleNamespace:
        g = consts.g
        step = torch.pow(2.0, torch.floor(grad_scale(log2_step, g) + 0.5))
        return SimpleNamespace(step=step, qmin=consts.qmin, qmax=consts.qmax, signed=self.signed,
                               g=g, dstep=step * LN2, min_step=step.min())

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
        if self.training and not self.initialized:
            self.initialize(x)
        if self.training and not _transforms_active():
            return _Pow2Act.apply(x, self.log2_step, self)
        return self.integer_codes(x) * self.step().to(x.dtype)
