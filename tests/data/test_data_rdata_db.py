"""The R lazy-load database reader, on databases written here (no R, no network)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rdata.conversion import convert_python_to_r_data
from rdata.unparser import unparse_data

from mpqat.data.rdata_db import LazyLoadDB, decompress_entry
from mpqat.errors import DatasetError

LZMA2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def serialize(obj: object) -> bytes:
    return unparse_data(convert_python_to_r_data(obj), file_format="xdr", file_type="rds")


def entry(raw: bytes, kind: bytes | None) -> bytes:
    body = {
        b"Z": lambda: lzma.compress(raw, format=lzma.FORMAT_RAW, filters=LZMA2),
        b"2": lambda: bz2.compress(raw),
        b"1": lambda: zlib.compress(raw),
        b"0": lambda: raw,
        None: lambda: zlib.compress(raw),
    }[kind]()
    return struct.pack(">I", len(raw)) + (kind or b"") + body


@pytest.mark.parametrize(
    ("kind", "compressed"), [(b"Z", 3), (b"2", 3), (b"1", 3), (b"0", 3), (b"2", 2), (None, 1)]
)
def test_decompress_every_entry_type(kind: bytes | None, compressed: int) -> None:
    raw = b"X\n" + bytes(range(256)) * 40
    assert decompress_entry(entry(raw, kind), compressed) == raw


def test_decompress_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match="unknown compression type"):
        decompress_entry(struct.pack(">I", 3) + b"Q" + b"abc", 3)
    with pytest.raises(ValueError, match="header says 99"):
        decompress_entry(struct.pack(">I", 99) + b"0" + b"abc", 3)


def write_db(folder: Path, objects: dict[str, object], kind: bytes = b"Z") -> Path:
    blobs, variables, offset = [], {}, 0
    for name, obj in objects.items():
        blob = entry(serialize(obj), kind)
        variables[name] = np.array([offset, len(blob)], dtype=np.int32)
        blobs.append(blob)
        offset += len(blob)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Rdata.rdb").write_bytes(b"".join(blobs))
    index = {"variables": variables, "references": {}, "compressed": np.array([3], dtype=np.int32)}
    (folder / "Rdata.rdx").write_bytes(gzip.compress(serialize(index)))
    return folder / "Rdata"


def test_lazy_load_db_round_trip(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "churn": pd.Categorical(["yes", "no", "no"]),
            "charges": [1.5, np.nan, 3.25],
        }
    )
    db = LazyLoadDB(write_db(tmp_path, {"churny": frame, "other": np.arange(3.0)}))
    assert db.names() == ["churny", "other"] and db.compressed == 3
    got = db.read("churny")
    assert list(got.columns) == ["churn", "charges"]
    assert got["churn"].astype(str).tolist() == ["yes", "no", "no"]
    np.testing.assert_array_equal(got["charges"].to_numpy(), [1.5, np.nan, 3.25])
    with pytest.raises(DatasetError, match=r"object 'missing' is not in the R database .*churny"):
        db.read("missing")


def test_corrupt_database(tmp_path: Path) -> None:
    base = write_db(tmp_path, {"x": np.arange(3.0)})
    rdb = base.with_name("Rdata.rdb")
    rdb.write_bytes(rdb.read_bytes()[:8] + b"\x00" * 20)
    with pytest.raises(DatasetError, match=r"cannot decompress 'x'"):
        LazyLoadDB(base).read("x")
    base.with_name("Rdata.rdx").write_bytes(b"not gzip")
    with pytest.raises(DatasetError, match=r"cannot read the R lazy-load index"):
        LazyLoadDB(base)
