"""The integer graph reproduces the quantized model's eval output bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_testutils import model_logits, random_graph, random_graph_inputs, sample_inputs, trained_model

from mpqat.errors import ExportError
from mpqat.export import IntegerLinear, export
from mpqat.export.engine import EngineInputError
from mpqat.nn.linear import QuantLinear

CONFIGS = {
    "W8A8": dict(w_bits=8, a_bits=8),
    "W4A4": dict(w_bits=4, a_bits=4),
    "W2A4": dict(w_bits=2, a_bits=4),
    "W1A8": dict(w_bits=1, a_bits=8),
    "W4A4-per-tensor-scale": dict(w_bits=4, a_bits=4, per_neuron_scale=False),
    "W8A8-per-feature-steps": dict(w_bits=8, a_bits=8, per_feature_act=True),
    "W2A4-per-feature-per-tensor": dict(w_bits=2, a_bits=4, per_feature_act=True, per_neuron_scale=False),
    "mixed-1/2/4/8-w-4/8/16-a": dict(w_bits=4, a_bits=8, per_feature_act=True, mixed=True),
    "mixed-seed1": dict(w_bits=4, a_bits=8, per_feature_act=True, mixed=True, seed=1, hidden=(40, 24)),
    "dropout-one-hidden": dict(w_bits=4, a_bits=4, dropout=0.2, hidden=(16,)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_matches_model_bit_for_bit(name: str) -> None:
    cfg = CONFIGS[name]
    model = trained_model(**cfg)
    x = sample_inputs(700, 12, seed=3)
    graph = export(model, torch.from_numpy(x[:32]))
    expected = model_logits(model, x)
    for backend in ("int64", "float", "auto"):
        for rows in (1, 7, 700):  # batch 1, small, and the float32-BLAS path (>= 64 rows)
            got = graph.run(x[:rows], backend=backend)
            assert got.dtype == np.float64
            assert np.array_equal(got, expected[:rows]), (name, backend, rows)


def test_mixed_model_really_has_mixed_widths() -> None:
    graph = export(trained_model(per_feature_act=True, mixed=True), torch.randn(4, 12))
    widths = set().union(*(layer.weight_bits for layer in graph.layers))
    assert widths == {1, 2, 4, 8}
    assert {4, 8, 16} <= set(graph.layers[1].act_bits)
    assert len(set(graph.nodes[2].exponent.tolist())) > 1  # per-feature steps differ


def test_float64_inputs_match_too() -> None:
    model = trained_model(w_bits=4, a_bits=4)
    x = sample_inputs(50, 12).astype(np.float64) * 1.001
    graph = export(model, torch.from_numpy(x[:4]))
    assert np.array_equal(graph.run(x), model_logits(model, x))


def test_export_leaves_model_untouched_and_copies() -> None:
    model = trained_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export(model, torch.randn(8, 12))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_random_graphs_int64_equals_float_pipeline() -> None:
    for seed in range(25):
        graph = random_graph(seed)
        x = random_graph_inputs(graph, 300, seed=seed)
        ref = graph.run(x, backend="int64")
        assert np.array_equal(graph.run(x, backend="float"), ref), seed
        assert np.array_equal(graph.run(x[:3], backend="float"), ref[:3]), seed


def test_random_graphs_cover_negative_and_large_shifts() -> None:
    shifts = np.concatenate([
        node.shifts(g.infos[i]) for g in (random_graph(s) for s in range(25)) for i, node in enumerate(g.nodes)
        if node.op == "requantize"
    ])
    assert shifts.min() <= 0 and shifts.max() >= 53


def test_rejects_float_linear() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(ExportError, match="float nn.Linear.*quantize"):
        export(model, torch.randn(2, 4))


def test_rejects_other_activations() -> None:
    model = trained_model(hidden=(8,))
    model[1] = torch.nn.Tanh()
    with pytest.raises(ExportError, match="Tanh.*supported: QuantLinear, nn.ReLU"):
        export(model, torch.randn(2, 12))


def test_rejects_per_weight_bits() -> None:
    model = trained_model(hidden=(8,))
    layer = model[0]
    layer.weight_quant.bit_widths = torch.full((8, 12), 4.0)
    with pytest.raises(ExportError, match="not per weight"):
        export(model, torch.randn(2, 12))


def test_rejects_uninitialised_and_trailing_relu_and_bad_example() -> None:
    from mpqat import Uniform, quantize
    from mpqat.models import MLP

    fresh = quantize(MLP(12, 2, hidden=(8,)), Uniform())
    with pytest.raises(ExportError, match="never initialised"):
        export(fresh, torch.randn(2, 12))
    model = trained_model(hidden=(8,))
    with pytest.raises(ExportError, match="ends with a ReLU"):
        export(torch.nn.Sequential(*model, torch.nn.ReLU()), torch.randn(2, 12))
    with pytest.raises(ExportError, match=r"example must be .*\[rows, 12\]"):
        export(model, torch.randn(2, 5))


def test_detects_a_forward_that_is_not_a_chain() -> None:
    class Skip(torch.nn.Sequential):
        def forward(self, x):  # rescales the input: not the chain the export reads
            return self[2](self[1](self[0](3 * x)))

    model = trained_model(hidden=(8,))
    with pytest.raises(ExportError, match="bit for bit"):
        export(Skip(*model), torch.randn(64, 12) * 3)


def test_engine_input_errors() -> None:
    graph = export(trained_model(), torch.randn(4, 12))
    with pytest.raises(EngineInputError, match=r"\[rows, 12\]"):
        graph.run(np.zeros((3, 5), np.float32))
    x = np.zeros((2, 12), np.float32)
    x[1, 3] = np.nan
    with pytest.raises(EngineInputError, match="row 1, feature 3"):
        graph.run(x)
    with pytest.raises(EngineInputError, match="backend"):
        graph.run(np.zeros((1, 12), np.float32), backend="gpu")


def test_graph_holds_only_integer_arrays() -> None:
    graph = export(trained_model(mixed=True, per_feature_act=True), torch.randn(4, 12))
    for node in graph.nodes:
        for arr in node.arrays().values():
            assert arr.dtype == np.int64
    assert all(isinstance(n, IntegerLinear) for n in graph.linear_layers())
    assert [n.op for n in graph.nodes] == ["quantize_input", "integer_linear", "requantize", "integer_linear",
                                           "requantize", "integer_linear", "dequantize_output"]
    assert graph.nodes[2].relu and not graph.nodes[0].relu


def test_weight_bits_total_matches_cost() -> None:
    from mpqat.cost import model_cost

    model = trained_model(mixed=True, per_feature_act=True)
    graph = export(model, torch.randn(4, 12))
    costs = [c for c in model_cost(model).layers]
    assert graph.weight_bits_total() == sum(c.weight_storage_bits for c in costs)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(graph.layers)
