"""Write the ``smpq`` benchmark suite (``src/mpqat/bench/suites/smpq.yaml``) with equal-BitOps budgets.

SMPQ, DNAS, uniform LSQ and HAWQ-style allocation are compared at the BitOps of a uniform WbAb model
(b = 3, 4; the model input at 8 bits for every method). The budget of each searched method is that
uniform model's BitOps on the same architecture and dataset:

* ``smpq`` / ``dnas``: ``budget_kind: bitops_rel``, budget = BitOps(uniform WbAb) / BitOps(FP32),
  knapsack selection with ``budget_fill 0.9`` (the chosen bits cost between 90 % and 100 % of it);
* ``hawq``: ``budget_kind: bitops`` (absolute BitOps per sample, its only BitOps unit) with its
  activations fixed at b bits, so only the weight bits are allocated.

Those numbers depend on each dataset's feature and class counts, so they are computed here (from
:mod:`mpqat.cost`, the one definition of BitOps) instead of typed by hand.

    python benchmarks/smpq/make_suite.py             # rewrites src/mpqat/bench/suites/smpq.yaml
    mpqat bench --suite smpq --seeds 3 --jobs 2 --out benchmarks/smpq/suite

Fashion-MNIST (resnet8) is not in this suite yet: a suite's models apply to every dataset, so it
needs its own suite file (as ``vision.yaml``); ``uniform_bitops("fashion-mnist", b, "resnet8", None)``
gives its budgets.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml

from mpqat.cost import model_cost
from mpqat.data import load_dataset
from mpqat.models import build_model, model_spec
from mpqat.quantize import quantize
from mpqat.recipes import Uniform

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "src" / "mpqat" / "bench" / "suites" / "smpq.yaml"
DATASETS = ("letter", "pendigits")
HIDDEN = [128, 128]
BITS = (3, 4)
CANDIDATES = [2, 3, 4, 6, 8]


def uniform_bitops(dataset: str, bits: int, model: str = "mlp", hidden: list[int] | None = HIDDEN) -> tuple[float, float]:
    """``(BitOps, FP32 BitOps)`` per sample of the uniform W{bits}A{bits} model (input at 8 bits)."""
    splits = load_dataset(dataset, seed=0)
    shape = getattr(splits, "input_shape", None)
    spec = model_spec(model, splits.n_features, splits.n_classes, hidden=hidden,
                      **({"input_shape": shape} if shape else {}))
    net = quantize(build_model(spec), Uniform(w_bits=bits, a_bits=bits, input_bits=8))
    if shape:  # convolutions need one forward pass to know their spatial sizes
        import torch

        net.train()(torch.from_numpy(splits.X_train[:2]))
    cost = model_cost(net)
    return cost.bitops, cost.fp32_bitops


def suite(datasets: tuple[str, ...] = DATASETS) -> dict:
    methods: list[dict] = [
        {"label": "fp32", "recipe": {"method": "fp32"}},
        {"label": "uniform-w{w_bits}a{a_bits}", "recipe": {"method": "uniform", "input_bits": 8},
         "budgets": [{"w_bits": b, "a_bits": b} for b in BITS], "group": "W{w_bits}A{a_bits} BitOps"},
    ]
    for ds in datasets:
        for b in BITS:
            bitops, fp32 = uniform_bitops(ds, b)
            rel = bitops / fp32
            group = f"W{b}A{b} BitOps"
            # rounded down, so the searched methods never get more than the uniform model
            common = {"budget_kind": "bitops_rel", "budget": math.floor(rel * 1e9) / 1e9,
                      "w_candidates": list(CANDIDATES), "a_candidates": list(CANDIDATES)}
            methods += [
                {"label": f"smpq-w{b}a{b}", "datasets": [ds], "group": group,
                 "recipe": {"method": "smpq", **common},
                 "note": f"Shapley selection, knapsack at the BitOps of uniform W{b}A{b} ({bitops:.0f} = {rel:.5f} of FP32)"},
                {"label": f"dnas-w{b}a{b}", "datasets": [ds], "group": group,
                 "recipe": {"method": "dnas", **common, "w_candidates": list(CANDIDATES),
                            "a_candidates": list(CANDIDATES)},
                 "note": f"EdMIPS-style DNAS, alpha as utility, same knapsack and budget as smpq-w{b}a{b}"},
                {"label": f"hawq-w{b}a{b}", "datasets": [ds], "group": group,
                 "recipe": {"method": "hawq", "budget_kind": "bitops", "budget": float(bitops), "a_bits": b,
                            "candidates": list(CANDIDATES)},
                 "note": f"Hessian/ILP weight bits under the BitOps of uniform W{b}A{b}, activations at {b} bits"},
            ]
    return {
        "name": "smpq",
        "description": ("SMPQ vs DNAS (argmax-alpha utility) vs uniform LSQ vs HAWQ-style allocation at equal BitOps "
                        f"(those of uniform W3A3 and W4A4) on {', '.join(datasets)} with a 128x128 MLP; the same "
                        "60-epoch LSQ fine-tuning budget for every method (the searches run before it)."),
        "seeds": 3,
        "train": {"epochs": 60, "batch_size": 256, "lr": 0.002, "patience": 10},
        "timing": {"repeats": 50, "warmup": 5},
        "models": [{"name": "mlp", "hidden": HIDDEN}],
        "datasets": list(datasets),
        "methods": methods,
    }


HEADER = """# Generated by benchmarks/smpq/make_suite.py (do not edit by hand: the budgets are computed).
# SMPQ vs DNAS vs uniform LSQ vs HAWQ at equal BitOps budgets (issue 6):
#   python benchmarks/smpq/make_suite.py
#   mpqat bench --suite smpq --seeds 3 --jobs 2 --out benchmarks/smpq/suite
# Each budget group holds uniform WbAb and the three searched methods at its BitOps (smpq/dnas as a
# fraction of FP32 BitOps, hawq in absolute BitOps per sample; the same number).
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SUITE)
    args = parser.parse_args()
    text = HEADER + yaml.safe_dump(suite(), sort_keys=False, width=120)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
