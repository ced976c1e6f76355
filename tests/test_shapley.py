"""Shapley values: exact enumeration on games with known values, the Monte Carlo estimator's properties."""

import itertools
import math

import numpy as np
import pytest

from mpqat.shapley import (
    coalition_values,
    exact_shapley,
    permutation_shapley,
    relative_l2,
    robust_normalise,
    shapley_from_table,
)


def _additive(weights):
    weights = np.asarray(weights, float)
    return lambda mask: float(weights[mask].sum())


def _glove(left, right):
    """Glove game: value = number of matched (left, right) pairs."""
    return lambda mask: float(min(mask[:left].sum(), mask[left : left + right].sum()))


def _brute_force_shapley(value_fn, n):
    """Shapley values by averaging marginals over all n! orders (the definition)."""
    phi = np.zeros(n)
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        mask = np.zeros(n, bool)
        before = value_fn(mask)
        for p in order:
            mask[p] = True
            after = value_fn(mask)
            phi[p] += after - before
            before = after
    return phi / len(orders)


def _random_game(n, seed):
    table = np.random.default_rng(seed).normal(size=1 << n)
    table[0] = 0.0
    return lambda mask: float(table[int((mask * (1 << np.arange(n))).sum())])


# ------------------------------------------------------------------------------------------- exact


def test_exact_additive_game_gives_the_weights():
    w = [0.5, -1.0, 2.0, 3.5, 0.0]
    result = exact_shapley(_additive(w), 5)
    np.testing.assert_allclose(result.values, w, atol=1e-12)
    assert result.evaluations == 32
    assert result.full_value == pytest.approx(5.0) and result.empty_value == 0.0


def test_exact_glove_game_known_values():
    # 1 left glove, 2 right gloves: the scarce left glove gets 2/3, each right glove 1/6
    np.testing.assert_allclose(exact_shapley(_glove(1, 2), 3).values, [2 / 3, 1 / 6, 1 / 6], atol=1e-12)
    # 2 left, 2 right: symmetric, 1/2 each
    np.testing.assert_allclose(exact_shapley(_glove(2, 2), 4).values, [0.5] * 4, atol=1e-12)


def test_exact_unanimity_game_splits_equally_among_the_carrier():
    carrier = [1, 3, 4]
    game = lambda m: float(m[carrier].all())  # noqa: E731
    phi = exact_shapley(game, 6).values
    np.testing.assert_allclose(phi, [0, 1 / 3, 0, 1 / 3, 1 / 3, 0], atol=1e-12)


def test_exact_matches_the_permutation_definition_and_is_efficient():
    for seed in range(3):
        game = _random_game(5, seed)
        exact = exact_shapley(game, 5)
        np.testing.assert_allclose(exact.values, _brute_force_shapley(game, 5), atol=1e-10)
        assert exact.values.sum() == pytest.approx(exact.full_value - exact.empty_value, abs=1e-10)


def test_batched_and_single_evaluation_agree():
    game = _random_game(6, 7)
    batched = lambda masks: np.array([game(m) for m in masks])  # noqa: E731
    np.testing.assert_array_equal(exact_shapley(game, 6).values, exact_shapley(None, 6, batch_eval=batched).values)
    table = coalition_values(game, 6)
    np.testing.assert_array_equal(shapley_from_table(table, 6), exact_shapley(game, 6).values)


def test_exact_refuses_too_many_players_and_bad_input():
    with pytest.raises(ValueError, match="limited"):
        exact_shapley(lambda m: 0.0, 30)
    with pytest.raises(ValueError, match="n_players"):
        exact_shapley(lambda m: 0.0, 0)
    with pytest.raises(ValueError, match="NaN"):
        exact_shapley(lambda m: math.nan, 2)


# ------------------------------------------------------------------------------------- Monte Carlo


def test_every_permutation_is_efficient_without_truncation():
    game = _random_game(7, 3)
    est = permutation_shapley(game, 7, samples=25, rng=np.random.default_rng(0))
    total = game(np.ones(7, bool)) - game(np.zeros(7, bool))
    np.testing.assert_allclose(est.marginals.sum(axis=1), total, atol=1e-12)
    assert est.evaluations == 2 + 25 * 6 and est.computed == est.evaluations and est.truncated == 0


def test_estimator_is_unbiased_mean_over_many_runs():
    """Mean of 400 independent 3-permutation estimates is within 4 standard errors of the exact values."""
    n = 6
    game = _random_game(n, 11)
    exact = exact_shapley(game, n).values
    rng = np.random.default_rng(2024)
    runs = np.stack([permutation_shapley(game, n, samples=3, rng=rng).mean for _ in range(400)])
    stderr = runs.std(axis=0, ddof=1) / math.sqrt(len(runs))
    assert np.all(np.abs(runs.mean(axis=0) - exact) <= 4 * stderr + 1e-12)
    # and the spread of one estimate is real (the test could fail for a biased estimator)
    assert stderr.max() > 0


def test_antithetic_pairs_are_reversed_and_stay_unbiased():
    n = 6
    squared = lambda m: float(m.sum()) ** 2  # noqa: E731  marginal of the k-th removal: 2(n-k)-1
    est = permutation_shapley(squared, n, 4, rng=np.random.default_rng(0), antithetic=True)
    # in a reversed order the k-th removal becomes the (n-1-k)-th: the two marginals add up to 2n
    np.testing.assert_array_equal(est.marginals[0] + est.marginals[1], 2 * n)
    np.testing.assert_array_equal(est.marginals[2] + est.marginals[3], 2 * n)
    game = _random_game(n, 12)
    exact = exact_shapley(game, n).values
    rng = np.random.default_rng(99)
    runs = np.stack([permutation_shapley(game, n, 4, rng=rng, antithetic=True).mean for _ in range(400)])
    stderr = runs.std(axis=0, ddof=1) / math.sqrt(len(runs))
    assert np.all(np.abs(runs.mean(axis=0) - exact) <= 4 * stderr + 1e-12)


def test_estimator_error_falls_with_samples():
    n = 8
    game = _random_game(n, 5)
    exact = exact_shapley(game, n).values
    rng = np.random.default_rng(0)

    def err(m):
        return np.mean([relative_l2(permutation_shapley(game, n, m, rng=rng).mean, exact) for _ in range(20)])

    assert err(100) < 0.5 * err(5)


def test_batched_estimator_equals_sequential_for_fixed_permutations():
    n = 7
    game = _random_game(n, 9)
    batched = lambda masks: np.array([game(m) for m in masks])  # noqa: E731
    perms = [np.random.default_rng(s).permutation(n) for s in range(5)]
    a = permutation_shapley(game, n, 5, permutations=perms, truncation=0.5)
    b = permutation_shapley(None, n, 5, permutations=perms, truncation=0.5, batch_eval=batched, chunk=3)
    np.testing.assert_array_equal(a.marginals, b.marginals)
    assert a.evaluations == b.evaluations and b.computed >= b.evaluations


def test_truncation_stops_early_and_zeroes_the_rest():
    # value = number of players present; remove order 0..5: value goes 6,5,4,...; ref 0, t = 0.5 -> stop below 3
    game = lambda m: float(m.sum())  # noqa: E731
    est = permutation_shapley(game, 6, 1, permutations=[np.arange(6)], truncation=0.5, truncation_ref=0.0)
    np.testing.assert_array_equal(est.marginals[0], [1, 1, 1, 1, 0, 0])
    assert est.truncated == 1 and est.evaluations == 2 + 4
    # "empty" reference: v(empty) = 0 here too, same result
    est2 = permutation_shapley(game, 6, 1, permutations=[np.arange(6)], truncation=0.5)
    np.testing.assert_array_equal(est.marginals, est2.marginals)


def test_resample_is_called_per_permutation_and_reevaluates_the_ends():
    calls = []
    est = permutation_shapley(_additive([1, 2, 3]), 3, 4, rng=np.random.default_rng(0), resample=calls.append)
    assert calls == [0, 1, 2, 3] and est.evaluations == 4 * (2 + 2)


def test_bad_arguments():
    game = _additive([1, 2])
    with pytest.raises(ValueError, match="samples"):
        permutation_shapley(game, 2, 0)
    with pytest.raises(ValueError, match="truncation"):
        permutation_shapley(game, 2, 1, truncation=1.5)
    with pytest.raises(ValueError, match="permutation"):
        permutation_shapley(game, 2, 1, permutations=[np.array([0, 0])])
    with pytest.raises(ValueError, match="value_fn"):
        permutation_shapley(None, 2, 1)


# ---------------------------------------------------------------------------------- normalisation


def test_robust_normalise_mean_minus_std_then_z_per_group():
    marginals = np.array([[1.0, 0.0, 3.0, 4.0, 2.0, 7.0], [3.0, 0.0, 3.0, 4.0, 2.0, 7.0]])
    # mean - std (ddof 0): [2 - 1, 0, 3 | 4, 2, 7]; z-scores with the sample std (ddof 1)
    phi = robust_normalise(marginals, groups=[0, 0, 0, 1, 1, 1])
    first, second = np.array([1.0, 0.0, 3.0]), np.array([4.0, 2.0, 7.0])
    expected = np.concatenate([(g - g.mean()) / g.std(ddof=1) for g in (first, second)])
    np.testing.assert_allclose(phi, expected)
    plain = np.array([2.0, 0, 3, 4, 2, 7])
    np.testing.assert_allclose(robust_normalise(marginals, robust=False), (plain - plain.mean()) / plain.std(ddof=1))
    # the unstable player (std 1) loses against a stable one with the same mean
    assert robust_normalise(np.array([[1.0, 2.0], [3.0, 2.0]]))[0] < 0
    np.testing.assert_array_equal(robust_normalise(np.ones((3, 2))), [0.0, 0.0])
    with pytest.raises(ValueError, match="group"):
        robust_normalise(marginals, groups=[0, 1])


def test_relative_l2():
    assert relative_l2(np.array([3.0, 4.0]), np.array([3.0, 4.0])) == 0.0
    assert relative_l2(np.array([0.0, 0.0]), np.array([3.0, 4.0])) == 1.0
    with pytest.raises(ValueError, match="zero"):
        relative_l2(np.ones(2), np.zeros(2))
