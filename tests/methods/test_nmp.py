"""NMP-QAT: the recipe, its layers and hooks, bits that grow where the task needs them, a run end to end."""

import json

import pytest
import torch
import yaml

from mpqat import freeze
from mpqat.errors import ConfigError
from mpqat.methods import hooks_for
from mpqat.methods.nmp import NeuronBits, NeuronBitsHooks, expected_cost
from mpqat.models import MLP
from mpqat.quant.bits import NeuronBitsActQuantizer, NeuronBitsWeightQuantizer
from mpqat.quantize import quantize
from mpqat.recipes import load_recipe, recipe_from_dict
from mpqat.runs import load_run, train_run
from mpqat.train import TrainConfig


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"w_thresholds": (0.5, 0.25, 0.75)}, "strictly increasing"),
        ({"a_thresholds": (0.3, 0.3)}, "strictly increasing"),
        ({"w_thresholds": (0.25, 0.5)}, "need 3 thresholds"),
        ({"w_candidates": (0, 2, 4, 8)}, "not supported"),
        ({"w_candidates": (1, 2, 4, 32)}, "not supported"),
        ({"a_candidates": (1, 8, 16)}, "not supported"),
        ({"a_candidates": (8, 4, 16)}, "strictly increasing"),
        ({"w_thresholds": (0.0, 0.5, 0.75)}, "inside"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"tau_final": 0.0}, "tau_final"),
        ({"w_init_strength": 1.5}, "w_init_strength"),
        ({"strength_lr_mult": 0}, "strength_lr_mult"),
        ({"granularity": "weight"}, "granularity"),
        ({"reg": "l1"}, "reg"),
        ({"reg_weight": -0.1}, "reg_weight"),
        ({"reg_ramp_epochs": -1}, "reg_ramp_epochs"),
        ({"input_bits": 1}, "input_bits"),
        ({"allow_shrink": "yes"}, "allow_shrink"),
    ],
)
def test_bad_recipe_values(fields, message):
    with pytest.raises(ConfigError, match=message):
        NeuronBits(**fields)


def test_recipe_round_trip_and_schedules(tmp_path):
    recipe = recipe_from_dict({"method": "nmp", "w_candidates": [2, 3, 4, 5, 6, 8],
                               "w_thresholds": [0.2, 0.35, 0.5, 0.65, 0.8], "tau_final": 0.01})
    assert recipe.w_candidates == (2, 3, 4, 5, 6, 8)
    recipe.to_yaml(tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == recipe
    assert recipe.tau_at(0, 11) == pytest.approx(0.05) and recipe.tau_at(10, 11) == pytest.approx(0.01)
    assert recipe.tau_at(5, 11) == pytest.approx((0.05 * 0.01) ** 0.5)
    ramp = NeuronBits(reg="bits", reg_weight=0.2, reg_warmup_epochs=2, reg_ramp_epochs=4)
    assert [ramp.reg_at(e) for e in range(7)] == pytest.approx([0, 0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert NeuronBits(reg_weight=1.0).reg_at(5) == 0.0  # reg: none


def test_config_files_are_valid_recipes():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("nmp*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(load_recipe(path), NeuronBits), path


def test_layers_start_at_the_lowest_candidates():
    model = quantize(MLP(5, 3, hidden=(8, 4)), NeuronBits(last_layer_w_bits=8))
    first, hidden, last = model[0], model[2], model[4]
    assert isinstance(first.weight_quant, NeuronBitsWeightQuantizer)
    assert first.act_quant.signed and first.act_quant.strength is None  # model input: fixed 8 bits
    assert first.act_quant.bits().tolist() == [8.0] * 5
    assert not hidden.act_quant.signed and hidden.act_quant.bits().tolist() == [4.0] * 8
    assert hidden.weight_quant.bits().tolist() == [1.0] * 4
    assert last.weight_quant.strength is None and last.weight_quant.bits().tolist() == [8.0] * 3
    layer = quantize(MLP(5, 3, hidden=(8,)), NeuronBits(granularity="layer", input_bits=None))
    assert layer[0].weight_quant.strength.shape == (1, 1) and layer[0].act_quant.strength.shape == (1,)


def test_hooks_groups_schedule_and_logs():
    recipe = NeuronBits(strength_lr_mult=10, scale_lr_mult=0.5, tau_final=0.01, reg="bitops", reg_weight=1e-3,
                        strength_warmup_epochs=1)
    model = quantize(MLP(4, 2, hidden=(6,)), recipe)
    hooks = hooks_for(recipe)
    assert isinstance(hooks, NeuronBitsHooks)
    groups = {g["name"]: g for g in hooks.param_groups(model, 1e-3, 1e-4)}
    assert groups["weights"]["weight_decay"] == 1e-4 and groups["scales"]["lr"] == pytest.approx(5e-4)
    assert groups["clips"]["lr"] == pytest.approx(1e-2) and groups["clips"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any("strength" in names[id(p)] for g in groups.values() for p in g["params"])
    hooks.on_epoch_start(model, 0, 5)
    assert not model[0].weight_quant.strength.requires_grad  # strength warm-up
    hooks.on_epoch_start(model, 4, 5)
    assert model[0].weight_quant.tau == pytest.approx(0.01) and model[0].weight_quant.strength.requires_grad
    model.train()(torch.randn(16, 4))
    expected = 1e-3 * float(expected_cost(model, "bitops").detach())
    assert float(hooks.extra_loss(model, 4, 0).detach()) == pytest.approx(expected)
    log = hooks.epoch_log(model)
    assert log["avg_weight_bits"] == 1.0 and log["avg_act_bits"] == pytest.approx((4 * 8 + 6 * 4) / 10)


@pytest.fixture
def one_thread():
    """The small training loops below are dominated by per-op overhead, which threads only add to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _multi_task_layer(recipe, seed, steps=600, lr=1e-2):
    """16 independent logistic tasks on one layer; the first 8 teachers need several weight levels
    (1, 1/2, 1/4, 1/8, 0), the last 8 are +-1 patterns that 1-bit weights represent exactly."""
    g = torch.Generator().manual_seed(seed)
    d, c, n = 16, 16, 2048
    teacher = torch.randint(0, 2, (c, d), generator=g).float() * 2 - 1
    levels = torch.tensor([1.0, 0.5, 0.25, 0.125, 0.0])
    teacher[: c // 2] *= levels[torch.randint(0, 5, (c // 2, d), generator=g)]
    x = torch.randn(n, d, generator=g)
    y = (torch.rand(n, c, generator=g) < torch.sigmoid(3 * x @ teacher.T / teacher.abs().sum(1))).float()
    torch.manual_seed(seed)
    model = quantize(MLP(d, c, hidden=()), recipe).train()
    hooks = hooks_for(recipe)
    opt = torch.optim.Adam([grp for grp in hooks.param_groups(model, lr, 0.0) if grp["params"]], lr=lr)
    hooks.on_epoch_start(model, 0, 1)
    for step in range(steps):
        idx = torch.randint(0, n, (256,), generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
        extra = hooks.extra_loss(model, 0, step)
        loss = loss if extra is None else loss + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
        hooks.after_step(model)
    bits = model[0].weight_quant.bits()
    return bits[: c // 2], bits[c // 2 :]


def test_bits_grow_where_the_task_needs_them(one_thread):
    needs, binary = [], []
    for seed in (0, 1):
        # with a cost term, bits pay off only on the neurons that cannot fit their teacher at 1 bit
        a, b = _multi_task_layer(NeuronBits(strength_lr_mult=1, reg="bits", reg_weight=0.03), seed)
        needs.append(a)
        binary.append(b)
    needs, binary = torch.cat(needs), torch.cat(binary)
    assert float((needs > 1).float().mean()) >= 0.75
    assert bool((binary == 1).all())
    # without the cost term the demand still differs: the multi-level neurons grow first
    a, b = _multi_task_layer(NeuronBits(strength_lr_mult=0.1), seed=0)
    assert float(a.mean()) > float(b.mean()) and float((a > 1).float().mean()) == 1.0


def test_regularizer_lowers_bits_monotonically(one_thread):
    averages = []
    for weight in (0.0, 0.01, 0.03, 0.1):
        recipe = NeuronBits(strength_lr_mult=1, reg="bits" if weight else "none", reg_weight=weight)
        bits = torch.cat([torch.cat(_multi_task_layer(recipe, seed, steps=400)) for seed in (0, 1)])
        averages.append(float(bits.mean()))
    assert all(a >= b for a, b in zip(averages, averages[1:])), averages
    assert averages[-1] < averages[0]


def test_train_run_end_to_end(tmp_path, breast_cancer):
    recipe = NeuronBits(strength_lr_mult=30)
    config = TrainConfig(epochs=4, batch_size=64, progress=False)
    metrics = train_run("breast-cancer", recipe, tmp_path / "run", config=config)
    assert metrics["method"] == "nmp" and metrics["test_accuracy"] > 0.85
    layers = metrics["nmp"]["layers"]
    assert set(layers) == set(metrics["bit_histograms"]) == {"0", "2", "4"}
    assert "strength" in layers["2"]["weights"] and "expected_bits" in layers["2"]["activations"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all("avg_weight_bits" in row and "avg_act_bits" in row for row in history)
    run = load_run(tmp_path / "run")
    x = torch.from_numpy(breast_cancer.X_test)
    assert torch.equal(freeze(run.model)(x), run.model(x))
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["method"] == "nmp"


def test_strength_state_survives_a_checkpoint(tmp_path):
    model = quantize(MLP(4, 2, hidden=(6,)), NeuronBits())
    hooks = hooks_for(NeuronBits())
    hooks.param_groups(model, 1e-3, 0.0)
    loss = model.train()(torch.randn(8, 4)).sum()
    loss.backward()
    hooks.after_step(model)
    state = model.state_dict()
    assert int(state["2.weight_quant.strength_updates"]) == 1
    again = quantize(MLP(4, 2, hidden=(6,)), NeuronBits())
    again.load_state_dict(state)
    assert torch.equal(again[2].weight_quant.strength_momentum, model[2].weight_quant.strength_momentum)
    assert isinstance(again[2].act_quant, NeuronBitsActQuantizer)
