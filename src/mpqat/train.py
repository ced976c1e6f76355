"""The trainer: one loop for every method, with checkpoints, resume and early stopping.

Methods plug in through :class:`mpqat.methods.MethodHooks`. The loop is deterministic on CPU for
a given seed: batches are shuffled by a generator seeded from ``(seed, epoch)`` and the global RNG
state (dropout) is saved in every checkpoint, so a killed run resumed with ``resume=True`` ends
with the same weights and metrics as an uninterrupted one.

Example:
    >>> import numpy as np, torch
    >>> from mpqat.models import MLP
    >>> X = np.random.default_rng(0).normal(size=(64, 4)).astype("float32"); y = (X[:, 0] > 0).astype("int64")
    >>> result = fit(MLP(4, 2, hidden=(8,)), (X, y), (X, y), TrainConfig(epochs=2, progress=False))
    >>> len(result.history)
    2
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from mpqat import distributed
from mpqat.checkpoint import load_checkpoint, save_checkpoint
from mpqat.errors import CheckpointError, ConfigError
from mpqat.methods.base import MethodHooks
from mpqat.optim import make_optimizer

ArrayPair = tuple[np.ndarray, np.ndarray]
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at global ``step`` of ``total_steps``.

    Example:
        >>> lr_factor("cosine", 0, 100), lr_factor("cosine", 50, 100), lr_factor("constant", 99, 100)
        (1.0, 0.5, 1.0)
    """
    if schedule == "constant" or total_steps <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


@dataclass
class TrainConfig:
    """Optimisation settings shared by every method."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    patience: int = 10
    seed: int = 0
    progress: bool = True
    #: epochs of FLOAT training (with BatchNorm) before the model is quantized (BN folded) and trained
    #: with QAT for ``epochs`` epochs; see :func:`mpqat.runs.train_run`. 0: start from random weights.
    pretrain_epochs: int = 0
    #: learning rate of the float pretraining phase (None: ``lr``); QAT usually wants a lower lr
    #: than training from scratch, so ``lr`` is the QAT phase's.
    pretrain_lr: float | None = None
    #: ``"constant"``, or ``"cosine"``: the lr of every parameter group decays per step as
    #: ``0.5 * (1 + cos(pi * t / T))`` over the ``epochs`` of the phase (pretraining has its own).
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.patience < 1:
            raise ConfigError("epochs must be >= 0, batch_size >= 1 and patience >= 1")
        if isinstance(self.pretrain_epochs, bool) or not isinstance(self.pretrain_epochs, int) or self.pretrain_epochs < 0:
            raise ConfigError(f"pretrain_epochs must be an integer >= 0, got {self.pretrain_epochs!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.pretrain_lr is not None and not (self.pretrain_lr > 0 and math.isfinite(self.pretrain_lr)):
            raise ConfigError(f"pretrain_lr must be a positive number, got {self.pretrain_lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule '{self.lr_schedule}': choose {' or '.join(LR_SCHEDULES)}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"unknown optimizer '{self.optimizer}': choose adam, adamw or sgd")


@dataclass
class FitResult:
    """What :func:`fit` hands back; the model holds the best validation weights."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_valid_accuracy: float = float("nan")
    train_seconds: float = 0.0
    epochs_run: int = 0
    resumed_from_epoch: int = 0
    world_size: int = 1
    #: largest difference of the model state between ranks at the end (0.0: identical everywhere)
    rank_divergence: float = 0.0


def _make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    return make_optimizer(groups, config.optimizer, config.lr)


@torch.no_grad()
def predict_logits(model: nn.Module, X: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Logits of ``model`` in eval mode on ``X`` (float64 numpy array).

    ``batch_size`` defaults to the model's ``eval_batch_size`` attribute, else 4096 (CNNs use smaller
    batches: their exact float64 path on large activation maps is much faster in small chunks).
    """
    batch_size = int(batch_size or getattr(model, "eval_batch_size", 4096))
    model.eval()
    outs = [model(torch.from_numpy(X[i : i + batch_size])).double() for i in range(0, len(X), batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0))


def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``(X, y)`` in eval mode."""
    logits = predict_logits(model, X)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
    return {"loss": loss, "accuracy": float((logits.argmax(1) == y).mean())}


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(
    model: nn.Module,
    train: ArrayPair,
    valid: ArrayPair,
    config: TrainConfig,
    hooks: MethodHooks | None = None,
    checkpoint_path: Path | None = None,
    resume: bool = False,
    fingerprint: str = "",
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train ``model`` in place; keep the weights of the best validation epoch.

    ``checkpoint_path``: written atomically after every epoch (by rank 0 only when distributed).
    ``resume``: continue from it (its ``fingerprint`` must match, so a run is never resumed under a
    different recipe). Under ``torchrun`` the global batch ``config.batch_size`` is split over the
    ranks; see :mod:`mpqat.distributed` for what is kept in sync and how.
    """
    hooks = hooks or MethodHooks()
    ctx = distributed.context()
    X_train, y_train = train
    _check_finite(X_train, "training features")
    hooks.on_fit_start(model, train, valid)
    optimizer = _make_optimizer(hooks.param_groups(model, config.lr, config.weight_decay), config)
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # before a resumed state overwrites them
    result = FitResult()
    best_state = _cpu_state(model)
    best_score, bad_epochs, start_epoch, elapsed = -math.inf, 0, 0, 0.0

    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        state = load_checkpoint(checkpoint_path)
        if state.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"cannot resume '{checkpoint_path}': it was trained with a different recipe, model, data or "
                "training settings; use --force to start over, or a new --out directory"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best_state, best_score = state["best_state"], state["best_score"]
        bad_epochs, start_epoch, elapsed = state["bad_epochs"], state["epoch"], state["elapsed"]
        result.history = list(state["history"])
        result.best_epoch = state["best_epoch"]
        result.resumed_from_epoch = start_epoch
        torch.set_rng_state(state["rng"])
        if state.get("stopped"):
            start_epoch = config.epochs  # early stopping had already ended this run

    n = len(X_train)
    steps_per_epoch = -(-n // config.batch_size)
    X_t, y_t = torch.from_numpy(X_train), torch.from_numpy(y_train)
    if ctx.active:
        torch.manual_seed(config.seed + 1000 * ctx.rank)  # dropout masks differ per rank (see mpqat.distributed)
    ddp: nn.Module | None = None
    # disable=None: a progress bar on a terminal, none in logs and pipes
    show = config.progress and ctx.is_main
    bar = tqdm(range(start_epoch, config.epochs), desc="train", disable=None if show else True, unit="epoch",
               initial=start_epoch, total=config.epochs, leave=False)
    stopped = False
    for epoch in bar:
        t0 = time.perf_counter()
        hooks.on_epoch_start(model, epoch, config.epochs)
        model.train()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator)
        total_loss, steps = 0.0, 0
        for step, start in enumerate(range(0, n, config.batch_size)):
            idx = order[start : start + config.batch_size]
            if ctx.active:
                if ddp is None:  # first step: quantizer scales from the global batch, then DDP
                    distributed.calibrate_quantizers(model, X_t[idx])
                    ddp = distributed.wrap(model, ctx)
                local = distributed.shard_indices(idx, ctx.rank, ctx.world_size)
                logits = ddp(X_t[local])
                # DDP averages gradients over ranks: weight each rank's mean loss by its share of
                # the global batch, so the update is that of the mean loss over the global batch
                task = (F.cross_entropy(logits, y_t[local], reduction="sum") * (ctx.world_size / len(idx))
                        if len(local) else logits.sum() * 0.0)
            else:
                logits = model(X_t[idx])
                task = F.cross_entropy(logits, y_t[idx])
            if config.lr_schedule != "constant":
                factor = lr_factor(config.lr_schedule, epoch * steps_per_epoch + step, config.epochs * steps_per_epoch)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
            extra = hooks.extra_loss(model, epoch, step)
            loss = task if extra is None else task + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hooks.after_step(model)
            if ctx.active:
                distributed.sync_buffers(model)
            total_loss += float(loss.detach())
            steps += 1
        if ctx.active:  # the logged loss is the global batch's, as in a single process
            total_loss = float(distributed.all_reduce_(torch.tensor([total_loss], dtype=torch.float64), "mean"))
        if not math.isfinite(total_loss):
            raise ConfigError(
                f"training diverged at epoch {epoch + 1} (loss is {total_loss}); lower --lr or check the data"
            )
        valid_metrics = evaluate(model, *valid)
        elapsed += time.perf_counter() - t0
        row = {"epoch": epoch + 1, "train_loss": total_loss / max(steps, 1),
               "valid_loss": valid_metrics["loss"], "valid_accuracy": valid_metrics["accuracy"],
               **hooks.epoch_log(model)}
        result.history.append(row)
        if valid_metrics["accuracy"] > best_score:
            best_score, best_state, bad_epochs, result.best_epoch = valid_metrics["accuracy"], _cpu_state(model), 0, epoch + 1
        else:
            bad_epochs += 1
        stopped = bad_epochs >= config.patience
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", valid=f"{row['valid_accuracy']:.4f}")
        if checkpoint_path is not None and ctx.is_main:
            state = {
                "fingerprint": fingerprint, "epoch": epoch + 1, "model": _cpu_state(model),
                "optimizer": optimizer.state_dict(), "best_state": best_state, "best_score": best_score,
                "best_epoch": result.best_epoch, "bad_epochs": bad_epochs, "history": result.history,
                "rng": torch.get_rng_state(), "elapsed": elapsed, "stopped": stopped, "finished": False,
            }
            save_checkpoint(checkpoint_path, state)
            if on_checkpoint is not None:
                on_checkpoint(state)
        distributed.barrier()  # the other ranks wait until rank 0 has written the checkpoint
        if stopped:
            break
    bar.close()
    model.load_state_dict(best_state)
    result.best_valid_accuracy = best_score
    result.train_seconds = elapsed
    result.epochs_run = len(result.history)
    result.world_size = ctx.world_size
    result.rank_divergence = distributed.check_in_sync(model, tolerance=math.inf)
    return result


def _check_finite(X: np.ndarray, what: str) -> None:
    if not np.isfinite(X).all():
        raise ConfigError(f"the {what} contain NaN or inf values; impute or drop them before training")


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """The settings that define a run (progress display excluded; ``pretrain_epochs``, ``pretrain_lr``
    and ``lr_schedule`` only when not at their defaults, so that older runs keep their fingerprints)."""
    defaults = {"pretrain_epochs": 0, "pretrain_lr": None, "lr_schedule": "constant"}
    return {k: v for k, v in asdict(config).items()
            if k != "progress" and not (k in defaults and v == defaults[k])}
