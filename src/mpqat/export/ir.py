"""The integer graph: typed nodes holding integer arrays, and the one definition of their semantics.

A graph is a chain of nodes. Each edge carries one of three kinds of tensor:

* ``float``: the model input, float32 (or float64) ``[n, d]``;
* ``codes``: integer activation codes ``a_i``; the value they stand for is ``a_i * 2**k_i`` with a
  power-of-two step per feature (option (a) of METHODS.md §1.6: per-feature scales stay exact
  because they are aligned by shifts inside the dot product);
* ``acc``: integer accumulators ``acc_j``; the value is ``acc_j * m_j * 2**(K - e_j)`` with the
  dyadic weight scale ``m_j * 2**-e_j`` of output row ``j`` and the layer's accumulator exponent ``K``.

Nodes (all parameters are numpy integer arrays or Python ints/bools):

``QuantizeInput(exponent, bits, signed, relu)``  float -> codes.
    ``a_i = clamp(floor(x_i * 2**-k_i + 0.5), lo_i, hi_i)`` computed in float64 (``x`` is first
    converted to float64 exactly). ``[lo, hi]`` is ``[0, 2**b - 1]`` when unsigned and
    ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` when signed; ``relu=True`` raises ``lo`` to 0.
    This and :class:`DequantizeOutput` are the only floating-point steps of the graph.
``IntegerLinear(weight, weight_bits, bias, mult, scale_exp, acc_exponent)``  codes -> acc.
    ``acc_j = sum_i w_ij * (a_i << (k_i - K)) + b_j`` in int64, ``K = acc_exponent <= min_i k_i``.
    Row ``j`` of ``weight`` has ``weight_bits[j]`` bits: 0 (pruned, all zero), 1 (``+-1``) or
    ``b >= 2`` (restricted symmetric ``|w| <= 2**(b-1) - 1``). ``mult``/``scale_exp`` are the
    dyadic weight scale ``m_j * 2**-e_j`` (``1 <= m_j < 2**16``); ``bias`` is on the accumulator grid.
``Requantize(exponent, bits, signed, relu)``  acc -> codes (this is where ReLU is fused).
    With ``v_j = acc_j * m_j`` and ``s_j = k'_j - (K - e_j)``: ``a'_j = clamp(floor(v_j / 2**s_j + 1/2))``,
    i.e. ``(v_j + 2**(s_j-1)) >> s_j`` (arithmetic shift) for ``s_j >= 1`` and ``v_j << -s_j`` for
    ``s_j <= 0``, then clamped to ``[lo_j, hi_j]``. The clamp at ``lo = 0`` *is* the ReLU.
``DequantizeOutput()``  acc -> float64.
    ``y_j = float64(acc_j) * c_j`` with ``c_j = m_j * 2**(K - e_j)`` (one IEEE multiply, exact).

Rounding is round-half-up everywhere (``floor(x + 0.5)``), as in training.

Exactness and overflow are checked when a graph is built (export or load) by propagating, per
channel, the largest possible magnitude of every integer over *all* inputs: from the code ranges
(bit-widths), the per-feature shifts and the stored weight codes (``sum_i |w_ij| * max|a_i| * 2**shift_i
+ |b_j|``, tighter than ``fan_in * max|w| * max|a|`` and still a hard bound). Each
:class:`IntegerLinear` must keep
``max|acc_j| * m_j < 2**53``, and ``< 2**52`` where a :class:`Requantize` follows. That keeps every
int64 product exact, and it also keeps the float64 evaluation of the PyTorch model exact, which is
why the model and the graph agree bit for bit.
Whether a layer's accumulator fits int32 (for C on a microcontroller) is recorded per layer.

Feature maps (convolutional models, :mod:`mpqat.export.conv`): an edge may also carry a map
``[n, *spatial, channels]``, channels last (``TensorInfo.spatial`` is its spatial shape, ``size`` the
channel count); the per-feature arrays above are then per channel and broadcast over the positions.
Nodes say how they treat maps with :attr:`Node.layout`; the graph's input and output stay flat rows.

New node types (e.g. a codebook layer) subclass :class:`Node`, implement :meth:`Node.propagate`,
register with :func:`register_node`, and register an engine kernel (``engine.register_kernel``)
and, if wanted, ONNX and C emitters.

Example:
    >>> import numpy as np
    >>> g = IntegerGraph([
    ...     QuantizeInput(exponent=np.array([-2, -2]), bits=np.array([8, 8]), signed=True),
    ...     IntegerLinear(weight=np.array([[1, -1]]), weight_bits=np.array([2]), bias=np.array([0]),
    ...                   mult=np.array([3]), scale_exp=np.array([2]), acc_exponent=-2),
    ...     DequantizeOutput()])
    >>> g.run(np.array([[1.0, 0.25]], dtype=np.float32)).tolist()   # (4 - 1) * 3 * 2**-4
    [[0.5625]]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mpqat.errors import ExportError

#: Bounds on ``max|acc| * m``: below 2**53 every integer linear layer (exact float64 partial sums,
#: in the PyTorch eval path and the BLAS pipeline); below 2**52 where a requantize follows (so that
#: ``floor(v * 2**-s + 0.5)`` stays exact in float64).
ACC_MULT_LIMIT = 2**53
REQUANT_LIMIT = 2**52
#: Largest supported activation bit-width and weight bit-width.
MAX_ACT_BITS = 16
MAX_WEIGHT_BITS = 16
#: Mantissa bound of a dyadic weight scale.
MULT_LIMIT = 2**16
#: Requantization shifts are clamped to this range; beyond it the result no longer changes
#: (``|v| < 2**52`` gives 0 for ``s >= 53``, and saturation for ``s <= -20`` after clipping ``v``).
SHIFT_MAX = 53
SHIFT_MIN = -20
#: ``|v|`` is clipped to this before a left shift (any larger value saturates every code range).
LSHIFT_CLIP = 2**17
#: Safety factor on float64 bound sums (relative rounding error of a sum of n <= 1e6 terms < 1e-9).
_BOUND_SLACK = 1.0 + 1e-9


def act_range(bits: np.ndarray, signed: bool, relu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Integer code range ``(lo, hi)`` per channel for activation ``bits`` (see the module docstring)."""
    bits = np.asarray(bits, dtype=np.int64)
    if signed:
        hi = (np.int64(1) << (bits - 1)) - 1
        lo = -hi
    else:
        hi = (np.int64(1) << bits) - 1
        lo = np.zeros_like(hi)
    if relu:
        lo = np.maximum(lo, 0)
    return lo, hi


def weight_max(bits: np.ndarray) -> np.ndarray:
    """Largest ``|w|`` at each weight bit-width: 0 at 0 bits, 1 at 1 bit, ``2**(b-1)-1`` otherwise."""
    bits = np.asarray(bits, dtype=np.int64)
    multi = (np.int64(1) << np.maximum(bits - 1, 0)) - 1
    return np.where(bits <= 0, 0, np.where(bits == 1, 1, multi))


@dataclass
class TensorInfo:
    """What flows along an edge: its kind, channel count, and the per-channel scaling and bound."""

    kind: str  # "float" | "codes" | "acc"
    size: int
    exponent: np.ndarray | None = None  # codes: value = code * 2**exponent
    lo: np.ndarray | None = None  # codes: range
    hi: np.ndarray | None = None
    bits: np.ndarray | None = None  # codes: bit-widths
    mult: np.ndarray | None = None  # acc: value = acc * mult * 2**acc_exp
    acc_exp: np.ndarray | None = None
    bound: np.ndarray | None = None  # acc: max |acc| per channel (float64, conservative)
    explain: Any = None  # acc: explain(row, limit_bits) -> why the producing layer's bound is too large
    spatial: tuple[int, ...] = ()  # feature maps: spatial shape, the array is [n, *spatial, size] (channels last)


@dataclass
class LayerReport:
    """Per integer layer: sizes, widths and the accumulator analysis done when the graph is built."""

    index: int
    name: str
    in_features: int
    out_features: int
    weight_bits: dict[int, int]
    act_bits: dict[int, int]
    acc_bound: float
    acc_bits: int
    accumulator: str  # "int32" or "int64": the C type the accumulator needs
    float64_exact: bool  # every partial sum, times the scale mantissa, stays below 2**53 (float64 BLAS is exact)
    float32_exact: bool  # every partial sum of the dot product stays below 2**24 (float32 BLAS is exact)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _hist(values: np.ndarray) -> dict[int, int]:
    widths, counts = np.unique(np.asarray(values, dtype=np.int64), return_counts=True)
    return {int(w): int(c) for w, c in zip(widths, counts, strict=True)}


def array_field(kind: str = "array", **kwargs: Any) -> Any:
    """Dataclass field holding a numpy integer array; ``kind`` tells the file format how to store it."""
    return field(metadata={"store": kind, **kwargs})


_NODES: dict[str, type[Node]] = {}


def register_node(cls: type[Node]) -> type[Node]:
    """Class decorator: make a node type known to the file format under ``cls.op``."""
    _NODES[cls.op] = cls
    return cls


def node_type(op: str) -> type[Node]:
    """The node class registered under ``op``; :class:`ExportError` if unknown."""
    cls = _NODES.get(op)
    if cls is None:
        raise ExportError(f"unknown node type '{op}' (known: {', '.join(sorted(_NODES))}); the file needs a newer mpqat")
    return cls


@dataclass(eq=False)
class Node:
    """Base class of graph nodes; subclasses are dataclasses of numpy integer arrays and plain values."""

    op: ClassVar[str] = ""
    #: kinds of tensor accepted on input
    accepts: ClassVar[tuple[str, ...]] = ()
    #: how the node treats feature maps (``TensorInfo.spatial``): "flat" (flat input only), "pointwise"
    #: (per channel, the spatial shape passes through) or "spatial" (the node handles it itself)
    layout: ClassVar[str] = "flat"

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:  # pragma: no cover - abstract
        """Check this node against its input and describe its output; raise :class:`ExportError`."""
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        """The node's array fields by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if "store" in f.metadata}


def _as_int_array(value: Any, name: str, where: str, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ExportError(f"{where}: '{name}' must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.ndim != ndim:
        raise ExportError(f"{where}: '{name}' must have {ndim} dimension(s), got shape {arr.shape}")
    return arr


@dataclass(eq=False)
class ActivationQuantizer(Node):
    """Shared part of the nodes that produce codes: per-feature step exponents, bit-widths, sign, ReLU."""

    layout: ClassVar[str] = "pointwise"
    exponent: np.ndarray = array_field()
    bits: np.ndarray = array_field()
    signed: bool = True
    relu: bool = False

    def codes_info(self, size: int, where: str) -> TensorInfo:
        """Validate the fields for ``size`` features and describe the codes this node outputs."""
        self.exponent = _as_int_array(self.exponent, "exponent", where, 1)
        self.bits = _as_int_array(self.bits, "bits", where, 1)
        if self.exponent.shape != (size,) or self.bits.shape != (size,):
            raise ExportError(f"{where}: exponent and bits need one entry per feature ({size}), "
                              f"got {self.exponent.shape} and {self.bits.shape}")
        if size and (self.bits.min() < 1 or self.bits.max() > MAX_ACT_BITS):
            raise ExportError(f"{where}: activation bits must be in [1, {MAX_ACT_BITS}], got {_hist(self.bits)}")
        if size and np.abs(self.exponent).max() > 200:
            raise ExportError(f"{where}: activation step exponents out of range ({self.exponent.min()}..{self.exponent.max()})")
        lo, hi = act_range(self.bits, bool(self.signed), bool(self.relu))
        return TensorInfo("codes", size, exponent=self.exponent, lo=lo, hi=hi, bits=self.bits)


@register_node
@dataclass(eq=False)
class QuantizeInput(ActivationQuantizer):
    """Float input -> integer codes ``clamp(floor(x * 2**-k + 0.5), lo, hi)`` (see the module docstring)."""

    op: ClassVar[str] = "quantize_input"
    accepts: ClassVar[tuple[str, ...]] = ("float",)

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:
        return self.codes_info(inp.size, where)


@register_node
@dataclass(eq=False)
class Requantize(ActivationQuantizer):
    """Accumulators -> next layer's codes by a dyadic multiply and rounding shift; fuses ReLU."""

    op: ClassVar[str] = "requantize"
    accepts: ClassVar[tuple[str, ...]] = ("acc",)
    signed: bool = False
    relu: bool = True

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:
        out = self.codes_info(inp.size, where)
        worst = inp.bound * inp.mult
        if inp.size and worst.max() >= REQUANT_LIMIT:
            raise ExportError(inp.explain(int(np.argmax(worst)), 52) + f" (checked where {where} requantizes it)")
        return out

    def shifts(self, inp: TensorInfo) -> np.ndarray:
        """Right-shift ``s_j = k'_j - (K - e_j)`` per channel, clamped to ``[SHIFT_MIN, SHIFT_MAX]``."""
        return np.clip(self.exponent - inp.acc_exp, SHIFT_MIN, SHIFT_MAX)


@register_node
@dataclass(eq=False)
class DequantizeOutput(Node):
    """Accumulators -> float64 logits ``float64(acc_j) * m_j * 2**(K - e_j)``."""

    op: ClassVar[str] = "dequantize_output"
    accepts: ClassVar[tuple[str, ...]] = ("acc",)

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:
        return TensorInfo("float", inp.size)

    @staticmethod
    def scales(inp: TensorInfo) -> np.ndarray:
        """The exact float64 multipliers ``m_j * 2**(K - e_j)``."""
        return np.ldexp(inp.mult.astype(np.float64), inp.acc_exp.astype(np.int64))


@register_node
@dataclass(eq=False)
class IntegerLinear(Node):
    """Integer dot products with per-row weight bit-widths; output accumulators (see the module docstring)."""

    op: ClassVar[str] = "integer_linear"
    accepts: ClassVar[tuple[str, ...]] = ("codes",)
    weight: np.ndarray = array_field("packed", bits="weight_bits")
    weight_bits: np.ndarray = array_field()
    bias: np.ndarray = array_field()
    mult: np.ndarray = array_field()
    scale_exp: np.ndarray = array_field()
    acc_exponent: int = 0
    name: str = ""

    def storage_bits(self) -> np.ndarray:
        """Bits stored per weight of each row (a codebook layer stores its index width instead)."""
        return self.weight_bits

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def input_shifts(self, inp: TensorInfo) -> np.ndarray:
        """Left shift of each input column, ``k_i - K``; 0 for columns whose weights are all zero."""
        shift = inp.exponent - int(self.acc_exponent)
        live = np.any(self.weight != 0, axis=0)
        return np.where(live, shift, 0)

    def propagate(self, inp: TensorInfo, where: str) -> TensorInfo:
        if self.name:
            where = f"{where} ('{self.name}')"
        self.weight = _as_int_array(self.weight, "weight", where, 2)
        out, n_in = self.weight.shape
        if n_in != inp.size:
            raise ExportError(f"{where}: weight has {n_in} input columns but its input has {inp.size} features")
        for name in ("weight_bits", "bias", "mult", "scale_exp"):
            arr = _as_int_array(getattr(self, name), name, where, 1)
            if arr.shape != (out,):
                raise ExportError(f"{where}: '{name}' needs one entry per output row ({out}), got shape {arr.shape}")
            setattr(self, name, arr)
        self.acc_exponent = int(self.acc_exponent)
        bits = self.weight_bits
        if out and (bits.min() < 0 or bits.max() > MAX_WEIGHT_BITS):
            raise ExportError(f"{where}: weight bits must be in [0, {MAX_WEIGHT_BITS}], got {_hist(bits)}")
        wmax = weight_max(bits)
        bad = np.abs(self.weight).max(axis=1, initial=0) > wmax
        one_bit = bits == 1
        if one_bit.any() and np.any(self.weight[one_bit] == 0):
            bad |= one_bit & np.any(self.weight == 0, axis=1)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ExportError(
                f"{where}: row {j} has {bits[j]}-bit weights but holds codes outside its range "
                f"(max |w| = {int(np.abs(self.weight[j]).max())}, allowed {int(wmax[j])}; 1-bit rows must be +-1)"
            )
        if out and (self.mult.min() < 1 or self.mult.max() >= MULT_LIMIT or np.abs(self.scale_exp).max() > 200):
            raise ExportError(f"{where}: weight scales must be m * 2**-e with 1 <= m < 2**16 and |e| <= 200")
        if n_in and self.acc_exponent > int(inp.exponent.min()):
            raise ExportError(
                f"{where}: accumulator exponent {self.acc_exponent} exceeds the smallest input step exponent "
                f"{int(inp.exponent.min())}; it must be <= every input exponent"
            )
        shift = self.input_shifts(inp)
        if n_in and shift.max() > 62:
            raise ExportError(f"{where}: per-feature activation steps span {int(shift.max())} octaves (at most 62 supported)")
        amax = np.maximum(np.abs(inp.lo), np.abs(inp.hi)).astype(np.float64)
        col = amax * np.ldexp(1.0, shift)
        dot = (np.abs(self.weight).astype(np.float64) @ col) * _BOUND_SLACK if n_in else np.zeros(out)
        if dot.max(initial=0.0) < 2**60:  # small enough to compute exactly in int64
            col_int = np.maximum(np.abs(inp.lo), np.abs(inp.hi)) << shift
            dot = (np.abs(self.weight) @ col_int).astype(np.float64)
        bound = dot + np.abs(self.bias).astype(np.float64)
        worst = bound * self.mult

        def explain(j: int, limit_bits: int) -> str:
            return self._overflow_message(where, j, float(bound[j]), inp, shift, limit_bits)

        if out and worst.max() >= ACC_MULT_LIMIT:
            raise ExportError(explain(int(np.argmax(worst)), 53))
        self._report = LayerReport(
            index=-1, name=self.name, in_features=n_in, out_features=out,
            weight_bits=_hist(bits), act_bits=_hist(inp.bits),
            acc_bound=float(bound.max(initial=0.0)),
            acc_bits=int(math.ceil(math.log2(float(bound.max(initial=0.0)) + 1))) + 1,
            accumulator="int32" if bound.max(initial=0.0) < 2**31 - 1 else "int64",
            float64_exact=bool(worst.max(initial=0.0) < ACC_MULT_LIMIT),
            float32_exact=bool(dot.max(initial=0.0) < 2**24),
        )
        return TensorInfo("acc", out, mult=self.mult, acc_exp=self.acc_exponent - self.scale_exp, bound=bound,
                          explain=explain)

    def _overflow_message(self, where: str, j: int, bound: float, inp: TensorInfo, shift: np.ndarray,
                          limit_bits: int) -> str:
        a_bits = int(inp.bits.max(initial=0))
        return (
            f"{where}: the worst-case accumulator of output row {j} is 2^{math.log2(bound):.1f}, times its scale mantissa "
            f"{int(self.mult[j])} that is 2^{math.log2(bound * float(self.mult[j])):.1f} >= 2^{limit_bits}, so integer inference "
            f"would not be exact (fan-in {self.in_features}, input codes up to {a_bits} bits, weights up to "
            f"{int(self.weight_bits.max())} bits, per-feature step shifts up to {int(shift.max(initial=0))} bits, "
            f"|bias| {int(abs(self.bias[j]))}). Use fewer activation bits for this layer's input (e.g. 8 instead of 16), "
            "fewer weight bits, per-tensor activation steps, or a smaller fan-in."
        )


class IntegerGraph:
    """A chain of integer nodes, checked for exactness when built; runs, saves, and exports to ONNX and C.

    Example:
        >>> import numpy as np
        >>> g = IntegerGraph([QuantizeInput(np.array([0]), np.array([4]), signed=True),
        ...                   IntegerLinear(np.array([[2]]), np.array([3]), np.array([1]), np.array([1]),
        ...                                 np.array([0]), acc_exponent=0), DequantizeOutput()])
        >>> g.run(np.array([[3.4]], dtype=np.float32)).tolist()  # 2*3 + 1
        [[7.0]]
    """

    def __init__(self, nodes: list[Node], meta: dict[str, Any] | None = None) -> None:
        self.nodes = list(nodes)
        self.meta = dict(meta or {})
        self._compiled: dict[str, Any] = {}
        self.infos, self.layers = self._analyze()

    def _analyze(self) -> tuple[list[TensorInfo], list[LayerReport]]:
        if not self.nodes or not isinstance(self.nodes[0], QuantizeInput):
            raise ExportError("an integer graph must start with a quantize_input node")
        size = len(np.asarray(self.nodes[0].exponent).reshape(-1))
        info = TensorInfo("float", size)
        infos = [info]
        layers: list[LayerReport] = []
        for index, node in enumerate(self.nodes):
            where = f"node {index} ({node.op})"
            if info.kind not in node.accepts:
                raise ExportError(f"{where}: takes {'/'.join(node.accepts)} input but gets {info.kind}")
            if info.spatial and node.layout == "flat":
                raise ExportError(f"{where}: takes flat [rows, features] input but gets a feature map "
                                  f"{'x'.join(map(str, info.spatial))}x{info.size}; flatten it first")
            out = node.propagate(info, where)
            if node.layout == "pointwise":
                out.spatial = info.spatial
            if isinstance(node, IntegerLinear):
                node._report.index = index
                layers.append(node._report)
            info = out
            infos.append(info)
        if info.kind != "float":
            raise ExportError("an integer graph must end with a dequantize_output node")
        return infos, layers

    @property
    def input_dim(self) -> int:
        """Number of input features."""
        return self.infos[0].size

    @property
    def output_dim(self) -> int:
        """Number of outputs (logits)."""
        return self.infos[-1].size

    def linear_layers(self) -> list[IntegerLinear]:
        """The integer linear nodes, in order."""
        return [n for n in self.nodes if isinstance(n, IntegerLinear)]

    def weight_bits_total(self) -> int:
        """Sum over every weight of its bit-width (the bit budget of the weights)."""
        return int(sum(int(n.storage_bits().sum()) * n.in_features for n in self.linear_layers()))

    def run(self, x: np.ndarray, backend: str = "auto") -> np.ndarray:
        """Logits (float64 ``[n, outputs]``) of float inputs ``x`` ``[n, inputs]``; see :mod:`mpqat.export.engine`."""
        from mpqat.export.engine import run_graph

        return run_graph(self, x, backend=backend)

    def save(self, path: str | Path) -> int:
        """Write the graph as an ``.mpq`` file atomically; returns its size in bytes."""
        from mpqat.export.fileformat import save_graph

        return save_graph(self, path)

    @classmethod
    def load(cls, path: str | Path) -> IntegerGraph:
        """Read and validate an ``.mpq`` file; :class:`ExportError` if it is corrupt, truncated or unsupported."""
        from mpqat.export.fileformat import load_graph

        return load_graph(path)

    def to_onnx(self, path: str | Path) -> Path:
        """Write a standard ONNX model computing the same logits; see :mod:`mpqat.export.onnx_export`."""
        from mpqat.export.onnx_export import graph_to_onnx

        return graph_to_onnx(self, path)

    def to_c(self, directory: str | Path, harness: bool = False) -> list[Path]:
        """Write C99 ``model.h``/``model.c`` (and a ``main.c`` test harness); see :mod:`mpqat.export.c_export`."""
        from mpqat.export.c_export import graph_to_c

        return graph_to_c(self, directory, harness=harness)

    def summary(self) -> dict[str, Any]:
        """Layers with their widths and accumulator analysis, as plain data."""
        return {
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "nodes": [n.op for n in self.nodes],
            "weight_bits_total": self.weight_bits_total(),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def __repr__(self) -> str:
        layers = ", ".join(f"{layer.in_features}->{layer.out_features}" for layer in self.layers)
        return f"IntegerGraph({len(self.nodes)} nodes, layers [{layers}])"
