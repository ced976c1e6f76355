"""freeze(): fixed bit-widths and scales, no training machinery, identical eval outputs."""

import torch

from mpqat import freeze
from mpqat.cost import model_cost
from mpqat.methods.nmp import NeuronBits
from mpqat.models import MLP
from mpqat.nn.linear import QuantLinear
from mpqat.quant.bits import NeuronBitsActQuantizer, NeuronBitsWeightQuantizer
from mpqat.quant.uniform import LSQWeightQuantizer, Pow2ActQuantizer
from mpqat.quantize import quantize
from mpqat.recipes import Uniform


def _trained(recipe, seed=0, steps=5):
    torch.manual_seed(seed)
    model = quantize(MLP(6, 3, hidden=(16, 8)), recipe)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(128, 6), torch.randint(0, 3, (128,))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model.train()(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _spread_strengths(model, seed=0):
    """Put the learned strengths all over [0, 1] so that every candidate is in use."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NeuronBitsWeightQuantizer | NeuronBitsActQuantizer) and module.strength is not None:
                module.strength.copy_(torch.rand(module.strength.shape, generator=gen))


def _inputs():
    gen = torch.Generator().manual_seed(7)
    return torch.cat([torch.randn(200, 6, generator=gen) * 3, torch.zeros(1, 6)])


def test_freeze_uniform_model_is_identical():
    model = _trained(Uniform(w_bits=4, a_bits=4))
    x = _inputs()
    expected = model.eval()(x)
    frozen = freeze(model)
    assert torch.equal(frozen(x), expected)
    assert not frozen.training and all(not p.requires_grad for p in frozen.parameters())


def test_freeze_nmp_model_is_identical_to_the_hard_eval_forward():
    for granularity in ("neuron", "layer"):
        model = _trained(NeuronBits(granularity=granularity))
        _spread_strengths(model)
        x = _inputs()
        expected = model.eval()(x)
        frozen = freeze(model)
        assert torch.equal(frozen(x), expected)
        for module in frozen.modules():
            if isinstance(module, QuantLinear):
                assert type(module.weight_quant) is LSQWeightQuantizer
                assert type(module.act_quant) is Pow2ActQuantizer
        names = [name for name, _ in frozen.named_parameters()]
        assert not any("strength" in n for n in names)
        assert not frozen.training and all(not p.requires_grad for p in frozen.parameters())
        assert model_cost(frozen).summary() == model_cost(model).summary()
        # the original keeps its learned-bit quantizers
        assert isinstance(model[0].weight_quant, NeuronBitsWeightQuantizer)


def test_bits_of_the_frozen_model_are_the_hard_choice():
    model = _trained(NeuronBits())
    _spread_strengths(model, seed=3)
    frozen = freeze(model)
    for a, b in zip(model.modules(), frozen.modules()):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.weight_quant.bits(), b.weight_quant.bits())
            assert torch.equal(a.act_quant.bits(), b.act_quant.bits())
            assert torch.equal(a.act_quant.exponents(), b.act_quant.exponents())
            assert torch.equal(a.weight_quant.scale(), b.weight_quant.scale())
    assert sorted(model_cost(frozen).bit_histograms()["2"]["weights"]) != ["1"]  # several widths in use


def test_frozen_training_forward_also_matches():
    """The frozen model trained on in fake-quant mode gives the same hard values as the NMP model."""
    model = _trained(NeuronBits())
    _spread_strengths(model, seed=5)
    frozen = freeze(model)
    x = _inputs()
    with torch.no_grad():
        assert torch.allclose(frozen.train()(x), model.train()(x), atol=1e-5)
