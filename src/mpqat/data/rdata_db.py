"""Read objects out of an R lazy-load database (``NAME.rdb`` + ``NAME.rdx``) without R.

R packages keep their data sets in such a database (``data/Rdata.rdb``). The index ``.rdx`` is
a gzip-compressed serialized R list with ``variables`` (name -> (offset, length) into the
``.rdb``), ``references`` and ``compressed`` (1 = zlib, 2 = bzip2, 3 = xz). Each entry of the
``.rdb`` starts with the uncompressed length as a 4-byte big-endian integer; with
``compressed`` 2 or 3 a type byte follows: ``Z`` raw LZMA2 (R's preset 9 | extreme), ``2``
bzip2, ``1`` zlib, ``0`` stored; with ``compressed`` 1 the zlib stream follows directly. The
decompressed bytes are an ordinary R serialization that :mod:`rdata` parses and converts.

Example::

    >>> db = LazyLoadDB("usr/lib/R/site-library/modeldata/data/Rdata")  # doctest: +SKIP
    >>> db.read("wa_churn").shape  # doctest: +SKIP
    (7043, 20)
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import rdata
from rdata.conversion import DEFAULT_CLASS_MAP

from mpqat.errors import DatasetError

# Tibbles are data frames with two extra class names; rdata has no constructor for them.
CLASS_MAP = {**DEFAULT_CLASS_MAP}
CLASS_MAP.setdefault("tbl_df", DEFAULT_CLASS_MAP["data.frame"])
CLASS_MAP.setdefault("tbl", DEFAULT_CLASS_MAP["data.frame"])

_LZMA2_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def decompress_entry(blob: bytes, compressed: int) -> bytes:
    """Decompress one ``.rdb`` entry as R's ``lazyLoadDBfetch`` does."""
    if len(blob) < 5:
        raise ValueError("entry shorter than its 4-byte length header")
    (out_len,) = struct.unpack(">I", blob[:4])
    if compressed == 1:
        out = zlib.decompress(blob[4:])
    else:
        kind, body = blob[4:5], blob[5:]
        if kind == b"Z":
            out = lzma.decompress(body, format=lzma.FORMAT_RAW, filters=_LZMA2_FILTERS)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"1":
            out = zlib.decompress(body)
        elif kind == b"0":
            out = body
        else:
            raise ValueError(f"unknown compression type byte {kind!r}")
    if len(out) != out_len:
        raise ValueError(f"entry decompressed to {len(out)} bytes, header says {out_len}")
    return out


def _convert(raw: bytes) -> Any:
    parsed = rdata.parser.parse_data(raw, extension=".rds")
    return rdata.conversion.convert(parsed, constructor_dict=CLASS_MAP, default_encoding="utf-8")


class LazyLoadDB:
    """An R lazy-load database; ``base`` is the path without the ``.rdb``/``.rdx`` suffix."""

    def __init__(self, base: str | os.PathLike[str]) -> None:
        self.base = Path(base)
        self.rdb = self.base.with_name(self.base.name + ".rdb")
        self.rdx = self.base.with_name(self.base.name + ".rdx")
        try:
            index = _convert(gzip.decompress(self.rdx.read_bytes()))
            self.compressed = int(index["compressed"][0])
            self._index = {
                str(name): (int(pos[0]), int(pos[1])) for name, pos in index["variables"].items()
            }
        except (OSError, KeyError, ValueError, TypeError, EOFError, gzip.BadGzipFile) as exc:
            raise DatasetError(
                f"cannot read the R lazy-load index '{self.rdx}' ({exc}): "
                "delete it and fetch again with --force"
            ) from None

    def names(self) -> list[str]:
        """Names of the objects in the database, sorted."""
        return sorted(self._index)

    def read_raw(self, name: str) -> bytes:
        """The decompressed R serialization of object ``name``."""
        if name not in self._index:
            raise DatasetError(
                f"object '{name}' is not in the R database '{self.rdb}' "
                f"(it has {', '.join(self.names())}): the package version may differ"
            )
        offset, length = self._index[name]
        with open(self.rdb, "rb") as fh:
            fh.seek(offset)
            blob = fh.read(length)
        try:
            return decompress_entry(blob, self.compressed)
        except (ValueError, lzma.LZMAError, OSError, zlib.error) as exc:
            raise DatasetError(
                f"cannot decompress '{name}' from '{self.rdb}' ({exc}): the file may be corrupt; "
                "fetch again with --force"
            ) from None

    def read(self, name: str) -> Any:
        """Object ``name`` converted to Python (a data frame becomes a pandas DataFrame)."""
        return _convert(self.read_raw(name))


def read_rda(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a plain ``.rda``/``.RData`` file into a dict of converted objects."""
    return rdata.read_rda(path, constructor_dict=CLASS_MAP, default_encoding="utf-8")
