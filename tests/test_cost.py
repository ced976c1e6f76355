"""Cost numbers on a hand-built model."""

import pytest
import torch

from mpqat.cost import expected_bitops, model_cost
from mpqat.models import MLP
from mpqat.quantize import quantize
from mpqat.recipes import Uniform


def test_fp32_reference():
    report = model_cost(MLP(10, 3, hidden=(5,)))
    assert report.bitops == (10 * 5 + 5 * 3) * 32 * 32
    assert report.size_bytes == (10 * 5 + 5 + 5 * 3 + 3) * 4
    assert report.avg_weight_bits == 32


def test_uniform_costs_by_hand():
    model = quantize(MLP(10, 3, hidden=(5,)), Uniform(w_bits=4, a_bits=2, input_bits=8))
    report = model_cost(model)
    # layer 1: 10x5 weights at 4 bits, inputs at 8 bits; layer 2: 5x3 at 4 bits, inputs at 2 bits
    assert report.bitops == 50 * 4 * 8 + 15 * 4 * 2
    assert report.avg_weight_bits == 4
    assert report.avg_act_bits == pytest.approx((10 * 8 + 5 * 2) / 15)
    weight_bits = 65 * 4
    metadata = (5 * 32 + 5 * 32 + 8) + (3 * 32 + 3 * 32 + 8)  # per-row scale + bias, one act exponent
    assert report.size_bytes == (weight_bits + metadata) / 8
    assert report.fp32_bitops == 65 * 32 * 32
    assert report.energy_pj < report.fp32_energy_pj


def test_mixed_per_neuron_bits():
    model = quantize(MLP(4, 2, hidden=(3,)), Uniform(w_bits=8, a_bits=8, per_feature_act=True))
    first = model[0]
    first.weight_quant.bit_widths.copy_(torch.tensor([[1.0], [2.0], [8.0]]))
    first.act_quant.bit_widths.copy_(torch.tensor([4.0, 8.0, 8.0, 16.0]))
    layer = model_cost(model).layers[0]
    assert layer.bitops == (4 + 8 + 8 + 16) * (1 + 2 + 8)
    assert layer.weight_storage_bits == 4 * (1 + 2 + 8)
    assert model_cost(model).bit_histograms()["0"]["weights"] == {"1": 1, "2": 1, "8": 1}
    assert float(expected_bitops(model)) == pytest.approx(model_cost(model).bitops)
