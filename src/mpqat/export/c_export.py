"""``graph.to_c(dir)``: dependency-free C99 ``model.h``/``model.c`` with the packed weights as const arrays.

The generated API (see the header for details)::

    int  mpqat_quantize_input(const float *x, int32_t *codes);   /* float -> input codes; -1 on NaN/inf */
    void mpqat_predict_int(const int32_t *codes, int64_t *acc);   /* integer-only inference */
    int  mpqat_predict(const float *x, double *logits);          /* both, then acc[j] * mpqat_output_scale[j] */

Arithmetic: integers only (``int32_t`` accumulators where the export-time bound fits, else
``int64_t``; ``int64_t`` for the requantization product), with shifts written so that no signed
overflow, negative left shift or implementation-defined right shift occurs. ``double`` is used only
for the input quantization (``floor(x * 2**-k + 0.5)``, the product is exact) and the final
``(double)acc * scale`` (one IEEE multiply), the same operations as the NumPy engine, so the results
are bit-identical when compiled as C99 with IEEE doubles (e.g. ``gcc -std=c99 -O2 -ffp-contract=off``;
x87 extended precision, ``-ffast-math`` or flush-to-zero modes void the guarantee). No ``math.h``.

Graphs with feature maps (convs, pools, flatten; :mod:`mpqat.export.conv`) are written by
:func:`mpqat.export.conv.conv_graph_to_c`, with the same API and runtime helpers.

Weights are read from the packed bit stream on the fly: rows grouped by bit-width, each group a
little-endian bit stream (see :mod:`mpqat.export.pack`), with a row-index table mapping the
grouped order back to the output neurons when the widths vary.

Example:
    >>> import numpy as np, tempfile
    >>> from mpqat.export.ir import IntegerGraph, QuantizeInput, IntegerLinear, DequantizeOutput
    >>> g = IntegerGraph([QuantizeInput(np.array([0]), np.array([4]), signed=True),
    ...                   IntegerLinear(np.array([[2]]), np.array([3]), np.array([1]), np.array([1]),
    ...                                 np.array([0]), acc_exponent=0), DequantizeOutput()])
    >>> sorted(p.name for p in graph_to_c(g, tempfile.mkdtemp()))
    ['model.c', 'model.h']
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mpqat.checkpoint import atomic_write_text
from mpqat.errors import ExportError
from mpqat.export import pack
from mpqat.export.ir import LSHIFT_CLIP, DequantizeOutput, IntegerLinear, QuantizeInput, Requantize, TensorInfo
from mpqat.export.threshold import ThresholdRequantize

if TYPE_CHECKING:
    from mpqat.export.ir import IntegerGraph

_RUNTIME = r"""
/* ---- runtime helpers ---- */
#define MPQ_LCLIP ((int64_t){lclip})

/* Code of `bits` bits at bit position bp of a little-endian bit stream (array padded by 2 bytes). */
static int32_t mpq_code(const uint8_t *p, uint32_t bp, unsigned bits)
{{
    uint32_t byte = bp >> 3, off = bp & 7u;
    uint32_t v = (uint32_t)p[byte] | ((uint32_t)p[byte + 1] << 8) | ((uint32_t)p[byte + 2] << 16);
    v = (v >> off) & ((1u << bits) - 1u);
    if (bits == 1u) return (int32_t)(2u * v) - 1;
    return (v & (1u << (bits - 1u))) ? (int32_t)v - (int32_t)(1u << bits) : (int32_t)v;
}}
"""

_REQUANT_RUNTIME = r"""
/* clamp(floor(acc * m / 2^s + 1/2), lo, hi) with round half up; s in [-20, 53], |acc * m| < 2^52. */
static int32_t mpq_requant(int64_t acc, int64_t m, int s, int32_t lo, int32_t hi)
{{
    int64_t v = acc * m, q;
    if (s >= 1) {{
        int64_t t = v + ((int64_t)1 << (s - 1));
        if (t >= 0) q = t >> s;
        else q = -(int64_t)(((uint64_t)(-t) + (((uint64_t)1 << s) - 1u)) >> s);
    }} else {{
        if (v > MPQ_LCLIP) v = MPQ_LCLIP;
        if (v < -MPQ_LCLIP) v = -MPQ_LCLIP;
        q = v * ((int64_t)1 << (-s));
    }}
    if (q < lo) q = lo;
    if (q > hi) q = hi;
    return (int32_t)q;
}}
"""


_THRESHOLD_RUNTIME = r"""
/* #{k : t[k] <= v} for `levels` sorted thresholds (v clamped at 0 first when relu): binary search. */
static int32_t mpq_threshold(int64_t v, const int64_t *t, int32_t levels, int relu)
{
    int32_t lo = 0, hi = levels;
    if (relu && v < 0) v = 0;
    while (lo < hi) {
        int32_t mid = lo + (hi - lo) / 2;
        if (t[mid] <= v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}
"""


def _ctype(arr: np.ndarray) -> str:
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    for name, (a, b) in {"uint8_t": (0, 255), "int8_t": (-128, 127), "uint16_t": (0, 65535),
                         "int16_t": (-32768, 32767), "int32_t": (-(2**31), 2**31 - 1)}.items():
        if a <= lo and hi <= b:
            return name
    return "int64_t"


def _literal(value: int, ctype: str) -> str:
    if ctype == "int64_t":
        return f"INT64_C({value})"
    if ctype == "int32_t" and value == -(2**31):
        return "(-2147483647 - 1)"
    return str(value)


def _array(name: str, values: np.ndarray, ctype: str | None = None, per_line: int = 16) -> str:
    values = np.asarray(values).reshape(-1)
    ctype = ctype or _ctype(values.astype(np.int64))
    if ctype == "double":
        items = [float(v).hex() for v in values]
    else:
        items = [_literal(int(v), ctype) for v in values]
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)] or ["0"]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{max(len(items), 1)}] = {{\n    {body}\n}};\n"


class _CWriter:
    def __init__(self, graph: IntegerGraph) -> None:
        self.graph = graph
        self.data: list[str] = []
        self.funcs: list[str] = []
        self.calls: list[str] = []

    def quantize_input(self, node: QuantizeInput, out: TensorInfo) -> None:
        d = self.graph.input_dim
        self.data.append(_array("IN_SCALE", np.ldexp(1.0, -node.exponent.astype(np.int64)), "double"))
        self.data.append(_array("IN_LO", out.lo, "int32_t"))
        self.data.append(_array("IN_HI", out.hi, "int32_t"))
        self.funcs.append(f"""
int mpqat_quantize_input(const float *x, int32_t *codes)
{{
    int i;
    for (i = 0; i < {d}; ++i) {{
        double xd = (double)x[i];
        double z;
        int32_t q;
        if (!(xd - xd == 0.0)) return -1; /* NaN or infinity */
        z = xd * IN_SCALE[i];  /* exact: a power of two */
        z = z + 0.5;
        if (z <= (double)IN_LO[i]) q = IN_LO[i];
        else if (z >= (double)IN_HI[i]) q = IN_HI[i];
        else {{
            q = (int32_t)z;  /* truncation, then floor */
            if ((double)q > z) q -= 1;
        }}
        codes[i] = q;
    }}
    return 0;
}}
""")

    def linear(self, index: int, node: IntegerLinear, inp: TensorInfo, out: TensorInfo, after: object,
               after_out: TensorInfo | None) -> None:
        report = node._report
        acc_t = "int32_t" if report.accumulator == "int32" else "int64_t"
        n_in, n_out = node.in_features, node.out_features
        p = f"L{index}"
        packed = pack.pack_rows(node.weight, node.weight_bits) + b"\x00\x00"
        self.data.append(f"/* layer {index} '{node.name}': {n_in} -> {n_out}, weight bits {report.weight_bits}, "
                         f"accumulator {acc_t} (bound 2^{np.log2(report.acc_bound + 1):.1f}) */\n")
        self.data.append(_array(f"{p}_W", np.frombuffer(packed, np.uint8), "uint8_t"))
        self.data.append(_array(f"{p}_B", node.bias))
        shift = node.input_shifts(inp)
        has_shift = bool(np.any(shift != 0))
        if has_shift:
            self.data.append(_array(f"{p}_SH", shift, "uint8_t"))
        order = pack.row_order(node.weight_bits)
        identity = bool(np.array_equal(order, np.arange(n_out)))
        if not identity:
            self.data.append(_array(f"{p}_ROWS", order))
        if isinstance(after, Requantize):
            self.data.append(_array(f"{p}_M", out.mult))
            self.data.append(_array(f"{p}_S", after.shifts(out), "int8_t"))
            self.data.append(_array(f"{p}_LO", after_out.lo, "int32_t"))
            self.data.append(_array(f"{p}_HI", after_out.hi, "int32_t"))
            out_decl, epilogue = "int32_t *out", (
                f"out[j] = mpq_requant((int64_t)s, (int64_t){p}_M[j], (int){p}_S[j], {p}_LO[j], {p}_HI[j]);")
        elif isinstance(after, ThresholdRequantize):  # ADQ / N2UQ: count integer thresholds on acc * m
            table = after.integer_thresholds()
            levels = table.shape[1]
            self.data.append(_array(f"{p}_M", out.mult))
            self.data.append(_array(f"{p}_T", table, "int64_t"))
            out_decl, epilogue = "int32_t *out", (
                f"out[j] = mpq_threshold((int64_t)s * (int64_t){p}_M[j], {p}_T + j * {levels}u, {levels}, "
                f"{int(bool(after.relu))});")
        elif isinstance(after, DequantizeOutput):
            out_decl, epilogue = "int64_t *out", "out[j] = (int64_t)s;"
        else:
            raise ExportError(f"C export: no C emitter for node '{getattr(after, 'op', after)}' after an integer linear")
        x_init = f"(({acc_t})1 << {p}_SH[i])" if has_shift else None
        groups = []
        start, offset = 0, 0
        for bits, rows in pack.row_groups(node.weight_bits):
            row = f"{p}_ROWS[{start} + r]" if not identity else f"{start} + r"
            dot = (f"        for (i = 0; i < {n_in}; ++i, bp += {bits}u) s += ({acc_t})mpq_code(w, bp, {bits}u) * x[i];\n"
                   if bits > 0 else "")
            groups.append(f"""    {{ /* {rows} rows at {bits} bits */
        const uint8_t *w = {p}_W + {offset};
        uint32_t bp = 0;
        (void)w; (void)bp;
        for (r = 0; r < {rows}; ++r) {{
        uint32_t j = (uint32_t)({row});
        {acc_t} s = ({acc_t}){p}_B[j];
{dot}        {epilogue}
        }}
    }}
""")
            start += rows
            offset += pack.packed_nbytes(rows * n_in, bits)
        x_line = f"x[i] = ({acc_t})a[i] * {x_init};" if x_init else f"x[i] = ({acc_t})a[i];"
        self.funcs.append(f"""
static void mpq_layer{index}(const int32_t *a, {out_decl})
{{
    {acc_t} x[{max(n_in, 1)}];
    uint32_t r;
    int i;
    for (i = 0; i < {n_in}; ++i) {x_line}
{''.join(groups)}}}
""")

    def predict_int(self) -> str:
        nodes = self.graph.nodes
        lines, bufs = [], []
        current = "in"
        for index, node in enumerate(nodes):
            if isinstance(node, IntegerLinear):
                nxt = nodes[index + 1]
                if isinstance(nxt, DequantizeOutput):
                    lines.append(f"    mpq_layer{index}({current}, acc);")
                else:
                    buf = f"h{index}"
                    bufs.append(f"    int32_t {buf}[{node.out_features}];")
                    lines.append(f"    mpq_layer{index}({current}, {buf});")
                    current = buf
        d = self.graph.input_dim
        return f"""
void mpqat_predict_int(const int32_t *codes, int64_t *acc)
{{
    int32_t in[{d}];
{chr(10).join(bufs)}
    int i;
    for (i = 0; i < {d}; ++i) in[i] = codes[i] < IN_LO[i] ? IN_LO[i] : (codes[i] > IN_HI[i] ? IN_HI[i] : codes[i]);
{chr(10).join(lines)}
}}

int mpqat_predict(const float *x, double *logits)
{{
    int32_t codes[{d}];
    int64_t acc[{self.graph.output_dim}];
    int j;
    if (mpqat_quantize_input(x, codes) != 0) return -1;
    mpqat_predict_int(codes, acc);
    for (j = 0; j < {self.graph.output_dim}; ++j) logits[j] = (double)acc[j] * mpqat_output_scale[j];
    return 0;
}}
"""


def _header(graph: IntegerGraph) -> str:
    layers = ", ".join(f"{layer.in_features}->{layer.out_features}" for layer in graph.layers)
    return f"""/* Generated by mpqat: integer-only inference of an exported model (layers {layers}). C99, no dependencies. */
#ifndef MPQAT_MODEL_H
#define MPQAT_MODEL_H

#include <stdint.h>

#define MPQAT_N_INPUTS {graph.input_dim}
#define MPQAT_N_OUTPUTS {graph.output_dim}

/* Quantize float inputs to the integer input codes: clamp(floor(x[i] * 2^-k[i] + 0.5), lo[i], hi[i]).
   Returns 0, or -1 if an input is NaN or infinite. */
int mpqat_quantize_input(const float *x, int32_t *codes);

/* Integer-only inference from input codes (out-of-range codes are clamped). Writes the raw output
   accumulators; the logits are acc[j] * mpqat_output_scale[j]. */
void mpqat_predict_int(const int32_t *codes, int64_t *acc);

/* Float in, float64 logits out (bit-identical to mpqat's engine). Returns 0, or -1 on NaN/inf input. */
int mpqat_predict(const float *x, double *logits);

/* Exact dyadic output scales m_j * 2^(K - e_j). */
extern const double mpqat_output_scale[MPQAT_N_OUTPUTS];

#endif
"""


_HARNESS = r"""/* Test harness generated by mpqat: ./model_main INPUT.f32 ROWS LOGITS.f64 ACC.i64 */
#include <stdio.h>
#include <stdlib.h>
#include "model.h"

int main(int argc, char **argv)
{
    FILE *fin, *flog, *facc;
    long rows, r;
    float x[MPQAT_N_INPUTS];
    int32_t codes[MPQAT_N_INPUTS];
    double logits[MPQAT_N_OUTPUTS];
    int64_t acc[MPQAT_N_OUTPUTS];
    if (argc != 5) { fprintf(stderr, "usage: %s INPUT.f32 ROWS LOGITS.f64 ACC.i64\n", argv[0]); return 2; }
    rows = strtol(argv[2], NULL, 10);
    fin = fopen(argv[1], "rb"); flog = fopen(argv[3], "wb"); facc = fopen(argv[4], "wb");
    if (!fin || !flog || !facc) { fprintf(stderr, "cannot open files\n"); return 2; }
    for (r = 0; r < rows; ++r) {
        if (fread(x, sizeof(float), MPQAT_N_INPUTS, fin) != MPQAT_N_INPUTS) { fprintf(stderr, "short input\n"); return 2; }
        if (mpqat_predict(x, logits) != 0) { fprintf(stderr, "bad input row %ld\n", r); return 3; }
        if (mpqat_quantize_input(x, codes) != 0) return 3;
        mpqat_predict_int(codes, acc);
        fwrite(logits, sizeof(double), MPQAT_N_OUTPUTS, flog);
        fwrite(acc, sizeof(int64_t), MPQAT_N_OUTPUTS, facc);
    }
    fclose(fin); fclose(flog); fclose(facc);
    return 0;
}
"""


def graph_to_c(graph: IntegerGraph, directory: str | Path, harness: bool = False) -> list[Path]:
    """Write ``model.h`` and ``model.c`` (and, with ``harness=True``, a test ``main.c``) into ``directory``.

    Example: see the module docstring. Compile with ``gcc -std=c99 -O2 -ffp-contract=off -c model.c``.
    """
    nodes = graph.nodes
    if any(n.layout == "spatial" for n in nodes):  # feature maps: convs, pools, (un)flatten
        from mpqat.export.conv import conv_graph_to_c

        return conv_graph_to_c(graph, directory, harness=harness)
    if not isinstance(nodes[0], QuantizeInput) or not isinstance(nodes[-1], DequantizeOutput):
        raise ExportError("C export supports graphs from quantize_input to dequantize_output")
    w = _CWriter(graph)
    for index, node in enumerate(nodes):
        out = graph.infos[index + 1]
        if isinstance(node, QuantizeInput):
            if index != 0:
                raise ExportError("C export: quantize_input must be the first node")
            w.quantize_input(node, out)
        elif isinstance(node, IntegerLinear):
            after = nodes[index + 1]
            w.linear(index, node, graph.infos[index], out, after, graph.infos[index + 2])
        elif not isinstance(node, Requantize | DequantizeOutput | ThresholdRequantize):
            raise ExportError(f"C export: node type '{node.op}' has no C emitter")
    scales = DequantizeOutput.scales(graph.infos[-2])
    source = (
        "/* Generated by mpqat. C99, integer-only except the input quantization and output scaling. */\n"
        '#include "model.h"\n\n'
        + _RUNTIME.format(lclip=LSHIFT_CLIP)
        + (_REQUANT_RUNTIME.format(lclip=LSHIFT_CLIP) if any(isinstance(n, Requantize) for n in nodes) else "")
        + (_THRESHOLD_RUNTIME if any(isinstance(n, ThresholdRequantize) for n in nodes) else "")
        + "\n/* ---- parameters ---- */\n"
        + "".join(w.data)
        + "const double mpqat_output_scale[MPQAT_N_OUTPUTS] = {"
        + ", ".join(float(s).hex() for s in scales) + "};\n"
        + "".join(w.funcs)
        + w.predict_int()
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "model.h", directory / "model.c"]
    atomic_write_text(paths[0], _header(graph))
    atomic_write_text(paths[1], source)
    if harness:
        paths.append(directory / "main.c")
        atomic_write_text(paths[2], _HARNESS)
    return paths
