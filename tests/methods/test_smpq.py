"""SMPQ and DNAS: recipes, the supernet game, budgeted selection, the search inside the trainer, export."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from mpqat.cost import model_cost
from mpqat.errors import ConfigError
from mpqat.methods import hooks_for
from mpqat.methods.smpq import (
    DNAS,
    SMPQ,
    SearchHooks,
    is_searched,
    prepare,
    search_layers,
    search_space,
)
from mpqat.methods.supernet import CoalitionValue, build_supernet, select_bits
from mpqat.recipes import recipe_from_dict
from mpqat.shapley import exact_shapley, permutation_shapley, relative_l2
from mpqat.train import TrainConfig
from toys import toy_data, toy_model, train_until_killed

def _data(n=400, features=6, seed=0):
    return toy_data(n, features, seed)


def _model(recipe, features=6, hidden=(16, 8)):
    return toy_model(recipe, features, hidden)






# ------------------------------------------------------------------------------------------ recipes


def test_recipes_round_trip_and_register_hooks():
    for method, cls in (("smpq", SMPQ), ("dnas", DNAS)):
        r = recipe_from_dict({"method": method, "w_candidates": [8, 2, 4, 4], "budget": 3})
        assert isinstance(r, cls) and r.w_candidates == (2, 4, 8) and r.budget == 3.0
        assert recipe_from_dict(r.to_dict()) == r
        assert isinstance(hooks_for(r), SearchHooks)
    assert "shapley_samples" not in DNAS().to_dict()


@pytest.mark.parametrize(
    ("method", "fields", "fragment"),
    [
        ("smpq", {"budget_kind": "bits"}, "budget_kind"),
        ("smpq", {"budget": 0}, "budget"),
        ("smpq", {"budget_kind": "bitops_rel", "budget": 2}, "budget"),
        ("smpq", {"budget_kind": "bitops", "a_budget": 3}, "a_budget"),
        ("smpq", {"w_candidates": []}, "w_candidates"),
        ("smpq", {"a_candidates": [1, 4]}, "a_candidates"),
        ("smpq", {"selection": "best"}, "selection"),
        ("smpq", {"warmup_epochs": 5, "search_epochs": 5}, "warmup_epochs"),
        ("smpq", {"train_portion": 1.0}, "train_portion"),
        ("smpq", {"truncation": 2}, "truncation"),
        ("smpq", {"truncation_ref": "half"}, "truncation_ref"),
        ("smpq", {"momentum": 1.0}, "momentum"),
        ("smpq", {"value": "auc"}, "value"),
        ("smpq", {"shapley_samples": 0}, "shapley_samples"),
        ("smpq", {"budget_fill": 1.5}, "budget_fill"),
        ("smpq", {"antithetic": "yes"}, "antithetic"),
        ("dnas", {"shapley_samples": 4}, "unknown key"),
        ("dnas", {"complexity": -1}, "complexity"),
    ],
)
def test_bad_recipes_are_config_errors(method, fields, fragment):
    with pytest.raises(ConfigError, match=fragment):
        recipe_from_dict({"method": method, **fields})


def test_layer_factory_candidates_pins_and_placeholders():
    r = SMPQ(w_candidates=(2, 4), a_candidates=(3, 6), pin_first_last=True, pinned_bits=8, input_bits=7)
    model = _model(r)
    space = search_space(model, r)
    assert space.names == ("0", "2", "4")
    assert space.w_candidates == ((8,), (2, 4), (8,))
    assert space.a_candidates == ((7,), (3, 6), (8,))
    assert [int(m.weight_quant.bits()[0]) for m in search_layers(model).values()] == [8, 4, 8]
    assert [int(m.act_quant.bits()[0]) for m in search_layers(model).values()] == [7, 6, 8]
    assert not is_searched(model)


# ------------------------------------------------------------------------------- supernet as a game


def _trained_supernet(recipe, steps=60):
    model = _model(recipe)
    space = search_space(model, recipe)
    net = build_supernet(model, space)
    X, y = (torch.from_numpy(a) for a in _data())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, space, net, X, y


def test_coalition_values_batched_equal_masks_set_by_hand():
    r = SMPQ(w_candidates=(2, 8), a_candidates=(2, 8))
    _, space, net, X, y = _trained_supernet(r, steps=20)
    game = CoalitionValue(net, space, "neg_loss", max_batch=3)
    game.set_batch(X, y)
    assert [p.label for p in game.players] == ["0.w2", "0.w8", "2.w2", "2.w8", "4.w2", "4.w8", "2.a2", "2.a8",
                                               "4.a2", "4.a8"]
    coalitions = np.random.default_rng(0).random((7, game.n_players)) < 0.5
    coalitions[0] = True
    values = game(coalitions)
    for k, coalition in enumerate(coalitions):
        with torch.no_grad():
            for present, player in zip(coalition, game.players, strict=True):
                q = getattr(net.get_submodule(player.name), "weight_quant" if player.kind == "w" else "act_quant")
                q.mask[player.index] = float(present)
            net.train()
            expected = -nn.functional.cross_entropy(net(X), y).item()
            for name, m in net.named_modules():
                if hasattr(m, "mask"):
                    m.mask.fill_(1.0)
        assert values[k] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # the game leaves the supernet's own masks untouched
    assert all(bool((m.mask == 1).all()) for m in net.modules() if hasattr(m, "mask"))


def test_monte_carlo_matches_exact_shapley_on_a_tiny_supernet():
    r = SMPQ(w_candidates=(2, 8), a_candidates=(2, 8))
    _, space, net, X, y = _trained_supernet(r)
    game = CoalitionValue(net, space, "neg_loss", max_batch=64)
    game.set_batch(X[:200], y[:200])
    exact = exact_shapley(None, game.n_players, batch_eval=game)
    assert exact.evaluations == 2**game.n_players
    assert exact.values.sum() == pytest.approx(exact.full_value - exact.empty_value, abs=1e-6)
    est = permutation_shapley(None, game.n_players, 60, rng=np.random.default_rng(0), batch_eval=game, chunk=16)
    assert est.evaluations < exact.evaluations
    assert relative_l2(est.mean, exact.values) < 0.35


# ---------------------------------------------------------------------------------------- selection


def _brute_force(model, layers, space, w_util, a_util, limit):
    best, best_value = None, -np.inf
    options = [list(itertools.product(space.w_candidates[i], space.a_candidates[i])) for i in range(len(space.names))]
    for choice in itertools.product(*options):
        for (wb, ab), m in zip(choice, layers.values(), strict=True):
            m.weight_quant.bit_widths.fill_(wb)
            m.act_quant.bit_widths.fill_(ab)
        if model_cost(model).bitops > limit:
            continue
        value = sum(w_util[i][space.w_candidates[i].index(wb)] + a_util[i][space.a_candidates[i].index(ab)]
                    for i, (wb, ab) in enumerate(choice))
        if value > best_value + 1e-12:
            best, best_value = choice, value
    return best, best_value


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_never_exceeds_a_bitops_budget_and_is_optimal(seed):
    rng = np.random.default_rng(seed)
    r = SMPQ(w_candidates=(2, 4, 8), a_candidates=(2, 8))
    model = _model(r, features=int(rng.integers(3, 9)), hidden=tuple(int(h) for h in rng.integers(2, 12, size=2)))
    layers, space = search_layers(model), search_space(model, r)
    w_util = [rng.normal(size=len(c)) for c in space.w_candidates]
    a_util = [rng.normal(size=len(c)) for c in space.a_candidates]
    fp32 = model_cost(model).fp32_bitops
    budget = float(rng.uniform(4, 40)) / 1024
    sel = select_bits(model, layers, space, w_util, a_util, "bitops_rel", budget)
    for (name, m), wb, ab in zip(layers.items(), sel.w_bits, sel.a_bits, strict=True):
        m.weight_quant.bit_widths.fill_(wb)
        m.act_quant.bit_widths.fill_(ab)
    spent = model_cost(model).bitops
    assert spent <= budget * fp32 and sel.met
    assert sel.achieved == pytest.approx(spent / fp32)
    value = sum(w_util[i][space.w_candidates[i].index(wb)] + a_util[i][space.a_candidates[i].index(ab)]
                for i, (wb, ab) in enumerate(zip(sel.w_bits, sel.a_bits, strict=True)))
    _, best_value = _brute_force(model, layers, space, w_util, a_util, budget * fp32)
    assert value == pytest.approx(best_value)


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_meets_average_bit_budgets_and_the_band(seed):
    rng = np.random.default_rng(100 + seed)
    r = SMPQ(w_candidates=(2, 3, 4, 8), a_candidates=(2, 4, 8))
    model = _model(r, hidden=(int(rng.integers(4, 20)), int(rng.integers(4, 20))))
    layers, space = search_layers(model), search_space(model, r)
    w_util = [rng.normal(size=len(c)) for c in space.w_candidates]
    a_util = [rng.normal(size=len(c)) for c in space.a_candidates]
    budget, a_budget = float(rng.uniform(2.2, 6)), float(rng.uniform(2.5, 6))
    for fill in (0.0, 0.9):
        sel = select_bits(model, layers, space, w_util, a_util, "avg_bits", budget, a_budget, fill=fill)
        for m, wb, ab in zip(layers.values(), sel.w_bits, sel.a_bits, strict=True):
            m.weight_quant.bit_widths.fill_(wb)
            m.act_quant.bit_widths.fill_(ab)
        cost = model_cost(model)
        assert cost.avg_weight_bits <= budget + 1e-12 and sel.achieved == pytest.approx(cost.avg_weight_bits)
        hidden_in = [m.in_features for m in list(layers.values())[1:]]
        hidden_avg = sum(n * b for n, b in zip(hidden_in, sel.a_bits[1:], strict=True)) / sum(hidden_in)
        assert hidden_avg <= a_budget + 1e-12 and sel.achieved_a == pytest.approx(hidden_avg)
        if fill:
            # the band is met whenever some choice can meet it (checked by brute force over weights)
            reachable = max((c for c in _weight_avgs(model, layers, space) if c <= budget), default=0)
            assert sel.achieved >= min(fill * budget, reachable) - 1e-12


def _weight_avgs(model, layers, space):
    out = []
    for choice in itertools.product(*space.w_candidates):
        for m, wb in zip(layers.values(), choice, strict=True):
            m.weight_quant.bit_widths.fill_(wb)
        out.append(model_cost(model).avg_weight_bits)
    return out


def test_argmax_takes_the_largest_utility_and_reports_the_budget():
    r = DNAS(w_candidates=(2, 4, 8), a_candidates=(2, 8), selection="argmax")
    model = _model(r)
    layers, space = search_layers(model), search_space(model, r)
    w_util = [np.array([0.0, 0.0, 1.0])] * 3
    a_util = [np.array([1.0])] + [np.array([0.0, 1.0])] * 2
    sel = select_bits(model, layers, space, w_util, a_util, "bitops_rel", 0.01, rule="argmax")
    assert sel.w_bits == (8, 8, 8) and sel.a_bits == (8, 8, 8)
    assert not sel.met and sel.achieved == pytest.approx(64 / 1024)


def test_infeasible_budget_fails_before_any_search():
    r = SMPQ(budget_kind="bitops_rel", budget=0.001, w_candidates=(2, 4), a_candidates=(2, 4))
    model = _model(r)
    X, y = _data()
    hooks = hooks_for(r)
    with pytest.raises(ConfigError, match="smallest feasible budget"):
        hooks.on_fit_start(model, (X, y), (X, y))


# ----------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("cls", [SMPQ, DNAS])
def test_prepare_sets_bits_within_budget_and_inherits_the_supernet(cls):
    extra = {"shapley_samples": 3} if cls is SMPQ else {}
    r = cls(budget_kind="bitops_rel", budget=20 / 1024, w_candidates=(2, 4, 8), a_candidates=(2, 4, 8),
            search_epochs=3, warmup_epochs=1, **extra)
    model = _model(r)
    X, y = _data()
    before = model[0].weight.detach().clone()
    record = prepare(model, r, (X, y), (X[:100], y[:100]), generator=torch.Generator().manual_seed(0))
    assert is_searched(model)
    cost = model_cost(model)
    assert cost.bitops <= r.budget * cost.fp32_bitops and record.selection.met
    assert [int(m.smpq_bits[0]) for m in search_layers(model).values()] == list(record.selection.w_bits)
    assert [int(m.weight_quant.bits()[0]) for m in search_layers(model).values()] == list(record.selection.w_bits)
    assert not torch.equal(model[0].weight, before)  # inherited the supernet's trained weights
    assert all(bool(m.weight_quant.initialized) for m in search_layers(model).values())
    if cls is SMPQ:
        assert record.shapley_updates == 2 and record.shapley_evaluations > 0 and record.n_players == 3 * 3 + 2 * 3
        assert torch.isfinite(model[2].smpq_phi).sum() == 3 + 3
    model.train()
    assert torch.isfinite(model(torch.from_numpy(X))).all()


def test_hooks_without_data_say_what_is_missing():
    r = SMPQ()
    with pytest.raises(ConfigError, match="on_fit_start"):
        hooks_for(r).on_epoch_start(_model(r), 0, 5)


# --------------------------------------------------------------------------------------- end to end


def _cfg():
    return TrainConfig(epochs=3, batch_size=64, progress=False)


@pytest.mark.parametrize("method", ["smpq", "dnas"])
def test_end_to_end_breast_cancer_export_bit_exact_and_reload(tmp_path, method):
    from mpqat.export import export
    from mpqat.runs import load_run, train_run

    fields = {"budget_kind": "bitops_rel", "budget": 16 / 1024, "search_epochs": 3, "warmup_epochs": 1,
              "w_candidates": [2, 4, 8], "a_candidates": [2, 4, 8]}
    if method == "smpq":
        fields["shapley_samples"] = 3
    recipe = recipe_from_dict({"method": method, **fields})
    metrics = train_run("breast-cancer", recipe, tmp_path / "run", config=_cfg())
    json.dumps(metrics)
    assert metrics["method"] == method and metrics["search_done"] is True
    assert metrics["bitops"] <= recipe.budget * metrics["fp32_bitops"]
    assert metrics["budget"]["met"] and metrics["budget"]["achieved"] == pytest.approx(
        metrics["bitops"] / metrics["fp32_bitops"])
    assert metrics["test_accuracy"] > 0.85
    assert set(metrics["layer_bits"]) == {"0", "2", "4"}
    if method == "smpq":
        assert metrics["shapley"]["evaluations"] > 0 and metrics["shapley"]["players"] == 3 * 3 + 2 * 3
    run = load_run(tmp_path / "run")  # the bits come back from the state dict, no new search
    assert is_searched(run.model)
    assert model_cost(run.model).bitops == metrics["bitops"]
    splits = run.splits()
    graph = export(run.model, splits.X_test)  # raises unless the integer graph is bit-exact
    got = graph.run(splits.X_test, backend="int64")
    assert float((got.argmax(1) == splits.y_test).mean()) == pytest.approx(metrics["test_accuracy"])


def test_cli_bitops_budget_trains_smpq_and_reports_an_infeasible_budget(tmp_path):
    base = [sys.executable, "-m", "mpqat", "train", "--dataset", "breast-cancer", "--epochs", "2", "--quiet"]
    bad = subprocess.run([*base, "--method", "dnas", "--bitops-budget", "0.0001", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "smallest feasible budget is 0.00610352" in bad.stderr
    good = subprocess.run([*base, "--method", "smpq", "--bitops-budget", "0.02", "--set", "search_epochs=2",
                           "--set", "warmup_epochs=1", "--set", "shapley_samples=2", "--out", str(tmp_path / "ok")],
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert metrics["recipe"]["budget_kind"] == "bitops_rel" and metrics["recipe"]["budget"] == 0.02
    assert metrics["bitops"] <= 0.02 * metrics["fp32_bitops"]


def test_resume_after_the_search_does_not_search_again(tmp_path, monkeypatch):
    import mpqat.methods.smpq as smpq_module
    import mpqat.runs as runs

    recipe = SMPQ(budget=4, search_epochs=2, warmup_epochs=1, shapley_samples=2, w_candidates=(2, 4, 8),
                  a_candidates=(4, 8))
    full = runs.train_run("breast-cancer", recipe, tmp_path / "full", config=_cfg())

    train_until_killed(monkeypatch, "breast-cancer", recipe, tmp_path / "cut", _cfg(), at_epoch=2)
    searches = []
    original = smpq_module.prepare
    monkeypatch.setattr(smpq_module, "prepare", lambda *a, **k: searches.append(1) or original(*a, **k))
    resumed = runs.train_run("breast-cancer", recipe, tmp_path / "cut", config=_cfg(), resume=True)
    assert searches == [] and resumed["resumed_from_epoch"] == 2
    for key in ("test_accuracy", "layer_bits", "avg_weight_bits", "alpha"):
        assert resumed[key] == full[key], key
    drop = {"seconds"}
    assert {k: v for k, v in resumed["shapley"].items() if k not in drop} == \
        {k: v for k, v in full["shapley"].items() if k not in drop}
