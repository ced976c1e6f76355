"""torchao peer: mpqat's float MLP prepared for QAT with ``quantize_(model, QATConfig(..., step="prepare"))``.

torchao has no learned or mixed bit-widths (its mixed-precision prototypes were removed), so this
is a uniform QAT baseline: every ``nn.Linear`` becomes a ``FakeQuantizedLinear`` with

* weights: ``IntxFakeQuantizeConfig(torch.int{w_bits}, "per_channel", is_symmetric=True)`` (one
  float scale per output neuron; ``group_size`` gives per-group scales instead), default 4 bits;
* inputs: ``IntxFakeQuantizeConfig(torch.int{a_bits}, "per_token", is_symmetric=False)``, dynamic
  per-sample asymmetric quantization (torchao's "8da4w" scheme by default: ``a_bits=8``), with
  ``input_bits`` (default 8) for the first layer, as mpqat's ``Uniform.input_bits``.

Training uses the same loop as the Brevitas adapter (Adam, early stopping on validation accuracy).
The model stays in its fake-quantized "prepare" form: with custom fake-quantize configs torchao's
``convert`` step only removes the fake quantizers, it does not produce an integer model.

Cost (:mod:`mpqat.cost` definitions) from each layer's fake-quantizer dtypes: BitOps =
``MACs * b_w * b_a``; size = weight bits + a 32-bit scale per row (per group with
``group_size``) + a 32-bit bias per row + one 8-bit exponent per activation quantizer. torchao's
per-token activation scales and zero points are computed at run time, not stored, so charging one
exponent per quantizer, as for mpqat's per-tensor activations, slightly over-charges torchao.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from contextlib import contextmanager
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
from mpqat.errors import ConfigError

OPTIONS = {"w_bits", "a_bits", "input_bits", "group_size", "patience", "weight_decay"}


@contextmanager
def _quiet():
    """torchao logs a warning per CUDA-only extension it cannot load on a CPU build; hide those."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def unavailable_reason() -> str | None:
    """None when torchao's QAT API imports next to this torch, else why not."""
    try:
        with _quiet():
            import torchao  # noqa: F401
            from torchao.quantization import quantize_  # noqa: F401
            from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unavailable
        return f"torchao's QAT API is not importable ({type(exc).__name__}: {exc})"
    return None


def _int_dtype(bits: int, label: str) -> torch.dtype:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ConfigError(f"torchao: {label}={bits!r}: torchao's integer fake quantizers take 2 to 8 bits")
    return torch.int8 if bits == 8 else getattr(torch, f"int{bits}")


def _dtype_bits(dtype: torch.dtype) -> int:
    match = re.fullmatch(r"torch\.u?int(\d+)", str(dtype))
    if match is None:
        raise ConfigError(f"torchao: cannot read a bit-width from dtype {dtype}")
    return int(match.group(1))


def prepare_mlp(n_features: int, n_classes: int, hidden: tuple[int, ...], *, w_bits: int = 4, a_bits: int = 8,
                input_bits: int = 8, group_size: int | None = None) -> nn.Module:
    """mpqat's float MLP with torchao's QAT fake quantizers inserted."""
    from mpqat.models import MLP

    with _quiet():
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    widths = [n_features, *hidden]
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
                                   or group_size < 1 or any(w % group_size for w in widths)):
        raise ConfigError(f"torchao: group_size={group_size} must divide every layer's input width {widths}")
    if group_size is None:
        weight_config = IntxFakeQuantizeConfig(_int_dtype(w_bits, "w_bits"), "per_channel", is_symmetric=True)
    else:
        weight_config = IntxFakeQuantizeConfig(_int_dtype(w_bits, "w_bits"), group_size=int(group_size),
                                               is_symmetric=True)
    model = MLP(n_features, n_classes, hidden=hidden)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    first = linears[0]
    for bits, wanted in ((input_bits, lambda fqn: fqn == first), (a_bits, lambda fqn: fqn != first)):
        config = QATConfig(
            activation_config=IntxFakeQuantizeConfig(_int_dtype(bits, "a_bits/input_bits"), "per_token",
                                                     is_symmetric=False),
            weight_config=weight_config, step="prepare",
        )
        with _quiet():
            quantize_(model, config, filter_fn=lambda m, fqn, wanted=wanted: isinstance(m, nn.Linear) and wanted(fqn))
    return model


def read_bits(model: nn.Module) -> list[tuple[str, nn.Module, int, int, int]]:
    """``(name, FakeQuantizedLinear, weight bits, input bits, scale rows)`` read from the fake quantizers."""
    with _quiet():
        from torchao.quantization.qat import FakeQuantizedLinear

    out = []
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizedLinear):
            wq, aq = module.weight_fake_quantizer, module.activation_fake_quantizer
            if wq is None or aq is None:
                raise ConfigError(f"torchao: layer {name} lacks a weight or activation fake quantizer")
            group = getattr(wq.config.granularity, "group_size", None)
            rows = module.out_features * (math.ceil(module.in_features / group) if group else 1)
            out.append((name, module, _dtype_bits(wq.config.dtype), _dtype_bits(aq.config.dtype), rows))
    if not out:
        raise ConfigError("torchao: the model has no FakeQuantizedLinear layer")
    return out


def run(
    X_train, y_train, X_valid, y_valid, X_test, y_test, *,
    hidden: tuple[int, ...], epochs: int, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
    **options: Any,
):
    """Train the torchao-prepared MLP; see the module docstring for the options."""
    with _quiet():
        import torchao

    from mpqat.bench.peers import PeerResult

    reject_unknown(options, OPTIONS, "torchao")
    patience = int(options.get("patience", 20))
    hidden = check_hidden(hidden, epochs, batch_size, lr, patience)
    data = check_splits(X_train, y_train, X_valid, y_valid, X_test, y_test)
    weight_decay = float(options.get("weight_decay", 0.0))
    settings = {"w_bits": options.get("w_bits", 4), "a_bits": options.get("a_bits", 8),
                "input_bits": options.get("input_bits", 8), "group_size": options.get("group_size")}

    torch.manual_seed(seed)
    model = prepare_mlp(data.n_features, data.n_classes, hidden, **settings)
    groups = [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    fit = fit_torch(model, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, patience=patience,
                    param_groups=groups)
    test_accuracy = torch_accuracy(model, data.X_test, data.y_test)
    valid_accuracy = torch_accuracy(model, data.X_valid, data.y_valid)
    layer_info = read_bits(model)
    report = cost_report([
        linear_layer_cost(name, "torchao.FakeQuantizedLinear", m.in_features, m.out_features, w, a,
                          scale_rows=rows, has_bias=m.bias is not None)
        for name, m, w, a, rows in layer_info
    ])
    extra: dict[str, Any] = {
        "model": model,
        "library": f"torchao {torchao.__version__}",
        "options": settings | {"patience": patience, "weight_decay": weight_decay, "hidden": list(hidden),
                               "batch_size": batch_size, "lr": lr, "seed": seed, "epochs_requested": epochs},
        "valid_accuracy": valid_accuracy,
        "best_epoch": fit.best_epoch,
        "history": fit.history,
        "layers": [{"name": name, "in_features": m.in_features, "out_features": m.out_features, "w_bits": w,
                    "a_bits": a} for name, m, w, a, _ in layer_info],
        **cost_extra(report),
    }
    return PeerResult(
        peer="torchao",
        test_accuracy=test_accuracy,
        avg_weight_bits=report.avg_weight_bits,
        avg_act_bits=report.avg_act_bits,
        bitops=report.bitops,
        size_bytes=report.size_bytes,
        train_seconds=fit.train_seconds,
        step_seconds=fit.step_seconds,
        epochs=fit.epochs_run,
        extra=extra,
    )
