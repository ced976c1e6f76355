"""Small shared test helpers: a toy classification set, a toy quantized MLP, an interrupted run.

Importable from every test module (pytest puts ``tests/`` on ``sys.path`` for its conftest).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mpqat.quantize import quantize


class Killed(Exception):
    """Stands for the process being killed right after a checkpoint was written."""


def toy_data(n: int = 200, features: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``y = [x0 + x1**2 / 2 > 0.5]`` on Gaussian features: learnable, not linearly separable."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, features)).astype("float32")
    y = ((X[:, 0] + 0.5 * X[:, 1] ** 2) > 0.5).astype("int64")
    return X, y


def toy_model(recipe: Any, features: int = 6, hidden: Sequence[int] = (32, 16)) -> nn.Module:
    """A seeded ``features -> hidden... -> 2`` ReLU MLP, quantized with ``recipe``."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 2))
    return quantize(nn.Sequential(*layers), recipe)


def train_until_killed(monkeypatch: pytest.MonkeyPatch, dataset: str, recipe: Any, out: Path, config: Any,
                       at_epoch: int) -> None:
    """Run :func:`mpqat.runs.train_run` and 'kill' it right after the checkpoint of ``at_epoch``."""
    import mpqat.runs as runs

    real_fit = runs.fit

    def fit_then_die(*args, **kwargs):
        def die(state):
            if state["epoch"] == at_epoch:
                raise Killed

        return real_fit(*args, on_checkpoint=die, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runs, "fit", fit_then_die)
        with pytest.raises(Killed):
            runs.train_run(dataset, recipe, out, config=config)
