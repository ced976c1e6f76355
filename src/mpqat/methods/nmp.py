"""NMP-QAT: neuron-level learned mixed precision that grows bits "when needed" (METHODS.md §1).

Every output neuron of every linear layer has a weight bit-width in ``w_candidates`` and every
layer input feature an activation bit-width in ``a_candidates``, chosen by a learned strength
``s in [0, 1]`` (see :mod:`mpqat.quant.bits`). All strengths start in the lowest bucket, so a model
starts at 1-bit weights and 4-bit activations and a neuron gains bits only when the task gradient
pushes its strength across a threshold. ``granularity: layer`` learns one bit-width per layer
instead (the ablation, and a Brevitas-like learned-bits baseline).

The recipe is :class:`NeuronBits` (``method: nmp``); the training hooks are :class:`NeuronBitsHooks`:
optimizer groups with their own learning rates for the weight steps and the activation clips,
the strength update after every optimizer step (layer-normalised momentum at
``lr * strength_lr_mult``, then clamping to [0, 1] and, unless ``allow_shrink``, to a floor so
that no neuron loses bits it has gained), the temperature schedule, the optional expected-cost
regularizer, and per-epoch average bits for ``history.json``. Defaults, and which of them are
the paper's: ``docs/nmp.md``.

Example:
    >>> import torch
    >>> from mpqat.models import MLP
    >>> from mpqat.quantize import quantize
    >>> model = quantize(MLP(6, 2, hidden=(8,)), NeuronBits())
    >>> _ = model.train()(torch.randn(16, 6))
    >>> [int(b) for b in model[2].weight_quant.bits().unique()], [int(b) for b in model[2].act_quant.bits().unique()]
    ([1], [4])
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mpqat.cost import (
    expected_act_bits,
    expected_bitops,
    expected_weight_bits,
    model_cost,
)
from mpqat.errors import ConfigError
from mpqat.kernels.nmp_cost import fused_expected_bits
from mpqat.methods.base import MethodHooks, is_quantizer_param, register_hooks
from mpqat.optim import SMALL_TENSORS
from mpqat.nn.linear import QuantLinear
from mpqat.quant.bits import (
    NeuronBitsActQuantizer,
    NeuronBitsWeightQuantizer,
    _LearnedBits,
    check_candidates,
    step_strengths,
)
from mpqat.quantize import (
    LayerContext,
    layer_dims,
    make_quant_layer,
    register_quantizer,
)
from mpqat.recipes import (
    ACT_BITS_RANGE,
    WEIGHT_BITS_RANGE,
    Recipe,
    check_bits,
    register_recipe,
)

GRANULARITIES = ("neuron", "layer")
REGULARIZERS = ("none", "bits", "bitops")


def _number(name: str, value: Any, lo: float | None = None, hi: float | None = None, open_lo: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    if lo is not None and (value <= lo if open_lo else value < lo):
        raise ConfigError(f"{name}={value!r} must be {'>' if open_lo else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}={value!r} must be <= {hi}")


@register_recipe
@dataclass(frozen=True)
class NeuronBits(Recipe):
    """NMP-QAT: learned per-neuron weight and per-feature activation bit-widths.

    * ``w_candidates`` / ``w_thresholds``: weight bit-widths and the strength thresholds between
      them (one fewer, increasing in (0, 1)); ``a_candidates`` / ``a_thresholds`` for activations.
    * ``w_init_strength`` / ``a_init_strength``: initial strengths (below the first threshold:
      start at the lowest candidate).
    * ``tau``: temperature of the sigmoid transitions; ``tau_final``: if set, annealed
      geometrically from ``tau`` to ``tau_final`` over the epochs.
    * ``strength_lr_mult`` / ``scale_lr_mult`` / ``clip_lr_mult``: learning rates of the strengths,
      the weight steps and the activation clips, as multiples of the trainer's ``lr``;
      ``strength_warmup_epochs``: the strengths (so the bit-widths) stay fixed for that many
      epochs while the weights settle.
    * ``granularity``: ``neuron`` (one bit-width per neuron/feature) or ``layer`` (one per layer).
    * ``allow_shrink``: whether a bit-width may go back down once it has grown.
    * ``input_bits``: fixed bits of the model input (``None``: learned like the other inputs);
      ``first_layer_w_bits`` / ``last_layer_w_bits``: fixed weight bits for those layers (``None``: learned).
    * ``per_neuron_scale``: one weight step per (candidate, neuron) instead of per candidate;
      ``per_feature_clip``: one activation clip per feature instead of per layer input;
      ``clip_init_quantile``: the clips start at this quantile of ``|x|`` on the first batch.
    * ``reg``: ``none`` (the paper), ``bits`` (expected average weight bits + expected average
      activation bits) or ``bitops`` (expected BitOps per MAC, i.e. mean ``b_w * b_a``);
      ``reg_weight`` its coefficient, zero for ``reg_warmup_epochs`` epochs then ramped up
      linearly over ``reg_ramp_epochs`` epochs.
    """

    method: ClassVar[str] = "nmp"
    w_candidates: tuple[int, ...] = (1, 2, 4, 8)
    w_thresholds: tuple[float, ...] = (0.25, 0.5, 0.75)
    a_candidates: tuple[int, ...] = (4, 8, 16)
    a_thresholds: tuple[float, ...] = (0.35, 0.65)
    w_init_strength: float = 0.10
    a_init_strength: float = 0.15
    tau: float = 0.05
    tau_final: float | None = None
    strength_lr_mult: float = 3.0
    strength_warmup_epochs: int = 0
    scale_lr_mult: float = 1.0
    clip_lr_mult: float = 10.0
    granularity: str = "neuron"
    allow_shrink: bool = False
    input_bits: int | None = 8
    first_layer_w_bits: int | None = None
    last_layer_w_bits: int | None = None
    per_neuron_scale: bool = True
    per_feature_clip: bool = True
    clip_init_quantile: float = 0.999
    reg: str = "none"
    reg_weight: float = 0.0
    reg_warmup_epochs: int = 0
    reg_ramp_epochs: int = 0

    def __post_init__(self) -> None:
        for name in ("w_candidates", "w_thresholds", "a_candidates", "a_thresholds"):
            if isinstance(getattr(self, name), list):  # the dataclass is frozen (hashable): keep tuples
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for kind, cands, thresholds, (lo, hi) in (("weight", self.w_candidates, self.w_thresholds, WEIGHT_BITS_RANGE),
                                                  ("activation", self.a_candidates, self.a_thresholds, ACT_BITS_RANGE)):
            if not isinstance(cands, tuple) or not isinstance(thresholds, tuple):
                raise ConfigError(
                    f"{kind} candidates and thresholds must be lists, e.g. [1, 2, 4, 8] and [0.25, 0.5, 0.75]"
                )
            for t in thresholds:
                _number(f"{kind} threshold", t)
            try:
                check_candidates(cands, thresholds, lo, hi, kind)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        _number("w_init_strength", self.w_init_strength, 0.0, 1.0)
        _number("a_init_strength", self.a_init_strength, 0.0, 1.0)
        _number("tau", self.tau, 0.0, open_lo=True)
        if self.tau_final is not None:
            _number("tau_final", self.tau_final, 0.0, open_lo=True)
        _number("strength_lr_mult", self.strength_lr_mult, 0.0, open_lo=True)
        _number("scale_lr_mult", self.scale_lr_mult, 0.0, open_lo=True)
        _number("clip_lr_mult", self.clip_lr_mult, 0.0, open_lo=True)
        _number("clip_init_quantile", self.clip_init_quantile, 0.0, 1.0, open_lo=True)
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r}: choose one of {', '.join(GRANULARITIES)}")
        if self.reg not in REGULARIZERS:
            raise ConfigError(f"reg={self.reg!r}: choose one of {', '.join(REGULARIZERS)}")
        _number("reg_weight", self.reg_weight, 0.0)
        for name in ("strength_warmup_epochs", "reg_warmup_epochs", "reg_ramp_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
        for name in ("allow_shrink", "per_neuron_scale", "per_feature_clip"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        check_bits("input_bits", self.input_bits, "activation")
        check_bits("first_layer_w_bits", self.first_layer_w_bits)
        check_bits("last_layer_w_bits", self.last_layer_w_bits)

    def tau_at(self, epoch: int, total_epochs: int) -> float:
        """Temperature of ``epoch`` (0-based): ``tau``, or geometric from ``tau`` to ``tau_final``."""
        if self.tau_final is None or total_epochs <= 1:
            return float(self.tau)
        frac = min(max(epoch / (total_epochs - 1), 0.0), 1.0)
        return float(self.tau * (self.tau_final / self.tau) ** frac)

    def reg_at(self, epoch: int) -> float:
        """Regularizer coefficient of ``epoch``: 0 during warm-up, then a linear ramp to ``reg_weight``."""
        if self.reg == "none" or self.reg_weight == 0 or epoch < self.reg_warmup_epochs:
            return 0.0
        if self.reg_ramp_epochs == 0:
            return float(self.reg_weight)
        return float(self.reg_weight * min(1.0, (epoch - self.reg_warmup_epochs + 1) / self.reg_ramp_epochs))


@register_quantizer(NeuronBits)
def _nmp_layer(layer: nn.Module, ctx: LayerContext, recipe: NeuronBits) -> nn.Module:
    per_neuron = recipe.granularity == "neuron"
    fixed_w = recipe.first_layer_w_bits if ctx.is_first else None
    if ctx.is_last and recipe.last_layer_w_bits is not None:
        fixed_w = recipe.last_layer_w_bits
    w_cands, w_thresholds = ((fixed_w,), ()) if fixed_w is not None else (recipe.w_candidates, recipe.w_thresholds)
    rows, fan_in, features = layer_dims(layer)
    weight_quant = NeuronBitsWeightQuantizer(
        rows, fan_in, w_cands, w_thresholds, init_strength=recipe.w_init_strength,
        tau=recipe.tau, per_neuron_bits=per_neuron, per_neuron=recipe.per_neuron_scale,
    )
    fixed_a = recipe.input_bits if ctx.is_first else None
    a_cands, a_thresholds = ((fixed_a,), ()) if fixed_a is not None else (recipe.a_candidates, recipe.a_thresholds)
    act_quant = NeuronBitsActQuantizer(
        features, signed=not ctx.input_after_relu, candidates=a_cands, thresholds=a_thresholds,
        init_strength=recipe.a_init_strength, tau=recipe.tau, per_feature_bits=per_neuron,
        per_feature=recipe.per_feature_clip, init_quantile=recipe.clip_init_quantile,
    )
    return make_quant_layer(layer, weight_quant, act_quant)


def learned_bit_quantizers(model: nn.Module) -> list[_LearnedBits]:
    """Every learned-bit quantizer of ``model`` (fixed-bit ones included), in definition order."""
    return [m for m in model.modules() if isinstance(m, _LearnedBits)]


def expected_cost(model: nn.Module, reg: str) -> torch.Tensor:
    """The regularizer's cost: ``bits`` = E[avg weight bits] + E[avg act bits]; ``bitops`` = E[BitOps] / MACs.

    ``bits`` goes through one fused kernel call where it can (:mod:`mpqat.kernels.nmp_cost`; the same
    value and gradient to float rounding), ``bitops`` through the reference functions of :mod:`mpqat.cost`."""
    if reg == "bits":
        fused = fused_expected_bits(model)
        return fused if fused is not None else expected_weight_bits(model) + expected_act_bits(model)
    if reg == "bitops":
        macs = sum(m.macs() for m in model.modules() if isinstance(m, QuantLinear))
        return expected_bitops(model) / max(macs, 1)
    raise ConfigError(f"reg={reg!r}: choose one of {', '.join(REGULARIZERS)}")


def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values.detach().double().reshape(-1)
    return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}


@register_hooks(NeuronBits)
class NeuronBitsHooks(MethodHooks):
    """Training hooks of NMP-QAT (see the module docstring)."""

    recipe: NeuronBits

    def __init__(self, recipe: NeuronBits) -> None:
        super().__init__(recipe)
        self._tau = recipe.tau
        self._reg = recipe.reg_at(0)
        self._strength_lr = 1e-3 * recipe.strength_lr_mult  # set from the trainer's lr in param_groups

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Weights (with weight decay) and scales/clips (``scale_lr_mult``). The strengths are not
        given to the trainer's optimizer: :meth:`after_step` updates them (see
        :meth:`~mpqat.quant.bits._LearnedBits.step_strength`) at ``lr * strength_lr_mult``."""
        self._strength_lr = lr * self.recipe.strength_lr_mult
        weights, scales, clips = [], [], []
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if not param.requires_grad or leaf == "strength":
                continue
            if leaf == "log2_clip":
                clips.append(param)
            else:
                (scales if is_quantizer_param(name) else weights).append(param)
        return [
            {"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"},
            {"params": scales, "lr": lr * self.recipe.scale_lr_mult, "weight_decay": 0.0, "name": "scales",
             SMALL_TENSORS: True},
            {"params": clips, "lr": lr * self.recipe.clip_lr_mult, "weight_decay": 0.0, "name": "clips",
             SMALL_TENSORS: True},
        ]

    def on_epoch_start(self, model: nn.Module, epoch: int, total_epochs: int) -> None:
        """Set this epoch's temperature and regularizer coefficient."""
        self._tau = self.recipe.tau_at(epoch, total_epochs)
        self._reg = self.recipe.reg_at(epoch)
        learning = epoch >= self.recipe.strength_warmup_epochs
        for quant in learned_bit_quantizers(model):
            quant.tau = self._tau
            if quant.strength is not None:
                quant.strength.requires_grad_(learning)

    def extra_loss(self, model: nn.Module, epoch: int, step: int) -> torch.Tensor | None:
        """``coefficient * expected cost``; None (nothing to add) while the coefficient is zero."""
        if self._reg == 0.0:
            return None
        return self._reg * expected_cost(model, self.recipe.reg)

    def after_step(self, model: nn.Module) -> None:
        """Update the strengths and clamp them to [0, 1] (and to the no-shrink floor)."""
        step_strengths(self._learning_quantizers(model), self._strength_lr, self.recipe.allow_shrink)

    def _learning_quantizers(self, model: nn.Module) -> list[_LearnedBits]:
        """The quantizers with a strength, found once per model (walking the modules every step costs
        more than updating them)."""
        cached = self.__dict__.get("_quantizers")
        if cached is None or cached[0]() is not model:
            quants = [q for q in learned_bit_quantizers(model) if q.strength is not None]
            cached = self.__dict__["_quantizers"] = (weakref.ref(model), quants)
        return cached[1]

    def epoch_log(self, model: nn.Module) -> dict[str, Any]:
        """Average weight/activation bits after the epoch (``history.json``; the report plots them)."""
        cost = model_cost(model)
        return {"avg_weight_bits": cost.avg_weight_bits, "avg_act_bits": cost.avg_act_bits,
                "bitops": cost.bitops, "tau": self._tau, "reg_coefficient": self._reg}

    def final_metrics(self, model: nn.Module) -> dict[str, Any]:
        """Per layer: mean hard bits and strength summaries (the histograms are in ``bit_histograms``)."""
        layers: dict[str, Any] = {}
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                entry: dict[str, Any] = {}
                for kind, quant in (("weights", module.weight_quant), ("activations", module.act_quant)):
                    info: dict[str, Any] = {"mean_bits": float(quant.bits().double().mean())}
                    if isinstance(quant, _LearnedBits) and quant.strength is not None:
                        info["strength"] = _summary(quant.strength)
                        info["expected_bits"] = float(quant.expected_bits().detach().double().mean())
                    entry[kind] = info
                layers[name] = entry
        return {"nmp": {"tau_final": self._tau, "reg_coefficient_final": self._reg, "layers": layers}}
