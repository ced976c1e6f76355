"""Preprocessing: no leakage from valid/test, one-hot, imputation, dropped columns, bad columns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpqat.data import TabularPreprocessor, encode_target, load_dataset
from mpqat.data.preprocess import MISSING, looks_like_id_name
from mpqat.errors import DatasetError

MakeFrame = Callable[..., pd.DataFrame]
WriteCsv = Callable[[pd.DataFrame, str], Path]


def test_scaler_statistics_come_from_train_only(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    frame = make_frame(600)
    first = load_dataset(write_csv(frame, "plain.csv"), target="label", seed=3)
    held_out = np.concatenate([first.indices["valid"], first.indices["test"]])

    # Shift the distribution of the valid/test rows only; the split depends on labels and
    # seed alone, so the same rows land in each part.
    shifted = frame.copy()
    shifted.loc[held_out, "a"] += 100.0
    shifted.loc[held_out, "b"] *= 50.0
    second = load_dataset(write_csv(shifted, "shifted.csv"), target="label", seed=3)
    for part in ("train", "valid", "test"):
        np.testing.assert_array_equal(first.indices[part], second.indices[part])

    a, b = second.feature_names.index("a"), second.feature_names.index("b")
    np.testing.assert_allclose(second.X_train[:, [a, b]].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(second.X_train[:, [a, b]].std(0), 1.0, atol=1e-5)
    assert second.X_test[:, a].mean() > 20 and second.X_valid[:, a].mean() > 20
    assert abs(second.X_test[:, b].std() - 1.0) > 1.0
    # Changing test rows does not change the transformed training rows.
    np.testing.assert_array_equal(first.X_train, second.X_train)
    np.testing.assert_array_equal(first.y_train, second.y_train)

    # The fitted statistics are exactly those of the raw training rows.
    spec = {s.name: s for s in second.preprocessor.columns}["a"]
    raw_train = shifted.loc[second.indices["train"], "a"]
    assert spec.mean == pytest.approx(raw_train.mean())
    assert spec.std == pytest.approx(raw_train.std(ddof=0))


def test_categories_come_from_train_and_unseen_give_zeros() -> None:
    train = pd.DataFrame({"colour": ["red", "blue", "red", " blue "], "x": [1.0, 2.0, 3.0, 4.0]})
    test = pd.DataFrame({"colour": ["green", "red", None], "x": [1.0, 1.0, 1.0]})
    pre = TabularPreprocessor().fit(train)
    assert pre.feature_names == ["colour=blue", "colour=red", "x"]
    X = pre.transform(test, "test")
    np.testing.assert_array_equal(X[:, :2], [[0, 0], [0, 1], [0, 0]])
    assert X.dtype == np.float32


def test_unseen_category_through_load_dataset(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    frame = make_frame(300)
    first = load_dataset(write_csv(frame, "a.csv"), target="label", seed=0)
    frame.loc[first.indices["test"][:5], "colour"] = "purple"
    ds = load_dataset(write_csv(frame, "b.csv"), target="label", seed=0)
    assert not any("purple" in n for n in ds.feature_names)
    onehot = [i for i, n in enumerate(ds.feature_names) if n.startswith("colour=")]
    assert ds.X_test[:5][:, onehot].sum() == 0
    assert (ds.X_test[5:][:, onehot].sum(1) == 1).all()


def test_missing_values_become_a_category() -> None:
    train = pd.DataFrame({"c": ["a", None, "b", "a"], "x": [1.0, 2.0, 3.0, 4.0]})
    pre = TabularPreprocessor().fit(train)
    assert pre.feature_names == [f"c={MISSING}", "c=a", "c=b", "x"]
    np.testing.assert_array_equal(pre.transform(train)[:, 0], [0, 1, 0, 0])


def test_nan_is_imputed_with_the_training_median() -> None:
    train = pd.DataFrame({"x": [1.0, 2.0, np.nan, 10.0, 3.0]})
    pre = TabularPreprocessor().fit(train)
    filled = np.array([1.0, 2.0, 2.5, 10.0, 3.0])  # median of the present values is 2.5
    expected = (filled - filled.mean()) / filled.std()
    np.testing.assert_allclose(pre.transform(train)[:, 0], expected, rtol=1e-6)
    test = pd.DataFrame({"x": [np.nan]})
    assert pre.transform(test)[0, 0] == pytest.approx((2.5 - filled.mean()) / filled.std())


def test_blank_cells_in_a_csv_are_imputed(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    frame = make_frame(300)
    frame.loc[::7, "a"] = np.nan
    # like the Kaggle Telco CSV: a number column with " " for missing values is still numeric
    frame["charges"] = [" " if i % 11 == 0 else f"{i * 1.5:.2f}" for i in range(len(frame))]
    ds = load_dataset(write_csv(frame, "t.csv"), target="label")
    assert {"a", "charges"} <= set(ds.feature_names)
    assert np.isfinite(ds.X_train).all() and np.isfinite(ds.X_test).all()


def test_constant_column_gets_std_one() -> None:
    pre = TabularPreprocessor().fit(pd.DataFrame({"k": [4.0, 4.0, 4.0]}))
    np.testing.assert_array_equal(pre.transform(pd.DataFrame({"k": [4.0, 5.0]}))[:, 0], [0, 1])


def test_id_like_columns_are_dropped(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    frame = make_frame(300)
    frame.insert(0, "customerID", [f"{i:04d}-ABCDE" for i in range(len(frame))])
    frame.insert(1, "user_id", np.arange(len(frame)) * 7)
    ds = load_dataset(write_csv(frame, "ids.csv"), target="label")
    assert set(ds.info["dropped_columns"]) == {"customerID", "user_id"}
    assert not any(n.startswith(("customerID", "user_id")) for n in ds.feature_names)
    assert ds.describe()["dropped_columns"]["customerID"].startswith("ID-like")


def test_id_names() -> None:
    for name in ("id", "ID", "customerID", "customerId", "user_id", "Unnamed: 0", "row-uuid"):
        assert looks_like_id_name(name), name
    for name in ("paid", "valid", "android", "idle", "width"):
        assert not looks_like_id_name(name), name


def test_all_nan_column_is_dropped_with_a_note(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    frame = make_frame(300)
    frame["empty"] = np.nan
    frame["empty_text"] = None
    ds = load_dataset(write_csv(frame, "e.csv"), target="label")
    assert ds.info["dropped_columns"] == {
        "empty": "all values missing in the training split",
        "empty_text": "all values missing in the training split",
    }
    assert "empty" not in ds.feature_names and np.isfinite(ds.X_train).all()


def test_text_column_with_too_many_values_is_rejected(
    make_frame: MakeFrame, write_csv: WriteCsv
) -> None:
    frame = make_frame(600)
    frame["comment"] = [f"word{i % 250}" for i in range(len(frame))]
    with pytest.raises(
        DatasetError,
        match=r"^column 'comment' has \d+ distinct text values "
        r"\(one-hot limit 100\) and cannot be encoded: drop it",
    ):
        load_dataset(write_csv(frame, "c.csv"), target="label")


def test_mixed_type_column_is_rejected() -> None:
    frame = pd.DataFrame({"m": pd.Series([1, "two", 3.0, None], dtype=object)})
    with pytest.raises(DatasetError, match=r"column 'm' mixes value types \(number, text\)"):
        TabularPreprocessor().fit(frame)


def test_date_column_is_rejected() -> None:
    frame = pd.DataFrame({"when": pd.date_range("2024-01-01", periods=4)})
    with pytest.raises(DatasetError, match=r"column 'when' holds dates/times"):
        TabularPreprocessor().fit(frame)


def test_infinite_values_are_rejected(make_frame: MakeFrame, write_csv: WriteCsv) -> None:
    frame = make_frame(300)
    frame["a"] = frame["a"].astype(object)
    frame.loc[::5, "a"] = "inf"
    with pytest.raises(DatasetError, match=r"column 'a' has infinite values in the train split"):
        load_dataset(write_csv(frame, "inf.csv"), target="label")


def test_nan_left_after_preprocessing_is_an_error(
    make_frame: MakeFrame, write_csv: WriteCsv
) -> None:
    frame = make_frame(300)
    frame["huge"] = 1e307 * (1.0 + np.random.default_rng(0).random(len(frame)))  # sum overflows
    with pytest.raises(
        DatasetError,
        match=r"preprocessing left NaN/inf in feature\(s\) \['huge'\] "
        r"of the train split",
    ):
        load_dataset(write_csv(frame, "huge.csv"), target="label")


def test_bool_and_category_dtypes_are_one_hot(tmp_path: Path, make_frame: MakeFrame) -> None:
    frame = make_frame(300)
    frame["flag"] = frame["a"] > 5
    frame["size"] = pd.Categorical(np.where(frame["b"] > 4, "big", "small"))
    path = tmp_path / "t.parquet"
    frame.to_parquet(path)
    ds = load_dataset(path, target="label")
    assert {"flag=False", "flag=True", "size=big", "size=small"} <= set(ds.feature_names)


def test_transform_needs_the_fitted_columns() -> None:
    pre = TabularPreprocessor().fit(pd.DataFrame({"x": [1.0, 2.0], "y": [3.0, 4.0]}))
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['y'\]"):
        pre.transform(pd.DataFrame({"x": [1.0]}), "test")


# -- target encoding ------------------------------------------------------------------------------


def test_positive_class_is_label_one() -> None:
    y, names = encode_target(pd.Series(["yes", "no", "no"]), positive_class="yes")
    assert names == ["no", "yes"] and y.tolist() == [1, 0, 0] and y.dtype == np.int64
    y, names = encode_target(pd.Series(["Yes", "No"]), positive_class="No")
    assert names == ["Yes", "No"] and y.tolist() == [0, 1]


def test_numeric_targets_sort_as_numbers() -> None:
    y, names = encode_target(pd.Series([10.0, 2.0, 1.0, 2.0]))
    assert names == ["1", "2", "10"] and y.tolist() == [2, 1, 0, 1]
    y, names = encode_target(pd.Series([True, False]))
    assert names == ["False", "True"] and y.tolist() == [1, 0]


def test_bad_targets() -> None:
    with pytest.raises(DatasetError, match=r"only one class"):
        encode_target(pd.Series(["a", "a"]), name="t")
    with pytest.raises(DatasetError, match=r"has 500 distinct values .*bin it"):
        encode_target(pd.Series(np.linspace(0, 1, 500)), name="t")
