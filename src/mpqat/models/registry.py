"""Models by name, so that a run directory can rebuild its model from a small JSON spec.

Example:
    >>> spec = model_spec("mlp", in_features=8, n_classes=3)
    >>> build_model(spec).hidden
    (128, 128)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from mpqat.errors import ConfigError
from mpqat.models.cnn import CNN1d, LeNet5, ResNet
from mpqat.models.mlp import MLP

#: name -> default keyword arguments. ``mlp-large`` is the NMP-QAT paper's 4-layer, 512-unit MLP.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [128, 128], "dropout": 0.0},
    "mlp-small": {"hidden": [64, 64], "dropout": 0.0},
    "mlp-large": {"hidden": [512, 512, 512], "dropout": 0.0},
    "lenet5": {},
    "resnet8": {"width": 1.0, "shortcut": "A"},
    "resnet20": {"width": 1.0, "shortcut": "A"},
    "cnn1d": {"channels": [32, 32, 64, 64], "kernel_size": 5, "hidden": 64},
}
MODEL_NAMES = tuple(_DEFAULTS)
#: models that need shaped input: name -> number of dims of ``input_shape`` ((C, H, W) or (C, L))
SHAPED_MODELS: dict[str, int] = {"lenet5": 3, "resnet8": 3, "resnet20": 3, "cnn1d": 2}


def model_spec(name: str, in_features: int, n_classes: int, input_shape: Sequence[int] | None = None,
               **overrides: Any) -> dict[str, Any]:
    """A JSON-serialisable description of a model: its name, input/output sizes and options.

    CNNs need the per-sample ``input_shape`` of the dataset (``TabularSplits.input_shape``, e.g.
    ``(1, 28, 28)``); their input rows are flat, ``in_features == prod(input_shape)``.

    Example:
        >>> model_spec("lenet5", 784, 10, input_shape=(1, 28, 28))["input_shape"]
        [1, 28, 28]
    """
    if name == "tabpfn-v1":
        raise ConfigError("tabpfn-v1 is a pretrained in-context model, not trained by the MLP trainer: use "
                          "'mpqat train --model tabpfn-v1 ...' or mpqat.tabpfn.run.train_tabpfn_run (docs/tabpfn.md)")
    if name not in _DEFAULTS:
        raise ConfigError(f"unknown model '{name}': choose one of {', '.join(MODEL_NAMES)} (or tabpfn-v1)")
    spec = {"name": name, "in_features": int(in_features), "n_classes": int(n_classes), **_DEFAULTS[name]}
    if name in SHAPED_MODELS:
        ndim = SHAPED_MODELS[name]
        what = "images (channels, height, width)" if ndim == 3 else "sequences (channels, length)"
        if input_shape is None:
            raise ConfigError(
                f"model '{name}' needs {what}, but the dataset is tabular (no input_shape): use an image "
                "dataset (e.g. mnist, fashion-mnist) or an MLP model (mlp, mlp-small, mlp-large)"
            )
        shape = [int(s) for s in input_shape]
        if len(shape) != ndim or math.prod(shape) != int(in_features):
            raise ConfigError(
                f"model '{name}' needs {what}; the dataset's input_shape {tuple(shape)} does not fit "
                f"(or does not match its {in_features} features)"
            )
        spec["input_shape"] = shape
    spec.update({k: v for k, v in overrides.items() if v is not None})
    return spec


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build the float model described by :func:`model_spec`."""
    name = spec.get("name")
    if name == "tabpfn-v1":  # the pretrained checkpoint ('mpqat data fetch tabpfn-v1'); see mpqat.tabpfn
        from mpqat.tabpfn.model import load_tabpfn

        return load_tabpfn(spec.get("checkpoint"))
    if name in ("mlp", "mlp-small", "mlp-large"):
        return MLP(spec["in_features"], spec["n_classes"], hidden=tuple(spec["hidden"]), dropout=spec.get("dropout", 0.0))
    if name == "lenet5":
        return LeNet5(spec["n_classes"], spec["input_shape"])
    if name in ("resnet8", "resnet20"):
        return ResNet(spec["n_classes"], spec["input_shape"], depth=int(name[len("resnet"):]),
                      width=float(spec.get("width", 1.0)), shortcut=str(spec.get("shortcut", "A")))
    if name == "cnn1d":
        hidden = spec["hidden"]
        if isinstance(hidden, list | tuple):  # --hidden 128 gives [128]
            if len(hidden) != 1:
                raise ConfigError(f"cnn1d has one hidden fc layer: give one width, got {list(hidden)}")
            hidden = hidden[0]
        return CNN1d(spec["n_classes"], spec["input_shape"], channels=tuple(spec["channels"]),
                     kernel_size=int(spec["kernel_size"]), hidden=int(hidden))
    raise ConfigError(f"unknown model '{name}': choose one of {', '.join(MODEL_NAMES)}")
