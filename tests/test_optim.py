"""The trainer's optimizer: fused Adam for groups of small quantizer tensors, the plain update elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch

from mpqat.errors import ConfigError
from mpqat.methods import hooks_for
from mpqat.methods.nmp import NeuronBits
from mpqat.models import MLP
from mpqat.optim import SMALL_TENSORS, make_optimizer
from mpqat.quantize import quantize


def _params(seed: int = 0) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(4, 2, 1, generator=g))


def _run(opt: torch.optim.Optimizer, params: tuple[torch.nn.Parameter, ...], steps: int = 20) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_unmarked_groups_update_exactly_like_torch_and_marked_ones_like_fused_adam(name: str) -> None:
    w, s = _params()
    w_ref, s_ref = (torch.nn.Parameter(p.detach().clone()) for p in (w, s))
    opt = make_optimizer([{"params": [w], "weight_decay": 0.01}, {"params": [s], SMALL_TENSORS: True}], name, lr=1e-2)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    ref = cls([{"params": [w_ref], "weight_decay": 0.01}, {"params": [s_ref]}], lr=1e-2)
    assert [bool(g.get("fused")) for g in opt.param_groups] == [False, True]
    _run(opt, (w, s))
    _run(ref, (w_ref, s_ref))
    assert torch.equal(w, w_ref)                                  # the weights: bit for bit
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-6)    # the fused kernel: same update, other rounding
    assert not torch.equal(s, _params()[1])


def test_sgd_ignores_the_mark_and_unknown_names_are_refused() -> None:
    w, s = _params()
    opt = make_optimizer([{"params": [w]}, {"params": [s], SMALL_TENSORS: True}], "sgd", lr=0.1)
    assert not any(g.get("fused") for g in opt.param_groups)
    with pytest.raises(ConfigError, match="choose adam, adamw, sgd"):
        make_optimizer([{"params": [w]}], "lion", lr=0.1)


def test_empty_groups_are_dropped_and_mixed_dtypes_stay_unfused() -> None:
    w, s = _params()
    half = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = make_optimizer([{"params": []}, {"params": [s, half], SMALL_TENSORS: True}, {"params": [w]}], "adam", lr=0.1)
    assert len(opt.param_groups) == 2 and not any(g.get("fused") for g in opt.param_groups)


def test_fused_step_bumps_versions_so_cached_quantizer_tensors_are_refreshed() -> None:
    torch.manual_seed(0)
    recipe = NeuronBits()
    model = quantize(MLP(6, 3, hidden=(8,)), recipe).train()
    hooks = hooks_for(recipe)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    model(x)  # initialise the quantizers
    opt = make_optimizer(hooks.param_groups(model, 1e-2, 0.0), "adam", lr=1e-2)
    assert {g["name"] for g in opt.param_groups if g.get("fused")} == {"scales", "clips"}
    step = model[0].weight_quant.step
    for _ in range(3):
        before = step._version
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        hooks.after_step(model)
        assert step._version > before
    # A copy starts without caches (quantizers drop them when copied): it must compute what the
    # stepped model computes from its cached tensors, in training and in eval.
    fresh = copy.deepcopy(model)
    assert torch.equal(model(x), fresh(x))
    assert torch.equal(model.eval()(x), fresh.eval()(x))


def test_the_flag_travels_with_the_state_dict_so_old_runs_resume_as_they_started() -> None:
    w, s = _params()
    old = torch.optim.Adam([{"params": [w]}, {"params": [s]}], lr=0.1)  # a checkpoint from before the flag
    _run(old, (w, s), steps=2)
    opt = make_optimizer([{"params": [w]}, {"params": [s], SMALL_TENSORS: True}], "adam", lr=0.1)
    opt.load_state_dict(old.state_dict())
    assert not any(g.get("fused") for g in opt.param_groups)
    new = make_optimizer([{"params": [w]}, {"params": [s], SMALL_TENSORS: True}], "adam", lr=0.1)
    _run(new, (w, s), steps=2)
    again = make_optimizer([{"params": [w]}, {"params": [s], SMALL_TENSORS: True}], "adam", lr=0.1)
    again.load_state_dict(new.state_dict())
    assert [bool(g.get("fused")) for g in again.param_groups] == [False, True]
    _run(again, (w, s), steps=1)
