"""Seeded stratified splits, and :class:`TabularSplits`, the preprocessed result.

The split is made on row positions and labels only, before any preprocessing is fitted:
first the test fraction is split off, then the rest is split into train and valid, both with
:func:`sklearn.model_selection.train_test_split` (``stratify=y``, ``random_state=seed``).
The same (labels, seed, fractions) always give the same rows; another seed gives another split.

Example::

    >>> import numpy as np
    >>> y = np.array([0] * 12 + [1] * 8)
    >>> train, valid, test = stratified_split(y, split=(0.6, 0.2, 0.2), seed=0)
    >>> len(train), len(valid), len(test), np.bincount(y[train]).tolist()
    (12, 4, 4, [7, 5])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpqat.errors import DatasetError

SPLIT_NAMES = ("train", "valid", "test")


def check_split(split: Sequence[float]) -> tuple[float, float, float]:
    """Validate ``(train, valid, test)`` fractions: three positive numbers summing to 1."""
    try:
        fractions = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        fractions = ()
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise DatasetError(
            f"split must be three positive fractions (train, valid, test) summing to 1, got "
            f"{split!r}: use e.g. (0.6, 0.2, 0.2)"
        )
    return fractions  # type: ignore[return-value]


def _check_class_counts(y: np.ndarray, class_names: Sequence[str], minimum: int, why: str) -> None:
    counts = np.bincount(y, minlength=len(class_names))
    rare = [f"'{class_names[i]}' ({int(c)})" for i, c in enumerate(counts) if 0 < c < minimum]
    if rare:
        raise DatasetError(
            f"class(es) {', '.join(rare[:5])} have fewer than {minimum} rows, too few for {why}: "
            "remove or merge rare classes, or raise max_rows"
        )


def stratified_subsample(
    y: np.ndarray, max_rows: int, seed: int, class_names: Sequence[str]
) -> np.ndarray:
    """Sorted positions of a stratified random subset of ``max_rows`` rows (all rows if fewer)."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 1:
        raise DatasetError(f"max_rows must be a positive integer, got {max_rows!r}")
    n = len(y)
    if max_rows >= n:
        return np.arange(n)
    n_classes = int(np.count_nonzero(np.bincount(y)))
    if max_rows < 3 * n_classes:
        raise DatasetError(
            f"max_rows={max_rows} is too small for {n_classes} classes: a stratified "
            f"train/valid/test split needs at least {3 * n_classes} rows"
        )
    _check_class_counts(y, class_names, 2, "a stratified subsample")
    from sklearn.model_selection import train_test_split  # deferred: slow import

    keep, _ = train_test_split(
        np.arange(n), train_size=int(max_rows), stratify=y, random_state=seed
    )
    return np.sort(keep)


def stratified_split(
    y: np.ndarray,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row positions of the train, valid and test parts; each keeps the class proportions."""
    train_f, valid_f, test_f = check_split(split)
    names = list(class_names) if class_names is not None else [str(i) for i in range(y.max() + 1)]
    _check_class_counts(y, names, 3, "a stratified train/valid/test split")
    idx = np.arange(len(y))
    # Whole row counts, so that e.g. 300 rows at 0.8/0.1/0.1 give exactly 240/30/30.
    n_test = max(1, int(round(len(y) * test_f)))
    n_valid = max(1, int(round(len(y) * valid_f)))
    from sklearn.model_selection import train_test_split  # deferred: slow import

    try:
        if n_test + n_valid >= len(y):
            raise ValueError("no rows left for training")
        rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
        train, valid = train_test_split(
            rest, test_size=n_valid, stratify=y[rest], random_state=seed
        )
    except ValueError as exc:
        raise DatasetError(
            f"cannot make a stratified {train_f:g}/{valid_f:g}/{test_f:g} split of {len(y)} rows "
            f"with {len(names)} classes ({exc}): use more rows or fewer, larger classes"
        ) from None
    return train, valid, test


@dataclass(eq=False)  # arrays make field-wise == ambiguous; compare the arrays yourself
class TabularSplits:
    """A preprocessed tabular dataset: float32 features and int64 labels for train/valid/test.

    ``indices[split]`` are the row positions in the source table; ``preprocessor`` is the
    fitted :class:`~mpqat.data.preprocess.TabularPreprocessor` (to transform new rows the same
    way); ``info`` records the target, seed, split, dropped columns and dropped rows.
    Image datasets (``mpqat.data.images``) come as flat rows too, with ``input_shape`` set.

    Example::

        >>> ds = load_dataset("telco-churn")  # doctest: +SKIP
        >>> ds.X_train.shape, ds.n_classes, ds.class_names  # doctest: +SKIP
        ((4225, 40), 2, ['No', 'Yes'])
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_valid: np.ndarray
    y_valid: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    feature_names: list[str]
    class_names: list[str]
    indices: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    info: dict[str, Any] = field(default_factory=dict, repr=False)
    preprocessor: Any = field(default=None, repr=False, compare=False)
    #: per-sample shape of the flat rows for image-like data (e.g. ``(1, 28, 28)``); None for tables
    input_shape: tuple[int, ...] | None = None

    @property
    def n_features(self) -> int:
        """Number of feature columns after one-hot encoding."""
        return int(self.X_train.shape[1])

    @property
    def n_classes(self) -> int:
        """Number of classes (labels are 0..n_classes-1)."""
        return len(self.class_names)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` of ``"train"``, ``"valid"`` or ``"test"``."""
        if name not in SPLIT_NAMES:
            raise DatasetError(f"unknown split '{name}': use one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, f"X_{name}"), getattr(self, f"y_{name}")

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: sizes, class balance per split and preprocessing notes.

        Example::

            >>> ds.describe()["splits"]["train"]  # doctest: +SKIP
            {'n_rows': 4225, 'class_counts': {'No': 3104, 'Yes': 1121}, 'class_fractions': {...}}
        """
        splits = {}
        for part in SPLIT_NAMES:
            _, y = self.split(part)
            counts = (
                np.bincount(y, minlength=self.n_classes) if len(y) else np.zeros(self.n_classes)
            )
            total = max(int(counts.sum()), 1)
            splits[part] = {
                "n_rows": int(len(y)),
                "class_counts": {c: int(n) for c, n in zip(self.class_names, counts)},
                "class_fractions": {
                    c: round(int(n) / total, 4) for c, n in zip(self.class_names, counts)
                },
            }
        return {
            "name": self.name,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "class_names": list(self.class_names),
            "n_rows": sum(len(self.split(part)[1]) for part in SPLIT_NAMES),
            "splits": splits,
            **{k: v for k, v in self.info.items() if k not in ("name",)},
        }
