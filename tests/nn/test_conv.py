"""QuantConv1d / QuantConv2d: exact eval path against an int64 reference, training path, sizes, costs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mpqat.cost import model_cost
from mpqat.errors import ConfigError
from mpqat.methods.hawq import float_mode
from mpqat.methods.nmp import NeuronBits
from mpqat.nn import QuantConv2d
from mpqat.nn.conv import conv_output_size, record_input_sizes
from mpqat.quant import LSQWeightQuantizer, Pow2ActQuantizer
from mpqat.quant.functional import round_half_up
from mpqat.quantize import layer_dims, make_quant_layer, quantize
from mpqat.recipes import Uniform

torch.set_num_threads(1)


def _make(conv: nn.Module, w_bits: int, a_bits: int, signed: bool, per_channel: bool) -> nn.Module:
    rows, fan_in, features = layer_dims(conv)
    wq = LSQWeightQuantizer(rows, fan_in, w_bits, per_neuron=True)
    aq = Pow2ActQuantizer(features, a_bits, signed=signed, per_feature=per_channel)
    return make_quant_layer(conv, wq, aq)


def _spread_steps(layer: nn.Module) -> None:
    """Per-channel steps several octaves apart (so the shift alignment is exercised)."""
    with torch.no_grad():
        aq = layer.act_quant
        if aq.log2_step.numel() > 1:
            aq.log2_step.add_(torch.arange(aq.log2_step.numel()) % 3 - 1.0)


def int64_reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Independent integer computation: int64 codes, im2col (unfold), int64 dot products, then x unit."""
    nd = x.dim() - 2
    aq, wq = layer.act_quant, layer.weight_quant
    codes = aq.integer_codes(x.double().movedim(1, -1)).long()
    k = aq.exponents().long()
    shift = (k - k.min()).expand(codes.shape[-1])
    x_int = (codes * (2**shift)).movedim(-1, 1)  # aligned to the smallest step
    w_int = wq.integer_codes(layer.weight.detach().double().reshape(layer.out_channels, -1)).long()
    if nd == 1:  # as a 2-D conv of height 1
        x_int = x_int.unsqueeze(2)
        kernel, stride, pad, dil = (1, *layer.kernel_size), (1, *layer.stride), (0, *layer.padding), (1, *layer.dilation)
    else:
        kernel, stride, pad, dil = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    cols = F.unfold(x_int.double(), kernel, dilation=dil, padding=pad, stride=stride).long()  # [n, C*K, L]
    n, L = cols.shape[0], cols.shape[2]
    g = layer.groups
    cols = cols.reshape(n, g, -1, L)
    w_g = w_int.reshape(g, layer.out_channels // g, -1)
    acc = torch.einsum("gok,ngkl->ngol", w_g, cols).reshape(n, layer.out_channels, L)
    unit = layer.accumulator_step()
    if layer.bias is not None:
        acc = acc + round_half_up(layer.bias.detach().double() / unit).long()[None, :, None]
    out_size = conv_output_size(x.shape[2:], layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    return (acc.double() * unit[None, :, None]).reshape(n, layer.out_channels, *out_size)


CASES_2D = [
    # (conv kwargs, w_bits, a_bits, signed, per_channel)
    (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), 4, 4, True, False),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False), 2, 8, False, True),
    (dict(in_channels=4, out_channels=8, kernel_size=(3, 5), padding=(1, 2), groups=2, dilation=(1, 2)), 8, 8, False, True),
    (dict(in_channels=6, out_channels=4, kernel_size=1), 3, 2, True, True),
]


@pytest.mark.parametrize("kwargs,w_bits,a_bits,signed,per_channel", CASES_2D)
def test_conv2d_eval_equals_int64_reference(kwargs, w_bits, a_bits, signed, per_channel) -> None:
    torch.manual_seed(0)
    layer = _make(nn.Conv2d(**kwargs), w_bits, a_bits, signed, per_channel)
    c = kwargs["in_channels"]
    layer.train()(torch.randn(16, c, 9, 11))  # initialise the quantizers from data
    _spread_steps(layer)
    x = torch.randn(5, c, 9, 11) * 2
    out = layer.eval()(x)
    assert out.dtype == torch.float64
    assert torch.equal(out, int64_reference(layer, x))


def test_conv1d_eval_equals_int64_reference() -> None:
    torch.manual_seed(1)
    layer = _make(nn.Conv1d(2, 6, 5, stride=2, padding=2), 4, 8, True, True)
    layer.train()(torch.randn(8, 2, 40))
    _spread_steps(layer)
    x = torch.randn(4, 2, 40)
    assert torch.equal(layer.eval()(x), int64_reference(layer, x))


@pytest.mark.parametrize("exact_bits,expected", [
    (24, [torch.float32]),  # one float32 convolution
    (18, [torch.float32, torch.float32]),  # the 8-bit weight codes split into two pieces
    (3, [torch.float64]),  # too small for any piece: the float64 path
])
def test_split_and_float64_paths_are_also_exact(exact_bits: int, expected: list, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    layer = _make(nn.Conv2d(8, 4, 3, padding=1), 8, 8, False, True)
    layer.train()(torch.randn(8, 8, 6, 6).relu())
    _spread_steps(layer)
    x = torch.randn(3, 8, 6, 6).relu() * 3
    monkeypatch.setattr(QuantConv2d, "_FLOAT32_EXACT_BITS", exact_bits)
    calls: list[torch.dtype] = []
    conv = QuantConv2d._conv
    monkeypatch.setattr(QuantConv2d, "_conv", lambda self, a, w, b: calls.append(a.dtype) or conv(self, a, w, b))
    out = layer.eval()(x)
    assert calls == expected
    assert torch.equal(out, int64_reference(layer, x))


def test_training_path_is_fake_quant_conv_with_rounded_bias() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, stride=2)
    layer = _make(conv, 4, 4, True, False).train()
    x = torch.randn(6, 3, 10, 10)
    out = layer(x)
    x_q = layer.act_quant(x.movedim(1, -1)).movedim(-1, 1)
    w_q = layer.weight_quant(layer.weight.reshape(4, -1)).reshape(layer.weight.shape)
    unit = layer.accumulator_step().float()
    bias = round_half_up(layer.bias / unit) * unit
    torch.testing.assert_close(out, F.conv2d(x_q, w_q, bias, stride=2))
    # the eval path agrees with the training path up to float32 rounding
    torch.testing.assert_close(layer.eval()(x).float(), out.detach(), atol=1e-4, rtol=1e-4)


def test_gradients_flow_to_weights_bias_steps_and_input() -> None:
    torch.manual_seed(4)
    layer = _make(nn.Conv2d(3, 4, 3, padding=1), 4, 4, True, True).train()
    x = torch.randn(8, 3, 7, 7, requires_grad=True)
    layer(x)  # initialise
    layer(x).square().mean().backward()
    for name, tensor in [("weight", layer.weight), ("bias", layer.bias), ("x", x),
                         ("w step", layer.weight_quant.step), ("a step", layer.act_quant.log2_step)]:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), name
        assert tensor.grad.abs().sum() > 0, name


def test_macs_and_sizes_are_hand_counted() -> None:
    layer = _make(nn.Conv2d(3, 8, 3, stride=2, padding=1), 4, 4, True, False)
    with pytest.raises(ValueError, match="run one forward pass"):
        layer.macs()
    layer.train()(torch.randn(2, 3, 9, 9))
    assert layer.input_size.tolist() == [9, 9] and layer.output_size() == (5, 5)
    assert layer.macs() == 5 * 5 * 8 * 27
    assert (layer.in_features, layer.out_features, layer.fan_in) == (3, 8, 27)
    grouped = _make(nn.Conv1d(4, 6, 3, groups=2), 4, 4, True, False)
    grouped.train()(torch.randn(2, 4, 10))
    assert grouped.macs() == 8 * 6 * (2 * 3)


def test_cost_of_conv_layers_float_and_quantized() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    record_input_sizes(net, (1, 8, 8))
    fp = model_cost(net)
    conv_macs = 6 * 6 * 4 * 9
    assert fp.layers[0].macs == conv_macs and fp.layers[0].params == 36
    assert fp.fp32_bitops == (conv_macs + 144 * 3) * 32 * 32
    q = quantize(net, Uniform(w_bits=4, a_bits=4, input_bits=8))
    q.train()(torch.randn(4, 1, 8, 8))
    cost = model_cost(q)
    assert cost.layers[0].kind == "QuantConv2d" and cost.layers[0].macs == conv_macs
    assert cost.layers[0].bitops == conv_macs * 4 * 8
    assert cost.layers[1].bitops == 144 * 3 * 4 * 4
    assert cost.layers[0].weight_storage_bits == 36 * 4
    assert cost.avg_weight_bits == 4.0
    assert cost.fp32_bitops == fp.fp32_bitops


def test_unsupported_padding_mode_and_wrong_inputs() -> None:
    with pytest.raises(ConfigError, match="padding_mode"):
        _make(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), 4, 4, True, False)
    with pytest.raises(ConfigError, match="wraps an Conv2d"):
        QuantConv2d(nn.Conv1d(1, 2, 3), LSQWeightQuantizer(2, 3, 4), Pow2ActQuantizer(1, 4, True))
    layer = _make(nn.Conv1d(2, 2, 3), 4, 4, True, False)
    with pytest.raises(ValueError, match="expects input"):
        layer(torch.randn(3, 5, 10))
    with pytest.raises(ConfigError, match="cannot quantize"):
        make_quant_layer(nn.ReLU(), LSQWeightQuantizer(2, 3, 4), Pow2ActQuantizer(1, 4, True))


def test_learned_bit_quantizers_work_on_convs() -> None:
    """NMP's per-channel learned bits drop in unchanged; the eval path stays integer-exact."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    q = quantize(net, NeuronBits())
    x = torch.randn(16, 2, 6, 6)
    loss = q.train()(x).square().mean()
    loss.backward()
    assert q[0].weight.grad is not None and q[2].act_quant.signed is False
    assert q[2].weight_quant.bits().shape == (4,)
    with torch.no_grad():
        q.eval()
        h = F.relu(q[0](x))
        assert torch.equal(q[2](h), int64_reference(q[2], h))


def test_float_mode_and_state_dict_round_trip() -> None:
    torch.manual_seed(6)
    layer = _make(nn.Conv2d(2, 3, 3), 4, 4, True, False)
    x = torch.randn(4, 2, 6, 6)
    layer.train()(x)
    with float_mode(nn.Sequential(layer)) as m:
        torch.testing.assert_close(m(x), F.conv2d(x, layer.weight, layer.bias))
    fresh = _make(nn.Conv2d(2, 3, 3), 4, 4, True, False)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.macs() == layer.macs()
    assert torch.equal(fresh.eval()(x), layer.eval()(x))


def test_quantized_1x1_conv_bitops_include_spatial_size() -> None:
    net = nn.Sequential(nn.Conv1d(3, 5, 1))
    q = quantize(net, Uniform(w_bits=2, a_bits=4, input_bits=4))
    q.train()(torch.randn(2, 3, 7))
    layer_cost = model_cost(q).layers[0]
    assert layer_cost.macs == 7 * 5 * 3 and layer_cost.bitops == 7 * 5 * 3 * 2 * 4
    assert math.isclose(model_cost(q).avg_act_bits, 4.0)
