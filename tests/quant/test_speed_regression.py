"""The fast training path computes what the original implementation computed.

``speed_regression_reference.pt`` holds inputs, parameters and the outputs/gradients recorded with
the implementation *before* the step-time work (git 8891f4f: ``quant/bits.py``, ``quant/uniform.py``,
``quant/functional.py``, ``nn/linear.py``). Every case below is replayed with the current code:

* forward values (training and eval), eval integer codes, scales and exponents must be **equal**;
* gradients, expected bits and initialised clips must agree to float32 round-off:
  ``max |new - old| <= 1e-6 * max |old|`` per tensor (on the machine that recorded them they are
  bit-identical too; sums and transcendental kernels may round differently on another CPU);
* short training runs (Adam + the NMP hooks: strength update, cost term) must end with the same
  bit-widths and parameters to ``1e-5`` relative.

The training runs also go through the trainer-side code (method hooks, cost terms): a deliberate
change of the numerics there needs a new recording. Re-record (with the code to compare against):
``python tests/quant/test_speed_regression.py --record tests/quant/speed_regression_reference.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from mpqat.models import MLP
from mpqat.nn.linear import QuantLinear
from mpqat.quant.bits import NeuronBitsActQuantizer, NeuronBitsWeightQuantizer
from mpqat.quant.uniform import LSQWeightQuantizer, Pow2ActQuantizer
from mpqat.quantize import quantize
from mpqat.recipes import Uniform

REFERENCE = Path(__file__).with_name("speed_regression_reference.pt")

# (name, kwargs) of the weight quantizers: default NMP, the budget candidates, layer granularity,
# per-candidate (not per-neuron) steps, a fixed 4-bit and a fixed 1-bit candidate.
WEIGHT_CASES: list[tuple[str, dict[str, Any]]] = [
    ("nmp_default", {}),
    ("nmp_budget", {"candidates": (2, 3, 4, 8), "thresholds": (0.25, 0.5, 0.75)}),
    ("nmp_layer_bits", {"per_neuron_bits": False}),
    ("nmp_layer_bits_layer_scale", {"per_neuron_bits": False, "per_neuron": False}),
    ("nmp_shared_scale", {"per_neuron": False}),
    ("nmp_fixed4", {"candidates": (4,), "thresholds": ()}),
    ("nmp_fixed1", {"candidates": (1,), "thresholds": ()}),
    ("nmp_two", {"candidates": (1, 2), "thresholds": (0.5,), "tau": 0.1}),
]
ACT_CASES: list[tuple[str, dict[str, Any]]] = [
    ("unsigned", {"signed": False}),
    ("signed", {"signed": True}),
    ("unsigned_layer_bits", {"signed": False, "per_feature_bits": False}),
    ("signed_layer_clip", {"signed": True, "per_feature": False}),
    ("unsigned_layer_all", {"signed": False, "per_feature_bits": False, "per_feature": False}),
    ("fixed8_signed", {"signed": True, "candidates": (8,), "thresholds": ()}),
    ("fixed4_unsigned", {"signed": False, "candidates": (4,), "thresholds": ()}),
    ("two_unsigned", {"signed": False, "candidates": (2, 4), "thresholds": (0.5,), "tau": 0.1}),
]
UNIFORM_W_CASES = [(b, p) for b in (1, 2, 4, 8) for p in (True, False)]
UNIFORM_A_CASES = [(b, s, p) for b, s, p in ((4, False, False), (4, False, True), (8, True, False), (2, True, True))]
OUT, IN, BATCH = 12, 20, 48


def _grads(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None or t.grad is None else t.grad.detach().clone() for t in tensors]


def _weight_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    w = torch.randn(OUT, IN, generator=gen) * 0.3
    w[0, :3] = 0.0  # sign(0) = +1 at 1 bit
    w[1, :4] = torch.tensor([-0.0, 1e-30, -1e-30, 5.0])  # tiny magnitudes and a clipped value
    return {"w": w, "g": torch.randn(OUT, IN, generator=gen)}


def _run_weight(kwargs: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    q = NeuronBitsWeightQuantizer(OUT, IN, **kwargs).train()
    q.load_state_dict(data["state"])
    w = data["w"].clone().requires_grad_(True)
    out = q(w)
    out.backward(data["g"])
    gw, gstep, gs = _grads(w, q.step, q.strength)
    result: dict[str, Any] = {"out": out.detach(), "grad_w": gw, "grad_step": gstep, "grad_strength": gs}
    if q.strength is not None:
        q.strength.grad = None
        e = q.expected_bits()
        (e * torch.arange(1.0, e.numel() + 1)).sum().backward()
        result.update(expected=e.detach(), grad_expected=q.strength.grad.clone())
    q.eval()
    w64 = data["w"].double()
    result.update(eval=q(data["w"]).detach(), codes=q.integer_codes(w64), scale=q.scale(), bits=q.bits())
    return result


def _make_weight(kwargs: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    q = NeuronBitsWeightQuantizer(OUT, IN, **kwargs).train()
    data = _weight_inputs(gen)
    q(data["w"])  # LSQ / absmean initialisation
    with torch.no_grad():
        q.step.mul_(torch.rand(q.step.shape, generator=gen) + 0.5)
        q.step[..., :1, :].neg_()  # a negative step: |step| and sign(step) in the gradient
        if q.strength is not None:
            q.strength.copy_(torch.rand(q.strength.shape, generator=gen))
    data["state"] = {k: v.clone() for k, v in q.state_dict().items()}
    return data


def _act_inputs(gen: torch.Generator, signed: bool) -> dict[str, torch.Tensor]:
    x = torch.randn(BATCH, IN, generator=gen) * torch.linspace(0.1, 4.0, IN)
    if not signed:
        x = x.relu()
    x[:, 3] = 0.0  # a dead feature (median clip at init)
    return {"x": x, "g": torch.randn(BATCH, IN, generator=gen)}


def _run_act(kwargs: dict[str, Any], data: dict[str, Any], init: bool) -> dict[str, Any]:
    q = NeuronBitsActQuantizer(IN, **kwargs).train()
    if not init:
        q.load_state_dict(data["state"])
    x = data["x"].clone().requires_grad_(True)
    out = q(x)
    out.backward(data["g"])
    gx, gclip, gs = _grads(x, q.log2_clip, q.strength)
    result: dict[str, Any] = {"out": out.detach(), "grad_x": gx, "grad_clip": gclip, "grad_strength": gs,
                              "log2_clip": q.log2_clip.detach().clone()}
    q.eval()
    x64 = data["x"].double()
    result.update(eval=q(data["x"]).detach(), codes=q.integer_codes(x64), step=q.step(), exponents=q.exponents(),
                  bits=q.bits())
    return result


def _make_act(kwargs: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    q = NeuronBitsActQuantizer(IN, **kwargs).train()
    data = _act_inputs(gen, kwargs["signed"])
    q(data["x"])
    with torch.no_grad():
        q.log2_clip.add_(torch.rand(q.log2_clip.shape, generator=gen) - 0.5)
        if q.strength is not None:
            q.strength.copy_(torch.rand(q.strength.shape, generator=gen))
    data["state"] = {k: v.clone() for k, v in q.state_dict().items()}
    return data


def _run_uniform_w(bits: int, per_neuron: bool, data: dict[str, Any]) -> dict[str, Any]:
    q = LSQWeightQuantizer(OUT, IN, bits, per_neuron=per_neuron).train()
    q.load_state_dict(data["state"])
    w = data["w"].clone().requires_grad_(True)
    out = q(w)
    out.backward(data["g"])
    gw, gstep = _grads(w, q.step)
    return {"out": out.detach(), "grad_w": gw, "grad_step": gstep, "eval": q.eval()(data["w"]).detach(),
            "codes": q.integer_codes(data["w"].double()), "scale": q.scale().detach()}


def _make_uniform_w(bits: int, per_neuron: bool, gen: torch.Generator) -> dict[str, Any]:
    q = LSQWeightQuantizer(OUT, IN, bits, per_neuron=per_neuron).train()
    data = _weight_inputs(gen)
    q(data["w"])
    with torch.no_grad():
        q.step.mul_(torch.rand(q.step.shape, generator=gen) + 0.5)
        q.step[:1].neg_()
    data["state"] = {k: v.clone() for k, v in q.state_dict().items()}
    return data


def _run_uniform_a(bits: int, signed: bool, per_feature: bool, data: dict[str, Any], init: bool) -> dict[str, Any]:
    q = Pow2ActQuantizer(IN, bits, signed=signed, per_feature=per_feature).train()
    if not init:
        q.load_state_dict(data["state"])
    x = data["x"].clone().requires_grad_(True)
    out = q(x)
    out.backward(data["g"])
    gx, gstep = _grads(x, q.log2_step)
    return {"out": out.detach(), "grad_x": gx, "grad_step": gstep, "log2_step": q.log2_step.detach().clone(),
            "eval": q.eval()(data["x"]).detach(), "codes": q.integer_codes(data["x"].double()),
            "exponents": q.exponents()}


def _make_uniform_a(bits: int, signed: bool, per_feature: bool, gen: torch.Generator) -> dict[str, Any]:
    q = Pow2ActQuantizer(IN, bits, signed=signed, per_feature=per_feature).train()
    data = _act_inputs(gen, signed)
    q(data["x"])
    with torch.no_grad():
        q.log2_step.add_(torch.rand(q.log2_step.shape, generator=gen) - 0.5)
    data["state"] = {k: v.clone() for k, v in q.state_dict().items()}
    return data


def _recipes() -> dict[str, Any]:
    from mpqat.methods.nmp import NeuronBits

    return {
        "uniform_w4a4": Uniform(w_bits=4, a_bits=4),
        "uniform_w2a8_feature": Uniform(w_bits=2, a_bits=8, per_feature_act=True, first_layer_w_bits=1),
        "nmp_default": NeuronBits(),
        "nmp_budget": NeuronBits(w_candidates=(2, 3, 4, 8), strength_lr_mult=5.0, reg="bits", reg_weight=0.03),
        "nmp_layer_bitops": NeuronBits(granularity="layer", reg="bitops", reg_weight=0.05, strength_lr_mult=50.0),
        "nmp_learned_input_shrink": NeuronBits(input_bits=None, allow_shrink=True, strength_lr_mult=50.0,
                                               reg="bits", reg_weight=0.01),
    }


def _run_training(name: str, steps: int = 6) -> dict[str, Any]:
    """A few Adam steps on a small MLP with the method's hooks, as ``mpqat.train.fit`` runs them."""
    from mpqat.methods import hooks_for

    recipe = _recipes()[name]
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(0)
    model = quantize(MLP(10, 3, hidden=(16, 12)), recipe)
    x = torch.randn(steps, 64, 10, generator=gen) * 2.0
    y = torch.randint(0, 3, (steps, 64), generator=gen)
    hooks = hooks_for(recipe)
    groups = [g for g in hooks.param_groups(model, 2e-2, 1e-4) if g["params"]]
    optimizer = torch.optim.Adam(groups, lr=2e-2)
    hooks.on_epoch_start(model, 0, 2)
    losses = []
    model.train()
    for i in range(steps):
        loss = F.cross_entropy(model(x[i]), y[i])
        extra = hooks.extra_loss(model, 0, i)
        loss = loss if extra is None else loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        hooks.after_step(model)
        losses.append(float(loss.detach()))
    model.eval()
    bits = [m.weight_quant.bits().clone() for m in model.modules() if isinstance(m, QuantLinear)]
    bits += [m.act_quant.bits().clone() for m in model.modules() if isinstance(m, QuantLinear)]
    return {"losses": torch.tensor(losses), "state": {k: v.clone() for k, v in model.state_dict().items()},
            "bits": bits, "eval": model(x[0]).detach()}


def record(path: Path) -> None:
    """Build the inputs and record the current implementation's outputs to ``path``."""
    gen = torch.Generator().manual_seed(2024)
    ref: dict[str, Any] = {"weight": {}, "act": {}, "uniform_w": {}, "uniform_a": {}, "train": {}}
    for name, kwargs in WEIGHT_CASES:
        data = _make_weight(kwargs, gen)
        ref["weight"][name] = {"data": data, "result": _run_weight(kwargs, data)}
    for name, kwargs in ACT_CASES:
        data = _make_act(kwargs, gen)
        ref["act"][name] = {"data": data, "result": _run_act(kwargs, data, init=False),
                            "init": _run_act(kwargs, data, init=True)}
    for bits, per_neuron in UNIFORM_W_CASES:
        data = _make_uniform_w(bits, per_neuron, gen)
        ref["uniform_w"][(bits, per_neuron)] = {"data": data, "result": _run_uniform_w(bits, per_neuron, data)}
    for bits, signed, per_feature in UNIFORM_A_CASES:
        data = _make_uniform_a(bits, signed, per_feature, gen)
        ref["uniform_a"][(bits, signed, per_feature)] = {
            "data": data, "result": _run_uniform_a(bits, signed, per_feature, data, init=False),
            "init": _run_uniform_a(bits, signed, per_feature, data, init=True)}
    for name in _recipes():
        ref["train"][name] = _run_training(name)
    torch.save(ref, path)


@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    """These cases test the Python implementation; the fused kernels (mpqat.kernels) have their own tests
    against it (tests/kernels), since Adam turns their float-rounding differences into visible ones."""
    monkeypatch.setenv("MPQAT_FUSED_KERNELS", "0")


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return torch.load(REFERENCE, weights_only=False)


def _check(new: dict[str, Any], old: dict[str, Any], exact: set[str]) -> None:
    assert new.keys() == old.keys()
    for key, want in old.items():
        got = new[key]
        if want is None or got is None:
            assert got is None and want is None, key
            continue
        assert got.shape == want.shape and got.dtype == want.dtype, key
        if key in exact or want.numel() == 0:
            assert torch.equal(got, want), key
        else:
            tol = 1e-6 * float(want.abs().max().clamp_min(1e-30))
            assert float((got - want).abs().max()) <= tol, (key, float((got - want).abs().max()), tol)


# Compared exactly: values made of IEEE-exact elementwise ops on the stored state (the same on any
# CPU). The rest (gradients, and values through sigmoid/log2 or sums) within float32 round-off.
FORWARD = {"out", "eval", "codes", "scale", "bits", "step", "exponents"}


@pytest.mark.parametrize(("name", "kwargs"), WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_weight_quantizer_matches_reference(reference, name, kwargs):
    case = reference["weight"][name]
    _check(_run_weight(kwargs, case["data"]), case["result"], FORWARD)


@pytest.mark.parametrize(("name", "kwargs"), ACT_CASES, ids=[c[0] for c in ACT_CASES])
def test_act_quantizer_matches_reference(reference, name, kwargs):
    case = reference["act"][name]
    _check(_run_act(kwargs, case["data"], init=False), case["result"], FORWARD)
    _check(_run_act(kwargs, case["data"], init=True), case["init"], FORWARD)


@pytest.mark.parametrize(("bits", "per_neuron"), UNIFORM_W_CASES)
def test_uniform_weight_quantizer_matches_reference(reference, bits, per_neuron):
    case = reference["uniform_w"][(bits, per_neuron)]
    _check(_run_uniform_w(bits, per_neuron, case["data"]), case["result"], FORWARD)


@pytest.mark.parametrize(("bits", "signed", "per_feature"), UNIFORM_A_CASES)
def test_uniform_act_quantizer_matches_reference(reference, bits, signed, per_feature):
    case = reference["uniform_a"][(bits, signed, per_feature)]
    _check(_run_uniform_a(bits, signed, per_feature, case["data"], init=False), case["result"], FORWARD)
    _check(_run_uniform_a(bits, signed, per_feature, case["data"], init=True), case["init"], FORWARD)


@pytest.mark.parametrize("name", list(_recipes()))
def test_short_training_matches_reference(reference, name):
    old, new = reference["train"][name], _run_training(name)
    assert all(torch.equal(a, b) for a, b in zip(new["bits"], old["bits"]))
    assert torch.allclose(new["losses"], old["losses"], rtol=1e-5, atol=0)
    for key, want in old["state"].items():
        got = new["state"][key]
        if want.is_floating_point() and want.numel():
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max().clamp_min(1e-30))), key
        else:
            assert torch.equal(got, want), key
    assert torch.allclose(new["eval"], old["eval"], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--record":
        raise SystemExit("usage: python tests/quant/test_speed_regression.py --record PATH")
    record(Path(sys.argv[2]))


def _quantizers() -> list[tuple[torch.nn.Module, torch.Tensor, str]]:
    torch.manual_seed(5)
    return [
        (NeuronBitsWeightQuantizer(4, 6), torch.randn(4, 6), "step"),
        (NeuronBitsActQuantizer(6, signed=True), torch.randn(8, 6), "log2_clip"),
        (LSQWeightQuantizer(4, 6, bits=3), torch.randn(4, 6), "step"),
        (Pow2ActQuantizer(6, bits=4, signed=False, per_feature=True), torch.randn(8, 6).relu(), "log2_step"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_cached_per_step_tensors_follow_every_change(index):
    """In-place updates, strengths, loaded state and dtype changes all reach the cached tensors."""
    import copy

    q, x, name = _quantizers()[index]
    q.train()(x)
    param = getattr(q, name)

    def fresh(module: torch.nn.Module, inp: torch.Tensor) -> torch.Tensor:
        return copy.deepcopy(module)(inp)  # a copy starts with empty caches

    with torch.no_grad():
        param.mul_(1.37)  # what an optimizer step does
    out = q(x)
    assert torch.equal(out, fresh(q, x))
    strength = getattr(q, "strength", None)
    if strength is not None:
        with torch.no_grad():
            strength.fill_(0.9)  # highest bucket
        assert torch.equal(q(x), fresh(q, x)) and not torch.equal(q(x), out)
    other = copy.deepcopy(q)
    with torch.no_grad():
        getattr(other, name).add_(0.5)
    q.load_state_dict(other.state_dict())
    assert torch.equal(q(x), other(x))
    q64 = copy.deepcopy(q).double()
    out64 = q64(x.double())
    assert out64.dtype == torch.float64 and torch.allclose(out64, q(x).double(), atol=1e-6)
    q.eval()
    assert torch.equal(q(x.double()), fresh(q, x.double()))
