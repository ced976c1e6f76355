"""QuantLinear: training path trains, eval path is exact on the integer grid."""

import torch

from mpqat.models import MLP
from mpqat.nn.linear import QuantLinear
from mpqat.quantize import quantize
from mpqat.recipes import Uniform


def _trained(recipe, seed=0):
    torch.manual_seed(seed)
    model = quantize(MLP(6, 3, hidden=(16, 8)), recipe)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(128, 6), torch.randint(0, 3, (128,))
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model.train()(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_eval_output_is_on_the_accumulator_grid():
    model = _trained(Uniform(w_bits=4, a_bits=4))
    last = model[-1]
    assert isinstance(last, QuantLinear)
    x = torch.randn(32, 6)
    hidden = torch.nn.Sequential(*list(model)[:-1])(x)
    out = last(hidden)
    units = out / last.accumulator_step()
    assert torch.equal(units, torch.round(units))  # integer number of accumulator units


def test_eval_is_close_to_training_forward():
    model = _trained(Uniform(w_bits=8, a_bits=8))
    x = torch.randn(64, 6)
    with torch.no_grad():
        exact = model.eval()(x)
        fake = model.train()(x)
    assert torch.allclose(exact.float(), fake, atol=5e-3)


def test_first_layer_input_is_signed_hidden_inputs_unsigned():
    model = quantize(MLP(4, 2, hidden=(8,)), Uniform())
    assert model[0].act_quant.signed is True
    assert model[2].act_quant.signed is False


def test_first_and_last_layer_bits_override():
    model = quantize(MLP(4, 2, hidden=(8, 8)), Uniform(w_bits=2, first_layer_w_bits=8, last_layer_w_bits=6))
    assert [int(m.weight_quant.bits()[0]) for m in model if isinstance(m, QuantLinear)] == [8, 2, 6]
