"""Convolutional chains in the integer graph: conv, max/average pooling, flatten and unflatten nodes.

With these nodes ``export(model, example)`` handles chain CNNs such as :class:`~mpqat.models.LeNet5`
(``Unflatten, Conv2d, ReLU, MaxPool2d, ..., Flatten, Linear, ...``) and :class:`~mpqat.models.CNN1d`
(``[Conv1d, BatchNorm1d, ReLU, MaxPool1d]`` blocks, ``AdaptiveAvgPool1d(1)``, ``Flatten``, an MLP head;
``quantize`` folds each BN into its conv), with the MLP contract: the graph reproduces the model's
eval output bit for bit on the example, or the export fails.

**Layout.** The graph's input and output stay flat rows. Inside, a feature map travels channels
last, ``[n, *spatial, C]`` (``TensorInfo.spatial`` holds the spatial shape, ``size`` the channel
count), so the per-feature arrays of :mod:`mpqat.export.ir` (step exponents, bit-widths, dyadic
scales, bounds) are per channel and broadcast over the positions, exactly like the models'
quantizers, which see ``x.movedim(1, -1)``. Every pointwise node (``requantize``,
``threshold_requantize``) therefore works on maps unchanged.

Nodes (all integer; semantics defined by the NumPy engine kernels below):

``Unflatten(channels, shape)``  codes ``[n, C*P]`` in torch's ``(C, *spatial)`` order -> map
    ``[n, *spatial, C]``. The flat input codes come from a ``quantize_input`` whose per-feature
    arrays repeat each channel's value over its ``P`` positions (checked).
``IntegerConv(weight, weight_bits, bias, mult, scale_exp, acc_exponent, kernel, stride, padding, dilation)``
    codes map -> acc map. Per output position, exactly :class:`~mpqat.export.ir.IntegerLinear` on the
    zero-padded patch (im2col, columns in torch's ``(C, *kernel)`` order, so ``weight`` is the
    ``[out_channels, C * prod(kernel)]`` view the weight quantizer sees): ``acc = sum_col w *
    (a << (k_c - K)) + b``. Zero padding is exact (code 0 is the value 0). ``groups=1`` only.
    The overflow bound is IntegerLinear's on the expanded columns, a hard bound for every position.
``CodebookConv(index, index_bits, codebook, offset, ...)``  the same with ADQ codebook weights.
``MaxPool(kernel, stride, padding)``  acc or codes map -> same kind, max over each window of one
    channel (padding never wins). The exporter puts it on the accumulators, *before* the next
    requantize: requantization (and ReLU, and N2UQ's threshold count) is monotone non-decreasing and
    the same for every position of a channel, so ``requant(max(acc)) == max(requant(acc))``, which is
    the model's ``ReLU -> MaxPool -> act_quant`` while requantizing 4x fewer values.
``GlobalAvgPool(relu)``  acc map -> acc map with every spatial size 1: ``sum_p relu(acc_p)``, and the
    division by ``P`` folds exactly into the accumulator exponent (``acc_exp - log2 P``), so the next
    requantize shifts by ``log2 P`` more. Only for ``P`` a power of two: a dyadic graph cannot divide
    exactly by anything else, and the export refuses. The model's float64 ``AdaptiveAvgPool`` is
    exact too (integer multiples of one step, sums below 2**53, a power-of-two division).
``Flatten()``  acc or codes map -> flat ``[n, C*P]`` in torch's ``nn.Flatten`` order (channel-major),
    the per-channel arrays repeated per position, so a following linear layer keeps its weights.

Ours (not from a paper). Refused with a clear :class:`~mpqat.errors.ExportError`: grouped convs,
pooling with dilation or ``ceil_mode``, average pooling over a non-power-of-two count, and ResNets
(residual adds are not in the chain IR yet).

The ``.mpq`` file stores these nodes like any other (geometry as tiny integer arrays; weights bit-packed
per row). ONNX: maps travel as 2-D ``[N*P, C]`` tensors, convs and pools are ``Gather`` with a
precomputed window table, then an int64 ``MatMul`` or ``ReduceMax`` (exact, and bit-identical to the
engine). C: plain loops over int32 codes and int32/int64 accumulators (:func:`conv_graph_to_c`).

Example:
    >>> import torch
    >>> from mpqat import quantize, Uniform
    >>> from mpqat.models import LeNet5
    >>> from mpqat.export import export
    >>> model = quantize(LeNet5(10, (1, 16, 16)), Uniform(w_bits=4, a_bits=4))
    >>> _ = model.train()(torch.randn(8, 256))                  # initialise the quantizers
    >>> graph = export(model, torch.randn(4, 256))
    >>> [n.op for n in graph.nodes][:6]
    ['quantize_input', 'unflatten', 'integer_conv', 'max_pool', 'requantize', 'integer_conv']
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from mpqat.checkpoint import atomic_write_text
from mpqat.errors import ExportError
from mpqat.export import engine
from mpqat.export.codebook import CodebookLinear
from mpqat.export.convert import Builder, _convert_quant_linear, register_converter
from mpqat.export.ir import (
    ACC_MULT_LIMIT,
    LSHIFT_CLIP,
    DequantizeOutput,
    IntegerLinear,
    Node,
    QuantizeInput,
    Requantize,
    TensorInfo,
    _as_int_array,
    _hist,
    array_field,
    register_node,
)
from mpqat.export.onnx_export import _Builder, register_onnx, shifted_weight
from mpqat.export.threshold import ThresholdRequantize
from mpqat.models.cnn import BasicBlock, ResNet
from mpqat.nn.conv import QuantConv1d, QuantConv2d, conv_output_size

#: The engine's conv kernel builds im2col patches for at most this many int64/float64 entries at a time.
CHUNK_ELEMENTS = 2**22

_ARRAYS = ("exponent", "lo", "hi", "bits", "mult", "acc_exp", "bound")


def _map_info(inp: TensorInfo, fn: Any, size: int, spatial: tuple[int, ...], explain: Any = None) -> TensorInfo:
    """A copy of ``inp`` with ``fn`` applied to every per-feature array, a new size and spatial shape."""
    arrays = {name: (None if getattr(inp, name) is None else fn(np.asarray(getattr(inp, name)))) for name in _ARRAYS}
    return TensorInfo(inp.kind, size, spatial=spatial, explain=explain or inp.explain, **arrays)


def _geometry(node: Node, names: tuple[str, ...], where: str) -> dict[str, tuple[int, ...]]:
    """Validate the node's geometry arrays (one entry per spatial dim, 1 or 2 dims) and return them as tuples."""
    out: dict[str, tuple[int, ...]] = {}
    for name in names:
        arr = _as_int_array(getattr(node, name), name, where, 1)
        setattr(node, name, arr)
        out[name] = tuple(int(v) for v in arr)
    nd = len(out[names[0]])
    if nd not in (1, 2) or any(len(v) != nd for v in out.values()):
        raise ExportError(f"{where}: {', '.join(names)} need one entry per spatial dim (1 or 2), got "
                          + ", ".join(f"{k}={list(v)}" for k, v in out.items()))
    for name, values in out.items():
        low = 0 if name == "padding" else 1
        if min(values) < low or max(values) > 4096:
            raise ExportError(f"{where}: {name} {list(values)} out of range ({low}..4096)")
    return out


def _spatial_out(spatial: tuple[int, ...], g: dict[str, tuple[int, ...]], where: str) -> tuple[int, ...]:
    dilation = g.get("dilation", (1,) * len(spatial))
    size = conv_output_size(spatial, g["kernel"], g["stride"], g["padding"], dilation)
    if min(size) < 1:
        raise ExportError(f"{where}: the {'x'.join(map(str, spatial))} input is smaller than the window "
                          f"(kernel {list(g['kernel'])}, padding {list(g['padding'])}, dilation {list(dilation)})")
    return size


def _need_map(inp: TensorInfo, nd: int, where: str) -> None:
    if len(inp.spatial) != nd:
        got = f"a {len(inp.spatial)}-D map" if inp.spatial else "flat rows"
        raise ExportError(f"{where}: needs a {nd}-D feature map [n, *spatial, channels] but gets {got}")


def window_table(spatial: tuple[int, ...], channels: int, kernel: tuple[int, ...], stride: tuple[int, ...],
                 padding: tuple[int, ...], dilation: tuple[int, ...], pad_index: int) -> np.ndarray:
    """Indices ``[P_out, C, prod(kernel)]`` into a channels-last map flattened to ``P * C`` entries.

    Entry ``[o, c, j]`` is ``p * C + c`` for the input position ``p`` that kernel tap ``j`` of output
    position ``o`` reads, or ``pad_index`` where it falls into the padding.

    Example:
        >>> window_table((3,), 1, (2,), (1,), (0,), (1,), pad_index=-1)[:, 0].tolist()
        [[0, 1], [1, 2]]
    """
    nd = len(spatial)
    out = conv_output_size(spatial, kernel, stride, padding, dilation)
    pos = np.zeros([1] * (2 * nd), dtype=np.int64)
    valid = np.ones([1] * (2 * nd), dtype=bool)
    for dim in range(nd):
        coord = (np.arange(out[dim])[:, None] * stride[dim] - padding[dim]
                 + np.arange(kernel[dim])[None, :] * dilation[dim])
        shape = [1] * (2 * nd)
        shape[dim], shape[nd + dim] = out[dim], kernel[dim]
        pos = pos * spatial[dim] + coord.reshape(shape)
        valid = valid & ((coord >= 0) & (coord < spatial[dim])).reshape(shape)
    n_out, taps = math.prod(out), math.prod(kernel)
    pos, valid = pos.reshape(n_out, taps), valid.reshape(n_out, taps)
    table = pos[:, None, :] * channels + np.arange(channels)[None, :, None]
    return np.where(valid[:, None, :], table, pad_index)


def _windows(a: np.ndarray, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
             dilation: tuple[int, ...], fill: Any) -> np.ndarray:
    """View ``[n, *out, C, *kernel]`` of the windows of a channels-last map ``a`` ``[n, *spatial, C]``."""
    nd = len(kernel)
    if any(padding):
        a = np.pad(a, [(0, 0)] + [(p, p) for p in padding] + [(0, 0)], constant_values=fill)
    span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
    view = sliding_window_view(a, span, axis=tuple(range(1, nd + 1)))
    index = ((slice(None),) + tuple(slice(None, None, s) for s in stride) + (slice(None),)
             + tuple(slice(None, None, d) for d in dilation))
    return view[index]


# ------------------------------------------------------------------------------------------ nodes


@register_node
@dataclass(eq=False, kw_only=True)
class Unflatten(Node):
    """Flat input codes in torch's ``(C, *spatial)`` order -> a channels-last map ``[n, *spatial, C]``."""

    op: ClassVar[str] = "unflatten"
    accepts: ClassVar[tuple[str, ...]] = ("codes",)
    layout: ClassVar[str] = "spatial"
    shape: np.ndarray = array_field()
    channels: int = 0

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:
        self.shape = _as_int_array(self.shape, "shape", where, 1)
        self.channels = int(self.channels)
        spatial = tuple(int(s) for s in self.shape)
        if inp.spatial:
            raise ExportError(f"{where}: unflattens flat rows, got a feature map")
        if len(spatial) not in (1, 2) or min(spatial) < 1 or self.channels < 1:
            raise ExportError(f"{where}: needs channels >= 1 and a 1-D or 2-D spatial shape, got "
                              f"{self.channels} x {list(spatial)}")
        positions = math.prod(spatial)
        if inp.size != self.channels * positions:
            raise ExportError(f"{where}: {inp.size} features do not unflatten to {self.channels} x {list(spatial)}")
        for name in ("exponent", "lo", "hi", "bits"):
            per = np.asarray(getattr(inp, name)).reshape(self.channels, positions)
            if np.any(per != per[:, :1]):
                raise ExportError(f"{where}: the input's {name} must be the same at every position of a channel "
                                  "(per-channel quantization of a feature map)")
        return _map_info(inp, lambda a: a.reshape(self.channels, positions)[:, 0], self.channels, spatial)


@register_node
@dataclass(eq=False, kw_only=True)
class Flatten(Node):
    """A channels-last map -> flat rows in torch's ``nn.Flatten`` order (channel-major)."""

    op: ClassVar[str] = "flatten"
    accepts: ClassVar[tuple[str, ...]] = ("codes", "acc")
    layout: ClassVar[str] = "spatial"

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:
        if not inp.spatial:
            raise ExportError(f"{where}: flattens a feature map, got flat rows")
        positions = math.prod(inp.spatial)
        explain = (lambda j, bits: inp.explain(j // positions, bits)) if inp.explain else None
        return _map_info(inp, lambda a: np.repeat(a, positions), inp.size * positions, (), explain)


@register_node
@dataclass(eq=False, kw_only=True)
class MaxPool(Node):
    """Max over windows of one channel, on accumulators or codes (see the module docstring)."""

    op: ClassVar[str] = "max_pool"
    accepts: ClassVar[tuple[str, ...]] = ("codes", "acc")
    layout: ClassVar[str] = "spatial"
    kernel: np.ndarray = array_field()
    stride: np.ndarray = array_field()
    padding: np.ndarray = array_field()

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:
        g = _geometry(self, ("kernel", "stride", "padding"), where)
        _need_map(inp, len(g["kernel"]), where)
        if any(2 * p > k for p, k in zip(g["padding"], g["kernel"], strict=True)):
            raise ExportError(f"{where}: padding {list(g['padding'])} must be at most half the kernel {list(g['kernel'])}")
        return _map_info(inp, lambda a: a, inp.size, _spatial_out(inp.spatial, g, where))


@register_node
@dataclass(eq=False, kw_only=True)
class GlobalAvgPool(Node):
    """``sum_p relu(acc_p)`` over all positions; the division by ``P = 2**t`` lowers the exponent by ``t``."""

    op: ClassVar[str] = "global_avg_pool"
    accepts: ClassVar[tuple[str, ...]] = ("acc",)
    layout: ClassVar[str] = "spatial"
    relu: bool = True

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:
        if not inp.spatial:
            raise ExportError(f"{where}: averages a feature map, got flat rows")
        positions = math.prod(inp.spatial)
        check_power_of_two(positions, inp.spatial, where)
        shift = positions.bit_length() - 1
        bound = inp.bound * positions
        worst = bound * inp.mult
        if inp.size and worst.max() >= ACC_MULT_LIMIT:
            j = int(np.argmax(worst))
            raise ExportError(f"{where}: the sum over {positions} positions of channel {j} can reach "
                              f"2^{math.log2(worst[j]):.1f} >= 2^53 (times its scale mantissa); "
                              + inp.explain(j, 53))
        return TensorInfo("acc", inp.size, mult=inp.mult, acc_exp=np.asarray(inp.acc_exp) - shift, bound=bound,
                          explain=inp.explain, spatial=(1,) * len(inp.spatial))


def check_power_of_two(positions: int, spatial: tuple[int, ...], where: str) -> None:
    """:class:`ExportError` unless ``positions`` is a power of two (the only exact dyadic divisor)."""
    if positions < 1 or positions & (positions - 1):
        raise ExportError(
            f"{where}: average pooling over {positions} positions ({'x'.join(map(str, spatial))}) cannot be "
            f"exported: a dyadic integer graph divides exactly only by powers of two, and {positions} is not one; "
            "use an input size whose last feature map has 2**k positions"
        )


@dataclass(eq=False, kw_only=True)
class _ConvMixin:
    """Convolution geometry and its reduction to :class:`IntegerLinear` over im2col columns."""

    layout: ClassVar[str] = "spatial"
    kernel: np.ndarray = array_field()
    stride: np.ndarray = array_field()
    padding: np.ndarray = array_field()
    dilation: np.ndarray = array_field()

    @property
    def taps(self) -> int:
        """Kernel positions per input channel, ``prod(kernel)``."""
        return int(np.prod(np.asarray(self.kernel)))

    @property
    def in_channels(self) -> int:
        """Input channels (the weight's columns over the kernel taps)."""
        return self.in_features // max(self.taps, 1)

    def column_info(self, inp: TensorInfo) -> TensorInfo:
        """The codes of the im2col columns: each channel's arrays repeated over its kernel taps."""
        taps = self.taps
        return _map_info(inp, lambda a: np.repeat(a, taps), inp.size * taps, ())

    def input_shifts(self, inp: TensorInfo) -> np.ndarray:
        """Left shift ``k_c - K`` of each im2col column (``inp`` a map, or already the columns)."""
        return super().input_shifts(self.column_info(inp) if inp.spatial else inp)

    def geometry(self) -> dict[str, tuple[int, ...]]:
        """Kernel, stride, padding and dilation as tuples."""
        return {name: tuple(int(v) for v in np.asarray(getattr(self, name)))
                for name in ("kernel", "stride", "padding", "dilation")}

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:
        g = _geometry(self, ("kernel", "stride", "padding", "dilation"), where)
        _need_map(inp, len(g["kernel"]), where)
        taps = math.prod(g["kernel"])
        label = f"{where} ('{self.name}')" if self.name else where
        n_cols = int(np.shape(self.index if isinstance(self, CodebookLinear) else self.weight)[1])
        if n_cols != inp.size * taps:
            raise ExportError(f"{label}: the weight has {n_cols} columns but {inp.size} input channels x {taps} "
                              f"kernel taps need {inp.size * taps} (groups=1 only)")
        out = super().propagate(self.column_info(inp), where)
        self._report.act_bits = _hist(inp.bits)
        out.spatial = _spatial_out(inp.spatial, g, label)
        return out


@register_node
@dataclass(eq=False, kw_only=True)
class IntegerConv(_ConvMixin, IntegerLinear):
    """Integer convolution: :class:`IntegerLinear` at every output position of the zero-padded map."""

    op: ClassVar[str] = "integer_conv"


@register_node
@dataclass(eq=False, kw_only=True)
class CodebookConv(_ConvMixin, CodebookLinear):
    """Convolution with ADQ codebook weights ``C[index + offset]`` (see :mod:`mpqat.export.codebook`)."""

    op: ClassVar[str] = "codebook_conv"


CONV_NODES: tuple[type, ...] = (IntegerConv, CodebookConv)


# ------------------------------------------------------------------------------------------ engine


@engine.register_kernel(IntegerConv)
@engine.register_kernel(CodebookConv)
def _conv_kernel(node: IntegerConv, inp: TensorInfo, out: TensorInfo, pipeline: str) -> engine.Kernel:
    g = node.geometry()
    w_eff = node.weight * (np.int64(1) << node.input_shifts(inp))[None, :]
    n_out, fan_in = w_eff.shape
    spatial_out, positions = out.spatial, math.prod(out.spatial)
    wt32 = None
    if pipeline == "int64":
        wt, bias, dtype = np.ascontiguousarray(w_eff.T), node.bias.copy(), np.int64
    else:
        if not node._report.float64_exact:
            raise engine.EngineInputError(f"layer '{node.name}' is too wide for the exact float64 path; use backend='int64'")
        wt, bias, dtype = np.ascontiguousarray(w_eff.T.astype(np.float64)), node.bias.astype(np.float64), np.float64
        if node._report.float32_exact:  # every partial sum is an integer below 2**24: exact in float32 BLAS
            wt32 = np.ascontiguousarray(w_eff.T.astype(np.float32))
    chunk = max(1, CHUNK_ELEMENTS // max(positions * fan_in, 1))

    def kernel(a: np.ndarray) -> np.ndarray:
        n = len(a)
        result = np.empty((n, *spatial_out, n_out), dtype=dtype)
        for start in range(0, n, chunk):
            part = a[start : start + chunk]
            cols = _windows(part, g["kernel"], g["stride"], g["padding"], g["dilation"], 0)
            cols = cols.reshape(len(part), positions, fan_in)  # columns in torch's (C, *kernel) order
            if wt32 is not None:
                acc = (cols.astype(np.float32) @ wt32).astype(np.float64)
            else:
                acc = cols @ wt
            acc += bias
            result[start : start + chunk] = acc.reshape(len(part), *spatial_out, n_out)
        return result

    return kernel


@engine.register_kernel(MaxPool)
def _max_pool_kernel(node: MaxPool, inp: TensorInfo, out: TensorInfo, pipeline: str) -> engine.Kernel:
    kernel_, stride, padding = (tuple(int(v) for v in getattr(node, n)) for n in ("kernel", "stride", "padding"))
    nd = len(kernel_)
    axes = tuple(range(-nd, 0))

    def kernel(a: np.ndarray) -> np.ndarray:
        fill = -np.inf if a.dtype.kind == "f" else np.iinfo(np.int64).min  # padding never wins
        view = _windows(a, kernel_, stride, padding, (1,) * nd, fill)
        return view.max(axis=axes)

    return kernel


@engine.register_kernel(GlobalAvgPool)
def _global_avg_pool_kernel(node: GlobalAvgPool, inp: TensorInfo, out: TensorInfo, pipeline: str) -> engine.Kernel:
    axes = tuple(range(1, len(inp.spatial) + 1))

    def kernel(a: np.ndarray) -> np.ndarray:
        if node.relu:
            a = np.maximum(a, 0)
        return a.sum(axis=axes, keepdims=True)  # exact: integers (carried in float64: below 2**53)

    return kernel


@engine.register_kernel(Flatten)
def _flatten_kernel(node: Flatten, inp: TensorInfo, out: TensorInfo, pipeline: str) -> engine.Kernel:
    def kernel(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(a, -1, 1)).reshape(len(a), -1)

    return kernel


@engine.register_kernel(Unflatten)
def _unflatten_kernel(node: Unflatten, inp: TensorInfo, out: TensorInfo, pipeline: str) -> engine.Kernel:
    shape = (int(node.channels), *out.spatial)

    def kernel(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(a.reshape(len(a), *shape), 1, -1))

    return kernel


# ------------------------------------------------------------------------------------------ ONNX
# Maps travel as 2-D [N * P, C] tensors (sample-major, then position), so the pointwise emitters of
# requantize / threshold_requantize apply unchanged; flat tensors are the case P = 1.


def _int64(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _gather_windows(b: _Builder, x: str, inp: TensorInfo, table: np.ndarray, fill: int, i: int) -> str:
    """``[N*P, C]`` -> ``[N, *table.shape]``: the entries the window table points at (``fill`` for padding)."""
    flat = b.op("Reshape", [x, b.const(_int64([-1, math.prod(inp.spatial) * inp.size]), f"n{i}_rows")], f"n{i}_flat")
    if np.any(table == math.prod(inp.spatial) * inp.size):
        flat = b.op("Pad", [flat, b.const(_int64([0, 0, 0, 1]), f"n{i}_pads"), b.const(_int64(fill), f"n{i}_fill")],
                    f"n{i}_padded", mode="constant")
    return b.op("Gather", [flat, b.const(table.astype(np.int64), f"n{i}_windows")], f"n{i}_gathered", axis=1)


@register_onnx(IntegerConv)
@register_onnx(CodebookConv)
def _emit_conv(b: _Builder, node: IntegerConv, inp: TensorInfo, out: TensorInfo, a: str, i: int) -> str:
    g = node.geometry()
    pad_index = math.prod(inp.spatial) * inp.size
    table = window_table(inp.spatial, inp.size, g["kernel"], g["stride"], g["padding"], g["dilation"], pad_index)
    cols = _gather_windows(b, a, inp, table.reshape(len(table), -1), 0, i)  # [N, P_out, C*taps]
    wt = shifted_weight(b, node, inp, i)
    acc = b.op("MatMul", [cols, wt], f"n{i}_dot")
    acc = b.op("Reshape", [acc, b.const(_int64([-1, out.size]), f"n{i}_maps")], f"n{i}_map")
    return b.op("Add", [acc, b.const(node.bias.astype(np.int64), f"n{i}_bias")], f"n{i}_acc")


@register_onnx(MaxPool)
def _emit_max_pool(b: _Builder, node: MaxPool, inp: TensorInfo, out: TensorInfo, a: str, i: int) -> str:
    k, s, p = (tuple(int(v) for v in getattr(node, n)) for n in ("kernel", "stride", "padding"))
    pad_index = math.prod(inp.spatial) * inp.size
    table = window_table(inp.spatial, inp.size, k, s, p, (1,) * len(k), pad_index)
    windows = _gather_windows(b, a, inp, table, -(2**62), i)  # [N, P_out, C, taps]
    pooled = b.op("ReduceMax", [windows], f"n{i}_max", axes=[3], keepdims=0)
    return b.op("Reshape", [pooled, b.const(_int64([-1, out.size]), f"n{i}_maps")], f"n{i}_pooled")


@register_onnx(GlobalAvgPool)
def _emit_global_avg_pool(b: _Builder, node: GlobalAvgPool, inp: TensorInfo, out: TensorInfo, a: str, i: int) -> str:
    if node.relu:
        a = b.op("Max", [a, b.const(_int64(0), f"n{i}_zero")], f"n{i}_relu")
    maps = b.op("Reshape", [a, b.const(_int64([-1, math.prod(inp.spatial), inp.size]), f"n{i}_shape")], f"n{i}_maps")
    return b.op("ReduceSum", [maps, b.const(_int64([1]), f"n{i}_axes")], f"n{i}_sum", keepdims=0)


@register_onnx(Flatten)
def _emit_flatten(b: _Builder, node: Flatten, inp: TensorInfo, out: TensorInfo, a: str, i: int) -> str:
    positions = math.prod(inp.spatial)
    maps = b.op("Reshape", [a, b.const(_int64([-1, positions, inp.size]), f"n{i}_shape")], f"n{i}_maps")
    first = b.op("Transpose", [maps], f"n{i}_channel_major", perm=[0, 2, 1])
    return b.op("Reshape", [first, b.const(_int64([-1, out.size]), f"n{i}_rows")], f"n{i}_flat")


@register_onnx(Unflatten)
def _emit_unflatten(b: _Builder, node: Unflatten, inp: TensorInfo, out: TensorInfo, a: str, i: int) -> str:
    positions = math.prod(out.spatial)
    maps = b.op("Reshape", [a, b.const(_int64([-1, out.size, positions]), f"n{i}_shape")], f"n{i}_maps")
    last = b.op("Transpose", [maps], f"n{i}_channels_last", perm=[0, 2, 1])
    return b.op("Reshape", [last, b.const(_int64([-1, out.size]), f"n{i}_rows")], f"n{i}_map")


# ------------------------------------------------------------------------------------------ converters


def _tuple(value: Any, nd: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, tuple | list) else (int(value),) * nd


def _conv_padding(name: str, layer: nn.Module) -> tuple[int, ...]:
    nd = len(layer.kernel_size)
    if layer.padding == "valid":
        return (0,) * nd
    if layer.padding == "same":
        total = [d * (k - 1) for k, d in zip(layer.kernel_size, layer.dilation, strict=True)]
        if any(t % 2 for t in total):
            raise ExportError(f"layer '{name}': padding='same' with an even kernel pads asymmetrically; "
                              "the integer export supports symmetric padding only")
        return tuple(t // 2 for t in total)
    return _tuple(layer.padding, nd)


@register_converter(QuantConv1d)
@register_converter(QuantConv2d)
def _convert_conv(name: str, layer: QuantConv1d | QuantConv2d, b: Builder) -> None:
    nd = len(layer.kernel_size)
    if layer.groups != 1:
        raise ExportError(f"layer '{name}': grouped convolutions (groups={layer.groups}) are not supported by the "
                          "integer export; only groups=1")
    if len(b.shape) != nd + 1 or b.shape[0] != layer.in_channels:
        got = f"shape {b.shape}" if b.shape else "flat rows"
        raise ExportError(f"layer '{name}': a {nd}-D conv needs a ({layer.in_channels}, {'x'.join(['*'] * nd)}) feature "
                          f"map but gets {got}; start the model with nn.Unflatten(1, (C, ...)) as LeNet5/CNN1d do")
    spatial = b.shape[1:]
    padding = _conv_padding(name, layer)
    first = b.state == "float"
    start = len(b.nodes)
    _convert_quant_linear(name, layer, b)  # appends the input-codes node and the IntegerLinear/CodebookLinear
    act, lin = b.nodes[start:]
    if first:  # quantize the flat input per feature (each channel's step repeated), then unflatten
        positions = math.prod(spatial)
        b.nodes[start] = QuantizeInput(exponent=np.repeat(act.exponent, positions), bits=np.repeat(act.bits, positions),
                                       signed=act.signed, relu=act.relu)
        b.nodes.insert(start + 1, Unflatten(shape=np.array(spatial), channels=layer.in_channels))
    conv_type = {IntegerLinear: IntegerConv, CodebookLinear: CodebookConv}.get(type(lin))
    if conv_type is None:
        raise ExportError(f"layer '{name}': its weight quantizer exports to '{lin.op}', which has no conv form")
    fields = {f.name: getattr(lin, f.name) for f in dataclasses.fields(lin) if f.init}
    b.nodes[-1] = conv_type(**fields, kernel=np.array(layer.kernel_size), stride=np.array(layer.stride),
                            padding=np.array(padding), dilation=np.array(layer.dilation))
    out = conv_output_size(spatial, layer.kernel_size, layer.stride, padding, layer.dilation)
    b.shape = (layer.out_channels, *out)


def _need_acc_map(name: str, module: nn.Module, b: Builder, nd: int) -> None:
    if b.state != "acc":
        raise ExportError(f"layer '{name}' ({type(module).__name__}): pooling is supported only after a quantized "
                          "conv, not on the model input")
    if len(b.shape) != nd + 1:
        raise ExportError(f"layer '{name}' ({type(module).__name__}) needs a {nd}-D feature map, got "
                          f"{('shape ' + str(b.shape)) if b.shape else 'flat rows'}")


@register_converter(nn.MaxPool1d)
@register_converter(nn.MaxPool2d)
def _convert_max_pool(name: str, module: nn.MaxPool1d | nn.MaxPool2d, b: Builder) -> None:
    nd = 1 if isinstance(module, nn.MaxPool1d) else 2
    _need_acc_map(name, module, b, nd)
    kernel = _tuple(module.kernel_size, nd)
    stride = _tuple(module.stride if module.stride is not None else module.kernel_size, nd)
    padding = _tuple(module.padding, nd)
    if _tuple(module.dilation, nd) != (1,) * nd or module.ceil_mode or module.return_indices:
        raise ExportError(f"layer '{name}': max pooling with dilation, ceil_mode or return_indices is not supported "
                          "by the integer export")
    b.nodes.append(MaxPool(kernel=np.array(kernel), stride=np.array(stride), padding=np.array(padding)))
    b.shape = (b.shape[0], *conv_output_size(b.shape[1:], kernel, stride, padding, (1,) * nd))


@register_converter(nn.AdaptiveAvgPool1d)
@register_converter(nn.AdaptiveAvgPool2d)
def _convert_avg_pool(name: str, module: nn.Module, b: Builder) -> None:
    nd = 1 if isinstance(module, nn.AdaptiveAvgPool1d) else 2
    if _tuple(module.output_size, nd) != (1,) * nd:
        raise ExportError(f"layer '{name}': only global average pooling (output_size=1) is supported, got "
                          f"{module.output_size}")
    _need_acc_map(name, module, b, nd)
    check_power_of_two(math.prod(b.shape[1:]), b.shape[1:], f"layer '{name}'")
    relu, b.relu = b.relu, False  # mean(relu(x)) != relu(mean(x)): the pending ReLU goes first
    b.nodes.append(GlobalAvgPool(relu=relu))
    b.shape = (b.shape[0],) + (1,) * nd


@register_converter(nn.Flatten)
def _convert_flatten(name: str, module: nn.Flatten, b: Builder) -> None:
    if module.start_dim != 1 or module.end_dim != -1:
        raise ExportError(f"layer '{name}': only nn.Flatten(start_dim=1, end_dim=-1) is supported")
    if b.shape and b.state == "acc":
        b.nodes.append(Flatten())
    b.shape = ()  # on the model input: undoes a pending nn.Unflatten


@register_converter(nn.Unflatten)
def _convert_unflatten(name: str, module: nn.Unflatten, b: Builder) -> None:
    shape = tuple(int(s) for s in module.unflattened_size)
    if b.state != "float" or b.shape or module.dim not in (1, -1):
        raise ExportError(f"layer '{name}': nn.Unflatten is supported only on the model input, flat rows to (C, ...)")
    if len(shape) not in (2, 3):
        raise ExportError(f"layer '{name}': unflattens to {shape}; need (C, L) or (C, H, W)")
    b.shape = shape


@register_converter(nn.BatchNorm1d)
@register_converter(nn.BatchNorm2d)
def _refuse_batchnorm(name: str, module: nn.Module, b: Builder) -> None:
    raise ExportError(f"layer '{name}': a BatchNorm that was not folded into the conv before it cannot be exported "
                      "(mpqat.quantize folds every BN that directly follows a conv)")


@register_converter(ResNet)
@register_converter(BasicBlock)
def _refuse_resnet(name: str, module: nn.Module, b: Builder) -> None:
    raise ExportError(
        f"'{name}' ({type(module).__name__}) cannot be exported: the integer graph is a chain of nodes and residual adds "
        "(out + shortcut(x)) are not in the IR yet (its 7x7 global average pool, over 49 positions, is not a power of "
        "two either); evaluate ResNets with `mpqat eval`, whose eval path is exact on the integer grid"
    )


# ------------------------------------------------------------------------------------------ C


def _c_geometry(spatial: tuple[int, ...], values: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """1-D geometry as 2-D with a height of 1 (so one loop nest serves both)."""
    if len(spatial) == 2:
        return {"in": tuple(spatial), **values}
    fill = {"kernel": 1, "stride": 1, "padding": 0, "dilation": 1}
    return {"in": (1, spatial[0]), **{k: (fill[k], v[0]) for k, v in values.items()}}


def conv_graph_to_c(graph: Any, directory: str | Path, harness: bool = False) -> list[Path]:
    """C99 ``model.h``/``model.c`` (and ``main.c``) for a graph with feature-map nodes; see :mod:`mpqat.export.c_export`.

    Same API and arithmetic as the MLP export (int32 codes, int32 or int64 accumulators as the bound
    says, the same requantize and threshold helpers); maps are channels-last buffers and convolutions,
    pools and (un)flattening are plain loops. Conv weights are stored unpacked (the smallest C integer
    type that holds them); the linear layers keep the packed bit streams. Buffers live on the stack.

    Example:
        >>> import torch, tempfile
        >>> from mpqat import quantize, Uniform
        >>> from mpqat.models import LeNet5
        >>> from mpqat.export import export
        >>> model = quantize(LeNet5(10, (1, 16, 16)), Uniform(w_bits=4, a_bits=4))
        >>> _ = model.train()(torch.randn(8, 256))
        >>> sorted(p.name for p in export(model, torch.randn(4, 256)).to_c(tempfile.mkdtemp()))
        ['model.c', 'model.h']
    """
    from mpqat.export import c_export as cx

    nodes, infos = graph.nodes, graph.infos
    if not isinstance(nodes[0], QuantizeInput) or not isinstance(nodes[-1], DequantizeOutput):
        raise ExportError("C export supports graphs from quantize_input to dequantize_output")
    w = cx._CWriter(graph)
    w.quantize_input(nodes[0], infos[1])
    decls: list[str] = []
    steps: list[str] = []
    current, current_type = "in", "int32_t"
    fused: set[int] = set()

    def buffer(index: int, ctype: str) -> str:
        info = infos[index + 1]
        name = f"h{index}"
        decls.append(f"    {ctype} {name}[{max(info.size * math.prod(info.spatial), 1)}];")
        return name

    for index, node in enumerate(nodes):
        if index == 0 or index in fused:
            continue
        inp, out = infos[index], infos[index + 1]
        p = f"N{index}"
        if isinstance(node, CONV_NODES):
            dst = buffer(index, "int64_t")
            w.data.append(f"/* node {index} '{node.name}': conv, weight bits {node._report.weight_bits} */\n")
            w.funcs.append(_c_conv(w, cx, index, node, inp, out))
            steps.append(f"    mpq_conv{index}({current}, {dst});")
            current, current_type = dst, "int64_t"
        elif isinstance(node, IntegerLinear):
            after = nodes[index + 1]
            w.linear(index, node, inp, out, after, infos[index + 2])
            fused.add(index + 1)
            if isinstance(after, DequantizeOutput):
                steps.append(f"    mpq_layer{index}({current}, acc);")
                current = "acc"
            else:
                dst = buffer(index + 1, "int32_t")
                steps.append(f"    mpq_layer{index}({current}, {dst});")
                current, current_type = dst, "int32_t"
        elif isinstance(node, Requantize | ThresholdRequantize):
            dst = buffer(index, "int32_t")
            steps.append(_c_pointwise(w, cx, p, node, inp, out, current, dst))
            current, current_type = dst, "int32_t"
        elif isinstance(node, MaxPool):
            dst = buffer(index, current_type)
            g = _c_geometry(inp.spatial, {k: tuple(int(v) for v in getattr(node, k))
                                          for k in ("kernel", "stride", "padding")})
            w.funcs.append(_c_max_pool(index, g, inp.size, _c_geometry(out.spatial, {})["in"], current_type))
            steps.append(f"    mpq_pool{index}({current}, {dst});")
            current = dst
        elif isinstance(node, GlobalAvgPool):
            dst = buffer(index, "int64_t")
            steps.append(f"""    for (c = 0; c < {inp.size}L; ++c) {{
        int64_t s = 0;
        for (i = 0; i < {math.prod(inp.spatial)}L; ++i) {{
            int64_t v = {current}[i * {inp.size}L + c];
            {'if (v < 0) v = 0;' if node.relu else ''}
            s += v;
        }}
        {dst}[c] = s;
    }}""")
            current = dst
        elif isinstance(node, Flatten | Unflatten):
            dst = buffer(index, current_type)
            channels, positions = (inp.size, math.prod(inp.spatial)) if isinstance(node, Flatten) else (
                out.size, math.prod(out.spatial))
            src_at, dst_at = ("i * {C}L + c", "c * {P}L + i") if isinstance(node, Flatten) else ("c * {P}L + i", "i * {C}L + c")
            steps.append(f"    for (c = 0; c < {channels}L; ++c)\n        for (i = 0; i < {positions}L; ++i) "
                         f"{dst}[{dst_at.format(C=channels, P=positions)}] = {current}[{src_at.format(C=channels, P=positions)}];")
            current = dst
        elif isinstance(node, DequantizeOutput):
            steps.append(f"    for (i = 0; i < {graph.output_dim}L; ++i) acc[i] = (int64_t){current}[i];")
        else:
            raise ExportError(f"C export: node type '{node.op}' has no C emitter")
    has_linear = any(type(n) in (IntegerLinear, CodebookLinear) for n in nodes)
    d = graph.input_dim
    predict = f"""
void mpqat_predict_int(const int32_t *codes, int64_t *acc)
{{
    int32_t in[{d}];
{chr(10).join(decls)}
    long i, c = 0;
    for (i = 0; i < {d}L; ++i) in[i] = codes[i] < IN_LO[i] ? IN_LO[i] : (codes[i] > IN_HI[i] ? IN_HI[i] : codes[i]);
{chr(10).join(steps)}
    (void)c;
}}

int mpqat_predict(const float *x, double *logits)
{{
    int32_t codes[{d}];
    int64_t acc[{graph.output_dim}];
    int j;
    if (mpqat_quantize_input(x, codes) != 0) return -1;
    mpqat_predict_int(codes, acc);
    for (j = 0; j < {graph.output_dim}; ++j) logits[j] = (double)acc[j] * mpqat_output_scale[j];
    return 0;
}}
"""
    scales = DequantizeOutput.scales(infos[-2])
    source = (
        "/* Generated by mpqat. C99, integer-only except the input quantization and output scaling. */\n"
        '#include "model.h"\n\n'
        + (cx._RUNTIME.format(lclip=LSHIFT_CLIP) if has_linear else f"#define MPQ_LCLIP ((int64_t){LSHIFT_CLIP})\n")
        + (cx._REQUANT_RUNTIME.format(lclip=LSHIFT_CLIP) if any(isinstance(n, Requantize) for n in nodes) else "")
        + (cx._THRESHOLD_RUNTIME if any(isinstance(n, ThresholdRequantize) for n in nodes) else "")
        + "\n/* ---- parameters ---- */\n"
        + "".join(w.data)
        + "const double mpqat_output_scale[MPQAT_N_OUTPUTS] = {"
        + ", ".join(float(s).hex() for s in scales) + "};\n"
        + "".join(w.funcs)
        + predict
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "model.h", directory / "model.c"]
    atomic_write_text(paths[0], cx._header(graph))
    atomic_write_text(paths[1], source)
    if harness:
        paths.append(directory / "main.c")
        atomic_write_text(paths[2], cx._HARNESS)
    return paths


def _c_conv(w: Any, cx: Any, index: int, node: IntegerConv, inp: TensorInfo, out: TensorInfo) -> str:
    p = f"N{index}"
    acc_t = "int32_t" if node._report.accumulator == "int32" else "int64_t"
    g = _c_geometry(inp.spatial, node.geometry())
    (h, wd), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g["in"], g["kernel"], g["stride"], g["padding"], g["dilation"]
    oh, ow = _c_geometry(out.spatial, {})["in"]
    channels, n_out, fan_in = inp.size, node.out_features, node.in_features
    # per-channel input shift (0 for a channel whose columns are all dead, as in IntegerLinear)
    shift = node.input_shifts(inp).reshape(channels, -1).max(axis=1, initial=0)
    w.data.append(cx._array(f"{p}_W", node.weight))
    w.data.append(cx._array(f"{p}_B", node.bias))
    has_shift = bool(np.any(shift != 0))
    if has_shift:
        w.data.append(cx._array(f"{p}_SH", shift, "uint8_t"))
    x_line = (f"x[i] = ({acc_t})a[i] * (({acc_t})1 << {p}_SH[i % {channels}L]);" if has_shift else f"x[i] = ({acc_t})a[i];")
    return f"""
/* {inp.size} x {'x'.join(map(str, inp.spatial))} -> {n_out} x {'x'.join(map(str, out.spatial))}, accumulator {acc_t} */
static void mpq_conv{index}(const int32_t *a, int64_t *out)
{{
    {acc_t} x[{max(channels * h * wd, 1)}];
    long i, oy, ox, o, c, ky, kx;
    for (i = 0; i < {channels * h * wd}L; ++i) {x_line}
    for (oy = 0; oy < {oh}L; ++oy)
        for (ox = 0; ox < {ow}L; ++ox)
            for (o = 0; o < {n_out}L; ++o) {{
                {acc_t} s = ({acc_t}){p}_B[o];
                for (c = 0; c < {channels}L; ++c)
                    for (ky = 0; ky < {kh}L; ++ky) {{
                        long iy = oy * {sh}L - {ph}L + ky * {dh}L;
                        if (iy < 0 || iy >= {h}L) continue;
                        for (kx = 0; kx < {kw}L; ++kx) {{
                            long ix = ox * {sw}L - {pw}L + kx * {dw}L;
                            if (ix < 0 || ix >= {wd}L) continue;
                            s += ({acc_t}){p}_W[o * {fan_in}L + (c * {kh}L + ky) * {kw}L + kx] * x[(iy * {wd}L + ix) * {channels}L + c];
                        }}
                    }}
                out[(oy * {ow}L + ox) * {n_out}L + o] = (int64_t)s;
            }}
}}
"""


def _c_max_pool(index: int, g: dict[str, tuple[int, int]], channels: int, out_hw: tuple[int, int], ctype: str) -> str:
    (h, wd), (kh, kw), (sh, sw), (ph, pw) = g["in"], g["kernel"], g["stride"], g["padding"]
    oh, ow = out_hw
    return f"""
static void mpq_pool{index}(const {ctype} *a, {ctype} *out)
{{
    long oy, ox, c, ky, kx;
    for (oy = 0; oy < {oh}L; ++oy)
        for (ox = 0; ox < {ow}L; ++ox)
            for (c = 0; c < {channels}L; ++c) {{
                {ctype} m = 0;
                int seen = 0;
                for (ky = 0; ky < {kh}L; ++ky) {{
                    long iy = oy * {sh}L - {ph}L + ky;
                    if (iy < 0 || iy >= {h}L) continue;
                    for (kx = 0; kx < {kw}L; ++kx) {{
                        long ix = ox * {sw}L - {pw}L + kx;
                        {ctype} v;
                        if (ix < 0 || ix >= {wd}L) continue;
                        v = a[(iy * {wd}L + ix) * {channels}L + c];
                        if (!seen || v > m) m = v;
                        seen = 1;
                    }}
                }}
                out[(oy * {ow}L + ox) * {channels}L + c] = m;
            }}
}}
"""


def _c_pointwise(w: Any, cx: Any, p: str, node: Node, inp: TensorInfo, out: TensorInfo, src: str, dst: str) -> str:
    """Loop of a requantize / threshold node that no linear layer fused (after a pool or a flatten)."""
    channels, count = inp.size, inp.size * math.prod(inp.spatial)
    w.data.append(cx._array(f"{p}_M", inp.mult))
    if isinstance(node, ThresholdRequantize):
        table = node.integer_thresholds()
        levels = table.shape[1]
        w.data.append(cx._array(f"{p}_T", table, "int64_t"))
        call = (f"mpq_threshold((int64_t){src}[i] * (int64_t){p}_M[c], {p}_T + c * {levels}L, {levels}, "
                f"{int(bool(node.relu))})")
    else:
        w.data.append(cx._array(f"{p}_S", node.shifts(inp), "int8_t"))
        w.data.append(cx._array(f"{p}_LO", out.lo, "int32_t"))
        w.data.append(cx._array(f"{p}_HI", out.hi, "int32_t"))
        call = f"mpq_requant((int64_t){src}[i], (int64_t){p}_M[c], (int){p}_S[c], {p}_LO[c], {p}_HI[c])"
    return f"    for (i = 0; i < {count}L; ++i) {{\n        c = i % {channels}L;\n        {dst}[i] = {call};\n    }}"


__all__ = [
    "CodebookConv",
    "Flatten",
    "GlobalAvgPool",
    "IntegerConv",
    "MaxPool",
    "Unflatten",
    "check_power_of_two",
    "conv_graph_to_c",
    "window_table",
]
