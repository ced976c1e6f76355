"""Run directories: float pretraining, its learning rate, and the shared pretraining cache."""

from pathlib import Path

import pytest

import mpqat.runs as runs
from mpqat.recipes import Uniform
from mpqat.train import TrainConfig


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "pretrain_epochs": 2, "batch_size": 64, "lr": 2e-3, "progress": False, **kw})


@pytest.fixture
def fit_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """(checkpoint file name, lr) of every call of the trainer."""
    calls: list[tuple[str, float]] = []
    real = runs.fit

    def spy(*args, **kwargs):
        calls.append((kwargs["checkpoint_path"].name, args[3].lr))
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "fit", spy)
    return calls


def test_pretraining_uses_pretrain_lr_and_qat_uses_lr(tmp_path: Path, fit_calls) -> None:
    runs.train_run("breast-cancer", Uniform(w_bits=4, a_bits=4), tmp_path / "r", config=_config(pretrain_lr=5e-3))
    assert fit_calls == [("pretrain.pt", 5e-3), ("checkpoint.pt", 2e-3)]


def test_pretrain_cache_is_shared_by_other_recipes_and_gives_the_same_run(tmp_path: Path, fit_calls) -> None:
    cache = tmp_path / "cache"
    first = runs.train_run("breast-cancer", Uniform(w_bits=4, a_bits=4), tmp_path / "a", config=_config(),
                           pretrain_cache=cache)
    assert [name for name, _ in fit_calls] == ["pretrain.pt", "checkpoint.pt"]
    assert len(list(cache.glob("*.pt"))) == 1
    fit_calls.clear()
    shared = runs.train_run("breast-cancer", Uniform(w_bits=2, a_bits=4), tmp_path / "b", config=_config(),
                            pretrain_cache=cache)
    assert [name for name, _ in fit_calls] == ["checkpoint.pt"]  # the float model came from the cache
    assert shared["pretrain_cached"] and shared["pretrain_valid_accuracy"] == first["pretrain_valid_accuracy"]
    alone = runs.train_run("breast-cancer", Uniform(w_bits=2, a_bits=4), tmp_path / "c", config=_config())
    for key in ("test_accuracy", "valid_accuracy", "best_epoch", "pretrain_valid_accuracy"):
        assert alone[key] == shared[key], key


def test_pretrain_cache_is_not_used_for_other_pretraining_settings(tmp_path: Path, fit_calls) -> None:
    cache = tmp_path / "cache"
    runs.train_run("breast-cancer", Uniform(), tmp_path / "a", config=_config(), pretrain_cache=cache)
    runs.train_run("breast-cancer", Uniform(), tmp_path / "b", config=_config(pretrain_lr=1e-2), pretrain_cache=cache)
    runs.train_run("breast-cancer", Uniform(), tmp_path / "c", config=_config(seed=1), pretrain_cache=cache)
    assert [name for name, _ in fit_calls].count("pretrain.pt") == 3
    assert len(list(cache.glob("*.pt"))) == 3


def test_a_corrupt_cache_entry_is_trained_again_and_replaced(tmp_path: Path, fit_calls) -> None:
    cache = tmp_path / "cache"
    runs.train_run("breast-cancer", Uniform(), tmp_path / "a", config=_config(), pretrain_cache=cache)
    (entry,) = cache.glob("*.pt")
    entry.write_bytes(b"not a checkpoint")
    fit_calls.clear()
    runs.train_run("breast-cancer", Uniform(), tmp_path / "b", config=_config(), pretrain_cache=cache)
    assert [name for name, _ in fit_calls] == ["pretrain.pt", "checkpoint.pt"]
    assert runs.load_checkpoint(entry)["finished"]
