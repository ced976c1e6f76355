"""Quantize TabPFN v1's linear layers with any mpqat recipe, weights+activations or weights only.

:func:`quantize_tabpfn` runs :func:`mpqat.quantize` on the model, so every ``nn.Linear`` (the
feature encoder, each layer's ``q``, ``k``, ``v``, ``out``, ``linear1``, ``linear2`` and the two
decoder layers: 75 layers, 25.8 M weights) becomes a ``QuantLinear`` with the recipe's weight and
input quantizers. What stays float, and why (METHODS.md §1.8.4: uniform QAT of a transformer
collapsed at the softmax / layer norm / attention scores):

* layer norms, GELU, the attention scores ``q k^T / sqrt(d)`` and their softmax, the residual adds;
* the label embedding (:class:`~mpqat.tabpfn.model.LabelEmbedding`, 1 input, not an ``nn.Linear``).

Context given to the layer factories (``LayerContext``), checked here:

* no layer input follows an ``nn.ReLU`` (inputs come from layer norms, the attention, GELU), so
  every input quantizer is **signed**; GELU's output is >= -0.17, so a signed grid wastes about a
  bit on ``linear2``'s and ``decoder.2``'s inputs (kept simple, [ours]);
* the first layer in walk order is the feature ``encoder``: the recipe's ``input_bits`` (8) apply
  to it. Its input quantizer is replaced by one **per-tensor** 8-bit power-of-two quantizer
  because the ensemble rotates the feature columns (a per-column step would be calibrated on
  whichever feature happened to sit in that column);
* the last layer is ``decoder.2``: ``last_layer_w_bits`` of the recipe applies to it.

``activations=False`` gives the weights-only variant: every ``QuantLinear`` becomes a
:class:`WeightOnlyLinear`, whose input and bias stay float (``FloatInput``, reported as 32 bits).

Example:
    >>> import torch
    >>> from mpqat.recipes import Uniform
    >>> from mpqat.tabpfn.model import TabPFN, TabPFNConfig
    >>> q = quantize_tabpfn(TabPFN(TabPFNConfig.tiny()), Uniform(w_bits=4, a_bits=8), activations=False)
    >>> type(q.layers[0].attn.q).__name__, type(q.encoder).__name__
    ('WeightOnlyLinear', 'WeightOnlyLinear')
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from mpqat.cost import BIAS_BITS, SCALE_BITS, WIDTH_CODE_BITS, LayerCost, fp32_energy, linear_bitops, register_layer_cost
from mpqat.nn.linear import QuantLinear
from mpqat.quant.uniform import Pow2ActQuantizer
from mpqat.quantize import quantize
from mpqat.recipes import FP32, Recipe

FLOAT_BITS = 32.0


class FloatInput(nn.Module):
    """The "no activation quantization" input quantizer: identity, reported as 32-bit float."""

    signed = True

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.register_buffer("initialized", torch.tensor(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def bits(self) -> torch.Tensor:
        return torch.full((1,), FLOAT_BITS)

    def expected_bits(self) -> torch.Tensor:
        return self.bits()


class WeightOnlyLinear(QuantLinear):
    """A ``QuantLinear`` whose input and bias stay float: only the weights are quantized.

    Eval mode computes in float64 with the integer weight codes times their dyadic scales (exact
    products), like ``QuantLinear``; training mode is the weight quantizer's fake quantization.
    """

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> WeightOnlyLinear:
        """Same weights, bias and weight quantizer as ``layer``; a :class:`FloatInput` for the input."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight, new.bias = layer.weight, layer.bias
        new.weight_quant = layer.weight_quant
        new.act_quant = FloatInput(layer.in_features)
        return new

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias is stored in float (float64 here)."""
        return None if self.bias is None else self.bias.detach().double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            with torch.no_grad():
                w64 = self.weight.detach().double()
                w_q = self.weight_quant.integer_codes(w64) * self.weight_quant.scale().detach().double()
                return F.linear(x.double(), w_q, self.quantized_bias())
        return F.linear(x, self.weight_quant(self.weight), self.bias)


@register_layer_cost(WeightOnlyLinear)
def _weight_only_cost(name: str, layer: WeightOnlyLinear) -> LayerCost:
    n_in, n_out = layer.in_features, layer.out_features
    w_bits = layer.weight_quant.bits().detach().double().reshape(-1)
    w_bits = w_bits.expand(n_out) if w_bits.numel() == 1 else w_bits
    a_bits = torch.full((n_in,), FLOAT_BITS, dtype=torch.float64)
    bitops = float(linear_bitops(w_bits, a_bits, n_in, n_out))
    storage = float(w_bits.sum()) * n_in
    rows = n_out if getattr(layer.weight_quant, "per_neuron", True) else 1
    meta = rows * SCALE_BITS + (n_out * BIAS_BITS if layer.bias is not None else 0)
    if w_bits.unique().numel() > 1:
        meta += n_out * WIDTH_CODE_BITS
    fp = fp32_energy(layer.macs())
    return LayerCost(name, "WeightOnlyLinear", n_in, n_out, layer.macs(), w_bits.tolist(), a_bits.tolist(), bitops,
                     storage, float(meta), fp, fp)


def quantize_tabpfn(model: nn.Module, recipe: Recipe, activations: bool = True) -> nn.Module:
    """A copy of ``model`` (a :class:`~mpqat.tabpfn.model.TabPFN`) with every linear layer quantized.

    ``activations=False``: weights only (module docstring). ``FP32`` returns a plain copy.
    """
    if isinstance(recipe, FP32):
        return copy.deepcopy(model)
    q = quantize(model, recipe)
    encoder = q.encoder
    if isinstance(encoder, QuantLinear) and activations:
        bits = int(encoder.act_quant.bits().reshape(-1)[0])
        encoder.act_quant = Pow2ActQuantizer(encoder.in_features, bits, signed=True, per_feature=False)
    if not activations:
        for name, module in list(q.named_modules()):
            if type(module) is QuantLinear:
                parent_name, _, child = name.rpartition(".")
                parent = q.get_submodule(parent_name) if parent_name else q
                setattr(parent, child, WeightOnlyLinear.from_quant_linear(module))
    return q


def quant_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    """``(name, layer)`` of every quantized linear layer (``WeightOnlyLinear`` included), in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def float_parameter_count(model: nn.Module) -> int:
    """Parameters that stay float: everything outside the quantized layers' weights and biases
    (layer norms, label embedding, any unquantized linear), plus quantizer-free buffers excluded."""
    inside = {id(p) for _, m in quant_linears(model) for p in (m.weight, m.bias) if p is not None}
    total = 0
    for name, p in model.named_parameters():
        if id(p) in inside or ".weight_quant." in f".{name}" or ".act_quant." in f".{name}":
            continue
        total += p.numel()
    return total
