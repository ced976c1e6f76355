"""load_dataset on your own files: formats, splits, seeds, subsampling and user mistakes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqat.data import TabularSplits, load_dataset, stratified_split
from mpqat.errors import DatasetError

MakeFrame = Callable[..., pd.DataFrame]
WriteCsv = Callable[[pd.DataFrame, str], Path]


def test_csv_round_trip(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    ds = load_dataset(str(write_csv(make_frame(300), "customers.csv")), target="label")
    assert isinstance(ds, TabularSplits)
    assert ds.name == "customers"
    assert ds.class_names == ["no", "yes"]
    assert ds.feature_names == ["a", "b", "colour=blue", "colour=green", "colour=red"]
    assert ds.n_features == 5 and ds.n_classes == 2
    assert (len(ds.y_train), len(ds.y_valid), len(ds.y_test)) == (180, 60, 60)
    assert ds.X_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    d = ds.describe()
    json.dumps(d)
    assert d["n_rows"] == 300 and d["target"] == "label" and d["split"] == [0.6, 0.2, 0.2]
    assert d["splits"]["train"]["class_counts"] == {"no": 120, "yes": 60}


def test_parquet_and_npz(tmp_path: Path, make_frame: MakeFrame) -> None:
    frame = make_frame(200)
    frame.to_parquet(tmp_path / "t.parquet")
    assert load_dataset(tmp_path / "t.parquet", target="label").n_features == 5

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(150, 4)), np.repeat([0, 1, 2], 50)
    np.savez(tmp_path / "arrays.npz", X=X, y=y)
    ds = load_dataset(str(tmp_path / "arrays.npz"))
    assert ds.name == "arrays" and ds.feature_names == ["x0", "x1", "x2", "x3"]
    assert ds.class_names == ["0", "1", "2"] and ds.X_train.shape == (90, 4)


def test_stratification_keeps_class_proportions(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    frame = make_frame(1000)
    frame["label"] = np.repeat(["a", "b", "c"], [700, 200, 100])
    ds = load_dataset(write_csv(frame, "s.csv"), target="label", seed=5)
    for part, share in (("train", 0.6), ("valid", 0.2), ("test", 0.2)):
        counts = np.bincount(ds.split(part)[1], minlength=3)
        np.testing.assert_allclose(counts, np.array([700, 200, 100]) * share, atol=1)


def test_split_is_seeded_and_deterministic(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    path = write_csv(make_frame(300), "d.csv")
    a = load_dataset(path, target="label", seed=7)
    b = load_dataset(path, target="label", seed=7)
    c = load_dataset(path, target="label", seed=8)
    for part in ("train", "valid", "test"):
        np.testing.assert_array_equal(a.indices[part], b.indices[part])
        np.testing.assert_array_equal(a.split(part)[0], b.split(part)[0])
    assert not np.array_equal(np.sort(a.indices["test"]), np.sort(c.indices["test"]))
    all_rows = np.concatenate([a.indices[p] for p in ("train", "valid", "test")])
    assert sorted(all_rows.tolist()) == list(range(300))


def test_custom_split_fractions(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    ds = load_dataset(write_csv(make_frame(300), "f.csv"), target="label", split=(0.8, 0.1, 0.1))
    assert (len(ds.y_train), len(ds.y_valid), len(ds.y_test)) == (240, 30, 30)


def test_max_rows_is_a_stratified_subsample(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    path = write_csv(make_frame(900), "m.csv")
    ds = load_dataset(path, target="label", max_rows=150, seed=1)
    total = sum(len(ds.split(p)[1]) for p in ("train", "valid", "test"))
    assert total == 150
    all_y = np.concatenate([ds.split(p)[1] for p in ("train", "valid", "test")])
    assert np.bincount(all_y).tolist() == [100, 50]
    assert load_dataset(path, target="label", max_rows=10_000).describe()["n_rows"] == 900


def test_rows_with_missing_target_are_dropped(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    frame = make_frame(300)
    frame.loc[:9, "label"] = None
    ds = load_dataset(write_csv(frame, "t.csv"), target="label")
    assert ds.info["dropped_rows_missing_target"] == 10
    assert ds.describe()["n_rows"] == 290
    assert min(ds.indices["train"].min(), ds.indices["test"].min()) >= 10


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(3, 40), min_size=2, max_size=5), seed=st.integers(0, 10_000))
def test_stratified_split_partitions_rows(counts: list[int], seed: int) -> None:
    y = np.repeat(np.arange(len(counts)), counts)
    if len(y) * 0.2 < len(counts):  # too few rows to give every class a test row
        return
    train, valid, test = stratified_split(y, seed=seed)
    joined = np.concatenate([train, valid, test])
    assert sorted(joined.tolist()) == list(range(len(y)))
    again = stratified_split(y, seed=seed)
    np.testing.assert_array_equal(train, again[0])


# -- user mistakes --------------------------------------------------------------------------------


def test_missing_file() -> None:
    with pytest.raises(
        DatasetError, match=r"^data file '.*nope\.csv' does not exist: check the path$"
    ):
        load_dataset("data/nope.csv", target="y")


def test_missing_target_column_lists_columns(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    path = write_csv(make_frame(50), "t.csv")
    with pytest.raises(
        DatasetError,
        match=r"^target column 'churn' is not in 't\.csv': available "
        r"columns are a, b, colour, label$",
    ):
        load_dataset(path, target="churn")
    with pytest.raises(
        DatasetError, match=r"no target column given .*--target COLUMN, one of a, b"
    ):
        load_dataset(path)


def test_unknown_named_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        DatasetError,
        match=r"target column 'nope' is not in dataset "
        r"'breast-cancer': available columns are mean radius",
    ):
        load_dataset("breast-cancer", target="nope")


def test_unsupported_and_broken_files(tmp_path: Path) -> None:
    (tmp_path / "t.xlsx").write_bytes(b"PK")
    with pytest.raises(DatasetError, match=r"unsupported format: use one of \.csv"):
        load_dataset(str(tmp_path / "t.xlsx"), target="y")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DatasetError, match=r"is empty"):
        load_dataset(tmp_path / "empty.csv", target="y")
    (tmp_path / "bad.parquet").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"cannot parse .*bad\.parquet"):
        load_dataset(tmp_path / "bad.parquet", target="y")
    np.savez(tmp_path / "noy.npz", X=np.zeros((10, 2)))
    with pytest.raises(DatasetError, match=r"needs 'X' \(features\) and 'y'"):
        load_dataset(tmp_path / "noy.npz")
    with pytest.raises(DatasetError, match=r"is a folder"):
        load_dataset(str(tmp_path) + "/", target="y")


def test_bad_options(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    path = write_csv(make_frame(100), "o.csv")
    for split in ((0.5, 0.5), (0.8, 0.3, -0.1), (0.6, 0.2, 0.1), "abc"):
        with pytest.raises(DatasetError, match=r"split must be three positive fractions"):
            load_dataset(path, target="label", split=split)
    for max_rows in (0, -5, 2.5):
        with pytest.raises(DatasetError, match=r"max_rows must be a positive integer"):
            load_dataset(path, target="label", max_rows=max_rows)
    with pytest.raises(DatasetError, match=r"max_rows=4 is too small for 2 classes"):
        load_dataset(path, target="label", max_rows=4)
    with pytest.raises(DatasetError, match=r"seed must be a non-negative integer"):
        load_dataset(path, target="label", seed=-1)


def test_rare_class_cannot_be_stratified(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    frame = make_frame(100)
    frame.loc[0, "label"] = "rare"
    with pytest.raises(DatasetError, match=r"class\(es\) 'rare' \(1\) have fewer than 3 rows"):
        load_dataset(write_csv(frame, "r.csv"), target="label")


def test_no_feature_columns(write_csv: WriteCsv) -> None:
    path = write_csv(pd.DataFrame({"label": ["a", "b"] * 20}), "only.csv")
    with pytest.raises(DatasetError, match=r"no feature columns besides the target 'label'"):
        load_dataset(path, target="label")
