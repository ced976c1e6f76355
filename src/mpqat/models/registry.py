"""Models by name, so that a run directory can rebuild its model from a small JSON spec.

Example:
    >>> spec = model_spec("mlp", in_features=8, n_classes=3)
    >>> build_model(spec).hidden
    (128, 128)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mpqat.errors import ConfigError
from mpqat.models.mlp import MLP

#: name -> default keyword arguments. ``mlp-large`` is the NMP-QAT paper's 4-layer, 512-unit MLP.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden": [128, 128], "dropout": 0.0},
    "mlp-small": {"hidden": [64, 64], "dropout": 0.0},
    "mlp-large": {"hidden": [512, 512, 512], "dropout": 0.0},
}
MODEL_NAMES = tuple(_DEFAULTS)


def model_spec(name: str, in_features: int, n_classes: int, **overrides: Any) -> dict[str, Any]:
    """A JSON-serialisable description of a model: its name, input/output sizes and options."""
    if name not in _DEFAULTS:
        raise ConfigError(f"unknown model '{name}': choose one of {', '.join(MODEL_NAMES)}")
    spec = {"name": name, "in_features": int(in_features), "n_classes": int(n_classes), **_DEFAULTS[name]}
    spec.update({k: v for k, v in overrides.items() if v is not None})
    return spec


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build the float model described by :func:`model_spec`."""
    name = spec.get("name")
    if name in ("mlp", "mlp-small", "mlp-large"):
        return MLP(spec["in_features"], spec["n_classes"], hidden=tuple(spec["hidden"]), dropout=spec.get("dropout", 0.0))
    raise ConfigError(f"unknown model '{name}': choose one of {', '.join(MODEL_NAMES)}")
