"""Recipes: one frozen, validated dataclass per quantization method.

A recipe says *what* to quantize and how; :func:`mpqat.quantize` applies it to a float model.
Recipes round-trip through plain dicts and YAML, and reject unknown keys.

Example:
    >>> r = recipe_from_dict({"method": "uniform", "w_bits": 4, "a_bits": 4})
    >>> r
    Uniform(w_bits=4, a_bits=4, input_bits=8, first_layer_w_bits=None, last_layer_w_bits=None, per_neuron_scale=True, per_feature_act=False)
    >>> recipe_from_dict(r.to_dict()) == r
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from mpqat.errors import ConfigError

WEIGHT_BITS_RANGE = (1, 16)
ACT_BITS_RANGE = (2, 16)

_RECIPES: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: make a recipe available under ``cls.method`` to :func:`recipe_from_dict`."""
    _RECIPES[cls.method] = cls
    return cls


def recipe_methods() -> list[str]:
    """Names of every registered method."""
    return sorted(_RECIPES)


def check_bits(name: str, value: int | None, kind: str = "weight") -> None:
    """Raise :class:`ConfigError` unless ``value`` is a supported bit-width (or None)."""
    if value is None:
        return
    lo, hi = WEIGHT_BITS_RANGE if kind == "weight" else ACT_BITS_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} is not supported: {kind} bits must be an integer in [{lo}, {hi}]")


@dataclass(frozen=True)
class Recipe:
    """Base class: serialisation and validation shared by all recipes."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with a ``method`` key, suitable for YAML/JSON."""
        return {"method": self.method, **dataclasses.asdict(self)}

    def to_yaml(self, path: str | Path) -> None:
        """Write the recipe as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Build a recipe from a dict with a ``method`` key; unknown keys are an error."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError("a recipe must be a mapping with a 'method' key, e.g. {method: uniform, w_bits: 4}")
    data = dict(data)
    method = data.pop("method")
    cls = _RECIPES.get(method)
    if cls is None:
        raise ConfigError(f"unknown method '{method}': choose one of {', '.join(recipe_methods())}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in the '{method}' recipe: valid keys are {', '.join(sorted(fields))}"
        )
    for f in dataclasses.fields(cls):  # YAML gives lists where the dataclass holds tuples
        if isinstance(data.get(f.name), list):
            data[f.name] = tuple(data[f.name])
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"invalid '{method}' recipe: {exc}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from a YAML file, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    return recipe_from_dict(data)


@register_recipe
@dataclass(frozen=True)
class FP32(Recipe):
    """No quantization: the float reference."""

    method: ClassVar[str] = "fp32"


@register_recipe
@dataclass(frozen=True)
class Uniform(Recipe):
    """Uniform LSQ quantization of every linear layer's weights and inputs.

    ``input_bits`` quantizes the model's input (signed); ``first_layer_w_bits`` and
    ``last_layer_w_bits`` override ``w_bits`` for the first/last layer (None: same as ``w_bits``).
    """

    method: ClassVar[str] = "uniform"
    w_bits: int = 8
    a_bits: int = 8
    input_bits: int = 8
    first_layer_w_bits: int | None = None
    last_layer_w_bits: int | None = None
    per_neuron_scale: bool = True
    per_feature_act: bool = False

    def __post_init__(self) -> None:
        check_bits("w_bits", self.w_bits)
        check_bits("a_bits", self.a_bits, "activation")
        check_bits("input_bits", self.input_bits, "activation")
        check_bits("first_layer_w_bits", self.first_layer_w_bits)
        check_bits("last_layer_w_bits", self.last_layer_w_bits)
