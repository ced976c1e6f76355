"""Shared machinery of the peer adapters: input checks, a PyTorch training loop, step timing and cost.

The training loop mirrors :func:`mpqat.train.fit` (Adam, batches shuffled by a generator seeded
from ``(seed, epoch)``, validation accuracy after every epoch, early stopping on a strict
improvement with ``patience`` epochs, the best epoch's weights restored) and in addition times
every optimisation step, so that ``step_seconds`` is measured the same way for every peer.

The cost helpers apply the definitions of :mod:`mpqat.cost` (the same constants, the same
per-layer formulas and the same aggregation as :func:`mpqat.cost.model_cost`) to bit-widths read
from a peer's trained parameters, which may be per layer, per neuron or per weight.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mpqat.cost import (
    BIAS_BITS,
    ENERGY_INT32_ADD_PJ,
    ENERGY_INT_MULT_8x8_PJ,
    ENERGY_SRAM_PJ_PER_BIT,
    EXPONENT_BITS,
    SCALE_BITS,
    WIDTH_CODE_BITS,
    CostReport,
    LayerCost,
    aggregate_costs,
    fp32_energy,
)
from mpqat.errors import ConfigError


# --------------------------------------------------------------------------------------------- data
@dataclass
class Splits:
    """The three splits, checked and converted (float32 features, int64 labels)."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_valid: np.ndarray
    y_valid: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])


def check_splits(X_train, y_train, X_valid, y_valid, X_test, y_test) -> Splits:
    """Convert the six arrays and raise :class:`ConfigError` when they do not fit together."""
    arrays = {}
    for split, X, y in (("train", X_train, y_train), ("valid", X_valid, y_valid), ("test", X_test, y_test)):
        X = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
        y = np.asarray(y)
        if X.ndim != 2 or y.ndim != 1 or len(X) != len(y) or len(X) == 0:
            raise ConfigError(
                f"peer data: X_{split} must be 2-D and y_{split} 1-D with the same non-zero number of rows, "
                f"got {X.shape} and {y.shape}"
            )
        if not np.isfinite(X).all():
            raise ConfigError(f"peer data: X_{split} contains NaN or inf; impute or drop them first")
        if not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
            raise ConfigError(f"peer data: y_{split} must hold integer class labels 0..K-1")
        arrays[split] = (X, np.ascontiguousarray(y.astype(np.int64)))
    widths = {X.shape[1] for X, _ in arrays.values()}
    if len(widths) != 1:
        raise ConfigError(f"peer data: the splits have different numbers of features {sorted(widths)}")
    n_classes = int(max(int(y.max()) for _, y in arrays.values()) + 1)
    if n_classes < 2:
        raise ConfigError("peer data: at least two classes are needed")
    return Splits(*arrays["train"], *arrays["valid"], *arrays["test"], n_classes=n_classes)


def check_hidden(hidden: Sequence[int], epochs: int, batch_size: int, lr: float, patience: int) -> tuple[int, ...]:
    """Validate the shared settings; returns ``hidden`` as a tuple."""
    hidden = tuple(int(h) for h in hidden)
    if any(h < 1 for h in hidden):
        raise ConfigError(f"hidden widths must be positive, got {hidden}")
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ConfigError("epochs, batch_size and patience must be >= 1")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr}")
    return hidden


def reject_unknown(options: dict[str, Any], known: set[str], peer: str) -> None:
    """Raise :class:`ConfigError` for options that ``peer`` does not understand."""
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for peer '{peer}': valid are {', '.join(sorted(known))}"
        )


def median_step(times: list[float], sizes: list[int], batch_size: int) -> float:
    """Median wall time of the steps that ran on a full batch (all steps when none did)."""
    full = [t for t, s in zip(times, sizes, strict=True) if s == batch_size]
    chosen = full or times
    return float(statistics.median(chosen)) if chosen else float("nan")


# ------------------------------------------------------------------------------------- torch loop
@dataclass
class TorchFit:
    """What :func:`fit_torch` hands back; the model then holds the best validation weights."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_valid_accuracy: float = float("nan")
    epochs_run: int = 0
    train_seconds: float = 0.0
    step_seconds: float = float("nan")


@torch.no_grad()
def torch_accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray, batch_size: int = 4096) -> float:
    """Accuracy of ``model`` in eval mode."""
    model.eval()
    preds = [model(torch.from_numpy(X[i : i + batch_size])).argmax(1) for i in range(0, len(X), batch_size)]
    return float((torch.cat(preds).numpy() == y).mean())


def fit_torch(
    model: nn.Module,
    data: Splits,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    patience: int,
    param_groups: list[dict[str, Any]] | None = None,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    epoch_log: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> TorchFit:
    """Train ``model`` with Adam as :func:`mpqat.train.fit` does, timing every step."""
    optimizer = torch.optim.Adam(param_groups if param_groups is not None else model.parameters(), lr=lr)
    X_t, y_t = torch.from_numpy(data.X_train), torch.from_numpy(data.y_train)
    n = len(X_t)
    result = TorchFit()
    best_state = copy.deepcopy(model.state_dict())
    best_score, bad_epochs = -math.inf, 0
    times: list[float] = []
    sizes: list[int] = []
    elapsed = 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        total, steps = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = X_t[idx], y_t[idx]
            s0 = time.perf_counter()
            loss = F.cross_entropy(model(xb), yb)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - s0)
            sizes.append(len(idx))
            total += float(loss.detach())
            steps += 1
        if not math.isfinite(total):
            raise ConfigError(f"peer training diverged at epoch {epoch + 1} (loss {total}); lower lr")
        valid_acc = torch_accuracy(model, data.X_valid, data.y_valid)
        elapsed += time.perf_counter() - t0
        row = {"epoch": epoch + 1, "train_loss": total / max(steps, 1), "valid_accuracy": valid_acc}
        if epoch_log is not None:
            row.update(epoch_log(model))
        result.history.append(row)
        if valid_acc > best_score:
            best_score, bad_epochs, result.best_epoch = valid_acc, 0, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        if bad_epochs >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    result.best_valid_accuracy = best_score
    result.epochs_run = len(result.history)
    result.train_seconds = elapsed
    result.step_seconds = median_step(times, sizes, batch_size)
    return result


# -------------------------------------------------------------------------------------------- cost
def linear_layer_cost(
    name: str,
    kind: str,
    in_features: int,
    out_features: int,
    w_bits: np.ndarray | float,
    a_bits: np.ndarray | float,
    *,
    scale_rows: int | None = None,
    has_bias: bool = True,
    act_exponents: int = 1,
) -> LayerCost:
    """One linear layer's :class:`~mpqat.cost.LayerCost` from its bit-widths, with mpqat's definitions.

    ``w_bits`` broadcasts to ``[out_features, in_features]`` (a scalar per layer, ``[out, 1]`` per
    neuron, or the full matrix per weight; 0 = pruned); ``a_bits`` broadcasts to ``[in_features]``.
    BitOps is ``sum_ij a_j * w_ij`` over every multiplication (HGQ's EBOPs; ``MACs * b_w * b_a``
    for uniform bits). Size: weight bits plus, per :mod:`mpqat.cost`, one 32-bit scale per row
    (``scale_rows``, default ``out_features``), a 32-bit bias per row, an 8-bit width code per row
    when the layer's weight bits vary, ``act_exponents`` 8-bit activation exponents and an 8-bit
    width code per input feature when the activation bits vary. No per-weight width code is charged.
    """
    w = np.broadcast_to(np.asarray(w_bits, dtype=np.float64), (out_features, in_features))
    a = np.broadcast_to(np.asarray(a_bits, dtype=np.float64).reshape(-1), (in_features,))
    macs = in_features * out_features
    bitops = float((w * a[None, :]).sum())
    storage = float(w.sum())
    meta = (out_features if scale_rows is None else scale_rows) * SCALE_BITS
    meta += out_features * BIAS_BITS if has_bias else 0
    if np.unique(w).size > 1:
        meta += out_features * WIDTH_CODE_BITS
    meta += act_exponents * EXPONENT_BITS
    if np.unique(a).size > 1:
        meta += in_features * WIDTH_CODE_BITS
    energy = ENERGY_INT_MULT_8x8_PJ * bitops / 64 + macs * ENERGY_INT32_ADD_PJ + storage * ENERGY_SRAM_PJ_PER_BIT
    return LayerCost(
        name, kind, in_features, out_features, macs, w.mean(axis=1).tolist(), a.tolist(), bitops,
        storage, float(meta), float(energy), fp32_energy(macs),
    )


def cost_report(layers: list[LayerCost]) -> CostReport:
    """Aggregate per-layer costs exactly as :func:`mpqat.cost.model_cost` does."""
    if not layers:
        raise ConfigError("cost_report: no layer")
    return aggregate_costs(layers)


def cost_extra(report: CostReport) -> dict[str, Any]:
    """The JSON-able cost figures that go into ``PeerResult.extra`` (FP32 reference, energy, per layer)."""
    return {
        "energy_pj": report.energy_pj,
        "fp32_bitops": report.fp32_bitops,
        "fp32_size_bytes": report.fp32_size_bytes,
        "fp32_energy_pj": report.fp32_energy_pj,
        "bit_histograms": report.bit_histograms(),
    }
