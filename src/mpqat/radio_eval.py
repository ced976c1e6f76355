"""Accuracy per SNR for the radio datasets (``rf-awgn``, ``rf-rayleigh``, ``rf-tdla``), and its plot.

The radio splits (:class:`mpqat.data.radio.RadioSplits`) keep the SNR of every frame beside the
features; these helpers group a model's test predictions by that SNR: the usual RadioML
"accuracy vs SNR" curve, and a confusion matrix above a given SNR.

Example::

    >>> curve = accuracy_by_snr("runs/rf-tdla-nmp")           # a run directory (or a model + splits)  # doctest: +SKIP
    >>> curve.accuracy[-1], curve.snr_db[-1]                  # doctest: +SKIP
    (0.62, 20.0)
    >>> plot_accuracy_vs_snr({"fp32": curve}, "acc_vs_snr.png", title="rf-tdla")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mpqat.errors import DatasetError


@dataclass
class SnrCurve:
    """Accuracy at each SNR: ``snr_db[i]`` has ``count[i]`` frames, ``accuracy[i]`` of them right."""

    snr_db: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    overall: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"overall": .., "by_snr": {"-10": acc, ...}, "count": {...}}``."""
        return {
            "overall": self.overall,
            "by_snr": {f"{s:g}": round(float(a), 6) for s, a in zip(self.snr_db, self.accuracy)},
            "count": {f"{s:g}": int(c) for s, c in zip(self.snr_db, self.count)},
        }

    def mean_between(self, low: float, high: float) -> float:
        """Mean accuracy over the SNRs in ``[low, high]`` dB (NaN when there are none)."""
        mask = (self.snr_db >= low) & (self.snr_db <= high)
        return float(self.accuracy[mask].mean()) if mask.any() else float("nan")


def curve_from_predictions(pred: np.ndarray, y: np.ndarray, snr_db: np.ndarray) -> SnrCurve:
    """Group predicted labels ``pred`` against true ``y`` by ``snr_db``.

    Example::

        >>> curve_from_predictions(np.array([0, 1, 1]), np.array([0, 1, 0]), np.array([0., 10., 10.])).accuracy
        array([1. , 0.5])
    """
    pred, y, snr_db = np.asarray(pred), np.asarray(y), np.asarray(snr_db, dtype=np.float64)
    if not (pred.shape == y.shape == snr_db.shape) or pred.ndim != 1:
        raise DatasetError(
            f"predictions, labels and SNRs must be 1-D and the same length, got {pred.shape}, "
            f"{y.shape}, {snr_db.shape}"
        )
    levels, inverse, counts = np.unique(snr_db, return_inverse=True, return_counts=True)
    right = np.bincount(inverse, weights=(pred == y).astype(np.float64), minlength=len(levels))
    overall = float((pred == y).mean()) if len(y) else float("nan")
    return SnrCurve(levels, right / np.maximum(counts, 1), counts, overall)


def _model_and_splits(model_or_run: Any, splits: Any) -> tuple[nn.Module, Any]:
    if isinstance(model_or_run, nn.Module):
        if splits is None:
            raise DatasetError("pass the splits (mpqat.data.load_dataset('rf-...')) with a model")
        return model_or_run, splits
    from mpqat.runs import Run, load_run

    run = model_or_run if isinstance(model_or_run, Run) else load_run(model_or_run)
    return run.model, splits if splits is not None else run.splits()


def predictions(
    model_or_run: Any, splits: Any = None, split: str = "test"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pred, y, snr_db)`` of a model (with ``splits``) or a run directory on ``split``."""
    from mpqat.train import predict_logits

    model, splits = _model_and_splits(model_or_run, splits)
    if not hasattr(splits, "snr"):
        raise DatasetError(
            f"dataset '{getattr(splits, 'name', '?')}' has no SNR per row: accuracy by SNR needs a "
            "radio dataset (rf-awgn, rf-rayleigh, rf-tdla)"
        )
    X, y = splits.split(split)
    logits = predict_logits(model, X)
    return logits.argmax(1), y, splits.snr(split)


def accuracy_by_snr(model_or_run: Any, splits: Any = None, split: str = "test") -> SnrCurve:
    """Accuracy per SNR of a run directory (or :class:`~mpqat.runs.Run`, or a model + splits).

    A run's own splits are loaded when ``splits`` is None. Raises :class:`DatasetError` for a
    dataset without SNRs.

    Example::

        >>> accuracy_by_snr("runs/rf-awgn-fp32").to_dict()["by_snr"]["20"]   # doctest: +SKIP
        0.97
    """
    return curve_from_predictions(*predictions(model_or_run, splits, split))


def confusion_matrix(pred: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts."""
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, (np.asarray(y), np.asarray(pred)), 1)
    return out


def _draw(ax: Any, curves: dict[str, SnrCurve], title: str, chance: float | None) -> None:
    markers = "osD^v<>ph*"
    for i, (label, curve) in enumerate(curves.items()):
        ax.plot(curve.snr_db, curve.accuracy, marker=markers[i % len(markers)], markersize=4,
                label=f"{label} ({curve.overall:.3f})")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("SNR per sample [dB]")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")


def plot_accuracy_vs_snr(
    curves: dict[str, SnrCurve] | dict[str, dict[str, SnrCurve]],
    path: str | Path,
    title: str = "",
    chance: float | None = None,
) -> Path:
    """Draw accuracy-vs-SNR lines into a PNG; returns the path.

    ``curves`` maps a label to a :class:`SnrCurve` (one panel), or a panel title to such a
    mapping (one panel each, side by side, e.g. one per model). The legend shows each overall
    accuracy; ``chance`` draws a dotted line (1 / number of classes).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    panels = curves if curves and all(isinstance(v, dict) for v in curves.values()) else {"": curves}
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.2), squeeze=False)
    for ax, (name, group) in zip(axes[0], panels.items()):
        _draw(ax, group, " - ".join(t for t in (title, name) if t), chance)  # type: ignore[arg-type]
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def radio_report(run: Any, run_dir: str | Path) -> tuple[list[str], list[Path]]:
    """For ``mpqat report``: Markdown lines and ``acc_vs_snr.png`` of a run on a radio dataset.

    Returns ``([], [])`` for a run on any other dataset. Example::

        >>> lines, files = radio_report(load_run("runs/rf-tdla"), "runs/rf-tdla")   # doctest: +SKIP
    """
    from mpqat.data.registry import find_dataset

    info = find_dataset(str(run.info.get("dataset", "")))
    if info is None or info.kind != "radio":
        return [], []
    curve = accuracy_by_snr(run)
    png = plot_accuracy_vs_snr({str(run.metrics.get("method", "model")): curve}, Path(run_dir) / "acc_vs_snr.png",
                               title=info.name, chance=1.0 / info.n_classes)
    lines = ["## Accuracy per SNR (test split)", "",
             "| SNR (dB) | " + " | ".join(f"{s:g}" for s in curve.snr_db) + " |",
             "|---|" + "---:|" * len(curve.snr_db),
             "| accuracy (%) | " + " | ".join(f"{100 * a:.1f}" for a in curve.accuracy) + " |",
             "", "![accuracy vs SNR](acc_vs_snr.png)", ""]
    return lines, [png]
