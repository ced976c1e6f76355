"""Worker for tests/test_distributed.py: trains a small quantized MLP under torchrun (or alone).

Usage: ``torchrun --nproc-per-node 2 tests/distributed_worker.py OUT_DIR [--die-after EPOCH] [--resume]``.
Every rank writes ``OUT_DIR/state_rank{r}.pt`` (its final model state) and rank 0 ``OUT_DIR/result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from mpqat import distributed
from mpqat.methods import hooks_for
from mpqat.models import MLP
from mpqat.quantize import quantize
from mpqat.recipes import recipe_from_dict
from mpqat.train import TrainConfig, fit


def data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 6)).astype(np.float32)
    y = ((X[:, 0] + 0.5 * X[:, 1] * X[:, 2]) > 0).astype(np.int64)
    return (X[:450], y[:450]), (X[450:], y[450:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--method", default="nmp")
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out)
    ctx = distributed.context()
    recipe = recipe_from_dict({"method": args.method})
    torch.manual_seed(0)
    model = quantize(MLP(6, 2, hidden=(16, 16)), recipe)
    train, valid = data()

    def maybe_die(state: dict) -> None:
        if args.die_after and state["epoch"] == args.die_after:
            os._exit(17)  # a hard kill right after the checkpoint of that epoch

    config = TrainConfig(epochs=args.epochs, batch_size=64, lr=3e-3, patience=100, seed=0, progress=False)
    result = fit(model, train, valid, config, hooks_for(recipe), checkpoint_path=out / "checkpoint.pt",
                 resume=args.resume, fingerprint="worker", on_checkpoint=maybe_die)
    torch.save(model.state_dict(), out / f"state_rank{ctx.rank}.pt")
    if ctx.is_main:
        (out / "result.json").write_text(json.dumps({
            "history": result.history, "world_size": result.world_size,
            "rank_divergence": result.rank_divergence, "best_valid_accuracy": result.best_valid_accuracy}))
    distributed.barrier()


if __name__ == "__main__":
    main()
