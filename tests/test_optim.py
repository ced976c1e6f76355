"""The trainer's optimizer: groups of small quantizer tensors through one kernel call (or torch's fused
Adam without the extension), every other group exactly as torch.optim does."""

from __future__ import annotations

import copy

import pytest
import torch

from mpqat import kernels
from mpqat.errors import ConfigError
from mpqat.methods import hooks_for
from mpqat.methods.nmp import NeuronBits
from mpqat.models import MLP
from mpqat.optim import SMALL_TENSORS, make_optimizer
from mpqat.quantize import quantize

PATHS = ["kernel", "torch-fused"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    """Run a test with the small-tensor kernel, and with the extension switched off."""
    monkeypatch.setenv(kernels.ENV_SWITCH, "1" if request.param == "kernel" else "0")
    if request.param == "kernel" and not kernels.available():
        pytest.skip("the mpqat.kernels extension could not be built here")
    return request.param


def _params(seed: int = 0) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(4, 2, 1, generator=g))


def _run(opt: torch.optim.Optimizer, params: tuple[torch.nn.Parameter, ...], steps: int = 20, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 10 ** float(torch.randn((), generator=g))
        opt.step()


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_unmarked_groups_update_exactly_like_torch_and_marked_ones_like_adam(path: str, name: str) -> None:
    w, s = _params()
    w_ref, s_ref = (torch.nn.Parameter(p.detach().clone()) for p in (w, s))
    groups = [{"params": [w], "weight_decay": 0.01}, {"params": [s], "weight_decay": 0.02, "lr": 3e-2, SMALL_TENSORS: True}]
    opt = make_optimizer(groups, name, lr=1e-2)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    ref = cls([{"params": [w_ref], "weight_decay": 0.01}, {"params": [s_ref], "weight_decay": 0.02, "lr": 3e-2}], lr=1e-2)
    assert [bool(g.get("fused")) for g in opt.param_groups] == [False, path == "torch-fused"]
    _run(opt, (w, s))
    _run(ref, (w_ref, s_ref))
    assert torch.equal(w, w_ref)                                  # the weights: bit for bit
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-6)    # the same update, other rounding
    assert not torch.allclose(s, _params()[1])
    assert s.grad is not None                                     # the gradients are given back
    for key in ("exp_avg", "exp_avg_sq"):
        want = ref.state[s_ref][key]
        torch.testing.assert_close(opt.state[s][key], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert float(opt.state[s]["step"]) == float(ref.state[s_ref]["step"]) == 20.0


def test_a_checkpoint_resumes_under_torch_adam_and_back(path: str) -> None:
    """The state is torch.optim's: a run can go on with plain torch Adam, and a torch Adam state can
    go on with make_optimizer, with the same trajectory to rounding."""
    w, s = _params()
    opt = make_optimizer([{"params": [w]}, {"params": [s], SMALL_TENSORS: True}], "adam", lr=1e-2)
    _run(opt, (w, s), steps=5)
    saved = copy.deepcopy(opt.state_dict())
    w2, s2 = (torch.nn.Parameter(p.detach().clone()) for p in (w, s))
    plain = torch.optim.Adam([{"params": [w2]}, {"params": [s2], SMALL_TENSORS: True}], lr=1e-2)
    plain.load_state_dict(saved)
    _run(opt, (w, s), steps=5, seed=2)
    _run(plain, (w2, s2), steps=5, seed=2)
    torch.testing.assert_close(s, s2, rtol=1e-5, atol=1e-6)
    back = make_optimizer([{"params": [w2]}, {"params": [s2], SMALL_TENSORS: True}], "adam", lr=1e-2)
    back.load_state_dict(plain.state_dict())
    _run(back, (w2, s2), steps=3, seed=3)
    _run(opt, (w, s), steps=3, seed=3)
    torch.testing.assert_close(s, s2, rtol=1e-5, atol=1e-6)


def test_sgd_ignores_the_mark_and_unknown_names_are_refused() -> None:
    w, s = _params()
    opt = make_optimizer([{"params": [w]}, {"params": [s], SMALL_TENSORS: True}], "sgd", lr=0.1)
    assert not any(g.get("fused") for g in opt.param_groups)
    with pytest.raises(ConfigError, match="choose adam, adamw, sgd"):
        make_optimizer([{"params": [w]}], "lion", lr=0.1)


def test_empty_groups_are_dropped_and_other_dtypes_take_torch_adam(path: str) -> None:
    w, s = _params()
    double = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    ref = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = make_optimizer([{"params": []}, {"params": [s, double], SMALL_TENSORS: True}, {"params": [w]}], "adam", lr=0.1)
    assert len(opt.param_groups) == 2 and not any(g.get("fused") for g in opt.param_groups)
    plain = torch.optim.Adam([ref], lr=0.1)
    for p, o in ((double, opt), (ref, plain)):
        p.grad = torch.ones(3, dtype=torch.float64)
        s.grad = torch.ones_like(s)
        w.grad = torch.ones_like(w)
        o.step()
    assert torch.equal(double, ref)


def test_amsgrad_groups_are_left_to_torch(path: str) -> None:
    w, s = _params()
    s_ref = torch.nn.Parameter(s.detach().clone())
    opt = make_optimizer([{"params": [w]}, {"params": [s], SMALL_TENSORS: True, "amsgrad": True}], "adam", lr=1e-2)
    ref = torch.optim.Adam([s_ref], lr=1e-2, amsgrad=True, fused=path == "torch-fused")
    _run(opt, (w, s), steps=4)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        torch.randn(w.shape, generator=g) * 10 ** float(torch.randn((), generator=g))  # w's draws, as in _run
        s_ref.grad = torch.randn(s.shape, generator=g) * 10 ** float(torch.randn((), generator=g))
        ref.step()
    assert "max_exp_avg_sq" in opt.state[s]
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-7)


def test_quantizer_caches_see_every_update(path: str) -> None:
    torch.manual_seed(0)
    recipe = NeuronBits()
    model = quantize(MLP(6, 3, hidden=(8,)), recipe).train()
    hooks = hooks_for(recipe)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    model(x)  # initialise the quantizers
    opt = make_optimizer(hooks.param_groups(model, 1e-2, 0.0), "adam", lr=1e-2)
    assert {g["name"] for g in opt.param_groups if g.get(SMALL_TENSORS)} == {"scales", "clips"}
    step = model[0].weight_quant.step
    for _ in range(3):
        before, value = step._version, step.detach().clone()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        hooks.after_step(model)
        assert step._version > before and not torch.equal(step, value)
    # A copy starts without caches (quantizers drop them when copied): it must compute what the
    # stepped model computes from its cached tensors, in training and in eval.
    fresh = copy.deepcopy(model)
    assert torch.equal(model(x), fresh(x))
    assert torch.equal(model.eval()(x), fresh.eval()(x))


def test_adam_with_decoupled_weight_decay_in_a_group_is_adamw(path: str) -> None:
    """torch's Adam takes ``decoupled_weight_decay`` per group; the kernel follows the group's setting."""
    w, s = _params()
    w_ref, s_ref = (torch.nn.Parameter(p.detach().clone()) for p in (w, s))
    group = {"params": [s], "weight_decay": 0.1, "decoupled_weight_decay": True, SMALL_TENSORS: True}
    opt = make_optimizer([{"params": [w]}, group], "adam", lr=1e-2)
    ref = torch.optim.AdamW([{"params": [w_ref], "weight_decay": 0.0}, {"params": [s_ref], "weight_decay": 0.1}], lr=1e-2)
    _run(opt, (w, s), steps=10)
    _run(ref, (w_ref, s_ref), steps=10)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-6)
