"""ADQ export: codebook layers and threshold activations reproduce the model bit for bit (engine, .mpq, ONNX, C)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from export_testutils import model_logits, sample_inputs
from torch import nn

from mpqat.errors import ExportError
from mpqat.export import IntegerGraph, export
from mpqat.export.codebook import CodebookLinear
from mpqat.export.ir import DequantizeOutput, IntegerLinear, QuantizeInput
from mpqat.export.threshold import ThresholdRequantize, dyadic_split
from mpqat.methods.adq import ADQ, ADQHooks, codebook_layers
from mpqat.models import MLP
from mpqat.quantize import quantize

CONFIGS = {
    "adq-n2uq": dict(),
    "adq-full-levels": dict(levels="full", w_bits=2),
    "adq-uniform-act": dict(act="uniform", w_bits=4, a_bits=3),
    "adq-pinned-first-last": dict(pin_first_last=True, w_bits=2, a_bits=2),
    "adq-8bit-thresholds": dict(w_bits=3, a_bits=8),
    "adq-channel-scale": dict(channel_scale="absmean", w_bits=2),
    "adq-learned-levels": dict(level_grad=True, ema=False, w_bits=3),
    "adq-learned-levels-full-cs-ema": dict(level_grad=True, levels="full", channel_scale="absmean", w_bits=2),
    "adq-learned-levels-lsq": dict(level_grad=True, level_grad_mode="lsq", ema=False, w_bits=3),
}


def adq_model(steps: int = 8, seed: int = 0, **fields) -> nn.Module:
    """A small ADQ MLP after a few Adam steps with EMA codebook updates (thresholds and codebooks moved)."""
    recipe = ADQ(**{"w_bits": 3, "a_bits": 3, "decay": 0.8, "fp_epochs": 0, **fields})
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = quantize(MLP(12, 3, hidden=(32, 24)), recipe)
    hooks = ADQHooks(recipe)
    opt = torch.optim.Adam(hooks.param_groups(model, 1e-2, 0.0))
    model.train()
    for _ in range(steps):
        x = torch.randn(64, 12, generator=gen) * 2
        y = torch.randint(0, 3, (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hooks.after_step(model)
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_matches_the_adq_model_bit_for_bit(name, tmp_path):
    model = adq_model(**CONFIGS[name])
    assert any(m.weight_quant.drift() > 0 for m in codebook_layers(model).values())
    x = sample_inputs(300, 12, seed=3)
    graph = export(model, torch.from_numpy(x[:32]))
    expected = model_logits(model, x)
    for backend in ("int64", "float", "auto"):
        for rows in (1, 7, 300):
            assert np.array_equal(graph.run(x[:rows], backend=backend), expected[:rows]), (name, backend, rows)
    path = tmp_path / "m.mpq"
    graph.save(path)
    assert np.array_equal(IntegerGraph.load(path).run(x), expected)


def test_learned_levels_export_their_trained_codebook():
    model = adq_model(level_grad=True, ema=False, w_bits=2)
    graph = export(model, torch.randn(4, 12))
    for node, layer in zip(graph.linear_layers(), codebook_layers(model).values(), strict=True):
        q = layer.weight_quant
        assert q.drift() > 0                                   # the loss moved the levels (no EMA here)
        assert np.array_equal(node.codebook, q.codebook_int().numpy())
        assert np.array_equal(node.weight, q.integer_codes(layer.weight.double()).numpy())


def test_nodes_store_indices_and_codebooks_at_the_index_width():
    model = adq_model()
    graph = export(model, torch.randn(4, 12))
    assert [n.op for n in graph.nodes] == ["quantize_input", "codebook_linear", "threshold_requantize",
                                           "codebook_linear", "threshold_requantize", "codebook_linear",
                                           "dequantize_output"]
    for node, layer in zip(graph.linear_layers(), codebook_layers(model).values(), strict=True):
        q = layer.weight_quant
        assert isinstance(node, CodebookLinear)
        assert np.array_equal(node.codebook, q.codebook_int().numpy()) and node.codebook.size == 7
        assert node.index.min() >= -3 and node.index.max() <= 3 and set(node.index_bits.tolist()) == {3}
        assert np.array_equal(node.weight, q.integer_codes(layer.weight.double()).numpy())
    assert graph.weight_bits_total() == 3 * (12 * 32 + 32 * 24 + 24 * 3)  # index bits, not codeword bits
    assert all(layer.weight_bits == {3: layer.out_features} for layer in graph.layers)
    thr = graph.nodes[2]
    assert isinstance(thr, ThresholdRequantize) and thr.thr_mantissa.shape == (1, 7)  # shared by every channel


def test_mpq_file_is_close_to_the_cost_budget(tmp_path):
    from mpqat.cost import model_cost
    from mpqat.export.fileformat import size_report

    model = adq_model()
    graph = export(model, torch.randn(4, 12))
    report = size_report(graph)
    assert report["weight_bits"] == graph.weight_bits_total()
    assert graph.save(tmp_path / "m.mpq") < 1.3 * model_cost(model).size_bytes


def test_onnx_export_is_bit_identical(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = adq_model(levels="full")
    x = sample_inputs(200, 12, seed=5)
    graph = export(model, torch.from_numpy(x[:8]))
    path = graph.to_onnx(tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"x": x})[0], graph.run(x))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_c_export_is_bit_identical(tmp_path):
    model = adq_model()
    x = sample_inputs(150, 12, seed=6)
    graph = export(model, torch.from_numpy(x[:8]))
    graph.to_c(tmp_path, harness=True)
    exe = tmp_path / "model_main"
    result = subprocess.run(["gcc", "-std=c99", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-pedantic", "-o",
                             str(exe), str(tmp_path / "main.c"), str(tmp_path / "model.c")], capture_output=True, text=True)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    x.tofile(tmp_path / "in.f32")
    subprocess.run([str(exe), str(tmp_path / "in.f32"), str(len(x)), str(tmp_path / "out.f64"),
                    str(tmp_path / "acc.i64")], check=True)
    logits = np.fromfile(tmp_path / "out.f64", dtype=np.float64).reshape(-1, 3)
    assert np.array_equal(logits.view(np.int64), graph.run(x).view(np.int64))


def _one_layer(**node_fields):
    fields = dict(index=np.array([[-1, 0, 1]]), index_bits=np.array([2]), codebook=np.array([-7, 0, 5]), offset=1,
                  bias=np.array([0]), mult=np.array([1]), scale_exp=np.array([0]))
    fields.update(node_fields)
    return [QuantizeInput(np.zeros(3, np.int64), np.full(3, 8), signed=True), CodebookLinear(**fields), DequantizeOutput()]


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"index": np.array([[-1, 0, 2]])}, "outside its 2-bit range"),
    ({"offset": 2}, "points outside the codebook"),
    ({"index_bits": np.array([1])}, "index bits"),
    ({"codebook": np.array([-40000, 0, 5])}, "codebook must hold"),
])
def test_malformed_codebook_nodes_are_refused(fields, fragment):
    with pytest.raises(ExportError, match=fragment):
        IntegerGraph(_one_layer(**fields))


def test_threshold_node_counts_exactly_at_the_threshold():
    # acc = x (weight 1, scale 1, K = -2: inputs on a quarter grid); thresholds 0.25, 0.5 and 0.75
    m, e = dyadic_split(np.array([[0.25, 0.5, 0.75]]))
    g = IntegerGraph([
        QuantizeInput(np.array([-2]), np.array([8]), signed=True),
        IntegerLinear(np.array([[1]]), np.array([2]), np.array([0]), np.array([1]), np.array([0]), acc_exponent=-2),
        ThresholdRequantize(exponent=np.array([0]), bits=np.array([2]), thr_mantissa=m, thr_exponent=e),
        IntegerLinear(np.array([[1]]), np.array([2]), np.array([0]), np.array([1]), np.array([0]), acc_exponent=0),
        DequantizeOutput(),
    ])
    assert g.nodes[2].integer_thresholds().tolist() == [[1, 2, 3]]  # ceil(T * 2**(e - K)) on acc * m
    x = np.array([[-1.0], [0.0], [0.24], [0.25], [0.5], [0.74], [0.75], [9.0]], dtype=np.float32)
    expected = [0, 0, 1, 1, 2, 3, 3, 3]  # 0.24 -> code 1 (0.25) -> 1 threshold; 0.74 -> 0.75
    for backend in ("int64", "float"):
        assert g.run(x, backend=backend).ravel().tolist() == expected


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"thr_mantissa": np.array([[3, 1, 2]]), "thr_exponent": np.zeros((1, 3), np.int64)}, "non-decreasing"),
    ({"thr_mantissa": np.array([[1, 2]]), "thr_exponent": np.zeros((1, 2), np.int64)}, "thresholds need shape"),
    ({"signed": True}, "unsigned"),
])
def test_malformed_threshold_nodes_are_refused(fields, fragment):
    node = dict(exponent=np.array([0]), bits=np.array([2]), thr_mantissa=np.array([[1, 2, 3]]),
                thr_exponent=np.zeros((1, 3), np.int64))
    node.update(fields)
    nodes = [QuantizeInput(np.array([0]), np.array([8]), signed=True),
             IntegerLinear(np.array([[1]]), np.array([2]), np.array([0]), np.array([1]), np.array([0])),
             ThresholdRequantize(**node),
             IntegerLinear(np.array([[1]]), np.array([2]), np.array([0]), np.array([1]), np.array([0])),
             DequantizeOutput()]
    with pytest.raises(ExportError, match=fragment):
        IntegerGraph(nodes)
