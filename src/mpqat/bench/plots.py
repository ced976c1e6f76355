"""Pareto plots: test accuracy against BitOps (log x) and against model size, one PNG each per dataset.

Every method of the dataset is a point (mean over seeds) with error bars (std over seeds) on the
same axes; the Pareto front (no other point is both cheaper and at least as accurate) is drawn as
a staircase; FP32 is a horizontal reference line (with a ±std band), not a point.

Example:
    >>> pareto_front([4.0, 1.0, 2.0, 3.0], [0.9, 0.7, 0.6, 0.95])
    [1, 3]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


COSTS = {"bitops": ("bitops", "BitOps per inference (log scale)", "BitOps"),
         "bytes": ("size_bytes", "model size in bytes (log scale)", "size")}
_MARKERS = "osD^v<>PXph*"


def pareto_front(costs: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (lower or equal cost and higher or equal
    accuracy, one of them strictly), ordered by increasing cost."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -accuracies[i]))
    front, best = [], float("-inf")
    for i in order:
        if accuracies[i] > best:
            front.append(i)
            best = accuracies[i]
    return front


def _stat(cell: dict[str, Any], name: str) -> tuple[float | None, float]:
    s = (cell.get("stats") or {}).get(name) or {}
    return s.get("mean"), s.get("std") or 0.0


def pareto_figure(cells: Sequence[dict[str, Any]], cost: str = "bitops", title: str | None = None):
    """A matplotlib Figure (Agg) of accuracy vs ``cost`` (``"bitops"`` or ``"bytes"``) for one dataset.

    The FP32 line has ``gid="fp32-reference"`` and the front ``gid="pareto-front"``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    field, xlabel, what = COSTS[cost]
    fig = Figure(figsize=(9.5, 5.5))
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(c.get("method") or c["label"] for c in cells))
    cmap = matplotlib.colormaps["tab10"]
    per_method: dict[str, int] = {}
    xs, ys = [], []
    fp32 = None
    for cell in cells:
        acc, acc_std = _stat(cell, "test_accuracy")
        x, x_std = _stat(cell, field)
        if acc is None:
            continue
        if cell.get("reference"):
            fp32 = fp32 or (acc, acc_std)
            continue
        if x is None or x <= 0:
            continue
        method = cell.get("method") or cell["label"]
        k = per_method.get(method, 0)
        per_method[method] = k + 1
        ax.errorbar([x], [acc * 100], xerr=[x_std] if x_std else None, yerr=[acc_std * 100] if acc_std else None,
                    fmt=_MARKERS[k % len(_MARKERS)], color=cmap(methods.index(method) % 10), capsize=3,
                    markersize=6, label=cell["label"], alpha=0.9)
        xs.append(x)
        ys.append(acc * 100)
    if xs:
        front = pareto_front(xs, ys)
        fx, fy = [xs[i] for i in front], [ys[i] for i in front]
        ax.plot(fx, fy, drawstyle="steps-post", color="0.35", linewidth=1.2, linestyle=":", label="Pareto front",
                gid="pareto-front", zorder=1)
        ax.set_xscale("log")
    if fp32 is not None:
        acc, std = fp32
        ax.axhline(acc * 100, color="black", linestyle="--", linewidth=1.2, label=f"FP32 ({acc * 100:.2f}%)",
                   gid="fp32-reference")
        if std:
            ax.axhspan((acc - std) * 100, (acc + std) * 100, color="black", alpha=0.08, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or f"accuracy vs {what}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def write_plots(summary: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``<dataset>-acc-vs-bitops.png`` and ``<dataset>-acc-vs-bytes.png`` per dataset (and model)."""
    from mpqat.bench.table import group_by_dataset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_by_dataset(summary["cells"])
    multi_model = len({m for _, m in groups}) > 1
    paths = []
    for (dataset, model), cells in groups.items():
        name = f"{dataset}-{model}" if multi_model and model else dataset
        for cost in COSTS:
            fig = pareto_figure(cells, cost, title=f"{name}: test accuracy vs {COSTS[cost][2]}")
            path = out_dir / f"{_slug(name)}-acc-vs-{cost}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            paths.append(path)
    return paths
