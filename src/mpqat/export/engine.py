"""The NumPy engine: runs an :class:`~mpqat.export.ir.IntegerGraph` with its integer semantics.

Two interchangeable pipelines, vectorised, giving the same bits:

* ``backend="int64"``, the reference: codes and accumulators are int64 arrays, the matmul is NumPy's
  integer matmul, requantization is ``(acc*m + 2**(s-1)) >> s`` with an arithmetic shift. Integer only,
  except the input quantization and the output scaling that the graph defines in float64.
* ``backend="float"``: the same integers carried in float64 so that the matmul runs on BLAS. Each
  integer linear layer is fused with the node after it: the weights are pre-multiplied by the
  per-row dyadic factor ``c_j = m_j * 2**-s_j`` (requantize) or ``m_j * 2**(K-e_j)`` (dequantize), the bias
  becomes ``b_j*c_j (+ 1/2)``, and the layer is ``floor(a @ W' + b')`` clamped, or just ``a @ W' + b'``.
  **Why this is exact**: every product ``a_i * W'_ij`` and every partial sum is an integer of
  magnitude below ``max|acc_j| * m_j`` (checked when the graph is built: below ``2**53``, and below
  ``2**52`` where a requantize follows) times the power of two ``2**-s_j``, so it is representable
  and no rounding ever happens, whatever order or FMA the BLAS uses; adding ``1/2`` (only where
  ``s_j >= 1``) keeps the integer below ``2**53``.
  Shifts beyond ``[-20, 53]`` are clamped exactly as in the integer path (the result saturates or is 0
  either way). So the float pipeline returns the integer pipeline's bits, which the tests check.
  Nodes that are not fused (a requantize after a pooling node, the conv and pooling nodes of
  :mod:`mpqat.export.conv`) carry the same integers in float64, exactly for the same reason.
  For batches of :data:`FLOAT32_MIN_BATCH` rows or more, a layer whose dot products stay below
  ``2**24`` (recorded as ``float32_exact``) runs the matmul in float32 BLAS on the unscaled integers
  (exact for the same reason) and applies ``c_j`` and the offset afterwards in float64.
* ``backend="auto"`` (default): ``float`` when every layer's bound allows it (always true for graphs
  that pass the export check) and the batch has at least :data:`FLOAT_MIN_BATCH` rows, else ``int64``.

Unpacked weights are cached per graph. New node types register kernels with :func:`register_kernel`.

Example:
    >>> import numpy as np
    >>> from mpqat.export.ir import IntegerGraph, QuantizeInput, IntegerLinear, DequantizeOutput
    >>> g = IntegerGraph([QuantizeInput(np.array([0]), np.array([4]), signed=True),
    ...                   IntegerLinear(np.array([[2]]), np.array([3]), np.array([1]), np.array([1]),
    ...                                 np.array([0]), acc_exponent=0), DequantizeOutput()])
    >>> np.array_equal(g.run(np.ones((3, 1), np.float32), backend="int64"),
    ...                g.run(np.ones((3, 1), np.float32), backend="float"))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from mpqat.errors import MpqatError
from mpqat.export.ir import (
    LSHIFT_CLIP,
    SHIFT_MIN,
    DequantizeOutput,
    IntegerLinear,
    Node,
    QuantizeInput,
    Requantize,
    TensorInfo,
)

if TYPE_CHECKING:
    from mpqat.export.ir import IntegerGraph

#: ``backend="auto"`` uses the BLAS pipeline from this batch size on. It is faster at every batch
#: size measured (batch 1 included: NumPy's int64 matmul has no BLAS), hence 1.
FLOAT_MIN_BATCH = 1
#: From this batch size on, layers with ``float32_exact`` use float32 BLAS (about twice as fast).
FLOAT32_MIN_BATCH = 64
BACKENDS = ("auto", "int64", "float")
#: Graphs with feature maps (CNNs) run their rows in blocks whose widest map has at most this many entries.
MAP_BLOCK_ELEMENTS = 2**22

Kernel = Callable[[np.ndarray], np.ndarray]
KernelFactory = Callable[[Node, TensorInfo, TensorInfo, str], Kernel]
_KERNELS: dict[type, KernelFactory] = {}


class EngineInputError(MpqatError, ValueError):
    """Input that the engine cannot run: wrong shape, NaN/inf values, or an unknown backend."""


def register_kernel(node_type: type) -> Callable[[KernelFactory], KernelFactory]:
    """Decorator: register ``factory(node, in_info, out_info, pipeline) -> kernel`` for ``node_type``.

    ``pipeline`` is ``"int64"`` or ``"float"`` (integers carried in float64, see the module docstring);
    the kernel maps the input array to the output array.
    """

    def decorate(factory: KernelFactory) -> KernelFactory:
        _KERNELS[node_type] = factory
        return factory

    return decorate


def _clamp(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    np.maximum(v, lo, out=v)
    np.minimum(v, hi, out=v)
    return v


@register_kernel(QuantizeInput)
def _quantize_input(node: QuantizeInput, inp: TensorInfo, out: TensorInfo, pipeline: str) -> Kernel:
    inv = np.ldexp(1.0, -node.exponent.astype(np.int64))
    lo, hi = out.lo.astype(np.float64), out.hi.astype(np.float64)
    as_int = pipeline == "int64"

    def kernel(x: np.ndarray) -> np.ndarray:
        z = np.multiply(x, inv)  # float32 -> float64 exactly, times a power of two: exact
        z += 0.5
        np.floor(z, out=z)
        _clamp(z, lo, hi)
        return z.astype(np.int64) if as_int else z

    return kernel


def _effective_weight(node: IntegerLinear, inp: TensorInfo) -> np.ndarray:
    """``w_ij * 2**(k_i - K)``: the per-feature step shifts folded into the columns (int64 ``[out, in]``)."""
    return node.weight * (np.int64(1) << node.input_shifts(inp))[None, :]


@register_kernel(IntegerLinear)
def _integer_linear(node: IntegerLinear, inp: TensorInfo, out: TensorInfo, pipeline: str) -> Kernel:
    wt = np.ascontiguousarray(_effective_weight(node, inp).T)
    bias = node.bias.copy()
    if pipeline != "int64":  # not fused (e.g. before a threshold node): the accumulators carried in float64
        if not node._report.float64_exact:
            raise EngineInputError(f"layer '{node.name}' is too wide for the exact float64 path; use backend='int64'")
        wt, bias = wt.astype(np.float64), bias.astype(np.float64)  # every partial sum < 2**53: exact

    def kernel(a: np.ndarray) -> np.ndarray:
        acc = a @ wt
        acc += bias
        return acc

    return kernel


@register_kernel(Requantize)
def _requantize(node: Requantize, inp: TensorInfo, out: TensorInfo, pipeline: str) -> Kernel:
    s = node.shifts(inp)
    if pipeline != "int64":  # not fused (e.g. after a pooling node): the same integers carried in float64
        return _requantize_float(s, inp, out)
    mult = inp.mult.astype(np.int64)
    lo, hi = out.lo, out.hi
    if np.all(s >= 1):
        half = np.int64(1) << (s - 1)

        def kernel(acc: np.ndarray) -> np.ndarray:
            v = acc * mult
            v += half
            v >>= s  # arithmetic shift = floor division by 2**s
            return _clamp(v, lo, hi)

        return kernel
    right = s >= 1
    half = np.where(right, np.int64(1) << np.maximum(s - 1, 0), 0)
    rs = np.where(right, s, 0)
    ls = np.where(right, 0, np.minimum(-s, -SHIFT_MIN))

    def kernel_mixed(acc: np.ndarray) -> np.ndarray:
        v = acc * mult
        up = np.clip(v, -LSHIFT_CLIP, LSHIFT_CLIP) << ls
        down = (v + half) >> rs
        return _clamp(np.where(right, down, up), lo, hi)

    return kernel_mixed


def _requantize_float(s: np.ndarray, inp: TensorInfo, out: TensorInfo) -> Kernel:
    """Requantize on integers carried in float64: ``floor(acc * m * 2**-s (+ 1/2))`` clamped.

    Exact and equal to the int64 kernel: ``|acc * m| < 2**52`` (checked when the graph is built), the
    power-of-two scaling is exact, adding 1/2 (only where ``s >= 1``) keeps every bit, and a left shift
    that the int64 kernel clips saturates the clamp either way.
    """
    mult = inp.mult.astype(np.float64)
    scale = np.ldexp(1.0, -s)
    offset = np.where(s >= 1, 0.5, 0.0)
    lo, hi = out.lo.astype(np.float64), out.hi.astype(np.float64)

    def kernel(acc: np.ndarray) -> np.ndarray:
        v = acc * mult
        v *= scale
        v += offset
        np.floor(v, out=v)
        return _clamp(v, lo, hi)

    return kernel


@register_kernel(DequantizeOutput)
def _dequantize(node: DequantizeOutput, inp: TensorInfo, out: TensorInfo, pipeline: str) -> Kernel:
    scales = DequantizeOutput.scales(inp)

    def kernel(acc: np.ndarray) -> np.ndarray:
        y = acc.astype(np.float64)
        y *= scales
        return y

    return kernel


def _fused_float(graph: IntegerGraph, i: int) -> Kernel | None:
    """Float-pipeline kernel for ``IntegerLinear`` node ``i`` fused with the node after it (None: no fusion)."""
    node, after = graph.nodes[i], graph.nodes[i + 1] if i + 1 < len(graph.nodes) else None
    if not isinstance(node, IntegerLinear) or node.layout != "flat" or type(after) not in (Requantize, DequantizeOutput):
        return None
    if not node._report.float64_exact:
        raise EngineInputError(f"layer '{node.name}' is too wide for the exact float64 path; use backend='int64'")
    acc_info, out_info = graph.infos[i + 1], graph.infos[i + 2]
    w_eff = _effective_weight(node, graph.infos[i]).astype(np.float64)
    if isinstance(after, DequantizeOutput):
        factor = DequantizeOutput.scales(acc_info)
        offset = node.bias.astype(np.float64) * factor
    else:
        s = after.shifts(acc_info)
        factor = np.ldexp(acc_info.mult.astype(np.float64), -s)  # m * 2**-s, exact
        offset = node.bias.astype(np.float64) * factor + np.where(s >= 1, 0.5, 0.0)
    wt = np.ascontiguousarray(w_eff.T * factor)
    wt32 = np.ascontiguousarray(w_eff.T.astype(np.float32)) if node._report.float32_exact else None

    def dot(a: np.ndarray) -> np.ndarray:
        if wt32 is not None and len(a) >= FLOAT32_MIN_BATCH:
            v = (a.astype(np.float32) @ wt32).astype(np.float64)  # exact integers below 2**24
            v *= factor
        else:
            v = a @ wt
        v += offset
        return v

    if isinstance(after, DequantizeOutput):
        return dot
    lo, hi = out_info.lo.astype(np.float64), out_info.hi.astype(np.float64)

    def requant(a: np.ndarray) -> np.ndarray:
        v = dot(a)
        np.floor(v, out=v)
        return _clamp(v, lo, hi)

    return requant


def compile_graph(graph: IntegerGraph, pipeline: str) -> list[Kernel]:
    """The kernels for ``pipeline`` (``"int64"`` or ``"float"``, the latter with fusion), cached on the graph."""
    cached = graph._compiled.get(pipeline)
    if cached is not None:
        return cached
    kernels: list[Kernel] = []
    i = 0
    while i < len(graph.nodes):
        fused = _fused_float(graph, i) if pipeline == "float" else None
        if fused is not None:
            kernels.append(fused)
            i += 2
            continue
        node = graph.nodes[i]
        factory = _KERNELS.get(type(node))
        if factory is None:
            raise EngineInputError(f"no engine kernel is registered for node type '{node.op}'")
        kernels.append(factory(node, graph.infos[i], graph.infos[i + 1], pipeline))
        i += 1
    graph._compiled[pipeline] = kernels
    return kernels


def float_path_exact(graph: IntegerGraph) -> bool:
    """Whether every layer's bounds allow the exact float64 (BLAS) pipeline."""
    return all(layer.float64_exact for layer in graph.layers)


def _prepare(graph: IntegerGraph, x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] != graph.input_dim:
        raise EngineInputError(f"input must be a 2-D array [rows, {graph.input_dim}], got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise EngineInputError(f"input must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise EngineInputError(f"input row {bad[0]}, feature {bad[1]} is {arr[tuple(bad)]}: NaN/inf inputs are not supported")
    return arr


def run_graph(graph: IntegerGraph, x: np.ndarray, backend: str = "auto") -> np.ndarray:
    """Logits of ``x`` (``[n, input_dim]``, float32 or float64) as float64 ``[n, output_dim]``.

    Example:
        >>> import numpy as np
        >>> from mpqat.export.ir import IntegerGraph, QuantizeInput, IntegerLinear, DequantizeOutput
        >>> g = IntegerGraph([QuantizeInput(np.array([-1]), np.array([8]), signed=True),
        ...                   IntegerLinear(np.array([[1]]), np.array([2]), np.array([0]), np.array([1]),
        ...                                 np.array([0]), acc_exponent=-1), DequantizeOutput()])
        >>> run_graph(g, np.array([[0.74]], dtype=np.float32)).tolist()   # round(1.48) * 2**-1
        [[0.5]]
    """
    if backend not in BACKENDS:
        raise EngineInputError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    h = _prepare(graph, x)
    if backend == "auto":
        backend = "float" if len(h) >= FLOAT_MIN_BATCH and float_path_exact(graph) else "int64"
    kernels = compile_graph(graph, backend)
    widest = max(info.size * int(np.prod(info.spatial)) for info in graph.infos)
    maps = any(info.spatial for info in graph.infos)
    block = max(1, MAP_BLOCK_ELEMENTS // max(widest, 1) if maps else len(h))
    outs = []
    for start in range(0, max(len(h), 1), block):  # feature maps: rows in blocks, bounded memory
        part = h[start : start + block]
        for kernel in kernels:
            part = kernel(part)
        outs.append(part)
    return outs[0] if len(outs) == 1 else np.concatenate(outs)
