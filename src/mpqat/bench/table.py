"""The Markdown table of a suite: per dataset, one row per method, mean ± std over seeds.

Columns: test accuracy (%), Δ vs FP32 (points, paired by seed), average weight and activation
bits, BitOps and BitOps relative to FP32, size in bytes and relative to FP32, training seconds,
median training step time (ms) and its ratio to the FP32 MLP timed in the same process, peak RSS.
The best mean accuracy within each budget group is in bold. Skipped and failed runs keep their
row, with the reason.

Example:
    >>> cells = [{"dataset": "d", "label": "fp32", "method": "fp32", "kind": "recipe", "group": None,
    ...           "status": "ok", "n_ok": 1, "n_seeds": 1, "delta_vs_fp32": None,
    ...           "stats": {"test_accuracy": {"mean": 0.9, "std": 0.0, "n": 1}}}]
    >>> "| fp32 |" in markdown_table(cells)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mpqat.bench.aggregate import best_per_group

COLUMNS = ("Method", "Group", "Seeds", "Test acc. (%)", "Δ vs FP32 (pt)", "W bits", "A bits", "BitOps",
           "BitOps / FP32", "Size (B)", "Size / FP32", "Train (s)", "Step (ms)", "Step / FP32", "Peak RSS (MiB)")


def _stat(cell: dict[str, Any], name: str) -> dict[str, Any] | None:
    s = (cell.get("stats") or {}).get(name)
    return s if s and s.get("mean") is not None else None


def fmt_pm(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
    """``mean ± std`` (std shown only when there are several seeds and it is not zero).

    Example:
        >>> fmt_pm({"mean": 0.8512, "std": 0.004, "n": 3}, scale=100)
        '85.12 ± 0.40'
    """
    if stat is None or stat.get("mean") is None:
        return "–"
    sign = "+" if signed else ""
    text = f"{stat['mean'] * scale:{sign}.{digits}f}"
    std = stat.get("std")
    if stat.get("n", 1) > 1 and std and round(std * scale, digits) != 0:
        text += f" ± {std * scale:.{digits}f}"
    return text


def fmt_si(value: float | None, digits: int = 3) -> str:
    """Compact number with an SI suffix: ``1.23M``, ``45.6k``.

    Example:
        >>> fmt_si(1234567.0)
        '1.23M'
    """
    if value is None or not math.isfinite(value):
        return "–"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def _mean(cell: dict[str, Any], name: str) -> float | None:
    s = _stat(cell, name)
    return s["mean"] if s else None


def _pct(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.3g}%"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _short(text: str | None, limit: int = 90) -> str:
    text = (text or "").strip().splitlines()[0] if text else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table_rows(cells: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The table's rows (strings) for ``cells`` of one dataset, in order."""
    best = best_per_group(cells)
    rows = []
    for cell in cells:
        name = cell["label"] + (" (FP32 reference)" if cell.get("reference") else "")
        seeds = f"{cell.get('n_ok', 0)}/{cell.get('n_seeds', 0)}"
        group = cell.get("group") or ""
        if cell.get("status") in ("skipped", "failed", "pending"):
            text = "not run yet" if cell["status"] == "pending" else f"{cell['status']}: {_short(cell.get('reason'))}"
            row = [name, group, seeds, text] + ["–"] * (len(COLUMNS) - 4)
            rows.append([_escape(c) for c in row])
            continue
        acc = fmt_pm(_stat(cell, "test_accuracy"), scale=100)
        if (cell["dataset"], cell["label"]) in best:
            acc = f"**{acc}**"
        delta = "ref." if cell.get("reference") else fmt_pm(cell.get("delta_vs_fp32"), scale=100, signed=True)
        step = _stat(cell, "step_seconds")
        ratio = _stat(cell, "step_ratio_vs_fp32")
        peak = _mean(cell, "peak_rss_bytes")
        row = [
            name, group, seeds, acc, delta,
            fmt_pm(_stat(cell, "avg_weight_bits")), fmt_pm(_stat(cell, "avg_act_bits")),
            fmt_si(_mean(cell, "bitops")), _pct(_mean(cell, "bitops_ratio")),
            f"{_mean(cell, 'size_bytes'):,.0f}" if _mean(cell, "size_bytes") is not None else "–",
            _pct(_mean(cell, "size_ratio")),
            fmt_pm(_stat(cell, "train_seconds"), digits=2),
            fmt_pm(step, scale=1000, digits=3) if step else "–",
            (fmt_pm(ratio, digits=2) + "×") if ratio else "–",
            f"{peak / 2**20:.0f}" if peak is not None else "–",
        ]
        rows.append([_escape(c) for c in row])
    return rows


def markdown_table(cells: Sequence[dict[str, Any]]) -> str:
    """One Markdown table for the cells of one dataset (and model)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(cells)]
    return "\n".join(lines)


def group_by_dataset(cells: Sequence[dict[str, Any]]) -> dict[tuple[str, Any], list[dict[str, Any]]]:
    """Cells per (dataset, model label), in first-seen order."""
    out: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for cell in cells:
        out.setdefault((cell["dataset"], cell.get("model_label")), []).append(cell)
    return out


NOTES = """\
Test accuracy: mean ± sample std (ddof=1) over the seeds that finished (`Seeds` = finished/planned);
each seed is its own train/valid/test split and initialisation. Δ vs FP32: accuracy minus the FP32
run's of the same seed, in points. **Bold**: best mean accuracy within its budget group (`Group`).
W/A bits, BitOps and size follow `mpqat.cost` (BitOps = Σ b_w·b_a per multiply; size includes scales,
biases and width codes); peers are costed by the same code from their trained parameters. Step: median
time of one training step (forward, backward, optimizer) on a batch of the training batch size after
warm-up (PyTorch peers are timed the same way; HGQ2, which trains through Keras, by its adapter during
training); Step / FP32: ratio to an FP32 MLP of the same shape timed in the same process (robust to load).
Peak RSS: the run's peak resident memory (Linux VmHWM, reset at the start of each run)."""


def suite_markdown(summary: dict[str, Any], title: str | None = None) -> str:
    """The whole ``table.md``: a section per dataset, the notes, and the skipped/failed runs."""
    parts = [f"# {title}\n" if title else ""]
    groups = group_by_dataset(summary["cells"])
    multi_model = len({m for _, m in groups}) > 1
    for (dataset, model), cells in groups.items():
        heading = f"{dataset} — {model}" if multi_model and model else dataset
        parts.append(f"## {heading}\n\n{markdown_table(cells)}\n")
    parts.append(NOTES + "\n")
    problems = []
    for cell in summary["cells"]:
        for item in cell.get("failed", []):
            problems.append(f"- failed: `{cell['dataset']}/{cell['label']}/seed{item['seed']}`: {_escape(str(item['error']))}")
        if cell.get("status") == "skipped":
            problems.append(f"- skipped: `{cell['dataset']}/{cell['label']}`: {_escape(str(cell.get('reason')))}")
    if problems:
        parts.append("### Skipped and failed runs\n\n" + "\n".join(problems) + "\n")
    return "\n".join(p for p in parts if p)
