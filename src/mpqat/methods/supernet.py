"""Mechanics shared by the supernet searches (DNAS / EdMIPS and SMPQ): build, evaluate, select.

* :class:`SearchSpace`: the candidate weight / activation bit-widths of every quantized layer.
* :func:`build_supernet`: a copy of a quantized model whose LSQ / power-of-two quantizers are
  replaced by mixtures (:mod:`mpqat.quant.mixture`) over the layer's candidates, sharing the weights.
* :class:`CoalitionValue`: the supernet as a cooperative game. The players are the candidates
  ``(layer, weight|activation, bits)`` of every quantizer with more than one candidate; a coalition
  is evaluated by masking every absent candidate out of the mixtures and measuring accuracy (or
  minus the cross-entropy) on a validation batch. Many coalitions are evaluated in one vectorised
  forward pass (``torch.func.vmap`` over the mask buffers).
* :func:`select_bits`: the final per-layer ``(w_bits, a_bits)`` from per-candidate utilities, either
  the largest utility per quantizer (``argmax``, DNAS's rule) or the exact multiple-choice knapsack
  maximising the summed utility under the budget (``knapsack``, solved as an ILP by
  :mod:`mpqat.methods.allocation`), so the budget is never exceeded.

Costs always come from :mod:`mpqat.cost` (the one definition of BitOps and average bits).

Example:
    >>> from mpqat.quantize import quantize
    >>> from mpqat.recipes import Uniform
    >>> m = quantize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), Uniform())
    >>> space = SearchSpace(("0", "2"), ((2, 8), (2, 8)), ((8,), (2, 8)))
    >>> net = build_supernet(m, space)
    >>> [p.label for p in CoalitionValue(net, space).players]
    ['0.w2', '0.w8', '2.w2', '2.w8', '2.a2', '2.a8']
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from mpqat.cost import layer_costs
from mpqat.errors import ConfigError
from mpqat.methods.allocation import Allocation, budget_costs, min_budget, solve_allocation
from mpqat.nn.conv import QuantConv1d, QuantConv2d
from mpqat.quant.mixture import MixtureActQuantizer, MixtureWeightQuantizer

KINDS = ("w", "a")


@dataclass(frozen=True)
class SearchSpace:
    """Layer names (as in ``named_modules``) and each layer's weight / activation candidates."""

    names: tuple[str, ...]
    w_candidates: tuple[tuple[int, ...], ...]
    a_candidates: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.w_candidates) == len(self.a_candidates)):
            raise ValueError("names, w_candidates and a_candidates must have one entry per layer")

    def candidates(self, layer: int, kind: str) -> tuple[int, ...]:
        return (self.w_candidates if kind == "w" else self.a_candidates)[layer]

    def w_union(self) -> tuple[int, ...]:
        return tuple(sorted({b for c in self.w_candidates for b in c}))

    def a_union(self) -> tuple[int, ...]:
        return tuple(sorted({b for c in self.a_candidates for b in c}))


@dataclass(frozen=True)
class Player:
    """One Shapley player: candidate ``bits`` of the ``kind`` quantizer of layer number ``layer``."""

    layer: int
    name: str
    kind: str
    index: int
    bits: int

    @property
    def label(self) -> str:
        return f"{self.name}.{self.kind}{self.bits}"


# --------------------------------------------------------------------------------------------------
# Supernet
# --------------------------------------------------------------------------------------------------


def build_supernet(model: nn.Module, space: SearchSpace) -> nn.Module:
    """A deep copy of ``model`` with every listed layer's quantizers replaced by candidate mixtures.

    The layers must carry fixed-bit quantizers of the project's kind (``weight_quant`` with
    ``step``/``in_features``/``per_neuron``, ``act_quant`` with ``features``/``signed``/``per_feature``),
    e.g. :class:`~mpqat.quant.LSQWeightQuantizer` and :class:`~mpqat.quant.Pow2ActQuantizer`.
    """
    net = copy.deepcopy(model)
    for name, w_cands, a_cands in zip(space.names, space.w_candidates, space.a_candidates, strict=True):
        layer = net.get_submodule(name)
        wq, aq = layer.weight_quant, layer.act_quant
        layer.weight_quant = MixtureWeightQuantizer(
            wq.step.shape[0], wq.in_features, w_cands, per_neuron=getattr(wq, "per_neuron", True)
        )
        layer.act_quant = MixtureActQuantizer(aq.features, a_cands, signed=aq.signed,
                                              per_feature=getattr(aq, "per_feature", False))
    return net


def mixture_of(net: nn.Module, name: str, kind: str) -> MixtureWeightQuantizer | MixtureActQuantizer:
    layer = net.get_submodule(name)
    return layer.weight_quant if kind == "w" else layer.act_quant


def arch_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The architecture parameters (every mixture's ``alpha``)."""
    return [p for name, p in net.named_parameters() if name.rsplit(".", 1)[-1] == "alpha"]


def weight_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the architecture parameters."""
    return [p for name, p in net.named_parameters() if name.rsplit(".", 1)[-1] != "alpha"]


@contextmanager
def search_eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Evaluate the supernet's mixtures (the training-mode forward) without gradients, with batch
    norm using its running statistics and dropout off; the modes are restored afterwards."""
    modes = {m: m.training for m in net.modules()}
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout):
            m.eval()
    try:
        with torch.no_grad():
            yield net
    finally:
        for m, mode in modes.items():
            m.training = mode


# --------------------------------------------------------------------------------------------------
# The supernet as a cooperative game
# --------------------------------------------------------------------------------------------------


class CoalitionValue:
    """Value of coalitions of bit-width candidates: the supernet's validation score with the others masked.

    ``value="accuracy"`` (Shapley-NAS) or ``"neg_loss"`` (minus the mean cross-entropy). Call
    :meth:`set_batch` first; calling the object with a boolean matrix ``[k, players]`` returns ``k``
    values, evaluated ``max_batch`` coalitions per vectorised forward pass. Masks are only set
    inside the call (the supernet's own ``mask`` buffers stay all ones).
    """

    def __init__(self, net: nn.Module, space: SearchSpace, value: str = "accuracy", max_batch: int = 16) -> None:
        if value not in ("accuracy", "neg_loss"):
            raise ConfigError(f"value={value!r} is not supported: choose accuracy or neg_loss")
        self.net, self.space, self.value, self.max_batch = net, space, value, max(1, int(max_batch))
        if any(isinstance(m, nn.modules.conv._ConvNd | QuantConv1d | QuantConv2d) for m in net.modules()):
            # vmap turns a batch of convolutions with different kernels into a grouped convolution,
            # slower per coalition on CPU than one coalition at a time (measured on resnet8)
            self.max_batch = 1
        self.players: list[Player] = []
        self.slots: list[tuple[str, int, list[int]]] = []  # (mask buffer name, candidates, player ids)
        for kind in KINDS:
            for layer, name in enumerate(space.names):
                cands = space.candidates(layer, kind)
                if len(cands) < 2:
                    continue
                ids = []
                for index, bits in enumerate(cands):
                    ids.append(len(self.players))
                    self.players.append(Player(layer, name, kind, index, bits))
                quant = "weight_quant" if kind == "w" else "act_quant"
                self.slots.append((f"{name}.{quant}.mask", len(cands), ids))
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    @property
    def n_players(self) -> int:
        return len(self.players)

    def groups(self) -> np.ndarray:
        """Group id per player: 0 for weight candidates, 1 for activation candidates."""
        return np.array([KINDS.index(p.kind) for p in self.players], dtype=int)

    def set_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def _masks(self, coalitions: np.ndarray) -> dict[str, torch.Tensor]:
        present = torch.from_numpy(np.ascontiguousarray(coalitions, dtype=np.float32))
        return {buffer: present[:, ids] for buffer, _, ids in self.slots}

    def _forward(self, masks: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.net, masks, (x,), strict=False)

    def logits(self, coalitions: np.ndarray) -> torch.Tensor:
        """Supernet logits ``[k, batch, classes]`` for ``k`` coalitions on the current batch."""
        if self.x is None:
            raise RuntimeError("call set_batch(x, y) before evaluating coalitions")
        coalitions = np.asarray(coalitions, dtype=bool).reshape(-1, self.n_players)
        outs = []
        with search_eval_mode(self.net):
            for start in range(0, len(coalitions), self.max_batch):
                masks = self._masks(coalitions[start : start + self.max_batch])
                outs.append(vmap(self._forward, in_dims=(0, None))(masks, self.x))
        return torch.cat(outs)

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        logits = self.logits(coalitions)
        if self.value == "accuracy":
            return (logits.argmax(-1) == self.y).double().mean(-1).numpy()
        k, b, c = logits.shape
        loss = F.cross_entropy(logits.reshape(k * b, c), self.y.repeat(k), reduction="none").reshape(k, b)
        return (-loss.double().mean(-1)).numpy()


# --------------------------------------------------------------------------------------------------
# Selection under a budget
# --------------------------------------------------------------------------------------------------

#: Budget kinds: unit used in messages.
BUDGET_KINDS = {
    "avg_bits": "average bits",
    "bitops": "BitOps",
    "bitops_rel": "of the FP32 BitOps",
}


@dataclass(frozen=True)
class Selection:
    """Chosen bits per layer, what they cost and how they were chosen."""

    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    achieved: float
    achieved_a: float | None
    budget: float
    a_budget: float | None
    min_budget: float
    min_a_budget: float | None
    met: bool
    solve_seconds: float
    rule: str


@torch.no_grad()
def _set_bits(layer: nn.Module, w_bits: int, a_bits: int) -> None:
    layer.weight_quant.bit_widths.fill_(float(w_bits))
    layer.act_quant.bit_widths.fill_(float(a_bits))


@contextmanager
def _restored_bits(layers: dict[str, nn.Module]) -> Iterator[None]:
    saved = {n: (m.weight_quant.bit_widths.clone(), m.act_quant.bit_widths.clone()) for n, m in layers.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, m in layers.items():
                m.weight_quant.bit_widths.copy_(saved[n][0])
                m.act_quant.bit_widths.copy_(saved[n][1])


def bitops_table(model: nn.Module, layers: dict[str, nn.Module], space: SearchSpace
                 ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]], float, float]:
    """``(cost [layers, options], allowed, options, offset, fp32_bitops)`` with options = (w, a) pairs.

    ``cost[l, o]`` is layer ``l``'s BitOps (per sample, :mod:`mpqat.cost`) at option ``o``;
    ``allowed[l, o]`` says whether both bit-widths are candidates of that layer.
    """
    options = list(itertools.product(space.w_union(), space.a_union()))
    cost = np.zeros((len(layers), len(options)))
    allowed = np.zeros_like(cost, dtype=bool)
    offset, fp32 = 0.0, 0.0
    with _restored_bits(layers):
        for o, (wb, ab) in enumerate(options):
            for m in layers.values():
                _set_bits(m, wb, ab)
            by_name = {c.name: c for c in layer_costs(model)}
            missing = sorted(set(layers) - set(by_name))
            if missing:
                raise ValueError(f"mpqat.cost does not know the layer(s) {missing}")
            for i, name in enumerate(layers):
                cost[i, o] = by_name[name].bitops
                allowed[i, o] = wb in space.w_candidates[i] and ab in space.a_candidates[i]
            if o == 0:
                offset = math.fsum(c.bitops for n, c in by_name.items() if n not in layers)
                fp32 = float(sum(c.macs for c in by_name.values()) * 32 * 32)
    return cost, allowed, options, offset, fp32


def act_avg_table(model: nn.Module, layers: dict[str, nn.Module], space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
    """``(cost [layers-1, |a_union|], allowed)``: contribution of layers 2..L's inputs to the average
    activation bits (element-weighted over those inputs; the model input is not counted)."""
    union = space.a_union()
    by_name = {c.name: c for c in layer_costs(model)}
    elems = np.array([by_name[n].in_features for n in space.names[1:]], dtype=np.float64)
    total = elems.sum()
    cost = np.outer(elems / max(total, 1.0), np.array(union, dtype=np.float64))
    allowed = np.array([[b in space.a_candidates[i + 1] for b in union] for i in range(len(space.names) - 1)],
                       dtype=bool).reshape(-1, len(union))
    return cost, allowed


def budget_in_bitops(kind: str, budget: float, fp32_bitops: float) -> float:
    """The BitOps budget per sample for ``bitops`` (absolute) or ``bitops_rel`` (fraction of FP32)."""
    return budget * fp32_bitops if kind == "bitops_rel" else budget


def minimum_budgets(model: nn.Module, layers: dict[str, nn.Module], space: SearchSpace, kind: str
                    ) -> tuple[float, float | None]:
    """Smallest feasible budget in the recipe's unit (and for the activation average, with ``avg_bits``)."""
    if kind == "avg_bits":
        costs = budget_costs(model, layers, space.w_union(), "avg_bits")
        w_allowed = np.array([[b in c for b in space.w_union()] for c in space.w_candidates], dtype=bool)
        lowest = min_budget(costs.matrix, w_allowed, costs.offset)
        a_cost, a_allowed = act_avg_table(model, layers, space)
        return lowest, (min_budget(a_cost, a_allowed) if len(a_cost) else None)
    cost, allowed, _, offset, fp32 = bitops_table(model, layers, space)
    lowest = min_budget(cost, allowed, offset)
    return (lowest / fp32 if kind == "bitops_rel" else lowest), None


def _banded_milp(utility: np.ndarray, cost: np.ndarray, allowed: np.ndarray, lower: float, upper: float
                 ) -> np.ndarray | None:
    """Option index per layer maximising the utility with ``lower <= sum cost <= upper`` (None: infeasible)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers, opts = cost.shape
    scale = float(np.abs(utility[allowed]).max()) or 1.0
    result = milp(
        c=-np.where(allowed, utility / scale, 0.0).ravel(),
        integrality=np.ones(layers * opts),
        bounds=Bounds(0, allowed.ravel().astype(float)),
        constraints=[LinearConstraint(np.kron(np.eye(layers), np.ones((1, opts))), 1, 1),
                     LinearConstraint(cost.reshape(1, -1), lower, upper)],
        options={"mip_rel_gap": 0.0},
    )
    if result.x is None:
        return None
    return np.round(result.x).reshape(layers, opts).argmax(axis=1)


def _knapsack(utility: np.ndarray, cost: np.ndarray, allowed: np.ndarray, budget: float, offset: float,
              unit: str, fill: float = 0.0) -> Allocation:
    """Exact multiple-choice knapsack: maximise the utility with ``offset + cost <= budget``.

    With ``fill > 0`` the cost must also reach ``fill * budget`` (a budget *band*, so that methods
    are compared at nearly equal cost); if no choice within the budget reaches it, the band starts at
    the largest cost any choice within the budget has.
    """
    omega = np.where(allowed, -utility, 0.0)
    candidates = tuple(range(cost.shape[1]))
    plain = solve_allocation(omega, cost, budget, candidates, allowed, offset, unit)  # also checks feasibility
    if fill <= 0 or plain.achieved >= fill * budget:
        return plain
    t0 = time.perf_counter()
    upper = budget - offset
    lower = fill * budget - offset
    richest = _banded_milp(np.where(allowed, cost, 0.0), cost, allowed, -np.inf, upper)
    if richest is not None:
        lower = min(lower, math.fsum(float(cost[i, c]) for i, c in enumerate(richest)) * (1 - 1e-9))
    for _ in range(5):
        choice = _banded_milp(utility, cost, allowed, lower, upper)
        if choice is None:
            return plain
        spent = math.fsum(float(cost[i, c]) for i, c in enumerate(choice))
        excess = spent - (budget - offset)
        if excess <= 1e-12 * max(1.0, abs(budget)):
            break
        upper -= 2 * excess
    else:
        return plain
    rows = range(len(choice))
    return Allocation(
        bits=tuple(int(c) for c in choice),
        objective=math.fsum(float(omega[i, c]) for i, c in zip(rows, choice, strict=True)),
        achieved=offset + spent, budget=float(budget), min_budget=plain.min_budget,
        solve_seconds=plain.solve_seconds + time.perf_counter() - t0, solver="milp-band",
    )


def select_bits(model: nn.Module, layers: dict[str, nn.Module], space: SearchSpace,
                w_utility: Sequence[np.ndarray], a_utility: Sequence[np.ndarray], kind: str, budget: float,
                a_budget: float | None = None, rule: str = "knapsack", fill: float = 0.0) -> Selection:
    """Per-layer bits from per-candidate utilities (e.g. architecture parameters).

    ``rule="argmax"``: each quantizer takes its highest-utility candidate (the budget is only
    reported). ``rule="knapsack"``: maximise the summed utility subject to the budget, exactly:
    ``bitops``/``bitops_rel`` as one multiple-choice knapsack over ``(w, a)`` pairs per layer
    (utility ``u_w + u_a``, cost ``MACs * w * a``); ``avg_bits`` as two knapsacks, the average
    weight bits (parameter-weighted, all layers) under ``budget`` and the average activation bits
    of the hidden activations (inputs of layers 2..L, element-weighted) under ``a_budget``.
    ``fill``: with the knapsack, the cost must also be at least ``fill`` times the budget when some
    choice allows it (the "equal budget" band); 0 = upper bound only.
    """
    if kind not in BUDGET_KINDS:
        raise ConfigError(f"budget_kind={kind!r} is not supported: choose one of {', '.join(BUDGET_KINDS)}")
    if rule not in ("knapsack", "argmax"):
        raise ConfigError(f"selection={rule!r} is not supported: choose knapsack or argmax")
    n = len(space.names)
    a_budget = budget if a_budget is None else a_budget
    w_choice = [space.w_candidates[i][int(np.argmax(w_utility[i]))] for i in range(n)]
    a_choice = [space.a_candidates[i][int(np.argmax(a_utility[i]))] for i in range(n)]
    seconds = 0.0
    if kind == "avg_bits":
        w_union, a_union = space.w_union(), space.a_union()
        costs = budget_costs(model, layers, w_union, "avg_bits")
        w_allowed = np.array([[b in c for b in w_union] for c in space.w_candidates], dtype=bool)
        w_util = np.zeros(w_allowed.shape)
        for i in range(n):
            for j, b in enumerate(space.w_candidates[i]):
                w_util[i, w_union.index(b)] = w_utility[i][j]
        a_cost, a_allowed = act_avg_table(model, layers, space)
        a_util = np.zeros(a_allowed.shape)
        for i in range(1, n):
            for j, b in enumerate(space.a_candidates[i]):
                a_util[i - 1, a_union.index(b)] = a_utility[i][j]
        lowest, lowest_a = min_budget(costs.matrix, w_allowed, costs.offset), None
        if len(a_cost):
            lowest_a = min_budget(a_cost, a_allowed)
        if rule == "knapsack":
            alloc = _knapsack(w_util, costs.matrix, w_allowed, budget, costs.offset, "average weight bits", fill)
            w_choice = [w_union[c] for c in alloc.bits]
            seconds += alloc.solve_seconds
            if len(a_cost):
                alloc_a = _knapsack(a_util, a_cost, a_allowed, a_budget, 0.0, "average activation bits", fill)
                a_choice = [a_choice[0], *(a_union[c] for c in alloc_a.bits)]
                seconds += alloc_a.solve_seconds
        achieved = costs.offset + math.fsum(costs.matrix[i, w_union.index(b)] for i, b in enumerate(w_choice))
        achieved_a = (math.fsum(a_cost[i - 1, a_union.index(a_choice[i])] for i in range(1, n))
                      if len(a_cost) else None)
        tol = 1e-9 * max(1.0, abs(budget))
        met = achieved <= budget + tol and (achieved_a is None or achieved_a <= a_budget + 1e-9 * max(1.0, a_budget))
        return Selection(tuple(w_choice), tuple(a_choice), achieved, achieved_a, budget, a_budget, lowest, lowest_a,
                         met, seconds, rule)
    cost, allowed, options, offset, fp32 = bitops_table(model, layers, space)
    limit = budget_in_bitops(kind, budget, fp32)
    if rule == "knapsack":
        util = np.zeros(cost.shape)
        for i in range(n):
            for o, (wb, ab) in enumerate(options):
                if allowed[i, o]:
                    util[i, o] = (w_utility[i][space.w_candidates[i].index(wb)]
                                  + a_utility[i][space.a_candidates[i].index(ab)])
        alloc = _knapsack(util, cost, allowed, limit, offset, "BitOps", fill)
        w_choice = [options[c][0] for c in alloc.bits]
        a_choice = [options[c][1] for c in alloc.bits]
        seconds = alloc.solve_seconds
    spent = offset + math.fsum(cost[i, options.index((w_choice[i], a_choice[i]))] for i in range(n))
    scale = fp32 if kind == "bitops_rel" else 1.0
    met = spent <= limit + 1e-9 * max(1.0, limit)
    return Selection(tuple(w_choice), tuple(a_choice), spent / scale, None, budget, None,
                     min_budget(cost, allowed, offset) / scale, None, met, seconds, rule)
