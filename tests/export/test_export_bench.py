"""latency_report: the numbers the benchmark harness records."""

from __future__ import annotations

import numpy as np
import torch
from export_testutils import model_logits, trained_model

from mpqat.export import export
from mpqat.export.bench import float_twin, latency_report, state_dict_bytes


def test_latency_report_shape() -> None:
    model = trained_model(hidden=(16,))
    graph = export(model, torch.randn(4, 12))
    report = latency_report(model, graph, np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32), repeats=5)
    for batch in ("batch_1", "batch_1024"):
        entry = report[batch]
        assert {"engine_auto_ms", "engine_int64_ms", "engine_float_ms", "torch_fp32_ms", "ratio_engine_over_fp32"} <= set(entry)
        assert all(v > 0 for v in entry.values())


def test_float_twin_is_plain_fp32() -> None:
    model = trained_model(hidden=(16,))
    twin = float_twin(model)
    assert not any("Quant" in type(m).__name__ for m in twin.modules())
    x = torch.randn(5, 12)
    with torch.no_grad():
        ref = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, model[0].weight, model[0].bias)),
                                         model[2].weight, model[2].bias)
        assert torch.allclose(twin(x), ref)
    assert state_dict_bytes(twin) > 4 * (12 * 16 + 16 * 3)
    assert model_logits(model, x.numpy()).dtype == np.float64  # the quantized model is untouched
