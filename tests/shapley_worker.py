"""Worker for tests/test_distributed.py: a Monte Carlo Shapley estimate split over torchrun ranks.

Usage: ``torchrun --nproc-per-node 2 tests/shapley_worker.py OUT_DIR``; every rank writes
``OUT_DIR/shapley_rank{r}.npz`` (marginals and evaluation counts). Run alone it writes rank 0's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from mpqat import distributed
from mpqat.shapley import permutation_shapley

WEIGHTS = np.array([0.5, 1.0, -0.25, 2.0, 0.75, 0.1])


def game(mask: np.ndarray) -> float:
    """A non-additive game: weighted sum plus a bonus when players 0 and 3 are both present."""
    return float(WEIGHTS[mask].sum() + (1.5 if mask[0] and mask[3] else 0.0))


def main() -> None:
    out = Path(sys.argv[1])
    ctx = distributed.context()
    draws = np.random.default_rng(7)

    def resample(m: int) -> None:  # a random stream that every rank must advance identically
        draws.random()

    est = permutation_shapley(game, len(WEIGHTS), samples=7, rng=np.random.default_rng(3), resample=resample)
    np.savez(out / f"shapley_rank{ctx.rank}.npz", marginals=est.marginals,
             counts=np.array([est.evaluations, est.computed, est.truncated]), draw=np.array([draws.random()]))
    distributed.barrier()


if __name__ == "__main__":
    main()
