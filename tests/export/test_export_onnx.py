"""ONNX export: onnxruntime reproduces the engine bit for bit (largest difference 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_testutils import random_graph, random_graph_inputs, sample_inputs, trained_model

from mpqat.export import export

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("cfg", [dict(w_bits=8, a_bits=8), dict(w_bits=1, a_bits=8, per_neuron_scale=False),
                                 dict(w_bits=4, a_bits=8, mixed=True, per_feature_act=True)])
def test_onnx_equals_engine(tmp_path, cfg) -> None:
    graph = export(trained_model(**cfg), torch.randn(4, 12))
    path = graph.to_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    assert {op.domain for op in model.opset_import} == {""}
    x = sample_inputs(500, 12)
    out = _run(path, x)
    assert out.dtype == np.float64
    assert np.array_equal(out, graph.run(x))  # bit-identical: largest difference 0
    assert np.array_equal(_run(path, x[:1]), graph.run(x[:1]))


def test_onnx_random_graphs(tmp_path) -> None:
    for seed in range(8):
        graph = random_graph(seed)
        x = random_graph_inputs(graph, 200, seed)
        assert np.array_equal(_run(graph.to_onnx(tmp_path / f"g{seed}.onnx"), x), graph.run(x, backend="int64")), seed
