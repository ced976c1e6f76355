"""Cost accounting: the one definition of average bits, BitOps, size and energy used everywhere.

Definitions (per inference of one sample):

* **average weight bits**: parameter-weighted, ``sum_j fan_in_j * b_j / sum_j fan_in_j`` over the
  weights of every linear/conv layer (biases excluded; they are counted in the size). A conv's
  ``fan_in`` is ``in_channels/groups * prod(kernel)`` and its rows are its output channels.
* **average activation bits**: element-weighted over every quantized layer input,
  ``sum_l sum_i b_{l,i} / sum_l in_features_l``.
* **BitOps**: ``sum over every multiplication of b_w * b_a``; for a linear layer with per-neuron
  weight bits ``b_j`` and per-feature input bits ``a_i`` that is ``(sum_i a_i) * (sum_j b_j)``
  (HGQ's EBOPs); for uniform bits ``MACs * b_w * b_a``. FP32 counts 32 x 32 per MAC. A conv's MACs
  include the output's spatial size, ``prod(out_size) * out_channels * fan_in``, and its BitOps are
  the linear formula over channels times ``MACs / (in_channels * out_channels)`` (exact for uniform
  bits, and for per-channel bits when ``groups == 1``; zero-padding products are counted).
* **size**: ``sum n * b`` weight bits plus the metadata the integer graph stores: per output row a
  32-bit scale (16-bit mantissa + exponent) and a 32-bit bias, an 8-bit width code per row when a
  layer's weight bits vary, and per activation quantizer one 8-bit exponent per step (plus an 8-bit
  width code per feature when its bits vary), plus any quantizer tables a layer declares with
  ``extra_metadata_bits()`` (an ADQ codebook: 12 bits per codeword; N2UQ thresholds: 32 bits each).
  FP32 size is 4 bytes per weight and bias.
* **energy** (an estimate, 45 nm figures of Horowitz, ISSCC 2014): an integer multiply costs
  ``0.2 pJ * b_w * b_a / 64`` (the 8x8-bit figure scaled by the product of widths), the 32-bit
  accumulate 0.1 pJ, each weight bit read from SRAM 10 pJ / 64 bits; FP32 costs 3.7 pJ (multiply)
  + 0.9 pJ (add) + 32 bits of SRAM read per MAC.

Float ``nn.Conv1d``/``nn.Conv2d`` layers are costed as FP32 (their spatial input size must be
known: :func:`mpqat.nn.conv.record_input_sizes`); BatchNorms are not costed (they fold into the conv).

Example:
    >>> import torch
    >>> report = model_cost(torch.nn.Sequential(torch.nn.Linear(4, 2)))
    >>> report.bitops == 4 * 2 * 32 * 32, report.size_bytes
    (True, 40.0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import math

import torch
from torch import nn

from mpqat.nn.conv import QuantConv1d, QuantConv2d, conv_output_size
from mpqat.nn.linear import QuantLinear

SCALE_BITS = 32
BIAS_BITS = 32
WIDTH_CODE_BITS = 8
EXPONENT_BITS = 8
FP_BITS = 32

ENERGY_INT_MULT_8x8_PJ = 0.2
ENERGY_INT32_ADD_PJ = 0.1
ENERGY_FP32_MULT_PJ = 3.7
ENERGY_FP32_ADD_PJ = 0.9
ENERGY_SRAM_PJ_PER_BIT = 10.0 / 64


@dataclass
class LayerCost:
    """Cost of one layer; bit-widths are per output neuron (weights) and per input feature (activations)."""

    name: str
    kind: str
    in_features: int
    out_features: int
    macs: int
    weight_bits: list[float]
    act_bits: list[float]
    bitops: float
    weight_storage_bits: float
    metadata_bits: float
    energy_pj: float
    fp32_energy_pj: float
    fan_in: int = 0  # weights per output row; 0 means in_features (a linear layer)

    @property
    def params(self) -> int:
        return self.out_features * (self.fan_in or self.in_features)


@dataclass
class CostReport:
    """Whole-model cost, with the FP32 reference of the same architecture."""

    avg_weight_bits: float
    avg_act_bits: float
    bitops: float
    size_bytes: float
    energy_pj: float
    fp32_bitops: float
    fp32_size_bytes: float
    fp32_energy_pj: float
    layers: list[LayerCost] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The scalar figures, as written into ``metrics.json``."""
        return {k: v for k, v in asdict(self).items() if k != "layers"}

    def bit_histograms(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per layer, ``{"weights": {bits: neurons}, "activations": {bits: features}}``."""
        out = {}
        for layer in self.layers:
            out[layer.name] = {"weights": _histogram(layer.weight_bits), "activations": _histogram(layer.act_bits)}
        return out


def _histogram(bits: list[float]) -> dict[str, int]:
    values, counts = torch.tensor(bits).unique(return_counts=True)
    return {f"{v:g}": int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}


def _expand(bits: torch.Tensor, size: int) -> torch.Tensor:
    flat = bits.detach().reshape(-1).double().cpu()
    return flat.expand(size) if flat.numel() == 1 else flat


def linear_bitops(w_bits: torch.Tensor, a_bits: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """Differentiable BitOps of a linear layer: ``(sum_i a_i) * (sum_j b_j)`` with broadcasting."""
    a_total = a_bits.sum() * (in_features / a_bits.numel())
    w_total = w_bits.sum() * (out_features / w_bits.numel())
    return a_total * w_total


def _fan_in(layer: nn.Module) -> int:
    """Weights per output row (``in_features`` of a linear layer, ``in_channels/groups*prod(kernel)`` of a conv)."""
    return int(layer.weight[0].numel())


def _spatial_factor(layer: nn.Module) -> float:
    """``MACs / (in_features * out_features)``: 1 for a linear layer, ``prod(out_size)*prod(kernel)/groups`` for a conv."""
    return layer.macs() / (layer.in_features * layer.out_features)


def _quant_linear_cost(name: str, layer: QuantLinear) -> LayerCost:
    n_in, n_out, fan_in = layer.in_features, layer.out_features, _fan_in(layer)
    w_bits = _expand(layer.weight_quant.bits(), n_out)
    a_bits = _expand(layer.act_quant.bits(), n_in)
    bitops = float(linear_bitops(w_bits, a_bits, n_in, n_out))
    is_conv = isinstance(layer, QuantConv1d | QuantConv2d)
    if is_conv:
        bitops *= _spatial_factor(layer)
    weight_storage = float(w_bits.sum()) * fan_in
    rows = n_out if getattr(layer.weight_quant, "per_neuron", True) else 1
    meta = rows * SCALE_BITS + (n_out * BIAS_BITS if layer.bias is not None else 0)
    if w_bits.unique().numel() > 1:
        meta += n_out * WIDTH_CODE_BITS
    meta += layer.act_quant.bits().numel() * EXPONENT_BITS
    for quant in (layer.weight_quant, layer.act_quant):  # e.g. an ADQ codebook, N2UQ thresholds
        meta += int(getattr(quant, "extra_metadata_bits", lambda: 0)())
    if a_bits.unique().numel() > 1:
        meta += n_in * WIDTH_CODE_BITS
    mult = ENERGY_INT_MULT_8x8_PJ * bitops / 64
    energy = mult + layer.macs() * ENERGY_INT32_ADD_PJ + weight_storage * ENERGY_SRAM_PJ_PER_BIT
    return LayerCost(
        name, type(layer).__name__ if is_conv else "QuantLinear", n_in, n_out, layer.macs(), w_bits.tolist(),
        a_bits.tolist(), bitops, weight_storage, float(meta), energy, fp32_energy(layer.macs()),
        fan_in if is_conv else 0,
    )


def fp32_energy(macs: int) -> float:
    """Energy estimate (pJ) of ``macs`` FP32 multiply-accumulates with their weight reads."""
    return macs * (ENERGY_FP32_MULT_PJ + ENERGY_FP32_ADD_PJ + FP_BITS * ENERGY_SRAM_PJ_PER_BIT)


def _float_linear_cost(name: str, layer: nn.Linear) -> LayerCost:
    n_in, n_out = layer.in_features, layer.out_features
    macs = n_in * n_out
    bias = n_out * FP_BITS if layer.bias is not None else 0
    return LayerCost(
        name, "Linear", n_in, n_out, macs, [float(FP_BITS)] * n_out, [float(FP_BITS)] * n_in,
        float(macs * FP_BITS * FP_BITS), float(macs * FP_BITS), float(bias), fp32_energy(macs), fp32_energy(macs),
    )


def _float_conv_cost(name: str, layer: nn.Module) -> LayerCost:
    size = getattr(layer, "input_size", None)
    if size is None:
        raise ValueError(
            f"cost of '{name}' ({type(layer).__name__}): its input's spatial size is unknown; call "
            "mpqat.nn.conv.record_input_sizes(model, input_shape) first"
        )
    out_size = conv_output_size(size, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    n_in, n_out, fan_in = layer.in_channels, layer.out_channels, _fan_in(layer)
    params = n_out * fan_in
    macs = math.prod(out_size) * params
    bias = n_out * FP_BITS if layer.bias is not None else 0
    return LayerCost(
        name, type(layer).__name__, n_in, n_out, macs, [float(FP_BITS)] * n_out, [float(FP_BITS)] * n_in,
        float(macs * FP_BITS * FP_BITS), float(params * FP_BITS), float(bias), fp32_energy(macs),
        fp32_energy(macs), fan_in,
    )


_LAYER_COSTS: dict[type, Callable[[str, nn.Module], LayerCost]] = {
    QuantLinear: _quant_linear_cost,
    QuantConv1d: _quant_linear_cost,
    QuantConv2d: _quant_linear_cost,
    nn.Linear: _float_linear_cost,
    nn.Conv1d: _float_conv_cost,
    nn.Conv2d: _float_conv_cost,
}


def register_layer_cost(layer_type: type) -> Callable:
    """Decorator: register how a new layer type (e.g. a quantized conv) reports its :class:`LayerCost`."""

    def decorate(fn: Callable[[str, nn.Module], LayerCost]) -> Callable[[str, nn.Module], LayerCost]:
        _LAYER_COSTS[layer_type] = fn
        return fn

    return decorate


def layer_costs(model: nn.Module) -> list[LayerCost]:
    """Cost of every costed layer of the model, in definition order (quantized layers are not recursed into)."""
    costs: list[LayerCost] = []

    def visit(prefix: str, module: nn.Module) -> None:
        fn = _LAYER_COSTS.get(type(module))
        if fn is not None:
            costs.append(fn(prefix or type(module).__name__, module))
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    return costs


def model_cost(model: nn.Module) -> CostReport:
    """Average bits, BitOps, size and energy of ``model`` and of its FP32 counterpart."""
    layers = layer_costs(model)
    if not layers:
        raise ValueError("model_cost: the model has no linear or convolutional layer")
    return aggregate_costs(layers)


def aggregate_costs(layers: list[LayerCost]) -> CostReport:
    """Whole-model figures from per-layer costs (also used for peer libraries' models)."""
    params = sum(layer.params for layer in layers)
    act_elems = sum(layer.in_features for layer in layers)
    weight_bits = sum(layer.weight_storage_bits for layer in layers)
    meta_bits = sum(layer.metadata_bits for layer in layers)
    fp32_bias_bits = sum(layer.out_features * FP_BITS for layer in layers)
    return CostReport(
        avg_weight_bits=weight_bits / params,
        avg_act_bits=sum(sum(layer.act_bits) for layer in layers) / act_elems,
        bitops=sum(layer.bitops for layer in layers),
        size_bytes=(weight_bits + meta_bits) / 8,
        energy_pj=sum(layer.energy_pj for layer in layers),
        fp32_bitops=float(sum(layer.macs for layer in layers) * FP_BITS * FP_BITS),
        fp32_size_bytes=(params * FP_BITS + fp32_bias_bits) / 8,
        fp32_energy_pj=sum(layer.fp32_energy_pj for layer in layers),
        layers=layers,
    )


def expected_bitops(model: nn.Module) -> torch.Tensor:
    """Differentiable BitOps from each quantized layer's ``expected_bits()`` (for cost regularizers)."""
    total = torch.zeros(())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            bitops = linear_bitops(
                module.weight_quant.expected_bits(), module.act_quant.expected_bits(),
                module.in_features, module.out_features,
            )
            if isinstance(module, QuantConv1d | QuantConv2d):
                bitops = bitops * _spatial_factor(module)
            total = total + bitops
    return total


def expected_weight_bits(model: nn.Module) -> torch.Tensor:
    """Differentiable parameter-weighted average weight bits (for cost regularizers)."""
    total, params = torch.zeros(()), 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            bits = module.weight_quant.expected_bits()
            fan_in = _fan_in(module)
            total = total + bits.sum() * (module.out_features / bits.numel()) * fan_in
            params += fan_in * module.out_features
    return total / max(params, 1)


def expected_act_bits(model: nn.Module) -> torch.Tensor:
    """Differentiable element-weighted average input bits over the quantized layers (for cost regularizers)."""
    total, elems = torch.zeros(()), 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            bits = module.act_quant.expected_bits()
            total = total + bits.sum() * (module.in_features / bits.numel())
            elems += module.in_features
    return total / max(elems, 1)
