"""The radio benchmark suite (benchmarks/radio/suite.yaml) expands as intended, and a suite's
``pretrain_epochs`` reaches the trainer."""

from __future__ import annotations

from pathlib import Path

from mpqat.bench.runner import _train_config
from mpqat.bench.suite import expand_suite, load_suite

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "radio" / "suite.yaml"


def test_radio_suite_expands_to_the_three_tiers_and_both_models():
    runs = expand_suite(load_suite(str(SUITE)))
    dirs = {run.run_dir for run in runs}
    for tier in ("rf-awgn", "rf-rayleigh", "rf-tdla"):
        for label in ("mlp-fp32", "mlp-uniform-w8a8", "mlp-uniform-w4a4", "mlp-nmp", "cnn1d-fp32", "cnn1d-nmp"):
            assert f"runs/{tier}/{label}/seed0" in dirs
    tasks = {run.run_dir: run.to_dict() for run in runs}
    fp32 = tasks["runs/rf-awgn/cnn1d-fp32/seed0"]
    w4 = tasks["runs/rf-awgn/cnn1d-uniform-w4a4/seed0"]
    # every method of a (tier, model, seed) starts from the same float pretraining (shared through the
    # harness' pretrain cache), so FP32 and the quantized runs have the same training settings
    assert fp32["train"] == w4["train"]
    config = _train_config(w4)
    assert config.pretrain_epochs == 12 and config.epochs == 5
    assert config.pretrain_lr == 0.003 and config.lr_schedule == "cosine"


def test_suites_without_pretraining_keep_their_train_settings():
    task = expand_suite(load_suite("smoke"))[0].to_dict()
    assert "pretrain_epochs" not in task["train"]  # so their finished runs are not marked stale
