"""Accuracy per SNR (mpqat.radio_eval) on tiny generated radio data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mpqat.data import radio
from mpqat.data.radio import RADIO_DATASETS, RadioConfig, generate_radio, radio_splits
from mpqat.errors import DatasetError
from mpqat.radio_eval import (
    accuracy_by_snr,
    confusion_matrix,
    curve_from_predictions,
    plot_accuracy_vs_snr,
    predictions,
)

TINY = RadioConfig(snr_db=(0.0, 10.0, 10.0), frames_per_snr=(6, 2, 3))


@pytest.fixture(scope="module")
def splits():
    return radio_splits(generate_radio(TINY), "rf-awgn")


def test_curve_groups_predictions_by_snr():
    pred = np.array([0, 1, 1, 2, 2, 0])
    y = np.array([0, 1, 0, 2, 1, 1])
    snr = np.array([-4.0, -4.0, 6.0, 6.0, 6.0, 12.0])
    curve = curve_from_predictions(pred, y, snr)
    assert curve.snr_db.tolist() == [-4.0, 6.0, 12.0]
    np.testing.assert_allclose(curve.accuracy, [1.0, 1 / 3, 0.0])
    assert curve.count.tolist() == [2, 3, 1] and curve.overall == pytest.approx(0.5)
    assert curve.to_dict()["by_snr"] == {"-4": 1.0, "6": pytest.approx(1 / 3), "12": 0.0}
    assert curve.mean_between(0, 20) == pytest.approx(1 / 6)
    with pytest.raises(DatasetError):
        curve_from_predictions(pred, y[:3], snr)


def test_accuracy_by_snr_of_a_model_matches_a_direct_count(splits):
    torch.manual_seed(0)
    model = nn.Linear(splits.n_features, splits.n_classes)
    curve = accuracy_by_snr(model, splits)
    with torch.no_grad():
        pred = model(torch.from_numpy(splits.X_test)).argmax(1).numpy()
    for snr, acc in zip(curve.snr_db, curve.accuracy):
        mask = splits.snr_test == snr
        assert acc == pytest.approx((pred[mask] == splits.y_test[mask]).mean())
    assert curve.count.tolist() == [8 * 3, 8 * 3]
    p, y, s = predictions(model, splits, "valid")
    assert len(p) == len(y) == len(s) == 8 * 2 * 2


def test_accuracy_by_snr_of_a_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mpqat.recipes import recipe_from_dict
    from mpqat.runs import train_run
    from mpqat.train import TrainConfig

    monkeypatch.setenv("MPQAT_DATA", str(tmp_path / "cache"))
    monkeypatch.setitem(RADIO_DATASETS, "rf-awgn", TINY)
    radio.fetch_radio("rf-awgn")
    metrics = train_run("rf-awgn", recipe_from_dict({"method": "uniform", "w_bits": 4, "a_bits": 4}),
                        tmp_path / "run", config=TrainConfig(epochs=1, progress=False), force=True)
    curve = accuracy_by_snr(tmp_path / "run")
    assert curve.overall == metrics["test_accuracy"]
    assert curve.snr_db.tolist() == [0.0, 10.0]

    from mpqat.report import write_report  # ``mpqat report`` adds the SNR table and plot

    written = write_report(tmp_path / "run")
    assert tmp_path / "run" / "acc_vs_snr.png" in written
    assert "## Accuracy per SNR" in (tmp_path / "run" / "report.md").read_text()


def test_a_dataset_without_snr_is_refused(breast_cancer):
    with pytest.raises(DatasetError, match="radio dataset"):
        accuracy_by_snr(nn.Linear(breast_cancer.n_features, 2), breast_cancer)
    with pytest.raises(DatasetError, match="pass the splits"):
        accuracy_by_snr(nn.Linear(3, 2))


def test_confusion_matrix_counts():
    cm = confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_plots_are_written(tmp_path: Path):
    curve = curve_from_predictions(np.array([0, 1, 1]), np.array([0, 1, 0]), np.array([0.0, 10.0, 10.0]))
    one = plot_accuracy_vs_snr({"fp32": curve}, tmp_path / "one.png", title="t", chance=0.125)
    two = plot_accuracy_vs_snr({"mlp": {"fp32": curve}, "cnn1d": {"fp32": curve}}, tmp_path / "sub" / "two.png")
    for path in (one, two):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
