"""Learned-bit quantizers: hard forward, surrogate gradients by hand, eval interface, freezing."""

import math

import pytest
import torch

from mpqat.quant.bits import (
    NeuronBitsActQuantizer,
    NeuronBitsWeightQuantizer,
    check_candidates,
    hard_index,
    mixing_weights,
    snapped,
)
from mpqat.quant.functional import grad_scale, quantize_weight_int, snap_mantissa, weight_int_range

SIG = 1 / (1 + math.exp(1.0))  # sigmoid(-1)
DSIG = SIG * (1 - SIG) / 0.1  # d sigmoid((s - t)/tau)/ds at |s - t| = tau = 0.1


def test_mixing_weights_telescope_and_differentiate():
    s = torch.tensor([[0.0], [0.3], [0.5], [0.99]], requires_grad=True)
    t = torch.tensor([0.25, 0.5, 0.75])
    pi, dpi = mixing_weights(s, t, tau=0.05)
    assert pi.shape == (4, 4, 1)
    assert torch.allclose(pi.sum(0), torch.ones(4, 1))
    assert bool((pi >= 0).all())
    for k in range(4):
        (grad,) = torch.autograd.grad(pi[k].sum(), s, retain_graph=True)
        assert torch.allclose(grad, dpi[k], atol=1e-4)


def test_hard_index_thresholds_are_lower_edges():
    t = torch.tensor([0.25, 0.5, 0.75])
    s = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.7, 0.75, 1.0])
    assert hard_index(s, t).tolist() == [0, 0, 1, 2, 2, 3, 3]


def test_snapped_equals_snap_mantissa():
    x = torch.cat([torch.rand(10000) * 8, torch.rand(1000) * 1e-5, (torch.arange(32768, 65536.0) + 0.5) / 65536])
    assert torch.equal(snapped(x), snap_mantissa(x))


def test_weight_surrogate_gradient_by_hand():
    # One neuron, candidates {1, 2}, threshold 0.5, tau 0.1, s = 0.4 (hard: 1 bit), both steps 0.5.
    q = NeuronBitsWeightQuantizer(1, 3, candidates=(1, 2), thresholds=(0.5,), init_strength=0.4, tau=0.1)
    with torch.no_grad():
        q.step.fill_(0.5)
    q.initialized.fill_(True)
    w = torch.tensor([[0.3, -0.8, 0.1]], requires_grad=True)
    out = q.train()(w)
    # 1 bit: sign -> [1, -1, 1] * 0.5; 2 bits (ternary): round([0.6, -1.6, 0.2]) = [1, -2, 0] -> clamp [1, -1, 0]
    assert out.tolist() == [[0.5, -0.5, 0.5]]
    g = torch.tensor([[1.0, 2.0, 3.0]])
    out.backward(g)
    pi1, pi2 = 1 - SIG, SIG
    # Strength: the candidates rescaled to the chosen row's norm ||Q_1|| = 0.5 sqrt(3), so
    # dL/ds = dpi_2 (<G, c_2>/||c_2|| - <G, c_1>/||c_1||) ||Q_1||, codes c_1 = [1, -1, 1], c_2 = [1, -1, 0]
    expected = DSIG * (-1 / math.sqrt(2) - 2 / math.sqrt(3)) * 0.5 * math.sqrt(3)
    assert q.strength.grad.item() == pytest.approx(expected, rel=1e-5)
    # STE masks: |u| <= 1 at 1 bit, round(u) in [-1, 1] at 2 bits: both [1, 0, 1]
    assert w.grad.flatten().tolist() == pytest.approx([1.0, 0.0, 3.0])
    # LSQ: sum G (code - u * mask): 1 bit 0.4 - 2 + 2.4 = 0.8; 2 bits 0.4 - 2 - 0.6 = -2.2; grad scale 1/sqrt(3 * 1)
    gs = 1 / math.sqrt(3)
    assert q.step.grad.flatten().tolist() == pytest.approx([pi1 * gs * 0.8, pi2 * gs * -2.2], rel=1e-5)


def _reference_weight_mixture(q, w):
    """The surrogate written with autograd, value of the hard choice: the weights and steps get the
    gradient of ``sum_k pi_k Q_k(W)``, the strength that of ``sum_k pi_k Q_k(W) ||Q_h|| / ||Q_k||``."""
    pi, _ = mixing_weights(q.strength, q.thresholds, q.tau)
    qs = []
    for k, b in enumerate(q.candidates.tolist()):
        g = 1.0 / math.sqrt(q.in_features * float(weight_int_range(torch.tensor(b))))
        sc = snap_mantissa(grad_scale(q.step[k], g).abs().clamp_min(1e-12))
        qs.append(quantize_weight_int(w, sc, torch.tensor(b)) * sc)
    qs = torch.stack(qs)
    index = q.hard_index().expand_as(w).unsqueeze(0)
    hard = qs.gather(0, index).squeeze(0)
    norms = qs.detach().norm(dim=-1, keepdim=True)
    matched = (qs * (norms.gather(0, index[..., :1]) / norms)).detach()
    soft_w = (pi.detach() * qs).sum(0)
    soft_s = (pi * matched).sum(0)
    return hard.detach() + (soft_w - soft_w.detach()) + (soft_s - soft_s.detach())


def test_weight_surrogate_matches_autograd_reference():
    torch.manual_seed(0)
    q = NeuronBitsWeightQuantizer(6, 10, tau=0.07).train()
    w = torch.randn(6, 10, requires_grad=True)
    q(w)  # initialise
    with torch.no_grad():
        q.strength.copy_(torch.tensor([[0.05], [0.24], [0.3], [0.55], [0.74], [0.9]]))
        q.step.mul_(torch.rand_like(q.step) + 0.5)
    g = torch.randn(6, 10)
    out = q(w)
    out.backward(g)
    mine = (w.grad.clone(), q.step.grad.clone(), q.strength.grad.clone())
    w.grad, q.step.grad, q.strength.grad = None, None, None
    ref = _reference_weight_mixture(q, w)
    assert torch.equal(ref.detach(), out.detach())
    ref.backward(g)
    for a, b in zip(mine, (w.grad, q.step.grad, q.strength.grad)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_act_surrogate_gradient_by_hand():
    # Two features, candidates {2, 4}, threshold 0.5, tau 0.1; s = [0.4, 0.6] -> 2 and 4 bits.
    q = NeuronBitsActQuantizer(2, signed=False, candidates=(2, 4), thresholds=(0.5,), tau=0.1)
    with torch.no_grad():
        q.strength.copy_(torch.tensor([0.4, 0.6]))
        q.log2_clip.fill_(math.log2(1.5))  # 2-bit step 2**round(log2(1.5/3)) = 0.5, 4-bit step 0.5/4
    q.initialized.fill_(True)
    x = torch.tensor([[0.3, 2.0], [1.1, 0.7]], requires_grad=True)
    out = q.train()(x)
    # feature 0: codes round([0.6, 2.2]) = [1, 2]; feature 1: round([16, 5.6]) = [16, 6] -> clamp 15
    assert out.tolist() == [[0.5, 1.875], [1.0, 0.75]]
    assert q.bits().tolist() == [2.0, 4.0] and q.exponents().tolist() == [-1, -3]
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out.backward(g)
    assert x.grad.tolist() == [[1.0, 0.0], [3.0, 4.0]]  # the clipped element gets no gradient
    # clip (LSQ on the chosen step): sum G (code - u * mask) * step * ln 2 / sqrt(Q_P)
    expected_clip = [(1 * (1 - 0.6) + 3 * (2 - 2.2)) * 0.5 * math.log(2) / math.sqrt(3),
                     (2 * 15 + 4 * (6 - 5.6)) * 0.125 * math.log(2) / math.sqrt(15)]
    assert q.log2_clip.grad.tolist() == pytest.approx(expected_clip, rel=1e-5)
    # strength: dpi_4 * (<G, Q_4> - <G, Q_2>), both candidates clipped at the 2-bit range 3 * 0.5:
    # feature 0: Q_2 = [.5, 1], Q_4 = [.25, 1.125]; feature 1: Q_2 = [1.5, .5], Q_4 = [1.5, .75]
    expected_s = [DSIG * ((0.25 + 3 * 1.125) - (0.5 + 3 * 1.0)), DSIG * ((2 * 1.5 + 4 * 0.75) - (2 * 1.5 + 4 * 0.5))]
    assert q.strength.grad.tolist() == pytest.approx(expected_s, rel=1e-5)


def test_forward_is_hard_and_matches_the_eval_path():
    torch.manual_seed(1)
    wq = NeuronBitsWeightQuantizer(8, 16).train()
    aq = NeuronBitsActQuantizer(16, signed=True).train()
    w, x = torch.randn(8, 16), torch.randn(64, 16)
    wq(w), aq(x)
    with torch.no_grad():
        wq.strength.copy_(torch.linspace(0, 1, 8).reshape(8, 1))
        aq.strength.copy_(torch.linspace(0, 1, 16))
    assert wq.bits().tolist() == [1, 1, 2, 2, 4, 4, 8, 8]
    codes = wq.integer_codes(w)
    for j, b in enumerate(wq.bits().tolist()):  # every row uses exactly its own range
        assert codes[j].abs().max() <= weight_int_range(torch.tensor(b))
        if b == 1:
            assert set(codes[j].tolist()) <= {-1.0, 1.0}
    assert torch.equal(wq.train()(w), codes * wq.scale())
    assert torch.equal(aq.train()(x), aq.integer_codes(x) * aq.step())
    assert torch.equal(wq.eval()(w), wq.train()(w))
    step = aq.step()
    assert torch.equal(step, torch.exp2(aq.exponents().float()))


def test_layer_granularity_is_the_same_code_with_one_strength():
    wq = NeuronBitsWeightQuantizer(5, 3, per_neuron_bits=False).train()
    aq = NeuronBitsActQuantizer(3, signed=False, per_feature_bits=False).train()
    assert wq.strength.shape == (1, 1) and aq.strength.shape == (1,)
    w, x = torch.randn(5, 3, requires_grad=True), torch.rand(16, 3)
    (wq(w).sum() + aq(x).sum()).backward()
    assert wq.strength.grad.shape == (1, 1) and aq.strength.grad.shape == (1,)
    with torch.no_grad():
        wq.strength.fill_(0.6)
    assert wq.bits().tolist() == [4.0] and wq.scale().shape == (5, 1)
    assert aq.bits().shape == (3,)  # per-feature clips: one exponent per feature


def test_strength_constraints_and_no_shrink_floor():
    q = NeuronBitsWeightQuantizer(3, 2)
    with torch.no_grad():
        q.strength.copy_(torch.tensor([[-0.2], [0.6], [1.4]]))
    q.constrain(allow_shrink=False)
    assert q.strength.flatten().tolist() == pytest.approx([0.0, 0.6, 1.0])
    with torch.no_grad():
        q.strength.fill_(0.1)
    q.constrain(allow_shrink=False)  # the 4-bit and 8-bit neurons keep their buckets
    assert q.strength.flatten().tolist() == pytest.approx([0.1, 0.5, 0.75])
    assert q.bits().tolist() == [1.0, 4.0, 8.0]
    with torch.no_grad():
        q.strength.fill_(0.1)
    q.constrain(allow_shrink=True)
    assert q.bits().tolist() == [1.0, 1.0, 1.0]


def test_frozen_quantizers_give_identical_outputs():
    torch.manual_seed(2)
    wq, aq = NeuronBitsWeightQuantizer(6, 5).train(), NeuronBitsActQuantizer(5, signed=False).train()
    w, x = torch.randn(6, 5), torch.rand(32, 5) * 3
    wq(w), aq(x)
    with torch.no_grad():
        wq.strength.copy_(torch.rand(6, 1))
        aq.strength.copy_(torch.rand(5))
    fw, fa = wq.frozen(), aq.frozen()
    x64, w64 = x.double(), w.double()
    assert torch.equal(fw.integer_codes(w64) * fw.scale().double(), wq.integer_codes(w64) * wq.scale().double())
    assert torch.equal(fa.integer_codes(x64) * fa.step().double(), aq.integer_codes(x64) * aq.step().double())
    assert torch.equal(fw.bits(), wq.bits()) and torch.equal(fa.bits(), aq.bits())


@pytest.mark.parametrize(
    ("candidates", "thresholds", "message"),
    [((1, 2, 4), (0.5, 0.25), "increasing"), ((1, 2), (0.5, 0.7), "need 1 thresholds"),
     ((2, 1), (0.5,), "strictly increasing"), ((0, 2), (0.5,), "not supported"), ((1, 2), (1.0,), "inside")],
)
def test_bad_candidates(candidates, thresholds, message):
    with pytest.raises(ValueError, match=message):
        check_candidates(candidates, thresholds, 1, 16, "weight")
