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


def _mean_std(values: list[float]) -> str:
    import statistics

    mean = 100 * statistics.fmean(values)
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def _by_label(runs: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The finished seeds of every (tier, label)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for key in sorted(runs):
        r = runs[key]
        groups.setdefault((r["dataset"], r["label"]), []).append(r)
    return groups


def _seed_mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One entry with the per-SNR accuracy and the overall accuracy averaged over the seeds."""
    snrs = list(rows[0]["by_snr"])
    return {**rows[0],
            "by_snr": {s: sum(r["by_snr"][s] for r in rows) / len(rows) for s in snrs},
            "count": {s: sum(r["count"][s] for r in rows) for s in snrs},
            "overall": sum(r["overall"] for r in rows) / len(rows)}


def _write_markdown(runs: dict[str, Any], out: Path) -> None:
    groups = _by_label(runs)
    seeds = sorted({len(rows) for rows in groups.values()})
    lines = [
        "# Radio modulation classification: accuracy per SNR",
        "",
        f"Written by `python benchmarks/radio/run.py` from the runs of `suite.yaml` ({'/'.join(map(str, seeds))} "
        "seeds per row). Test",
        "accuracy (%) at each SNR (dB per sample; 8 classes, chance 12.5%) averaged over the seeds, the",
        "overall accuracy and the mean over SNR >= 10 dB as mean ± std over the seeds, average weight /",
        "activation bits, BitOps and model bytes of seed 0 (from the harness' `metrics.json`).",
        "Curves (seed means): `plots/<tier>-acc-vs-snr.png`; every seed's numbers: `snr.json`.",
        "",
    ]
    for dataset, tier in TIERS.items():
        labels = [(label, rows) for (d, label), rows in groups.items() if d == dataset]
        if not labels:
            continue
        first = labels[0][1][0]
        n_test, per = first["n_test"], sorted(set(first["count"].values()))
        per_snr = f"{per[0]}" if len(per) == 1 else f"{per[0]}-{per[-1]}"
        lines += [f"## {dataset} ({tier}; {n_test} test frames, {per_snr} per SNR)", ""]
        head = ["Run", "Seeds", "Acc.", *[f"{s} dB" for s in SNR_COLUMNS], ">=10 dB", "W bits", "A bits", "BitOps",
                "BitOps / FP32", "Bytes", "Train (s)"]
        lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        order = sorted(labels, key=lambda item: (item[1][0]["model"],
                                                  item[0] != f"{item[1][0]['model']}-fp32", item[0]))
        for label, rows in order:
            mean, r = _seed_mean(rows), rows[0]
            by = mean["by_snr"]
            cells = [f"{100 * by[f'{s:g}']:.1f}" if f"{s:g}" in by else "" for s in SNR_COLUMNS]
            lines.append("| " + " | ".join([
                label, str(len(rows)), _mean_std([x["test_accuracy"] for x in rows]), *cells,
                _mean_std([_mean_high(x) for x in rows]),
                f"{r['avg_weight_bits']:.2f}", f"{r['avg_act_bits']:.2f}", f"{r['bitops']:.3g}",
                f"{r['bitops'] / r['fp32_bitops']:.2%}", f"{r['size_bytes']:,.0f}",
                f"{sum(x['train_seconds'] for x in rows) / len(rows):.1f}",
            ]) + " |")
        lines.append("")
    (out / "snr.md").write_text("\n".join(lines))


def _write_plots(runs: dict[str, Any], cls: Any, out: Path) -> None:
    from mpqat.radio_eval import plot_accuracy_vs_snr

    groups = _by_label(runs)
    for dataset, tier in TIERS.items():
        panels: dict[str, dict[str, Any]] = {}
        for (d, label), rows in sorted(groups.items(), key=lambda item: (item[0][1] != f"{item[1][0]['model']}-fp32",
                                                                           item[0][1])):
            if d == dataset:
                model = rows[0]["model"]
                name = label[len(model) + 1:] if label.startswith(model + "-") else label
                panels.setdefault(model, {})[name] = _curve(_seed_mean(rows), cls)
        if panels:
            plot_accuracy_vs_snr(panels, out / "plots" / f"{dataset}-acc-vs-snr.png",
                                 title=f"{dataset} ({tier}), mean of the seeds", chance=1 / 8)


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
