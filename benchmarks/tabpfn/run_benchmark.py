"""TabPFN v1 benchmark: FP32 in-context vs MLP and gradient boosting; NMP-QAT vs uniform 8/4/2-bit.

Writes ``results.json`` and ``table.md`` next to this file (or into ``--out``). Run folders (with
the packed models, 3-26 MB each) go to ``--runs-dir`` (default: a folder under /tmp).

    .venv/bin/mpqat data fetch tabpfn-v1          # once, ~96 MB download
    .venv/bin/python benchmarks/tabpfn/run_benchmark.py                # ~20 min on one CPU thread
    .venv/bin/python benchmarks/tabpfn/run_benchmark.py --datasets breast-cancer --episodes 4   # quick

Everything runs with one thread (``torch.set_num_threads(1)``), seed 0, the 60/20/20 splits of
``mpqat.data``. TabPFN's context is the training split (at most 1000 rows, stratified); every
TabPFN row is scored with 2 ensemble members, and FP32 also with 4.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DATASETS = ("breast-cancer", "telco-churn", "mlc-churn")

#: (label, recipe, activations quantized?) of the quantized TabPFN variants. The TabPFN defaults of
#: mpqat.tabpfn.run.RECIPE_DEFAULTS apply (NMP: 2-bit start, strength lr x3000; uniform: per-feature steps).
VARIANTS: list[tuple[str, dict[str, Any], bool]] = [
    ("uniform W8", {"method": "uniform", "w_bits": 8, "a_bits": 8}, False),
    ("uniform W4", {"method": "uniform", "w_bits": 4, "a_bits": 8}, False),
    ("uniform W2", {"method": "uniform", "w_bits": 2, "a_bits": 8}, False),
    ("NMP-QAT W", {"method": "nmp"}, False),
    ("uniform W8A8", {"method": "uniform", "w_bits": 8, "a_bits": 8}, True),
    ("uniform W4A8", {"method": "uniform", "w_bits": 4, "a_bits": 8}, True),
    ("NMP-QAT W+A", {"method": "nmp"}, True),
]


def baselines(name: str, seed: int, runs_dir: Path) -> dict[str, Any]:
    """MLP (mpqat's FP32 MLP 128-128, 60 epochs, lr 2e-3) and HistGradientBoosting on the same split."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from mpqat.data import load_dataset
    from mpqat.recipes import FP32
    from mpqat.runs import train_run
    from mpqat.tabpfn.incontext import stratified_context
    from mpqat.train import TrainConfig

    ds = load_dataset(name, seed=seed)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    gbm = HistGradientBoostingClassifier(random_state=seed).fit(ds.X_train, ds.y_train)
    out["gbm"] = {"test_accuracy": float(gbm.score(ds.X_test, ds.y_test)), "seconds": time.perf_counter() - t0,
                  "n_train": len(ds.y_train)}
    idx = stratified_context(ds.y_train, 1000, seed)
    t0 = time.perf_counter()
    gbm_ctx = HistGradientBoostingClassifier(random_state=seed).fit(ds.X_train[idx], ds.y_train[idx])
    out["gbm_context_rows"] = {"test_accuracy": float(gbm_ctx.score(ds.X_test, ds.y_test)),
                               "seconds": time.perf_counter() - t0, "n_train": len(idx)}
    m = train_run(name, FP32(), runs_dir / f"{name}-mlp", model="mlp", force=True,
                  config=TrainConfig(epochs=60, lr=2e-3, seed=seed, progress=False))
    out["mlp"] = {"test_accuracy": m["test_accuracy"], "seconds": m["train_seconds"], "n_train": m["n_train"]}
    return out


def tabpfn_row(name: str, label: str, recipe_dict: dict[str, Any], activations: bool, episodes: int, seed: int,
               runs_dir: Path, n_ensemble: int = 2) -> dict[str, Any]:
    from mpqat.recipes import recipe_from_dict
    from mpqat.tabpfn.finetune import FinetuneConfig
    from mpqat.tabpfn.run import FINETUNE_LR, tabpfn_recipe_overrides, train_tabpfn_run

    method = recipe_dict["method"]
    recipe = recipe_from_dict({"method": method, **tabpfn_recipe_overrides(method, {k: v for k, v in recipe_dict.items() if k != "method"})})
    cfg = FinetuneConfig(episodes=episodes, lr=FINETUNE_LR, seed=seed, eval_every=episodes, eval_rows=400, progress=False)
    t0 = time.perf_counter()
    slug = label.replace(" ", "-").replace("+", "").lower()
    m = train_tabpfn_run(name, recipe, runs_dir / f"{name}-{slug}-e{n_ensemble}", seed=seed, activations=activations,
                         n_ensemble=n_ensemble, force=True, progress=False, finetune_config=cfg)
    keep = ("test_accuracy", "test_auc", "valid_accuracy", "avg_weight_bits", "avg_act_bits", "bitops", "size_bytes",
            "packed_file_bytes", "episodes", "best_episode", "train_seconds", "seconds_per_episode",
            "test_infer_seconds", "n_context", "n_test", "n_ensemble", "activations", "float_params")
    row = {"label": label, "recipe": m["recipe"], **{k: m[k] for k in keep if k in m},
           "wall_seconds": time.perf_counter() - t0}
    if "packed" in m:
        row["packed"] = m["packed"]
    if "nmp" in m:
        row["nmp_layers_mean_bits"] = {k: v["weights"]["mean_bits"] for k, v in m["nmp"]["layers"].items()}
    print(f"  {label:16s} acc {row['test_accuracy']:.4f}  w {row['avg_weight_bits']:.2f} a {row['avg_act_bits']:.2f}  "
          f"{row.get('packed_file_bytes', 0) / 1e6:6.2f} MB  {row['wall_seconds']:.0f} s", flush=True)
    return row


def breast_cancer_seeds(seeds: int = 5) -> dict[str, Any]:
    """FP32 TabPFN (4 members) and gradient boosting over seeds 0..seeds-1 on breast-cancer."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from mpqat.data import load_dataset
    from mpqat.tabpfn.incontext import InContextClassifier
    from mpqat.tabpfn.model import load_tabpfn

    net = load_tabpfn()
    tab, gbm = [], []
    for s in range(seeds):
        ds = load_dataset("breast-cancer", seed=s)
        tab.append(InContextClassifier(net, n_ensemble=4, seed=s).fit(ds.X_train, ds.y_train).score(ds.X_test, ds.y_test))
        gbm.append(float(HistGradientBoostingClassifier(random_state=s).fit(ds.X_train, ds.y_train).score(ds.X_test, ds.y_test)))
    return {"seeds": list(range(seeds)), "tabpfn_fp32_4members": tab, "tabpfn_mean": float(np.mean(tab)),
            "gbm": gbm, "gbm_mean": float(np.mean(gbm))}


def markdown(results: dict[str, Any]) -> str:
    ckpt = results["checkpoint_bytes"]
    lines = [
        "# TabPFN v1: FP32 in-context vs baselines, and quantized (NMP-QAT vs uniform)",
        "",
        f"Seed {results['seed']}, 60/20/20 splits, {results['episodes']} fine-tuning episodes "
        f"({results['n_ctx']} context + {results['n_query']} query rows, lr 1e-5) per quantized row, 1 CPU thread; "
        "the validation split (400 rows) picks the better of the calibrated start (episode 0) and the end. "
        "Accuracy on the test split; TabPFN context = training split (at most 1000 rows, stratified), 2 ensemble "
        "members unless noted. Bits: parameter-weighted average over the 75 quantized linear layers (25.7 M "
        "weights); activation bits: element-weighted over their inputs, 32 = float (weights-only). "
        f"Size: the packed file (codes, scales, biases, activation steps and the float layer norms / label "
        f"embedding) against the {ckpt:,}-byte checkpoint.",
        "",
        "| dataset | model | test acc | w bits | a bits | size (MB) | % of ckpt | fine-tune s | s/episode | predict s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in results["datasets"].items():
        b = d["baselines"]
        lines.append(f"| {name} | MLP 128-128 (FP32, {b['mlp']['n_train']} rows) | {b['mlp']['test_accuracy']:.4f} | 32 | 32 | | | {b['mlp']['seconds']:.1f} | | |")
        lines.append(f"| {name} | HistGradientBoosting ({b['gbm']['n_train']} rows) | {b['gbm']['test_accuracy']:.4f} | | | | | {b['gbm']['seconds']:.1f} | | |")
        lines.append(f"| {name} | HistGradientBoosting (same {b['gbm_context_rows']['n_train']} context rows) | {b['gbm_context_rows']['test_accuracy']:.4f} | | | | | {b['gbm_context_rows']['seconds']:.1f} | | |")
        for r in d["tabpfn"]:
            size = r.get("packed_file_bytes", ckpt)
            acts = "" if r["label"].startswith("FP32") else (" (W+A)" if r["activations"] == "weights+activations" else " (W only)")
            lines.append(
                f"| {name} | TabPFN {r['label']}{acts} | **{r['test_accuracy']:.4f}** | {r['avg_weight_bits']:.2f} | "
                f"{r['avg_act_bits']:.2f} | {size / 1e6:.2f} | {100 * size / ckpt:.1f} | {r['train_seconds']:.0f} | "
                f"{r['seconds_per_episode']:.2f} | {r['test_infer_seconds']:.1f} |")
    if "breast_cancer_seeds" in results:
        s = results["breast_cancer_seeds"]
        lines += ["", f"breast-cancer over seeds {s['seeds']}: TabPFN FP32 (4 members) "
                      f"{', '.join(f'{a:.4f}' for a in s['tabpfn_fp32_4members'])} (mean **{s['tabpfn_mean']:.4f}**); "
                      f"HistGradientBoosting mean {s['gbm_mean']:.4f}."]
    lines += ["", f"Total wall time {results['total_seconds'] / 60:.1f} min, CPU time {results['total_cpu_seconds'] / 60:.1f} min "
                  f"({results['machine']}; the 2-core machine was shared with other jobs, so wall > CPU).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--runs-dir", type=Path, default=Path(tempfile.gettempdir()) / "mpqat-tabpfn-bench")
    parser.add_argument("--no-seeds", action="store_true", help="Skip the 5-seed breast-cancer check.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from mpqat.tabpfn.fetch import SIZE, cached_checkpoint
    from mpqat.tabpfn.finetune import FinetuneConfig

    cached_checkpoint()
    start, cpu_start = time.perf_counter(), time.process_time()
    cfg = FinetuneConfig()
    results: dict[str, Any] = {"seed": args.seed, "episodes": args.episodes, "n_ctx": cfg.n_ctx, "n_query": cfg.n_query,
                               "checkpoint_bytes": SIZE, "machine": f"{platform.processor() or platform.machine()}, 1 thread",
                               "torch": torch.__version__, "datasets": {}}
    for name in args.datasets.split(","):
        print(f"{name}:", flush=True)
        d = {"baselines": baselines(name, args.seed, args.runs_dir), "tabpfn": []}
        print(f"  baselines: {json.dumps({k: round(v['test_accuracy'], 4) for k, v in d['baselines'].items()})}", flush=True)
        d["tabpfn"].append(tabpfn_row(name, "FP32 (4 members)", {"method": "fp32"}, True, 0, args.seed, args.runs_dir, 4))
        d["tabpfn"].append(tabpfn_row(name, "FP32", {"method": "fp32"}, True, 0, args.seed, args.runs_dir))
        for label, recipe, act in VARIANTS:
            d["tabpfn"].append(tabpfn_row(name, label, recipe, act, args.episodes, args.seed, args.runs_dir))
        results["datasets"][name] = d
        results["total_seconds"] = time.perf_counter() - start
        results["total_cpu_seconds"] = time.process_time() - cpu_start
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    if not args.no_seeds and "breast-cancer" in args.datasets.split(","):
        results["breast_cancer_seeds"] = breast_cancer_seeds()
    results["total_seconds"] = time.perf_counter() - start
    results["total_cpu_seconds"] = time.process_time() - cpu_start
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (args.out / "table.md").write_text(markdown(results))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'} in {results['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
