"""Turn a raw table into float32 features and int64 labels, fitting on the training split only.

:class:`TabularPreprocessor` is fitted on the training rows and then applied unchanged to the
validation and test rows, so no statistic of valid/test leaks into the features:

* Column kinds are decided on the training split. ``bool`` and ``category`` columns, and text
  columns with at most :data:`MAX_CATEGORIES` distinct values, are **categorical**. Text
  columns whose non-blank values all parse as numbers (e.g. ``" "`` for a missing number in a
  CSV) are **numeric** (a value in valid/test that does not parse counts as missing). Other
  numeric dtypes are numeric.
* Dropped columns (each recorded in ``dropped`` with the reason): ID-like columns (every
  training value distinct, and either more than :data:`MAX_CATEGORIES` distinct text values or
  a name such as ``id``, ``customerID``, ``user_id`` or ``Unnamed: 0``), since an identifier
  carries no signal that generalises; and columns that are entirely missing in the training
  split (nothing to learn from them).
* Categorical: values are compared as stripped strings, missing values become their own
  category ``<missing>``; the categories are the training values, sorted; each becomes a 0/1
  column named ``column=value``. Values not seen in training (in valid/test) give all zeros.
* Numeric: NaN is imputed with the training median, then the column is standardised with the
  training mean and standard deviation (population std, ddof=0; a std of 0 is replaced by 1).
  The 0/1 one-hot columns are not standardised.
* Errors (:class:`~mpqat.errors.DatasetError`, naming the column): a text column with more than
  :data:`MAX_CATEGORIES` distinct values that is not ID-like, a column mixing value types, a
  date/time or complex column, infinite values, and any NaN/inf left after preprocessing.

Labels: :func:`encode_target` maps the target to 0..K-1 in sorted order of the class names,
except that a binary task's positive class (e.g. churn "Yes") is label 1.

Example::

    >>> pre = TabularPreprocessor().fit(train_frame)  # doctest: +SKIP
    >>> X_train, X_test = pre.transform(train_frame), pre.transform(test_frame)  # doctest: +SKIP
    >>> pre.feature_names[:3]  # doctest: +SKIP
    ['female', 'senior_citizen', 'partner']
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from numbers import Number

import numpy as np
import pandas as pd

from mpqat.errors import DatasetError

MAX_CATEGORIES = 100
MAX_CLASSES = 100
MISSING = "<missing>"

_ID_EXACT = re.compile(r"^(id|uuid|guid|index|rowid|row_id|unnamed: ?\d+)$", re.IGNORECASE)
_ID_SUFFIX = re.compile(r"[_\-\s.](id|uuid|guid)$", re.IGNORECASE)
_ID_CAMEL = re.compile(r"[a-z0-9](ID|Id)$")


def looks_like_id_name(name: str) -> bool:
    """True for names such as ``id``, ``customerID``, ``user_id``, ``Unnamed: 0`` (not ``paid``)."""
    return bool(_ID_EXACT.search(name) or _ID_SUFFIX.search(name) or _ID_CAMEL.search(name))


@dataclass
class ColumnSpec:
    """How one source column is turned into features."""

    name: str
    kind: str  # "numeric" or "categorical"
    parse_text: bool = False  # numeric column stored as text: parse with pd.to_numeric
    median: float = 0.0
    mean: float = 0.0
    std: float = 1.0
    categories: list[str] = field(default_factory=list)

    @property
    def feature_names(self) -> list[str]:
        if self.kind == "numeric":
            return [self.name]
        return [f"{self.name}={c}" for c in self.categories]


def _as_text(series: pd.Series) -> pd.Series:
    """Values as stripped strings, missing values as :data:`MISSING`."""
    values = series.astype(object)
    out = [MISSING if _is_missing(v) else str(v).strip() for v in values]
    return pd.Series(out, index=series.index, dtype=object)


def _is_missing(value: object) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _text_to_numbers(series: pd.Series) -> pd.Series:
    values = series.astype(object).map(
        lambda v: np.nan if _is_missing(v) or (isinstance(v, str) and not v.strip()) else v
    )
    return pd.to_numeric(values, errors="coerce").astype("float64")


def _unencodable(column: str, why: str) -> DatasetError:
    return DatasetError(
        f"column '{column}' {why} and cannot be encoded: drop it or convert it to numbers "
        "before loading"
    )


def _classify_object(column: str, series: pd.Series) -> tuple[str, bool]:
    """Kind of a text/object column: ("numeric", True) when every value parses as a number."""
    present = [v for v in series.astype(object) if not _is_missing(v)]
    kinds = {
        "text"
        if isinstance(v, str)
        else "bool"
        if isinstance(v, (bool, np.bool_))
        else "number"
        if isinstance(v, Number)
        else type(v).__name__
        for v in present
    }
    if kinds <= {"number"}:
        return "numeric", True
    if kinds == {"bool"}:
        return "categorical", False
    if kinds != {"text"}:
        raise _unencodable(column, f"mixes value types ({', '.join(sorted(kinds))})")
    stripped = [v.strip() for v in present if v.strip()]
    if stripped and pd.to_numeric(pd.Series(stripped, dtype=object), errors="coerce").notna().all():
        return "numeric", True
    return "categorical", False


class TabularPreprocessor:
    """One-hot + median-impute + standardise, fitted on training rows only (module docstring)."""

    def __init__(self, max_categories: int = MAX_CATEGORIES) -> None:
        self.max_categories = max_categories
        self.columns: list[ColumnSpec] = []
        self.dropped: dict[str, str] = {}
        self.fitted = False

    @property
    def feature_names(self) -> list[str]:
        """Names of the output features, in order (``column`` or ``column=value``)."""
        return [name for spec in self.columns for name in spec.feature_names]

    # -- fit -----------------------------------------------------------------------------------
    def fit(self, frame: pd.DataFrame) -> TabularPreprocessor:
        """Learn column kinds, categories, medians, means and stds from the training rows."""
        self.columns, self.dropped = [], {}
        for col in frame.columns:
            spec = self._fit_column(str(col), frame[col])
            if spec is not None:
                self.columns.append(spec)
        if not self.columns:
            raise DatasetError(
                "no usable feature column is left after dropping "
                f"{', '.join(f'{c} ({r})' for c, r in self.dropped.items()) or 'nothing'}: "
                "the table needs at least one feature column besides the target"
            )
        self.fitted = True
        return self

    def _fit_column(self, name: str, s: pd.Series) -> ColumnSpec | None:
        dtype = s.dtype
        if s.isna().all():
            self.dropped[name] = "all values missing in the training split"
            return None
        if pd.api.types.is_bool_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype):
            kind, parse_text = "categorical", False
        elif (
            pd.api.types.is_datetime64_any_dtype(dtype)
            or pd.api.types.is_timedelta64_dtype(dtype)
            or isinstance(dtype, (pd.PeriodDtype, pd.IntervalDtype))
        ):
            raise _unencodable(name, f"holds dates/times ({dtype})")
        elif pd.api.types.is_complex_dtype(dtype):
            raise _unencodable(name, "holds complex numbers")
        elif pd.api.types.is_numeric_dtype(dtype):
            kind, parse_text = "numeric", False
        else:
            kind, parse_text = _classify_object(name, s)

        if kind == "numeric":
            values = self._numeric_values(ColumnSpec(name, kind, parse_text), s, "train")
            present = values[~np.isnan(values)]
            if present.size == 0:
                self.dropped[name] = "all values missing in the training split"
                return None
            integral = bool(np.all(present == np.round(present)))
            if (
                looks_like_id_name(name)
                and integral
                and present.size > 1
                and np.unique(present).size == present.size
            ):
                self.dropped[name] = "ID-like: every training value is a distinct integer"
                return None
            median = float(np.median(present))
            filled = np.where(np.isnan(values), median, values)
            with np.errstate(all="ignore"):
                mean, std = float(filled.mean()), float(filled.std())
            if std == 0.0:
                std = 1.0
            return ColumnSpec(name, kind, parse_text, median=median, mean=mean, std=std)

        text = _as_text(s)
        present = text[text != MISSING]
        n_unique = present.nunique()
        all_distinct = n_unique == len(present) and len(present) == len(text) and len(text) > 1
        if all_distinct and (n_unique > self.max_categories or looks_like_id_name(name)):
            self.dropped[name] = "ID-like: every training value is distinct"
            return None
        if n_unique > self.max_categories:
            raise _unencodable(
                name, f"has {n_unique} distinct text values (one-hot limit {self.max_categories})"
            )
        return ColumnSpec(name, kind, categories=sorted(text.unique().tolist()))

    # -- transform -----------------------------------------------------------------------------
    @staticmethod
    def _numeric_values(spec: ColumnSpec, s: pd.Series, split: str) -> np.ndarray:
        if spec.parse_text or not pd.api.types.is_numeric_dtype(s.dtype):
            values = _text_to_numbers(s).to_numpy(dtype=np.float64)
        else:
            values = s.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
        if np.isinf(values).any():
            raise DatasetError(
                f"column '{spec.name}' has infinite values in the {split} split: replace them "
                "with finite numbers or leave them empty (missing values are imputed)"
            )
        return values

    def transform(self, frame: pd.DataFrame, split: str = "given") -> np.ndarray:
        """Features of ``frame``, float32 [n, n_features]; ``split`` names the part in errors."""
        if not self.fitted:
            raise RuntimeError("TabularPreprocessor.transform called before fit")
        missing = [spec.name for spec in self.columns if spec.name not in frame.columns]
        if missing:
            raise DatasetError(
                f"the {split} table lacks column(s) {missing} that the preprocessing was fitted "
                "on: use a table with the same columns as the training data"
            )
        blocks: list[np.ndarray] = []
        for spec in self.columns:
            s = frame[spec.name]
            if spec.kind == "numeric":
                values = self._numeric_values(spec, s, split)
                values = np.where(np.isnan(values), spec.median, values)
                with np.errstate(all="ignore"):
                    blocks.append(((values - spec.mean) / spec.std)[:, None])
            else:
                codes = pd.Index(spec.categories).get_indexer(_as_text(s))  # -1 = unseen
                onehot = np.zeros((len(s), len(spec.categories)), dtype=np.float64)
                seen = codes >= 0
                onehot[np.flatnonzero(seen), codes[seen]] = 1.0
                blocks.append(onehot)
        X = np.hstack(blocks) if blocks else np.zeros((len(frame), 0))
        with np.errstate(all="ignore"):
            X32 = X.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(X32).all(axis=0))
        if bad.size:
            names = [self.feature_names[i] for i in bad]
            raise DatasetError(
                f"preprocessing left NaN/inf in feature(s) {names[:5]} of the {split} split "
                "(values too large to standardise in float32?): rescale or drop the column(s)"
            )
        return X32


def encode_target(
    series: pd.Series, positive_class: str | None = None, name: str = "target"
) -> tuple[np.ndarray, list[str]]:
    """Labels 0..K-1 (int64) and the class names; sorted order, positive class last if binary.

    Integral numbers are named without a decimal point ("1", not "1.0"). Missing values must
    have been removed before.

    Example::

        >>> encode_target(pd.Series(["No", "Yes", "No"]), positive_class="Yes")
        (array([0, 1, 0]), ['No', 'Yes'])
    """
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        numbers = series.astype("float64").to_numpy()
        if np.isinf(numbers).any():
            raise DatasetError(f"target column '{name}' has infinite values: remove those rows")
        integral = bool(np.all(numbers == np.round(numbers)))
        values = list(numbers.astype(np.int64) if integral else numbers)
    else:
        values = _as_text(series).tolist()
    class_values = sorted(set(values))
    class_names = [str(v) for v in class_values]
    if len(class_names) < 2:
        raise DatasetError(
            f"target column '{name}' has only one class ({class_names}): a classifier needs at "
            "least two; pick another target column"
        )
    if len(class_names) > MAX_CLASSES:
        raise DatasetError(
            f"target column '{name}' has {len(class_names)} distinct values (at most "
            f"{MAX_CLASSES} classes supported; a continuous target?): bin it into classes or "
            "pick a class column"
        )
    if len(set(class_names)) != len(class_names):
        raise DatasetError(
            f"target column '{name}' has values that print alike ({class_names}): make them "
            "one type"
        )
    if positive_class is not None and len(class_names) == 2 and positive_class in class_names:
        class_names = [c for c in class_names if c != positive_class] + [positive_class]
    lookup = {c: i for i, c in enumerate(class_names)}
    y = np.fromiter((lookup[str(v)] for v in values), dtype=np.int64, count=len(values))
    return y, class_names
