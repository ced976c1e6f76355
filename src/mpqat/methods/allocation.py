"""Exact per-layer bit allocation under a budget (HAWQ-V3's ILP), shared by HAWQ and ADQ.

Given a sensitivity table ``omega[l, c]`` (the loss of putting layer ``l`` at candidate ``c``; see
:mod:`mpqat.methods.sensitivity`) and a cost table ``cost[l, c]`` in the budget's unit, choose one
candidate per layer to

    minimise  sum_l omega[l, b_l]   subject to   offset + sum_l cost[l, b_l] <= budget,

as a binary ILP with one-hot variables per layer, solved exactly by ``scipy.optimize.milp`` (HiGHS,
zero optimality gap). Layers may be restricted to some candidates (e.g. first/last pinned at 8 bits)
with the ``allowed`` mask. A budget below the cheapest allocation is a :class:`ConfigError` that
names the smallest feasible budget.

Costs come from :func:`budget_costs`, which asks :mod:`mpqat.cost` (the one definition of average
bits, size and BitOps) what each layer costs at each candidate, so the achieved budget is exactly
what ``metrics.json`` reports.

Example:
    >>> omega = np.array([[4.0, 1.0, 0.0], [9.0, 2.0, 0.0]])     # 2 layers x candidates (2, 4, 8)
    >>> cost = np.array([[2.0, 4.0, 8.0], [2.0, 4.0, 8.0]]) / 2  # average bits, equal-size layers
    >>> a = solve_allocation(omega, cost, budget=5.0, candidates=(2, 4, 8))
    >>> a.bits, a.objective, a.achieved
    ((4, 4), 3.0, 4.0)
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mpqat.cost import layer_costs
from mpqat.errors import ConfigError

#: Budget kinds understood by :func:`budget_costs`, with the unit used in messages.
BUDGET_UNITS = {"avg_bits": "average weight bits", "size": "bytes", "bitops": "BitOps"}

SetBits = Callable[[nn.Module, int], None]


@dataclass(frozen=True)
class Allocation:
    """The chosen bits per layer and what they cost."""

    bits: tuple[int, ...]
    objective: float
    achieved: float
    budget: float
    min_budget: float
    solve_seconds: float
    solver: str


@dataclass(frozen=True)
class BudgetCosts:
    """``matrix[l, c]``: cost of layer ``l`` at candidate ``c``; ``offset``: cost of the layers not allocated."""

    matrix: np.ndarray
    offset: float
    kind: str

    @property
    def unit(self) -> str:
        return BUDGET_UNITS.get(self.kind, self.kind)


def _check_tables(omega: np.ndarray, cost: np.ndarray, candidates: Sequence[int], allowed: np.ndarray) -> None:
    if omega.ndim != 2 or omega.shape != cost.shape or omega.shape != allowed.shape:
        raise ValueError(
            f"omega {omega.shape}, cost {cost.shape} and allowed {allowed.shape} must all be [layers, candidates]"
        )
    if omega.shape[1] != len(candidates):
        raise ValueError(f"{omega.shape[1]} columns but {len(candidates)} candidates")
    if not np.isfinite(omega[allowed]).all() or not np.isfinite(cost[allowed]).all():
        raise ValueError("omega and cost must be finite where allowed")
    empty = [i for i in range(len(allowed)) if not allowed[i].any()]
    if empty:
        raise ConfigError(f"layer(s) {empty} have no allowed candidate bit-width")


def min_budget(cost: np.ndarray, allowed: np.ndarray | None = None, offset: float = 0.0) -> float:
    """Smallest achievable budget: every layer at its cheapest allowed candidate.

    Example:
        >>> min_budget(np.array([[2.0, 4.0], [1.0, 3.0]]))
        3.0
    """
    allowed = np.ones(cost.shape, bool) if allowed is None else allowed
    return offset + math.fsum(float(np.where(allowed[i], cost[i], np.inf).min()) for i in range(len(cost)))


def _milp(omega: np.ndarray, cost: np.ndarray, budget: float, allowed: np.ndarray) -> np.ndarray:
    """Index of the chosen candidate per layer (optimal), via HiGHS branch and bound."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers, cands = omega.shape
    scale = float(np.abs(omega[allowed]).max()) or 1.0
    one_hot = np.kron(np.eye(layers), np.ones((1, cands)))
    constraints = [LinearConstraint(one_hot, 1, 1), LinearConstraint(cost.reshape(1, -1), -np.inf, budget)]
    result = milp(
        c=np.where(allowed, omega / scale, 0.0).ravel(),
        integrality=np.ones(layers * cands),
        bounds=Bounds(0, allowed.ravel().astype(float)),
        constraints=constraints,
        options={"mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise ConfigError(f"the bit allocation ILP failed: {result.message}")
    return np.round(result.x).reshape(layers, cands).argmax(axis=1)


def _spend_ties(
    choice: np.ndarray, omega: np.ndarray, cost: np.ndarray, allowed: np.ndarray, bound: float
) -> np.ndarray:
    """Among equally good solutions prefer more bits: raise a layer while its omega does not grow and the budget allows.

    The objective never increases, so an optimal choice stays optimal; this only matters when
    omega has ties (e.g. a loss-increase table clipped at zero).
    """
    choice = choice.copy()
    spent = math.fsum(float(cost[i, c]) for i, c in enumerate(choice))
    changed = True
    while changed:
        changed = False
        for i, c in enumerate(choice):
            better = [
                j for j in np.flatnonzero(allowed[i])
                if cost[i, j] > cost[i, c] and omega[i, j] <= omega[i, c] and spent - cost[i, c] + cost[i, j] <= bound
            ]
            if better:
                j = max(better, key=lambda k: (cost[i, k], -omega[i, k]))
                spent += float(cost[i, j] - cost[i, c])
                choice[i], changed = j, True
    return choice


def _allocation(choice: Sequence[int], omega: np.ndarray, cost: np.ndarray, candidates: Sequence[int],
                budget: float, lowest: float, offset: float, seconds: float, solver: str) -> Allocation:
    rows = range(len(choice))
    return Allocation(
        bits=tuple(int(candidates[c]) for c in choice),
        objective=math.fsum(float(omega[i, c]) for i, c in zip(rows, choice, strict=True)),
        achieved=offset + math.fsum(float(cost[i, c]) for i, c in zip(rows, choice, strict=True)),
        budget=float(budget), min_budget=lowest, solve_seconds=seconds, solver=solver,
    )


def _prepare(omega, cost, candidates, allowed, budget, offset, unit):
    omega, cost = np.asarray(omega, float), np.asarray(cost, float)
    allowed = np.ones(omega.shape, bool) if allowed is None else np.asarray(allowed, bool)
    _check_tables(omega, cost, candidates, allowed)
    lowest = min_budget(cost, allowed, offset)
    if not budget >= lowest - 1e-12 * max(1.0, abs(lowest)):
        raise ConfigError(
            f"budget {budget:g} {unit} is infeasible: the smallest feasible budget is {lowest:.6g} {unit} "
            "(every layer at its fewest allowed bits); raise the budget or add lower candidate bit-widths"
        )
    return omega, cost, allowed, lowest


def solve_allocation(
    omega: np.ndarray,
    cost: np.ndarray,
    budget: float,
    candidates: Sequence[int],
    allowed: np.ndarray | None = None,
    offset: float = 0.0,
    unit: str = "budget units",
) -> Allocation:
    """Optimal one-candidate-per-layer choice minimising ``sum omega`` with ``offset + sum cost <= budget``.

    ``omega``, ``cost``, ``allowed``: arrays ``[layers, len(candidates)]``. Exact (ILP with zero gap);
    the achieved cost is re-checked in exact arithmetic and the ILP re-solved with a tightened bound
    in the rare case HiGHS's feasibility tolerance let a violation through. Among tied optima, layers
    get the most bits the budget allows (see ``_spend_ties``).

    Example:
        >>> solve_allocation([[1.0, 0.0]], [[2.0, 8.0]], budget=1.0, candidates=(2, 8))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mpqat.errors.ConfigError: budget 1 budget units is infeasible: the smallest feasible budget is 2 budget units ...
    """
    omega, cost, allowed, lowest = _prepare(omega, cost, candidates, allowed, budget, offset, unit)
    t0 = time.perf_counter()
    bound = budget - offset
    for _ in range(5):
        choice = _milp(omega, cost, bound, allowed)
        spent = math.fsum(float(cost[i, c]) for i, c in enumerate(choice))
        excess = spent - (budget - offset)
        if excess <= 1e-12 * max(1.0, abs(budget)):
            choice = _spend_ties(choice, omega, cost, allowed, bound)
            break
        bound -= 2 * excess
    else:
        raise ConfigError(f"the bit allocation ILP could not meet the budget {budget:g} {unit} exactly")
    return _allocation(choice, omega, cost, candidates, budget, lowest, offset, time.perf_counter() - t0, "milp")


def brute_force_allocation(
    omega: np.ndarray,
    cost: np.ndarray,
    budget: float,
    candidates: Sequence[int],
    allowed: np.ndarray | None = None,
    offset: float = 0.0,
    max_combinations: int = 1_000_000,
) -> Allocation:
    """Same problem as :func:`solve_allocation` by enumeration (a cross-check for small instances).

    Example:
        >>> brute_force_allocation([[4.0, 1.0, 0.0], [9.0, 2.0, 0.0]], [[1, 2, 4], [1, 2, 4]], 5.0, (2, 4, 8)).bits
        (4, 4)
    """
    omega, cost, allowed, lowest = _prepare(omega, cost, candidates, allowed, budget, offset, "budget units")
    options = [np.flatnonzero(row) for row in allowed]
    if math.prod(len(o) for o in options) > max_combinations:
        raise ValueError("too many combinations for brute force")
    t0 = time.perf_counter()
    best, best_value = None, math.inf
    for choice in itertools.product(*options):
        spent = offset + math.fsum(float(cost[i, c]) for i, c in enumerate(choice))
        value = math.fsum(float(omega[i, c]) for i, c in enumerate(choice))
        if spent <= budget + 1e-12 * max(1.0, abs(budget)) and value < best_value:
            best, best_value = choice, value
    return _allocation(best, omega, cost, candidates, budget, lowest, offset, time.perf_counter() - t0, "brute-force")


# --------------------------------------------------------------------------------------------------
# Costs from the model (mpqat.cost is the one definition)
# --------------------------------------------------------------------------------------------------


def set_uniform_bits(layer: nn.Module, bits: int) -> None:
    """Default bit setter: every output row of ``layer.weight_quant`` at ``bits``."""
    layer.weight_quant.bit_widths.fill_(float(bits))


def _layer_value(kind: str, cost, total_params: int) -> float:
    if kind == "avg_bits":
        return cost.weight_storage_bits / total_params
    if kind == "size":
        return (cost.weight_storage_bits + cost.metadata_bits) / 8
    if kind == "bitops":
        return cost.bitops
    raise ConfigError(f"unknown budget kind '{kind}': choose one of {', '.join(BUDGET_UNITS)}")


@torch.no_grad()
def budget_costs(
    model: nn.Module,
    layers: dict[str, nn.Module],
    candidates: Sequence[int],
    kind: str,
    set_bits: SetBits = set_uniform_bits,
) -> BudgetCosts:
    """Cost of each of ``layers`` (name -> module, names as in ``named_modules``) at each candidate.

    Every listed layer is set to candidate ``c`` with ``set_bits`` and :func:`mpqat.cost.layer_costs`
    is asked; the layers' original bit-widths are restored afterwards. Layers of the model that are
    not listed (e.g. kept in float) make up the constant ``offset``. Units: ``avg_bits`` -
    parameter-weighted average weight bits; ``size`` - bytes including metadata; ``bitops`` - BitOps
    per sample, each layer with its own activation bits.

    Example:
        >>> from mpqat.quantize import quantize
        >>> from mpqat.recipes import Uniform
        >>> m = quantize(nn.Sequential(nn.Linear(6, 2), nn.ReLU(), nn.Linear(2, 2)), Uniform())
        >>> budget_costs(m, {"0": m[0], "2": m[2]}, (2, 8), "avg_bits").matrix.tolist()
        [[1.5, 6.0], [0.5, 2.0]]
    """
    saved = {name: layer.weight_quant.bit_widths.clone() for name, layer in layers.items()}
    matrix = np.zeros((len(layers), len(candidates)))
    offset = 0.0
    try:
        for j, bits in enumerate(candidates):
            for layer in layers.values():
                set_bits(layer, int(bits))
            costs = layer_costs(model)
            by_name = {c.name: c for c in costs}
            missing = sorted(set(layers) - set(by_name))
            if missing:
                raise ValueError(f"mpqat.cost does not know the layer(s) {missing}")
            total = sum(c.params for c in costs)
            for i, name in enumerate(layers):
                matrix[i, j] = _layer_value(kind, by_name[name], total)
            if j == 0:
                offset = math.fsum(_layer_value(kind, c, total) for c in costs if c.name not in layers)
    finally:
        for name, layer in layers.items():
            layer.weight_quant.bit_widths.copy_(saved[name])
    return BudgetCosts(matrix, offset, kind)


def allocate(
    omega: np.ndarray,
    costs: BudgetCosts,
    budget: float,
    candidates: Sequence[int],
    allowed: np.ndarray | None = None,
) -> Allocation:
    """:func:`solve_allocation` with the costs and unit of a :class:`BudgetCosts`."""
    return solve_allocation(omega, costs.matrix, budget, candidates, allowed, costs.offset, costs.unit)
