"""ADQ: adaptive codebook weights, distribution-aware activations, sensitivity-informed bits (METHODS.md §2).

Jia et al., "Adaptive Distribution-aware Quantization for Mixed-Precision Neural Networks"
(arXiv 2510.19760). No code or full text is public; what is the paper's and what is reconstructed
or ours is listed in ``docs/adq.md``. The parts:

1. **FP phase** (``fp_epochs``, at ``fp_lr`` or else the trainer's lr): the float model is trained
   first, as the paper starts from pretrained weights (:func:`mpqat.methods.hawq.train_float`);
2. **sensitivity** (``sensitivity``): per layer and candidate width ``b``,
   ``Omega_l(b) = Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2`` (Hutchinson trace, ``"hessian"``) or the
   validation-loss increase with only layer ``l`` quantized (``"loss"``), where ``Q_b`` is the
   *quantile codebook* at ``b`` bits (:func:`mpqat.quant.codebook.codebook_fake_quant`);
3. **allocation** (``allocation="ilp"``): the per-layer bits in ``candidates`` minimising
   ``sum_l Omega_l(b_l)`` with parameter-weighted average bits ``<= avg_bits``, an exact ILP
   (:func:`mpqat.methods.allocation.solve_allocation`). The budget counts the codebook layers only:
   with ``pin_first_last`` the 8-bit first/last layers are left out of it (the usual convention for
   "average bit-width" on ResNets); without pinning (the default) it is ``avg_weight_bits`` of
   ``metrics.json`` exactly. ``allocation="uniform"``: every layer at the largest candidate
   ``<= avg_bits``. ``avg_bits=None``: every layer at ``w_bits``;
4. **codebooks**: each layer's :class:`~mpqat.quant.codebook.CodebookWeightQuantizer` is
   initialised from its (pretrained) weights at its width, then QAT with the one trainer, the
   codebooks following the weights by EMA after every optimizer step (``ema``, ``decay``,
   ``update_every``, ``reseed``), frozen for the last ``freeze_codebook_last`` of the epochs.
   ``level_grad`` (ours, off by default; a deviation from METHODS' "no gradient to the codebook"):
   the level magnitudes also learn from the task loss, LSQ-style, in the optimizer's ``quantizers``
   group, projected back to sorted positive magnitudes after every step, before the EMA (if on);
5. **activations** (``act="n2uq"``): every post-ReLU input uses
   :class:`~mpqat.quant.n2uq.ThresholdActQuantizer` at ``a_bits`` (threshold parameters at
   ``threshold_lr * lr``, N2UQ's lr/10); the model input keeps the uniform 8-bit quantizer;
6. **KD** (``kd > 0``, off by default): ``kd * T^2 * KL(teacher || student)`` at temperature
   ``kd_temperature``; the teacher is the float model at the end of the FP phase (with
   ``fp_epochs: 0``, the model as ADQ receives it, e.g. after the trainer's float pretraining),
   kept in buffers so a resumed run distils from the same teacher. Without an FP phase, a model no
   better than the majority class is refused as a teacher.

Phases 1-4 run inside :meth:`ADQHooks.on_epoch_start` of epoch 0 of a fresh run (as HAWQ), so every
trainer epoch is a QAT epoch and the first checkpoint already holds the bits and codebooks.

Example:
    >>> ADQ(avg_bits=2.81).candidates, ADQ(avg_bits=2.81).act
    ((2, 3, 4), 'n2uq')
    >>> ADQ(avg_bits=1.5)
    Traceback (most recent call last):
    ...
    mpqat.errors.ConfigError: avg_bits=1.5 is impossible: the smallest average is 2 (every codebook layer at its fewest bits, candidates (2, 3, 4)); raise avg_bits or add a lower candidate
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mpqat.cost import model_cost
from mpqat.errors import ConfigError
from mpqat.methods.allocation import solve_allocation
from mpqat.methods.base import AnalyseThenTrainHooks, is_quantizer_param, register_hooks
from mpqat.methods.hawq import _positive, float_mode, measure_sensitivity, train_float
from mpqat.nn.linear import QuantLinear
from mpqat.quant.codebook import (
    CHANNEL_SCALES,
    INIT_MODES,
    LEVEL_MODES,
    LEVEL_GRAD_MODES,
    STE_MODES,
    CodebookWeightQuantizer,
    check_codebook_bits,
    codebook_fake_quant,
)
from mpqat.quant.n2uq import MAX_THRESHOLD_BITS, ThresholdActQuantizer
from mpqat.quant.uniform import LSQWeightQuantizer, Pow2ActQuantizer
from mpqat.quantize import LayerContext, layer_dims, make_quant_layer, register_quantizer
from mpqat.recipes import Recipe, check_bits, register_recipe

ArrayPair = tuple[np.ndarray, np.ndarray]
ACTS = ("n2uq", "uniform")
SENSITIVITIES = ("hessian", "loss")
ALLOCATIONS = ("ilp", "uniform")
INFO_FIELDS = ("prepared", "sensitivity_seconds", "solve_seconds", "fp_valid_accuracy", "fp_best_epoch")


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not supported: choose one of {', '.join(options)}")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false")


@register_recipe
@dataclass(frozen=True)
class ADQ(Recipe):
    """ADQ recipe (``method: adq``); every knob is described in ``docs/adq.md``.

    Example:
        >>> ADQ(act="uniform", init="uniform", ema=False, allocation="uniform").method   # every ablation off
        'adq'
        >>> ADQ(avg_bits=2.8, level_grad=True, ema=False).to_dict()["level_grad"]   # levels learned from the loss
        True
        >>> "level_grad" in ADQ(avg_bits=2.8).to_dict()                              # left out at its default
        False
    """

    method: ClassVar[str] = "adq"
    w_bits: int = 3
    avg_bits: float | None = None
    candidates: tuple[int, ...] = (2, 3, 4)
    a_bits: int = 4
    input_bits: int = 8
    levels: str = "symmetric"
    act: str = "n2uq"
    init: str = "quantile"
    ema: bool = True
    decay: float = 0.99
    update_every: int = 1
    reseed: bool = True
    freeze_codebook_last: float = 0.1
    sensitivity: str = "hessian"
    allocation: str = "ilp"
    hutchinson_samples: int = 200
    hutchinson_tol: float = 0.05
    calibration_rows: int = 1024
    pin_first_last: bool = False
    pinned_bits: int = 8
    fp_epochs: int = 20
    fp_lr: float | None = None
    fp_batch_size: int = 256
    fp_patience: int = 5
    kd: float = 0.0
    kd_temperature: float = 1.0
    threshold_lr: float = 0.1
    seed: int | None = None
    channel_scale: str = "none"
    ste: str = "identity"
    level_grad: bool = False
    level_grad_mode: str = "codeword"

    def __post_init__(self) -> None:
        candidates = self.candidates if isinstance(self.candidates, tuple | list) else (self.candidates,)
        if not candidates:
            raise ConfigError("candidates must list at least one codebook bit-width, e.g. [2, 3, 4]")
        for bits in candidates:
            check_codebook_bits("candidates", bits)
        object.__setattr__(self, "candidates", tuple(sorted(set(candidates))))
        check_codebook_bits("w_bits", self.w_bits)
        if self.avg_bits is not None:
            _positive("avg_bits", self.avg_bits)
            object.__setattr__(self, "avg_bits", float(self.avg_bits))
            lowest = min(self.candidates)
            if self.avg_bits < lowest:
                raise ConfigError(
                    f"avg_bits={self.avg_bits:g} is impossible: the smallest average is {lowest} (every codebook layer "
                    f"at its fewest bits, candidates {self.candidates}); raise avg_bits or add a lower candidate"
                )
        check_bits("a_bits", self.a_bits, "activation")
        if self.act == "n2uq" and self.a_bits > MAX_THRESHOLD_BITS:
            raise ConfigError(f"a_bits={self.a_bits} is too many for threshold (n2uq) activations: at most "
                              f"{MAX_THRESHOLD_BITS} ({2**MAX_THRESHOLD_BITS - 1} thresholds); use act=uniform")
        check_bits("input_bits", self.input_bits, "activation")
        check_bits("pinned_bits", self.pinned_bits)
        _choice("levels", self.levels, LEVEL_MODES)
        _choice("act", self.act, ACTS)
        _choice("init", self.init, INIT_MODES)
        _choice("channel_scale", self.channel_scale, CHANNEL_SCALES)
        _choice("ste", self.ste, STE_MODES)
        _choice("level_grad_mode", self.level_grad_mode, LEVEL_GRAD_MODES)
        _choice("sensitivity", self.sensitivity, SENSITIVITIES)
        _choice("allocation", self.allocation, ALLOCATIONS)
        for name in ("ema", "reseed", "pin_first_last", "level_grad"):
            _flag(name, getattr(self, name))
        if self.level_grad_mode != "codeword" and not self.level_grad:
            raise ConfigError(f"level_grad_mode={self.level_grad_mode!r} needs level_grad: true (the levels get no "
                              "gradient without it)")
        if isinstance(self.decay, bool) or not isinstance(self.decay, int | float) or not 0 <= self.decay < 1:
            raise ConfigError(f"decay={self.decay!r} must be a number in [0, 1)")
        fraction = self.freeze_codebook_last
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise ConfigError(f"freeze_codebook_last={fraction!r} must be a fraction of the epochs in [0, 1]")
        for name in ("update_every", "hutchinson_samples", "calibration_rows", "fp_batch_size", "fp_patience"):
            _positive(name, getattr(self, name), integer=True)
        _positive("fp_epochs", self.fp_epochs, integer=True, allow_zero=True)
        for name in ("hutchinson_tol", "kd"):
            _positive(name, getattr(self, name), allow_zero=True)
        for name in ("kd_temperature", "threshold_lr"):
            _positive(name, getattr(self, name))
        if self.fp_lr is not None:
            _positive("fp_lr", self.fp_lr)
        if self.seed is not None:
            _positive("seed", self.seed, integer=True, allow_zero=True)

    def columns(self) -> tuple[int, ...]:
        """Bit-widths of the sensitivity table's columns (the candidates)."""
        return self.candidates

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Recipe.to_dict`, without ``channel_scale``, ``ste``, ``level_grad`` and ``level_grad_mode``
        at their defaults (older runs keep their fingerprints)."""
        data = super().to_dict()
        for name, default in (("channel_scale", "none"), ("ste", "identity"), ("level_grad", False),
                              ("level_grad_mode", "codeword")):
            if data.get(name) == default:
                del data[name]
        return data

    def max_bits(self) -> int:
        """Largest codebook width any layer can get (sizes the codebook buffers)."""
        return max((*self.candidates, self.w_bits))


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


@register_quantizer(ADQ)
def _adq_layer(layer: nn.Module, ctx: LayerContext, recipe: ADQ) -> nn.Module:
    """A codebook layer (placeholder width; the allocation sets it), or 8-bit uniform when pinned."""
    rows, fan_in, features = layer_dims(layer)
    if recipe.pin_first_last and (ctx.is_first or ctx.is_last):
        weight_quant: nn.Module = LSQWeightQuantizer(rows, fan_in, recipe.pinned_bits, per_neuron=True)
    else:
        bits = max(recipe.candidates) if recipe.avg_bits is not None else recipe.w_bits
        weight_quant = CodebookWeightQuantizer(
            rows, fan_in, bits, levels=recipe.levels, decay=recipe.decay, update_every=recipe.update_every,
            reseed=recipe.reseed, init=recipe.init, max_bits=recipe.max_bits(), channel_scale=recipe.channel_scale,
            ste=recipe.ste, level_grad=recipe.level_grad, level_grad_mode=recipe.level_grad_mode,
        )
    if ctx.is_first:
        act_quant: nn.Module = Pow2ActQuantizer(features, recipe.input_bits, signed=not ctx.input_after_relu)
    elif recipe.act == "n2uq" and ctx.input_after_relu:
        act_quant = ThresholdActQuantizer(features, recipe.a_bits)
    else:
        act_quant = Pow2ActQuantizer(features, recipe.a_bits, signed=not ctx.input_after_relu)
    qlayer = make_quant_layer(layer, weight_quant, act_quant)
    qlayer.register_buffer("adq_omega", torch.full((len(recipe.columns()),), math.nan, dtype=torch.float64))
    qlayer.register_buffer("adq_trace", torch.full((3,), math.nan, dtype=torch.float64))
    qlayer.register_buffer("adq_info", torch.zeros(len(INFO_FIELDS), dtype=torch.float64))
    if recipe.kd > 0:  # the FP teacher's weights (set after the FP phase)
        qlayer.register_buffer("adq_teacher_weight", torch.zeros_like(qlayer.weight.detach()))
        if qlayer.bias is not None:
            qlayer.register_buffer("adq_teacher_bias", torch.zeros_like(qlayer.bias.detach()))
    return qlayer


def adq_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's ADQ layers (codebook or pinned), by module name, in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear) and hasattr(m, "adq_info")}


def codebook_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The ADQ layers whose weights use a codebook (the pinned layers excluded)."""
    return {n: m for n, m in adq_layers(model).items() if isinstance(m.weight_quant, CodebookWeightQuantizer)}


def is_prepared(model: nn.Module) -> bool:
    """True once :func:`prepare` has run (also after a checkpoint is loaded)."""
    layers = adq_layers(model)
    return bool(layers) and all(bool(m.adq_info[0]) for m in layers.values())


def _set_width(layer: nn.Module, bits: int) -> None:
    layer.weight_quant.set_bits(int(bits))


# --------------------------------------------------------------------------------------------------
# Allocation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What :func:`prepare` decided: bits per codebook layer and how."""

    bits: tuple[int, ...]
    objective: float
    achieved: float
    omega: np.ndarray
    trace: np.ndarray
    sensitivity_seconds: float
    solve_seconds: float


def avg_bit_costs(layers: dict[str, nn.Module], candidates: tuple[int, ...]) -> np.ndarray:
    """``cost[l, c] = n_l * b_c / sum_l n_l``: each codebook layer's share of the average bits."""
    sizes = np.array([m.weight.numel() for m in layers.values()], dtype=np.float64)
    return np.outer(sizes, np.asarray(candidates, dtype=np.float64)) / sizes.sum()


def sensitivity_quantizer(recipe: ADQ) -> functools.partial:
    """``Q_b``: the freshly initialised codebook at ``b`` bits, as the sensitivity measure uses it."""
    return functools.partial(codebook_fake_quant, levels=recipe.levels, init=recipe.init,
                             channel_scale=recipe.channel_scale)


def plan_bits(model: nn.Module, recipe: ADQ, train: ArrayPair, valid: ArrayPair, generator: torch.Generator) -> Plan:
    """Bits of every codebook layer: measured sensitivity + exact ILP, or uniform, or ``w_bits``."""
    layers = codebook_layers(model)
    n, c = len(layers), len(recipe.columns())
    omega, trace = np.full((n, c), np.nan), np.full((n, 3), np.nan)
    if recipe.avg_bits is None:
        bits = (recipe.w_bits,) * n
        return Plan(bits, math.nan, float(recipe.w_bits), omega, trace, 0.0, 0.0)
    cost = avg_bit_costs(layers, recipe.candidates)
    if recipe.allocation == "uniform":
        width = max(b for b in recipe.candidates if b <= recipe.avg_bits)
        return Plan((width,) * n, math.nan, float(width), omega, trace, 0.0, 0.0)
    t0 = time.perf_counter()
    omega, trace = measure_sensitivity(model, recipe, train, valid, generator, layers=layers,
                                       quantize=sensitivity_quantizer(recipe))
    seconds = time.perf_counter() - t0
    allocation = solve_allocation(omega, cost, recipe.avg_bits, recipe.candidates, unit="average weight bits")
    return Plan(allocation.bits, allocation.objective, allocation.achieved, omega, trace, seconds,
                allocation.solve_seconds)


def _check_model(model: nn.Module) -> None:
    if not adq_layers(model):
        raise ConfigError("this needs a model quantized with an ADQ recipe (mpqat.quantize(model, ADQ(...)))")
    if not codebook_layers(model):
        raise ConfigError("every layer of this model is pinned to uniform bits (pin_first_last with two layers): "
                          "there is no codebook layer; set pin_first_last=false")


def _check_teacher(accuracy: float, y_valid: np.ndarray) -> None:
    """Refuse to distil from a model ADQ received (no FP phase) that is no better than always
    predicting the most frequent class: an untrained model, not a teacher."""
    labels = np.asarray(y_valid)
    majority = float(np.bincount(labels.astype(np.int64)).max()) / len(labels) if len(labels) else 0.0
    if not accuracy > majority:
        raise ConfigError(f"kd > 0 needs a trained teacher: the float model as ADQ received it (fp_epochs: 0) has "
                          f"validation accuracy {accuracy:.3f}, no better than the majority class ({majority:.3f}); "
                          "pretrain it first (mpqat train --pretrain-epochs N) or set fp_epochs > 0")


@torch.no_grad()
def _record(model: nn.Module, recipe: ADQ, plan: Plan, info: list[float]) -> None:
    for i, (name, layer) in enumerate(codebook_layers(model).items()):
        _set_width(layer, plan.bits[i])
        layer.weight_quant.initialize(layer.weight)
        layer.adq_omega.copy_(torch.from_numpy(plan.omega[i]))
        layer.adq_trace.copy_(torch.from_numpy(plan.trace[i]))
    for layer in adq_layers(model).values():
        layer.adq_info.copy_(torch.tensor([1.0, *info], dtype=torch.float64))
        if recipe.kd > 0:
            layer.adq_teacher_weight.copy_(layer.weight)
            if layer.bias is not None:
                layer.adq_teacher_bias.copy_(layer.bias)


def prepare(model: nn.Module, recipe: ADQ, train: ArrayPair, valid: ArrayPair,
            generator: torch.Generator | None = None, lr: float = 1e-3) -> Plan:
    """FP phase, sensitivity, allocation and codebook init on a model quantized with ``recipe`` (in place).

    The FP phase trains with ``recipe.fp_lr``, or ``lr`` when that is None (the hooks pass the trainer's lr).

    Example:
        >>> from mpqat.quantize import quantize
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(64, 4)).astype("float32"); y = (X[:, 0] > 0).astype("int64")
        >>> r = ADQ(avg_bits=2.5, fp_epochs=2, hutchinson_samples=16)
        >>> q = quantize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), r)
        >>> plan = prepare(q, r, (X, y), (X, y))
        >>> plan.achieved <= 2.5, set(plan.bits) <= {2, 3, 4}
        (True, True)
    """
    _check_model(model)
    if generator is None:
        seed = recipe.seed if recipe.seed is not None else torch.initial_seed() % 2**63
        generator = torch.Generator().manual_seed(seed)
    fp_lr = recipe.fp_lr if recipe.fp_lr is not None else lr
    fp = train_float(model, train, valid, recipe.fp_epochs, fp_lr, recipe.fp_batch_size, generator,
                     recipe.fp_patience)
    if recipe.kd > 0 and recipe.fp_epochs == 0:
        _check_teacher(fp.valid_accuracy, valid[1])
    plan = plan_bits(model, recipe, train, valid, generator)
    _record(model, recipe, plan, [plan.sensitivity_seconds, plan.solve_seconds, fp.valid_accuracy, fp.best_epoch])
    return plan


# --------------------------------------------------------------------------------------------------
# Knowledge distillation
# --------------------------------------------------------------------------------------------------


def teacher_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of the FP teacher (the FP-phase weights kept in the ``adq_teacher_*`` buffers), eval mode."""
    params = {}
    for name, layer in adq_layers(model).items():
        prefix = f"{name}." if name else ""
        params[f"{prefix}weight"] = layer.adq_teacher_weight
        if layer.bias is not None:
            params[f"{prefix}bias"] = layer.adq_teacher_bias
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), float_mode(model):
            return torch.func.functional_call(model, params, (x,), strict=False)
    finally:
        model.train(was_training)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch (Hinton et al.).

    Example:
        >>> z = torch.randn(4, 3)
        >>> float(kd_loss(z, z, 2.0))
        0.0
    """
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True,
                    reduction="batchmean") * t * t


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


def freeze_from_epoch(recipe: ADQ, total_epochs: int) -> int:
    """First epoch (0-based) of the frozen-codebook tail: the last ``freeze_codebook_last`` of the epochs."""
    return total_epochs - int(math.floor(recipe.freeze_codebook_last * total_epochs + 0.5))


def adq_summary(model: nn.Module, recipe: ADQ) -> dict[str, Any]:
    """Bits, sensitivities, codebooks, reseeds and drift, read from the model's buffers (JSON-ready)."""
    if not is_prepared(model):
        return {"adq_prepared": False}
    layers = codebook_layers(model)
    first = next(iter(adq_layers(model).values())).adq_info.tolist()
    bits = {name: m.weight_quant.index_bits for name, m in layers.items()}
    sizes = {name: m.weight.numel() for name, m in layers.items()}
    achieved = sum(bits[n] * sizes[n] for n in layers) / sum(sizes.values())
    sensitivity: dict[str, Any] = {}
    objective = 0.0
    for name, m in layers.items():
        omega = m.adq_omega.tolist()
        if math.isnan(omega[0]):
            continue
        objective += omega[recipe.columns().index(bits[name])]
        entry: dict[str, Any] = {"omega": {str(b): v for b, v in zip(recipe.columns(), omega, strict=True)}}
        trace = m.adq_trace.tolist()
        if not math.isnan(trace[0]):
            entry.update(trace_per_param=trace[0], trace_stderr=trace[1], trace_samples=int(trace[2]))
        sensitivity[name] = entry
    return {
        "adq_prepared": True,
        "layer_bits": bits,
        "pinned_layers": sorted(set(adq_layers(model)) - set(layers)),
        "allocation": {
            "kind": recipe.allocation if recipe.avg_bits is not None else "fixed",
            "avg_bits_budget": recipe.avg_bits,
            "avg_bits_codebook_layers": achieved,
            "objective": objective if sensitivity else None,
            "solver": "scipy.optimize.milp (HiGHS)" if sensitivity else None,
            "solve_seconds": first[2],
        },
        "sensitivity_kind": recipe.sensitivity if sensitivity else None,
        "sensitivity": sensitivity,
        "sensitivity_seconds": first[1],
        "fp_epochs": recipe.fp_epochs,
        "fp_valid_accuracy": first[3],
        "fp_best_epoch": int(first[4]),
        "kd": recipe.kd,
        "codebook_reseeds": {name: int(m.weight_quant.reseeds) for name, m in layers.items()},
        "codebook_drift": {name: m.weight_quant.drift() for name, m in layers.items()},
        "codebooks": {name: [float(v) for v in m.weight_quant.levels()] for name, m in layers.items()},
        "codebook_int": {name: [int(v) for v in m.weight_quant.codebook_int()] for name, m in layers.items()},
    }


@register_hooks(ADQ)
class ADQHooks(AnalyseThenTrainHooks):
    """Prepare at the start of epoch 0 (fresh runs), level projection (``level_grad``) and EMA after every
    step, freeze late, optional KD."""

    recipe: ADQ

    def __init__(self, recipe: ADQ | None = None) -> None:
        super().__init__(recipe)
        self.plan: Plan | None = None
        self._captured: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handle: Any = None
        self._lr = 1e-3  # the trainer's lr, seen in param_groups (the FP phase's default)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Weights; quantizer steps and learned codebook levels (no decay); N2UQ thresholds at
        ``threshold_lr * lr`` (no decay)."""
        self._lr = lr
        weights, quant, thresholds = [], [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith((".act_quant.start", ".act_quant.intervals")):
                thresholds.append(param)
            else:
                (quant if is_quantizer_param(name) else weights).append(param)
        groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"}]
        if quant:
            groups.append({"params": quant, "lr": lr, "weight_decay": 0.0, "name": "quantizers"})
        if thresholds:
            groups.append({"params": thresholds, "lr": lr * self.recipe.threshold_lr, "weight_decay": 0.0,
                           "name": "thresholds"})
        return groups

    def on_fit_start(self, model: nn.Module, train: ArrayPair, valid: ArrayPair) -> None:
        """Keep the data for the analysis; with KD, capture each training batch's input and logits."""
        _check_model(model)
        super().on_fit_start(model, train, valid)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.recipe.kd > 0:
            def capture(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                if module.training and args:
                    self._captured = (args[0], output)

            self._handle = model.register_forward_hook(capture)

    def is_prepared(self, model: nn.Module) -> bool:
        return is_prepared(model)

    def prepare(self, model: nn.Module) -> None:
        self.plan = prepare(model, self.recipe, self.train, self.valid, lr=self._lr)
        self._captured = None

    def on_epoch_start(self, model: nn.Module, epoch: int, total_epochs: int) -> None:
        super().on_epoch_start(model, epoch, total_epochs)
        frozen = epoch >= freeze_from_epoch(self.recipe, total_epochs)
        for layer in codebook_layers(model).values():
            layer.weight_quant.freeze_codebook(frozen)

    def after_step(self, model: nn.Module) -> None:
        if not (self.recipe.ema or self.recipe.level_grad):
            return
        for layer in codebook_layers(model).values():
            if self.recipe.level_grad:  # the optimizer moved the levels: sorted, positive again
                layer.weight_quant.project_levels()
            if self.recipe.ema:
                layer.weight_quant.ema_update(layer.weight)

    def extra_loss(self, model: nn.Module, epoch: int, step: int) -> torch.Tensor:
        if self.recipe.kd <= 0 or self._captured is None:
            return torch.zeros(())
        x, student = self._captured
        self._captured = None
        teacher = teacher_logits(model, x)
        return self.recipe.kd * kd_loss(student, teacher, self.recipe.kd_temperature)

    def epoch_log(self, model: nn.Module) -> dict[str, Any]:
        cost = model_cost(model)
        quants = [m.weight_quant for m in codebook_layers(model).values()]
        return {
            "avg_weight_bits": cost.avg_weight_bits,
            "avg_act_bits": cost.avg_act_bits,
            "codebook_reseeds": int(sum(int(q.reseeds) for q in quants)),
            "codebook_drift": float(np.mean([q.drift() for q in quants])) if quants else 0.0,
            "codebook_frozen": bool(quants and bool(quants[0].codebook_frozen)),
        }

    def final_metrics(self, model: nn.Module) -> dict[str, Any]:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return adq_summary(model, self.recipe)
