"""Estimator study: Monte Carlo permutation Shapley vs exact Shapley on a small SMPQ supernet.

A 3-layer MLP supernet (hidden 32, 32) on pendigits with weight candidates {2, 4, 8} on every layer
and activation candidates {2, 8} on the two hidden inputs (the model input stays at 8 bits):
13 players, so the exact Shapley values need 2**13 = 8192 coalition evaluations. The supernet's
weights are trained with uniform mixing (the SMPQ warm-up), then the game is fixed: the value of a
coalition is the supernet's score on one fixed batch of the val-alpha half of the training split,
with the absent candidates masked out.

For each value function (minus the cross-entropy, and accuracy as in Shapley-NAS) and each
estimator variant (plain Castro sampling; antithetic pairs, each permutation followed by its
reverse; truncation 0.5 with the empty-coalition reference, ours; and truncation 0.5 with
reference 0, Shapley-NAS's ``acc < 0.5 acc0``), the relative L2 error of the
Monte Carlo mean ``||phi_mc - phi||/||phi||`` is measured over ``REPEATS`` independent runs at
several numbers of permutations M, against the number of value evaluations used (as a fraction of
the exact 8192). The game is deterministic, so after the exact enumeration the estimators read
coalition values from the table of all 8192 (checked once against evaluating the supernet
directly); the evaluation counts are those the estimator asks for.

    python benchmarks/smpq/estimator_study.py          # about 30 s on one idle core

Writes ``estimator_study.json``, ``estimator_study.png`` and ``estimator_study.md`` next to itself.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from mpqat.data import load_dataset
from mpqat.methods.smpq import SMPQ, search_space
from mpqat.methods.supernet import CoalitionValue, build_supernet, weight_parameters
from mpqat.models import MLP
from mpqat.quantize import quantize
from mpqat.shapley import ExactShapley, coalition_values, permutation_shapley, relative_l2, shapley_from_table

HERE = Path(__file__).resolve().parent
DATASET = "pendigits"
HIDDEN = (32, 32)
W_CANDIDATES = (2, 4, 8)
A_CANDIDATES = (2, 8)
WARMUP_EPOCHS = 10
VAL_ROWS = 1024
SAMPLES = (2, 4, 6, 8, 12, 20, 30, 46, 68, 100, 150)
REPEATS = 30
VARIANTS = {  # label: (truncation, reference, antithetic)
    "plain (Castro)": (None, "empty", False),
    "antithetic pairs": (None, "empty", True),
    "truncation 0.5, ref v(empty)": (0.5, "empty", False),
    "truncation 0.5, ref 0 (Shapley-NAS)": (0.5, 0.0, False),
}
CRITERION_ERROR, CRITERION_FRACTION = 0.20, 0.10


def build_game(value: str, seed: int = 0) -> tuple[CoalitionValue, dict]:
    torch.manual_seed(seed)
    splits = load_dataset(DATASET, seed=seed)
    recipe = SMPQ(w_candidates=W_CANDIDATES, a_candidates=A_CANDIDATES)
    model = quantize(MLP(splits.n_features, splits.n_classes, hidden=HIDDEN), recipe)
    space = search_space(model, recipe)
    net = build_supernet(model, space)
    X, y = torch.from_numpy(splits.X_train), torch.from_numpy(splits.y_train)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(X), generator=gen)
    half = len(X) // 2
    w_rows, a_rows = order[:half], order[half:]
    opt = torch.optim.Adam(weight_parameters(net), lr=2e-3)
    net.train()
    for _ in range(WARMUP_EPOCHS):
        perm = w_rows[torch.randperm(len(w_rows), generator=gen)]
        for start in range(0, len(perm), 256):
            idx = perm[start : start + 256]
            loss = F.cross_entropy(net(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    game = CoalitionValue(net, space, value, max_batch=64)
    val = a_rows[:VAL_ROWS]
    game.set_batch(X[val], y[val])
    info = {"dataset": DATASET, "hidden": list(HIDDEN), "w_candidates": list(W_CANDIDATES),
            "a_candidates": list(A_CANDIDATES), "warmup_epochs": WARMUP_EPOCHS, "val_rows": int(len(val)),
            "players": [p.label for p in game.players]}
    return game, info


def table_game(table: np.ndarray, n: int):
    """The same (deterministic) game read from the table of all coalition values."""
    weights = 1 << np.arange(n)

    def values(masks: np.ndarray) -> np.ndarray:
        return table[np.asarray(masks, dtype=np.int64) @ weights]

    return values


def study(value: str) -> dict:
    game, info = build_game(value)
    n = game.n_players
    t0 = time.perf_counter()
    table = coalition_values(None, n, batch_eval=game)
    exact = ExactShapley(shapley_from_table(table, n), len(table), time.perf_counter() - t0,
                         float(table[-1]), float(table[0]))
    lookup = table_game(table, n)
    # the game is deterministic, so the estimators below read its values from the table; check once
    # that this is exactly what evaluating the supernet gives
    direct = permutation_shapley(None, n, 3, truncation=0.5, rng=np.random.default_rng(7), batch_eval=game)
    cached = permutation_shapley(None, n, 3, truncation=0.5, rng=np.random.default_rng(7), batch_eval=lookup)
    if not np.allclose(direct.marginals, cached.marginals, atol=1e-9):
        raise RuntimeError("the supernet game is not deterministic: the table lookup would not be valid")
    rows = []
    for label, (trunc, ref, anti) in VARIANTS.items():
        if value == "neg_loss" and ref == 0.0:
            continue  # a zero reference is meaningless for a negative value
        for m in SAMPLES:
            errors, evals, seconds = [], [], []
            for rep in range(REPEATS):
                est = permutation_shapley(None, n, m, truncation=trunc, truncation_ref=ref, antithetic=anti,
                                          rng=np.random.default_rng(1000 * m + rep), batch_eval=lookup, chunk=16)
                errors.append(relative_l2(est.mean, exact.values))
                evals.append(est.evaluations)
                seconds.append(est.seconds)
            rows.append({
                "variant": label, "samples": m, "error_mean": float(np.mean(errors)),
                "error_std": float(np.std(errors, ddof=1)), "error_max": float(np.max(errors)),
                "evaluations_mean": float(np.mean(evals)), "fraction_of_exact": float(np.mean(evals)) / exact.evaluations,
                "seconds_mean": float(np.mean(seconds)),
            })
    return {"value": value, "n_players": n, "exact": {
        "values": dict(zip(info["players"], exact.values.tolist(), strict=True)),
        "evaluations": exact.evaluations, "seconds": exact.seconds,
        "full_value": exact.full_value, "empty_value": exact.empty_value}, "setup": info, "rows": rows}


def criterion(rows: list[dict], variant: str) -> dict | None:
    """Fewest evaluations at which the mean error is <= 20 % (None if never)."""
    ok = [r for r in rows if r["variant"] == variant and r["error_mean"] <= CRITERION_ERROR]
    return min(ok, key=lambda r: r["evaluations_mean"]) if ok else None


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for variant in VARIANTS:
            rows = [r for r in res["rows"] if r["variant"] == variant]
            if not rows:
                continue
            x = [r["fraction_of_exact"] for r in rows]
            y = [r["error_mean"] for r in rows]
            err = [r["error_std"] for r in rows]
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=variant)
        ax.axhline(CRITERION_ERROR, color="grey", ls="--", lw=1)
        ax.axvline(CRITERION_FRACTION, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("value evaluations / exact evaluations (2^%d)" % res["n_players"])
        ax.set_ylabel("relative L2 error of the MC mean")
        ax.set_title(f"value = {res['value']} ({res['n_players']} players)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: list[dict], seconds: float) -> str:
    lines = ["# SMPQ estimator study: Monte Carlo vs exact Shapley", "",
             "Written by `python benchmarks/smpq/estimator_study.py` "
             f"({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, {seconds:.0f} s in all).", "",
             f"Supernet: MLP {HIDDEN} on {DATASET}, weight candidates {W_CANDIDATES} on every layer, activation "
             f"candidates {A_CANDIDATES} on the hidden inputs, {WARMUP_EPOCHS} warm-up epochs with uniform mixing; "
             f"the game's value is measured on {VAL_ROWS} fixed val-alpha rows. Error = relative L2 error of the "
             f"Monte Carlo mean against the exact values, mean ± std over {REPEATS} independent runs; evaluations = "
             "coalition values the sequential algorithm needs (2 + M(n-1) without truncation).", ""]
    for res in results:
        ex = res["exact"]
        lines += [f"## value = {res['value']}", "",
                  f"{res['n_players']} players, exact: {ex['evaluations']} evaluations in {ex['seconds']:.1f} s; "
                  f"v(all) = {ex['full_value']:.4f}, v(empty) = {ex['empty_value']:.4f}.", "",
                  "| estimator | M | evaluations | fraction of exact | rel. L2 error (mean ± std) | max |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            lines.append(f"| {r['variant']} | {r['samples']} | {r['evaluations_mean']:.0f} | "
                         f"{r['fraction_of_exact']:.2%} | {r['error_mean']:.3f} ± {r['error_std']:.3f} | "
                         f"{r['error_max']:.3f} |")
        lines += ["", "Criterion (mean error ≤ 20 % with ≤ 10 % of the exact evaluations):", ""]
        for variant in VARIANTS:
            best = criterion(res["rows"], variant)
            if not any(r["variant"] == variant for r in res["rows"]):
                continue
            if best is None:
                lines.append(f"* {variant}: never reaches 20 % in the sampled range")
            else:
                verdict = "met" if best["fraction_of_exact"] <= CRITERION_FRACTION else "NOT met"
                lines.append(f"* {variant}: {best['error_mean']:.3f} at M = {best['samples']} "
                             f"({best['evaluations_mean']:.0f} evaluations = {best['fraction_of_exact']:.2%}) - {verdict}")
        top = sorted(ex["values"].items(), key=lambda kv: -kv[1])
        lines += ["", "Exact Shapley values (largest first): " + ", ".join(f"{k} {v:.4f}" for k, v in top), ""]
    lines += ["![error vs evaluations](estimator_study.png)", ""]
    return "\n".join(lines)


def main() -> int:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = [study("neg_loss"), study("accuracy")]
    seconds = time.perf_counter() - t0
    out = {"results": results, "seconds": seconds, "torch": torch.__version__, "python": sys.version.split()[0],
           "samples": list(SAMPLES), "repeats": REPEATS}
    (HERE / "estimator_study.json").write_text(json.dumps(out, indent=2))
    plot(results, HERE / "estimator_study.png")
    (HERE / "estimator_study.md").write_text(markdown(results, seconds))
    for res in results:
        for variant in VARIANTS:
            best = criterion(res["rows"], variant)
            if best:
                print(f"{res['value']:9s} {variant:38s} error {best['error_mean']:.3f} at M={best['samples']} "
                      f"({best['fraction_of_exact']:.2%} of exact)")
    print(f"done in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
