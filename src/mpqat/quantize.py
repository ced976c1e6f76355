"""``quantize(model, recipe)``: swap a float model's layers for quantized ones, as the recipe says.

Each recipe type registers a *layer factory* with :func:`register_quantizer`. The walk over the
model is shared: it finds every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` in definition order,
tells the factory whether the layer is the first or the last one and whether its input comes out of
a ReLU (then the input quantizer is unsigned), and puts the factory's module in its place. Factories
build their quantizers from :func:`layer_dims` and wrap them with :func:`make_quant_layer`, so every
method quantizes linear layers and convolutions alike.

Before the walk, every BatchNorm that directly follows a convolution is folded into it and replaced
by ``nn.Identity`` (:func:`mpqat.nn.fold.fold_batchnorms`); the result depends only on the model's
structure, so ``quantize(float_model).load_state_dict(saved)`` restores a saved quantized model.

Which inputs are unsigned: a model may declare it with an attribute ``unsigned_input_layers`` (the
names, as in ``named_modules``, of the layers whose input is non-negative; used as is, e.g. for
ResNets, whose definition order is not their execution order). Otherwise a layer's input counts as
post-ReLU when the previous leaf module in definition order is an ``nn.ReLU``, looking through
modules that keep non-negative values non-negative (pooling, flatten, dropout, identity).

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
from mpqat.nn.conv import QuantConv1d, QuantConv2d
from mpqat.nn.fold import fold_batchnorms
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


LayerFactory = Callable[[nn.Module, LayerContext, Recipe], nn.Module]
_FACTORIES: dict[type, LayerFactory] = {}


def register_quantizer(recipe_type: type) -> Callable[[LayerFactory], LayerFactory]:
    """Decorator: register the layer factory that :func:`quantize` uses for ``recipe_type``."""

    def decorate(factory: LayerFactory) -> LayerFactory:
        _FACTORIES[recipe_type] = factory
        return factory

    return decorate


#: Float layer types that :func:`quantize` swaps for quantized ones.
QUANTIZABLE_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)

# Leaves that keep a non-negative input non-negative: the sign test looks through them.
_SIGN_PRESERVING = (
    nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)


def layer_dims(layer: nn.Module) -> tuple[int, int, int]:
    """``(out_rows, fan_in, in_features)`` of a linear or conv layer, float or quantized.

    ``out_rows`` x ``fan_in`` is the 2-D weight view the weight quantizer sees (for a conv
    ``[out_channels, in_channels/groups * prod(kernel)]``); ``in_features`` is what the activation
    quantizer sees channels-last (input features, or input channels of a conv).

    Example:
        >>> layer_dims(nn.Conv2d(3, 8, kernel_size=5)), layer_dims(nn.Linear(4, 2))
        ((8, 75, 3), (2, 4, 4))
    """
    if isinstance(layer, nn.Linear | QuantLinear) and not isinstance(layer, QuantConv1d | QuantConv2d):
        return layer.out_features, layer.in_features, layer.in_features
    if isinstance(layer, nn.Conv1d | nn.Conv2d | QuantConv1d | QuantConv2d):
        return int(layer.weight.shape[0]), int(layer.weight[0].numel()), int(layer.in_channels)
    raise ConfigError(f"layer_dims: {type(layer).__name__} is not a linear or convolutional layer")


def make_quant_layer(layer: nn.Module, weight_quant: nn.Module, act_quant: nn.Module) -> nn.Module:
    """Wrap a float ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` with its quantizers (QuantLinear/QuantConv1d/2d).

    Example:
        >>> rows, fan_in, feats = layer_dims(conv := nn.Conv2d(1, 4, 3))
        >>> q = make_quant_layer(conv, LSQWeightQuantizer(rows, fan_in, 4), Pow2ActQuantizer(feats, 8, signed=True))
        >>> type(q).__name__
        'QuantConv2d'
    """
    if isinstance(layer, nn.Conv2d):
        return QuantConv2d(layer, weight_quant, act_quant)
    if isinstance(layer, nn.Conv1d):
        return QuantConv1d(layer, weight_quant, act_quant)
    if isinstance(layer, nn.Linear):
        return QuantLinear(layer, weight_quant, act_quant)
    raise ConfigError(f"make_quant_layer: cannot quantize a {type(layer).__name__} (supported: Linear, Conv1d, Conv2d)")


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(name, layer, input_after_relu)`` for every linear/conv layer of the model, in definition order."""
    declared = getattr(model, "unsigned_input_layers", None)
    found = []
    previous: nn.Module | None = None
    for name, module in model.named_modules():
        if len(list(module.children())) > 0:
            continue
        if isinstance(module, QUANTIZABLE_TYPES):
            after_relu = name in declared if declared is not None else isinstance(previous, nn.ReLU)
            found.append((name, module, after_relu))
        if not isinstance(module, _SIGN_PRESERVING):
            previous = module
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize(model: nn.Module, recipe: Recipe, inplace: bool = False) -> nn.Module:
    """Return a copy of ``model`` with its linear and conv layers quantized according to ``recipe``.

    BatchNorms that directly follow a convolution are folded into it first (FP32 recipes keep them).
    """
    if isinstance(recipe, FP32):
        return model if inplace else copy.deepcopy(model)
    factory = _FACTORIES.get(type(recipe))
    if factory is None:
        raise ConfigError(f"no quantizer is registered for the '{recipe.method}' recipe")
    target = model if inplace else copy.deepcopy(model)
    fold_batchnorms(target)
    layers = quantizable_layers(target)
    if not layers:
        raise ConfigError("the model has no nn.Linear, nn.Conv1d or nn.Conv2d layer to quantize")
    for index, (name, layer, after_relu) in enumerate(layers):
        context = LayerContext(name=name, index=index, count=len(layers), input_after_relu=after_relu)
        _set_submodule(target, name, factory(layer, context, recipe))
    return target


@register_quantizer(Uniform)
def _uniform_layer(layer: nn.Module, ctx: LayerContext, recipe: Uniform) -> nn.Module:
    w_bits = recipe.w_bits
    if ctx.is_first and recipe.first_layer_w_bits is not None:
        w_bits = recipe.first_layer_w_bits
    if ctx.is_last and recipe.last_layer_w_bits is not None:
        w_bits = recipe.last_layer_w_bits
    a_bits = recipe.input_bits if ctx.is_first else recipe.a_bits
    rows, fan_in, features = layer_dims(layer)
    weight_quant = LSQWeightQuantizer(rows, fan_in, w_bits, per_neuron=recipe.per_neuron_scale)
    act_quant = Pow2ActQuantizer(features, a_bits, signed=not ctx.input_after_relu, per_feature=recipe.per_feature_act)
    return make_quant_layer(layer, weight_quant, act_quant)
