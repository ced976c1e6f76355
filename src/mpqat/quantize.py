"""``quantize(model, recipe)``: swap a float model's layers for quantized ones, as the recipe says.

Each recipe type registers a *layer factory* with :func:`register_quantizer`. The walk over the
model is shared: it finds every ``nn.Linear`` in definition order, tells the factory whether the
layer is the first or the last one and whether its input comes out of a ReLU (then the input
quantizer is unsigned), and puts the factory's module in its place.

Example:
    >>> import torch
    >>> from mpqat.models import MLP
    >>> from mpqat.recipes import Uniform
    >>> qmodel = quantize(MLP(6, 2, hidden=(8,)), Uniform(w_bits=4, a_bits=4))
    >>> type(qmodel[0]).__name__
    'QuantLinear'
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from mpqat.errors import ConfigError
from mpqat.nn.linear import QuantLinear
from mpqat.quant.uniform import LSQWeightQuantizer, Pow2ActQuantizer
from mpqat.recipes import FP32, Recipe, Uniform


@dataclass(frozen=True)
class LayerContext:
    """Where a layer sits in the model: its name, index among the quantizable layers and its input."""

    name: str
    index: int
    count: int
    input_after_relu: bool

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


LayerFactory = Callable[[nn.Linear, LayerContext, Recipe], nn.Module]
_FACTORIES: dict[type, LayerFactory] = {}


def register_quantizer(recipe_type: type) -> Callable[[LayerFactory], LayerFactory]:
    """Decorator: register the layer factory that :func:`quantize` uses for ``recipe_type``."""

    def decorate(factory: LayerFactory) -> LayerFactory:
        _FACTORIES[recipe_type] = factory
        return factory

    return decorate


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Linear, bool]]:
    """``(name, layer, input_after_relu)`` for every ``nn.Linear`` of the model, in order."""
    found = []
    previous: nn.Module | None = None
    for name, module in model.named_modules():
        if len(list(module.children())) > 0:
            continue
        if isinstance(module, nn.Linear):
            found.append((name, module, isinstance(previous, nn.ReLU)))
        if not isinstance(module, nn.Dropout | nn.Identity):
            previous = module
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(model: nn.Module, recipe: Recipe, inplace: bool = False) -> nn.Module:
    """Return a copy of ``model`` with its linear layers quantized according to ``recipe``."""
    if isinstance(recipe, FP32):
        return model if inplace else copy.deepcopy(model)
    factory = _FACTORIES.get(type(recipe))
    if factory is None:
        raise ConfigError(f"no quantizer is registered for the '{recipe.method}' recipe")
    target = model if inplace else copy.deepcopy(model)
    layers = quantizable_layers(target)
    if not layers:
        raise ConfigError("the model has no nn.Linear layer to quantize")
    for index, (name, layer, after_relu) in enumerate(layers):
        context = LayerContext(name=name, index=index, count=len(layers), input_after_relu=after_relu)
        _set_submodule(target, name, factory(layer, context, recipe))
    return target


@register_quantizer(Uniform)
def _uniform_layer(layer: nn.Linear, ctx: LayerContext, recipe: Uniform) -> QuantLinear:
    w_bits = recipe.w_bits
    if ctx.is_first and recipe.first_layer_w_bits is not None:
        w_bits = recipe.first_layer_w_bits
    if ctx.is_last and recipe.last_layer_w_bits is not None:
        w_bits = recipe.last_layer_w_bits
    a_bits = recipe.input_bits if ctx.is_first else recipe.a_bits
    weight_quant = LSQWeightQuantizer(layer.out_features, layer.in_features, w_bits, per_neuron=recipe.per_neuron_scale)
    act_quant = Pow2ActQuantizer(
        layer.in_features, a_bits, signed=not ctx.input_after_relu, per_feature=recipe.per_feature_act
    )
    return QuantLinear(layer, weight_quant, act_quant)
