"""BatchNorm folding: folded conv == conv + BN in eval mode; quantize() folds before quantizing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpqat.errors import ConfigError
from mpqat.models import ResNet
from mpqat.nn import QuantConv2d
from mpqat.nn.fold import conv_bn_pairs, fold_batchnorms, fold_conv_bn
from mpqat.quantize import quantize
from mpqat.recipes import Uniform

torch.set_num_threads(1)


def _randomise_bn(bn: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_folded_conv2d_equals_conv_then_bn(bias: bool, affine: bool) -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1, bias=bias), nn.BatchNorm2d(5, eps=1e-3, affine=affine)
    _randomise_bn(bn, 1)
    x = torch.randn(4, 3, 8, 8)
    expected = bn.eval()(conv(x))
    fold_conv_bn(conv, bn)
    assert conv.bias is not None
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


def test_folded_conv1d_equals_conv_then_bn() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv1d(2, 4, 5, bias=False), nn.BatchNorm1d(4), nn.ReLU())
    _randomise_bn(net[1], 3)
    net.eval()
    x = torch.randn(6, 2, 20)
    expected = net(x)
    assert fold_batchnorms(net) == ["0"]
    assert isinstance(net[1], nn.Identity)
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)


def test_only_bns_after_convs_fold() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Conv2d(1, 3, 3), nn.ReLU(), nn.BatchNorm2d(3))
    assert conv_bn_pairs(net) == []
    assert fold_batchnorms(net) == [] and isinstance(net[1], nn.BatchNorm1d)


def test_resnet_declared_pairs_fold_every_bn_and_keep_outputs() -> None:
    torch.manual_seed(4)
    net = ResNet(10, (1, 12, 12), depth=8, shortcut="B")
    for i, m in enumerate(net.modules()):
        if isinstance(m, nn.BatchNorm2d):
            _randomise_bn(m, 10 + i)
    net.eval()
    x = torch.randn(3, 144)
    expected = net(x)
    folded = fold_batchnorms(net)
    assert len(folded) == sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 9  # 1 + 3 x 2 + 2 shortcuts
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    torch.testing.assert_close(net(x), expected, atol=1e-4, rtol=1e-4)


def test_unfoldable_bn_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="running statistics"):
        fold_conv_bn(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ConfigError, match="2 output channels"):
        fold_conv_bn(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(3))


def test_quantize_folds_first_and_is_structure_deterministic() -> None:
    """A trained model's quantized state loads into quantize(fresh float model): what load_run does."""
    torch.manual_seed(5)
    trained = ResNet(10, (1, 12, 12), depth=8)
    for i, m in enumerate(trained.modules()):
        if isinstance(m, nn.BatchNorm2d):
            _randomise_bn(m, 20 + i)
    trained.eval()
    x = torch.randn(8, 144)
    float_out = trained(x)
    q = quantize(trained, Uniform(w_bits=8, a_bits=8, input_bits=8))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert all(m.bias is not None for m in q.modules() if isinstance(m, QuantConv2d))
    q.train()(x)
    out = q.eval()(x)
    assert (out.float() - float_out).abs().max() < 0.25 * float_out.abs().max()  # W8A8 is close to float
    fresh = quantize(ResNet(10, (1, 12, 12), depth=8), Uniform(w_bits=8, a_bits=8, input_bits=8))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.eval()(x), out)
