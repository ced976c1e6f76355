"""Latency of the integer engine against FP32 PyTorch on the same MLP (called by the benchmark harness).

Example:
    >>> import torch, numpy as np
    >>> from mpqat import quantize, Uniform
    >>> from mpqat.models import MLP
    >>> from mpqat.export import export
    >>> model = quantize(MLP(8, 2, hidden=(16,)), Uniform(w_bits=4, a_bits=8))
    >>> _ = model.train()(torch.randn(32, 8))
    >>> graph = export(model, torch.randn(4, 8))
    >>> r = latency_report(model, graph, np.random.randn(16, 8).astype("float32"), repeats=5)
    >>> sorted(r["batch_1"])[:2]
    ['engine_auto_ms', 'engine_float_ms']
"""

from __future__ import annotations

import copy
import io
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from mpqat.export.engine import FLOAT_MIN_BATCH, float_path_exact
from mpqat.export.ir import IntegerGraph
from mpqat.nn.conv import QuantConv1d, QuantConv2d
from mpqat.nn.linear import QuantLinear


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``QuantLinear`` replaced by a plain FP32 ``nn.Linear`` and every
    ``QuantConv1d/2d`` by an ``nn.Conv1d/2d`` (same float weights)."""
    twin = copy.deepcopy(model)

    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, QuantConv1d | QuantConv2d):
                float_type = nn.Conv1d if isinstance(child, QuantConv1d) else nn.Conv2d
                conv = float_type(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                                  padding=child.padding, dilation=child.dilation, groups=child.groups,
                                  bias=child.bias is not None)
                with torch.no_grad():
                    conv.weight.copy_(child.weight.float().reshape(conv.weight.shape))
                    if child.bias is not None:
                        conv.bias.copy_(child.bias.float())
                setattr(module, name, conv)
            elif isinstance(child, QuantLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.float())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias.float())
                setattr(module, name, linear)
            else:
                swap(child)

    swap(twin)
    return twin.float().eval()


def state_dict_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())`` in bytes."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def median_ms(fn: Callable[[], Any], repeats: int = 200, budget_s: float = 2.0, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds over up to ``repeats`` calls (at least 5, within ``budget_s``)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 5 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def _batch(x: np.ndarray, rows: int) -> np.ndarray:
    idx = np.arange(rows) % len(x)
    return np.ascontiguousarray(x[idx], dtype=np.float32)


def latency_report(model: nn.Module, graph: IntegerGraph, x: np.ndarray | torch.Tensor, repeats: int = 200,
                   batches: tuple[int, ...] = (1, 1024)) -> dict[str, Any]:
    """Median latencies (ms) of the engine (each backend) and of FP32/quantized PyTorch at each batch size.

    ``model`` is the quantized model the graph was exported from; its FP32 twin (:func:`float_twin`)
    is the reference. Rows of ``x`` are repeated to fill the batch. ``ratio_engine_over_fp32`` < 1
    means the engine is faster.

    Example: see the module docstring.
    """
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    fp32 = float_twin(model)
    quant = copy.deepcopy(model).eval()
    out: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "numpy_version": np.__version__,
        "torch_version": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "auto_float_min_batch": FLOAT_MIN_BATCH,
    }
    for rows in batches:
        xb = _batch(arr, rows)
        tb = torch.from_numpy(xb)
        entry: dict[str, float] = {}
        with torch.inference_mode():
            entry["torch_fp32_ms"] = median_ms(lambda: fp32(tb), repeats)
            entry["torch_quant_eval_ms"] = median_ms(lambda: quant(tb), repeats)
        entry["engine_int64_ms"] = median_ms(lambda: graph.run(xb, backend="int64"), repeats)
        if float_path_exact(graph):
            entry["engine_float_ms"] = median_ms(lambda: graph.run(xb, backend="float"), repeats)
        entry["engine_auto_ms"] = median_ms(lambda: graph.run(xb), repeats)
        entry["ratio_engine_over_fp32"] = entry["engine_auto_ms"] / entry["torch_fp32_ms"]
        out[f"batch_{rows}"] = dict(sorted(entry.items()))
    return out
