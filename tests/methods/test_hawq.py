"""HAWQ baseline: recipe validation, FP phase + allocation inside the trainer, end-to-end runs."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mpqat.cost import model_cost
from mpqat.errors import ConfigError
from mpqat.methods import hooks_for
from mpqat.methods.hawq import (
    HawqHooks,
    HessianILP,
    float_mode,
    hawq_layers,
    is_allocated,
    prepare,
    train_float,
)
from mpqat.quantize import quantize
from mpqat.recipes import recipe_from_dict
from mpqat.train import TrainConfig
from toys import toy_data, toy_model, train_until_killed

_data, _model = toy_data, toy_model





# ------------------------------------------------------------------------------------------ recipe


def test_recipe_defaults_round_trip_and_cli_style_values():
    r = recipe_from_dict({"method": "hawq", "budget": 3, "candidates": [8, 2, 4, 4]})
    assert r.budget == 3.0 and isinstance(r.budget, float)
    assert r.candidates == (2, 4, 8)
    assert recipe_from_dict(r.to_dict()) == r
    assert isinstance(hooks_for(r), HawqHooks)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"budget_kind": "bits"}, "budget_kind"),
        ({"budget": 0}, "budget"),
        ({"budget": float("nan")}, "budget"),
        ({"candidates": []}, "candidates"),
        ({"candidates": [2, 40]}, "candidates"),
        ({"sensitivity": "fisher"}, "sensitivity"),
        ({"a_bits": 1}, "a_bits"),
        ({"hutchinson_samples": 0}, "hutchinson_samples"),
        ({"fp_epochs": -1}, "fp_epochs"),
        ({"pin_first_last": "yes"}, "pin_first_last"),
        ({"budjet": 3}, "unknown key"),
    ],
)
def test_bad_recipes_are_config_errors(fields, fragment):
    with pytest.raises(ConfigError, match=fragment):
        recipe_from_dict({"method": "hawq", **fields})


# --------------------------------------------------------------------------------- float mode, prepare


def test_float_mode_bypasses_and_then_restores_the_quantizers():
    model = _model(HessianILP(candidates=(2,)))
    x = torch.randn(5, 6)
    model.train()
    quantized = model(x)
    with float_mode(model):
        reference = model[4](torch.relu(model[2](torch.relu(model[0](x)))))
        assert torch.equal(model(x), reference)
        assert not torch.allclose(model(x), quantized)
    assert torch.equal(model(x), quantized)


def test_float_phase_keeps_the_epoch_of_lowest_validation_loss():
    X, y = _data(seed=1)
    Xv, yv = _data(n=100, seed=2)
    model = _model(HessianILP())
    with float_mode(model):
        untrained = torch.nn.functional.cross_entropy(model(torch.from_numpy(Xv)), torch.from_numpy(yv)).item()
    fp = train_float(model, (X, y), (Xv, yv), epochs=40, lr=1e-2, batch_size=32,
                     generator=torch.Generator().manual_seed(0), patience=3)
    assert 1 <= fp.best_epoch <= 40 and fp.valid_loss < untrained
    model.eval()
    with float_mode(model), torch.no_grad():
        logits = model(torch.from_numpy(Xv))
    assert torch.nn.functional.cross_entropy(logits, torch.from_numpy(yv)).item() == pytest.approx(fp.valid_loss)
    assert float((logits.argmax(1).numpy() == yv).mean()) == pytest.approx(fp.valid_accuracy)


@pytest.mark.parametrize("kind", ["avg_bits", "size", "bitops"])
def test_prepare_meets_every_kind_of_budget(kind):
    X, y = _data()
    probe = _model(HessianILP())
    full = {"avg_bits": "avg_weight_bits", "size": "size_bytes", "bitops": "bitops"}[kind]
    at_8 = model_cost(probe).summary()[full]
    budget = 3.5 if kind == "avg_bits" else 0.6 * at_8
    recipe = HessianILP(budget_kind=kind, budget=budget, fp_epochs=2, hutchinson_samples=32)
    model = _model(recipe)
    allocation = prepare(model, recipe, (X, y), (X, y), torch.Generator().manual_seed(0))
    achieved = model_cost(model).summary()[full]
    assert achieved == pytest.approx(allocation.achieved, rel=1e-12)
    assert achieved <= budget
    assert is_allocated(model)
    layer_bits = [int(m.weight_quant.bit_widths[0]) for m in hawq_layers(model).values()]
    assert list(allocation.bits) == layer_bits
    assert set(layer_bits) <= set(recipe.candidates)


def test_loss_sensitivity_and_pinned_first_last_layers():
    X, y = _data()
    recipe = HessianILP(budget=5.0, sensitivity="loss", pin_first_last=True, candidates=(2, 4), fp_epochs=2)
    model = _model(recipe)
    allocation = prepare(model, recipe, (X, y), (X, y), torch.Generator().manual_seed(0))
    assert allocation.bits[0] == 8 and allocation.bits[-1] == 8
    assert allocation.bits[1] in (2, 4)
    assert model_cost(model).avg_weight_bits <= 5.0


def test_impossible_budget_fails_before_any_training():
    X, y = _data()
    recipe = HessianILP(budget=3.0, pin_first_last=True)
    model = _model(recipe)
    weights = model[0].weight.detach().clone()
    with pytest.raises(ConfigError, match=r"smallest feasible budget is 3\.826"):  # ((6*32+16*2)*8+32*16*2)/736
        prepare(model, recipe, (X, y), (X, y))
    assert torch.equal(model[0].weight, weights)
    with pytest.raises(ConfigError, match="smallest feasible budget"):
        HawqHooks(recipe).on_fit_start(model, (X, y), (X, y))


def test_hooks_without_data_say_what_is_missing():
    recipe = HessianILP()
    with pytest.raises(ConfigError, match="on_fit_start"):
        HawqHooks(recipe).on_epoch_start(_model(recipe), 0, 5)


# ----------------------------------------------------------------------------------- end to end


def _cfg():
    return TrainConfig(epochs=8, batch_size=64, progress=False)


def test_end_to_end_breast_cancer_meets_the_budget(tmp_path):
    from mpqat.runs import load_run, train_run

    recipe = HessianILP(budget=3.0, fp_epochs=10, hutchinson_samples=64)
    metrics = train_run("breast-cancer", recipe, tmp_path / "run", config=_cfg())
    assert metrics["method"] == "hawq"
    assert metrics["avg_weight_bits"] <= 3.0
    assert metrics["test_accuracy"] > 0.9
    assert metrics["hawq_allocated"] is True
    assert metrics["allocation"]["achieved"] == metrics["avg_weight_bits"]
    assert set(metrics["layer_bits"]) == {"0", "2", "4"}
    assert all(s["trace_per_param"] > 0 for s in metrics["sensitivity"].values())
    assert metrics["allocation"]["solve_seconds"] >= 0 and metrics["sensitivity_seconds"] > 0
    assert 1 <= metrics["fp_best_epoch"] <= 10 and metrics["fp_valid_accuracy"] > 0.9
    json.dumps(metrics)
    run = load_run(tmp_path / "run")               # bits come back from the state_dict alone
    assert model_cost(run.model).avg_weight_bits == metrics["avg_weight_bits"]
    assert run.metrics["layer_bits"] == metrics["layer_bits"]


def test_resume_after_the_allocation_gives_the_same_run(tmp_path, monkeypatch):
    import mpqat.runs as runs

    recipe = HessianILP(budget=3.0, fp_epochs=3, hutchinson_samples=16)
    full = runs.train_run("breast-cancer", recipe, tmp_path / "full", config=_cfg())

    train_until_killed(monkeypatch, "breast-cancer", recipe, tmp_path / "cut", _cfg(), at_epoch=3)
    resumed = runs.train_run("breast-cancer", recipe, tmp_path / "cut", config=_cfg(), resume=True)
    assert resumed["resumed_from_epoch"] == 3
    for key in ("test_accuracy", "avg_weight_bits", "layer_bits", "sensitivity", "fp_valid_accuracy"):
        assert resumed[key] == full[key], key


def test_cli_reports_an_infeasible_budget_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mpqat", "train", "--dataset", "breast-cancer", "--method", "hawq",
         "--set", "budget=1.5", "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "smallest feasible budget is 2 average weight bits" in result.stderr


def test_cli_trains_hawq_with_a_budget(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mpqat", "train", "--dataset", "breast-cancer", "--method", "hawq",
         "--set", "budget=3", "--set", "fp_epochs=3", "--set", "hutchinson_samples=16", "--epochs", "2",
         "--out", str(tmp_path / "r"), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["avg_weight_bits"] <= 3.0 and metrics["method"] == "hawq"


def test_float_mode_blocks_nest():
    q = quantize(nn.Sequential(nn.Linear(3, 2)), HessianILP())
    x = torch.randn(4, 3)
    with float_mode(q):
        with float_mode(q):
            pass
        assert torch.equal(q(x), F.linear(x, q[0].weight, q[0].bias))  # still float after the inner block
    assert "forward" not in q[0].__dict__
