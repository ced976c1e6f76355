"""Brevitas peer: a QuantIdentity -> [QuantLinear -> QuantReLU]* -> QuantLinear MLP.

Quantizers (Brevitas' stock ones, scales learned as Brevitas does by default):

* input: ``QuantIdentity(Int8ActPerTensorFloat)``, signed, ``input_bits`` (default 8, like
  mpqat's ``Uniform.input_bits``);
* weights: ``Int8WeightPerChannelFloat``, symmetric narrow-range, one float scale per output
  neuron, ``w_bits`` (default 4); biases stay float (charged 32 bits each, as mpqat charges them);
* hidden activations: ``QuantReLU(Uint8ActPerTensorFloat)``, unsigned, ``a_bits`` (default 4);
  the output layer's result is not quantized.

``learned_bits=True`` makes every one of those bit-widths a ``BitWidthParameter``
(``bit_width_impl_type=PARAMETER``: ``|offset| + min_bits`` rounded with a straight-through
estimator, ``min_bits`` default 2), initialised at ``w_bits``/``a_bits``/``input_bits``, trained
with its own Adam learning rate ``bit_lr`` (default 0.02; at the weights' 1e-3 they would move by
at most 1e-3 bit per step) and optionally pushed down by ``bit_penalty * (avg weight bits +
avg activation bits)``, the parameter-weighted weight bits and element-weighted activation bits
of :mod:`mpqat.cost` (a size-weighted penalty: layers with more weights or inputs weigh more).

Cost (:mod:`mpqat.cost` definitions): per layer ``b_w`` is read from ``weight_quant.bit_width()``
and ``b_a`` from the quantizer that feeds the layer; BitOps = ``MACs * b_w * b_a``; size = weight
bits + a 32-bit scale and a 32-bit bias per output neuron + one 8-bit exponent per activation
quantizer. Brevitas' activation scales are float32, not powers of two: charging them 32 bits
instead of 8 would add 3 bytes per quantizer. :func:`brevitas_onnx_size` gives the size of what
Brevitas really exports (QCDQ ONNX, sub-8-bit weights in int8 containers).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mpqat.bench.peers._common import (
    check_hidden,
    check_splits,
    cost_extra,
    cost_report,
    fit_torch,
    linear_layer_cost,
    reject_unknown,
    torch_accuracy,
)
from mpqat.errors import ConfigError, ExportError

OPTIONS = {"w_bits", "a_bits", "input_bits", "learned_bits", "min_bits", "bit_penalty", "bit_lr", "patience",
           "weight_decay"}


def unavailable_reason() -> str | None:
    """None when Brevitas imports, else why not."""
    try:
        import brevitas  # noqa: F401
        import brevitas.nn  # noqa: F401
        import brevitas.quant  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unavailable
        return f"brevitas is not importable ({type(exc).__name__}: {exc})"
    return None


def build_mlp(
    n_features: int,
    n_classes: int,
    hidden: tuple[int, ...],
    *,
    w_bits: int = 4,
    a_bits: int = 4,
    input_bits: int = 8,
    learned_bits: bool = False,
    min_bits: int = 2,
) -> nn.Sequential:
    """The Brevitas MLP described in the module docstring."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    for label, value in (("w_bits", w_bits), ("a_bits", a_bits), ("input_bits", input_bits)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 2 <= value <= 16:
            raise ConfigError(f"brevitas: {label}={value!r}: Brevitas integer quantizers need 2 to 16 bits")
    min_ok = isinstance(min_bits, (int, np.integer)) and 2 <= min_bits <= min(w_bits, a_bits, input_bits)
    if learned_bits and not min_ok:
        raise ConfigError(f"brevitas: min_bits={min_bits} must be >= 2 and <= the initial bit-widths")
    wkw: dict[str, Any] = {}
    akw: dict[str, Any] = {}
    if learned_bits:
        wkw = {"weight_bit_width_impl_type": "parameter", "weight_min_bit_width": min_bits}
        akw = {"bit_width_impl_type": "parameter", "min_bit_width": min_bits}
    layers: list[nn.Module] = [qnn.QuantIdentity(act_quant=Int8ActPerTensorFloat, bit_width=input_bits, **akw)]
    width = n_features
    for h in hidden:
        layers.append(qnn.QuantLinear(width, h, bias=True, weight_quant=Int8WeightPerChannelFloat,
                                      weight_bit_width=w_bits, **wkw))
        layers.append(qnn.QuantReLU(act_quant=Uint8ActPerTensorFloat, bit_width=a_bits, **akw))
        width = h
    layers.append(qnn.QuantLinear(width, n_classes, bias=True, weight_quant=Int8WeightPerChannelFloat,
                                  weight_bit_width=w_bits, **wkw))
    return nn.Sequential(*layers)


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """``(name, QuantLinear, weight bits, input bits)`` in order; the bits are (differentiable) tensors.

    The input bits of a layer are those of the last activation quantizer before it (32 when none).
    """
    import brevitas.nn as qnn

    out = []
    act_bits = torch.tensor(32.0)
    for name, module in model.named_modules():
        if isinstance(module, (qnn.QuantIdentity, qnn.QuantReLU)):
            act_bits = module.act_quant.bit_width()
        elif isinstance(module, qnn.QuantLinear):
            out.append((name, module, module.weight_quant.bit_width(), act_bits))
    if not out:
        raise ConfigError("brevitas: the model has no QuantLinear layer")
    return out


def _avg_bits_penalty(model: nn.Module) -> torch.Tensor:
    """Parameter-weighted average weight bits + element-weighted average input bits (differentiable)."""
    w_total, a_total, params, elems = 0.0, 0.0, 0, 0
    for _, layer, w_bits, a_bits in quant_layers(model):
        w_total = w_total + w_bits * layer.in_features * layer.out_features
        a_total = a_total + a_bits * layer.in_features
        params += layer.in_features * layer.out_features
        elems += layer.in_features
    return w_total / params + a_total / elems


def run(
    X_train, y_train, X_valid, y_valid, X_test, y_test, *,
    hidden: tuple[int, ...], epochs: int, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
    **options: Any,
):
    """Train the Brevitas MLP; see the module docstring for the options."""
    import brevitas

    from mpqat.bench.peers import PeerResult

    reject_unknown(options, OPTIONS, "brevitas")
    patience = int(options.get("patience", 20))
    hidden = check_hidden(hidden, epochs, batch_size, lr, patience)
    data = check_splits(X_train, y_train, X_valid, y_valid, X_test, y_test)
    learned = bool(options.get("learned_bits", False))
    bit_penalty = float(options.get("bit_penalty", 0.0))
    bit_lr = float(options.get("bit_lr", 0.02))
    weight_decay = float(options.get("weight_decay", 0.0))
    if bit_penalty < 0 or bit_lr <= 0 or weight_decay < 0:
        raise ConfigError("brevitas: bit_penalty and weight_decay must be >= 0 and bit_lr > 0")
    if bit_penalty > 0 and not learned:
        raise ConfigError("brevitas: bit_penalty needs learned_bits=True (fixed bit-widths cannot move)")
    settings = {"w_bits": options.get("w_bits", 4), "a_bits": options.get("a_bits", 4),
                "input_bits": options.get("input_bits", 8), "learned_bits": learned,
                "min_bits": options.get("min_bits", 2)}

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_mlp(data.n_features, data.n_classes, hidden, **settings)
    weights, quant, bits = [], [], []
    for name, param in model.named_parameters():
        if name.endswith("bit_width_offset"):
            bits.append(param)
        elif ".weight_quant." in name or ".act_quant." in name:
            quant.append(param)
        else:
            weights.append(param)
    groups = [{"params": weights, "weight_decay": weight_decay}]
    if quant:
        groups.append({"params": quant, "weight_decay": 0.0})
    if bits:
        groups.append({"params": bits, "lr": bit_lr, "weight_decay": 0.0})

    def log_bits(m: nn.Module) -> dict[str, Any]:
        return {"bits": [[float(w.detach()), float(a.detach())] for _, _, w, a in quant_layers(m)]} if learned else {}

    fit = fit_torch(
        model, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience, param_groups=groups,
        extra_loss=(lambda m: bit_penalty * _avg_bits_penalty(m)) if bit_penalty > 0 else None, epoch_log=log_bits,
    )

    with torch.no_grad():
        layer_info = [(name, layer, float(w), float(a)) for name, layer, w, a in quant_layers(model)]
    costs = [
        linear_layer_cost(name, "brevitas.QuantLinear", layer.in_features, layer.out_features, w, a,
                          has_bias=layer.bias is not None)
        for name, layer, w, a in layer_info
    ]
    report = cost_report(costs)
    extra: dict[str, Any] = {
        "model": model,
        "library": f"brevitas {brevitas.__version__}",
        "options": settings | {"bit_penalty": bit_penalty, "bit_lr": bit_lr, "patience": patience,
                               "weight_decay": weight_decay, "hidden": list(hidden), "batch_size": batch_size,
                               "lr": lr, "seed": seed, "epochs_requested": epochs},
        "valid_accuracy": torch_accuracy(model, data.X_valid, data.y_valid),
        "best_epoch": fit.best_epoch,
        "history": fit.history,
        "layers": [{"name": name, "in_features": layer.in_features, "out_features": layer.out_features,
                    "w_bits": w, "a_bits": a} for name, layer, w, a in layer_info],
        **cost_extra(report),
    }
    return PeerResult(
        peer="brevitas",
        test_accuracy=torch_accuracy(model, data.X_test, data.y_test),
        avg_weight_bits=report.avg_weight_bits,
        avg_act_bits=report.avg_act_bits,
        bitops=report.bitops,
        size_bytes=report.size_bytes,
        train_seconds=fit.train_seconds,
        step_seconds=fit.step_seconds,
        epochs=fit.epochs_run,
        extra=extra,
    )


def brevitas_onnx_size(model_or_result: Any, path: str | Path) -> int:
    """Export the trained Brevitas model (or a Brevitas ``PeerResult``) with ``export_onnx_qcdq``; bytes written.

    Uses the TorchScript ONNX exporter (``dynamo=False``), which needs ``onnx`` and
    ``onnxoptimizer`` but not ``onnxscript``; the graph has one input ``input`` ``[batch, features]``
    and one output ``logits``. The model is deep-copied first, so the trained one is
    left as it was.
    """
    import copy

    import brevitas.nn as qnn

    model = model_or_result
    extra = getattr(model_or_result, "extra", None)
    if isinstance(extra, dict):
        if "model" not in extra:
            raise ExportError("brevitas_onnx_size: the result holds no trained model (extra['model'])")
        model = extra["model"]
    if not isinstance(model, nn.Module):
        raise ExportError(f"brevitas_onnx_size: expected a Brevitas model or PeerResult, got {type(model).__name__}")
    first = next((m for m in model.modules() if isinstance(m, qnn.QuantLinear)), None)
    if first is None:
        raise ExportError("brevitas_onnx_size: the model has no Brevitas QuantLinear layer")
    try:
        import onnx  # noqa: F401
        import onnxoptimizer  # noqa: F401

        with warnings.catch_warnings():  # brevitas.export imports its deprecated brevitas.fx
            warnings.simplefilter("ignore")
            from brevitas.export import export_onnx_qcdq
    except ImportError as exc:
        raise ExportError(
            f"brevitas_onnx_size needs onnx and onnxoptimizer ({exc}); install with: pip install onnx onnxoptimizer"
        ) from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clone = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx_qcdq(clone, args=torch.zeros(1, first.in_features), export_path=str(path), dynamo=False,
                         input_names=["input"], output_names=["logits"],
                         dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path.stat().st_size
