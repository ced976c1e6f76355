"""``ThresholdRequantize``: accumulators -> unsigned codes by counting learned thresholds (N2UQ / ADQ).

What :class:`~mpqat.quant.n2uq.ThresholdActQuantizer` computes, in integers. With the incoming
accumulator value ``x_j = acc_j * m_j * 2**(K - e_j)`` (see :mod:`mpqat.export.ir`) the code is

    ``a'_j = #{k : T_jk <= relu(x_j)}``  in ``[0, 2**b - 1]``,

where ``T_jk = thr_mantissa[j, k] * 2**thr_exponent[j, k]`` are the model's float64 thresholds,
stored exactly as integer mantissa/exponent pairs (one row ``[1, L]`` when every channel shares them). When the graph is built they are folded into
integer thresholds on ``v_j = acc_j * m_j``: ``t_jk = ceil(T_jk * 2**(e_j - K))``, because for an
integer ``v``, ``T <= v * 2**(K-e)`` holds exactly when ``ceil(T * 2**(e-K)) <= v``. Inference then
only compares integers (a FINN-style multi-threshold unit): no shift, no rounding. The output codes
stand for ``a'_j * 2**exponent_j`` like any other codes, so the next layer is an ordinary
:class:`~mpqat.export.ir.IntegerLinear` (or codebook) node.

Example:
    >>> import numpy as np
    >>> from mpqat.export.ir import IntegerGraph, QuantizeInput, IntegerLinear, DequantizeOutput
    >>> g = IntegerGraph([QuantizeInput(np.array([0]), np.array([8]), signed=True),
    ...     IntegerLinear(np.array([[1]]), np.array([8]), np.array([0]), np.array([1]), np.array([0]), acc_exponent=0),
    ...     ThresholdRequantize(exponent=np.array([0]), bits=np.array([2]),               # thresholds 0.5, 2, 7
    ...                         thr_mantissa=np.array([[1, 1, 7]]), thr_exponent=np.array([[-1, 1, 0]])),
    ...     IntegerLinear(np.array([[1]]), np.array([8]), np.array([0]), np.array([1]), np.array([0]), acc_exponent=0),
    ...     DequantizeOutput()])
    >>> g.run(np.array([[-3.0], [0.0], [1.0], [2.0], [6.0], [9.0]], dtype=np.float32)).ravel().tolist()
    [0.0, 0.0, 1.0, 2.0, 2.0, 3.0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from mpqat.errors import ExportError
from mpqat.export import engine
from mpqat.export.convert import Builder, register_act_node
from mpqat.export.ir import REQUANT_LIMIT, ActivationQuantizer, Node, TensorInfo, _as_int_array, array_field, register_node
from mpqat.export.onnx_export import _Builder, register_onnx
from mpqat.quant.n2uq import ThresholdActQuantizer

#: Integer thresholds are clamped to +-2**53: every ``|acc * m|`` is below 2**52, so the counts do not change.
THRESHOLD_CLIP = 2**53


def dyadic_split(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``values == mantissa * 2**exponent`` with integer mantissas ``|m| < 2**53`` (float64 in).

    Example:
        >>> dyadic_split(np.array([0.75, -3.0, 0.0]))
        (array([ 3, -3,  0]), array([-2,  0,  0]))
    """
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ExportError("thresholds must be finite")
    frac, exp = np.frexp(values)
    mant = (frac * 2.0**53).astype(np.int64)
    exp = exp.astype(np.int64) - 53
    for _ in range(53):  # strip trailing zero bits: small integers in the file
        even = (mant % 2 == 0) & (mant != 0)
        if not even.any():
            break
        mant = np.where(even, mant // 2, mant)
        exp = np.where(even, exp + 1, exp)
    return mant, np.where(mant == 0, 0, exp)


def _ceil_shift(mantissa: int, shift: int) -> int:
    """``ceil(mantissa * 2**shift)`` for Python ints, clamped to ``+-THRESHOLD_CLIP``."""
    if shift >= 0:
        value = mantissa << min(shift, 128)
    else:
        value = -((-mantissa) >> min(-shift, 128))
    return max(-THRESHOLD_CLIP, min(THRESHOLD_CLIP, value))


@register_node
@dataclass(eq=False, kw_only=True)
class ThresholdRequantize(ActivationQuantizer):
    """Accumulators -> unsigned codes ``#{T_jk <= relu(x_j)}`` (see the module docstring)."""

    op: ClassVar[str] = "threshold_requantize"
    accepts: ClassVar[tuple[str, ...]] = ("acc",)
    signed: bool = False
    relu: bool = True
    thr_mantissa: np.ndarray = array_field()
    thr_exponent: np.ndarray = array_field()

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:
        if self.signed:
            raise ExportError(f"{where}: threshold requantization produces unsigned codes (signed=false)")
        out = self.codes_info(inp.size, where)
        self.thr_mantissa = _as_int_array(self.thr_mantissa, "thr_mantissa", where, 2)
        self.thr_exponent = _as_int_array(self.thr_exponent, "thr_exponent", where, 2)
        widths = np.unique(self.bits)
        if inp.size and widths.size != 1:
            raise ExportError(f"{where}: every channel needs the same bit-width, got {sorted(widths.tolist())}")
        levels = (1 << int(widths[0])) - 1 if inp.size else 0
        shape = (inp.size, levels)
        stored = self.thr_mantissa.shape
        if stored not in (shape, (1, levels)) or self.thr_exponent.shape != stored:
            raise ExportError(f"{where}: thresholds need shape {shape} or (1, {levels}) (channels x 2**bits - 1), "
                              f"got {self.thr_mantissa.shape} and {self.thr_exponent.shape}")
        if self.thr_mantissa.size and (np.abs(self.thr_mantissa).max() >= 2**53 or np.abs(self.thr_exponent).max() > 1100):
            raise ExportError(f"{where}: threshold mantissas must be below 2**53 and exponents within +-1100")
        values = np.ldexp(self.thr_mantissa.astype(np.float64), self.thr_exponent)
        if not np.all(np.isfinite(values)) or np.any(np.diff(values, axis=1) < 0):
            raise ExportError(f"{where}: thresholds must be finite and non-decreasing along each channel")
        worst = inp.bound * inp.mult
        if inp.size and worst.max() >= REQUANT_LIMIT:
            raise ExportError(inp.explain(int(np.argmax(worst)), 52) + f" (checked where {where} requantizes it)")
        shift = -np.asarray(inp.acc_exp, dtype=np.int64).reshape(-1)  # e_j - K
        rows = self.thr_mantissa.shape[0]
        self._thresholds = np.array(
            [[_ceil_shift(int(m), int(e) + int(shift[j])) for m, e in
              zip(self.thr_mantissa[j % rows], self.thr_exponent[j % rows], strict=True)] for j in range(inp.size)],
            dtype=np.int64,
        ).reshape(shape)
        return out

    def integer_thresholds(self) -> np.ndarray:
        """``t_jk`` on ``v_j = acc_j * m_j`` (int64 ``[channels, levels]``), set when the graph is built."""
        return self._thresholds


@engine.register_kernel(ThresholdRequantize)
def _threshold_kernel(node: ThresholdRequantize, inp: TensorInfo, out: TensorInfo, pipeline: str) -> engine.Kernel:
    as_float = pipeline == "float"
    table = node.integer_thresholds().T  # [levels, channels]
    table = np.ascontiguousarray(table.astype(np.float64) if as_float else table)
    mult = inp.mult.astype(np.float64) if as_float else inp.mult.astype(np.int64)
    bits = int(node.bits[0]) if node.bits.size else 0
    cols = np.arange(table.shape[1])

    def kernel(acc: np.ndarray) -> np.ndarray:
        v = acc * mult  # exact: |acc * m| < 2**52 (checked when the graph is built)
        if node.relu:
            np.maximum(v, 0, out=v)
        code = np.zeros(v.shape, dtype=np.int64)
        for bit in reversed(range(bits)):  # binary search over the sorted thresholds
            cand = code + (1 << bit)
            code = np.where(v >= table[cand - 1, cols], cand, code)
        return code.astype(np.float64) if as_float else code

    return kernel


@register_onnx(ThresholdRequantize)
def _emit_threshold(b: _Builder, node: ThresholdRequantize, inp: TensorInfo, out: TensorInfo, acc: str, i: int) -> str:
    t = b.onnx.TensorProto
    v = b.op("Mul", [acc, b.const(inp.mult.astype(np.int64), f"n{i}_mult")], f"n{i}_v")
    if node.relu:
        v = b.op("Max", [v, b.const(np.array(0, dtype=np.int64), f"n{i}_zero")], f"n{i}_relu")
    v3 = b.op("Unsqueeze", [v, b.const(np.array([2], dtype=np.int64), f"n{i}_axis")], f"n{i}_v3")
    ge = b.op("GreaterOrEqual", [v3, b.const(node.integer_thresholds().astype(np.int64), f"n{i}_thresholds")], f"n{i}_ge")
    ones = b.op("Cast", [ge], f"n{i}_ones", to=t.INT64)
    return b.op("ReduceSum", [ones, b.const(np.array([2], dtype=np.int64), f"n{i}_sum_axis")], f"n{i}_codes", keepdims=0)


@register_act_node(ThresholdActQuantizer)
def threshold_node(builder: Builder, aq: nn.Module, exponent: np.ndarray, bits: np.ndarray, name: str) -> Node:
    """The :class:`ThresholdRequantize` producing layer ``name``'s input codes (fuses a pending ReLU)."""
    if builder.state != "acc":
        raise ExportError(f"layer '{name}': threshold (N2UQ) activations are supported only after another layer, "
                          "not on the model input; use a uniform quantizer for the first layer")
    with torch.no_grad():
        table = aq.thresholds().detach().cpu().double().numpy()
    mantissa, exp = dyadic_split(table)  # [1, L] when shared by every channel
    relu, builder.relu = builder.relu, False
    return ThresholdRequantize(exponent=exponent, bits=bits, signed=False, relu=relu, thr_mantissa=mantissa,
                               thr_exponent=exp)
