"""``load_dataset``: a named dataset or a user's file -> seeded, stratified, preprocessed splits.

Steps, in this order (so nothing about valid/test leaks into the features):

1. read the table (the fetched cache of a named dataset, or a CSV/Parquet/NPZ file);
2. drop rows whose target is missing (counted in ``info["dropped_rows_missing_target"]``) and
   encode the target as 0..K-1 (sorted class names; a binary task's positive class is 1);
3. with ``max_rows``, keep a stratified random subset of that many rows (seeded);
4. split into train/valid/test, stratified and seeded (default 60/20/20);
5. fit :class:`~mpqat.data.preprocess.TabularPreprocessor` on the training rows only and
   transform all three parts (one-hot, median imputation, standardisation: see
   ``preprocess.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mpqat.data.fetch import read_named_table
from mpqat.data.preprocess import TabularPreprocessor, encode_target
from mpqat.data.readers import SUPPORTED_SUFFIXES, looks_like_path, read_table
from mpqat.data.registry import find_dataset, get_dataset
from mpqat.data.splits import (
    TabularSplits,
    check_split,
    stratified_split,
    stratified_subsample,
)
from mpqat.errors import DatasetError


def _file_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return path.stem


def _read(name_or_path: str | os.PathLike[str], target: str | None):
    text = os.fspath(name_or_path)
    info = find_dataset(text) if isinstance(name_or_path, str) else None
    if info is not None:
        frame = read_named_table(info)
        column = target or info.target
        if column not in frame.columns:
            raise DatasetError(
                f"target column '{column}' is not in dataset '{info.name}': available columns "
                f"are {', '.join(map(str, frame.columns))}"
            )
        positive = info.positive_class if column == info.target else None
        return info.name, frame, column, positive, info.source
    if looks_like_path(text):
        frame, column = read_table(text, target)
        return _file_stem(Path(text)), frame, column, None, str(Path(text).expanduser())
    get_dataset(text)  # raises the "unknown dataset ..." error
    raise AssertionError("unreachable")


def load_dataset(
    name_or_path: str | os.PathLike[str],
    target: str | None = None,
    seed: int = 0,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    max_rows: int | None = None,
) -> TabularSplits:
    """Load a named dataset (fetched before) or a CSV/Parquet/NPZ file as preprocessed splits.

    ``target`` defaults to the named dataset's target and is required for CSV/Parquet files
    (an ``.npz`` uses its arrays ``X`` and ``y``). ``seed`` fixes the subsample and the split;
    ``split`` gives the (train, valid, test) fractions; ``max_rows`` keeps a stratified random
    subset first (for quick runs). Every user mistake raises :class:`DatasetError`.
    Image datasets (``mnist``, ``fashion-mnist``) keep their official splits and come as flat
    standardised pixel rows with ``input_shape`` set (see :mod:`mpqat.data.images`).

    Example::

        >>> ds = load_dataset("adult", seed=1, max_rows=2000)  # doctest: +SKIP
        >>> ds.X_train.dtype, ds.y_train.dtype, ds.class_names  # doctest: +SKIP
        (dtype('float32'), dtype('int64'), ['<=50K', '>50K'])
        >>> ds = load_dataset("my_customers.csv", target="churned")  # doctest: +SKIP
    """
    fractions = check_split(split)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    image = find_dataset(name_or_path) if isinstance(name_or_path, str) else None
    if image is not None and image.kind == "image":
        from mpqat.data.images import load_image_dataset  # official splits: ``split`` does not apply

        return load_image_dataset(image, seed=seed, max_rows=max_rows)
    if image is not None and image.kind == "radio":
        from mpqat.data.radio import load_radio  # generated splits: ``split`` does not apply

        return load_radio(image.name, seed=seed, max_rows=max_rows)
    name, frame, column, positive, source = _read(name_or_path, target)

    missing_target = frame[column].isna().to_numpy()
    if missing_target.all():
        raise DatasetError(f"target column '{column}' of '{name}' has no values: pick another")
    rows = np.flatnonzero(~missing_target)
    y_all, class_names = encode_target(frame[column].iloc[rows], positive, column)

    keep = (
        np.arange(len(rows))
        if max_rows is None
        else stratified_subsample(y_all, max_rows, seed, class_names)
    )
    y_kept = y_all[keep]
    parts = stratified_split(y_kept, fractions, seed, class_names)
    indices = {p: rows[keep[pos]] for p, pos in zip(("train", "valid", "test"), parts)}
    labels = {p: y_kept[pos] for p, pos in zip(("train", "valid", "test"), parts)}

    features = frame.drop(columns=[column])
    if features.shape[1] == 0:
        raise DatasetError(f"'{name}' has no feature columns besides the target '{column}'")
    pre = TabularPreprocessor().fit(features.iloc[indices["train"]])
    X = {p: pre.transform(features.iloc[idx], p) for p, idx in indices.items()}

    return TabularSplits(
        name=name,
        X_train=X["train"],
        y_train=labels["train"],
        X_valid=X["valid"],
        y_valid=labels["valid"],
        X_test=X["test"],
        y_test=labels["test"],
        feature_names=pre.feature_names,
        class_names=class_names,
        indices=indices,
        info={
            "source": source,
            "target": column,
            "positive_class": class_names[1] if len(class_names) == 2 else None,
            "seed": seed,
            "split": list(fractions),
            "max_rows": max_rows,
            "n_rows_source": int(len(frame)),
            "dropped_rows_missing_target": int(missing_target.sum()),
            "dropped_columns": dict(pre.dropped),
        },
        preprocessor=pre,
    )


def load_frame(
    name_or_path: str | os.PathLike[str], target: str | None = None
) -> tuple[pd.DataFrame, str]:
    """The raw table (no split, no preprocessing) and its target column name.

    Example::

        >>> frame, target = load_frame("telco-churn")  # doctest: +SKIP
        >>> frame[target].value_counts().to_dict()  # doctest: +SKIP
        {'No': 5174, 'Yes': 1869}
    """
    _, frame, column, _, _ = _read(name_or_path, target)
    return frame, column
