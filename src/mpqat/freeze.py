"""``freeze(model)``: fix every bit-width and scale, drop the training machinery, keep the eval outputs.

The frozen model is a copy of ``model`` in which every quantizer that has a ``frozen()`` method
(the learned-bit quantizers of :mod:`mpqat.quant.bits`, and any other method's quantizer that
implements it) is replaced by the fixed quantizer it returns: a
:class:`~mpqat.quant.uniform.LSQWeightQuantizer` with per-row bit-widths and the chosen dyadic
scales, and a :class:`~mpqat.quant.uniform.Pow2ActQuantizer` with per-feature bit-widths and the
chosen power-of-two steps. Strengths, per-candidate scales and temperatures are gone. The copy is
in eval mode with ``requires_grad=False`` everywhere, and its outputs are identical (``torch.equal``)
to those of ``model.eval()``: exactly what the integer graph computes.

Example:
    >>> import torch
    >>> from mpqat.models import MLP
    >>> from mpqat.quantize import quantize
    >>> from mpqat.methods.nmp import NeuronBits
    >>> model = quantize(MLP(6, 2, hidden=(8,)), NeuronBits())
    >>> _ = model.train()(torch.randn(32, 6))            # scales and clips initialised from data
    >>> x = torch.randn(5, 6)
    >>> torch.equal(freeze(model)(x), model.eval()(x))
    True
"""

from __future__ import annotations

import copy

from torch import nn

from mpqat.nn.linear import QuantLinear


def freeze(model: nn.Module) -> nn.Module:
    """Return a frozen, eval-mode copy of ``model`` (``model`` itself is not changed)."""
    frozen = copy.deepcopy(model)
    for module in frozen.modules():
        if isinstance(module, QuantLinear):
            for attr in ("weight_quant", "act_quant"):
                quant = getattr(module, attr)
                if hasattr(quant, "frozen"):
                    setattr(module, attr, quant.frozen())
    frozen.eval()
    frozen.requires_grad_(False)
    return frozen
