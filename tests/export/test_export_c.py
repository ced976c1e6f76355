"""C export: gcc-compiled C99 code reproduces the engine bit for bit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from export_testutils import random_graph, random_graph_inputs, sample_inputs, trained_model

from mpqat.export import IntegerGraph, export

GCC = shutil.which("gcc")
pytestmark = pytest.mark.skipif(GCC is None, reason="gcc is not installed")
FLAGS = ["-std=c99", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-pedantic"]


def _compile(graph: IntegerGraph, out: Path) -> Path:
    graph.to_c(out, harness=True)
    exe = out / "model_main"
    result = subprocess.run([GCC, *FLAGS, "-o", str(exe), str(out / "main.c"), str(out / "model.c")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    return exe


def _run(exe: Path, x: np.ndarray, n_out: int) -> tuple[int, np.ndarray, np.ndarray]:
    d = exe.parent
    np.ascontiguousarray(x, dtype=np.float32).tofile(d / "in.f32")
    rc = subprocess.run([str(exe), str(d / "in.f32"), str(len(x)), str(d / "out.f64"), str(d / "acc.i64")],
                        capture_output=True).returncode
    logits = np.fromfile(d / "out.f64", dtype=np.float64).reshape(-1, n_out)
    acc = np.fromfile(d / "acc.i64", dtype=np.int64).reshape(-1, n_out)
    return rc, logits, acc


@pytest.mark.parametrize("cfg", [dict(w_bits=4, a_bits=4), dict(w_bits=2, a_bits=4, per_neuron_scale=False),
                                 dict(w_bits=4, a_bits=8, mixed=True, per_feature_act=True)])
def test_c_equals_engine_bit_for_bit(tmp_path, cfg) -> None:
    graph = export(trained_model(**cfg), torch.randn(4, 12))
    exe = _compile(graph, tmp_path)
    x = sample_inputs(400, 12)
    rc, logits, acc = _run(exe, x, graph.output_dim)
    assert rc == 0
    expected = graph.run(x)
    assert np.array_equal(logits.view(np.int64), expected.view(np.int64))  # identical bits, signed zeros too


def test_c_integer_variant_gives_the_accumulators(tmp_path) -> None:
    graph = export(trained_model(w_bits=4, a_bits=8, mixed=True, per_feature_act=True), torch.randn(4, 12))
    exe = _compile(graph, tmp_path)
    x = sample_inputs(100, 12)
    _, logits, acc = _run(exe, x, graph.output_dim)
    from mpqat.export.ir import DequantizeOutput

    scales = DequantizeOutput.scales(graph.infos[-2])
    assert np.array_equal(acc.astype(np.float64) * scales, logits)
    assert np.array_equal(acc, graph.run(x, backend="int64") / scales)


def test_c_random_graphs(tmp_path) -> None:
    for seed in range(4):
        graph = random_graph(seed)
        exe = _compile(graph, tmp_path / f"g{seed}")
        x = random_graph_inputs(graph, 200, seed)
        rc, logits, _ = _run(exe, x, graph.output_dim)
        assert rc == 0
        assert np.array_equal(logits, graph.run(x, backend="int64")), seed


def test_c_rejects_nan(tmp_path) -> None:
    graph = export(trained_model(hidden=(8,)), torch.randn(4, 12))
    exe = _compile(graph, tmp_path)
    x = np.zeros((1, 12), np.float32)
    x[0, 5] = np.inf
    assert _run(exe, x, graph.output_dim)[0] == 3


def test_c_source_is_self_contained(tmp_path) -> None:
    graph = export(trained_model(w_bits=4, a_bits=4), torch.randn(4, 12))
    files = graph.to_c(tmp_path)
    text = "".join(p.read_text() for p in files)
    includes = {line.split()[1] for line in text.splitlines() if line.startswith("#include")}
    assert includes == {"<stdint.h>", '"model.h"'}
    assert "float " not in (tmp_path / "model.c").read_text().split("mpqat_quantize_input")[2]  # integer-only layers
    assert "int mpqat_predict(const float *x, double *logits);" in (tmp_path / "model.h").read_text()
