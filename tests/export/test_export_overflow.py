"""Export-time exactness/overflow checks and the per-layer accumulator analysis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_testutils import trained_model

from mpqat import Uniform, quantize
from mpqat.errors import ExportError
from mpqat.export import DequantizeOutput, IntegerGraph, IntegerLinear, QuantizeInput, Requantize, export


def _graph(fan_in: int, w_bits: int, a_bits: int, mult: int, requant: bool = False) -> IntegerGraph:
    q = 2 ** (w_bits - 1) - 1 if w_bits > 1 else 1
    lin = IntegerLinear(weight=np.full((2, fan_in), q), weight_bits=np.full(2, w_bits), bias=np.zeros(2, np.int64),
                        mult=np.full(2, mult), scale_exp=np.full(2, 20), acc_exponent=0, name="fc")
    nodes = [QuantizeInput(np.zeros(fan_in, np.int64), np.full(fan_in, a_bits), signed=True), lin]
    if requant:
        nodes += [Requantize(np.zeros(2, np.int64), np.full(2, 8)), IntegerLinear(
            weight=np.ones((1, 2)), weight_bits=np.full(1, 2), bias=np.zeros(1), mult=np.ones(1), scale_exp=np.zeros(1),
            acc_exponent=0)]
    return IntegerGraph(nodes + [DequantizeOutput()])


def test_bound_just_below_and_above_the_limit() -> None:
    # |acc| <= fan_in * 32767 * 32767 (16-bit weights, 16-bit signed inputs): 2^30 per input
    g = _graph(fan_in=8, w_bits=16, a_bits=16, mult=2**15 + 1)  # 2^33 * 2^15 < 2^53
    assert g.layers[0].accumulator == "int64" and g.layers[0].acc_bits == 34  # 2^33 and a sign bit
    with pytest.raises(ExportError, match=r"'fc'.*>= 2\^53.*fewer activation bits"):
        _graph(fan_in=2**9, w_bits=16, a_bits=16, mult=2**15 + 1)


def test_requantized_layers_need_2_to_52() -> None:
    # 96 * 32767^2 * 65535 is about 1.5 * 2^52: fine before logits, too large before a requantize
    _graph(fan_in=96, w_bits=16, a_bits=16, mult=2**16 - 1)
    with pytest.raises(ExportError, match=r">= 2\^52.*requantizes"):
        _graph(fan_in=96, w_bits=16, a_bits=16, mult=2**16 - 1, requant=True)


def test_int32_fitness_is_recorded() -> None:
    g = _graph(fan_in=100, w_bits=8, a_bits=8, mult=3)  # 100 * 127 * 127 < 2^31
    assert g.layers[0].accumulator == "int32"
    assert g.layers[0].float64_exact and g.layers[0].float32_exact
    g = _graph(fan_in=100, w_bits=16, a_bits=16, mult=3)  # 100 * 2^30 > 2^31
    assert g.layers[0].accumulator == "int64" and not g.layers[0].float32_exact


def test_model_with_too_wide_layer_is_refused_with_advice() -> None:
    model = quantize(torch.nn.Sequential(torch.nn.Linear(4096, 2)), Uniform(w_bits=16, a_bits=16, input_bits=16))
    model.train()(torch.randn(16, 4096))
    with torch.no_grad():  # the bound uses the actual codes: saturate them
        model[0].weight.mul_(1e4)
    with pytest.raises(ExportError, match="fan-in 4096.*Use fewer activation bits"):
        export(model, torch.randn(2, 4096))


def test_trained_models_report_their_accumulators() -> None:
    graph = export(trained_model(w_bits=8, a_bits=8), torch.randn(4, 12))
    for layer in graph.layers:
        assert layer.accumulator == "int32" and layer.acc_bits <= 32 and layer.float64_exact
    summary = graph.summary()
    assert summary["layers"][0]["in_features"] == 12 and summary["output_dim"] == 3


def test_malformed_nodes_are_refused() -> None:
    with pytest.raises(ExportError, match="row 0 has 2-bit weights"):
        IntegerGraph([QuantizeInput(np.zeros(1), np.full(1, 8)),
                      IntegerLinear(np.array([[3]]), np.array([2]), np.zeros(1), np.ones(1), np.zeros(1)),
                      DequantizeOutput()])
    with pytest.raises(ExportError, match="1-bit rows must be"):
        IntegerGraph([QuantizeInput(np.zeros(1), np.full(1, 8)),
                      IntegerLinear(np.array([[0]]), np.array([1]), np.zeros(1), np.ones(1), np.zeros(1)),
                      DequantizeOutput()])
    with pytest.raises(ExportError, match="input columns"):
        IntegerGraph([QuantizeInput(np.zeros(2), np.full(2, 8)),
                      IntegerLinear(np.array([[1]]), np.array([2]), np.zeros(1), np.ones(1), np.zeros(1)),
                      DequantizeOutput()])
    with pytest.raises(ExportError, match="must end with"):
        IntegerGraph([QuantizeInput(np.zeros(1), np.full(1, 8)),
                      IntegerLinear(np.array([[1]]), np.array([2]), np.zeros(1), np.ones(1), np.zeros(1))])
    with pytest.raises(ExportError, match="accumulator exponent"):
        IntegerGraph([QuantizeInput(np.zeros(1), np.full(1, 8)),
                      IntegerLinear(np.array([[1]]), np.array([2]), np.zeros(1), np.ones(1), np.zeros(1), acc_exponent=1),
                      DequantizeOutput()])
