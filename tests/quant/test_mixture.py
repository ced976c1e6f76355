"""Supernet quantizers: mixtures of candidate bit-widths, masking, expected bits, hand-over to LSQ/Pow2."""

import pytest
import torch
from torch.func import functional_call, vmap

from mpqat.nn.conv import QuantConv2d
from mpqat.nn.linear import QuantLinear
from mpqat.quant.mixture import MixtureActQuantizer, MixtureWeightQuantizer, mixture_quantizers
from mpqat.quant.uniform import LSQWeightQuantizer, Pow2ActQuantizer


def _weight_quant(cands=(2, 4, 8), rows=3, fan_in=5, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(rows, fan_in)
    q = MixtureWeightQuantizer(rows, fan_in, cands)
    q.initialize(w)
    with torch.no_grad():
        q.alpha.copy_(torch.randn(len(cands)))
    return q, w


def _lsq_at(q: MixtureWeightQuantizer, index: int) -> LSQWeightQuantizer:
    rows, fan_in = q.step.shape[1], q.in_features
    lsq = LSQWeightQuantizer(rows, fan_in, q.candidates[index])
    with torch.no_grad():
        lsq.step.copy_(q.candidate_step(index))
    lsq.initialized.fill_(True)
    return lsq


def _pow2_at(q: MixtureActQuantizer, index: int) -> Pow2ActQuantizer:
    p = Pow2ActQuantizer(q.features, q.candidates[index], signed=q.signed, per_feature=q.per_feature)
    with torch.no_grad():
        p.log2_step.copy_(q.candidate_log2_step(index))
    p.initialized.fill_(True)
    return p


def test_weight_mixture_is_the_softmax_weighted_sum_of_lsq_quantizers():
    q, w = _weight_quant()
    pi = torch.softmax(q.alpha.detach(), 0)
    expected = sum(pi[c] * _lsq_at(q, c)(w) for c in range(3))
    torch.testing.assert_close(q(w), expected)


def test_act_mixture_is_the_softmax_weighted_sum_of_pow2_quantizers():
    torch.manual_seed(1)
    for signed in (True, False):
        x = torch.randn(6, 4) * 3
        q = MixtureActQuantizer(4, (2, 3, 8), signed=signed, per_feature=True)
        q.initialize(x)
        with torch.no_grad():
            q.alpha.copy_(torch.tensor([0.3, -1.0, 0.5]))
        pi = torch.softmax(q.alpha.detach(), 0)
        expected = sum(pi[c] * _pow2_at(q, c)(x) for c in range(3))
        torch.testing.assert_close(q(x), expected)


def test_no_grad_path_gives_the_same_values_as_the_gradient_path():
    torch.manual_seed(8)
    for signed in (True, False):
        x = torch.randn(64, 7) * 5
        q = MixtureActQuantizer(7, (2, 3, 4, 8), signed=signed, per_feature=True)
        q.initialize(x)
        with torch.no_grad():
            q.alpha.copy_(torch.randn(4))
            q.mask[1] = 0.0
            fast = q(x)
        assert torch.equal(fast, q(x).detach())


def test_single_candidate_equals_the_fixed_bit_quantizers():
    torch.manual_seed(2)
    w, x = torch.randn(4, 6), torch.randn(8, 6)
    mw, lsq = MixtureWeightQuantizer(4, 6, (3,)), LSQWeightQuantizer(4, 6, 3)
    ma, pow2 = MixtureActQuantizer(6, (4,), signed=True), Pow2ActQuantizer(6, 4, signed=True)
    for q in (mw, lsq, ma, pow2):
        q.train()
    assert torch.equal(mw(w), lsq(w)) and torch.equal(ma(x), pow2(x))


def test_masking_removes_a_candidate_without_renormalising():
    q, w = _weight_quant()
    full = q(w).detach()
    outputs = q.candidate_outputs(w).detach()
    pi = q.probs().detach()
    with torch.no_grad():
        q.mask[1] = 0.0
    masked = q(w).detach()
    torch.testing.assert_close(masked, pi[0] * outputs[0] + pi[2] * outputs[2])
    assert not torch.allclose(masked, full)
    with torch.no_grad():
        q.mask.zero_()
    assert torch.equal(q(w), torch.zeros_like(w))
    q.reset_mask()
    torch.testing.assert_close(q(w), full)


def test_masking_a_candidate_whose_output_is_zero_changes_nothing():
    """Removal acts only through the candidate's own term: a candidate contributing zero changes nothing."""
    q, w = _weight_quant(cands=(2, 8))
    with torch.no_grad():
        q.step[0].fill_(1e6)  # the 2-bit candidate rounds every weight to 0
    assert torch.equal(q.candidate_outputs(w)[0], torch.zeros_like(w))
    full = q(w).detach()
    with torch.no_grad():
        q.mask[0] = 0.0
    assert torch.equal(q(w), full)
    with torch.no_grad():
        q.mask.copy_(torch.tensor([1.0, 0.0]))
    assert torch.equal(q(w), torch.zeros_like(w))


def test_masked_layer_forward_really_drops_the_candidate():
    torch.manual_seed(3)
    layer = QuantLinear(torch.nn.Linear(5, 3), MixtureWeightQuantizer(3, 5, (2, 8)),
                        MixtureActQuantizer(5, (2, 8), signed=True)).train()
    x = torch.randn(16, 5)
    full = layer(x).detach()
    with torch.no_grad():
        layer.weight_quant.mask.zero_()
    bias_only = layer(x).detach()
    expected_bias = layer.quantized_bias().float().expand_as(bias_only)
    torch.testing.assert_close(bias_only, expected_bias)
    assert not torch.allclose(bias_only, full)


def test_gradients_reach_alpha_steps_and_weights():
    torch.manual_seed(4)
    layer = QuantLinear(torch.nn.Linear(5, 3), MixtureWeightQuantizer(3, 5, (2, 4, 8)),
                        MixtureActQuantizer(5, (2, 4), signed=False)).train()
    layer(torch.randn(16, 5)).pow(2).sum().backward()
    for p in (layer.weight, layer.weight_quant.alpha, layer.weight_quant.step, layer.act_quant.alpha,
              layer.act_quant.log2_step):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_expected_bits_and_dominant_candidate():
    q, _ = _weight_quant(cands=(2, 4, 8))
    with torch.no_grad():
        q.alpha.copy_(torch.tensor([0.0, 2.0, 0.0]))
    pi = torch.softmax(torch.tensor([0.0, 2.0, 0.0]), 0)
    expected = float((pi * torch.tensor([2.0, 4.0, 8.0])).sum())
    assert float(q.expected_bits().detach()) == pytest.approx(expected)
    assert q.bits().tolist() == [4.0] and q.dominant() == 1
    q.expected_bits().sum().backward()
    assert q.alpha.grad is not None and q.alpha.grad[2] > 0 > q.alpha.grad[0]


def test_eval_path_is_the_dominant_candidate_network():
    torch.manual_seed(5)
    lin = torch.nn.Linear(6, 4)
    wq, aq = MixtureWeightQuantizer(4, 6, (2, 4, 8)), MixtureActQuantizer(6, (3, 8), signed=True)
    layer = QuantLinear(lin, wq, aq).train()
    x = torch.randn(32, 6)
    layer(x)
    with torch.no_grad():
        wq.alpha.copy_(torch.tensor([0.0, 1.0, 0.0]))
        aq.alpha.copy_(torch.tensor([1.0, 0.0]))
    fixed = QuantLinear(lin, _lsq_at(wq, 1), _pow2_at(aq, 0)).eval()
    layer.eval()
    assert torch.equal(layer(x), fixed(x))
    # the hand-over also reproduces the candidate's training-path output exactly
    fixed.train()
    torch.testing.assert_close(fixed.weight_quant(lin.weight), wq.candidate_outputs(lin.weight)[1])
    torch.testing.assert_close(fixed.act_quant(x), aq.candidate_outputs(x)[0])


def test_vmap_over_masks_equals_setting_them_one_by_one():
    torch.manual_seed(6)
    net = torch.nn.Sequential(
        QuantLinear(torch.nn.Linear(4, 8), MixtureWeightQuantizer(8, 4, (2, 4, 8)), MixtureActQuantizer(4, (8,), True)),
        torch.nn.ReLU(),
        QuantLinear(torch.nn.Linear(8, 3), MixtureWeightQuantizer(3, 8, (2, 8)), MixtureActQuantizer(8, (2, 4), False)),
    ).train()
    x = torch.randn(10, 4)
    net(x)
    masks = {"0.weight_quant.mask": torch.tensor([[1.0, 1, 1], [0, 1, 0], [1, 0, 1], [0, 0, 0]]),
             "2.act_quant.mask": torch.tensor([[1.0, 1], [1, 0], [0, 1], [1, 1]])}
    with torch.no_grad():
        batched = vmap(lambda m, inp: functional_call(net, m, (inp,), strict=False), in_dims=(0, None))(masks, x)
        for k in range(4):
            net[0].weight_quant.mask.copy_(masks["0.weight_quant.mask"][k])
            net[2].act_quant.mask.copy_(masks["2.act_quant.mask"][k])
            torch.testing.assert_close(batched[k], net(x))
    assert [name for name, _ in mixture_quantizers(net)] == ["0.weight_quant", "0.act_quant", "2.weight_quant",
                                                             "2.act_quant"]


def test_mixtures_work_inside_a_convolution():
    torch.manual_seed(7)
    conv = torch.nn.Conv2d(2, 4, 3, padding=1)
    q = QuantConv2d(conv, MixtureWeightQuantizer(4, 18, (2, 8)), MixtureActQuantizer(2, (4, 8), signed=True)).train()
    x = torch.randn(3, 2, 6, 6)
    full = q(x).detach()
    assert full.shape == (3, 4, 6, 6)
    with torch.no_grad():
        q.weight_quant.mask[1] = 0.0
    assert not torch.allclose(q(x), full)


def test_bad_candidates():
    with pytest.raises(ValueError, match="candidates"):
        MixtureWeightQuantizer(2, 2, ())
    with pytest.raises(ValueError, match="candidates"):
        MixtureWeightQuantizer(2, 2, (2, 2))
    with pytest.raises(ValueError, match="candidates"):
        MixtureActQuantizer(2, (1, 4), signed=True)
