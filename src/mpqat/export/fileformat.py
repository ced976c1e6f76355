"""The ``.mpq`` file: a versioned header, a JSON manifest, a blob of packed tensors, a SHA-256 checksum.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"\\x89MPQ\\r\\n\\x1a\\n"
    8       2     format version (uint16, currently 1)
    10      2     flags (uint16; bit 0: the manifest is zlib-compressed; bit 1: with the preset
                  dictionary :data:`ZDICT_V1`, which is part of format version 1 and never changes)
    12      4     manifest length M in bytes (uint32)
    16      8     blob length B in bytes (uint64)
    24      M     manifest: UTF-8 JSON (zlib-compressed when flag bit 0 is set)
    24+M    B     blob: the arrays, back to back, in manifest order
    24+M+B  32    SHA-256 of bytes [0, 24+M+B)

The manifest is ``{"format": "mpqat-integer-graph", "input_dim", "output_dim", "meta", "nodes"}``.
Each node is ``{"op": ..., <scalar fields>..., <array fields>...}`` and each array field is one of

* ``{"const": v, "shape": [n]}``: every entry equals ``v`` (per-tensor values cost no blob bytes);
* ``{"dtype": "<i2", "shape": [...], "offset": o, "nbytes": n}``: raw little-endian integers of the
  smallest of int8/uint8/int16/uint16/int32/uint32/int64 that holds them;
* ``{"packed": [[bits, rows], ...], "shape": [out, in], "offset": o, "nbytes": n}``: a weight
  matrix bit-packed by :func:`mpqat.export.pack.pack_rows`, rows grouped by increasing bit-width
  (the row order is the stable sort of the node's ``weight_bits``, which is stored too).

No pickle anywhere. :func:`load_graph` checks the magic, version, lengths (truncation), checksum,
manifest structure, array bounds and sizes, and finally rebuilds the graph, which re-validates
shapes, bit-widths, code ranges and the accumulator bounds.

Example:
    >>> import numpy as np, tempfile, os
    >>> from mpqat.export.ir import IntegerGraph, QuantizeInput, IntegerLinear, DequantizeOutput
    >>> g = IntegerGraph([QuantizeInput(np.array([0]), np.array([4]), signed=True),
    ...                   IntegerLinear(np.array([[2]]), np.array([3]), np.array([1]), np.array([1]),
    ...                                 np.array([0]), acc_exponent=0), DequantizeOutput()])
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny.mpq")
    >>> save_graph(g, path) > 0, load_graph(path).run(np.ones((1, 1), np.float32)).tolist()
    (True, [[3.0]])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mpqat.checkpoint import atomic_write_bytes
from mpqat.errors import ExportError
from mpqat.export import pack
from mpqat.cost import BIAS_BITS, EXPONENT_BITS, SCALE_BITS, WIDTH_CODE_BITS
from mpqat.export.ir import MAX_WEIGHT_BITS, ActivationQuantizer, IntegerGraph, IntegerLinear, Node, node_type

MAGIC = b"\x89MPQ\r\n\x1a\n"
VERSION = 1
FORMAT = "mpqat-integer-graph"
FLAG_ZLIB = 1
FLAG_ZDICT = 2
#: Preset zlib dictionary for manifests (the JSON vocabulary), so that small models keep a small
#: manifest. Part of format version 1: changing it requires a new flag or version.
ZDICT_V1 = (
    b'"<i8","<u4","<i4","<i2","<u2","<u1","<i1",{"op":"dequantize_output"}]}'
    b'"method":"uniform","method":"nmp","method":"adq","method":"smpq",'
    b'{"op":"requantize","signed":false,"relu":true,"exponent":{"dtype":"<i1","shape":[],"offset":,"nbytes":},'
    b'"bits":{"dtype":"<u1","shape":[],"offset":,"nbytes":}},'
    b'{"op":"integer_linear","acc_exponent":-,"name":"","weight_bits":{"dtype":"<u1","shape":[],"offset":,"nbytes":},'
    b'"bias":{"dtype":"<i2","shape":[],"offset":,"nbytes":},"mult":{"dtype":"<u2","shape":[],"offset":,"nbytes":},'
    b'"scale_exp":{"dtype":"<i1","shape":[],"offset":,"nbytes":},"weight":{"packed":[[1,],[2,],[4,],[8,]],"shape":[,],"offset":,"nbytes":}},'
    b'{"format":"mpqat-integer-graph","input_dim":,"output_dim":,"meta":{"dataset":"","method":""},"nodes":['
    b'{"op":"quantize_input","signed":true,"relu":false,"exponent":{"const":-,"shape":[]},"bits":{"const":8,"shape":[]}},'
    b'{"op":"integer_linear","acc_exponent":-,"name":"","weight_bits":{"const":4,"shape":[]},'
    b'"bias":{"dtype":"<i1","shape":[],"offset":,"nbytes":},"mult":{"dtype":"<u2","shape":[],"offset":,"nbytes":},'
    b'"scale_exp":{"dtype":"<i1","shape":[],"offset":,"nbytes":},"weight":{"packed":[[4,]],"shape":[,],"offset":,"nbytes":}},'
    b'{"op":"requantize","signed":false,"relu":true,"exponent":{"const":-,"shape":[]},"bits":{"const":4,"shape":[]}},'
)
HEADER = struct.Struct("<8sHHIQ")
CHECKSUM_BYTES = 32
_DTYPES = ("<i1", "<u1", "<i2", "<u2", "<i4", "<u4", "<i8")
_MAX_ELEMENTS = 2**31


def _smallest_dtype(arr: np.ndarray) -> str:
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    for name in _DTYPES:
        info = np.iinfo(np.dtype(name))
        if info.min <= lo and hi <= info.max:
            return name
    raise ExportError(f"array values {lo}..{hi} do not fit int64")


class _Writer:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.offset = 0
        self.parts: dict[str, int] = {}

    def _add(self, data: bytes, part: str) -> tuple[int, int]:
        start = self.offset
        self.chunks.append(data)
        self.offset += len(data)
        self.parts[part] = self.parts.get(part, 0) + len(data)
        return start, len(data)

    def array(self, arr: np.ndarray, part: str) -> dict[str, Any]:
        arr = np.asarray(arr, dtype=np.int64)
        flat = arr.reshape(-1)
        if arr.ndim == 1 and flat.size > 0 and np.all(flat == flat[0]):
            return {"const": int(flat[0]), "shape": list(arr.shape)}
        dtype = _smallest_dtype(arr)
        offset, nbytes = self._add(arr.astype(dtype).tobytes(), part)
        return {"dtype": dtype, "shape": list(arr.shape), "offset": offset, "nbytes": nbytes}

    def packed(self, codes: np.ndarray, row_bits: np.ndarray, part: str) -> dict[str, Any]:
        offset, nbytes = self._add(pack.pack_rows(codes, row_bits), part)
        groups = [[bits, rows] for bits, rows in pack.row_groups(row_bits)]
        return {"packed": groups, "shape": list(codes.shape), "offset": offset, "nbytes": nbytes}


def _array_fields(node: Node) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(node) if "store" in f.metadata]


def _scalar_fields(node: Node) -> list[dataclasses.Field]:
    # init=False fields are derived when the graph is built (e.g. a codebook layer's expanded weights)
    return [f for f in dataclasses.fields(node) if "store" not in f.metadata and f.init]


def encode_graph(graph: IntegerGraph) -> tuple[bytes, dict[str, int]]:
    """The ``.mpq`` bytes of ``graph`` and the bytes taken by each part (for ``inspect``)."""
    writer = _Writer()
    nodes = []
    for index, node in enumerate(graph.nodes):
        entry: dict[str, Any] = {"op": node.op}
        for f in _scalar_fields(node):
            value = getattr(node, f.name)
            entry[f.name] = value.item() if isinstance(value, np.generic) else value
        # plain arrays first, then packed ones (whose unpacking needs the per-row widths)
        for f in sorted(_array_fields(node), key=lambda f: f.metadata["store"] == "packed"):
            part = f"node{index}.{node.op}.{f.name}"
            if f.metadata["store"] == "packed":
                entry[f.name] = writer.packed(getattr(node, f.name), getattr(node, f.metadata["bits"]), part)
            else:
                entry[f.name] = writer.array(getattr(node, f.name), part)
        nodes.append(entry)
    manifest = {"format": FORMAT, "input_dim": graph.input_dim, "output_dim": graph.output_dim,
                "meta": graph.meta, "nodes": nodes}
    text = json.dumps(manifest, separators=(",", ":"), sort_keys=False).encode("utf-8")
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, ZDICT_V1)
    compressed = packer.compress(text) + packer.flush()
    blob = b"".join(writer.chunks)
    head = HEADER.pack(MAGIC, VERSION, FLAG_ZLIB | FLAG_ZDICT, len(compressed), len(blob))
    body = head + compressed + blob
    data = body + hashlib.sha256(body).digest()
    parts = {"header": HEADER.size, "manifest": len(compressed), "manifest_uncompressed": len(text),
             **writer.parts, "checksum": CHECKSUM_BYTES}
    return data, parts


def save_graph(graph: IntegerGraph, path: str | Path) -> int:
    """Write ``graph`` to ``path`` atomically (temporary file + ``os.replace``); returns the size in bytes."""
    data, _ = encode_graph(graph)
    atomic_write_bytes(Path(path), data)
    return len(data)


def _fail(path: Any, why: str) -> ExportError:
    return ExportError(f"'{path}' is not a valid .mpq file: {why}")


def _check_int(value: Any, what: str, path: Any, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _fail(path, f"{what} must be an integer >= {lo}, got {value!r}")
    return value


class _Reader:
    def __init__(self, blob: bytes, path: Any) -> None:
        self.blob = blob
        self.path = path
        self.end = 0  # arrays must tile the blob in order

    def _shape(self, ref: dict[str, Any], what: str, ndim: int | None = None) -> tuple[int, ...]:
        shape = ref.get("shape")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or (ndim is not None and len(shape) != ndim):
            raise _fail(self.path, f"{what}: bad shape {shape!r}")
        dims = tuple(_check_int(d, f"{what} shape", self.path) for d in shape)
        if int(np.prod(dims)) > _MAX_ELEMENTS:
            raise _fail(self.path, f"{what}: shape {dims} is too large")
        return dims

    def _slice(self, ref: dict[str, Any], what: str, expected: int) -> bytes:
        offset = _check_int(ref.get("offset"), f"{what} offset", self.path)
        nbytes = _check_int(ref.get("nbytes"), f"{what} nbytes", self.path)
        if nbytes != expected:
            raise _fail(self.path, f"{what}: {nbytes} bytes stored, its shape and bit-widths need {expected}")
        if offset != self.end or offset + nbytes > len(self.blob):
            raise _fail(self.path, f"{what}: bytes {offset}..{offset + nbytes} are out of place (blob has {len(self.blob)})")
        self.end = offset + nbytes
        return self.blob[offset : offset + nbytes]

    def array(self, ref: Any, what: str) -> np.ndarray:
        if not isinstance(ref, dict):
            raise _fail(self.path, f"{what}: expected an array reference, got {type(ref).__name__}")
        shape = self._shape(ref, what)
        if "const" in ref:
            value = _check_int(ref["const"], f"{what} value", self.path, lo=-(2**62))
            return np.full(shape, value, dtype=np.int64)
        dtype = ref.get("dtype")
        if dtype not in _DTYPES:
            raise _fail(self.path, f"{what}: unsupported dtype {dtype!r}")
        count = int(np.prod(shape))
        raw = self._slice(ref, what, count * np.dtype(dtype).itemsize)
        return np.frombuffer(raw, dtype=dtype).astype(np.int64).reshape(shape)

    def packed(self, ref: Any, row_bits: np.ndarray, what: str) -> np.ndarray:
        if not isinstance(ref, dict) or not isinstance(ref.get("packed"), list):
            raise _fail(self.path, f"{what}: expected a packed array reference")
        out, n_in = self._shape(ref, what, ndim=2)
        groups = ref["packed"]
        try:
            parsed = [(int(b), int(r)) for b, r in groups]
        except (TypeError, ValueError):
            raise _fail(self.path, f"{what}: malformed bit-width groups {groups!r}") from None
        if row_bits.shape != (out,) or parsed != pack.row_groups(row_bits):
            raise _fail(self.path, f"{what}: bit-width groups {parsed} do not match the per-row widths")
        if any(not 0 <= b <= MAX_WEIGHT_BITS for b, _ in parsed):
            raise _fail(self.path, f"{what}: unsupported weight bit-width in {parsed}")
        raw = self._slice(ref, what, pack.packed_rows_nbytes(row_bits, n_in))
        return pack.unpack_rows(raw, (out, n_in), row_bits)


def _build_node(entry: Any, index: int, reader: _Reader, path: Any) -> Node:
    if not isinstance(entry, dict) or not isinstance(entry.get("op"), str):
        raise _fail(path, f"node {index} is malformed")
    cls = node_type(entry["op"])
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(entry) - set(fields) - {"op"}
    if unknown:
        raise _fail(path, f"node {index} ({entry['op']}) has unknown fields {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    plain = [f for f in fields.values() if f.metadata.get("store") != "packed"]
    packed = [f for f in fields.values() if f.metadata.get("store") == "packed"]
    for f in plain + packed:
        if f.name not in entry:
            if "store" in f.metadata or f.default is dataclasses.MISSING:
                raise _fail(path, f"node {index} ({entry['op']}) lacks '{f.name}'")
            continue
        what = f"node {index} {f.name}"
        if f.metadata.get("store") == "packed":
            kwargs[f.name] = reader.packed(entry[f.name], kwargs[f.metadata["bits"]], what)
        elif "store" in f.metadata:
            kwargs[f.name] = reader.array(entry[f.name], what)
        else:
            value = entry[f.name]
            expected = type(f.default) if f.default is not dataclasses.MISSING else (bool, int, str)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise _fail(path, f"{what}: bad value {value!r}")
            kwargs[f.name] = value
    return cls(**kwargs)


def decode_graph(data: bytes, path: Any = "<bytes>") -> IntegerGraph:
    """Parse and validate ``.mpq`` bytes (see the module docstring for every check)."""
    if len(data) < HEADER.size + CHECKSUM_BYTES:
        raise _fail(path, f"truncated ({len(data)} bytes, the header and checksum alone take {HEADER.size + CHECKSUM_BYTES})")
    magic, version, flags, m_len, b_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _fail(path, "wrong magic bytes (not written by mpqat export)")
    if version != VERSION:
        raise _fail(path, f"format version {version} is not supported (this mpqat reads version {VERSION}); "
                    "re-export the model with this mpqat version")
    if flags & ~(FLAG_ZLIB | FLAG_ZDICT) or (flags & FLAG_ZDICT and not flags & FLAG_ZLIB):
        raise _fail(path, f"unknown flags {flags:#x}")
    total = HEADER.size + m_len + b_len + CHECKSUM_BYTES
    if len(data) < total:
        raise _fail(path, f"truncated: the header announces {total} bytes, the file has {len(data)}")
    if len(data) > total:
        raise _fail(path, f"{len(data) - total} unexpected trailing bytes after the checksum")
    body, digest = data[:-CHECKSUM_BYTES], data[-CHECKSUM_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise _fail(path, "checksum mismatch: the file is corrupt (flipped or altered bytes); export it again")
    raw_manifest = data[HEADER.size : HEADER.size + m_len]
    try:
        if flags & FLAG_ZLIB:
            unpacker = zlib.decompressobj(15, ZDICT_V1) if flags & FLAG_ZDICT else zlib.decompressobj()
            text = unpacker.decompress(raw_manifest) + unpacker.flush()
            if not unpacker.eof:
                raise zlib.error("incomplete compressed stream")
        else:
            text = raw_manifest
        manifest = json.loads(text.decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("nodes"), list):
        raise _fail(path, "the manifest is not an mpqat integer graph")
    reader = _Reader(data[HEADER.size + m_len : HEADER.size + m_len + b_len], path)
    nodes = [_build_node(entry, i, reader, path) for i, entry in enumerate(manifest["nodes"])]
    if reader.end != b_len:
        raise _fail(path, f"the blob has {b_len - reader.end} bytes that no array uses")
    meta = manifest.get("meta") or {}
    if not isinstance(meta, dict):
        raise _fail(path, "manifest 'meta' must be an object")
    try:
        graph = IntegerGraph(nodes, meta=meta)
    except ExportError as exc:
        raise _fail(path, str(exc)) from None
    if (graph.input_dim, graph.output_dim) != (manifest.get("input_dim"), manifest.get("output_dim")):
        raise _fail(path, f"declared shape {manifest.get('input_dim')}->{manifest.get('output_dim')} "
                    f"does not match the graph's {graph.input_dim}->{graph.output_dim}")
    return graph


def load_graph(path: str | Path) -> IntegerGraph:
    """Read an ``.mpq`` file; :class:`ExportError` if it is missing, corrupt, truncated or of another version."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"'{path}' does not exist: export a model first with 'mpqat export RUN_DIR --out {path}'")
    return decode_graph(path.read_bytes(), path)


def size_report(graph: IntegerGraph) -> dict[str, Any]:
    """Bytes per part of the ``.mpq`` file, next to the bit budget of the weights and the declared metadata.

    The declared metadata follows :mod:`mpqat.cost`: per layer a 32-bit scale per row (one when the
    scale is per tensor), a 32-bit bias per row, an 8-bit width code per row when the widths vary,
    an 8-bit exponent per activation step and an 8-bit width code per feature when those vary.
    """
    data, parts = encode_graph(graph)
    weight_bits = graph.weight_bits_total()
    meta_bits = 0
    previous = None
    for node in graph.nodes:
        if isinstance(node, IntegerLinear):
            out = node.out_features
            uniform_scale = np.all(node.mult == node.mult[0]) and np.all(node.scale_exp == node.scale_exp[0])
            meta_bits += (1 if uniform_scale else out) * SCALE_BITS + out * BIAS_BITS
            meta_bits += out * WIDTH_CODE_BITS if len(np.unique(node.weight_bits)) > 1 else 0
            if previous is not None:
                n_in = int(getattr(node, "in_channels", node.in_features))  # a conv: per input channel
                meta_bits += (1 if len(np.unique(previous.exponent)) == 1 else n_in) * EXPONENT_BITS
                meta_bits += n_in * WIDTH_CODE_BITS if len(np.unique(previous.bits)) > 1 else 0
        elif isinstance(node, ActivationQuantizer):
            previous = node
    budget = weight_bits / 8 + meta_bits / 8
    # the packed weight codes: ".weight" of integer layers, ".index" of codebook layers
    weights = sum(v for k, v in parts.items() if k.endswith((".weight", ".index")))
    return {
        "file_bytes": len(data),
        "weight_bits": weight_bits,
        "weight_bytes_ideal": weight_bits / 8,
        "weight_bytes_packed": weights,
        "declared_metadata_bytes": meta_bits / 8,
        "budget_bytes": budget,
        "ratio_to_budget": len(data) / budget if budget else float("inf"),
        "parts": parts,
    }
