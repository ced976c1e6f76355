"""Dispatch of NMP-QAT's training step to the fused CPU kernels (see :mod:`mpqat.kernels`).

:func:`fused_nmp_linear` is what :class:`~mpqat.nn.QuantLinear` calls in training mode; it returns
None whenever the layer, the tensors or the context are not ones the kernels handle, and the caller
then takes the reference path. (The strength update calls the kernel from
:func:`~mpqat.quant.bits.step_strengths` itself.)

Example:
    >>> import torch
    >>> from mpqat.models import MLP
    >>> from mpqat.methods.nmp import NeuronBits
    >>> from mpqat.quantize import quantize
    >>> model = quantize(MLP(6, 2, hidden=(8,)), NeuronBits()).train()
    >>> _ = model(torch.randn(16, 6))                   # the first batch initialises (reference path)
    >>> y = fused_nmp_linear(model[0], torch.randn(16, 6))
    >>> y is None or tuple(y.shape) == (16, 8)          # None where the kernels cannot be built
    True
"""

from __future__ import annotations

import torch

from mpqat import kernels
from mpqat.quant.bits import NeuronBitsActQuantizer, NeuronBitsWeightQuantizer

_transforms_active = torch._C._are_functorch_transforms_active
_FLOAT32 = torch.float32


def fused_nmp_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s training forward through the fused kernel, or None where the kernel does not apply.

    Applies to a layer whose quantizers are a :class:`NeuronBitsWeightQuantizer` and a
    :class:`NeuronBitsActQuantizer` that have seen their first batch, with float32 CPU tensors and a
    2-D input, outside ``torch.func`` transforms.
    """
    # This runs once per layer and training step, where the kernel itself takes tens of microseconds:
    # the module's dicts are read directly (nn.Module.__getattr__ costs about a microsecond a name).
    modules = layer._modules
    wq, aq = modules["weight_quant"], modules["act_quant"]
    if type(wq) is not NeuronBitsWeightQuantizer or type(aq) is not NeuronBitsActQuantizer:
        return None
    params = layer._parameters
    weight = params["weight"]
    if (x.dim() != 2 or x.dtype is not _FLOAT32 or weight.dtype is not _FLOAT32 or not x.is_cpu
            or not weight.is_cpu or _transforms_active()):
        return None
    w_params, a_params = wq._parameters, aq._parameters
    if not (wq._buffers["initialized"].item() and aq._buffers["initialized"].item()):
        return None
    if x.shape[1] != wq.in_features or weight.shape != (wq.out_features, wq.in_features):
        return None  # the reference path raises the clear error
    ext = kernels.extension_if_enabled()
    if ext is None:
        return None
    w_packed, binary_first = wq._fused_consts()
    a_packed, log2_qmax0, signed = aq._fused_consts()
    return ext.nmp_linear(x, weight, params["bias"], w_params["step"], w_params.get("strength"),
                          a_params["log2_clip"], a_params.get("strength"), w_packed, a_packed,
                          1.0 / wq.tau, 1.0 / aq.tau, log2_qmax0, binary_first, signed)
