"""Plain functions behind ``mpqat export``, ``mpqat run`` and ``mpqat inspect`` (the CLI wires them to click).

Example:
    >>> info = export_run("runs/adult-nmp", "adult.mpq", onnx_path="adult.onnx")   # doctest: +SKIP
    >>> info["bit_identical_rows"] == info["test_rows"]                             # doctest: +SKIP
    True
    >>> print(inspect_graph("adult.mpq"))                                            # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpqat.errors import ExportError
from mpqat.export.bench import float_twin, state_dict_bytes
from mpqat.export.convert import export
from mpqat.export.fileformat import VERSION, size_report
from mpqat.export.ir import IntegerGraph, IntegerLinear

EXAMPLE_ROWS = 256


def export_run(run_dir: str | Path, out_mpq: str | Path, onnx_path: str | Path | None = None,
               c_dir: str | Path | None = None) -> dict[str, Any]:
    """Export a finished run to ``out_mpq`` (and optionally ONNX and C); returns what was written and checked.

    The graph is checked against the run's model on every test row (bit for bit) before anything is
    written; a mismatch is an :class:`ExportError`. The result reports the file size next to the bit
    budget of :mod:`mpqat.cost` (weight bits / 8 + declared metadata) and the FP32 ``state_dict`` size.

    Example: see the module docstring.
    """
    from mpqat.cost import model_cost
    from mpqat.runs import load_run
    from mpqat.train import predict_logits

    run = load_run(run_dir)
    splits = run.splits()
    X_test = np.ascontiguousarray(splits.X_test, dtype=np.float32)
    X_example = np.ascontiguousarray(getattr(splits, "X_train", X_test)[:EXAMPLE_ROWS], dtype=np.float32)
    graph = export(run.model, torch.from_numpy(X_example))
    info = getattr(run, "info", None) or {}
    graph.meta.update({"dataset": run.metrics.get("dataset") or info.get("dataset"),
                       "method": getattr(run.recipe, "method", None)})
    expected = predict_logits(run.model, X_test)
    got = graph.run(X_test)
    identical = int(np.all(expected == got, axis=1).sum()) if len(X_test) else 0
    if identical != len(X_test):
        raise ExportError(f"the integer graph matches the model on only {identical} of {len(X_test)} test rows; "
                          "nothing was written (please report this as a bug)")
    file_bytes = graph.save(out_mpq)
    sizes = size_report(graph)
    budget = model_cost(run.model).size_bytes
    result: dict[str, Any] = {
        "mpq_path": str(out_mpq),
        "file_bytes": file_bytes,
        "budget_bytes": budget,
        "ratio_to_budget": file_bytes / budget if budget else float("inf"),
        "weight_bytes_ideal": sizes["weight_bytes_ideal"],
        "weight_bytes_packed": sizes["weight_bytes_packed"],
        "declared_metadata_bytes": budget - sizes["weight_bytes_ideal"],
        "fp32_state_dict_bytes": state_dict_bytes(float_twin(run.model)),
        "test_rows": len(X_test),
        "bit_identical_rows": identical,
        "layers": [layer.to_dict() for layer in graph.layers],
    }
    if onnx_path is not None:
        result["onnx_path"] = str(graph.to_onnx(onnx_path))
        result.update(_check_onnx(onnx_path, X_test, got))
    if c_dir is not None:
        result["c_files"] = [str(p) for p in graph.to_c(c_dir)]
    return result


def _check_onnx(path: str | Path, X: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"onnx_checked": False}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": X})[0] if len(X) else expected
    return {"onnx_checked": True, "onnx_bit_identical_rows": int(np.all(out == expected, axis=1).sum()),
            "onnx_max_abs_diff": float(np.abs(out - expected).max()) if len(X) else 0.0}


def run_graph(mpq_path: str | Path, dataset: str, target: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Test metrics of an ``.mpq`` graph computed by the integer engine (same keys as ``metrics.json``).

    Example:
        >>> run_graph("adult.mpq", "adult", seed=0)["test_accuracy"]   # doctest: +SKIP
        0.85
    """
    from mpqat.data import load_dataset
    from mpqat.metrics import classification_metrics

    graph = IntegerGraph.load(mpq_path)
    splits = load_dataset(dataset, target=target, seed=seed)
    X = np.ascontiguousarray(splits.X_test, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != graph.input_dim:
        raise ExportError(f"'{mpq_path}' takes {graph.input_dim} features but dataset '{dataset}' has "
                          f"{X.shape[1] if X.ndim == 2 else X.shape}; was the model trained on another dataset or target?")
    t0 = time.perf_counter()
    logits = graph.run(X)
    seconds = time.perf_counter() - t0
    if logits.shape[1] < int(np.max(splits.y_test, initial=0)) + 1:
        raise ExportError(f"'{mpq_path}' has {logits.shape[1]} outputs but dataset '{dataset}' has more classes")
    return {"dataset": dataset, "target": target, "seed": seed, "engine": "mpqat-integer",
            **classification_metrics(logits, np.asarray(splits.y_test)),
            "n_test": len(X), "test_infer_seconds": seconds}


def _fmt_hist(hist: dict[int, int]) -> str:
    return ", ".join(f"{bits}b x{count}" for bits, count in sorted(hist.items()))


def inspect_graph(mpq_path: str | Path) -> str:
    """A human-readable description: layers, bit-width histograms, bytes per part, size vs bit budget.

    Example: see the module docstring.
    """
    graph = IntegerGraph.load(mpq_path)
    sizes = size_report(graph)
    dims = [graph.input_dim] + [layer.out_features for layer in graph.layers]
    lines = [
        f"{mpq_path}: .mpq v{VERSION}, {sizes['file_bytes']} bytes, {' -> '.join(map(str, dims))}",
        "nodes: " + " -> ".join(n.op for n in graph.nodes),
        "layers:",
    ]
    weight_hist: dict[int, int] = {}
    for layer in graph.layers:
        lines.append(
            f"  {layer.name or layer.index:>6}  {layer.in_features:>5} -> {layer.out_features:<5} weights [{_fmt_hist(layer.weight_bits)}]"
            f"  inputs [{_fmt_hist(layer.act_bits)}]  accumulator {layer.accumulator} ({layer.acc_bits} bits)"
        )
        for bits, count in layer.weight_bits.items():
            weight_hist[bits] = weight_hist.get(bits, 0) + count * layer.in_features
    total = sum(weight_hist.values()) or 1
    lines.append("weight bit-widths (share of weights): "
                 + ", ".join(f"{b}b {100 * c / total:.1f}%" for b, c in sorted(weight_hist.items())))
    groups: dict[str, int] = {}
    for part, nbytes in sizes["parts"].items():
        if part == "manifest_uncompressed":
            continue
        key = part.rsplit(".", 1)[-1]
        key = {"mult": "scales", "scale_exp": "scales", "exponent": "act steps", "bits": "act widths"}.get(key, key)
        groups[key] = groups.get(key, 0) + nbytes
    lines.append("bytes: " + ", ".join(f"{k} {v}" for k, v in groups.items())
                 + f" (manifest uncompressed {sizes['parts']['manifest_uncompressed']})")
    lines.append(
        f"budget: weights {sizes['weight_bytes_ideal']:.0f} B ({sizes['weight_bits']} bits) + declared metadata "
        f"{sizes['declared_metadata_bytes']:.0f} B = {sizes['budget_bytes']:.0f} B; file = {sizes['ratio_to_budget']:.3f} x budget"
    )
    n_linear = sum(isinstance(n, IntegerLinear) for n in graph.nodes)
    lines.append(f"{n_linear} integer layers; accumulators: "
                 + ", ".join(f"{layer.name or layer.index}={layer.accumulator}" for layer in graph.layers))
    return "\n".join(lines)
