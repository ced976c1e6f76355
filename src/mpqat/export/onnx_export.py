"""``graph.to_onnx(path)``: a standard ONNX model (default domain, opset 17) computing the engine's logits.

Each node becomes a few standard operators that onnxruntime's CPU provider runs:

* ``quantize_input``: ``Cast(double) -> Mul(2**-k) -> Add(0.5) -> Floor -> Max(lo) -> Min(hi) -> Cast(int64)``;
* ``integer_linear``: weights as an int8/int16 initializer ``[in, out]``, ``Cast(int64)``, the
  per-feature shifts ``2**(k_i-K)`` folded in by an int64 ``Mul``, then an int64 ``MatMul`` and ``Add``
  (bias); the MatMul is exact because the accumulator bound checked at export time fits int64;
* ``requantize``: int64 ``Mul(m)``, ``Cast(double)`` (exact, ``|acc*m| < 2**52``), ``Mul(2**-s)``,
  ``Add(0.5)``, ``Floor``, ``Max/Min`` (the ReLU and clamp), ``Cast(int64)``; this is exact and equal to
  the engine's ``(v + 2**(s-1)) >> s`` (ONNX's ``BitShift`` is unsigned-only, so it is not used);
* ``dequantize_output``: ``Cast(double) -> Mul(m * 2**(K-e))``.

Other node types register emitters with :func:`register_onnx` (codebook and threshold nodes, and the
conv / pooling / flatten nodes of :mod:`mpqat.export.conv`, which carry feature maps as ``[N*P, C]``).

Every floating-point operation is either exact or the same single IEEE operation that the engine
performs, so the ONNX output is **bit-identical** to ``graph.run`` (largest difference: 0), which
the tests check. ``QuantizeLinear``/``DequantizeLinear`` are not used: they round half to even and
support only 8/16-bit containers, which would break exactness. NaN/inf inputs are not defined
(the engine rejects them).

Example:
    >>> import numpy as np, tempfile, os, onnxruntime as ort
    >>> from mpqat.export.ir import IntegerGraph, QuantizeInput, IntegerLinear, DequantizeOutput
    >>> g = IntegerGraph([QuantizeInput(np.array([0]), np.array([4]), signed=True),
    ...                   IntegerLinear(np.array([[2]]), np.array([3]), np.array([1]), np.array([1]),
    ...                                 np.array([0]), acc_exponent=0), DequantizeOutput()])
    >>> path = graph_to_onnx(g, os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    >>> sess.run(None, {"x": np.ones((1, 1), np.float32)})[0].tolist()
    [[3.0]]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpqat.checkpoint import atomic_write_bytes
from mpqat.errors import ExportError
from mpqat.export.ir import DequantizeOutput, IntegerLinear, QuantizeInput, Requantize, TensorInfo

if TYPE_CHECKING:
    from mpqat.export.ir import IntegerGraph

OPSET = 17
IR_VERSION = 8


class _Builder:
    def __init__(self, onnx: Any) -> None:
        self.onnx = onnx
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, arr: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def quantize(self, x_double: str, k_shift: np.ndarray, lo: np.ndarray, hi: np.ndarray, hint: str) -> str:
        """``Cast(int64)(Min(Max(Floor(x * 2**-k_shift + 0.5), lo), hi))`` on a double tensor."""
        t = self.onnx.TensorProto
        z = self.op("Mul", [x_double, self.const(np.ldexp(1.0, -k_shift.astype(np.int64)), f"{hint}_pow")], f"{hint}_scaled")
        z = self.op("Add", [z, self.const(np.array(0.5), f"{hint}_half")], f"{hint}_half_up")
        z = self.op("Floor", [z], f"{hint}_floor")
        z = self.op("Max", [z, self.const(lo.astype(np.float64), f"{hint}_lo")], f"{hint}_lo_clamped")
        z = self.op("Min", [z, self.const(hi.astype(np.float64), f"{hint}_hi")], f"{hint}_clamped")
        return self.op("Cast", [z], f"{hint}_codes", to=t.INT64)


Emitter = Callable[[_Builder, Any, TensorInfo, TensorInfo, str, int], str]
_EMITTERS: dict[type, Emitter] = {}


def register_onnx(node_type: type) -> Callable[[Emitter], Emitter]:
    """Decorator: register ``emit(builder, node, in_info, out_info, input_name, index) -> output_name``."""

    def decorate(fn: Emitter) -> Emitter:
        _EMITTERS[node_type] = fn
        return fn

    return decorate


@register_onnx(QuantizeInput)
def _emit_quantize(b: _Builder, node: QuantizeInput, inp: TensorInfo, out: TensorInfo, x: str, i: int) -> str:
    xd = b.op("Cast", [x], f"n{i}_x64", to=b.onnx.TensorProto.DOUBLE)
    return b.quantize(xd, node.exponent, out.lo, out.hi, f"n{i}")


def shifted_weight(b: _Builder, node: IntegerLinear, inp: TensorInfo, i: int) -> str:
    """The int64 ``[fan_in, out]`` weight with each input column's alignment shift ``<< (k_i - K)`` folded in
    (stored as int8/int16, cast at run time); shared by the linear and the conv emitters."""
    w = node.weight.T
    dtype = np.int8 if np.abs(w).max(initial=0) < 128 else np.int16
    wt = b.op("Cast", [b.const(w.astype(dtype), f"n{i}_weight")], f"n{i}_w64", to=b.onnx.TensorProto.INT64)
    shift = node.input_shifts(inp)
    if np.any(shift != 0):
        wt = b.op("Mul", [wt, b.const((np.int64(1) << shift)[:, None].astype(np.int64), f"n{i}_colshift")], f"n{i}_weff")
    return wt


@register_onnx(IntegerLinear)
def _emit_linear(b: _Builder, node: IntegerLinear, inp: TensorInfo, out: TensorInfo, a: str, i: int) -> str:
    wt = shifted_weight(b, node, inp, i)
    acc = b.op("MatMul", [a, wt], f"n{i}_dot")
    return b.op("Add", [acc, b.const(node.bias.astype(np.int64), f"n{i}_bias")], f"n{i}_acc")


@register_onnx(Requantize)
def _emit_requantize(b: _Builder, node: Requantize, inp: TensorInfo, out: TensorInfo, acc: str, i: int) -> str:
    v = b.op("Mul", [acc, b.const(inp.mult.astype(np.int64), f"n{i}_mult")], f"n{i}_v")
    vd = b.op("Cast", [v], f"n{i}_v64", to=b.onnx.TensorProto.DOUBLE)
    return b.quantize(vd, node.shifts(inp), out.lo, out.hi, f"n{i}")


@register_onnx(DequantizeOutput)
def _emit_dequantize(b: _Builder, node: DequantizeOutput, inp: TensorInfo, out: TensorInfo, acc: str, i: int) -> str:
    y = b.op("Cast", [acc], f"n{i}_acc64", to=b.onnx.TensorProto.DOUBLE)
    return b.op("Mul", [y, b.const(DequantizeOutput.scales(inp), f"n{i}_scale")], f"n{i}_logits")


def graph_to_onnx(graph: IntegerGraph, path: str | Path) -> Path:
    """Write ``graph`` as an ONNX model with input ``x`` (float32 ``[N, d]``) and output ``logits`` (float64).

    Example: see the module docstring.
    """
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the 'onnx' package: pip install 'mpqat[onnx]'") from None
    b = _Builder(onnx)
    name = "x"
    for index, node in enumerate(graph.nodes):
        emit = _EMITTERS.get(type(node))
        if emit is None:
            raise ExportError(f"node type '{node.op}' has no ONNX emitter")
        name = emit(b, node, graph.infos[index], graph.infos[index + 1], name, index)
    b.nodes.append(onnx.helper.make_node("Identity", [name], ["logits"]))
    t = onnx.TensorProto
    g = onnx.helper.make_graph(
        b.nodes, "mpqat_integer_graph",
        [onnx.helper.make_tensor_value_info("x", t.FLOAT, ["N", graph.input_dim])],
        [onnx.helper.make_tensor_value_info("logits", t.DOUBLE, ["N", graph.output_dim])],
        b.inits,
    )
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="mpqat")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path = Path(path)
    atomic_write_bytes(path, model.SerializeToString())
    return path
