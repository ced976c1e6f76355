"""Derived radio datasets (rf-awgn-ap, rf-rayleigh-ap, rf-tdla-ap): amplitude and phase difference
computed at load time from the I/Q cache file, on the same rows, labels and SNRs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpqat.data import fetch, get_dataset, list_datasets, load_dataset, radio
from mpqat.data.radio import (
    FEATURE_TRANSFORMS,
    RADIO_DATASETS,
    RadioConfig,
    RadioSplits,
    amplitude_phase_difference,
    generate_radio,
    load_radio,
    radio_splits,
)
from mpqat.errors import DatasetError

VARIANTS = ["rf-awgn-ap", "rf-rayleigh-ap", "rf-tdla-ap"]


def tiny(tier: str) -> RadioConfig:
    return RadioConfig(tier=tier, snr_db=(0.0, 10.0, 5.0), frames_per_snr=(6, 2, 2))


@pytest.fixture()
def tiny_registry(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, cfg in list(RADIO_DATASETS.items()):
        monkeypatch.setitem(RADIO_DATASETS, name, tiny(cfg.tier))
    return isolated_cache


@pytest.fixture(scope="module")
def rayleigh_frames() -> np.ndarray:
    return generate_radio(RadioConfig(tier="rayleigh", snr_db=(10.0, 20.0, 10.0), frames_per_snr=(2, 1, 1))).X["train"]


def _circular_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance between phase differences/pi on the circle of circumference 2."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64)) % 2.0
    return np.minimum(d, 2.0 - d)


# -- the transform ------------------------------------------------------------------------------


def test_amplitude_row_is_the_modulus_and_phase_row_the_wrapped_difference(rayleigh_frames):
    feats = amplitude_phase_difference(rayleigh_frames)
    assert feats.shape == rayleigh_frames.shape and feats.dtype == np.float32
    z = rayleigh_frames[:, 0].astype(np.float64) + 1j * rayleigh_frames[:, 1]
    np.testing.assert_allclose(feats[:, 0], np.abs(z), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose((feats[:, 0].astype(np.float64) ** 2).mean(-1), 1.0, rtol=1e-5)  # unit RMS
    want = np.angle(z[:, 1:] / z[:, :-1]) / np.pi  # another way to the same angle
    assert _circular_gap(feats[:, 1, 1:], want).max() < 1e-5
    assert np.all(feats[:, 1, 0] == 0.0)
    assert feats[:, 1].min() > -1.0 and feats[:, 1].max() <= 1.0


def test_phase_difference_wraps_to_minus_one_exclusive_one_inclusive():
    # steps of exactly +pi, -pi and just past +-pi
    angles = np.cumsum([0.0, np.pi, -np.pi, np.pi + 1e-3, -np.pi - 1e-3, 0.5])
    z = np.exp(1j * angles)
    feats = amplitude_phase_difference(np.stack([z.real, z.imag])[None])
    np.testing.assert_allclose(feats[0, 1], [0.0, 1.0, 1.0, -1.0 + 1e-3 / np.pi, 1.0 - 1e-3 / np.pi, 0.5 / np.pi],
                               atol=1e-6)
    assert feats[0, 1].min() > -1.0 and feats[0, 1].max() <= 1.0


@pytest.mark.parametrize("theta", [0.3, np.pi / 2, 2.5, -1.7])
def test_features_do_not_change_when_a_frame_is_rotated(rayleigh_frames, theta):
    z = rayleigh_frames[:, 0].astype(np.float64) + 1j * rayleigh_frames[:, 1]
    rotated = z * np.exp(1j * theta)
    base = amplitude_phase_difference(rayleigh_frames)
    turned = amplitude_phase_difference(np.stack([rotated.real, rotated.imag], 1))
    np.testing.assert_allclose(turned[:, 0], base[:, 0], rtol=1e-6, atol=1e-7)
    assert _circular_gap(turned[:, 1], base[:, 1]).max() < 1e-5
    raw_change = np.abs(np.stack([rotated.real, rotated.imag], 1) - rayleigh_frames).max()
    assert raw_change > 0.1  # the raw I/Q did change


def test_a_constant_frequency_offset_shifts_the_phase_row_by_a_constant(rayleigh_frames):
    cycles = 0.01  # per sample
    z = rayleigh_frames[:, 0].astype(np.float64) + 1j * rayleigh_frames[:, 1]
    shifted = z * np.exp(2j * np.pi * cycles * np.arange(z.shape[1]))
    base = amplitude_phase_difference(rayleigh_frames)
    moved = amplitude_phase_difference(np.stack([shifted.real, shifted.imag], 1))
    assert _circular_gap(moved[:, 1, 1:], base[:, 1, 1:] + 2 * cycles).max() < 1e-5


def test_transform_is_deterministic_and_checks_its_input(rayleigh_frames):
    np.testing.assert_array_equal(amplitude_phase_difference(rayleigh_frames),
                                  amplitude_phase_difference(rayleigh_frames.copy()))
    with pytest.raises(DatasetError, match=r"\[n, 2, L\]"):
        amplitude_phase_difference(np.zeros((3, 4, 128), np.float32))


# -- registry, fetch and load -------------------------------------------------------------------


def test_registry_entries_name_their_base_and_transform():
    radio_names = [d.name for d in list_datasets("radio")]
    assert radio_names == ["rf-awgn", "rf-rayleigh", "rf-tdla", *VARIANTS]
    for name in VARIANTS:
        info, base = get_dataset(name), get_dataset(name.removesuffix("-ap"))
        assert info.kind == "radio" and info.base == base.name and info.transform in FEATURE_TRANSFORMS
        assert info.input_shape == (2, 128) and info.cache_path == base.cache_path
        assert info.fetch_hint == base.fetch_hint and (info.n_rows, info.n_classes) == (base.n_rows, base.n_classes)
        assert get_dataset(name.replace("-", "_")).name == name
    from mpqat.data.registry import DATASET_GROUPS

    assert DATASET_GROUPS["rf-modulation"] == ("rf-awgn", "rf-rayleigh", "rf-tdla")


def test_variant_loads_the_base_rows_labels_and_snrs(tiny_registry: Path):
    with pytest.raises(DatasetError, match="mpqat data fetch rf-tdla-ap"):
        load_dataset("rf-tdla-ap")
    assert fetch("rf-tdla-ap", progress=False) == tiny_registry / "rf-tdla.npz"
    assert sorted(p.name for p in tiny_registry.glob("*.npz")) == ["rf-tdla.npz"]  # nothing new generated
    base, ap = load_dataset("rf-tdla", seed=2), load_dataset("rf-tdla-ap", seed=2)
    assert isinstance(ap, RadioSplits) and ap.name == "rf-tdla-ap" and ap.input_shape == (2, 128)
    assert ap.class_names == base.class_names
    assert ap.feature_names[:2] == ["A0", "A1"] and ap.feature_names[127:129] == ["A127", "D0"]
    assert ap.feature_names[-1] == "D127" and len(ap.feature_names) == 256
    assert ap.info["feature_transform"] == "amp-dphase" and base.info["feature_transform"] is None
    for split in ("train", "valid", "test"):
        Xb, Xa = base.split(split)[0], ap.split(split)[0]
        np.testing.assert_array_equal(ap.split(split)[1], base.split(split)[1])
        np.testing.assert_array_equal(ap.snr(split), base.snr(split))
        np.testing.assert_array_equal(ap.indices[split], base.indices[split])
        assert Xa.dtype == np.float32 and Xa.shape == Xb.shape
        np.testing.assert_array_equal(Xa.reshape(-1, 2, 128), amplitude_phase_difference(Xb.reshape(-1, 2, 128)))


def test_max_rows_keeps_the_same_rows_as_the_base(tiny_registry: Path):
    fetch("rf-awgn", progress=False)
    for seed in (0, 1):
        base, ap = load_radio("rf-awgn", seed=seed, max_rows=96), load_radio("rf-awgn-ap", seed=seed, max_rows=96)
        for split in ("train", "valid", "test"):
            np.testing.assert_array_equal(ap.indices[split], base.indices[split])
            np.testing.assert_array_equal(ap.split(split)[1], base.split(split)[1])
            np.testing.assert_array_equal(ap.snr(split), base.snr(split))
            np.testing.assert_array_equal(ap.split(split)[0].reshape(-1, 2, 128),
                                          amplitude_phase_difference(base.split(split)[0].reshape(-1, 2, 128)))
    assert (len(ap.y_train), len(ap.y_valid), len(ap.y_test)) == (58, 19, 19)


def test_fetching_a_variant_generates_its_base_once(tiny_registry: Path, monkeypatch: pytest.MonkeyPatch):
    import importlib

    fetch_module = importlib.import_module("mpqat.data.fetch")
    calls: list[str] = []
    real = radio.generate_radio
    monkeypatch.setattr(radio, "generate_radio", lambda cfg, progress=None: calls.append(cfg.tier) or real(cfg))
    assert not any(get_dataset(n).is_fetched for n in VARIANTS)
    fetch("rf-awgn-ap", progress=False)
    fetch("rf-awgn-ap", progress=False)  # already there: nothing generated
    assert calls == ["awgn"] and get_dataset("rf-awgn-ap").is_fetched and get_dataset("rf-awgn").is_fetched
    fetch("rf-awgn-ap", force=True, progress=False)
    assert calls == ["awgn", "awgn"]
    calls.clear()  # 'all' (here: only the radio datasets) regenerates each file once, not once per name
    monkeypatch.setattr(fetch_module, "list_datasets", lambda: list_datasets("radio"))
    fetch("all", force=True, progress=False)
    assert calls == ["awgn", "rayleigh", "tdla"]
    assert all(get_dataset(n).is_fetched for n in VARIANTS)


def test_unknown_names_and_transforms_give_clear_errors(tiny_registry: Path):
    with pytest.raises(DatasetError, match="unknown dataset 'rf-awgn-xy'"):
        load_dataset("rf-awgn-xy")
    with pytest.raises(DatasetError, match="unknown radio dataset 'adult': use one of rf-awgn, .*rf-tdla-ap"):
        load_radio("adult")
    with pytest.raises(DatasetError, match="unknown radio dataset"):
        radio.fetch_radio("nope")
    data = generate_radio(RadioConfig(snr_db=(0.0, 0.0, 1.0), frames_per_snr=(1, 1, 1)))
    with pytest.raises(DatasetError, match="unknown feature transform 'fft'"):
        radio_splits(data, "x", transform="fft")
    iqap = generate_radio(RadioConfig(snr_db=(0.0, 0.0, 1.0), frames_per_snr=(1, 1, 1), features="iqap"))
    with pytest.raises(DatasetError, match="needs I/Q frames"):
        radio_splits(iqap, "x", transform="amp-dphase")


def test_a_small_mlp_trains_on_the_variant(tiny_registry: Path):
    from mpqat.recipes import recipe_from_dict
    from mpqat.runs import load_run, train_run
    from mpqat.train import TrainConfig

    fetch("rf-awgn-ap", progress=False)
    out = tiny_registry.parent / "run"
    metrics = train_run("rf-awgn-ap", recipe_from_dict({"method": "fp32"}), out, hidden=[16],
                        config=TrainConfig(epochs=3, progress=False), force=True)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and np.isfinite(metrics["test_accuracy"])
    run = load_run(out)
    assert run.info["dataset"] == "rf-awgn-ap"
