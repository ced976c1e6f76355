"""mpqat: mixed-precision quantization-aware training with a bit-exact integer export.

The public API follows the data flow ``quantize -> fit -> freeze -> export -> report``:

Example:
    >>> import torch, mpqat
    >>> model = mpqat.quantize(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
    ...                        mpqat.Uniform(w_bits=4, a_bits=8))
    >>> round(mpqat.model_cost(model).avg_weight_bits, 2)
    4.0
"""

from mpqat.cost import CostReport, model_cost
from mpqat.errors import MpqatError
from mpqat.export import export
from mpqat.freeze import freeze
from mpqat.methods.nmp import NeuronBits
from mpqat.quantize import quantize
from mpqat.recipes import FP32, Recipe, Uniform, load_recipe, recipe_from_dict
from mpqat.train import TrainConfig, fit

__version__ = "0.1.0"

__all__ = [
    "FP32",
    "CostReport",
    "MpqatError",
    "NeuronBits",
    "Recipe",
    "TrainConfig",
    "Uniform",
    "export",
    "fit",
    "freeze",
    "load_recipe",
    "model_cost",
    "quantize",
    "recipe_from_dict",
]
