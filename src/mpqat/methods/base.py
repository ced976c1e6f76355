"""The hook interface between a quantization method and the trainer.

The trainer (:func:`mpqat.train.fit`) owns the loop: batches, optimizer, validation, early
stopping, checkpoints. A method plugs in by subclassing :class:`MethodHooks` and registering it
for its recipe type with :func:`register_hooks`. Every hook has a do-nothing default.

Example:
    >>> import torch
    >>> hooks = MethodHooks()
    >>> float(hooks.extra_loss(torch.nn.Linear(2, 2), epoch=0, step=0))
    0.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mpqat.errors import ConfigError
from mpqat.optim import SMALL_TENSORS
from mpqat.recipes import Recipe


def is_quantizer_param(name: str) -> bool:
    """True for scale, clip, step and bit-strength parameters (kept out of weight decay)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in {"step", "log2_step", "strength", "act_strength", "clip", "log2_clip"} or ".weight_quant." in name or ".act_quant." in name


class MethodHooks:
    """Hooks a method may override. ``recipe`` is the method's recipe (None for FP32)."""

    def __init__(self, recipe: Recipe | None = None) -> None:
        self.recipe = recipe

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; quantizer parameters get no weight decay by default."""
        weights, quant = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (quant if is_quantizer_param(name) else weights).append(param)
        groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"}]
        if quant:
            groups.append({"params": quant, "lr": lr, "weight_decay": 0.0, "name": "quantizers",
                           SMALL_TENSORS: True})
        return groups

    def on_fit_start(self, model: nn.Module, train: tuple[Any, Any], valid: tuple[Any, Any]) -> None:
        """Called once when fit starts (fresh or resumed), before any epoch, with the training and
        validation arrays; for methods that need data (calibration, sensitivity analysis)."""

    def extra_loss(self, model: nn.Module, epoch: int, step: int) -> torch.Tensor | None:
        """A term added to the task loss (e.g. a bit-cost regularizer); a method may return None when it
        adds nothing (callers then skip the addition)."""
        return torch.zeros(())

    def on_epoch_start(self, model: nn.Module, epoch: int, total_epochs: int) -> None:
        """Called before each training epoch (schedules: temperature, cost coefficient, freezing)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimizer step (clamping, EMA updates)."""

    def epoch_log(self, model: nn.Module) -> dict[str, Any]:
        """Extra per-epoch figures for the history (e.g. average bits); must be JSON-serialisable."""
        return {}

    def final_metrics(self, model: nn.Module) -> dict[str, Any]:
        """Extra keys for ``metrics.json`` once training ends."""
        return {}


class AnalyseThenTrainHooks(MethodHooks):
    """Hooks of the methods that analyse the model once before QAT (HAWQ, ADQ, SMPQ, DNAS).

    The analysis (sensitivity, allocation, search) runs inside :meth:`on_epoch_start` of epoch 0 of a
    fresh run, so the first checkpoint already holds its result and a resumed run never repeats it.
    Subclasses implement :meth:`is_prepared` (the result is in the model's buffers),
    :meth:`check_budget` (fail fast, before any work) and :meth:`prepare` (the analysis itself).

    Example:
        >>> class Noop(AnalyseThenTrainHooks):
        ...     def is_prepared(self, model): return False
        ...     def prepare(self, model): self.done = True
        >>> hooks = Noop()
        >>> hooks.on_epoch_start(nn.Linear(1, 1), 0, 1)
        Traceback (most recent call last):
        ...
        mpqat.errors.ConfigError: this method needs the training data before its first epoch: the trainer must call hooks.on_fit_start(model, train, valid) (or call its prepare() yourself)
    """

    def __init__(self, recipe: Recipe | None = None) -> None:
        super().__init__(recipe)
        self.train: tuple[Any, Any] | None = None
        self.valid: tuple[Any, Any] | None = None

    def is_prepared(self, model: nn.Module) -> bool:
        """Whether the analysis already ran on ``model`` (e.g. a resumed run)."""
        raise NotImplementedError

    def check_budget(self, model: nn.Module) -> None:
        """Raise a ConfigError when the recipe's budget cannot be met on ``model`` (default: nothing)."""

    def prepare(self, model: nn.Module) -> None:
        """Run the analysis on ``model`` with ``self.train`` / ``self.valid``."""
        raise NotImplementedError

    def on_fit_start(self, model: nn.Module, train: tuple[Any, Any], valid: tuple[Any, Any]) -> None:
        """Keep the training and validation arrays for the analysis; check the budget before any work."""
        self.train, self.valid = train, valid
        if not self.is_prepared(model):
            self.check_budget(model)

    def on_epoch_start(self, model: nn.Module, epoch: int, total_epochs: int) -> None:
        if epoch != 0 or self.is_prepared(model):
            return
        if self.train is None or self.valid is None:
            method = f"the {self.recipe.method} method" if self.recipe is not None else "this method"
            raise ConfigError(
                f"{method} needs the training data before its first epoch: the trainer must call "
                "hooks.on_fit_start(model, train, valid) (or call its prepare() yourself)"
            )
        self.prepare(model)


_HOOKS: dict[type, Callable[[Recipe], MethodHooks]] = {}


def register_hooks(recipe_type: type) -> Callable[[type[MethodHooks]], type[MethodHooks]]:
    """Class decorator: use this hooks class for ``recipe_type``."""

    def decorate(cls: type[MethodHooks]) -> type[MethodHooks]:
        _HOOKS[recipe_type] = cls
        return cls

    return decorate


def hooks_for(recipe: Recipe) -> MethodHooks:
    """The hooks registered for the recipe's type, or the do-nothing defaults."""
    return _HOOKS.get(type(recipe), MethodHooks)(recipe)
