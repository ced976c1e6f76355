"""Episodic (in-context) QAT fine-tuning of a quantized TabPFN v1 on one dataset's training split.

A TabPFN is trained on *episodes*, not on rows: an episode is a random set of context rows with
labels and query rows whose labels the model must predict; the loss is the cross-entropy on the
query rows. :func:`finetune` samples episodes from the training split (context and query rows
disjoint), preprocesses each like one in-context ensemble member (random feature rotation,
class relabelling and ``none``/``power`` transform, see :mod:`mpqat.tabpfn.incontext`) and takes
one optimizer step per episode. The quantization method plugs in through the same hooks as
:func:`mpqat.fit` (``mpqat.methods.hooks_for(recipe)``): optimizer groups, the NMP strength update
after every step, temperature/regularizer schedules per *block* of episodes, the cost term.

Every ``eval_every`` episodes (and once before the first step, right after the quantizers were
calibrated on the first episode) the model is scored in-context on the validation split; the best
state is kept (early stopping by validation accuracy, as :func:`mpqat.fit` does).

Example:
    >>> import numpy as np
    >>> from mpqat.recipes import Uniform
    >>> from mpqat.tabpfn.model import TabPFN, TabPFNConfig
    >>> from mpqat.tabpfn.quant import quantize_tabpfn
    >>> rng = np.random.default_rng(0)
    >>> X, y = rng.normal(size=(80, 5)).astype("float32"), (np.arange(80) % 2)
    >>> q = quantize_tabpfn(TabPFN(TabPFNConfig.tiny()), Uniform(w_bits=4, a_bits=8))
    >>> res = finetune(q, Uniform(w_bits=4, a_bits=8), (X[:60], y[:60]), (X[60:], y[60:]),
    ...                FinetuneConfig(episodes=2, n_ctx=20, n_query=10, eval_every=1, progress=False))
    >>> len(res.history)
    3
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mpqat.cost import model_cost
from mpqat.errors import ConfigError, DatasetError
from mpqat.methods import hooks_for
from mpqat.recipes import Recipe
from mpqat.tabpfn.incontext import TRANSFORMS, InContextClassifier, Member, member_inputs, preprocess


@dataclass(frozen=True)
class FinetuneConfig:
    """Episodes, their sizes, the optimizer and the validation schedule of :func:`finetune`."""

    episodes: int = 30
    n_ctx: int = 512
    n_query: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 10
    eval_context: int = 1000
    eval_rows: int | None = 600
    eval_ensemble: int = 1
    seed: int = 0
    transforms: tuple[str, ...] = TRANSFORMS
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("episodes", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
        for name in ("n_ctx", "n_query", "eval_context", "eval_ensemble"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.n_ctx > 1000 or self.eval_context > 1000:
            raise ConfigError("TabPFN v1 takes at most 1000 context rows (n_ctx, eval_context)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr!r} must be a positive number")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: per-block history, the chosen block, timings."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_valid_accuracy: float = float("nan")
    best_episode: int = 0
    train_seconds: float = 0.0
    seconds_per_episode: float = 0.0
    final_metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EpisodeSampler:
    """Random episodes from ``(X, y)`` (labels ``0..n_classes-1``), preprocessed and padded.

    ``sample()`` -> ``(x [1, n_ctx + n_query, n_features], y_ctx [1, n_ctx] float, y_query [1, n_query] long)``.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, n_ctx: int, n_query: int, n_classes: int,
                 n_features: int = 100, seed: int = 0, transforms: tuple[str, ...] = TRANSFORMS) -> None:
        self.X, self.y = np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.int64)
        if len(self.X) < 4:
            raise DatasetError(f"episodic fine-tuning needs at least 4 training rows, got {len(self.X)}")
        n_query = min(n_query, max(1, len(self.X) // 4))
        self.n_ctx, self.n_query = min(n_ctx, len(self.X) - n_query), n_query
        self.n_classes, self.n_features = n_classes, n_features
        self.transforms = transforms
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.rng.permutation(len(self.X))[: self.n_ctx + self.n_query]
        ctx, qry = rows[: self.n_ctx], rows[self.n_ctx :]
        prepped = preprocess(self.X[ctx], self.X[qry], str(self.rng.choice(self.transforms)), self.n_features)
        member = Member(int(self.rng.integers(self.n_classes)), int(self.rng.integers(prepped.shape[1])), "none")
        x, y_ctx = member_inputs(prepped, self.y[ctx], member, self.n_classes, self.n_features)
        y_query = (self.y[qry] + member.class_shift) % self.n_classes
        return (torch.from_numpy(x)[None], torch.from_numpy(y_ctx)[None], torch.from_numpy(y_query)[None])


def episode_loss(model: nn.Module, x: torch.Tensor, y_ctx: torch.Tensor, y_query: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Cross-entropy of the query rows over the first ``n_classes`` logits, weighted by the
    checkpoint's training-loss class weights (``model.loss_weight``)."""
    logits = model(x, y_ctx)[..., :n_classes].float()
    weight = getattr(model, "loss_weight", None)
    weight = weight[:n_classes].float() if isinstance(weight, torch.Tensor) else None
    return F.cross_entropy(logits.reshape(-1, n_classes), y_query.reshape(-1), weight=weight)


def incontext_accuracy(model: nn.Module, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                       n_ensemble: int = 1, max_context: int = 1000, seed: int = 0, rows: int | None = None) -> float:
    """In-context accuracy of ``model`` on ``test`` (at most ``rows`` rows, stratified) with ``train`` as context."""
    X, y = test
    if rows is not None and len(y) > rows:
        from mpqat.tabpfn.incontext import stratified_context

        keep = stratified_context(np.asarray(y), rows, seed + 1)
        X, y = X[keep], y[keep]
    clf = InContextClassifier(model, n_ensemble=n_ensemble, max_context=max_context, seed=seed).fit(*train)
    return clf.score(X, y)


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(f"mpqat tabpfn: {message}", file=sys.stderr, flush=True)


def finetune(model: nn.Module, recipe: Recipe, train: tuple[np.ndarray, np.ndarray],
             valid: tuple[np.ndarray, np.ndarray], config: FinetuneConfig | None = None) -> FinetuneResult:
    """QAT-fine-tune ``model`` (quantized by ``recipe``) in place on episodes from ``train``.

    Labels must be ``0..K-1``. Leaves the model in eval mode with its best-validation state.
    ``episodes=0`` only calibrates the quantizers on one episode (post-training quantization) and
    scores the validation split.
    """
    cfg = config or FinetuneConfig()
    X_train, y_train = np.asarray(train[0], dtype=np.float32), np.asarray(train[1], dtype=np.int64)
    n_classes = int(y_train.max()) + 1
    n_features = model.config.n_features if hasattr(model, "config") else 100
    sampler = EpisodeSampler(X_train, y_train, cfg.n_ctx, cfg.n_query, n_classes, n_features, cfg.seed, cfg.transforms)
    hooks = hooks_for(recipe)
    torch.manual_seed(cfg.seed)
    groups = [g for g in hooks.param_groups(model, cfg.lr, cfg.weight_decay) if g["params"]]
    optimizer = torch.optim.Adam(groups, lr=cfg.lr)
    hooks.on_fit_start(model, (X_train, y_train), valid)
    result = FinetuneResult()

    def score(episode: int, losses: list[float], start: float) -> None:
        acc = incontext_accuracy(model, (X_train, y_train), valid, cfg.eval_ensemble, cfg.eval_context, cfg.seed, cfg.eval_rows)
        cost = model_cost(model)
        entry = {"episode": episode, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                 "valid_accuracy": acc, "seconds": time.perf_counter() - start,
                 "avg_weight_bits": cost.avg_weight_bits, "avg_act_bits": cost.avg_act_bits}
        entry.update(hooks.epoch_log(model))
        result.history.append(entry)
        _log(cfg.progress, f"episode {episode}/{cfg.episodes}: loss {entry['train_loss']:.4f}, valid acc {acc:.4f}, "
                           f"bits w {entry.get('avg_weight_bits', 32):.2f} / a {entry.get('avg_act_bits', 32):.2f}")
        if acc > result.best_valid_accuracy or math.isnan(result.best_valid_accuracy):
            result.best_valid_accuracy, result.best_episode = acc, episode
            nonlocal best_state
            best_state = copy.deepcopy(model.state_dict())

    best_state: dict[str, Any] | None = None
    start = time.perf_counter()
    model.train()
    n_blocks = max(1, math.ceil(cfg.episodes / cfg.eval_every)) if cfg.eval_every else 1
    hooks.on_epoch_start(model, 0, n_blocks)
    x, y_ctx, y_q = sampler.sample()
    with torch.no_grad():  # calibrate every quantizer (scales, clips) on the first episode
        model(x, y_ctx)
    score(0, [], start)
    losses: list[float] = []
    step_start = time.perf_counter()
    for episode in range(1, cfg.episodes + 1):
        block = (episode - 1) // cfg.eval_every if cfg.eval_every else 0
        if cfg.eval_every and (episode - 1) % cfg.eval_every == 0 and episode > 1:
            hooks.on_epoch_start(model, block, n_blocks)
        model.train()
        x, y_ctx, y_q = sampler.sample()
        loss = episode_loss(model, x, y_ctx, y_q, n_classes)
        extra = hooks.extra_loss(model, block, episode)
        if extra is not None:
            loss = loss + extra
        if not torch.isfinite(loss):
            raise ConfigError(f"the fine-tuning loss became {float(loss)} at episode {episode}: lower lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        hooks.after_step(model)
        losses.append(float(loss.detach()))
        if (cfg.eval_every and episode % cfg.eval_every == 0) or episode == cfg.episodes:
            result.train_seconds += time.perf_counter() - step_start
            score(episode, losses, start)
            losses = []
            step_start = time.perf_counter()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.final_metrics = hooks.final_metrics(model)
    result.seconds_per_episode = result.train_seconds / cfg.episodes if cfg.episodes else 0.0
    return result
