"""SMPQ (Shapley-value bit-width selection) and its baseline DNAS / EdMIPS, per-layer mixed precision.

Both search a differentiable mixed-precision supernet (METHODS.md §3.2, §5.4), then freeze the
chosen per-layer ``(w_bits, a_bits)`` and fine-tune with LSQ in the one trainer:

1. **supernet**: a copy of the model whose quantizers mix every candidate bit-width of the layer
   from one shared weight (:mod:`mpqat.quant.mixture`), ``pi = softmax(alpha)``;
2. **data**: the *training* split is cut ``train_portion`` / rest into train-W (weights) and
   val-alpha (architecture); the trainer's validation split is not touched by the search;
3. **warm-up**: ``warmup_epochs`` epochs of weight training with ``alpha`` fixed (uniform ``pi``);
4. **search** (the remaining ``search_epochs - warmup_epochs`` epochs, each ending with an epoch of
   weight training):

   * ``dnas``: after every weight step, one Adam step on ``alpha`` with the val-alpha loss
     ``CE + complexity * E[cost] / budget`` (EdMIPS's complexity loss, first-order DARTS split);
   * ``smpq``: every ``shapley_every`` epochs, Monte Carlo Shapley values of every candidate
     (players ``(layer, weight|activation, bits)``, value = accuracy or minus the loss on a
     val-alpha batch with the other candidates masked out; ``shapley_samples`` permutations,
     truncation, :mod:`mpqat.shapley`), the robust ``mean - std`` estimate z-normalised per kind,
     momentum ``u <- momentum*u + (1-momentum)*phi``, ``alpha <- alpha + step_size*u``
     (Shapley-NAS's update; ``alpha`` gets no gradient unless ``arch_grad``);
5. **selection** (:func:`mpqat.methods.supernet.select_bits`): ``knapsack`` (default) maximises the
   summed ``alpha`` of the chosen candidates under the budget, exactly (ILP), so the budget is never
   exceeded and SMPQ and DNAS are compared at equal budgets; ``argmax`` takes the largest ``alpha``
   per quantizer (the plain DNAS rule; the budget is then only reported);
6. **fine-tuning**: the chosen bits are written into the model's LSQ / power-of-two quantizers (built
   at placeholder widths by the layer factory), the shared weights and the chosen candidates' steps
   are inherited from the supernet (``inherit_weights``), and every trainer epoch is LSQ QAT.

How it fits the trainer (as :mod:`mpqat.methods.hawq`): the search runs inside
``on_epoch_start`` of epoch 0 of a fresh run, so the first checkpoint already holds the chosen bits
(buffers ``smpq_bits``) and the search record (``smpq_alpha``, ``smpq_phi``, ``smpq_info``): resume and
``load_run`` never search again. Paper vs reconstruction vs ours: ``docs/smpq.md``.

Example:
    >>> r = SMPQ(budget_kind="bitops_rel", budget=0.02)
    >>> r.method, r.w_candidates, r.selection, r.truncation
    ('smpq', (2, 3, 4, 6, 8), 'knapsack', 0.5)
    >>> DNAS().method
    'dnas'
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mpqat.cost import layer_costs, model_cost
from mpqat.errors import ConfigError
from mpqat.methods.base import AnalyseThenTrainHooks, register_hooks
from mpqat.methods.supernet import (
    BUDGET_KINDS,
    CoalitionValue,
    SearchSpace,
    Selection,
    arch_parameters,
    build_supernet,
    budget_in_bitops,
    minimum_budgets,
    mixture_of,
    search_eval_mode,
    select_bits,
    weight_parameters,
)
from mpqat.quant.uniform import LSQWeightQuantizer, Pow2ActQuantizer
from mpqat.quantize import LayerContext, layer_dims, make_quant_layer, register_quantizer
from mpqat.recipes import Recipe, check_bits, register_recipe
from mpqat.shapley import permutation_shapley, robust_normalise

ArrayPair = tuple[np.ndarray, np.ndarray]
SELECTIONS = ("knapsack", "argmax")
VALUES = ("accuracy", "neg_loss")
TRUNCATION_REFS = ("empty", "zero")


def _number(name: str, value: Any, lo: float | None = None, hi: float | None = None, open_lo: bool = False,
            integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} is not supported: it must be {'an integer' if integer else 'a number'}")
    if lo is not None and (value <= lo if open_lo else value < lo):
        raise ConfigError(f"{name}={value!r} is not supported: it must be {'>' if open_lo else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}={value!r} is not supported: it must be <= {hi}")


def _candidates(name: str, values: Any, kind: str) -> tuple[int, ...]:
    values = values if isinstance(values, tuple | list) else (values,)
    if not values:
        raise ConfigError(f"{name} must list at least one bit-width, e.g. [2, 4, 8]")
    for bits in values:
        check_bits(name, bits, kind)
    return tuple(sorted(set(values)))


# --------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SupernetRecipe(Recipe):
    """Settings shared by ``dnas`` and ``smpq`` (not a method by itself).

    * ``w_candidates`` / ``a_candidates``: candidate weight / activation bit-widths of every layer;
      the model input stays at ``input_bits``; ``pin_first_last`` fixes the first and last layer's
      weights (and the last layer's input) at ``pinned_bits`` (counted in the budget).
    * ``budget_kind``: ``avg_bits`` (parameter-weighted average weight bits <= ``budget`` and average
      bits of the hidden activations <= ``a_budget``, default ``budget``), ``bitops`` (BitOps per
      sample, as ``metrics.json``) or ``bitops_rel`` (a fraction of the FP32 BitOps, e.g.
      ``16/1024`` for the cost of W4A4).
    * ``selection``: ``knapsack`` (exact, never above the budget) or ``argmax`` (largest alpha);
      ``budget_fill``: the knapsack's choice must also cost at least this fraction of the budget
      whenever some choice can (so methods are compared at nearly equal cost; 0 = upper bound only).
    * ``search_epochs`` (warm-up included), ``warmup_epochs``, ``search_lr``, ``search_batch_size``:
      the supernet's weight training (Adam); ``train_portion``: the share of the training split
      used for the weights (the rest is val-alpha).
    * ``arch_lr``: Adam learning rate of alpha (DNAS; SMPQ with ``arch_grad``); ``complexity``: the
      coefficient of EdMIPS's complexity loss ``E[cost] / budget``.
    * ``inherit_weights``: start the fine-tuning from the supernet's weights and the chosen
      candidates' steps (else: from the initial weights, LSQ init on the first batch).
    """

    method: ClassVar[str] = ""
    w_candidates: tuple[int, ...] = (2, 3, 4, 6, 8)
    a_candidates: tuple[int, ...] = (2, 3, 4, 6, 8)
    budget_kind: str = "avg_bits"
    budget: float = 4.0
    a_budget: float | None = None
    selection: str = "knapsack"
    budget_fill: float = 0.9
    input_bits: int = 8
    pin_first_last: bool = False
    pinned_bits: int = 8
    search_epochs: int = 20
    warmup_epochs: int = 10
    search_lr: float = 2e-3
    search_batch_size: int = 256
    train_portion: float = 0.5
    arch_lr: float = 3e-3
    complexity: float = 0.1
    inherit_weights: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "w_candidates", _candidates("w_candidates", self.w_candidates, "weight"))
        object.__setattr__(self, "a_candidates", _candidates("a_candidates", self.a_candidates, "activation"))
        if self.budget_kind not in BUDGET_KINDS:
            raise ConfigError(f"budget_kind={self.budget_kind!r} is not supported: choose one of {', '.join(BUDGET_KINDS)}")
        _number("budget", self.budget, lo=0, open_lo=True)
        if self.budget_kind == "bitops_rel":
            _number("budget", self.budget, lo=0, hi=1, open_lo=True)
        object.__setattr__(self, "budget", float(self.budget))
        if self.a_budget is not None:
            if self.budget_kind != "avg_bits":
                raise ConfigError("a_budget applies to budget_kind=avg_bits only; with a BitOps budget leave it unset")
            _number("a_budget", self.a_budget, lo=0, open_lo=True)
            object.__setattr__(self, "a_budget", float(self.a_budget))
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection={self.selection!r} is not supported: choose knapsack or argmax")
        _number("budget_fill", self.budget_fill, lo=0, hi=1)
        check_bits("input_bits", self.input_bits, "activation")
        check_bits("pinned_bits", self.pinned_bits, "activation")
        for flag in ("pin_first_last", "inherit_weights"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r} must be true or false")
        _number("search_epochs", self.search_epochs, lo=1, integer=True)
        _number("warmup_epochs", self.warmup_epochs, lo=0, integer=True)
        if self.warmup_epochs >= self.search_epochs:
            raise ConfigError(
                f"warmup_epochs={self.warmup_epochs} leaves no search epoch: it must be below "
                f"search_epochs={self.search_epochs}"
            )
        _number("search_lr", self.search_lr, lo=0, open_lo=True)
        _number("search_batch_size", self.search_batch_size, lo=1, integer=True)
        _number("train_portion", self.train_portion, lo=0, hi=1, open_lo=True)
        if self.train_portion >= 1:
            raise ConfigError("train_portion must be below 1: the rest of the training split is val-alpha")
        _number("arch_lr", self.arch_lr, lo=0, open_lo=True)
        _number("complexity", self.complexity, lo=0)

    @property
    def a_limit(self) -> float:
        """Budget of the hidden activations' average bits (``avg_bits`` only)."""
        return self.budget if self.a_budget is None else self.a_budget

    def w_columns(self) -> tuple[int, ...]:
        extra = {self.pinned_bits} if self.pin_first_last else set()
        return tuple(sorted(set(self.w_candidates) | extra))

    def a_columns(self) -> tuple[int, ...]:
        extra = {self.input_bits} | ({self.pinned_bits} if self.pin_first_last else set())
        return tuple(sorted(set(self.a_candidates) | extra))

    def layer_candidates(self, index: int, count: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(weight candidates, activation candidates)`` of quantized layer ``index`` of ``count``."""
        first, last = index == 0, index == count - 1
        pinned = self.pin_first_last and (first or last)
        w = (self.pinned_bits,) if pinned else self.w_candidates
        a = (self.input_bits,) if first else ((self.pinned_bits,) if pinned else self.a_candidates)
        return w, a


@register_recipe
@dataclass(frozen=True)
class DNAS(SupernetRecipe):
    """Differentiable search (EdMIPS-style DNAS): alpha trained by gradient on val-alpha with the
    complexity loss; selection by alpha (``knapsack`` under the budget, or plain ``argmax``).

    Example:
        >>> DNAS(warmup_epochs=20)
        Traceback (most recent call last):
        ...
        mpqat.errors.ConfigError: warmup_epochs=20 leaves no search epoch: it must be below search_epochs=20
    """

    method: ClassVar[str] = "dnas"


@register_recipe
@dataclass(frozen=True)
class SMPQ(SupernetRecipe):
    """SMPQ: alpha moved by Monte Carlo Shapley values of the bit-width candidates (Shapley-NAS update).

    * ``shapley_samples``: permutations per estimate (M); ``shapley_every``: epochs between estimates;
    * ``truncation``: stop a permutation once the value falls below ``ref + truncation * (v(all) - ref)``
      (None: no truncation); ``truncation_ref``: ``empty`` (ref = value of the empty coalition) or
      ``zero`` (ref = 0, Shapley-NAS's ``acc < 0.5 acc0``);
    * ``momentum``, ``step_size``: the update ``u <- m u + (1-m) phi``, ``alpha <- alpha + step * u``;
    * ``value``: ``accuracy`` (Shapley-NAS) or ``neg_loss``; ``val_batch_size``: rows of the val-alpha
      batch drawn for each permutation; ``eval_chunk``: coalitions per vectorised forward pass;
    * ``antithetic``: every second permutation is the reverse of the one before (ours, a variance
      reduction; see ``benchmarks/smpq/estimator_study.md``);
    * ``arch_grad``: also train alpha by gradient with the complexity loss (the hybrid, off by default).

    Example:
        >>> SMPQ(value="top5")
        Traceback (most recent call last):
        ...
        mpqat.errors.ConfigError: value='top5' is not supported: choose accuracy or neg_loss
    """

    method: ClassVar[str] = "smpq"
    shapley_samples: int = 10
    shapley_every: int = 1
    truncation: float | None = 0.5
    truncation_ref: str = "empty"
    momentum: float = 0.8
    step_size: float = 0.1
    value: str = "accuracy"
    val_batch_size: int = 1024
    eval_chunk: int = 8
    antithetic: bool = False
    arch_grad: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _number("shapley_samples", self.shapley_samples, lo=1, integer=True)
        _number("shapley_every", self.shapley_every, lo=1, integer=True)
        if self.truncation is not None:
            _number("truncation", self.truncation, lo=0, hi=1)
        if self.truncation_ref not in TRUNCATION_REFS:
            raise ConfigError(f"truncation_ref={self.truncation_ref!r} is not supported: choose empty or zero")
        _number("momentum", self.momentum, lo=0, hi=1)
        if self.momentum >= 1:
            raise ConfigError("momentum must be below 1, or the Shapley values are never used")
        _number("step_size", self.step_size, lo=0, open_lo=True)
        if self.value not in VALUES:
            raise ConfigError(f"value={self.value!r} is not supported: choose accuracy or neg_loss")
        _number("val_batch_size", self.val_batch_size, lo=1, integer=True)
        _number("eval_chunk", self.eval_chunk, lo=1, integer=True)
        for flag in ("arch_grad", "antithetic"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r} must be true or false")


# --------------------------------------------------------------------------------------------------
# Layers of the real model
# --------------------------------------------------------------------------------------------------

INFO_FIELDS = (
    "searched", "search_seconds", "shapley_seconds", "shapley_updates", "shapley_evaluations",
    "shapley_computed", "shapley_truncated", "n_players", "solve_seconds", "supernet_valid_accuracy",
    "achieved", "achieved_a", "min_budget", "min_a_budget", "budget_met",
)


def _register_buffers(qlayer: nn.Module, recipe: SupernetRecipe) -> None:
    width = len(recipe.w_columns()) + len(recipe.a_columns())
    qlayer.register_buffer("smpq_bits", torch.zeros(2))
    qlayer.register_buffer("smpq_alpha", torch.full((width,), math.nan, dtype=torch.float64))
    qlayer.register_buffer("smpq_phi", torch.full((width,), math.nan, dtype=torch.float64))
    qlayer.register_buffer("smpq_info", torch.zeros(len(INFO_FIELDS), dtype=torch.float64))


def _search_layer(layer: nn.Module, ctx: LayerContext, recipe: SupernetRecipe) -> nn.Module:
    """A uniform QuantLinear / QuantConv at placeholder widths (the largest candidates), with the search buffers."""
    w_cands, a_cands = recipe.layer_candidates(ctx.index, ctx.count)
    rows, fan_in, features = layer_dims(layer)
    weight_quant = LSQWeightQuantizer(rows, fan_in, max(w_cands), per_neuron=True)
    act_quant = Pow2ActQuantizer(features, max(a_cands), signed=not ctx.input_after_relu)
    qlayer = make_quant_layer(layer, weight_quant, act_quant)
    _register_buffers(qlayer, recipe)
    return qlayer


register_quantizer(DNAS)(_search_layer)
register_quantizer(SMPQ)(_search_layer)


def search_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's searchable layers (those with ``smpq_bits`` buffers), by module name, in order."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "smpq_bits") and hasattr(m, "weight_quant")}


def is_searched(model: nn.Module) -> bool:
    """True once the bits have been chosen (also after a checkpoint is loaded)."""
    layers = search_layers(model)
    return bool(layers) and all(bool(m.smpq_info[0]) for m in layers.values())


def search_space(model: nn.Module, recipe: SupernetRecipe) -> SearchSpace:
    """The candidates of every searchable layer of ``model`` under ``recipe``."""
    names = tuple(search_layers(model))
    if not names:
        raise ConfigError(f"the model has no layer quantized by a '{recipe.method}' recipe: use mpqat.quantize(model, recipe)")
    cands = [recipe.layer_candidates(i, len(names)) for i in range(len(names))]
    return SearchSpace(names, tuple(c[0] for c in cands), tuple(c[1] for c in cands))


def check_budget(model: nn.Module, recipe: SupernetRecipe) -> tuple[float, float | None]:
    """Raise :class:`ConfigError` now (before any search) if the budget is below the cheapest choice."""
    layers = search_layers(model)
    lowest, lowest_a = minimum_budgets(model, layers, search_space(model, recipe), recipe.budget_kind)
    unit = BUDGET_KINDS[recipe.budget_kind]
    if recipe.selection == "knapsack":
        if not recipe.budget >= lowest * (1 - 1e-12):
            raise ConfigError(
                f"budget {recipe.budget:g} ({unit}) is infeasible for this model: the smallest feasible budget is "
                f"{lowest:.6g} (every layer at its fewest candidate bits); raise it or add lower candidates"
            )
        if lowest_a is not None and not recipe.a_limit >= lowest_a * (1 - 1e-12):
            raise ConfigError(
                f"activation budget {recipe.a_limit:g} (average bits) is infeasible: the smallest feasible one is "
                f"{lowest_a:.6g}; raise a_budget or add lower a_candidates"
            )
    return lowest, lowest_a


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------


@dataclass
class SearchRecord:
    """What the search did: the selection, timings, Shapley bookkeeping, final alpha and phi per player."""

    selection: Selection
    search_seconds: float
    shapley_seconds: float = 0.0
    shapley_updates: int = 0
    shapley_evaluations: int = 0
    shapley_computed: int = 0
    shapley_truncated: int = 0
    n_players: int = 0
    supernet_valid_accuracy: float = math.nan
    alpha: dict[tuple[str, str], np.ndarray] | None = None
    phi: dict[tuple[str, str], np.ndarray] | None = None


def _tensors(pair: ArrayPair) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = pair
    X = torch.as_tensor(np.asarray(X))
    return (X.float() if not X.is_floating_point() else X), torch.as_tensor(np.asarray(y)).long()


def _cycle(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch):
            yield order[start : start + batch]


class _CostTerm:
    """EdMIPS's complexity loss ``E[cost] / budget`` from the mixtures' expected bits."""

    def __init__(self, model: nn.Module, space: SearchSpace, recipe: SupernetRecipe) -> None:
        by_name = {c.name: c for c in layer_costs(model)}
        self.space, self.kind = space, recipe.budget_kind
        self.macs = [float(by_name[n].macs) for n in space.names]
        self.params = [float(by_name[n].params) for n in space.names]
        self.inputs = [float(by_name[n].in_features) for n in space.names]
        fp32 = sum(c.macs for c in by_name.values()) * 32.0 * 32.0
        self.limit = budget_in_bitops(recipe.budget_kind, recipe.budget, fp32)
        self.w_limit, self.a_limit = recipe.budget, recipe.a_limit

    def __call__(self, net: nn.Module) -> torch.Tensor:
        e_w = [mixture_of(net, n, "w").expected_bits()[0] for n in self.space.names]
        e_a = [mixture_of(net, n, "a").expected_bits()[0] for n in self.space.names]
        if self.kind != "avg_bits":
            return sum(m * w * a for m, w, a in zip(self.macs, e_w, e_a, strict=True)) / self.limit
        w_avg = sum(p * w for p, w in zip(self.params, e_w, strict=True)) / sum(self.params)
        if len(e_a) < 2:
            return w_avg / self.w_limit
        a_avg = sum(i * a for i, a in zip(self.inputs[1:], e_a[1:], strict=True)) / sum(self.inputs[1:])
        return 0.5 * (w_avg / self.w_limit + a_avg / self.a_limit)


class _ShapleyUpdater:
    """Shapley-NAS's alpha update from Monte Carlo Shapley values of the bit-width candidates."""

    def __init__(self, net: nn.Module, space: SearchSpace, recipe: SMPQ, X: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> None:
        self.net, self.recipe, self.X, self.y, self.generator = net, recipe, X, y, generator
        self.game = CoalitionValue(net, space, recipe.value, max_batch=recipe.eval_chunk)
        n = self.game.n_players
        self.momentum = 1e-3 * torch.randn(n, generator=generator, dtype=torch.float64).numpy()
        self.last_mean = np.full(n, math.nan)
        self.seconds, self.updates, self.evaluations, self.computed, self.truncated = 0.0, 0, 0, 0, 0

    def _resample(self, _: int) -> None:
        rows = torch.randperm(len(self.X), generator=self.generator)[: self.recipe.val_batch_size]
        self.game.set_batch(self.X[rows], self.y[rows])

    def step(self) -> None:
        if self.game.n_players == 0:
            return
        r = self.recipe
        fixed = len(self.X) <= r.val_batch_size  # the whole val-alpha split: one fixed game
        if fixed:
            self.game.set_batch(self.X, self.y)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        estimate = permutation_shapley(
            None, self.game.n_players, r.shapley_samples, truncation=r.truncation,
            truncation_ref="empty" if r.truncation_ref == "empty" else 0.0, rng=np.random.default_rng(seed),
            batch_eval=self.game, chunk=r.eval_chunk, resample=None if fixed else self._resample,
            antithetic=r.antithetic,
        )
        phi = robust_normalise(estimate, self.game.groups())
        self.momentum = r.momentum * self.momentum + (1.0 - r.momentum) * phi
        with torch.no_grad():
            for player, u in zip(self.game.players, self.momentum, strict=True):
                mixture_of(self.net, player.name, player.kind).alpha[player.index] += r.step_size * float(u)
        self.last_mean = estimate.mean
        self.seconds += estimate.seconds
        self.updates += 1
        self.evaluations += estimate.evaluations
        self.computed += estimate.computed
        self.truncated += estimate.truncated


def _accuracy(net: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    if not len(y):
        return math.nan
    with search_eval_mode(net):
        logits = torch.cat([net(X[i : i + 4096]) for i in range(0, len(X), 4096)])
    return float((logits.argmax(1) == y).double().mean())


def run_search(model: nn.Module, recipe: SupernetRecipe, train: ArrayPair, valid: ArrayPair,
               generator: torch.Generator) -> tuple[nn.Module, SearchRecord]:
    """Build and train the supernet, search alpha, select the bits; the model itself is not changed."""
    t0 = time.perf_counter()
    layers = search_layers(model)
    space = search_space(model, recipe)
    net = build_supernet(model, space)
    X, y = _tensors(train)
    order = torch.randperm(len(X), generator=generator)
    cut = int(round(len(X) * recipe.train_portion))
    if cut < 1 or cut >= len(X):
        raise ConfigError(f"{len(X)} training rows cannot be split into train-W and val-alpha "
                          f"(train_portion={recipe.train_portion}); use more data")
    Xw, yw, Xa, ya = X[order[:cut]], y[order[:cut]], X[order[cut:]], y[order[cut:]]
    smpq = isinstance(recipe, SMPQ)
    use_grad = not smpq or recipe.arch_grad
    arch = arch_parameters(net)
    for p in arch:
        p.requires_grad_(use_grad)
    w_opt = torch.optim.Adam(weight_parameters(net), lr=recipe.search_lr)
    a_opt = torch.optim.Adam(arch, lr=recipe.arch_lr) if use_grad else None
    cost = _CostTerm(model, space, recipe)
    updater = _ShapleyUpdater(net, space, recipe, Xa, ya, generator) if smpq else None
    arch_batches = _cycle(len(Xa), recipe.search_batch_size, generator)
    for epoch in range(recipe.search_epochs):
        searching = epoch >= recipe.warmup_epochs
        if updater is not None and searching and (epoch - recipe.warmup_epochs) % recipe.shapley_every == 0:
            updater.step()
        net.train()
        perm = torch.randperm(len(Xw), generator=generator)
        for start in range(0, len(Xw), recipe.search_batch_size):
            idx = perm[start : start + recipe.search_batch_size]
            loss = F.cross_entropy(net(Xw[idx]), yw[idx])
            w_opt.zero_grad(set_to_none=True)
            loss.backward()
            w_opt.step()
            if a_opt is not None and searching:
                rows = next(arch_batches)
                arch_loss = F.cross_entropy(net(Xa[rows]), ya[rows]) + recipe.complexity * cost(net)
                a_opt.zero_grad(set_to_none=True)
                arch_loss.backward()
                a_opt.step()
        if not math.isfinite(float(loss.detach())):
            raise ConfigError(f"the supernet diverged in search epoch {epoch + 1}; lower search_lr")
    alpha = {(n, k): mixture_of(net, n, k).alpha.detach().double().numpy().copy()
             for n in space.names for k in ("w", "a")}
    selection = select_bits(model, layers, space, [alpha[(n, "w")] for n in space.names],
                            [alpha[(n, "a")] for n in space.names], recipe.budget_kind, recipe.budget,
                            recipe.a_budget, recipe.selection, recipe.budget_fill)
    phi: dict[tuple[str, str], np.ndarray] = {}
    if updater is not None:
        for player, value in zip(updater.game.players, updater.last_mean, strict=True):
            phi.setdefault((player.name, player.kind), np.full(len(space.candidates(player.layer, player.kind)), math.nan))
            phi[(player.name, player.kind)][player.index] = value
    Xv, yv = _tensors(valid)
    record = SearchRecord(selection, time.perf_counter() - t0, alpha=alpha, phi=phi,
                          supernet_valid_accuracy=_accuracy(net, Xv, yv))
    if updater is not None:
        record.shapley_seconds, record.shapley_updates = updater.seconds, updater.updates
        record.shapley_evaluations, record.shapley_computed = updater.evaluations, updater.computed
        record.shapley_truncated, record.n_players = updater.truncated, updater.game.n_players
    return net, record


@torch.no_grad()
def _inherit(model: nn.Module, net: nn.Module, space: SearchSpace, selection: Selection) -> None:
    """Copy the supernet's shared weights (and every non-quantizer tensor) and the chosen candidates' steps."""
    source = net.state_dict()
    for key, tensor in model.state_dict().items():
        leaf = key.rsplit(".", 1)[-1]
        if ".weight_quant." in f".{key}" or ".act_quant." in f".{key}" or leaf.startswith("smpq_"):
            continue
        if key in source and source[key].shape == tensor.shape:
            tensor.copy_(source[key])
    for i, name in enumerate(space.names):
        layer = model.get_submodule(name)
        wmix, amix = mixture_of(net, name, "w"), mixture_of(net, name, "a")
        layer.weight_quant.step.copy_(wmix.candidate_step(wmix.candidate_index(selection.w_bits[i])))
        layer.act_quant.log2_step.copy_(amix.candidate_log2_step(amix.candidate_index(selection.a_bits[i])))
        layer.weight_quant.initialized.fill_(bool(wmix.initialized))
        layer.act_quant.initialized.fill_(bool(amix.initialized))


def _columns_vector(columns: tuple[int, ...], cands: tuple[int, ...], values: np.ndarray | None) -> list[float]:
    out = [math.nan] * len(columns)
    if values is not None:
        for b, v in zip(cands, values, strict=True):
            out[columns.index(b)] = float(v)
    return out


@torch.no_grad()
def _record(model: nn.Module, recipe: SupernetRecipe, space: SearchSpace, record: SearchRecord) -> None:
    sel = record.selection
    info = [1.0, record.search_seconds, record.shapley_seconds, record.shapley_updates, record.shapley_evaluations,
            record.shapley_computed, record.shapley_truncated, record.n_players, sel.solve_seconds,
            record.supernet_valid_accuracy, sel.achieved, math.nan if sel.achieved_a is None else sel.achieved_a,
            sel.min_budget, math.nan if sel.min_a_budget is None else sel.min_a_budget, float(sel.met)]
    wc, ac = recipe.w_columns(), recipe.a_columns()
    for i, name in enumerate(space.names):
        layer = model.get_submodule(name)
        layer.weight_quant.bit_widths.fill_(float(sel.w_bits[i]))
        layer.act_quant.bit_widths.fill_(float(sel.a_bits[i]))
        layer.smpq_bits.copy_(torch.tensor([float(sel.w_bits[i]), float(sel.a_bits[i])]))
        alpha = (_columns_vector(wc, space.w_candidates[i], record.alpha.get((name, "w")))
                 + _columns_vector(ac, space.a_candidates[i], record.alpha.get((name, "a"))))
        phi = (_columns_vector(wc, space.w_candidates[i], (record.phi or {}).get((name, "w")))
               + _columns_vector(ac, space.a_candidates[i], (record.phi or {}).get((name, "a"))))
        layer.smpq_alpha.copy_(torch.tensor(alpha, dtype=torch.float64))
        layer.smpq_phi.copy_(torch.tensor(phi, dtype=torch.float64))
        layer.smpq_info.copy_(torch.tensor(info, dtype=torch.float64))


def prepare(model: nn.Module, recipe: SupernetRecipe, train: ArrayPair, valid: ArrayPair,
            generator: torch.Generator | None = None) -> SearchRecord:
    """Search on a model quantized with ``recipe`` and set its bits (and inherited weights) in place.

    Example:
        >>> from mpqat.quantize import quantize
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(256, 4)).astype("float32"); y = (X[:, 0] > 0).astype("int64")
        >>> r = SMPQ(budget=3, search_epochs=2, warmup_epochs=1, shapley_samples=2)
        >>> q = quantize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), r)
        >>> prepare(q, r, (X, y), (X, y)).selection.achieved <= 3
        True
    """
    if not search_layers(model):
        raise ConfigError(f"prepare() needs a model quantized with a {recipe.method} recipe (mpqat.quantize(model, recipe))")
    check_budget(model, recipe)
    generator = generator or torch.Generator().manual_seed(torch.initial_seed() % 2**63)
    space = search_space(model, recipe)
    net, record = run_search(model, recipe, train, valid, generator)
    if recipe.inherit_weights:
        _inherit(model, net, space, record.selection)
    else:
        for name in space.names:
            layer = model.get_submodule(name)
            layer.weight_quant.initialized.fill_(False)
            layer.act_quant.initialized.fill_(False)
    _record(model, recipe, space, record)
    return record


# --------------------------------------------------------------------------------------------------
# Hooks and summary
# --------------------------------------------------------------------------------------------------


def search_summary(model: nn.Module, recipe: SupernetRecipe) -> dict[str, Any]:
    """Chosen bits, budget, alpha / Shapley values and timings, read from the model's buffers (JSON-ready)."""
    layers = search_layers(model)
    if not is_searched(model):
        return {"search_done": False}
    info = dict(zip(INFO_FIELDS, next(iter(layers.values())).smpq_info.tolist(), strict=True))
    wc, ac = recipe.w_columns(), recipe.a_columns()

    def table(values: list[float]) -> dict[str, dict[str, float]]:
        w = {str(b): v for b, v in zip(wc, values[: len(wc)], strict=True) if not math.isnan(v)}
        a = {str(b): v for b, v in zip(ac, values[len(wc) :], strict=True) if not math.isnan(v)}
        return {"w": w, "a": a}

    smpq = isinstance(recipe, SMPQ)
    out: dict[str, Any] = {
        "search_done": True,
        "layer_bits": {n: {"w": int(m.smpq_bits[0]), "a": int(m.smpq_bits[1])} for n, m in layers.items()},
        "selection": recipe.selection,
        "budget": {
            "kind": recipe.budget_kind, "budget": recipe.budget,
            "a_budget": recipe.a_limit if recipe.budget_kind == "avg_bits" else None,
            "achieved": info["achieved"],
            "achieved_a": None if math.isnan(info["achieved_a"]) else info["achieved_a"],
            "min_budget": info["min_budget"],
            "min_a_budget": None if math.isnan(info["min_a_budget"]) else info["min_a_budget"],
            "met": bool(info["budget_met"]), "solve_seconds": info["solve_seconds"],
        },
        "search": {
            "seconds": info["search_seconds"], "epochs": recipe.search_epochs, "warmup_epochs": recipe.warmup_epochs,
            "supernet_valid_accuracy": info["supernet_valid_accuracy"],
        },
        "alpha": {n: table(m.smpq_alpha.tolist()) for n, m in layers.items()},
    }
    if smpq:
        out["shapley"] = {
            "players": int(info["n_players"]), "updates": int(info["shapley_updates"]),
            "samples": recipe.shapley_samples, "evaluations": int(info["shapley_evaluations"]),
            "evaluations_computed": int(info["shapley_computed"]),
            "truncated_permutations": int(info["shapley_truncated"]), "seconds": info["shapley_seconds"],
            "last_estimate": {n: table(m.smpq_phi.tolist()) for n, m in layers.items()},
        }
    return out


class SearchHooks(AnalyseThenTrainHooks):
    """Runs :func:`prepare` at the start of epoch 0 of a fresh run; reports the search at the end."""

    recipe: SupernetRecipe

    def __init__(self, recipe: SupernetRecipe | None = None) -> None:
        super().__init__(recipe)
        self.record: SearchRecord | None = None

    def is_prepared(self, model: nn.Module) -> bool:
        return is_searched(model)

    def check_budget(self, model: nn.Module) -> None:
        check_budget(model, self.recipe)

    def prepare(self, model: nn.Module) -> None:
        self.record = prepare(model, self.recipe, self.train, self.valid)

    def epoch_log(self, model: nn.Module) -> dict[str, Any]:
        cost = model_cost(model)
        return {"avg_weight_bits": cost.avg_weight_bits, "avg_act_bits": cost.avg_act_bits, "bitops": cost.bitops}

    def final_metrics(self, model: nn.Module) -> dict[str, Any]:
        return search_summary(model, self.recipe)


register_hooks(DNAS)(SearchHooks)
register_hooks(SMPQ)(SearchHooks)
