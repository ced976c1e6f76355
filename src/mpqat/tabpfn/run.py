"""``mpqat train --model tabpfn-v1``: evaluate or QAT-fine-tune TabPFN v1 on a dataset into a run folder.

One function, :func:`train_tabpfn_run`, used by the CLI and the benchmark script:

1. load the dataset's seeded splits (:func:`mpqat.data.load_dataset`) and turn one-hot groups
   back into ordinal codes (:class:`~mpqat.tabpfn.incontext.OrdinalFromOneHot`);
2. load the pretrained checkpoint (``mpqat data fetch tabpfn-v1`` first);
3. quantize it (:func:`~mpqat.tabpfn.quant.quantize_tabpfn`; FP32 leaves it as it is);
4. fine-tune it on ``episodes`` episodes of the training split
   (:func:`~mpqat.tabpfn.finetune.finetune`); with ``episodes=0`` a quantized model is only
   calibrated on one episode (post-training quantization) and FP32 is the pretrained model as is;
5. score it in-context on the test split (context: at most 1000 training rows), pack a quantized
   model into ``OUT/model.safetensors`` (:func:`~mpqat.tabpfn.pack.save_packed`) and write
   ``metrics.json``, ``history.json``, ``recipe.yaml`` and ``run.json``.

The run folder has no ``checkpoint.pt``: ``mpqat eval``/``mpqat export`` (MLP runs) do not apply;
:func:`~mpqat.tabpfn.pack.load_packed` reads the packed model back.

:data:`RECIPE_DEFAULTS` are the recipe fields the CLI sets for TabPFN unless the user gives them
(``--set``/``--config``), and :data:`FINETUNE_LR` replaces the MLP learning rate when ``--lr`` is
not given. Why each value: ``docs/tabpfn.md``.

Example::

    >>> m = train_tabpfn_run("breast-cancer", FP32(), "runs/tabpfn-bc", episodes=0)   # doctest: +SKIP
    >>> round(m["test_accuracy"], 3)                                                   # doctest: +SKIP
    0.965
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mpqat.checkpoint import atomic_write_text
from mpqat.cost import model_cost
from mpqat.errors import ConfigError
from mpqat.metrics import classification_metrics
from mpqat.recipes import FP32, Recipe
from mpqat.tabpfn.fetch import SIZE as CHECKPOINT_BYTES
from mpqat.tabpfn.finetune import FinetuneConfig, finetune
from mpqat.tabpfn.incontext import InContextClassifier, OrdinalFromOneHot
from mpqat.tabpfn.model import load_tabpfn, n_parameters
from mpqat.tabpfn.pack import save_packed
from mpqat.tabpfn.quant import float_parameter_count, quantize_tabpfn

MODEL_NAME = "tabpfn-v1"
FINETUNE_LR = 1e-5

#: Recipe fields used for TabPFN unless given explicitly ([ours]; docs/tabpfn.md explains them):
#: NMP starts its weights at 2 bits (the paper's 1-bit start leaves the pretrained model at the
#: majority class for the few dozen episodes this CPU affords) and moves strengths ~0.03 per step
#: (lr 1e-5 x 3000); uniform baselines use per-feature activation steps like NMP's per-feature clips.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "nmp": {"w_init_strength": 0.35, "strength_lr_mult": 3000.0},
    "uniform": {"per_feature_act": True},
}
RUN_FILES = ("metrics.json", "history.json", "recipe.yaml", "run.json", "model.safetensors")


def tabpfn_recipe_overrides(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """:data:`RECIPE_DEFAULTS` of ``method`` with the user's ``given`` fields on top."""
    return {**RECIPE_DEFAULTS.get(method, {}), **given}


def _prepare(out: Path, force: bool) -> None:
    existing = [n for n in RUN_FILES + ("checkpoint.pt",) if (out / n).exists()]
    if existing and not force:
        raise ConfigError(f"'{out}' already holds a run ({', '.join(existing)}): pass --force to overwrite it, or choose another --out")
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def train_tabpfn_run(dataset: str, recipe: Recipe, out: str | Path, episodes: int = 30, lr: float = FINETUNE_LR,
                     seed: int = 0, activations: bool = True, n_ensemble: int = 2, max_context: int = 1000,
                     target: str | None = None, max_rows: int | None = None, force: bool = False,
                     progress: bool = True, finetune_config: FinetuneConfig | None = None,
                     checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Evaluate / fine-tune TabPFN v1 on ``dataset`` into the run folder ``out``; returns ``metrics.json``."""
    from mpqat.data import load_dataset

    out = Path(out)
    _prepare(out, force)
    splits = load_dataset(dataset, target=target, seed=seed, max_rows=max_rows)
    enc = OrdinalFromOneHot(splits.feature_names)
    train = (enc.transform(splits.X_train), splits.y_train)
    valid = (enc.transform(splits.X_valid), splits.y_valid)
    X_test, y_test = enc.transform(splits.X_test), splits.y_test
    torch.manual_seed(seed)
    base = load_tabpfn(checkpoint)
    n_params = n_parameters(base)
    model = quantize_tabpfn(base, recipe, activations=activations)
    del base
    cfg = finetune_config or FinetuneConfig(episodes=episodes, lr=lr, seed=seed, eval_context=max_context, progress=progress)
    info = {"dataset": dataset, "target": target, "seed": seed, "max_rows": max_rows, "model": MODEL_NAME,
            "activations": "float" if isinstance(recipe, FP32) else ("weights+activations" if activations else "weights-only"),
            "n_ensemble": n_ensemble, "max_context": max_context, "finetune": {k: v for k, v in cfg.__dict__.items()},
            "recipe": recipe.to_dict(), "features_in": len(enc.feature_names)}
    atomic_write_text(out / "run.json", json.dumps(info, indent=2, default=list))
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    history: list[dict[str, Any]] = []
    result = None
    if not isinstance(recipe, FP32) or cfg.episodes > 0:
        result = finetune(model, recipe, train, valid, cfg)
        history = result.history
    model.eval()
    t0 = time.perf_counter()
    clf = InContextClassifier(model, n_ensemble=n_ensemble, max_context=max_context, seed=seed).fit(*train)
    logp = clf.predict_logits(X_test)
    infer_seconds = time.perf_counter() - t0
    cost = model_cost(model)
    metrics: dict[str, Any] = {
        "dataset": dataset, "model": MODEL_NAME, "method": recipe.method, "seed": seed,
        "activations": info["activations"],
        **classification_metrics(logp, np.searchsorted(clf.classes_, y_test)),
        "valid_accuracy": result.best_valid_accuracy if result else None,
        **cost.summary(),
        "n_parameters": n_params,
        "checkpoint_bytes": CHECKPOINT_BYTES,
        "episodes": cfg.episodes if result else 0, "best_episode": result.best_episode if result else 0,
        "train_seconds": result.train_seconds if result else 0.0,
        "seconds_per_episode": result.seconds_per_episode if result else 0.0,
        "test_infer_seconds": infer_seconds, "n_context": len(clf.X_ctx), "n_test": len(y_test),
        "n_ensemble": n_ensemble, "recipe": recipe.to_dict(), "bit_histograms": cost.bit_histograms(),
    }
    if result is not None:
        metrics.update(result.final_metrics)
    if not isinstance(recipe, FP32):
        sizes = save_packed(model, out / "model.safetensors")
        metrics["packed"] = sizes
        metrics["packed_file_bytes"] = sizes["file_bytes"]
        metrics["float_params"] = float_parameter_count(model)
    atomic_write_text(out / "history.json", json.dumps(history, indent=2))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    return metrics


def summary_line(m: dict[str, Any]) -> str:
    """One line for the CLI: accuracy, bits, sizes against the 103 MB checkpoint."""
    line = (f"{m['dataset']} tabpfn-v1 {m['method']} ({m['activations']}): test accuracy {m['test_accuracy']:.4f}, "
            f"avg bits w {m['avg_weight_bits']:.2f} / a {m['avg_act_bits']:.2f}")
    if "packed_file_bytes" in m:
        line += (f", packed file {m['packed_file_bytes'] / 1e6:.2f} MB "
                 f"({m['packed_file_bytes'] / m['checkpoint_bytes']:.1%} of the {m['checkpoint_bytes'] / 1e6:.1f} MB checkpoint)")
    return line
