"""``export(model, example)``: turn a trained quantized model into an :class:`IntegerGraph`.

The model must be a chain (``nn.Sequential``, possibly nested) of ``QuantLinear`` layers, with
``nn.ReLU`` between them and optionally ``nn.Dropout``/``nn.Identity`` (no-ops in eval mode). Every
``QuantLinear`` is read through its quantizers' public methods only (``integer_codes``, ``scale``,
``bits``, ``step``, ``signed``, ``accumulator_step``, ``quantized_bias``), so any quantizer with those
methods (uniform LSQ, NMP-QAT's learned per-neuron bits) exports the same way. Other layer types
register a converter with :func:`register_converter`; :mod:`mpqat.export.conv` does so for
convolutions, pooling, ``nn.Flatten`` and ``nn.Unflatten`` (LeNet-5, the 1-D radio CNN).

The export reads exactly the numbers the model's eval path uses (the power-of-two steps from
``act_quant.step()``, the dyadic scales from ``weight_quant.scale()``), then checks the graph
against the model on ``example``: the outputs must be identical bit for bit, or the export fails.

Example:
    >>> import torch
    >>> from mpqat import quantize, Uniform
    >>> from mpqat.models import MLP
    >>> model = quantize(MLP(4, 2, hidden=(8,)), Uniform(w_bits=4, a_bits=8))
    >>> _ = model.train()(torch.randn(32, 4))          # initialise the quantizers
    >>> graph = export(model, torch.randn(16, 4))
    >>> [n.op for n in graph.nodes]
    ['quantize_input', 'integer_linear', 'requantize', 'integer_linear', 'dequantize_output']
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mpqat.errors import ExportError
from mpqat.export.ir import DequantizeOutput, IntegerGraph, IntegerLinear, Node, QuantizeInput, Requantize
from mpqat.nn.linear import QuantLinear
from mpqat.quant.functional import dyadic_parts

SUPPORTED = ("QuantLinear, nn.ReLU, nn.Dropout and nn.Identity in an nn.Sequential chain; for CNNs also QuantConv1d/2d "
             "(groups=1), nn.MaxPool1d/2d, nn.AdaptiveAvgPool1d/2d(1), nn.Flatten and nn.Unflatten (of the model input)")


@dataclass
class Builder:
    """State of the walk over the model: the nodes so far and what the last one outputs."""

    nodes: list[Node] = field(default_factory=list)
    state: str = "float"  # "float" (model input) or "acc" (after an integer linear)
    relu: bool = False  # a ReLU is pending before the next quantizer
    shape: tuple[int, ...] = ()  # per-sample torch shape (C, *spatial) of a feature map (or a pending
    # nn.Unflatten of the model input); () for flat rows (see mpqat.export.conv)

    def quantizer_node(self, exponent: np.ndarray, bits: np.ndarray, signed: bool) -> Node:
        """The node that produces codes for the next layer: quantize the input, or requantize accumulators."""
        cls = QuantizeInput if self.state == "float" else Requantize
        node = cls(exponent=exponent, bits=bits, signed=signed, relu=self.relu)
        self.relu = False
        return node


Converter = Callable[[str, nn.Module, Builder], None]
_CONVERTERS: dict[type, Converter] = {}


def register_converter(module_type: type) -> Callable[[Converter], Converter]:
    """Decorator: register ``converter(name, module, builder)`` that appends nodes for ``module_type``."""

    def decorate(fn: Converter) -> Converter:
        _CONVERTERS[module_type] = fn
        return fn

    return decorate


#: Quantizer types whose layers export to another node than IntegerLinear / (Re)quantize (e.g. ADQ's
#: codebook weights and threshold activations, registered by mpqat.export.codebook / .threshold).
WeightNodeMaker = Callable[[nn.Module, torch.Tensor, dict[str, Any]], Node]
ActNodeMaker = Callable[[Builder, nn.Module, np.ndarray, np.ndarray, str], Node]
_WEIGHT_NODES: dict[type, WeightNodeMaker] = {}
_ACT_NODES: dict[type, ActNodeMaker] = {}


def register_weight_node(quantizer_type: type) -> Callable[[WeightNodeMaker], WeightNodeMaker]:
    """Decorator: ``make(weight_quant, weight_float64, fields) -> node`` replaces IntegerLinear for this
    weight-quantizer type; ``fields`` holds ``bias``, ``mult``, ``scale_exp``, ``acc_exponent``, ``name``."""

    def decorate(fn: WeightNodeMaker) -> WeightNodeMaker:
        _WEIGHT_NODES[quantizer_type] = fn
        return fn

    return decorate


def register_act_node(quantizer_type: type) -> Callable[[ActNodeMaker], ActNodeMaker]:
    """Decorator: ``make(builder, act_quant, exponent, bits, name) -> node`` produces the input codes of a
    layer for this activation-quantizer type (instead of QuantizeInput / Requantize)."""

    def decorate(fn: ActNodeMaker) -> ActNodeMaker:
        _ACT_NODES[quantizer_type] = fn
        return fn

    return decorate


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _integral(arr: np.ndarray, what: str, name: str) -> np.ndarray:
    if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.floor(arr)):
        raise ExportError(f"layer '{name}': {what} are not integers; is the model quantized and its quantizers initialised?")
    if arr.size and np.abs(arr).max() >= 2**62:
        raise ExportError(f"layer '{name}': {what} are too large for int64 ({np.abs(arr).max():.3g})")
    return arr.astype(np.int64)


def _per_channel(t: torch.Tensor, size: int, what: str, name: str) -> np.ndarray:
    arr = _np(t).reshape(-1)
    if arr.size == 1:
        return np.repeat(arr, size)
    if arr.size != size:
        raise ExportError(
            f"layer '{name}': {what} has {arr.size} entries; export supports one per tensor or one per "
            f"{'output neuron' if 'weight' in what else 'input feature'} ({size}), not per weight"
        )
    return arr


def _power_of_two_exponents(steps: np.ndarray, name: str) -> np.ndarray:
    mantissa, exponent = np.frexp(steps)
    if not np.all(mantissa == 0.5):
        raise ExportError(f"layer '{name}': activation steps must be powers of two (Pow2ActQuantizer), got {steps[:4]}")
    return (exponent - 1).astype(np.int64)


@register_converter(QuantLinear)
def _convert_quant_linear(name: str, layer: QuantLinear, b: Builder) -> None:
    n_in, n_out = layer.in_features, layer.out_features
    wq, aq = layer.weight_quant, layer.act_quant
    if b.shape and not hasattr(layer, "kernel_size"):
        raise ExportError(f"layer '{name}': a linear layer on a feature map {b.shape}; put nn.Flatten() before it")
    weight = layer.weight.detach().double()
    weight = weight.reshape(weight.shape[0], -1)  # a conv kernel as the 2-D view its quantizer sees
    if not bool(getattr(aq, "initialized", True)) or not bool(getattr(wq, "initialized", True)):
        raise ExportError(
            f"layer '{name}': its quantizers were never initialised; train the model (at least one "
            "training-mode forward pass) before exporting"
        )
    with torch.no_grad():
        steps = _per_channel(aq.step(), n_in, "activation step", name)
        a_bits = _integral(_per_channel(aq.bits(), n_in, "activation bits", name), "activation bits", name)
        w_bits = _integral(_per_channel(wq.bits(), n_out, "weight bits", name), "weight bits", name)
        codes = _integral(_np(wq.integer_codes(weight)), "weight codes", name)
        scale = wq.scale().detach().double()
        scale_rows = scale.reshape(-1).expand(n_out) if scale.numel() == 1 else scale.reshape(-1)
        if scale_rows.numel() != n_out:
            raise ExportError(f"layer '{name}': weight scale has {scale.numel()} entries; need 1 or {n_out}")
        mult_t, e_t = dyadic_parts(scale_rows)
        mult, scale_exp = mult_t.numpy().astype(np.int64), e_t.numpy().astype(np.int64)
        if not np.array_equal(np.ldexp(mult.astype(np.float64), -scale_exp), scale_rows.numpy()):
            raise ExportError(f"layer '{name}': weight scales are not dyadic (m * 2**-e, m < 2**16); snap them with snap_mantissa")
        k = _power_of_two_exponents(steps, name)
        k_acc = int(k.min())
        bias = np.zeros(n_out, dtype=np.int64)
        if getattr(layer, "bias", None) is not None:
            unit = _np(layer.accumulator_step()).reshape(-1)
            ratio = unit / scale_rows.numpy()
            k_bias = _power_of_two_exponents(ratio, name)
            if not np.all(k_bias == k_bias[0]):
                raise ExportError(f"layer '{name}': accumulator_step() is not scale * 2**K with one K per layer")
            b_int = _integral(_np(layer.quantized_bias()).reshape(-1) / unit, "bias codes", name)
            k_acc = min(k_acc, int(k_bias[0]))
            bias = b_int * (np.int64(1) << np.int64(int(k_bias[0]) - k_acc))
    make_act = _ACT_NODES.get(type(aq))
    b.nodes.append(make_act(b, aq, k, a_bits, name) if make_act else b.quantizer_node(k, a_bits, bool(aq.signed)))
    fields = dict(bias=bias, mult=mult, scale_exp=scale_exp, acc_exponent=k_acc, name=name)
    make_weight = _WEIGHT_NODES.get(type(wq))
    b.nodes.append(make_weight(wq, weight, fields) if make_weight
                   else IntegerLinear(weight=codes, weight_bits=w_bits, **fields))
    b.state = "acc"


@register_converter(nn.ReLU)
def _convert_relu(name: str, module: nn.Module, b: Builder) -> None:
    b.relu = True


@register_converter(nn.Dropout)
@register_converter(nn.Identity)
def _convert_noop(name: str, module: nn.Module, b: Builder) -> None:
    return None


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules of a (nested) ``nn.Sequential`` chain, in execution order."""

    def walk(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        if type(module) in _CONVERTERS:
            return [(prefix or type(module).__name__, module)]
        if isinstance(module, nn.Sequential):
            out = []
            for child_name, child in module.named_children():
                out += walk(f"{prefix}.{child_name}" if prefix else child_name, child)
            return out
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            raise ExportError(
                f"layer '{prefix}' is a float nn.{type(module).__name__}: every linear and conv layer must be quantized "
                "for an integer export (mpqat.quantize(model, recipe) swaps them all for QuantLinear/QuantConv)"
            )
        raise ExportError(f"layer '{prefix}' ({type(module).__name__}) is not supported by the integer export; supported: {SUPPORTED}")

    return walk("", model)


def _example_array(example: Any, n_in: int) -> np.ndarray:
    arr = example.detach().cpu().numpy() if isinstance(example, torch.Tensor) else np.asarray(example)
    if arr.ndim != 2 or arr.shape[1] != n_in or arr.shape[0] == 0:
        raise ExportError(f"example must be a non-empty float batch [rows, {n_in}], got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ExportError(f"example must be a float tensor, got dtype {arr.dtype}")
    return arr


def export(model: nn.Module, example: Any, check: bool = True) -> IntegerGraph:
    """Export a trained quantized model to an :class:`IntegerGraph`; the model itself is left unchanged.

    ``example`` is a float batch ``[rows, features]`` (tensor or array): it fixes the input width and,
    with ``check=True``, the graph is run on it and must match the model's eval output bit for bit.

    Example:
        >>> import torch
        >>> from mpqat import quantize, Uniform
        >>> model = quantize(torch.nn.Sequential(torch.nn.Linear(3, 2)), Uniform(w_bits=2, a_bits=8))
        >>> _ = model.train()(torch.randn(8, 3))
        >>> export(model, torch.randn(4, 3)).output_dim
        2
    """
    frozen = copy.deepcopy(model).eval()
    builder = Builder()
    leaves = _leaves(frozen)
    for name, module in leaves:
        _CONVERTERS[type(module)](name, module, builder)
    if builder.state != "acc":
        raise ExportError(f"the model has no QuantLinear layer to export; supported: {SUPPORTED}")
    if builder.relu:
        raise ExportError("the model ends with a ReLU; the integer export needs the last layer to be a QuantLinear (logits)")
    if builder.shape:
        raise ExportError(f"the model ends with a feature map {builder.shape}; the integer export needs flat logits "
                          "(end with nn.Flatten and a linear layer)")
    builder.nodes.append(DequantizeOutput())
    graph = IntegerGraph(builder.nodes)
    x = _example_array(example, graph.input_dim)
    if check:
        with torch.no_grad():
            expected = frozen(torch.from_numpy(np.ascontiguousarray(x))).double().numpy()
        got = graph.run(x, backend="int64")
        if expected.shape != got.shape or not np.array_equal(expected, got):
            diff = np.abs(expected - got).max() if expected.shape == got.shape else float("nan")
            raise ExportError(
                "the integer graph does not reproduce the model's eval output bit for bit on the example "
                f"(largest difference {diff:.3g}); the model's forward may not be the plain chain "
                f"{[name for name, _ in leaves]}, or a quantizer does not follow the integer contract"
            )
    return graph
