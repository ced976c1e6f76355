"""Radio modulation benchmark (issue 9): train the suite, then accuracy vs SNR on every tier.

Usage (from the repository root, after ``make setup``)::

    python benchmarks/radio/run.py                 # generate rf-* if needed, train, analyse
    python benchmarks/radio/run.py --analyse-only  # only redo snr.json / snr.md / the SNR plots

Step 1 is ``mpqat bench --suite benchmarks/radio/suite.yaml --out benchmarks/radio`` restricted to
the runs listed in ``ONLY`` (ADQ for the MLP only, for time); it writes the harness' files here:
``README.md``, ``table.md`` (accuracy, bits, BitOps, bytes), ``results.json``, ``summary.json``,
``plots/<tier>-acc-vs-{bitops,bytes}.png`` and ``runs/<tier>/<label>/seed0/``. Finished runs are
reused, so a second call only analyses.

Step 2 reloads every finished run (its checkpoint) and groups its test predictions by the SNR
kept beside each frame (:func:`mpqat.radio_eval.accuracy_by_snr`): ``snr.json`` (all curves and
costs), ``snr.md`` (tables per tier) and ``plots/<tier>-acc-vs-snr.png`` (one panel per model).
Checkpoints are not committed (``.gitignore``); runs whose checkpoint is gone keep the curve
already stored in ``snr.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread, also in the harness' worker process
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
SUITE = HERE / "suite.yaml"
ONLY = ["*/mlp-*", "*/cnn1d-fp32", "*/cnn1d-uniform-*", "*/cnn1d-nmp"]
TIERS = {"rf-awgn": "AWGN", "rf-rayleigh": "flat Rayleigh", "rf-tdla": "TDL-A 100 ns, 0-30 m/s"}
SNR_COLUMNS = (-10, -6, -2, 0, 2, 6, 10, 14, 20)


def train(suite: Path, out: Path) -> None:
    from mpqat.bench import cli_bench
    from mpqat.data import fetch

    fetch("rf-modulation")
    # paths relative to the working directory, so the harness' README shows a portable command
    result = cli_bench(os.path.relpath(suite), out=os.path.relpath(out), only=ONLY)
    if isinstance(result, dict) and result.get("failures"):
        sys.exit(f"{len(result['failures'])} run(s) failed; see their error.json files")


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in (out / "runs").glob("*/*/seed*/metrics.json"))


def analyse(out: Path = HERE) -> dict[str, Any]:
    """Accuracy per SNR of every finished run under ``out/runs``; writes snr.json, snr.md, plots."""
    from mpqat.radio_eval import SnrCurve, accuracy_by_snr
    from mpqat.runs import load_run

    store = out / "snr.json"
    old = json.loads(store.read_text()) if store.is_file() else {"runs": {}}
    runs: dict[str, Any] = {}
    for run_dir in _run_dirs(out):
        key = str(run_dir.relative_to(out / "runs"))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if not (run_dir / "checkpoint.pt").is_file():
            if key in old["runs"]:
                runs[key] = old["runs"][key]
            else:
                print(f"skip {key}: no checkpoint and no stored curve", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        curve = accuracy_by_snr(load_run(run_dir))
        if abs(curve.overall - metrics["test_accuracy"]) > 1e-9:
            sys.exit(f"{key}: accuracy from the checkpoint {curve.overall} != metrics.json "
                     f"{metrics['test_accuracy']}")
        runs[key] = {
            "dataset": metrics["dataset"], "model": metrics["model"], "method": metrics["method"],
            "label": run_dir.parent.name, "test_accuracy": metrics["test_accuracy"],
            "avg_weight_bits": metrics["avg_weight_bits"], "avg_act_bits": metrics["avg_act_bits"],
            "bitops": metrics["bitops"], "fp32_bitops": metrics["fp32_bitops"],
            "size_bytes": metrics["size_bytes"], "fp32_size_bytes": metrics["fp32_size_bytes"],
            "epochs": metrics["epochs"], "train_seconds": metrics["train_seconds"],
            "n_train": metrics["n_train"], "n_test": metrics["n_test"],
            **curve.to_dict(),
        }
        print(f"{key}: {curve.overall:.4f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    result = {"runs": runs}
    store.write_text(json.dumps(result, indent=2) + "\n")
    _write_markdown(runs, out)
    _write_plots(runs, SnrCurve, out)
    return result


def _curve(entry: dict[str, Any], cls: Any) -> Any:
    import numpy as np

    snrs = np.array([float(s) for s in entry["by_snr"]])
    acc = np.array(list(entry["by_snr"].values()), dtype=float)
    count = np.array([entry["count"][k] for k in entry["by_snr"]])
    return cls(snrs, acc, count, entry["overall"])


def _mean_high(entry: dict[str, Any], low: float = 10.0) -> float:
    values = [a for s, a in entry["by_snr"].items() if float(s) >= low]
    return sum(values) / len(values)


def _write_markdown(runs: dict[str, Any], out: Path) -> None:
    lines = [
        "# Radio modulation classification: accuracy per SNR",
        "",
        "Written by `python benchmarks/radio/run.py` from the runs of `suite.yaml` (1 seed). Test",
        "accuracy (%) of each run at each SNR (dB per sample; 8 classes, chance 12.5%), the mean",
        "over SNR >= 10 dB, average weight / activation bits, BitOps and model bytes (from the",
        "harness' `metrics.json`). Curves: `plots/<tier>-acc-vs-snr.png`; all numbers: `snr.json`.",
        "",
    ]
    for dataset, tier in TIERS.items():
        rows = [r for r in runs.values() if r["dataset"] == dataset]
        if not rows:
            continue
        n_test, per = rows[0]["n_test"], sorted(set(rows[0]["count"].values()))
        per_snr = f"{per[0]}" if len(per) == 1 else f"{per[0]}-{per[-1]}"
        lines += [f"## {dataset} ({tier}; {n_test} test frames, {per_snr} per SNR)", ""]
        head = ["Run", "Acc.", *[f"{s} dB" for s in SNR_COLUMNS], ">=10 dB", "W bits", "A bits", "BitOps",
                "BitOps / FP32", "Bytes", "Train (s)"]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for r in sorted(rows, key=lambda r: (r["model"], r["label"] != f"{r['model']}-fp32", r["label"])):
            by = r["by_snr"]
            cells = [f"{100 * by[f'{s:g}']:.1f}" if f"{s:g}" in by else "" for s in SNR_COLUMNS]
            lines.append("| " + " | ".join([
                r["label"], f"{100 * r['test_accuracy']:.2f}", *cells, f"{100 * _mean_high(r):.1f}",
                f"{r['avg_weight_bits']:.2f}", f"{r['avg_act_bits']:.2f}", f"{r['bitops']:.3g}",
                f"{r['bitops'] / r['fp32_bitops']:.2%}", f"{r['size_bytes']:,.0f}", f"{r['train_seconds']:.1f}",
            ]) + " |")
        lines.append("")
    (out / "snr.md").write_text("\n".join(lines))


def _write_plots(runs: dict[str, Any], cls: Any, out: Path) -> None:
    from mpqat.radio_eval import plot_accuracy_vs_snr

    for dataset, tier in TIERS.items():
        panels: dict[str, dict[str, Any]] = {}
        for r in sorted(runs.values(), key=lambda r: (r["label"] != f"{r['model']}-fp32", r["label"])):
            if r["dataset"] == dataset:
                name = r["label"][len(r["model"]) + 1:] if r["label"].startswith(r["model"] + "-") else r["label"]
                panels.setdefault(r["model"], {})[name] = _curve(r, cls)
        if panels:
            plot_accuracy_vs_snr(panels, out / "plots" / f"{dataset}-acc-vs-snr.png",
                                 title=f"{dataset} ({tier})", chance=1 / 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analyse-only", action="store_true", help="skip training; redo the SNR analysis")
    parser.add_argument("--suite", type=Path, default=SUITE, help="suite YAML (default: suite.yaml here)")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: this folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.analyse_only:
        train(args.suite, args.out)
    analyse(args.out)


if __name__ == "__main__":
    main()
