"""``CodebookLinear``: an integer linear layer whose weights are b-bit indices into an integer codebook.

The node stores what an ADQ layer (:class:`~mpqat.quant.codebook.CodebookWeightQuantizer`) needs at
inference time and nothing more:

* ``index`` ``[out, in]``: signed b-bit indices, bit-packed in the ``.mpq`` file like any weight
  matrix (two's complement, rows grouped by width; ``index_bits`` per row, all equal for one layer);
* ``codebook`` ``[L]``: the integer codewords ``C`` (``|C| <= 2**15 - 1``), ``offset``: the position
  of index 0 in it, so that the weight is ``w_ij = C[index_ij + offset]``;
* ``bias``, ``mult``, ``scale_exp``, ``acc_exponent``: as :class:`~mpqat.export.ir.IntegerLinear`
  (one dyadic scale for the layer, repeated per row).

Semantics: exactly those of :class:`~mpqat.export.ir.IntegerLinear` with ``weight = C[index + offset]``
(int64 accumulators, same bound analysis, same requantization after it). :class:`CodebookLinear`
is a subclass that expands the weights when the graph is built, so the NumPy engine (both
pipelines), the accumulator checks and the C export (which packs the expanded codewords) work
unchanged; the ONNX export ``Gather``s the codebook with the indices. A deployment kernel can
instead bin-accumulate the input per codeword and do ``L`` multiplies per output (METHODS §2.4).

Example:
    >>> import numpy as np
    >>> from mpqat.export.ir import IntegerGraph, QuantizeInput, DequantizeOutput
    >>> node = CodebookLinear(index=np.array([[-1, 0, 1]]), index_bits=np.array([2]), codebook=np.array([-7, 0, 5]),
    ...                       offset=1, bias=np.array([0]), mult=np.array([1]), scale_exp=np.array([0]))
    >>> g = IntegerGraph([QuantizeInput(np.array([0, 0, 0]), np.array([8, 8, 8]), signed=True), node, DequantizeOutput()])
    >>> g.run(np.array([[1.0, 2.0, 3.0]], dtype=np.float32)).tolist()     # -7*1 + 0*2 + 5*3
    [[8.0]]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mpqat.errors import ExportError
from mpqat.export import engine
from mpqat.export.convert import register_weight_node
from mpqat.export.ir import (
    MAX_WEIGHT_BITS,
    IntegerLinear,
    Node,
    TensorInfo,
    _as_int_array,
    _hist,
    array_field,
    register_node,
)
from mpqat.export.onnx_export import _Builder, register_onnx
from mpqat.quant.codebook import CodebookWeightQuantizer

#: Largest codeword magnitude a node accepts (signed 16-bit).
MAX_CODEWORD = 2**15 - 1


@register_node
@dataclass(eq=False, kw_only=True)
class CodebookLinear(IntegerLinear):
    """Integer linear layer with codebook weights ``C[index + offset]`` (see the module docstring)."""

    op: ClassVar[str] = "codebook_linear"
    weight: np.ndarray = field(init=False, default=None, repr=False)  # derived: C[index + offset]
    weight_bits: np.ndarray = field(init=False, default=None, repr=False)  # derived: codeword width
    index: np.ndarray = array_field("packed", bits="index_bits")
    index_bits: np.ndarray = array_field()
    codebook: np.ndarray = array_field()
    offset: int = 0

    @property
    def in_features(self) -> int:
        return int(np.shape(self.index)[1])

    @property
    def out_features(self) -> int:
        return int(np.shape(self.index)[0])

    def storage_bits(self) -> np.ndarray:
        """Bits stored per weight of each row: the index width."""
        return self.index_bits

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:
        label = f"{where} ('{self.name}')" if self.name else where
        self.index = _as_int_array(self.index, "index", label, 2)
        out = self.index.shape[0]
        self.index_bits = _as_int_array(self.index_bits, "index_bits", label, 1)
        self.codebook = _as_int_array(self.codebook, "codebook", label, 1)
        self.offset = int(self.offset)
        if self.index_bits.shape != (out,):
            raise ExportError(f"{label}: 'index_bits' needs one entry per output row ({out}), got {self.index_bits.shape}")
        if out and (self.index_bits.min() < 2 or self.index_bits.max() > MAX_WEIGHT_BITS):
            raise ExportError(f"{label}: codebook index bits must be in [2, {MAX_WEIGHT_BITS}], got {_hist(self.index_bits)}")
        size = self.codebook.size
        if size == 0 or np.abs(self.codebook).max() > MAX_CODEWORD:
            raise ExportError(f"{label}: the codebook must hold 1..{2**MAX_WEIGHT_BITS} integers with |C| <= {MAX_CODEWORD}")
        half = np.int64(1) << (self.index_bits - 1)
        bad = (self.index < -half[:, None]) | (self.index >= half[:, None])
        pos = self.index + self.offset
        bad |= (pos < 0) | (pos >= size)
        if bad.any():
            j, i = (int(v) for v in np.argwhere(bad)[0])
            raise ExportError(
                f"{label}: index {int(self.index[j, i])} at row {j}, column {i} is outside its {int(self.index_bits[j])}-bit "
                f"range or points outside the codebook of {size} entries (offset {self.offset})"
            )
        self.weight = self.codebook[pos]
        top = int(np.abs(self.codebook).max())
        self.weight_bits = np.full(out, max(2, top.bit_length() + 1), dtype=np.int64)
        result = super().propagate(inp, where)
        self._report.weight_bits = _hist(self.index_bits)
        return result


# ------------------------------------------------------------------------------------------ engine

engine.register_kernel(CodebookLinear)(engine._integer_linear)


# ------------------------------------------------------------------------------------------ ONNX


@register_onnx(CodebookLinear)
def _emit_codebook_linear(b: _Builder, node: CodebookLinear, inp: TensorInfo, out: TensorInfo, a: str, i: int) -> str:
    t = b.onnx.TensorProto
    pos = (node.index + node.offset).T
    dtype = np.uint8 if pos.max(initial=0) < 256 else np.int32
    idx = b.op("Cast", [b.const(pos.astype(dtype), f"n{i}_index")], f"n{i}_idx64", to=t.INT64)
    wt = b.op("Gather", [b.const(node.codebook.astype(np.int64), f"n{i}_codebook"), idx], f"n{i}_w64", axis=0)
    shift = node.input_shifts(inp)
    if np.any(shift != 0):
        wt = b.op("Mul", [wt, b.const((np.int64(1) << shift)[:, None].astype(np.int64), f"n{i}_colshift")], f"n{i}_weff")
    acc = b.op("MatMul", [a, wt], f"n{i}_dot")
    return b.op("Add", [acc, b.const(node.bias.astype(np.int64), f"n{i}_bias")], f"n{i}_acc")


# ------------------------------------------------------------------------------------------ converter


@register_weight_node(CodebookWeightQuantizer)
def codebook_node(wq: nn.Module, weight: torch.Tensor, fields: dict[str, Any]) -> Node:
    """The :class:`CodebookLinear` of a layer quantized by ``wq`` (``fields``: bias, mult, scale_exp, ...)."""
    with torch.no_grad():
        index = wq.indices(weight.detach().double()).numpy().astype(np.int64) - wq.index_offset()
        codebook = wq.codebook_int().numpy().astype(np.int64)
    rows = index.shape[0]
    return CodebookLinear(index=index, index_bits=np.full(rows, wq.index_bits, dtype=np.int64), codebook=codebook,
                          offset=wq.index_offset(), **fields)
