"""Run directories: train a recipe on a dataset into ``DIR``, and load it back.

A run directory holds ``metrics.json`` (the results), ``recipe.yaml`` (the recipe),
``run.json`` (dataset, seed, model spec, training settings), ``history.json`` (per-epoch log)
and ``checkpoint.pt`` (weights; also the resume point while training).

Float pretraining (``TrainConfig.pretrain_epochs > 0``): the FLOAT model (BatchNorms included) is
trained first, with plain cross-entropy and the same optimiser settings, keeping its best validation
epoch; it is then quantized (BNs folded into their convs with the trained statistics) and trained
with QAT for ``epochs``. The pretraining phase checkpoints to ``pretrain.pt`` after every epoch and,
once done, ``pretrain.pt`` holds the pretrained float weights (``finished: True``), written
atomically. ``--resume`` continues an unfinished pretraining from ``pretrain.pt``; after it finished,
resume reloads the pretrained weights from it instead of training again, quantizes, and the QAT phase
resumes from ``checkpoint.pt`` as usual. ``load_run`` needs neither (the finished checkpoint holds
the quantized model).

Example:
    >>> from mpqat.recipes import Uniform
    >>> metrics = train_run("breast-cancer", Uniform(w_bits=4, a_bits=4), "/tmp/mpqat-doc-run",
    ...                     config=TrainConfig(epochs=2, progress=False), force=True)  # doctest: +SKIP
    >>> load_run("/tmp/mpqat-doc-run").metrics["method"]  # doctest: +SKIP
    'uniform'
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mpqat import distributed
from mpqat.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from mpqat.cost import model_cost
from mpqat.errors import CheckpointError, ConfigError
from mpqat.methods import hooks_for
from mpqat.methods.base import MethodHooks
from mpqat.metrics import classification_metrics
from mpqat.models import build_model, model_spec
from mpqat.quantize import quantize
from mpqat.recipes import Recipe, recipe_from_dict
from mpqat.train import TrainConfig, config_dict, fit, predict_logits

RUN_FILES = ("metrics.json", "checkpoint.pt", "recipe.yaml", "run.json", "history.json", "pretrain.pt")
PRETRAIN_FILE = "pretrain.pt"


def _load_splits(dataset: str, target: str | None, seed: int, max_rows: int | None = None):
    from mpqat.data import load_dataset  # imported lazily: the data layer pulls in pandas

    return load_dataset(dataset, target=target, seed=seed, max_rows=max_rows)


@dataclass
class Run:
    """A trained run loaded from its directory; ``model`` is in eval mode."""

    path: Path
    model: nn.Module
    recipe: Recipe
    metrics: dict[str, Any]
    info: dict[str, Any]
    history: list[dict[str, Any]]

    def splits(self):
        """The dataset splits this run was trained on (same seed, same preprocessing)."""
        return _load_splits(self.info["dataset"], self.info.get("target"), self.info["seed"], self.info.get("max_rows"))


def fingerprint(info: dict[str, Any]) -> str:
    """Hash of everything that defines a run, to refuse resuming under different settings."""
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def _prepare_dir(out: Path, force: bool, resume: bool) -> None:
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not (force or resume):
        raise ConfigError(
            f"'{out}' already holds a run ({', '.join(existing)}): pass --resume to continue it, "
            "--force to overwrite it, or choose another --out"
        )
    if force and not resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def build_quantized(spec: dict[str, Any], recipe: Recipe) -> nn.Module:
    """Float model from ``spec``, quantized by ``recipe``."""
    return quantize(build_model(spec), recipe, inplace=True)


def _pretrain_info(info: dict[str, Any], pre_config: TrainConfig) -> dict[str, Any]:
    """What defines the pretrained float model: data, split, model and the pretraining settings (no recipe)."""
    keep = ("dataset", "target", "seed", "max_rows", "model_spec")
    return {**{k: info[k] for k in keep}, "pretrain": config_dict(pre_config)}


def pretrain_cache_path(cache_dir: str | Path, info: dict[str, Any], pre_config: TrainConfig) -> Path:
    """The file in ``cache_dir`` that holds the float model pretrained under ``info`` and ``pre_config``."""
    spec = info["model_spec"]
    name = f"{info['dataset']}-{spec.get('name', 'model')}-seed{info['seed']}-{fingerprint(_pretrain_info(info, pre_config))[:16]}.pt"
    return Path(cache_dir) / name


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (POSIX); elsewhere a no-op. Two benchmark workers that need
    the same pretrained model wait for one another instead of both training it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_cached_pretrain(path: Path, fp: str, net: nn.Module) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError:  # a corrupt cache entry is retrained (and replaced), never trusted
        return None
    if state.get("fingerprint") != fp or not state.get("finished"):
        return None
    net.load_state_dict(state["model"])
    return {**state["summary"], "pretrain_cached": True}


def pretrain_float(net: nn.Module, splits: Any, config: TrainConfig, out: Path, resume: bool,
                   info: dict[str, Any], cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Train the float ``net`` in place for ``config.pretrain_epochs`` (see the module docstring).

    ``cache_dir``: share the pretrained model between runs that differ only in their recipe (the
    benchmark harness uses ``OUT/pretrain-cache``): a finished pretraining with the same data, seed,
    model and pretraining settings is loaded from there instead of trained again.

    Returns ``{"pretrain_epochs", "pretrain_best_epoch", "pretrain_valid_accuracy", "pretrain_seconds"}``
    (plus ``"pretrain_cached": True`` when it came from the cache).
    """
    pre_config = dataclasses.replace(config, epochs=config.pretrain_epochs, pretrain_epochs=0,
                                     lr=config.pretrain_lr or config.lr, pretrain_lr=None)
    fp = fingerprint(_pretrain_info(info, pre_config)) + ":pretrain"
    cached = pretrain_cache_path(cache_dir, info, pre_config) if cache_dir is not None else None
    lock = _file_lock(cached.with_suffix(".lock")) if cached is not None else contextlib.nullcontext()
    with lock:
        if cached is not None and (summary := _load_cached_pretrain(cached, fp, net)) is not None:
            return summary
        summary = _pretrain_here(net, splits, pre_config, out / PRETRAIN_FILE, resume, fp)
        if cached is not None and distributed.context().is_main:
            shutil.copyfile(out / PRETRAIN_FILE, cached.with_suffix(".tmp"))
            os.replace(cached.with_suffix(".tmp"), cached)
    return summary


def _pretrain_here(net: nn.Module, splits: Any, pre_config: TrainConfig, path: Path, resume: bool,
                   fp: str) -> dict[str, Any]:
    if resume and path.exists():
        state = load_checkpoint(path)
        if state.get("fingerprint") != fp:
            raise CheckpointError(
                f"cannot resume '{path}': it was pretrained with different settings; use --force to start over"
            )
        if state.get("finished"):
            net.load_state_dict(state["model"])
            return dict(state["summary"])
    result = fit(net, (splits.X_train, splits.y_train), (splits.X_valid, splits.y_valid), pre_config, MethodHooks(),
                 checkpoint_path=path, resume=resume, fingerprint=fp)
    summary = {"pretrain_epochs": result.epochs_run, "pretrain_best_epoch": result.best_epoch,
               "pretrain_valid_accuracy": result.best_valid_accuracy, "pretrain_seconds": result.train_seconds}
    if distributed.context().is_main:
        save_checkpoint(path, {"fingerprint": fp, "finished": True, "summary": summary,
                               "model": {k: v.detach().clone() for k, v in net.state_dict().items()}})
    distributed.barrier()
    return summary


def train_run(
    dataset: str,
    recipe: Recipe,
    out: str | Path,
    model: str = "mlp",
    hidden: list[int] | None = None,
    config: TrainConfig | None = None,
    target: str | None = None,
    force: bool = False,
    resume: bool = False,
    max_rows: int | None = None,
    pretrain_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``recipe`` on ``dataset`` into the run directory ``out``; returns ``metrics.json``'s content.

    ``pretrain_cache``: a directory where the float pretraining (``config.pretrain_epochs``) is shared
    between runs of different recipes (see :func:`pretrain_float`).
    """
    out = Path(out)
    config = config or TrainConfig()
    ctx = distributed.context()  # under torchrun: only rank 0 writes files
    if ctx.is_main:
        _prepare_dir(out, force, resume)
    distributed.barrier()
    splits = _load_splits(dataset, target, config.seed, max_rows)
    spec = model_spec(model, splits.n_features, splits.n_classes, input_shape=getattr(splits, "input_shape", None),
                      hidden=hidden)
    info = {"dataset": dataset, "target": target, "seed": config.seed, "max_rows": max_rows,
            "model_spec": spec, "train": config_dict(config), "recipe": recipe.to_dict()}
    torch.manual_seed(config.seed)
    if ctx.is_main:
        atomic_write_text(out / "run.json", json.dumps(info, indent=2))
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists() and load_checkpoint(ckpt).get("finished"):
        raise ConfigError(f"the run in '{out}' has already finished; see {out / 'metrics.json'}")
    pretrain: dict[str, Any] = {}
    if config.pretrain_epochs > 0:
        float_net = build_model(spec)
        pretrain = pretrain_float(float_net, splits, config, out, resume, info, pretrain_cache)
        # the same random state after a cached or a fresh pretraining, so both give the same run
        torch.manual_seed(config.seed + 1)
        net = quantize(float_net, recipe, inplace=True)
    else:
        net = build_quantized(spec, recipe)
    hooks = hooks_for(recipe)
    result = fit(net, (splits.X_train, splits.y_train), (splits.X_valid, splits.y_valid), config, hooks,
                 checkpoint_path=ckpt, resume=resume, fingerprint=fingerprint(info))
    t0 = time.perf_counter()
    logits = predict_logits(net, splits.X_test)
    infer_seconds = time.perf_counter() - t0
    cost = model_cost(net)
    metrics: dict[str, Any] = {
        "dataset": dataset, "method": recipe.method, "model": model, "seed": config.seed,
        **classification_metrics(logits, splits.y_test),
        "valid_accuracy": result.best_valid_accuracy,
        **cost.summary(),
        "train_seconds": result.train_seconds, "test_infer_seconds": infer_seconds,
        "epochs": result.epochs_run, "best_epoch": result.best_epoch,
        "resumed_from_epoch": result.resumed_from_epoch,
        "n_train": len(splits.y_train), "n_test": len(splits.y_test),
        "world_size": result.world_size, "rank_divergence": result.rank_divergence,
        "hidden": spec.get("hidden"), "recipe": recipe.to_dict(), **pretrain,
        "bit_histograms": cost.bit_histograms(),
        **hooks.final_metrics(net),
    }
    if ctx.is_main:
        save_checkpoint(ckpt, {"fingerprint": fingerprint(info), "finished": True, "model": net.state_dict(),
                               "epoch": result.epochs_run, "info": info})
        atomic_write_text(out / "history.json", json.dumps(result.history, indent=2))
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    distributed.barrier()
    return metrics


def load_run(path: str | Path) -> Run:
    """Load a finished run directory: the model (eval mode), recipe, metrics and history."""
    path = Path(path)
    if not (path / "run.json").is_file():
        raise CheckpointError(f"'{path}' is not an mpqat run directory (no run.json): train one with 'mpqat train --out {path}'")
    try:
        info = json.loads((path / "run.json").read_text())
        recipe = recipe_from_dict(info["recipe"])
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"'{path / 'run.json'}' is corrupt ({exc}); train the run again") from None
    state = load_checkpoint(path / "checkpoint.pt")
    if not state.get("finished"):
        raise CheckpointError(f"the run in '{path}' has not finished: continue it with 'mpqat train ... --out {path} --resume'")
    model = build_quantized(info["model_spec"], recipe)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint in '{path}' does not match its recipe/model: {str(exc).splitlines()[0]}") from None
    model.eval()
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").exists() else {}
    history = json.loads((path / "history.json").read_text()) if (path / "history.json").exists() else []
    return Run(path, model, recipe, metrics, info, history)
