"""NMP-QAT's expected-bits regularizer in one fused call (see :mod:`mpqat.kernels`).

:func:`mpqat.methods.nmp.expected_cost` with ``reg: bits`` is the parameter-weighted average of the
expected weight bits plus the element-weighted average of the expected activation bits
(:func:`mpqat.cost.expected_weight_bits`, :func:`mpqat.cost.expected_act_bits`). Both are linear in
every quantizer's per-row expected bits ``E_r = sum_k pi_k(s_r) b_k``, so the cost is
``constant + sum_q sum_r coef_q * E_qr``, with the coefficients read off those two functions.
:func:`fused_expected_bits` computes it and its gradient for all strengths in one kernel call and
one autograd node, instead of a small graph per quantizer (which cost more than the layers' own
fused forward and backward on the default MLP). Values and gradients agree with the reference
to float rounding (``tests/kernels``).

Example:
    >>> import torch
    >>> from mpqat.models import MLP
    >>> from mpqat.methods.nmp import NeuronBits
    >>> from mpqat.quantize import quantize
    >>> from mpqat.cost import expected_act_bits, expected_weight_bits
    >>> model = quantize(MLP(6, 2, hidden=(8,)), NeuronBits())
    >>> cost = fused_expected_bits(model)              # None where the kernels cannot be built
    >>> reference = expected_weight_bits(model) + expected_act_bits(model)
    >>> cost is None or abs(float(cost.detach()) - float(reference.detach())) < 1e-5
    True
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from mpqat import kernels
from mpqat.nn.linear import QuantLinear
from mpqat.quant.bits import _LearnedBits

_transforms_active = torch._C._are_functorch_transforms_active


def fused_expected_bits(model: nn.Module) -> torch.Tensor | None:
    """``expected_weight_bits(model) + expected_act_bits(model)`` through the fused kernel, or None
    where it does not apply (a quantizer that is not a learned-bit one, a strength that is not a
    float32 CPU tensor, ``torch.func`` transforms, no extension): the caller then takes the reference."""
    if _transforms_active():
        return None
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    plan = _PLANS.get(model)
    if plan is None or not plan.matches(layers):
        plan = _Plan.build(layers)
        if plan is None:
            return None
        _PLANS[model] = plan
    strengths = [q._parameters["strength"] for q in plan.learned]
    if any(s.dtype is not torch.float32 or not s.is_cpu for s in strengths):
        return None
    ext = kernels.extension_if_enabled()
    if ext is None:
        return None
    learned = plan.learned  # buffers read now: a .to() or load_state_dict may have replaced them
    consts = ([q._buffers["thresholds"] for q in learned], [q._buffers["candidates"] for q in learned], plan.coefs,
              [1.0 / q.tau for q in learned])
    return _ExpectedBitsCost.apply(ext, consts, plan.constant, *strengths)


class _Plan:
    """What the cost of one model needs besides the strengths, temperatures and buffers, built once:
    the quantizers with a strength, their coefficients, and the constant part."""

    def __init__(self, layers: list[nn.Module], quants: list[_LearnedBits], learned: list[_LearnedBits],
                 coefs: list[torch.Tensor], constant: float) -> None:
        self.layers, self.quants, self.learned, self.coefs, self.constant = layers, quants, learned, coefs, constant
        self.has_strength = [q._parameters.get("strength") is not None for q in quants]

    @classmethod
    def build(cls, layers: list[nn.Module]) -> _Plan | None:
        if not layers:
            return None
        fan_ins = [int(m.weight[0].numel()) for m in layers]
        params = sum(f * m.out_features for f, m in zip(fan_ins, layers))
        elems = sum(m.in_features for m in layers)
        quants: list[_LearnedBits] = []
        learned: list[_LearnedBits] = []
        coefs: list[torch.Tensor] = []
        constant = 0.0
        for layer, fan_in in zip(layers, fan_ins):
            # expected_weight_bits: bits.sum() * (out / n) * fan_in / params;
            # expected_act_bits: bits.sum() * (in / n) / elems (n: the quantizer's rows of bits)
            for quant, weight in ((layer._modules["weight_quant"], fan_in * layer.out_features / params),
                                  (layer._modules["act_quant"], layer.in_features / elems)):
                if not isinstance(quant, _LearnedBits):
                    return None
                quants.append(quant)
                strength = quant._parameters.get("strength")
                if strength is None:  # one candidate: its bits, a constant
                    constant += weight * float(quant.candidates[0])
                else:
                    learned.append(quant)
                    coefs.append(torch.tensor([weight / strength.numel()]))
        return cls(layers, quants, learned, coefs, constant)

    def matches(self, layers: list[nn.Module]) -> bool:
        """Same layers, same quantizers, same strengths present (a model changed since is planned anew)."""
        if len(layers) != len(self.layers) or any(a is not b for a, b in zip(layers, self.layers)):
            return False
        current = [q for layer in layers for q in (layer._modules["weight_quant"], layer._modules["act_quant"])]
        return (all(a is b for a, b in zip(current, self.quants))
                and [q._parameters.get("strength") is not None for q in current] == self.has_strength)


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


class _ExpectedBitsCost(torch.autograd.Function):
    """The cost as one node: the kernel returns the value and every strength's gradient at once."""

    @staticmethod
    def forward(ctx, ext, consts, constant, *strengths):  # noqa: D102  (autograd API)
        thresholds, candidates, coefs, inv_taus = consts
        total, grads = ext.expected_bits_cost([s.detach() for s in strengths], thresholds, candidates, coefs, inv_taus)
        ctx.grads = grads
        return torch.tensor(constant + total, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return (None, None, None, *(grad * g for g in ctx.grads))


__all__ = ["fused_expected_bits"]
