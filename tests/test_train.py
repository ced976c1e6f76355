"""The trainer: determinism, early stopping, and resume after an interruption."""

import json

import pytest

from mpqat.errors import CheckpointError, ConfigError
from mpqat.methods.nmp import NeuronBits
from mpqat.recipes import Uniform
from mpqat.runs import load_run, train_run
from mpqat.train import TrainConfig, fit
from toys import train_until_killed


def _cfg(**kw):
    return TrainConfig(**{"epochs": 6, "batch_size": 64, "progress": False, **kw})


def test_same_seed_same_result(tmp_path):
    a = train_run("breast-cancer", Uniform(w_bits=4, a_bits=4), tmp_path / "a", config=_cfg())
    b = train_run("breast-cancer", Uniform(w_bits=4, a_bits=4), tmp_path / "b", config=_cfg())
    assert a["test_accuracy"] == b["test_accuracy"]
    assert a["test_accuracy"] > 0.85
    for key in ("dataset", "method", "model", "test_accuracy", "avg_weight_bits", "avg_act_bits", "bitops",
                "size_bytes", "fp32_bitops", "fp32_size_bytes", "train_seconds", "epochs", "seed"):
        assert key in a


def _interrupted_run(monkeypatch, out, recipe, at_epoch=3):
    train_until_killed(monkeypatch, "breast-cancer", recipe, out, _cfg(), at_epoch)
    assert not (out / "metrics.json").exists()


def test_resume_after_interruption_gives_the_same_result(tmp_path, monkeypatch):
    full = train_run("breast-cancer", Uniform(w_bits=4, a_bits=4), tmp_path / "full", config=_cfg())
    _interrupted_run(monkeypatch, tmp_path / "cut", Uniform(w_bits=4, a_bits=4))
    resumed = train_run("breast-cancer", Uniform(w_bits=4, a_bits=4), tmp_path / "cut", config=_cfg(), resume=True)
    assert resumed["resumed_from_epoch"] == 3
    assert resumed["test_accuracy"] == full["test_accuracy"]
    history_full = json.loads((tmp_path / "full" / "history.json").read_text())
    history_cut = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["valid_loss"] for h in history_cut] == [h["valid_loss"] for h in history_full]


def test_resume_with_a_different_recipe_is_refused(tmp_path, monkeypatch):
    _interrupted_run(monkeypatch, tmp_path / "r", Uniform(w_bits=4, a_bits=4))
    with pytest.raises(CheckpointError, match="different recipe"):
        train_run("breast-cancer", Uniform(w_bits=2, a_bits=4), tmp_path / "r", config=_cfg(), resume=True)


def test_existing_run_is_not_overwritten_without_force(tmp_path):
    train_run("breast-cancer", Uniform(), tmp_path / "r", config=_cfg(epochs=1))
    with pytest.raises(ConfigError, match="--force"):
        train_run("breast-cancer", Uniform(), tmp_path / "r", config=_cfg(epochs=1))
    train_run("breast-cancer", Uniform(), tmp_path / "r", config=_cfg(epochs=1), force=True)


@pytest.mark.parametrize("recipe", [Uniform(w_bits=2, a_bits=4), NeuronBits(reg="bits", reg_weight=0.03)])
def test_load_run_restores_the_same_predictions(tmp_path, recipe):
    # The best epoch's weights, restored at the end of fit and again from disk, must give the
    # validation accuracy that was measured live during training.
    metrics = train_run("breast-cancer", recipe, tmp_path / "r", config=_cfg(epochs=8))
    run = load_run(tmp_path / "r")
    from mpqat.metrics import classification_metrics
    from mpqat.train import predict_logits

    splits = run.splits()
    assert classification_metrics(predict_logits(run.model, splits.X_valid), splits.y_valid, "valid_")[
        "valid_accuracy"] == metrics["valid_accuracy"]
    assert classification_metrics(predict_logits(run.model, splits.X_test), splits.y_test)["test_accuracy"] == metrics["test_accuracy"]


def test_nan_features_are_refused(breast_cancer):
    from mpqat.models import MLP

    X = breast_cancer.X_train.copy()
    X[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        fit(MLP(X.shape[1], 2), (X, breast_cancer.y_train), (breast_cancer.X_valid, breast_cancer.y_valid), _cfg())


def test_cosine_schedule_decays_the_lr_of_every_group_per_step(breast_cancer, monkeypatch):
    import math

    import mpqat.train as train_module
    from mpqat.models import MLP

    made = []
    real = train_module._make_optimizer
    monkeypatch.setattr(train_module, "_make_optimizer", lambda *a: made.append(real(*a)) or made[-1])
    config = _cfg(epochs=3, lr=4e-3, lr_schedule="cosine")
    fit(MLP(breast_cancer.X_train.shape[1], 2), (breast_cancer.X_train, breast_cancer.y_train),
        (breast_cancer.X_valid, breast_cancer.y_valid), config)
    steps = math.ceil(len(breast_cancer.y_train) / config.batch_size)
    last = train_module.lr_factor("cosine", 3 * steps - 1, 3 * steps)
    assert 0 < last < 0.01
    assert made[0].param_groups[0]["lr"] == pytest.approx(4e-3 * last)


@pytest.mark.parametrize("bad", [{"lr_schedule": "step"}, {"pretrain_lr": 0.0}, {"pretrain_lr": float("nan")}])
def test_bad_schedule_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(**bad)


def test_default_schedule_settings_keep_old_run_fingerprints():
    from mpqat.train import config_dict

    assert set(config_dict(TrainConfig())) == {"epochs", "batch_size", "lr", "optimizer", "weight_decay", "patience", "seed"}
    assert config_dict(TrainConfig(lr_schedule="cosine", pretrain_lr=0.01))["lr_schedule"] == "cosine"


def test_resume_with_a_cosine_schedule_gives_the_same_result(tmp_path, monkeypatch):
    config = _cfg(lr_schedule="cosine", lr=3e-3)
    full = train_run("breast-cancer", Uniform(w_bits=4, a_bits=4), tmp_path / "full", config=config)
    train_until_killed(monkeypatch, "breast-cancer", Uniform(w_bits=4, a_bits=4), tmp_path / "cut", config, 3)
    resumed = train_run("breast-cancer", Uniform(w_bits=4, a_bits=4), tmp_path / "cut", config=config, resume=True)
    history_full = json.loads((tmp_path / "full" / "history.json").read_text())
    history_cut = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["valid_loss"] for h in history_cut] == [h["valid_loss"] for h in history_full]
    assert resumed["test_accuracy"] == full["test_accuracy"]
