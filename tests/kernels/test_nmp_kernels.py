"""The fused NMP-QAT CPU kernels (mpqat.kernels) against the Python reference (mpqat.quant.bits).

Forward values must be equal; gradients and strength updates agree to float32 round-off (the kernels
sum in another order). The extension is built on first use; without a C++ compiler these tests skip.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch.nn import functional as F

from mpqat import kernels
from mpqat.methods import hooks_for
from mpqat.methods.nmp import NeuronBits
from mpqat.models import MLP
from mpqat.nn.linear import QuantLinear
from mpqat.quantize import quantize

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build mpqat.kernels")

RECIPES = {
    "neuron": NeuronBits(),
    "layer": NeuronBits(granularity="layer"),
    "shared_scale_clip": NeuronBits(per_neuron_scale=False, per_feature_clip=False),
    "no_binary": NeuronBits(w_candidates=(2, 3, 4, 8), w_thresholds=(0.2, 0.4, 0.6), a_candidates=(2, 4, 8),
                            a_thresholds=(0.3, 0.6)),
    "learned_input": NeuronBits(input_bits=None, allow_shrink=True),
    # K = 2 (the smallest blocked pass) and K = 5 / 6 (more candidates than the blocked passes are
    # built for: the row-by-row fallback) for weights and activations.
    "two_candidates": NeuronBits(w_candidates=(1, 4), w_thresholds=(0.5,), a_candidates=(4, 8), a_thresholds=(0.5,)),
    "many_candidates": NeuronBits(w_candidates=(1, 2, 3, 4, 8), w_thresholds=(0.2, 0.4, 0.6, 0.8),
                                  a_candidates=(2, 3, 4, 5, 6, 8), a_thresholds=(0.15, 0.3, 0.45, 0.6, 0.75)),
}


@pytest.fixture(scope="module")
def extension():
    ext = kernels.load_extension()
    assert ext is not None, "the fused kernels did not build (see the warning)"
    return ext


def _use_kernels(monkeypatch, on: bool) -> None:
    monkeypatch.setenv(kernels.ENV_SWITCH, "1" if on else "0")


def _model(recipe: NeuronBits, seed: int = 0, bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = quantize(MLP(12, 5, hidden=(48, 24)), recipe).train()
    if not bias:
        for layer in model.modules():
            if isinstance(layer, QuantLinear):
                layer.bias = None
    x = torch.randn(64, 12) * 2
    with torch.no_grad():
        model(x)  # initialise scales and clips (the reference path)
        for module in model.modules():  # spread the strengths over every bucket
            if getattr(module, "strength", None) is not None:
                module.strength.uniform_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    return model


def _fused(out: torch.Tensor) -> bool:
    """True when ``out`` came out of the fused kernel's autograd node."""
    return out.grad_fn is not None and "NmpLinear" in out.grad_fn.name()


def _forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (F.cross_entropy(out, y) + out.pow(2).mean()).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("bias", [True, False])
def test_fused_layer_matches_reference(extension, monkeypatch, name, bias):
    """Equal forward values; gradients as accurate as the reference's, both measured against the same
    computation in float64 (the reference path, which the kernel does not take for float64)."""
    model = _model(RECIPES[name], bias=bias)
    x, y = torch.randn(96, 12) * 2, torch.randint(0, 5, (96,))
    _use_kernels(monkeypatch, False)
    ref_out, ref_grads = _forward_backward(model, x, y)
    _, exact = _forward_backward(copy.deepcopy(model).double(), x.double(), y)
    _use_kernels(monkeypatch, True)
    out, grads = _forward_backward(model, x, y)
    assert _fused(model[0](x))  # the kernel ran
    assert torch.equal(out, ref_out)
    assert ref_grads.keys() == grads.keys()
    for key, ref in ref_grads.items():
        got = grads[key]
        assert (ref is None) == (got is None), key
        if ref is not None:
            truth = exact[key].float()
            ref_error = float((ref - truth).abs().max())
            error = float((got - truth).abs().max())
            assert error <= 4 * ref_error + 1e-6 * float(truth.abs().max()) + 1e-12, (key, error, ref_error)


def test_no_strength_gradient_while_frozen(extension, monkeypatch):
    model = _model(NeuronBits())
    for module in model.modules():
        if getattr(module, "strength", None) is not None:
            module.strength.requires_grad_(False)
    _use_kernels(monkeypatch, True)
    _, grads = _forward_backward(model, torch.randn(32, 12), torch.randint(0, 5, (32,)))
    assert all(g is None for n, g in grads.items() if n.endswith("strength"))
    assert grads["0.weight"] is not None and grads["2.act_quant.log2_clip"] is not None


@pytest.mark.parametrize("allow_shrink", [False, True])
def test_fused_strength_update_matches_reference(extension, monkeypatch, allow_shrink):
    recipe = NeuronBits(allow_shrink=allow_shrink)
    results = {}
    for on in (False, True):
        _use_kernels(monkeypatch, on)
        model = _model(recipe, seed=3)
        quant = model[2].weight_quant
        gen = torch.Generator().manual_seed(7)
        for _ in range(5):
            quant.strength.grad = torch.randn(quant.strength.shape, generator=gen) * 1e-2
            quant.step_strength(0.05, allow_shrink)
            assert quant.strength.grad is None
        results[on] = (quant.strength.detach().clone(), quant.strength_floor.clone(), quant.strength_momentum.clone(),
                       quant.strength_sq.clone(), int(quant.strength_updates), quant.bits().clone())
    (s0, f0, m0, v0, t0, b0), (s1, f1, m1, v1, t1, b1) = results[False], results[True]
    assert t0 == t1 == 5
    assert torch.allclose(s1, s0, atol=1e-6) and torch.allclose(m1, m0, atol=1e-9)
    assert torch.allclose(v1, v0, rtol=1e-5)
    assert torch.equal(f1, f0) and torch.equal(b1, b0)
    assert float(s1.min()) >= 0.0 and float(s1.max()) <= 1.0


def test_fused_update_refreshes_the_cached_bits(extension, monkeypatch):
    """The kernel updates in place without autograd: the caches keyed by version counters must see it."""
    _use_kernels(monkeypatch, True)
    model = _model(NeuronBits(), seed=5)
    quant = model[2].weight_quant
    with torch.no_grad():
        quant.strength.fill_(0.1)
    assert set(quant.bits().tolist()) == {1.0}
    for _ in range(45):
        quant.strength.grad = -torch.ones_like(quant.strength)
        quant.step_strength(0.01, allow_shrink=False)
    assert set(quant.bits().tolist()) == {4.0}  # 0.1 + 45 x 0.01 = 0.55: the 4-bit bucket [0.5, 0.75)


def test_short_training_agrees_with_reference(extension, monkeypatch):
    """150 Adam steps: the runs agree closely at first, and end with similar average bits and loss.

    Adam divides by the root of tiny second moments, so round-off differences grow over the run:
    the comparison is tight for the first steps and statistical at the end."""
    recipe = NeuronBits()
    runs = {}
    for on in (False, True):
        _use_kernels(monkeypatch, on)
        gen = torch.Generator().manual_seed(11)
        model = _model(recipe, seed=11)
        hooks = hooks_for(recipe)
        opt = torch.optim.Adam([g for g in hooks.param_groups(model, 1e-2, 0.0) if g["params"]], lr=1e-2)
        hooks.on_epoch_start(model, 0, 1)
        x = torch.randn(1024, 12, generator=gen)
        y = (x[:, :5] * torch.arange(1, 6)).argmax(1)
        losses = []
        for _ in range(150):
            idx = torch.randint(0, 1024, (128,), generator=gen)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hooks.after_step(model)
            losses.append(float(loss.detach()))
        runs[on] = (torch.tensor(losses), [q.bits().clone() for q in model.modules() if hasattr(q, "strength")])
    (l0, b0), (l1, b1) = runs[False], runs[True]
    assert float(l1[-20:].mean()) < float(l1[:20].mean())  # it learns
    assert torch.allclose(l1[:3], l0[:3], rtol=1e-5)
    assert abs(float(l1[-30:].mean()) - float(l0[-30:].mean())) <= 0.25 * float(l0[-30:].mean())
    mean0 = float(torch.cat([b.reshape(-1) for b in b0]).mean())
    mean1 = float(torch.cat([b.reshape(-1) for b in b1]).mean())
    assert abs(mean1 - mean0) <= 0.1 * mean0, (mean0, mean1)


@pytest.mark.parametrize("case", ["switched_off", "float64", "three_dims", "eval"])
def test_reference_path_where_the_kernel_does_not_apply(extension, monkeypatch, case):
    _use_kernels(monkeypatch, case != "switched_off")
    model = _model(NeuronBits())
    layer = model[0]
    x = torch.randn(8, 12)
    if case == "float64":
        layer = layer.double()
        x = x.double()
    elif case == "three_dims":
        x = torch.randn(2, 4, 12)
    elif case == "eval":
        layer.eval()
    out = layer(x)
    assert not _fused(out)


def test_disabled_switch_values(monkeypatch):
    for value, expected in [("0", False), ("off", False), ("False", False), ("1", True), ("", True)]:
        monkeypatch.setenv(kernels.ENV_SWITCH, value)
        assert kernels.fused_kernels_enabled() is expected
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.extension_if_enabled() is None and not kernels.available()


@pytest.mark.parametrize("on", [False, True])
def test_batched_strength_update_equals_one_by_one(extension, monkeypatch, on):
    """``step_strengths`` (one kernel call for all quantizers) is ``step_strength`` of each in turn."""
    from mpqat.quant.bits import step_strengths

    _use_kernels(monkeypatch, on)
    models = [_model(NeuronBits(), seed=9), _model(NeuronBits(), seed=9)]
    quants = [[q for q in m.modules() if getattr(q, "strength", None) is not None] for m in models]
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        grads = [torch.randn(q.strength.shape, generator=gen) * 1e-2 for q in quants[0]]
        for q, g in zip(quants[0], grads):
            q.strength.grad = g.clone()
            q.step_strength(0.05, False)
        for q, g in zip(quants[1], grads):
            q.strength.grad = g.clone()
        step_strengths(quants[1], 0.05, False)
    for a, b in zip(quants[0], quants[1]):
        assert b.strength.grad is None
        assert torch.equal(a.strength, b.strength) and torch.equal(a.strength_floor, b.strength_floor)


def _value(t: torch.Tensor) -> float:
    return float(t.detach())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_fused_expected_bits_matches_the_reference_cost(extension, name):
    """The regularizer's ``bits`` cost: the same value and strength gradients as expected_weight_bits +
    expected_act_bits, to float rounding, for every recipe (fixed-bit first/last layers included)."""
    from mpqat.cost import expected_act_bits, expected_weight_bits
    from mpqat.kernels.nmp_cost import fused_expected_bits

    model = _model(RECIPES[name])
    strengths = [m.strength for m in model.modules() if getattr(m, "strength", None) is not None]
    fused = fused_expected_bits(model)
    assert fused is not None and fused.grad_fn is not None and "ExpectedBitsCost" in fused.grad_fn.name()
    fused_grads = torch.autograd.grad(fused, strengths)
    reference = expected_weight_bits(model) + expected_act_bits(model)
    reference_grads = torch.autograd.grad(reference, strengths)
    torch.testing.assert_close(fused.detach(), reference.detach(), rtol=1e-6, atol=0)
    for got, want in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_fused_expected_bits_follows_the_model_and_steps_aside(extension, monkeypatch):
    """A changed temperature and a replaced quantizer are seen (no stale plan); kernels off, a
    non-learned quantizer or a float64 model: None, and the reference cost is used."""
    from mpqat.cost import expected_act_bits, expected_weight_bits
    from mpqat.kernels.nmp_cost import fused_expected_bits
    from mpqat.methods.nmp import expected_cost
    from mpqat.quant.uniform import LSQWeightQuantizer

    model = _model(RECIPES["neuron"])
    first = _value(fused_expected_bits(model))
    for m in model.modules():
        if getattr(m, "strength", None) is not None:
            m.tau = 0.5
    retempered = _value(fused_expected_bits(model))
    assert retempered != first
    assert retempered == pytest.approx(_value(expected_weight_bits(model) + expected_act_bits(model)), rel=1e-6)
    layer = model[2]
    layer.weight_quant = LSQWeightQuantizer(layer.out_features, layer.in_features, bits=4)
    assert fused_expected_bits(model) is None
    assert _value(expected_cost(model, "bits")) == pytest.approx(
        _value(expected_weight_bits(model) + expected_act_bits(model)), rel=1e-6)
    other = _model(RECIPES["neuron"]).double()
    assert fused_expected_bits(other) is None
    _use_kernels(monkeypatch, False)
    assert fused_expected_bits(_model(RECIPES["neuron"])) is None
