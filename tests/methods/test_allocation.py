"""Bit allocation: the ILP against brute force, budgets met exactly, infeasible budgets, costs = mpqat.cost."""

import numpy as np
import pytest
import torch
from torch import nn

from mpqat.cost import model_cost
from mpqat.errors import ConfigError
from mpqat.methods.allocation import (
    allocate,
    brute_force_allocation,
    budget_costs,
    min_budget,
    solve_allocation,
)
from mpqat.quantize import quantize
from mpqat.recipes import Uniform

CANDIDATES = (2, 3, 4, 6, 8)


def _random_instance(rng, monotone=True):
    layers = int(rng.integers(1, 6))
    cands = int(rng.integers(2, 6))
    candidates = tuple(sorted(rng.choice(CANDIDATES, size=cands, replace=False).tolist()))
    sizes = rng.integers(1, 500, size=layers)
    cost = np.outer(sizes, candidates) / sizes.sum()                       # average-bits costs
    if monotone:  # sensitivity falls with bits, as for real layers
        omega = rng.gamma(1.0, size=(layers, 1)) * 4.0 ** -np.array(candidates, float)[None, :] * 100
    else:
        omega = rng.normal(size=(layers, cands))
    allowed = np.ones((layers, cands), bool)
    if rng.random() < 0.3 and layers > 1:
        allowed[0] = False
        allowed[0, -1] = True                                               # a pinned layer
    lo, hi = min_budget(cost, allowed), float((cost * allowed).max(1).sum())
    budget = float(rng.uniform(lo, hi + 0.5))
    return omega, cost, candidates, allowed, budget


@pytest.mark.parametrize("monotone", [True, False])
def test_ilp_matches_brute_force_on_random_instances(monotone):
    rng = np.random.default_rng(7 if monotone else 8)
    for _ in range(40):
        omega, cost, candidates, allowed, budget = _random_instance(rng, monotone)
        ilp = solve_allocation(omega, cost, budget, candidates, allowed)
        brute = brute_force_allocation(omega, cost, budget, candidates, allowed)
        assert ilp.objective == pytest.approx(brute.objective, rel=1e-9, abs=1e-12)
        assert ilp.achieved <= budget + 1e-12
        for i, bits in enumerate(ilp.bits):
            assert allowed[i, candidates.index(bits)]


def test_known_optimum_and_budget_met_exactly():
    omega = np.array([[8.0, 2.0, 0.5], [1.0, 0.6, 0.1], [6.0, 1.0, 0.2]])
    cost = np.array([[2.0, 4.0, 8.0], [2.0, 4.0, 8.0], [2.0, 4.0, 8.0]]) / 3   # equal layers, avg bits
    a = solve_allocation(omega, cost, budget=4.0, candidates=(2, 4, 8))
    assert a.bits == (4, 4, 4) and a.objective == pytest.approx(3.6)
    assert a.bits == brute_force_allocation(omega, cost, 4.0, (2, 4, 8)).bits
    assert a.achieved == pytest.approx(4.0) and a.achieved <= 4.0
    tight = solve_allocation(omega, cost, budget=14 / 3, candidates=(2, 4, 8))  # exactly (8, 2, 4)
    assert tight.bits == (8, 2, 4) and tight.achieved == pytest.approx(14 / 3)


def test_budget_at_the_minimum_gives_every_layer_its_fewest_bits():
    cost = np.array([[2.0, 8.0], [4.0, 16.0]])
    a = solve_allocation([[5.0, 0.0], [5.0, 0.0]], cost, budget=6.0, candidates=(2, 8))
    assert a.bits == (2, 2) and a.achieved == 6.0 and a.min_budget == 6.0


def test_ties_are_broken_towards_more_bits_within_the_budget():
    cost = np.array([[2.0, 4.0, 8.0], [2.0, 4.0, 8.0]])
    omega = np.array([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])   # e.g. a loss table clipped at zero
    a = solve_allocation(omega, cost, budget=12.0, candidates=(2, 4, 8))
    assert a.objective == 0.0 and sorted(a.bits) == [4, 8] and a.achieved == 12.0


def test_impossible_budget_names_the_smallest_feasible_one():
    cost = np.array([[2.0, 8.0], [1.0, 4.0]])
    with pytest.raises(ConfigError, match=r"smallest feasible budget is 3 "):
        solve_allocation([[1.0, 0.0], [1.0, 0.0]], cost, budget=2.9, candidates=(2, 8))
    allowed = np.array([[False, True], [True, True]])                       # first layer pinned at 8
    with pytest.raises(ConfigError, match=r"smallest feasible budget is 9 "):
        solve_allocation([[1.0, 0.0], [1.0, 0.0]], cost, budget=8.0, candidates=(2, 8), allowed=allowed)


def _qmodel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    return quantize(net, Uniform(w_bits=8, a_bits=6, input_bits=8))


@pytest.mark.parametrize(("kind", "field"), [("avg_bits", "avg_weight_bits"), ("size", "size_bytes"), ("bitops", "bitops")])
def test_costs_agree_with_mpqat_cost(kind, field):
    model = _qmodel()
    layers = {name: model.get_submodule(name) for name in ("0", "2", "4")}
    costs = budget_costs(model, layers, CANDIDATES, kind)
    assert all(float(m.weight_quant.bit_widths[0]) == 8 for m in layers.values())   # restored
    rng = np.random.default_rng(0)
    omega = rng.random((3, len(CANDIDATES)))
    budget = float(costs.matrix[:, 1].sum() + costs.offset) * 1.2
    a = allocate(omega, costs, budget, CANDIDATES)
    for layer, bits in zip(layers.values(), a.bits, strict=True):
        layer.weight_quant.bit_widths.fill_(bits)
    assert model_cost(model).summary()[field] == pytest.approx(a.achieved, rel=1e-12)
    assert a.achieved <= budget


def test_layers_left_out_are_a_constant_offset():
    model = _qmodel()
    costs = budget_costs(model, {"2": model.get_submodule("2")}, CANDIDATES, "avg_bits")
    total = 10 * 16 + 16 * 8 + 8 * 3
    assert costs.offset == pytest.approx(8 * (10 * 16 + 8 * 3) / total)
    assert costs.matrix[0].tolist() == pytest.approx([b * 16 * 8 / total for b in CANDIDATES])
