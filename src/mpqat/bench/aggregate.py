"""Aggregation: every run's record (``results.json``) and mean ± std per cell (``summary.json``).

A *cell* is one (dataset, label) pair: a method (at one budget, on one model) over its seeds.
A record's status is ``ok`` (trained now), ``cached`` (finished earlier), ``failed``, ``skipped``
(method or peer not available here) or ``pending`` (left out by a filter, not run yet).
Every numeric top-level field of the runs' ``metrics.json`` is aggregated over the seeds that
finished (``mean``, ``std`` = sample standard deviation with ``ddof=1``, 0 for a single seed,
and ``n``); so are the derived ratios ``bitops_ratio`` (BitOps / FP32 BitOps of the same
architecture) and ``size_ratio``. ``delta_vs_fp32`` is the test accuracy minus the FP32 cell's
(same dataset and model), paired by seed, in accuracy units (multiply by 100 for points); that
FP32 cell (the first finished one) has ``reference: true``.

Example:
    >>> records = [
    ...     {"dataset": "d", "label": "fp32", "method": "fp32", "model_label": "mlp", "seed": 0, "status": "ok",
    ...      "metrics": {"test_accuracy": 0.90, "bitops": 100.0, "fp32_bitops": 100.0}},
    ...     {"dataset": "d", "label": "w4", "method": "uniform", "model_label": "mlp", "seed": 0, "status": "ok",
    ...      "metrics": {"test_accuracy": 0.88, "bitops": 2.0, "fp32_bitops": 100.0}}]
    >>> cells = summarize(records)["cells"]
    >>> round(cells[1]["delta_vs_fp32"]["mean"], 4), cells[1]["stats"]["bitops_ratio"]["mean"]
    (-0.02, 0.02)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

#: record fields copied from the run spec into results.json
RECORD_KEYS = ("key", "suite", "dataset", "dataset_key", "label", "method_label", "model", "model_label", "kind",
               "method", "peer", "group", "budget", "seed", "run_dir", "note")


def make_record(spec: dict[str, Any], status: str, metrics: dict[str, Any] | None = None,
                error: str | None = None, reason: str | None = None, seconds: float | None = None) -> dict[str, Any]:
    """One row of ``results.json``: the run's identity, its status and its metrics (or error/reason)."""
    record = {k: spec.get(k) for k in RECORD_KEYS}
    record["status"] = status
    if metrics is not None:
        record["metrics"] = metrics
    if error is not None:
        record["error"] = error
    if reason is not None:
        record["reason"] = reason
    if seconds is not None:
        record["seconds"] = seconds
    return record


def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}`` over the finite values (sample std, ddof=1; 0.0 for one value).

    Example:
        >>> mean_std([1.0, 3.0])
        {'mean': 2.0, 'std': 1.4142135623730951, 'n': 2}
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _derived(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, num, den in (("bitops_ratio", "bitops", "fp32_bitops"), ("size_ratio", "size_bytes", "fp32_size_bytes")):
        if _numeric(metrics.get(num)) and _numeric(metrics.get(den)) and metrics[den]:
            out[name] = metrics[num] / metrics[den]
    return out


def _cell_key(record: dict[str, Any]) -> tuple[str, str]:
    return (record.get("dataset_key") or record["dataset"], record["label"])


def is_fp32(cell_or_record: dict[str, Any]) -> bool:
    """True for the FP32 reference (a recipe run whose method is ``fp32``)."""
    return cell_or_record.get("method") == "fp32" and cell_or_record.get("kind", "recipe") == "recipe"


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std per (dataset, label) cell, in first-seen order, plus the paired Δ vs FP32."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records:
        key = _cell_key(rec)
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = {
                "dataset": key[0], "label": rec["label"], "method": rec.get("method"), "kind": rec.get("kind", "recipe"),
                "model": rec.get("model"), "model_label": rec.get("model_label"), "group": rec.get("group"),
                "budget": rec.get("budget"), "peer": rec.get("peer"), "note": rec.get("note"),
                "seeds": [], "ok_seeds": [], "failed": [], "skipped": [], "pending": [], "_runs": [],
            }
        cell["seeds"].append(rec.get("seed"))
        status = rec.get("status")
        if status in ("ok", "cached") and isinstance(rec.get("metrics"), dict):
            cell["ok_seeds"].append(rec.get("seed"))
            cell["_runs"].append(rec)
        elif status == "skipped":
            cell["skipped"].append({"seed": rec.get("seed"), "reason": rec.get("reason")})
        elif status == "pending":
            cell["pending"].append(rec.get("seed"))
        else:
            cell["failed"].append({"seed": rec.get("seed"), "error": rec.get("error") or rec.get("reason")})
    for cell in cells.values():
        runs = cell["_runs"]
        fields: dict[str, list[float]] = {}
        for rec in runs:
            metrics = {**rec["metrics"], **_derived(rec["metrics"])}
            for name, value in metrics.items():
                if _numeric(value):
                    fields.setdefault(name, []).append(value)
        cell["stats"] = {name: mean_std(vals) for name, vals in fields.items()}
        cell["n_seeds"], cell["n_ok"] = len(cell["seeds"]), len(runs)
        if runs:
            cell["status"] = "ok" if not cell["failed"] else "partial"
        elif cell["failed"]:
            cell["status"] = "failed"
        elif cell["skipped"]:
            cell["status"] = "skipped"
        else:
            cell["status"] = "pending"
        cell["reason"] = (cell["skipped"][0]["reason"] if cell["status"] == "skipped"
                          else cell["failed"][0]["error"] if cell["failed"]
                          else "not run yet" if cell["status"] == "pending" else None)
    _add_deltas(cells)
    out = []
    for cell in cells.values():
        cell.pop("_runs")
        out.append(cell)
    return {"cells": out}


def _add_deltas(cells: dict[tuple[str, str], dict[str, Any]]) -> None:
    refs: dict[tuple[str, Any], dict[Any, float]] = {}
    for cell in cells.values():
        ref_key = (cell["dataset"], cell["model_label"])
        cell["reference"] = is_fp32(cell) and ref_key not in refs and bool(cell["_runs"])
        if cell["reference"]:
            refs[ref_key] = {r.get("seed"): r["metrics"].get("test_accuracy") for r in cell["_runs"]}
    for cell in cells.values():
        ref = refs.get((cell["dataset"], cell["model_label"]))
        pairs = []
        if ref is not None:
            for rec in cell["_runs"]:
                acc, base = rec["metrics"].get("test_accuracy"), ref.get(rec.get("seed"))
                if _numeric(acc) and _numeric(base):
                    pairs.append(acc - base)
        cell["delta_vs_fp32"] = mean_std(pairs) if pairs else None


def best_per_group(cells: Sequence[dict[str, Any]], metric: str = "test_accuracy") -> set[tuple[str, str]]:
    """``(dataset, label)`` of the cells with the best mean ``metric`` in their budget group
    (per dataset and model; ties all count; cells without a group are never best).

    Example:
        >>> cells = [{"dataset": "d", "label": "a", "group": "4-bit", "stats": {"test_accuracy": {"mean": 0.8}}},
        ...          {"dataset": "d", "label": "b", "group": "4-bit", "stats": {"test_accuracy": {"mean": 0.9}}}]
        >>> best_per_group(cells)
        {('d', 'b')}
    """
    groups: dict[tuple[Any, ...], list[tuple[float, tuple[str, str]]]] = {}
    for cell in cells:
        mean = (cell.get("stats") or {}).get(metric, {}).get("mean")
        if cell.get("group") is None or mean is None:
            continue
        groups.setdefault((cell["dataset"], cell.get("model_label"), cell["group"]), []).append(
            (mean, (cell["dataset"], cell["label"])))
    best: set[tuple[str, str]] = set()
    for members in groups.values():
        top = max(m for m, _ in members)
        best.update(key for m, key in members if m >= top - 1e-12)
    return best
