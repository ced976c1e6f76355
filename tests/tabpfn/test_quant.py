"""quantize_tabpfn: which layers are swapped, what stays float, weights-only variant, cost."""

from __future__ import annotations

import torch

from mpqat.cost import model_cost
from mpqat.methods.nmp import NeuronBits
from mpqat.nn.linear import QuantLinear
from mpqat.quant.uniform import Pow2ActQuantizer
from mpqat.recipes import FP32, Uniform
from mpqat.tabpfn.model import LabelEmbedding
from mpqat.tabpfn.quant import FloatInput, WeightOnlyLinear, float_parameter_count, quant_linears, quantize_tabpfn


def _calibrate(model, cfg):
    x, y = torch.randn(1, 24, cfg.n_features), torch.randint(0, 2, (1, 16)).float()
    model.train()
    with torch.no_grad():
        model(x, y)
    return model.eval()


def test_every_linear_is_swapped_and_the_rest_stays_float(tiny_model, tiny_config):
    q = quantize_tabpfn(tiny_model, NeuronBits())
    names = [n for n, _ in quant_linears(q)]
    assert len(names) == 1 + 6 * tiny_config.nlayers + 2
    assert names[0] == "encoder" and names[-1] == "decoder.2"
    assert {"layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v", "layers.0.attn.out",
            "layers.0.linear1", "layers.0.linear2"} <= set(names)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert isinstance(q.y_encoder, LabelEmbedding) and isinstance(q.layers[0].norm1, torch.nn.LayerNorm)
    # every input quantizer is signed; the encoder's input: one per-tensor 8-bit power-of-two step
    assert all(m.act_quant.signed for _, m in quant_linears(q))
    assert isinstance(q.encoder.act_quant, Pow2ActQuantizer) and not q.encoder.act_quant.per_feature
    assert int(q.encoder.act_quant.bits()[0]) == 8
    # the original is untouched
    assert type(tiny_model.encoder) is torch.nn.Linear
    # layer norms, label embedding and the loss weights stay float
    assert float_parameter_count(q) == 4 * tiny_config.emsize * tiny_config.nlayers + 2 * tiny_config.emsize


def test_weights_only_variant(tiny_model, tiny_config):
    q = _calibrate(quantize_tabpfn(tiny_model, Uniform(w_bits=4, a_bits=8), activations=False), tiny_config)
    layers = quant_linears(q)
    assert all(type(m) is WeightOnlyLinear and isinstance(m.act_quant, FloatInput) for _, m in layers)
    x = torch.randn(5, tiny_config.emsize)
    layer = q.layers[0].linear1
    w_q = layer.weight_quant.integer_codes(layer.weight.double()) * layer.weight_quant.scale().double()
    assert torch.equal(layer(x), torch.nn.functional.linear(x.double(), w_q, layer.bias.double()))
    assert layer.weight_quant.integer_codes(layer.weight.double()).abs().max() <= 7
    cost = model_cost(q)
    assert cost.avg_weight_bits == 4.0 and cost.avg_act_bits == 32.0


def test_quantized_model_runs_and_is_close_at_8_bits(tiny_model, tiny_config):
    q = _calibrate(quantize_tabpfn(tiny_model, Uniform(w_bits=8, a_bits=8, per_feature_act=True)), tiny_config)
    x, y = torch.randn(2, 14, tiny_config.n_features), torch.randint(0, 2, (2, 10)).float()
    ref, out = tiny_model(x, y), q(x, y)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()
    q4 = _calibrate(quantize_tabpfn(tiny_model, Uniform(w_bits=2, a_bits=4)), tiny_config)
    assert (q4(x, y) - ref).abs().max() > (out - ref).abs().max()


def test_fp32_recipe_is_a_copy(tiny_model):
    q = quantize_tabpfn(tiny_model, FP32())
    assert q is not tiny_model and not quant_linears(q)
    assert all(isinstance(m, QuantLinear) for _, m in quant_linears(quantize_tabpfn(tiny_model, NeuronBits())))
