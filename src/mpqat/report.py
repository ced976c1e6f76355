"""``mpqat report DIR``: a Markdown summary and PNG plots of a finished run.

Plots: per-layer bit-width heatmaps (one row of cells per neuron, weights and activations), the
evolution of average bits over the epochs (when the method logs it) and the training curves.

Example:
    >>> paths = write_report(Path("runs/telco-uniform"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mpqat.cost import model_cost  # noqa: E402
from mpqat.runs import load_run  # noqa: E402


def plot_bit_heatmaps(layers, path: Path) -> Path:
    """One panel per layer: weight bits per output neuron and activation bits per input feature."""
    fig, axes = plt.subplots(len(layers), 2, figsize=(11, 1.3 * len(layers) + 1), squeeze=False)
    vmax = max(max(max(layer.weight_bits), max(layer.act_bits)) for layer in layers)
    image = None
    for row, layer in enumerate(layers):
        for col, (bits, label) in enumerate(((layer.weight_bits, "weight bits / neuron"),
                                             (layer.act_bits, "input act bits / feature"))):
            ax = axes[row][col]
            values = np.asarray(bits, dtype=float)
            width = int(math.ceil(math.sqrt(values.size * 8)))
            grid = np.full(math.ceil(values.size / width) * width, np.nan)
            grid[: values.size] = values
            image = ax.imshow(grid.reshape(-1, width), aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                              interpolation="nearest")
            ax.set_title(f"{layer.name}: {label} (mean {values.mean():.2f})", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=axes, label="bits", shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(history: list[dict], path: Path) -> Path:
    """Training loss, validation accuracy and (when logged) average bits per epoch."""
    epochs = [h["epoch"] for h in history]
    has_bits = any("avg_weight_bits" in h for h in history)
    fig, axes = plt.subplots(1, 3 if has_bits else 2, figsize=(12 if has_bits else 8, 3.2))
    axes[0].plot(epochs, [h["train_loss"] for h in history], label="train loss")
    axes[0].plot(epochs, [h["valid_loss"] for h in history], label="valid loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    axes[1].plot(epochs, [h["valid_accuracy"] for h in history])
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("valid accuracy")
    if has_bits:
        for key, label in (("avg_weight_bits", "weights"), ("avg_act_bits", "activations")):
            axes[2].plot(epochs, [h.get(key, np.nan) for h in history], label=label)
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("average bits")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: Path) -> list[Path]:
    """Write ``report.md``, ``bits_heatmap.png`` and ``history.png`` into ``run_dir``."""
    run = load_run(run_dir)
    cost = model_cost(run.model)
    written = [plot_bit_heatmaps(cost.layers, run_dir / "bits_heatmap.png")]
    if run.history:
        written.append(plot_history(run.history, run_dir / "history.png"))
    m = run.metrics
    lines = [f"# {m.get('dataset')} / {m.get('method')} / {m.get('model')} (seed {m.get('seed')})", "",
             "| metric | value |", "|---|---|"]
    for key in ("test_accuracy", "test_f1", "test_auc", "avg_weight_bits", "avg_act_bits", "bitops", "fp32_bitops",
                "size_bytes", "fp32_size_bytes", "energy_pj", "fp32_energy_pj", "train_seconds", "epochs"):
        if key in m:
            value = m[key]
            lines.append(f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", "## Bit-widths per layer", "", "| layer | weights (bits: neurons) | activations (bits: features) |",
              "|---|---|---|"]
    for name, hist in cost.bit_histograms().items():
        lines.append(f"| {name} | {json.dumps(hist['weights'])} | {json.dumps(hist['activations'])} |")
    lines += ["", "![bit-widths](bits_heatmap.png)", "", "![history](history.png)", ""]
    from mpqat.radio_eval import radio_report  # accuracy per SNR, only for the rf-* datasets

    snr_lines, snr_files = radio_report(run, run_dir)
    lines += snr_lines
    written += snr_files
    (run_dir / "report.md").write_text("\n".join(lines))
    return [run_dir / "report.md", *written]
