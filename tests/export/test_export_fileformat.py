"""The .mpq file: round trip, size against the bit budget, and refusal of corrupt files."""

from __future__ import annotations

import hashlib
import os
import struct

import numpy as np
import pytest
import torch
from export_testutils import model_logits, random_graph, sample_inputs, trained_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpqat.cost import model_cost
from mpqat.errors import ExportError
from mpqat.export import IntegerGraph, export
from mpqat.export.fileformat import HEADER, MAGIC, ZDICT_V1, decode_graph, encode_graph, size_report


@pytest.fixture(scope="module")
def small_graph() -> IntegerGraph:
    return export(trained_model(hidden=(6,), in_features=5, mixed=True, per_feature_act=True), torch.randn(4, 5))


@pytest.fixture(scope="module")
def small_bytes(small_graph) -> bytes:
    return encode_graph(small_graph)[0]


def _same_graph(a: IntegerGraph, b: IntegerGraph) -> None:
    assert [n.op for n in a.nodes] == [n.op for n in b.nodes]
    for na, nb in zip(a.nodes, b.nodes, strict=True):
        for name, arr in na.arrays().items():
            assert np.array_equal(arr, nb.arrays()[name]), name


@pytest.mark.parametrize("cfg", [dict(w_bits=4, a_bits=4), dict(w_bits=1, a_bits=8, per_neuron_scale=False),
                                 dict(mixed=True, per_feature_act=True, a_bits=8)])
def test_round_trip_is_exact(tmp_path, cfg) -> None:
    model = trained_model(**cfg)
    graph = export(model, torch.randn(4, 12))
    path = tmp_path / "m.mpq"
    size = graph.save(path)
    assert path.stat().st_size == size
    assert path.read_bytes()[:8] == MAGIC
    loaded = IntegerGraph.load(path)
    _same_graph(graph, loaded)
    x = sample_inputs(200, 12)
    assert np.array_equal(loaded.run(x), model_logits(model, x))
    assert [n.name for n in loaded.linear_layers()] == [n.name for n in graph.linear_layers()]


def test_random_graphs_round_trip() -> None:
    for seed in range(10):
        graph = random_graph(seed)
        _same_graph(graph, decode_graph(encode_graph(graph)[0]))


@pytest.mark.parametrize("cfg", [dict(w_bits=4, a_bits=4), dict(w_bits=2, a_bits=4), dict(w_bits=8, a_bits=8),
                                 dict(w_bits=1, a_bits=8, per_feature_act=True),
                                 dict(w_bits=4, a_bits=8, mixed=True, per_feature_act=True)])
def test_file_size_within_bit_budget(tmp_path, cfg) -> None:
    """2-hidden-layer MLP (20 -> 64 -> 64 -> 2): file <= 1.05 x (weight bits / 8 + declared metadata)."""
    model = trained_model(in_features=20, n_classes=2, hidden=(64, 64), **cfg)
    graph = export(model, torch.randn(4, 20))
    size = graph.save(tmp_path / "m.mpq")
    budget = model_cost(model).size_bytes
    report = size_report(graph)
    assert report["file_bytes"] == size
    assert report["weight_bits"] == model_cost(model).avg_weight_bits * (20 * 64 + 64 * 64 + 64 * 2)
    assert report["weight_bytes_packed"] <= report["weight_bytes_ideal"] + 4 * 3  # <= one pad byte per group
    assert size <= 1.05 * budget, (size, budget, report["parts"])


def test_save_is_atomic(tmp_path, small_graph) -> None:
    path = tmp_path / "m.mpq"
    path.write_bytes(b"old")
    small_graph.save(path)
    assert sorted(os.listdir(tmp_path)) == ["m.mpq"]  # no temporary files left behind
    IntegerGraph.load(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_is_refused(small_bytes, data) -> None:
    pos = data.draw(st.integers(0, len(small_bytes) - 1))
    mask = data.draw(st.integers(1, 255))
    corrupt = bytearray(small_bytes)
    corrupt[pos] ^= mask
    with pytest.raises(ExportError, match="not a valid .mpq file"):
        decode_graph(bytes(corrupt))


@pytest.mark.parametrize("region", ["magic", "version", "manifest", "blob", "checksum"])
def test_flipped_byte_messages(small_bytes, region) -> None:
    m_len = struct.unpack_from("<I", small_bytes, 12)[0]
    pos = {"magic": 1, "version": 8, "manifest": HEADER.size + 3, "blob": HEADER.size + m_len + 2,
           "checksum": len(small_bytes) - 1}[region]
    corrupt = bytearray(small_bytes)
    corrupt[pos] ^= 0x10
    expected = {"magic": "magic", "version": "version", "manifest": "checksum", "blob": "checksum",
                "checksum": "checksum"}[region]
    with pytest.raises(ExportError, match=expected):
        decode_graph(bytes(corrupt))


def test_truncation_is_refused(small_bytes) -> None:
    for cut in [0, 5, HEADER.size, HEADER.size + 10, len(small_bytes) // 2, len(small_bytes) - 1]:
        with pytest.raises(ExportError, match="truncated"):
            decode_graph(small_bytes[:cut])
    with pytest.raises(ExportError, match="trailing"):
        decode_graph(small_bytes + b"\x00")


def test_wrong_version_is_refused_even_with_a_valid_checksum(small_bytes) -> None:
    body = bytearray(small_bytes[:-32])
    struct.pack_into("<H", body, 8, 2)
    data = bytes(body) + hashlib.sha256(bytes(body)).digest()
    with pytest.raises(ExportError, match="version 2 is not supported.*reads version 1"):
        decode_graph(data)


def test_tampered_manifest_with_valid_checksum_is_refused(small_graph) -> None:
    import json
    import zlib

    data = encode_graph(small_graph)[0]
    magic, version, flags, m_len, b_len = HEADER.unpack_from(data)
    unpacker = zlib.decompressobj(15, ZDICT_V1)
    manifest = json.loads(unpacker.decompress(data[HEADER.size : HEADER.size + m_len]))
    blob = data[HEADER.size + m_len : -32]

    def rebuild(man: dict) -> bytes:
        packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, ZDICT_V1)
        text = packer.compress(json.dumps(man).encode()) + packer.flush()
        body = HEADER.pack(magic, version, flags, len(text), len(blob)) + text + blob
        return body + hashlib.sha256(body).digest()

    bad_shape = json.loads(json.dumps(manifest))
    bad_shape["nodes"][1]["weight"]["shape"] = [6, 4]
    with pytest.raises(ExportError, match="bytes|shape|groups"):
        decode_graph(rebuild(bad_shape))
    bad_bits = json.loads(json.dumps(manifest))
    bad_bits["nodes"][0]["bits"] = {"const": 40, "shape": [5]}
    with pytest.raises(ExportError, match="activation bits"):
        decode_graph(rebuild(bad_bits))
    bad_op = json.loads(json.dumps(manifest))
    bad_op["nodes"][1]["op"] = "conv_transpose"
    with pytest.raises(ExportError, match="unknown node type"):
        decode_graph(rebuild(bad_op))


def test_missing_file_message(tmp_path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        IntegerGraph.load(tmp_path / "nope.mpq")
