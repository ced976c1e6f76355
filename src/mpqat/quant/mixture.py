"""Supernet quantizers: a softmax-weighted mixture of candidate bit-widths from one shared tensor.

The building block of differentiable mixed-precision search (DNAS / EdMIPS, METHODS.md §3.2, §5.4)
and of SMPQ. One quantized layer of the supernet keeps one float weight; its weight quantizer
returns ``sum_c pi_c * Q_{b_c}(W)`` and its input quantizer ``sum_c pi_c * Q_{b_c}(x)``, with
``pi = softmax(alpha) * mask``:

* ``alpha`` (parameter ``[C]``): the architecture parameters over the candidates ``b_c``;
  initialised to 0.01 (uniform ``pi``, EdMIPS).
* ``mask`` (buffer ``[C]``, ones): a candidate whose mask is 0 is removed from the forward pass; its
  mixing weight becomes 0 and the others are *not* renormalised (Shapley-NAS ``remove_players``).
  This is how a coalition of Shapley players is evaluated.
* Each candidate has its own step, of the same kind as the fixed-bit quantizers, so a frozen choice
  maps one to one onto them: weights a per-row LSQ step (dyadic, LSQ gradient scale and init), see
  :class:`~mpqat.quant.LSQWeightQuantizer`; activations a power-of-two step learned in the log
  domain, see :class:`~mpqat.quant.Pow2ActQuantizer`. :meth:`MixtureWeightQuantizer.candidate_step`
  and :meth:`MixtureActQuantizer.candidate_log2_step` hand a candidate's step over.
* ``expected_bits()`` = ``sum_c softmax(alpha)_c * b_c``, differentiable in ``alpha``, so the cost
  regularisers of :mod:`mpqat.cost` give EdMIPS's complexity loss ``sum_l MACs_l E[b_w] E[b_a]``.

The quantizers follow the project's interface contract (2-D weights ``[rows, fan_in]``,
channels-last activations ``[..., features]``), so they drop into :class:`~mpqat.nn.QuantLinear`
(and any layer that calls its quantizers the same way). In a layer's exact eval path (and in
``bits()``, ``scale()``, ``step()``, ``exponents()``) a mixture behaves as its *dominant* candidate,
``argmax alpha``: the discrete network a largest-alpha selection would pick. These never depend on
``mask``, so a batch of masks can be evaluated with ``torch.func.vmap``.

Example:
    >>> import torch
    >>> q = MixtureWeightQuantizer(out_features=3, in_features=4, candidates=(2, 4, 8))
    >>> w = torch.randn(3, 4)
    >>> q.initialize(w)
    >>> full = q(w)
    >>> q.mask[2] = 0.0                                    # drop the 8-bit candidate
    >>> torch.allclose(q(w), full - q.probs()[2] * q.candidate_outputs(w)[2])
    True
"""

from __future__ import annotations

from collections.abc import Sequence

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

#: EdMIPS initialises every architecture parameter to this value (uniform softmax).
ALPHA_INIT = 0.01


def _candidates(candidates: Sequence[int], lowest: int) -> tuple[int, ...]:
    cands = tuple(int(b) for b in candidates)
    if not cands or len(set(cands)) != len(cands) or min(cands) < lowest or max(cands) > 16:
        raise ValueError(f"candidates must be distinct bit-widths in [{lowest}, 16], got {tuple(candidates)}")
    return cands


class _Mixture(nn.Module):
    """Shared parts: candidate bits, architecture parameters, mask and mixing weights."""

    def __init__(self, candidates: tuple[int, ...], alpha_init: float) -> None:
        super().__init__()
        self.candidates = candidates
        self.register_buffer("candidate_bits", torch.tensor(candidates, dtype=torch.float32))
        self.alpha = nn.Parameter(torch.full((len(candidates),), float(alpha_init)))
        self.register_buffer("mask", torch.ones(len(candidates)))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def n_candidates(self) -> int:
        return len(self.candidates)

    def probs(self) -> torch.Tensor:
        """``softmax(alpha)`` (ignores the mask)."""
        return torch.softmax(self.alpha, dim=0)

    def mixing(self) -> torch.Tensor:
        """Mixing weights of the forward pass: ``softmax(alpha) * mask`` (no renormalisation)."""
        return self.probs() * self.mask

    def dominant(self) -> int:
        """Index of the candidate with the largest ``alpha`` (ties: the first)."""
        return int(torch.argmax(self.alpha.detach()))

    def candidate_index(self, bits: int) -> int:
        """Position of the candidate ``bits`` (ValueError if it is not a candidate)."""
        return self.candidates.index(int(bits))

    @torch.no_grad()
    def reset_mask(self) -> None:
        """Every candidate present."""
        self.mask.fill_(1.0)

    def bits(self) -> torch.Tensor:
        """Bits of the dominant candidate, shape ``[1]``."""
        return self.candidate_bits[self.dominant()].reshape(1)

    def expected_bits(self) -> torch.Tensor:
        """``sum_c softmax(alpha)_c * b_c``, shape ``[1]``, differentiable in ``alpha``."""
        return (self.probs() * self.candidate_bits).sum().reshape(1)

    def _mix(self, outputs: torch.Tensor) -> torch.Tensor:
        weights = self.mixing().to(outputs.dtype).reshape(-1, *([1] * (outputs.dim() - 1)))
        return (weights * outputs).sum(0)


class MixtureWeightQuantizer(_Mixture):
    """Signed weights as a mixture of LSQ quantizers at ``candidates`` bits sharing one weight.

    ``step``: ``[C, rows, 1]``, one learned (dyadic) step per candidate and output row
    (``per_neuron=True``) or per tensor.
    """

    def __init__(self, out_features: int, in_features: int, candidates: Sequence[int], per_neuron: bool = True,
                 alpha_init: float = ALPHA_INIT) -> None:
        super().__init__(_candidates(candidates, 1), alpha_init)
        rows = out_features if per_neuron else 1
        self.per_neuron = per_neuron
        self.in_features = in_features
        self.step = nn.Parameter(torch.ones(self.n_candidates, rows, 1))

    def _qmax(self) -> torch.Tensor:
        return weight_int_range(self.candidate_bits).reshape(-1, 1, 1)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """LSQ init per candidate: ``2*mean|w|/sqrt(Q_P)``, or ``mean|w|`` at 1 bit."""
        dims = 1 if self.per_neuron else (0, 1)
        mean_abs = weight.abs().mean(dim=dims, keepdim=True).reshape(1, -1, 1).clamp_min(1e-8)
        lsq = 2 * mean_abs / torch.sqrt(self._qmax())
        binary = (self.candidate_bits <= 1).reshape(-1, 1, 1)
        self.step.copy_(torch.where(binary, mean_abs.expand_as(lsq), lsq))
        self.initialized.fill_(True)

    def candidate_scales(self) -> torch.Tensor:
        """Dyadic steps of every candidate, ``[C, rows, 1]``, with LSQ's per-candidate gradient scale."""
        rows = self.step.shape[1]
        n = self.in_features * (1 if self.per_neuron else rows)
        g = 1.0 / torch.sqrt(n * self._qmax())
        return snap_mantissa(grad_scale(self.step, g).abs().clamp_min(1e-12))

    def candidate_outputs(self, weight: torch.Tensor) -> torch.Tensor:
        """Quantized weight at every candidate, ``[C, rows, fan_in]``."""
        scales = self.candidate_scales().to(weight.dtype)
        codes = quantize_weight_int(weight.unsqueeze(0), scales, self.candidate_bits.reshape(-1, 1, 1))
        return codes * scales

    def candidate_step(self, index: int) -> torch.Tensor:
        """Latent step of candidate ``index``, ``[rows, 1]`` (for :class:`~mpqat.quant.LSQWeightQuantizer`)."""
        return self.step.detach()[index].abs().clamp_min(1e-12).clone()

    def scale(self) -> torch.Tensor:
        """Dyadic step of the dominant candidate, ``[rows, 1]``."""
        return self.candidate_scales()[self.dominant()]

    def integer_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes at the dominant candidate (the exact eval path of a supernet layer)."""
        bits = self.candidate_bits[self.dominant()].reshape(1, 1).to(weight.device)
        return quantize_weight_int(weight, self.scale().to(weight.dtype), bits)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.initialize(weight)
        return self._mix(self.candidate_outputs(weight))

    def extra_repr(self) -> str:
        return f"candidates={self.candidates}, rows={self.step.shape[1]}, in_features={self.in_features}"


class MixtureActQuantizer(_Mixture):
    """Activations (channels last) as a mixture of power-of-two-step quantizers at ``candidates`` bits.

    ``log2_step``: ``[C, size]`` (size 1 per tensor, or ``features``); ``signed=False`` is the
    unsigned range after a ReLU (so it also applies the ReLU), as :class:`~mpqat.quant.Pow2ActQuantizer`.
    """

    def __init__(self, features: int, candidates: Sequence[int], signed: bool, per_feature: bool = False,
                 alpha_init: float = ALPHA_INIT) -> None:
        super().__init__(_candidates(candidates, 2), alpha_init)
        size = features if per_feature else 1
        self.signed = signed
        self.per_feature = per_feature
        self.features = features
        self.log2_step = nn.Parameter(torch.zeros(self.n_candidates, size))

    def _qmax(self) -> torch.Tensor:
        return act_int_range(self.candidate_bits, self.signed)[1].reshape(-1, 1)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Per candidate, LSQ's rule ``2*mean|x|/sqrt(Q_P)`` from a calibration batch ``[..., features]``."""
        flat = x.detach().reshape(-1, self.features).abs()
        mean_abs = flat.mean(0) if self.per_feature else flat.mean().reshape(1)
        step = 2 * mean_abs.clamp_min(1e-6).reshape(1, -1) / torch.sqrt(self._qmax().clamp_min(1.0))
        self.log2_step.copy_(torch.log2(step))
        self.initialized.fill_(True)

    def candidate_steps(self) -> torch.Tensor:
        """Power-of-two steps of every candidate, ``[C, size]``, straight-through to ``log2_step``."""
        n = self.features if not self.per_feature else 1
        g = 1.0 / torch.sqrt(n * self._qmax().clamp_min(1.0))
        return torch.pow(2.0, round_ste(grad_scale(self.log2_step, g)))

    def candidate_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized input at every candidate, ``[C, *x.shape]``."""
        view = (self.n_candidates, *([1] * (x.dim() - 1)), -1)
        steps = self.candidate_steps().to(x.dtype).reshape(view)
        bits = self.candidate_bits.reshape(view[:-1] + (1,))
        return quantize_act_int(x.unsqueeze(0), steps, bits, self.signed) * steps

    def candidate_log2_step(self, index: int) -> torch.Tensor:
        """Latent log2 step of candidate ``index``, ``[size]`` (for :class:`~mpqat.quant.Pow2ActQuantizer`)."""
        return self.log2_step.detach()[index].clone()

    def exponents(self) -> torch.Tensor:
        """Integer exponents of the dominant candidate's steps."""
        return torch.floor(self.log2_step.detach()[self.dominant()] + 0.5).to(torch.int64)

    def step(self) -> torch.Tensor:
        """Power-of-two step of the dominant candidate, ``[size]``."""
        return self.candidate_steps()[self.dominant()]

    def integer_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes at the dominant candidate (the exact eval path of a supernet layer)."""
        bits = self.candidate_bits[self.dominant()].reshape(1).to(x.device)
        return quantize_act_int(x, self.step().to(x.dtype), bits, self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.initialize(x)
        # one candidate at a time: never holds the [C, *x.shape] stack (activations are the big tensors)
        steps = self.candidate_steps().to(x.dtype)
        weights = self.mixing().to(x.dtype)
        grad = torch.is_grad_enabled()
        out = None
        for c in range(self.n_candidates):
            qmin, qmax = act_int_range(self.candidate_bits[c : c + 1], self.signed)
            if grad:
                q = quantize_act_int(x, steps[c], self.candidate_bits[c : c + 1], self.signed) * steps[c]
            else:  # the same values without the straight-through bookkeeping (evaluation of coalitions)
                q = torch.clamp(torch.floor(x / steps[c] + 0.5), qmin.to(x.dtype), qmax.to(x.dtype)) * steps[c]
            term = weights[c] * q
            out = term if out is None else out + term
        return out

    def extra_repr(self) -> str:
        return f"candidates={self.candidates}, features={self.features}, signed={self.signed}"


def mixture_quantizers(model: nn.Module) -> list[tuple[str, _Mixture]]:
    """Every mixture quantizer of ``model`` with its module name, in definition order.

    Example:
        >>> mixture_quantizers(nn.Sequential(nn.Linear(2, 2)))
        []
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _Mixture)]
