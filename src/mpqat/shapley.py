"""Shapley values of cooperative games: exact enumeration and Monte Carlo permutation sampling.

Model-free: a *game* is a value function over coalitions of ``n`` players, a coalition being a
boolean mask ``[n]`` (True = the player is present). :mod:`mpqat.methods.smpq` uses it with the
players "(layer, weight|activation, candidate bit-width)" of a mixed-precision supernet.

* :func:`exact_shapley` enumerates every coalition (``2**n`` value evaluations, cached, ``n <= 20``):
  ``phi_i = sum_{S not containing i} |S|! (n-|S|-1)! / n! * (v(S + i) - v(S))``.
* :func:`permutation_shapley` is the Monte Carlo permutation estimator of Castro, Gomez & Tejada
  (2009) in the form Shapley-NAS uses it (Xiao et al., CVPR 2022, ``train_search.py``): start from
  the full coalition, remove the players one by one in a random order, and credit each player with
  the value lost when it leaves. Without truncation every permutation's marginals are an unbiased
  sample of the Shapley values, and they sum to ``v(all) - v(empty)`` (efficiency). With
  ``truncation=t`` a permutation stops once the value falls below ``ref + t * (v(all) - ref)``;
  the players not yet removed get a marginal of 0 (cheaper, slightly biased; Shapley-NAS's
  "early truncation" with ``t = 0.5`` and ``ref = 0``).
* :func:`robust_normalise` turns per-sample marginals into Shapley-NAS's update signal:
  ``mean - std`` over the samples (a penalty on unstable contributors), then zero mean and unit
  standard deviation within each group of players.

Value functions can be evaluated one coalition at a time (``value_fn(mask) -> float``) or many at
once (``batch_eval(masks [k, n]) -> values [k]``), which is how a supernet evaluates many masked
copies of itself in one vectorised forward pass. Evaluations are counted.

Example:
    >>> import numpy as np
    >>> weights = np.array([1.0, 2.0, 3.0])
    >>> additive = lambda mask: float(weights[mask].sum())          # phi_i = w_i
    >>> exact_shapley(additive, 3).values.tolist()
    [1.0, 2.0, 3.0]
    >>> est = permutation_shapley(additive, 3, samples=5, rng=np.random.default_rng(0))
    >>> np.allclose(est.mean, weights), est.evaluations
    (True, 12)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mpqat.distributed import all_reduce_, rank_and_world

ValueFn = Callable[[np.ndarray], float]
BatchEval = Callable[[np.ndarray], np.ndarray]

#: Largest player count :func:`exact_shapley` accepts (2**20 coalitions).
MAX_EXACT_PLAYERS = 20


@dataclass(frozen=True)
class ExactShapley:
    """Exact Shapley values, the number of value evaluations (``2**n``) and the time taken."""

    values: np.ndarray
    evaluations: int
    seconds: float
    full_value: float
    empty_value: float


@dataclass(frozen=True)
class ShapleyEstimate:
    """Monte Carlo Shapley estimate.

    ``marginals[m, i]``: player ``i``'s marginal contribution in permutation ``m`` (0 after a
    truncation). ``evaluations``: value evaluations the sequential algorithm needs (what a
    one-coalition-at-a-time implementation would run); ``computed``: evaluations actually run
    (batched evaluation may compute a few coalitions past a truncation point). ``truncated``:
    number of permutations cut short.
    """

    marginals: np.ndarray
    evaluations: int
    computed: int
    truncated: int
    seconds: float

    @property
    def samples(self) -> int:
        return int(self.marginals.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """The plain Monte Carlo estimate (unbiased without truncation)."""
        return self.marginals.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        """Standard deviation of the marginals over the samples (population, ``ddof=0``, as Shapley-NAS)."""
        return self.marginals.std(axis=0)

    @property
    def stderr(self) -> np.ndarray:
        """Standard error of :attr:`mean` (sample std with ``ddof=1`` over ``sqrt(M)``; NaN for one sample)."""
        if self.samples < 2:
            return np.full(self.marginals.shape[1], math.nan)
        return self.marginals.std(axis=0, ddof=1) / math.sqrt(self.samples)

    @property
    def robust(self) -> np.ndarray:
        """Shapley-NAS's robust estimate ``mean - std``."""
        return self.mean - self.std


class _Evaluator:
    """Wraps ``value_fn`` / ``batch_eval``: evaluates lists of masks, counts evaluations."""

    def __init__(self, value_fn: ValueFn | None, batch_eval: BatchEval | None, n_players: int) -> None:
        if value_fn is None and batch_eval is None:
            raise ValueError("give a value_fn(mask) or a batch_eval(masks)")
        self.value_fn, self.batch_eval, self.n = value_fn, batch_eval, n_players
        self.count = 0

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.n)
        self.count += len(masks)
        if self.batch_eval is not None:
            values = np.asarray(self.batch_eval(masks), dtype=np.float64).reshape(-1)
            if values.shape[0] != len(masks):
                raise ValueError(f"batch_eval returned {values.shape[0]} values for {len(masks)} coalitions")
        else:
            values = np.array([float(self.value_fn(m)) for m in masks], dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("the value function returned NaN or inf")
        return values


def _check_players(n_players: int) -> None:
    if isinstance(n_players, bool) or not isinstance(n_players, int | np.integer) or n_players < 1:
        raise ValueError(f"n_players must be a positive integer, got {n_players!r}")


def _masks_of(indices: np.ndarray, n_players: int) -> np.ndarray:
    """Boolean masks ``[len(indices), n]`` of coalitions numbered by bit pattern (bit i = player i)."""
    return ((indices[:, None] >> np.arange(n_players)[None, :]) & 1).astype(bool)


def coalition_values(value_fn: ValueFn | None, n_players: int, batch_eval: BatchEval | None = None,
                     chunk: int = 4096) -> np.ndarray:
    """Value of every coalition, indexed by its bit pattern (``values[sum_i mask_i * 2**i]``).

    Example:
        >>> coalition_values(lambda m: float(m.sum()), 2).tolist()
        [0.0, 1.0, 1.0, 2.0]
    """
    _check_players(n_players)
    if n_players > MAX_EXACT_PLAYERS:
        raise ValueError(f"{n_players} players: exact enumeration is limited to {MAX_EXACT_PLAYERS} (2**n coalitions)")
    evaluate = _Evaluator(value_fn, batch_eval, n_players)
    total = 1 << n_players
    out = np.empty(total)
    for start in range(0, total, chunk):
        idx = np.arange(start, min(total, start + chunk))
        out[idx] = evaluate(_masks_of(idx, n_players))
    return out


def shapley_from_table(values: np.ndarray, n_players: int) -> np.ndarray:
    """Exact Shapley values from a table of all ``2**n`` coalition values (see :func:`coalition_values`).

    Example:
        >>> shapley_from_table(np.array([0.0, 0.0, 0.0, 1.0]), 2).tolist()   # unanimity game of 2
        [0.5, 0.5]
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (1 << n_players,):
        raise ValueError(f"expected {1 << n_players} coalition values, got shape {values.shape}")
    idx = np.arange(1 << n_players)
    sizes = _masks_of(idx, n_players).sum(axis=1)
    # w(s) = s! (n-s-1)! / n! = 1 / (n * C(n-1, s)) for a coalition of size s not containing the player
    weight_of_size = np.array([1.0 / (n_players * math.comb(n_players - 1, s)) for s in range(n_players)])
    phi = np.empty(n_players)
    for i in range(n_players):
        without = idx[(idx >> i) & 1 == 0]
        gains = values[without | (1 << i)] - values[without]
        phi[i] = math.fsum(weight_of_size[sizes[without]] * gains)
    return phi


def exact_shapley(value_fn: ValueFn | None, n_players: int, batch_eval: BatchEval | None = None) -> ExactShapley:
    """Exact Shapley values by enumerating all ``2**n`` coalitions (each evaluated once).

    Example:
        >>> glove = lambda m: float(min(m[0], m[1] + m[2]))     # a left glove, two right gloves
        >>> np.round(exact_shapley(glove, 3).values, 6).tolist()
        [0.666667, 0.166667, 0.166667]
    """
    t0 = time.perf_counter()
    table = coalition_values(value_fn, n_players, batch_eval)
    phi = shapley_from_table(table, n_players)
    return ExactShapley(phi, len(table), time.perf_counter() - t0, float(table[-1]), float(table[0]))


def permutation_shapley(
    value_fn: ValueFn | None,
    n_players: int,
    samples: int,
    *,
    truncation: float | None = None,
    truncation_ref: float | str = "empty",
    rng: np.random.Generator | None = None,
    batch_eval: BatchEval | None = None,
    chunk: int = 16,
    resample: Callable[[int], None] | None = None,
    permutations: Sequence[np.ndarray] | None = None,
    antithetic: bool = False,
    split_ranks: bool = True,
) -> ShapleyEstimate:
    """Monte Carlo permutation Shapley estimate (Castro et al. 2009), removal order, optional truncation.

    For each of ``samples`` random permutations: evaluate the full coalition, then remove the
    players in permutation order; player ``i``'s marginal is ``v(before) - v(after its removal)``.

    * ``truncation``: None (exact per permutation) or a fraction ``t``: stop a permutation once
      ``v(S) < ref + t * (v(all) - ref)``; the remaining players' marginals are 0.
      ``truncation_ref``: a number (Shapley-NAS: 0, i.e. "accuracy below half the full accuracy")
      or ``"empty"``: the value of the empty coalition.
    * ``batch_eval``: evaluates ``chunk`` coalitions of a permutation at once; the truncation is
      then checked after each chunk (``computed`` counts the wasted evaluations too).
    * ``resample(m)``: called before permutation ``m`` (e.g. to draw a fresh validation batch);
      the game may change between permutations, so ``v(all)`` and ``v(empty)`` are re-evaluated.
      Without it the game is fixed and they are evaluated once, so ``M`` permutations of ``n``
      players cost ``2 + M * (n - 1)`` evaluations (the last removal always reaches the empty set).
    * ``permutations``: fixed orders instead of random ones (tests).
    * ``antithetic``: every second permutation is the reverse of the one before (a classic variance
      reduction for permutation sampling; each permutation is still uniformly distributed, so the
      estimate stays unbiased).
    * ``split_ranks``: under ``torchrun`` (an initialised process group), rank ``r`` evaluates the
      permutations ``m`` with ``m % world_size == r`` and the marginals and counts are summed over
      the ranks, so every rank returns the same estimate as one process would. Every rank still
      draws every permutation and calls ``resample(m)`` for every ``m``, which keeps random streams
      identical across ranks.

    Example:
        >>> unanimity = lambda m: float(m.all())
        >>> est = permutation_shapley(unanimity, 4, samples=20, rng=np.random.default_rng(1))
        >>> float(est.mean.sum())                    # efficiency: v(all) - v(empty)
        1.0
    """
    _check_players(n_players)
    if isinstance(samples, bool) or not isinstance(samples, int | np.integer) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if truncation is not None and not (0.0 <= float(truncation) <= 1.0):
        raise ValueError(f"truncation must be None or a fraction in [0, 1], got {truncation!r}")
    if not (truncation_ref == "empty" or isinstance(truncation_ref, int | float)):
        raise ValueError(f"truncation_ref must be 'empty' or a number, got {truncation_ref!r}")
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    if permutations is not None and len(permutations) != samples:
        raise ValueError(f"{len(permutations)} permutations given for {samples} samples")
    rng = rng if rng is not None else np.random.default_rng()
    evaluate = _Evaluator(value_fn, batch_eval, n_players)
    step = chunk if batch_eval is not None else 1
    t0 = time.perf_counter()
    marginals = np.zeros((samples, n_players))
    sequential, truncated = 0, 0
    ends_masks = np.stack([np.ones(n_players, bool), np.zeros(n_players, bool)])
    cached: tuple[float, float] | None = None
    rank, world = rank_and_world() if split_ranks else (0, 1)
    for m in range(samples):
        if permutations is not None:
            order = np.asarray(permutations[m])
        elif antithetic and m % 2 == 1:
            order = order[::-1].copy()
        else:
            order = rng.permutation(n_players)
        if sorted(order.tolist()) != list(range(n_players)):
            raise ValueError(f"permutation {m} is not a permutation of range({n_players})")
        if resample is not None:
            resample(m)
        if m % world != rank:
            continue  # another rank evaluates this permutation
        if cached is None or resample is not None:
            ends = evaluate(ends_masks)
            # a fixed game's two end values are evaluated once per rank but counted once overall
            sequential += 2 if (resample is not None or rank == 0) else 0
            cached = (float(ends[0]), float(ends[1]))
        v_full, v_empty = cached
        threshold = -math.inf
        if truncation is not None:
            ref = v_empty if truncation_ref == "empty" else float(truncation_ref)
            threshold = ref + float(truncation) * (v_full - ref)
        previous, present, pos, stop = v_full, np.ones(n_players, bool), 0, False
        # the last removal leaves the empty coalition, whose value is known: n - 1 evaluations
        while pos < n_players - 1 and not stop:
            block = order[pos : min(pos + step, n_players - 1)]
            masks = np.empty((len(block), n_players), bool)
            for k, player in enumerate(block):
                present[player] = False
                masks[k] = present
            values = evaluate(masks)
            for k, player in enumerate(block):
                marginals[m, player] = previous - values[k]
                previous = values[k]
                sequential += 1
                if values[k] < threshold:
                    stop = True
                    truncated += 1
                    break
            pos += len(block)
        if not stop:
            marginals[m, order[-1]] = previous - v_empty
    computed = evaluate.count
    if world > 1:
        marginals, (sequential, computed, truncated) = _sum_over_ranks(marginals, (sequential, computed, truncated))
    return ShapleyEstimate(marginals, sequential, computed, truncated, time.perf_counter() - t0)


def _sum_over_ranks(marginals: np.ndarray, counts: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Sum the per-rank marginals (each rank filled only its own permutations) and counts."""
    total = all_reduce_(torch.from_numpy(np.ascontiguousarray(marginals, dtype=np.float64)).clone(), "sum")
    summed = all_reduce_(torch.tensor(counts, dtype=torch.float64), "sum")
    return total.numpy(), tuple(int(round(float(c))) for c in summed)


def robust_normalise(marginals: np.ndarray | ShapleyEstimate, groups: Sequence[int] | np.ndarray | None = None,
                     robust: bool = True, eps: float = 1e-8) -> np.ndarray:
    """Shapley-NAS's update signal: ``mean - std`` over samples, z-normalised within each group.

    ``marginals``: ``[samples, players]`` (or a :class:`ShapleyEstimate`); ``groups``: a group id per
    player (None: one group). ``robust=False`` uses the plain mean. The normalisation divides by
    the sample standard deviation of the group (``ddof=1``, as ``torch.std``); a group whose values
    are all equal (or a group of one) becomes zeros.

    Example:
        >>> robust_normalise(np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])).round(3).tolist()
        [-1.0, 0.0, 1.0]
    """
    data = marginals.marginals if isinstance(marginals, ShapleyEstimate) else np.asarray(marginals, np.float64)
    if data.ndim != 2:
        raise ValueError(f"marginals must be [samples, players], got shape {data.shape}")
    phi = data.mean(axis=0) - (data.std(axis=0) if robust else 0.0)
    group_ids = np.zeros(phi.shape[0], int) if groups is None else np.asarray(groups)
    if group_ids.shape != phi.shape:
        raise ValueError(f"{group_ids.shape[0]} group ids for {phi.shape[0]} players")
    out = np.zeros_like(phi)
    for g in np.unique(group_ids):
        sel = group_ids == g
        vals = phi[sel]
        spread = vals.std(ddof=1) if vals.size > 1 else 0.0
        out[sel] = (vals - vals.mean()) / spread if spread > eps else 0.0
    return out


def relative_l2(estimate: np.ndarray, exact: np.ndarray) -> float:
    """``||estimate - exact||_2 / ||exact||_2`` (the estimator study's error measure).

    Example:
        >>> relative_l2(np.array([1.1, 1.9]), np.array([1.0, 2.0])) < 0.07
        True
    """
    exact = np.asarray(exact, np.float64)
    norm = float(np.linalg.norm(exact))
    if norm == 0.0:
        raise ValueError("the exact Shapley values are all zero: the relative error is undefined")
    return float(np.linalg.norm(np.asarray(estimate, np.float64) - exact)) / norm
