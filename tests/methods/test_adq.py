"""ADQ: recipe validation, layers, sensitivity + ILP allocation, EMA/freeze hooks, KD, end-to-end runs."""

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from mpqat.cost import model_cost
from mpqat.errors import ConfigError
from mpqat.methods import hooks_for
from mpqat.methods.adq import (
    ADQ,
    ADQHooks,
    adq_layers,
    avg_bit_costs,
    codebook_layers,
    freeze_from_epoch,
    is_prepared,
    kd_loss,
    prepare,
    teacher_logits,
)
from mpqat.methods.allocation import brute_force_allocation, solve_allocation
from mpqat.methods.hawq import float_mode, train_float
from mpqat.methods.sensitivity import TraceEstimate, hessian_omega, quant_error
from mpqat.quant.codebook import CodebookWeightQuantizer, codebook_fake_quant
from mpqat.quant.n2uq import ThresholdActQuantizer
from mpqat.quant.uniform import LSQWeightQuantizer, Pow2ActQuantizer
from mpqat.recipes import recipe_from_dict
from mpqat.train import TrainConfig, fit
from toys import toy_data, toy_model, train_until_killed

_data, _model = toy_data, toy_model






# ------------------------------------------------------------------------------------------ recipe


def test_recipe_round_trips_and_has_hooks():
    r = recipe_from_dict({"method": "adq", "avg_bits": 3, "candidates": [4, 2, 2]})
    assert r.avg_bits == 3.0 and isinstance(r.avg_bits, float) and r.candidates == (2, 4)
    assert recipe_from_dict(r.to_dict()) == r
    assert isinstance(hooks_for(r), ADQHooks)


def test_level_grad_round_trips_and_is_left_out_at_its_default():
    r = recipe_from_dict({"method": "adq", "avg_bits": 2.8, "level_grad": True, "ema": False})
    assert r.level_grad is True and r.to_dict()["level_grad"] is True
    assert recipe_from_dict(r.to_dict()) == r
    lsq = recipe_from_dict({"method": "adq", "level_grad": True, "level_grad_mode": "lsq"})
    assert lsq.to_dict()["level_grad_mode"] == "lsq" and recipe_from_dict(lsq.to_dict()) == lsq
    assert "level_grad_mode" not in r.to_dict()
    default = ADQ(avg_bits=2.8)
    assert "level_grad" not in default.to_dict() and recipe_from_dict(default.to_dict()) == default
    # the fingerprint of a default recipe (what the benchmark cache keys on) is unchanged
    assert set(default.to_dict()) == {"method", *(f for f in ADQ.__dataclass_fields__
                                                 if f not in ("channel_scale", "ste", "level_grad",
                                                              "level_grad_mode"))}


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"avg_bits": 1.9}, r"avg_bits=1.9 is impossible: the smallest average is 2"),
        ({"avg_bits": 2.5, "candidates": [3, 4]}, "smallest average is 3"),
        ({"avg_bits": 0}, "avg_bits"),
        ({"candidates": []}, "candidates"),
        ({"candidates": [1, 2]}, "codebook index bits"),
        ({"w_bits": 9}, "w_bits"),
        ({"act": "pact"}, "act"),
        ({"levels": "asym"}, "levels"),
        ({"init": "kmeans"}, "init"),
        ({"sensitivity": "fisher"}, "sensitivity"),
        ({"allocation": "greedy"}, "allocation"),
        ({"ema": "yes"}, "ema"),
        ({"decay": 1.0}, "decay"),
        ({"freeze_codebook_last": 1.5}, "freeze_codebook_last"),
        ({"update_every": 0}, "update_every"),
        ({"kd": -1}, "kd"),
        ({"a_bits": 12}, "too many"),
        ({"avg_bitz": 3}, "unknown key"),
        ({"level_grad": "yes"}, "level_grad"),
        ({"level_grad": 1}, "level_grad=1 must be true or false"),
        ({"level_grad": True, "level_grad_mode": "exact"}, "level_grad_mode"),
        ({"level_grad_mode": "lsq"}, "needs level_grad: true"),
    ],
)
def test_bad_recipes_are_config_errors(fields, fragment):
    with pytest.raises(ConfigError, match=fragment):
        recipe_from_dict({"method": "adq", **fields})


# ------------------------------------------------------------------------------------------ layers


def test_layer_factory_codebooks_thresholds_and_pinning():
    model = _model(ADQ(avg_bits=3))
    layers = list(adq_layers(model).values())
    assert all(isinstance(m.weight_quant, CodebookWeightQuantizer) for m in layers)
    assert isinstance(layers[0].act_quant, Pow2ActQuantizer) and layers[0].act_quant.signed
    assert int(layers[0].act_quant.bits()[0]) == 8
    assert all(isinstance(m.act_quant, ThresholdActQuantizer) for m in layers[1:])
    pinned = _model(ADQ(pin_first_last=True, act="uniform"))
    kinds = [type(m.weight_quant) for m in adq_layers(pinned).values()]
    assert kinds == [LSQWeightQuantizer, CodebookWeightQuantizer, LSQWeightQuantizer]
    assert all(isinstance(m.act_quant, Pow2ActQuantizer) for m in adq_layers(pinned).values())
    assert list(codebook_layers(pinned)) == ["2"]


def test_tiny_allocation_instance_has_the_known_optimum_and_meets_the_budget_exactly():
    layers = {"a": nn.Linear(10, 10), "b": nn.Linear(10, 30), "c": nn.Linear(10, 60)}  # 100 / 300 / 600 weights
    cost = avg_bit_costs(layers, (2, 3, 4))
    assert cost.tolist()[1] == pytest.approx([0.6, 0.9, 1.2])
    omega = np.array([[9.0, 3.0, 1.0], [4.0, 1.0, 0.5], [2.0, 1.2, 1.0]])
    # by hand, budget 2.8: (4, 4, 2) -> avg 2.8 exactly, objective 1 + 0.5 + 2 = 3.5 is optimal
    a = solve_allocation(omega, cost, 2.8, (2, 3, 4))
    assert a.bits == (4, 4, 2) and a.objective == pytest.approx(3.5) and a.achieved == pytest.approx(2.8)
    assert a.bits == brute_force_allocation(omega, cost, 2.8, (2, 3, 4)).bits
    assert solve_allocation(omega, cost, 2.79, (2, 3, 4)).achieved <= 2.79


# ------------------------------------------------------------------------------------------ prepare


def test_prepare_meets_the_budget_with_codebook_sensitivities():
    X, y = _data()
    recipe = ADQ(avg_bits=2.6, fp_epochs=2, hutchinson_samples=32)
    model = _model(recipe)
    plan = prepare(model, recipe, (X, y), (X, y), torch.Generator().manual_seed(0))
    layers = codebook_layers(model)
    bits = [m.weight_quant.index_bits for m in layers.values()]
    assert list(plan.bits) == bits and set(bits) <= {2, 3, 4}
    assert model_cost(model).avg_weight_bits == pytest.approx(plan.achieved) and plan.achieved <= 2.6
    assert is_prepared(model) and all(bool(m.weight_quant.initialized) for m in layers.values())
    # Omega = Tr(H)/n x the *codebook* quantization error of the (pretrained) weight at each candidate
    for i, m in enumerate(layers.values()):
        per_param = float(m.adq_trace[0])
        traces = {"w": TraceEstimate(per_param * m.weight.numel(), 0.0, m.weight.numel(), 1)}
        expected = hessian_omega(traces, {"w": m.weight.detach()}, (2, 3, 4),
                                 lambda w, b: quant_error(w, b, quantize=codebook_fake_quant))
        assert plan.omega[i] == pytest.approx(expected[0], rel=1e-9)
        assert plan.omega[i][0] > plan.omega[i][2]


def test_loss_sensitivity_uniform_allocation_and_fixed_bits():
    X, y = _data()
    loss = ADQ(avg_bits=3.0, sensitivity="loss", fp_epochs=1)
    plan = prepare(_model(loss), loss, (X, y), (X, y), torch.Generator().manual_seed(0))
    assert plan.achieved <= 3.0 and np.isfinite(plan.omega).all() and np.isnan(plan.trace).all()
    uniform = ADQ(avg_bits=3.7, allocation="uniform", fp_epochs=0)
    model = _model(uniform)
    assert prepare(model, uniform, (X, y), (X, y)).bits == (3, 3, 3)
    fixed = ADQ(w_bits=4, fp_epochs=0)
    assert prepare(_model(fixed), fixed, (X, y), (X, y)).bits == (4, 4, 4)


def test_pinned_layers_are_outside_the_budget():
    X, y = _data()
    recipe = ADQ(avg_bits=2.0, pin_first_last=True, fp_epochs=0, sensitivity="loss")
    model = _model(recipe)
    plan = prepare(model, recipe, (X, y), (X, y))
    assert plan.bits == (2,)
    assert model_cost(model).avg_weight_bits > 2.0  # the 8-bit first and last layers count in the cost report


def test_hooks_without_data_say_what_is_missing():
    recipe = ADQ()
    with pytest.raises(ConfigError, match="on_fit_start"):
        ADQHooks(recipe).on_epoch_start(_model(recipe), 0, 5)


# ------------------------------------------------------------------------------------------ hooks


def test_ema_runs_after_steps_and_the_codebook_freezes_in_the_last_epochs():
    X, y = _data()
    recipe = ADQ(w_bits=3, fp_epochs=1, freeze_codebook_last=0.25, decay=0.5)
    assert freeze_from_epoch(recipe, 4) == 3 and freeze_from_epoch(ADQ(freeze_codebook_last=0.0), 4) == 4
    model = _model(recipe)
    hooks = hooks_for(recipe)
    drift_log = []
    original = hooks.epoch_log

    def log(m):
        row = original(m)
        drift_log.append((row["codebook_drift"], row["codebook_frozen"], [q.weight_quant.levels().clone()
                                                                            for q in codebook_layers(m).values()]))
        return row

    hooks.epoch_log = log
    fit(model, (X, y), (X, y), TrainConfig(epochs=4, batch_size=50, progress=False, patience=10), hooks)
    assert [frozen for _, frozen, _ in drift_log] == [False, False, False, True]
    assert drift_log[2][0] > 0  # the codebooks moved
    for before, after in zip(drift_log[2][2], drift_log[3][2], strict=True):
        assert torch.equal(before, after)  # no change during the frozen epoch


def test_no_ema_keeps_the_initial_codebook():
    X, y = _data()
    recipe = ADQ(w_bits=3, fp_epochs=1, ema=False)
    model = _model(recipe)
    hooks = hooks_for(recipe)
    fit(model, (X, y), (X, y), TrainConfig(epochs=2, batch_size=50, progress=False), hooks)
    assert all(m.weight_quant.drift() == 0.0 for m in codebook_layers(model).values())


def test_learned_levels_train_in_the_quantizer_group_and_stay_sorted():
    X, y = _data()
    recipe = ADQ(w_bits=2, fp_epochs=1, ema=False, level_grad=True, freeze_codebook_last=0.25)
    model = _model(recipe)
    hooks = hooks_for(recipe)
    groups = {g["name"]: g for g in hooks.param_groups(model, 1e-3, 0.01)}
    levels = [m.weight_quant.pos_levels for m in codebook_layers(model).values()]
    assert all(any(p is lv for p in groups["quantizers"]["params"]) for lv in levels)
    assert groups["quantizers"]["weight_decay"] == 0.0
    snapshots = []
    original = hooks.epoch_log

    def log(m):
        snapshots.append([q.weight_quant.levels().clone() for q in codebook_layers(m).values()])
        return original(m)

    hooks.epoch_log = log
    fit(model, (X, y), (X, y), TrainConfig(epochs=4, batch_size=50, lr=1e-2, progress=False, patience=10), hooks)
    quants = [m.weight_quant for m in codebook_layers(model).values()]
    assert all(q.drift() > 0 for q in quants)                 # moved by the loss alone (EMA off)
    for q in quants:
        mags = q.magnitudes()[1]
        assert bool((mags > 0).all()) and torch.equal(q.magnitudes()[0], mags)
    for before, after in zip(snapshots[2], snapshots[3], strict=True):
        assert torch.equal(before, after)                      # frozen in the last epoch: no level gradient


def test_resume_with_learned_levels_gives_the_same_run(tmp_path, monkeypatch):
    import mpqat.runs as runs

    recipe = ADQ(w_bits=2, fp_epochs=1, level_grad=True)
    full = runs.train_run("breast-cancer", recipe, tmp_path / "full", config=_cfg(3))
    train_until_killed(monkeypatch, "breast-cancer", recipe, tmp_path / "cut", _cfg(3), at_epoch=1)
    resumed = runs.train_run("breast-cancer", recipe, tmp_path / "cut", config=_cfg(3), resume=True)
    assert resumed["resumed_from_epoch"] == 1
    assert resumed["recipe"]["level_grad"] is True and full["codebook_drift"]["0"] > 0
    for key in ("test_accuracy", "codebooks", "codebook_int"):
        assert resumed[key] == full[key], key


def test_threshold_parameters_get_their_own_learning_rate():
    recipe = ADQ(threshold_lr=0.1)
    groups = {g["name"]: g for g in ADQHooks(recipe).param_groups(_model(recipe), 1e-3, 0.0)}
    assert groups["thresholds"]["lr"] == pytest.approx(1e-4) and len(groups["thresholds"]["params"]) == 4
    assert groups["quantizers"]["lr"] == 1e-3


def _prepared(recipe: ADQ, model: nn.Module, train, valid):
    """The recipe's hooks after ADQ's analysis ran on ``model`` (epoch 0 of a fresh run)."""
    hooks = hooks_for(recipe)
    hooks.on_fit_start(model, train, valid)
    hooks.on_epoch_start(model, 0, 3)
    return hooks


def _float_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits of the latent float weights (what the KD teacher should reproduce)."""
    model.eval()
    with torch.no_grad(), float_mode(model):
        return model(x)


def test_knowledge_distillation_uses_the_fp_phase_teacher():
    X, y = _data()
    recipe = ADQ(w_bits=2, fp_epochs=2, kd=1.0, kd_temperature=2.0)
    model = _model(recipe)
    hooks = _prepared(recipe, model, (X, y), (X, y))
    x = torch.from_numpy(X[:16])
    fp_now = _float_logits(model, x)
    assert torch.equal(teacher_logits(model, x), fp_now)  # weights still equal to the FP phase's
    model.train()
    with torch.no_grad():
        for m in adq_layers(model).values():
            m.weight.mul_(0.5)
    assert torch.equal(teacher_logits(model, x), fp_now)  # the teacher lives in buffers, not in the weights
    logits = model(x)
    extra = hooks.extra_loss(model, 0, 0)
    assert float(extra.detach()) > 0 and extra.requires_grad
    assert float(hooks.extra_loss(model, 0, 1)) == 0.0  # one KD term per captured batch
    z = torch.randn(4, 3)
    assert float(kd_loss(z, z, 3.0)) == 0.0 and float(kd_loss(z, -z, 1.0)) > 0
    del logits


def test_kd_without_an_fp_phase_distils_from_the_model_as_received_and_refuses_an_untrained_one():
    X, y = _data()
    recipe = ADQ(w_bits=2, fp_epochs=0, kd=1.0)
    model = _model(recipe)
    hooks = hooks_for(recipe)
    hooks.on_fit_start(model, (X, y), (X, np.zeros_like(y)))  # nothing beats the majority class here
    with pytest.raises(ConfigError, match="needs a trained teacher.*pretrain"):
        hooks.on_epoch_start(model, 0, 3)
    train_float(model, (X, y), (X, y), 30, 1e-2, 64, torch.Generator().manual_seed(0))  # "pretrained"
    _prepared(recipe, model, (X, y), (X, y))
    x = torch.from_numpy(X[:16])
    fp_now = _float_logits(model, x)
    assert torch.equal(teacher_logits(model, x), fp_now)


# ------------------------------------------------------------------------------------------ end to end


def _cfg(epochs=6):
    return TrainConfig(epochs=epochs, batch_size=64, progress=False)


def test_end_to_end_breast_cancer_meets_the_budget(tmp_path):
    from mpqat.runs import load_run, train_run

    recipe = ADQ(avg_bits=2.81, fp_epochs=5, hutchinson_samples=16)
    metrics = train_run("breast-cancer", recipe, tmp_path / "run", config=_cfg(4))
    assert metrics["method"] == "adq" and metrics["adq_prepared"] is True
    assert metrics["avg_weight_bits"] <= 2.81
    assert metrics["allocation"]["avg_bits_codebook_layers"] == pytest.approx(metrics["avg_weight_bits"])
    assert metrics["test_accuracy"] > 0.9
    assert set(metrics["layer_bits"]) == {"0", "2", "4"} and set(metrics["layer_bits"].values()) <= {2, 3, 4}
    assert all(s["trace_per_param"] > 0 for s in metrics["sensitivity"].values())
    assert set(metrics["codebook_drift"]) == {"0", "2", "4"}
    for name, levels in metrics["codebooks"].items():
        assert len(levels) == 2 ** metrics["layer_bits"][name] - 1
    json.dumps(metrics)
    run = load_run(tmp_path / "run")
    assert model_cost(run.model).avg_weight_bits == metrics["avg_weight_bits"]
    from mpqat.train import predict_logits

    splits = run.splits()
    assert float((predict_logits(run.model, splits.X_test).argmax(1) == splits.y_test).mean()) == metrics["test_accuracy"]


@pytest.mark.slow  # three training runs
def test_resume_after_the_allocation_gives_the_same_run(tmp_path, monkeypatch):
    import mpqat.runs as runs

    recipe = ADQ(avg_bits=3.0, fp_epochs=2, hutchinson_samples=16, kd=0.5)
    full = runs.train_run("breast-cancer", recipe, tmp_path / "full", config=_cfg(4))

    train_until_killed(monkeypatch, "breast-cancer", recipe, tmp_path / "cut", _cfg(4), at_epoch=2)
    resumed = runs.train_run("breast-cancer", recipe, tmp_path / "cut", config=_cfg(4), resume=True)
    assert resumed["resumed_from_epoch"] == 2
    for key in ("test_accuracy", "avg_weight_bits", "layer_bits", "codebooks", "codebook_reseeds", "fp_valid_accuracy"):
        assert resumed[key] == full[key], key


def _cli(monkeypatch, capsys, *args):
    """Run ``mpqat ARGS`` in this process; returns (exit code, stderr)."""
    from mpqat.cli import main

    monkeypatch.setattr(sys, "argv", ["mpqat", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("method", "field"), [("adq", "avg_bits"), ("hawq", "budget")])
def test_cli_avg_bits_option(tmp_path, monkeypatch, capsys, method, field):
    code, err = _cli(monkeypatch, capsys, "train", "--dataset", "breast-cancer", "--method", method, "--avg-bits",
                     "2.81", "--set", "fp_epochs=2", "--set", "hutchinson_samples=8", "--epochs", "1",
                     "--out", str(tmp_path / "r"), "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["recipe"][field] == 2.81 and metrics["avg_weight_bits"] <= 2.81


@pytest.mark.parametrize(("args", "fragment"), [(["--method", "adq", "--avg-bits", "1.5"], "smallest average is 2"),
                                                (["--method", "uniform", "--avg-bits", "3"], "--avg-bits")])
def test_cli_avg_bits_errors_in_one_line(tmp_path, monkeypatch, capsys, args, fragment):
    code, err = _cli(monkeypatch, capsys, "train", "--dataset", "breast-cancer", *args, "--epochs", "1",
                     "--out", str(tmp_path / "r"), "--quiet")
    assert code == 2 and err.startswith("mpqat: error:") and len(err.strip().splitlines()) == 1
    assert fragment in err, err


def test_the_shipped_learned_levels_config_is_the_benchmarked_variant():
    """configs/adq-learned-levels.yaml is the fashion-mnist row adq-b2.8-learned-uniform-init's codebook."""
    from pathlib import Path

    from mpqat.recipes import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "configs" / "adq-learned-levels.yaml")
    assert recipe.method == "adq"
    assert (recipe.init, recipe.level_grad, recipe.ema) == ("uniform", True, False)
