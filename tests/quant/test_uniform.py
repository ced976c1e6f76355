"""LSQ forward/backward on hand-computed values, power-of-two activation steps, dyadic scales."""

import math

import pytest
import torch

from mpqat.quant.functional import dyadic_parts, round_half_up, snap_mantissa
from mpqat.quant.uniform import LSQWeightQuantizer, Pow2ActQuantizer


def test_round_half_up_ties_go_up():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49])
    assert round_half_up(x).tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 0.0]


def test_lsq_weight_forward_and_backward_by_hand():
    q = LSQWeightQuantizer(out_features=1, in_features=3, bits=4, per_neuron=False)
    with torch.no_grad():
        q.step.fill_(0.5)
    q.initialized.fill_(True)
    w = torch.tensor([[0.3, -1.1, 4.0]], requires_grad=True)
    out = q(w)
    # w/s = [0.6, -2.2, 8.0] -> round half up [1, -2, 8] -> clamp to Q_P = 7
    assert out.tolist() == [[0.5, -1.0, 3.5]]
    out.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 0.0]]  # STE inside the range, zero where clipped
    # d q / d s = round(v) - v inside, Q_P where clipped: 0.4 + 0.2 + 7 = 7.6, times g = 1/sqrt(N Q_P)
    expected = (0.4 + 0.2 + 7.0) / math.sqrt(3 * 7)
    assert q.step.grad.item() == pytest.approx(expected, rel=1e-5)


def test_lsq_init_per_neuron_and_one_bit_absmean():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    q4 = LSQWeightQuantizer(2, 2, bits=4)
    q4.initialize(w)
    assert q4.step.flatten().tolist() == pytest.approx([2 * 2.0 / math.sqrt(7), 2 * 0.5 / math.sqrt(7)])
    q1 = LSQWeightQuantizer(2, 2, bits=1)
    q1.initialize(w)
    assert q1.step.flatten().tolist() == [2.0, 0.5]
    codes = q1.integer_codes(w)
    assert codes.tolist() == [[1.0, -1.0], [1.0, 1.0]]


def test_two_bit_weights_are_ternary():
    q = LSQWeightQuantizer(1, 5, bits=2, per_neuron=False)
    q.initialize(torch.randn(1, 5))
    codes = q.integer_codes(torch.tensor([[-9.0, -0.01, 0.0, 0.01, 9.0]]))
    assert codes.tolist() == [[-1.0, 0.0, 0.0, 0.0, 1.0]]


def test_pow2_activation_step_and_unsigned_range_applies_relu():
    q = Pow2ActQuantizer(features=3, bits=2, signed=False)
    with torch.no_grad():
        q.log2_step.fill_(-1.2)  # rounds to 2**-1
    q.initialized.fill_(True)
    x = torch.tensor([[-1.0, 0.26, 5.0]])
    assert q(x).tolist() == [[0.0, 0.5, 1.5]]  # codes 0, 1 (0.52 -> 1), clamp 3
    assert q.exponents().tolist() == [-1]


def test_signed_activation_range_is_symmetric():
    q = Pow2ActQuantizer(features=2, bits=4, signed=True)
    with torch.no_grad():
        q.log2_step.zero_()
    q.initialized.fill_(True)
    assert q.integer_codes(torch.tensor([[-100.0, 100.0]])).tolist() == [[-7.0, 7.0]]


def test_per_feature_activation_steps_initialise_from_data():
    q = Pow2ActQuantizer(features=2, bits=8, signed=True, per_feature=True).train()
    x = torch.stack([torch.full((16,), 0.01), torch.full((16,), 10.0)], dim=1)
    q(x)
    k = q.exponents()
    assert k[0] < k[1]


def test_snapped_scales_are_exact_dyadic_numbers():
    s = torch.tensor([0.1234567, 3.0, 1e-5])
    snapped = snap_mantissa(s)
    m, e = dyadic_parts(snapped)
    assert torch.equal(m.double() * torch.pow(2.0, -e.double()), snapped.double())
    assert int(m.max()) < 2**16
    assert torch.allclose(snapped, s, rtol=2**-15)
