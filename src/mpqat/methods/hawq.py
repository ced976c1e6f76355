"""HAWQ-style mixed precision: Hessian-trace sensitivity, ILP bit allocation, then LSQ fine-tuning.

The baseline of METHODS.md §5.6 (HAWQ-V2 sensitivity, HAWQ-V3 ILP), with per-layer weight bits:

1. **FP phase**: the float model is trained for ``fp_epochs`` epochs (its quantizers bypassed);
2. **sensitivity**: ``Omega_l(b) = Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2`` with a Hutchinson trace on
   ``calibration_rows`` training rows (``sensitivity="hessian"``), or the validation-loss increase
   when only layer ``l`` is quantized to ``b`` bits (``sensitivity="loss"``);
3. **allocation**: the per-layer bits (from ``candidates``) minimising ``sum_l Omega_l(b_l)`` under a
   budget on average weight bits, model size (bytes) or BitOps, solved exactly as an ILP;
4. **QAT**: every layer is a uniform :class:`~mpqat.nn.QuantLinear` (per-neuron
   :class:`~mpqat.quant.LSQWeightQuantizer` at its chosen bits, :class:`~mpqat.quant.Pow2ActQuantizer`
   at ``a_bits``) fine-tuned with LSQ by the one trainer.

How it fits the one trainer: :func:`mpqat.quantize` builds the QuantLinear layers up front (bits at
the largest candidate as a placeholder). :class:`HawqHooks` receives the data in ``on_fit_start``
and, at ``on_epoch_start`` of epoch 0 (only ever reached in a fresh run), runs phases 1-3 inside the
hook, in float mode, then writes the chosen bits into the ``weight_quant.bit_widths`` buffers. So
every trainer epoch is a QAT epoch (best-epoch selection and early stopping only see quantized
models), and the first checkpoint already holds the chosen bits: resume and ``load_run`` need no
re-analysis. The sensitivities, timings and FP accuracy are kept in per-layer buffers
(``hawq_omega``, ``hawq_trace``, ``hawq_info``) for ``final_metrics``.

Library use without the trainer: ``prepare(qmodel, recipe, (X, y), (X_valid, y_valid))`` then any loop.

Example:
    >>> r = HessianILP(budget=3)
    >>> r.budget, r.candidates, r.budget_kind
    (3.0, (2, 3, 4, 6, 8), 'avg_bits')
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mpqat.cost import model_cost
from mpqat.errors import ConfigError
from mpqat.methods.allocation import BUDGET_UNITS, Allocation, allocate, budget_costs, min_budget
from mpqat.methods.base import AnalyseThenTrainHooks, is_quantizer_param, register_hooks
from mpqat.methods.sensitivity import (
    QuantizeFn,
    hessian_omega,
    hutchinson_traces,
    loss_sensitivity,
    quant_error,
    uniform_fake_quant,
)
from mpqat.nn.linear import QuantLinear
from mpqat.quant.uniform import LSQWeightQuantizer, Pow2ActQuantizer
from mpqat.nn.conv import QuantConv1d, QuantConv2d
from mpqat.quantize import LayerContext, layer_dims, make_quant_layer, register_quantizer
from mpqat.recipes import Recipe, check_bits, register_recipe

ArrayPair = tuple[np.ndarray, np.ndarray]
SENSITIVITIES = ("hessian", "loss")


# --------------------------------------------------------------------------------------------------
# Recipe
# --------------------------------------------------------------------------------------------------


def _positive(name: str, value: Any, integer: bool = False, allow_zero: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    lo_ok = (value >= 0) if allow_zero else (value > 0)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not lo_ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name}={value!r} is not supported: it must be {kind} {'>= 0' if allow_zero else '> 0'}")


@register_recipe
@dataclass(frozen=True)
class HessianILP(Recipe):
    """HAWQ-style per-layer weight bits from Hessian-trace sensitivity and an exact ILP, then LSQ QAT.

    * ``candidates``: allowed weight bit-widths per layer;
    * ``budget_kind`` / ``budget``: ``avg_bits`` (parameter-weighted average weight bits, as
      :mod:`mpqat.cost`), ``size`` (model bytes, metadata included) or ``bitops`` (BitOps per sample);
    * ``a_bits``: hidden activations; ``input_bits``: the model input (both fixed, uniform);
    * ``sensitivity``: ``hessian`` (Hutchinson trace x quantization error) or ``loss`` (validation-loss
      increase with only that layer quantized);
    * ``hutchinson_samples`` (max), ``hutchinson_tol`` (stop once every layer's standard error is at
      most this fraction of its trace), ``calibration_rows`` (training rows for the Hessian);
    * ``pin_first_last``: first and last layer at ``pinned_bits`` (counted in the budget);
    * ``fp_epochs``, ``fp_lr``, ``fp_batch_size``, ``fp_patience``: the float training before the
      analysis (Adam; the epoch of lowest validation loss is kept; stops after ``fp_patience`` epochs
      without improvement).

    Example:
        >>> HessianILP(budget_kind="bits")
        Traceback (most recent call last):
        ...
        mpqat.errors.ConfigError: budget_kind='bits' is not supported: choose one of avg_bits, size, bitops
    """

    method: ClassVar[str] = "hawq"
    candidates: tuple[int, ...] = (2, 3, 4, 6, 8)
    budget_kind: str = "avg_bits"
    budget: float = 4.0
    a_bits: int = 8
    input_bits: int = 8
    sensitivity: str = "hessian"
    hutchinson_samples: int = 200
    hutchinson_tol: float = 0.05
    calibration_rows: int = 1024
    pin_first_last: bool = False
    pinned_bits: int = 8
    fp_epochs: int = 20
    fp_lr: float = 1e-3
    fp_batch_size: int = 256
    fp_patience: int = 5

    def __post_init__(self) -> None:
        candidates = self.candidates if isinstance(self.candidates, tuple | list) else (self.candidates,)
        if not candidates:
            raise ConfigError("candidates must list at least one bit-width, e.g. [2, 4, 8]")
        for bits in candidates:
            check_bits("candidates", bits)
        object.__setattr__(self, "candidates", tuple(sorted(set(candidates))))
        if self.budget_kind not in BUDGET_UNITS:
            raise ConfigError(
                f"budget_kind={self.budget_kind!r} is not supported: choose one of {', '.join(BUDGET_UNITS)}"
            )
        _positive("budget", self.budget)
        object.__setattr__(self, "budget", float(self.budget))
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(f"sensitivity={self.sensitivity!r} is not supported: choose hessian or loss")
        check_bits("a_bits", self.a_bits, "activation")
        check_bits("input_bits", self.input_bits, "activation")
        check_bits("pinned_bits", self.pinned_bits)
        if not isinstance(self.pin_first_last, bool):
            raise ConfigError(f"pin_first_last={self.pin_first_last!r} must be true or false")
        for name in ("hutchinson_samples", "calibration_rows", "fp_batch_size", "fp_patience"):
            _positive(name, getattr(self, name), integer=True)
        _positive("fp_epochs", self.fp_epochs, integer=True, allow_zero=True)
        _positive("hutchinson_tol", self.hutchinson_tol, allow_zero=True)
        _positive("fp_lr", self.fp_lr)

    def columns(self) -> tuple[int, ...]:
        """Bit-widths of the sensitivity table's columns: the candidates, plus the pinned bits if used."""
        extra = {self.pinned_bits} if self.pin_first_last else set()
        return tuple(sorted(set(self.candidates) | extra))


# --------------------------------------------------------------------------------------------------
# Layers and float mode
# --------------------------------------------------------------------------------------------------

INFO_FIELDS = ("allocated", "sensitivity_seconds", "solve_seconds", "fp_valid_accuracy", "fp_best_epoch")


@register_quantizer(HessianILP)
def _hawq_layer(layer: nn.Module, ctx: LayerContext, recipe: HessianILP) -> QuantLinear:
    """A uniform QuantLinear/QuantConv at a placeholder width (the largest candidate, or the pinned bits)."""
    pinned = recipe.pin_first_last and (ctx.is_first or ctx.is_last)
    bits = recipe.pinned_bits if pinned else max(recipe.candidates)
    rows, fan_in, features = layer_dims(layer)
    weight_quant = LSQWeightQuantizer(rows, fan_in, bits, per_neuron=True)
    a_bits = recipe.input_bits if ctx.is_first else recipe.a_bits
    act_quant = Pow2ActQuantizer(features, a_bits, signed=not ctx.input_after_relu)
    qlayer = make_quant_layer(layer, weight_quant, act_quant)
    qlayer.register_buffer("hawq_omega", torch.full((len(recipe.columns()),), math.nan, dtype=torch.float64))
    qlayer.register_buffer("hawq_trace", torch.full((3,), math.nan, dtype=torch.float64))
    qlayer.register_buffer("hawq_info", torch.zeros(len(INFO_FIELDS), dtype=torch.float64))
    return qlayer


FloatForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]
_FLOAT_FORWARD: dict[type, FloatForward] = {
    QuantLinear: lambda m, x: F.linear(x, m.weight, m.bias),
    QuantConv1d: lambda m, x: m.float_forward(x),
    QuantConv2d: lambda m, x: m.float_forward(x),
}


def register_float_forward(layer_type: type) -> Callable[[FloatForward], FloatForward]:
    """Decorator: how :func:`float_mode` runs a quantized layer type in float (e.g. a QuantConv2d)."""

    def decorate(fn: FloatForward) -> FloatForward:
        _FLOAT_FORWARD[layer_type] = fn
        return fn

    return decorate


@contextmanager
def float_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every quantized layer computes in float with its latent weights.

    Example:
        >>> from mpqat.quantize import quantize
        >>> q = quantize(nn.Sequential(nn.Linear(3, 2)), HessianILP())
        >>> x = torch.randn(4, 3)
        >>> with float_mode(q):
        ...     torch.equal(q(x), F.linear(x, q[0].weight, q[0].bias))
        True
    """
    patched = []
    for module in model.modules():
        fn = _FLOAT_FORWARD.get(type(module))
        if fn is not None and "forward" not in module.__dict__:  # not already patched by an outer block
            module.forward = functools.partial(fn, module)
            patched.append(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward


def hawq_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's HAWQ layers (QuantLinear with HAWQ buffers), by module name, in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear) and hasattr(m, "hawq_info")}


def is_allocated(model: nn.Module) -> bool:
    """True once :func:`prepare` has chosen the bits (also after a checkpoint is loaded)."""
    layers = hawq_layers(model)
    return bool(layers) and all(bool(m.hawq_info[0]) for m in layers.values())


# --------------------------------------------------------------------------------------------------
# Phases: float training, sensitivity, allocation
# --------------------------------------------------------------------------------------------------


def _tensors(pair: ArrayPair) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = pair
    X = torch.as_tensor(X)
    return X.float() if not X.is_floating_point() else X, torch.as_tensor(y).long()


@torch.no_grad()
def _evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        logits = torch.cat([model(X[i : i + 4096]) for i in range(0, len(X), 4096)])
    finally:
        model.train(was_training)
    if not len(y):
        return math.nan, math.nan
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class FloatPhase:
    """Outcome of :func:`train_float`: the epoch kept (0 = none trained) and its validation figures."""

    best_epoch: int
    valid_loss: float
    valid_accuracy: float


def train_float(model: nn.Module, train: ArrayPair, valid: ArrayPair, epochs: int, lr: float, batch_size: int,
                generator: torch.Generator, patience: int = 5) -> FloatPhase:
    """Train the float weights (quantizers bypassed) with Adam and cross-entropy; keep the best-validation epoch.

    Stops after ``patience`` epochs without a lower validation loss; the model ends with the weights
    of the epoch of lowest validation loss (the untrained weights if no epoch is run).
    """
    X, y = _tensors(train)
    Xv, yv = _tensors(valid)
    params = [p for name, p in model.named_parameters() if p.requires_grad and not is_quantizer_param(name)]
    with float_mode(model):
        best = FloatPhase(0, *_evaluate(model, Xv, yv))
        if epochs == 0 or not params:
            return best
        best_state = _snapshot(model)
        optimizer = torch.optim.Adam(params, lr=lr)
        was_training = model.training
        model.train()
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(X), generator=generator)
            for start in range(0, len(X), batch_size):
                idx = order[start : start + batch_size]
                loss = F.cross_entropy(model(X[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            loss_v, acc_v = _evaluate(model, Xv, yv)
            if best.best_epoch == 0 or loss_v < best.valid_loss:
                best, best_state = FloatPhase(epoch, loss_v, acc_v), _snapshot(model)
            elif epoch - best.best_epoch >= patience:
                break
        model.load_state_dict(best_state)
        model.train(was_training)
    return best


def measure_sensitivity(model: nn.Module, recipe: HessianILP, train: ArrayPair, valid: ArrayPair,
                        generator: torch.Generator, layers: dict[str, nn.Module] | None = None,
                        quantize: QuantizeFn = uniform_fake_quant) -> tuple[np.ndarray, np.ndarray]:
    """``(omega [layers, columns], trace [layers, 3])`` of the float model (trace rows: Tr/n, s.e., samples).

    ``layers`` (default: the HAWQ layers) and ``quantize`` (default: the uniform quantizer at LSQ's
    initial step) let other methods reuse it, e.g. ADQ with its codebook quantizer. ``recipe`` needs
    ``columns()``, ``sensitivity``, ``calibration_rows``, ``hutchinson_samples`` and ``hutchinson_tol``.
    """
    layers = hawq_layers(model) if layers is None else layers
    weights = {name: m.weight for name, m in layers.items()}
    columns = recipe.columns()
    trace = np.full((len(layers), 3), np.nan)
    with float_mode(model):
        if recipe.sensitivity == "loss":
            Xv, yv = _tensors(valid)
            return loss_sensitivity(model, weights, Xv, yv, columns, quantize=quantize), trace
        X, y = _tensors(train)
        rows = torch.randperm(len(X), generator=generator)[: recipe.calibration_rows]
        estimates = hutchinson_traces(model, weights, X[rows], y[rows], max_samples=recipe.hutchinson_samples,
                                      tol=recipe.hutchinson_tol, generator=generator)
    for i, name in enumerate(layers):
        est = estimates[name]
        trace[i] = (est.per_param, est.per_param_stderr, est.samples)
    return hessian_omega(estimates, weights, columns, functools.partial(quant_error, quantize=quantize)), trace


def allowed_mask(recipe: HessianILP, n_layers: int) -> np.ndarray:
    """``[layers, columns]``: candidates for every layer; only ``pinned_bits`` for pinned first/last."""
    columns = np.array(recipe.columns())
    mask = np.tile(np.isin(columns, recipe.candidates), (n_layers, 1))
    if recipe.pin_first_last:
        for i in {0, n_layers - 1}:
            mask[i] = columns == recipe.pinned_bits
    return mask


def check_budget(model: nn.Module, recipe: HessianILP) -> None:
    """Raise :class:`ConfigError` now (before any training) if the budget is below the cheapest allocation."""
    layers = hawq_layers(model)
    costs = budget_costs(model, layers, recipe.columns(), recipe.budget_kind)
    lowest = min_budget(costs.matrix, allowed_mask(recipe, len(layers)), costs.offset)
    if not recipe.budget >= lowest - 1e-12 * max(1.0, abs(lowest)):
        raise ConfigError(
            f"budget {recipe.budget:g} {costs.unit} is infeasible for this model: the smallest feasible budget is "
            f"{lowest:.6g} {costs.unit} (every layer at its fewest allowed bits)"
        )


def choose_bits(model: nn.Module, recipe: HessianILP, omega: np.ndarray) -> Allocation:
    """Solve the ILP for ``omega`` under the recipe's budget (costs from :mod:`mpqat.cost`)."""
    layers = hawq_layers(model)
    costs = budget_costs(model, layers, recipe.columns(), recipe.budget_kind)
    return allocate(omega, costs, recipe.budget, recipe.columns(), allowed_mask(recipe, len(layers)))


@torch.no_grad()
def _record(model: nn.Module, bits: tuple[int, ...], omega: np.ndarray, trace: np.ndarray, info: list[float]) -> None:
    for i, layer in enumerate(hawq_layers(model).values()):
        layer.weight_quant.bit_widths.fill_(float(bits[i]))
        layer.weight_quant.initialized.fill_(False)  # LSQ init at the chosen bits on the first QAT batch
        layer.hawq_omega.copy_(torch.from_numpy(omega[i]))
        layer.hawq_trace.copy_(torch.from_numpy(trace[i]))
        layer.hawq_info.copy_(torch.tensor([1.0, *info], dtype=torch.float64))


def prepare(model: nn.Module, recipe: HessianILP, train: ArrayPair, valid: ArrayPair,
            generator: torch.Generator | None = None) -> Allocation:
    """FP phase, sensitivity and allocation on a model quantized with ``recipe``; sets its bits in place.

    Example:
        >>> from mpqat.quantize import quantize
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(64, 4)).astype("float32"); y = (X[:, 0] > 0).astype("int64")
        >>> q = quantize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), HessianILP(budget=3, fp_epochs=2))
        >>> prepare(q, HessianILP(budget=3, fp_epochs=2), (X, y), (X, y)).achieved <= 3
        True
    """
    if not hawq_layers(model):
        raise ConfigError("prepare() needs a model quantized with a HessianILP recipe (mpqat.quantize(model, recipe))")
    check_budget(model, recipe)
    generator = generator or torch.Generator().manual_seed(torch.initial_seed() % 2**63)
    fp = train_float(model, train, valid, recipe.fp_epochs, recipe.fp_lr, recipe.fp_batch_size, generator,
                     recipe.fp_patience)
    t0 = time.perf_counter()
    omega, trace = measure_sensitivity(model, recipe, train, valid, generator)
    sensitivity_seconds = time.perf_counter() - t0
    allocation = choose_bits(model, recipe, omega)
    info = [sensitivity_seconds, allocation.solve_seconds, fp.valid_accuracy, fp.best_epoch]
    _record(model, allocation.bits, omega, trace, info)
    return allocation


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


def hawq_summary(model: nn.Module, recipe: HessianILP) -> dict[str, Any]:
    """Chosen bits, sensitivities, budget and timings, read from the model's buffers (JSON-ready)."""
    layers = hawq_layers(model)
    if not is_allocated(model):
        return {"hawq_allocated": False}
    columns = recipe.columns()
    first = next(iter(layers.values())).hawq_info.tolist()
    bits = {name: int(m.weight_quant.bit_widths.flatten()[0]) for name, m in layers.items()}
    sensitivity, objective = {}, 0.0
    for name, m in layers.items():
        omega = m.hawq_omega.tolist()
        trace = m.hawq_trace.tolist()
        objective += omega[columns.index(bits[name])]
        entry: dict[str, Any] = {"omega": {str(b): v for b, v in zip(columns, omega, strict=True)}}
        if not math.isnan(trace[0]):
            entry.update(trace_per_param=trace[0], trace_stderr=trace[1], trace_samples=int(trace[2]))
        sensitivity[name] = entry
    costs = budget_costs(model, layers, columns, recipe.budget_kind)
    achieved = {"avg_bits": "avg_weight_bits", "size": "size_bytes", "bitops": "bitops"}[recipe.budget_kind]
    return {
        "hawq_allocated": True,
        "layer_bits": bits,
        "sensitivity_kind": recipe.sensitivity,
        "sensitivity": sensitivity,
        "allocation": {
            "budget_kind": recipe.budget_kind, "budget": recipe.budget,
            "achieved": model_cost(model).summary()[achieved],
            "min_budget": min_budget(costs.matrix, allowed_mask(recipe, len(layers)), costs.offset),
            "objective": objective, "solver": "scipy.optimize.milp (HiGHS)",
            "solve_seconds": first[2],
        },
        "sensitivity_seconds": first[1],
        "fp_epochs": recipe.fp_epochs,
        "fp_valid_accuracy": first[3],
        "fp_best_epoch": int(first[4]),
    }


@register_hooks(HessianILP)
class HawqHooks(AnalyseThenTrainHooks):
    """Runs :func:`prepare` at the start of epoch 0 of a fresh run; reports the allocation at the end."""

    recipe: HessianILP

    def __init__(self, recipe: HessianILP | None = None) -> None:
        super().__init__(recipe)
        self.allocation: Allocation | None = None

    def is_prepared(self, model: nn.Module) -> bool:
        return is_allocated(model)

    def check_budget(self, model: nn.Module) -> None:
        check_budget(model, self.recipe)

    def prepare(self, model: nn.Module) -> None:
        check_budget(model, self.recipe)
        self.allocation = prepare(model, self.recipe, self.train, self.valid)

    def epoch_log(self, model: nn.Module) -> dict[str, Any]:
        cost = model_cost(model)
        return {"avg_weight_bits": cost.avg_weight_bits, "avg_act_bits": cost.avg_act_bits}

    def final_metrics(self, model: nn.Module) -> dict[str, Any]:
        return hawq_summary(model, self.recipe)
