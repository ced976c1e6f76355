"""N2UQ threshold activation quantizer: uniform start, monotone thresholds, hard codes, G-STE gradients."""

import pytest
import torch

from mpqat.errors import ConfigError
from mpqat.quant.functional import dyadic_parts
from mpqat.quant.n2uq import MIN_INTERVAL, ThresholdActQuantizer
from mpqat.quant.uniform import Pow2ActQuantizer


def _relu_batch(seed: int = 0, features: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(256, features, generator=gen)) * 3


@pytest.mark.parametrize("per_feature", [False, True])
def test_initial_quantizer_is_the_uniform_power_of_two_quantizer(per_feature):
    x = _relu_batch()
    q = ThresholdActQuantizer(6, 3, per_feature=per_feature).train()
    p = Pow2ActQuantizer(6, 3, signed=False, per_feature=per_feature).train()
    assert torch.equal(q(x), p(x))
    assert torch.equal(q.step(), p.step()) and torch.equal(q.exponents(), p.exponents())
    x64 = _relu_batch(1).double()
    assert torch.equal(q.integer_codes(x64), p.integer_codes(x64))


def _perturb(q: ThresholdActQuantizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q.intervals.copy_(torch.rand(q.intervals.shape, generator=gen) * 2 - 0.3)  # some below the clamp
        q.start.copy_(torch.randn(q.start.shape, generator=gen) * 0.5)


@pytest.mark.parametrize("per_feature", [False, True])
def test_thresholds_stay_monotone_and_codes_count_them(per_feature):
    q = ThresholdActQuantizer(6, 3, per_feature=per_feature).train()
    x = _relu_batch()
    q(x)
    _perturb(q, 2)
    t = q.thresholds()
    assert t.shape == ((6 if per_feature else 1), 7) and t.dtype == torch.float64
    assert bool((t.diff(dim=1) > 0).all())
    m, e = dyadic_parts(t[t > 0])
    assert int(m.max()) < 2**16  # snapped: few bytes in the integer graph
    x64 = _relu_batch(3).double()
    codes = q.integer_codes(x64)
    brute = (x64.unsqueeze(-1) >= t.expand(6, 7)).sum(-1).double()
    assert torch.equal(codes, brute)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 7
    # the training forward outputs the same hard codes (away from float32 rounding at the thresholds)
    assert torch.equal(q(x64.float()).double() / q.step().double(), codes)


def test_ge_ste_gradient_is_the_compander_slope_and_reaches_the_thresholds():
    q = ThresholdActQuantizer(1, 2).train()
    q(torch.full((8, 1), 1.0))  # mean 1 -> unit 2**round(log2(2/sqrt(3))) = 1
    assert float(q.unit) == 1.0
    with torch.no_grad():
        q.intervals.copy_(torch.tensor([[0.5, 1.0, 2.0]]))  # bins [0,.5) [.5,1.5) [1.5,3.5); T = .25, 1, 2.5
    assert q.thresholds().tolist() == [[0.25, 1.0, 2.5]]
    x = torch.tensor([[-1.0], [0.2], [1.0], [2.0], [4.0]], requires_grad=True)
    out = q(x)
    assert (out / q.step()).detach().flatten().tolist() == [0.0, 0.0, 2.0, 2.0, 3.0]
    out.sum().backward()
    step = float(q.step().detach())
    assert x.grad.flatten().tolist() == pytest.approx([0.0, step / 0.5, step / 1.0, step / 2.0, 0.0])
    assert float(q.intervals.grad.abs().sum()) > 0 and float(q.start.grad.abs()) > 0
    assert float(q.log2_step.grad.abs()) > 0


def test_intervals_below_the_clamp_get_no_gradient_and_keep_thresholds_apart():
    q = ThresholdActQuantizer(1, 2).train()
    q(torch.ones(4, 1))
    with torch.no_grad():
        q.intervals.copy_(torch.tensor([[-5.0, 1.0, 1.0]]))
    t = q.thresholds()[0]
    assert float(t[1] - t[0]) >= (MIN_INTERVAL + 1.0) / 2 * 0.999
    q(torch.tensor([[0.0001], [0.5]])).sum().backward()
    assert float(q.intervals.grad[0, 0]) == 0.0


@pytest.mark.parametrize("bits", [0, 9, 2.5])
def test_bad_bits_are_config_errors(bits):
    with pytest.raises(ConfigError, match="threshold activations"):
        ThresholdActQuantizer(4, bits)
