"""Read a user's own table: CSV (also ``.csv.gz``, ``.tsv``), Parquet, or NPZ with arrays X and y.

Example::

    >>> frame, target = read_table("customers.csv", target="churned")  # doctest: +SKIP
    >>> frame, target = read_table("features.npz")   # columns x0..x{d-1} and 'y'  # doctest: +SKIP
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from mpqat.errors import DatasetError

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
NPZ_SUFFIXES = (".npz",)
SUPPORTED_SUFFIXES = CSV_SUFFIXES + PARQUET_SUFFIXES + NPZ_SUFFIXES


def looks_like_path(name: str) -> bool:
    """True when ``name`` is meant as a file (has a known suffix, a folder part, or exists)."""
    lowered = name.lower()
    return (
        lowered.endswith(SUPPORTED_SUFFIXES) or os.sep in name or "/" in name or Path(name).exists()
    )


def _read_npz(path: Path, target: str | None) -> tuple[pd.DataFrame, str]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(
            f"cannot read '{path}' as .npz ({exc}): save it with numpy.savez(path, X=X, y=y)"
        ) from None
    label_key = target or "y"
    if "X" not in arrays or label_key not in arrays:
        raise DatasetError(
            f"'{path}' has arrays {sorted(arrays)}, but an .npz needs 'X' (features) and "
            f"'{label_key}' (labels): save it with numpy.savez(path, X=X, y=y)"
        )
    X, y = arrays["X"], arrays[label_key]
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise DatasetError(
            f"'{path}': X must be 2-D [n, d] and {label_key} 1-D [n], got shapes {X.shape} and "
            f"{y.shape}: reshape them before saving"
        )
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == bool):
        raise DatasetError(
            f"'{path}': X has dtype {X.dtype}, not numbers: save text columns in a CSV/Parquet "
            "file instead, where they are one-hot encoded"
        )
    names = [str(n) for n in arrays["feature_names"]] if "feature_names" in arrays else []
    if len(names) != X.shape[1] or len(set(names)) != len(names):
        names = [f"x{i}" for i in range(X.shape[1])]
    label = label_key if label_key not in names else f"{label_key}_target"
    frame = pd.DataFrame(X.astype(np.float64), columns=names)
    frame[label] = y
    return frame, label


def read_table(path: str | os.PathLike[str], target: str | None) -> tuple[pd.DataFrame, str]:
    """Read a CSV/Parquet/NPZ file; return the table and the name of its target column.

    Raises :class:`DatasetError` for a missing file, an unknown format, a file that cannot be
    parsed, or a target column that is not given or not present (the message lists the columns).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"data file '{p}' does not exist: check the path")
    if p.is_dir():
        raise DatasetError(
            f"'{p}' is a folder, not a data file: pass a .csv, .parquet or .npz file"
        )
    lowered = p.name.lower()
    if lowered.endswith(NPZ_SUFFIXES):
        return _read_npz(p, target)
    try:
        if lowered.endswith(PARQUET_SUFFIXES):
            frame = pd.read_parquet(p)
        elif lowered.endswith(CSV_SUFFIXES):
            sep = "\t" if lowered.endswith(".tsv") else ","
            frame = pd.read_csv(p, sep=sep, low_memory=False)
        else:
            raise DatasetError(
                f"'{p.name}' has an unsupported format: use one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
    except DatasetError:
        raise
    except pd.errors.EmptyDataError:
        raise DatasetError(f"'{p}' is empty: it needs a header row and data rows") from None
    except UnicodeDecodeError:
        raise DatasetError(f"'{p}' is not UTF-8 text: re-save it as UTF-8 CSV") from None
    except Exception as exc:  # parser and pyarrow errors have many unrelated types
        first_line = (str(exc).splitlines() or [""])[0]
        raise DatasetError(
            f"cannot parse '{p}' ({type(exc).__name__}: {first_line}): "
            "check that it is a valid, comma-separated CSV with a header row or a Parquet file"
        ) from None
    frame.columns = [str(c) for c in frame.columns]
    if frame.columns.duplicated().any():
        dup = sorted(set(frame.columns[frame.columns.duplicated()]))
        raise DatasetError(f"'{p}' has duplicate column names {dup}: rename them")
    if target is None:
        raise DatasetError(
            f"no target column given for '{p.name}': pass --target COLUMN, one of "
            f"{_column_list(frame)}"
        )
    if target not in frame.columns:
        raise DatasetError(
            f"target column '{target}' is not in '{p.name}': available columns are "
            f"{_column_list(frame)}"
        )
    return frame, target


def _column_list(frame: pd.DataFrame, limit: int = 40) -> str:
    cols = [str(c) for c in frame.columns]
    shown = ", ".join(cols[:limit])
    return shown + (f", ... ({len(cols)} in all)" if len(cols) > limit else "")
