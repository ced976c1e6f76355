"""Peer adapters (Brevitas, HGQ2, torchao): same data and MLP as ours, cost by mpqat's definitions.

Each peer's tests skip, with the install command, when that peer is not importable. The cost
helpers are checked against :func:`mpqat.cost.model_cost` without any peer installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification

from mpqat.bench.peers import PEERS, available_peers, brevitas_onnx_size, run_peer
from mpqat.bench.peers._common import cost_report, linear_layer_cost
from mpqat.cost import model_cost
from mpqat.errors import ConfigError, ExportError
from mpqat.models import MLP
from mpqat.quantize import quantize
from mpqat.recipes import Uniform

pytestmark = [
    pytest.mark.peers,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:keras"),
    pytest.mark.filterwarnings("ignore:fast_hadamard_transform:UserWarning"),
]

HIDDEN = (16, 12)
FAST = {"epochs": 2, "batch_size": 32, "lr": 1e-2, "seed": 0}


def _macs(n_features: int, n_classes: int, hidden=HIDDEN) -> list[int]:
    widths = [n_features, *hidden, n_classes]
    return [a * b for a, b in zip(widths[:-1], widths[1:], strict=True)]


@pytest.fixture(scope="module")
def easy():
    """An easy two-class problem, 400 rows, standardised with training statistics (240/80/80)."""
    X, y = make_classification(n_samples=400, n_features=10, n_informative=5, class_sep=2.0, random_state=0)
    mean, std = X[:240].mean(0), X[:240].std(0)
    X = ((X - mean) / std).astype(np.float32)
    y = y.astype(np.int64)
    return X[:240], y[:240], X[240:320], y[240:320], X[320:], y[320:]


def needs(name: str) -> None:
    reason = available_peers()[name]
    if reason is not None:
        pytest.skip(f"peer '{name}' not available: {reason}")


def _check_common(result, name: str, epochs: int = 2) -> None:
    assert result.peer == name
    assert 1 <= result.epochs <= epochs
    assert 0.0 < result.step_seconds < result.train_seconds
    assert result.test_accuracy > 0.6, "an easy two-class problem should be learned above chance (0.5)"
    assert result.bitops > 0 and result.size_bytes > 0
    payload = result.to_dict()
    json.dumps(payload)  # everything but the model is JSON-serialisable
    assert "model" not in payload["extra"] and "model" in result.extra
    assert result.bitops < payload["extra"]["fp32_bitops"]


# ----------------------------------------------------------------------------- no peer needed
def test_available_peers_names_every_peer_with_an_install_hint():
    status = available_peers()
    assert set(status) == set(PEERS) == {"brevitas", "hgq2", "torchao"}
    for reason in status.values():
        assert reason is None or "pip install" in reason


def test_unknown_peer_is_a_config_error(easy):
    with pytest.raises(ConfigError, match="unknown peer"):
        run_peer("qkeras", *easy, hidden=HIDDEN, epochs=1)


def test_an_unavailable_peer_is_reported_and_refused(easy, monkeypatch):
    monkeypatch.setitem(PEERS, "ghost", ("mpqat.bench.peers.ghost", "pip install ghost"))
    assert "pip install ghost" in available_peers()["ghost"]
    with pytest.raises(ConfigError, match="not available.*pip install ghost"):
        run_peer("ghost", *easy, hidden=HIDDEN, epochs=1)


def test_cost_helpers_reproduce_model_cost():
    """Our formulas applied to per-layer bits give exactly mpqat.cost.model_cost of the same uniform model."""
    model = quantize(MLP(10, 3, hidden=(5, 4)), Uniform(w_bits=4, a_bits=2, input_bits=8))
    ours = model_cost(model)
    layers = [
        linear_layer_cost("0", "x", 10, 5, 4, 8),
        linear_layer_cost("2", "x", 5, 4, 4, 2),
        linear_layer_cost("4", "x", 4, 3, 4, 2),
    ]
    peer = cost_report(layers)
    for key in ("avg_weight_bits", "avg_act_bits", "bitops", "size_bytes", "energy_pj", "fp32_bitops",
                "fp32_size_bytes", "fp32_energy_pj"):
        assert getattr(peer, key) == pytest.approx(getattr(ours, key), rel=1e-12), key


def test_per_weight_cost_by_hand():
    w = np.array([[2.0, 0.0, 4.0], [3.0, 3.0, 0.0]])  # [out=2, in=3], 0 = pruned
    a = np.array([4.0, 0.0, 8.0])  # input feature 1 pruned
    layer = linear_layer_cost("l", "x", 3, 2, w, a, act_exponents=3)
    assert layer.bitops == (2 * 4 + 0 + 4 * 8) + (3 * 4 + 0 + 0)
    assert layer.weight_storage_bits == 12
    assert layer.weight_bits == [2.0, 2.0]  # per-neuron mean width
    # 2 rows x (32 scale + 32 bias) + 2 row width codes (widths vary) + 3 exponents + 3 feature width codes
    assert layer.metadata_bits == 2 * 64 + 2 * 8 + 3 * 8 + 3 * 8
    report = cost_report([layer])
    assert report.avg_weight_bits == 2.0 and report.avg_act_bits == 4.0


# ------------------------------------------------------------------------------------ Brevitas
def test_brevitas_fixed_w4a4_costs_match_our_formulas(easy):
    needs("brevitas")
    result = run_peer("brevitas", *easy, hidden=HIDDEN, w_bits=4, a_bits=4, input_bits=4, **FAST)
    _check_common(result, "brevitas")
    macs = _macs(10, 2)
    assert result.avg_weight_bits == 4.0 and result.avg_act_bits == 4.0
    assert result.bitops == sum(macs) * 16
    rows = [*HIDDEN, 2]
    metadata = sum(r * (32 + 32) for r in rows) + 3 * 8
    assert result.size_bytes == (sum(macs) * 4 + metadata) / 8
    assert [layer["w_bits"] for layer in result.extra["layers"]] == [4.0, 4.0, 4.0]


def test_brevitas_input_bits_default_to_eight(easy):
    needs("brevitas")
    result = run_peer("brevitas", *easy, hidden=HIDDEN, w_bits=4, a_bits=4, **FAST)
    macs = _macs(10, 2)
    assert result.bitops == macs[0] * 4 * 8 + sum(macs[1:]) * 4 * 4


def test_brevitas_learned_bits_fall_under_a_penalty_and_respect_the_floor(easy):
    needs("brevitas")
    result = run_peer("brevitas", *easy, hidden=HIDDEN, w_bits=8, a_bits=8, input_bits=8, learned_bits=True,
                      bit_penalty=1.0, bit_lr=0.5, **FAST)
    bits = [(layer["w_bits"], layer["a_bits"]) for layer in result.extra["layers"]]
    assert all(2 <= b <= 8 and b == int(b) for pair in bits for b in pair)
    assert result.avg_weight_bits < 8, "a strong penalty should lower the learned weight bit-widths"
    assert all("bits" in row for row in result.extra["history"])
    expected = sum(m * w * a for m, (w, a) in zip(_macs(10, 2), bits, strict=True))
    assert result.bitops == expected


def test_brevitas_rejects_bad_options(easy):
    needs("brevitas")
    with pytest.raises(ConfigError, match="unknown option"):
        run_peer("brevitas", *easy, hidden=HIDDEN, epochs=1, wbits=4)
    with pytest.raises(ConfigError, match="bit_penalty needs learned_bits"):
        run_peer("brevitas", *easy, hidden=HIDDEN, epochs=1, bit_penalty=0.1)
    with pytest.raises(ConfigError, match="2 to 16 bits"):
        run_peer("brevitas", *easy, hidden=HIDDEN, epochs=1, w_bits=1)


def test_brevitas_qcdq_onnx_export_matches_the_trained_model(easy, tmp_path):
    needs("brevitas")
    pytest.importorskip("onnxoptimizer", reason="the QCDQ export needs onnxoptimizer: pip install onnxoptimizer")
    result = run_peer("brevitas", *easy, hidden=HIDDEN, w_bits=4, a_bits=4, **FAST)
    path = tmp_path / "brevitas.onnx"
    size = brevitas_onnx_size(result, path)
    assert size == path.stat().st_size > 0
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    ort = pytest.importorskip("onnxruntime")
    X_test = easy[4]
    # ORT's default graph optimizations fuse Q/DQ + Gemm into integer kernels that requantize the float
    # bias, which moves some activations by one step; without them the graph computes what Brevitas does
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": X_test})[0]
    with torch.no_grad():
        want = result.extra["model"].eval()(torch.from_numpy(X_test)).numpy()
    assert np.allclose(got, want, atol=1e-5)
    with pytest.raises(ExportError):
        brevitas_onnx_size(torch.nn.Linear(2, 2), tmp_path / "x.onnx")


# ---------------------------------------------------------------------------------------- HGQ2
def test_hgq2_per_weight_bits_and_ebops(easy):
    needs("hgq2")
    from mpqat.bench.peers.hgq2 import read_bits

    result = run_peer("hgq2", *easy, hidden=HIDDEN, beta=1e-6, **FAST)
    _check_common(result, "hgq2")
    assert 0 <= result.avg_weight_bits <= 24 and 0 <= result.avg_act_bits <= 25
    extra = result.extra
    # our read-out reproduces HGQ2's own EBOPs number (its formula: sign-less bits, plus a bias term)
    assert extra["hgq_ebops_recomputed"] == pytest.approx(extra["hgq_ebops"], abs=len(HIDDEN) + 1)
    # our BitOps: sum over multiplications of stored widths (sign included), per weight
    layers = read_bits(extra["model"])
    assert [layer["w_width"].shape for layer in layers] == [(16, 10), (12, 16), (2, 12)]
    assert result.bitops == pytest.approx(sum(float((l["w_width"] @ l["a_width"]).sum()) for l in layers))
    assert result.bitops >= extra["bitops_without_sign_bits"]
    n_weights = sum(_macs(10, 2))
    assert result.avg_weight_bits == pytest.approx(sum(l["w_width"].sum() for l in layers) / n_weights)
    assert 0.0 <= extra["pruned_weight_fraction"] <= 1.0


def test_hgq2_starts_from_the_requested_fractional_bits(easy):
    needs("hgq2")
    result = run_peer("hgq2", *easy, hidden=HIDDEN, beta=0.0, init_weight_frac_bits=3, init_act_frac_bits=2, **FAST)
    # weights: sign + 2 integer + 3 fractional bits at the start; a few steps move them by well under a bit
    assert 5.5 <= result.avg_weight_bits <= 6.5
    assert result.avg_act_bits < 8


def test_hgq2_rejects_bad_options(easy):
    needs("hgq2")
    with pytest.raises(ConfigError, match="beta_schedule"):
        run_peer("hgq2", *easy, hidden=HIDDEN, epochs=1, beta_schedule="cosine")
    with pytest.raises(ConfigError, match="init_act_frac_bits"):
        run_peer("hgq2", *easy, hidden=HIDDEN, epochs=1, init_act_frac_bits="six")


# ------------------------------------------------------------------------------------- torchao
def test_torchao_w4a8_costs_match_our_formulas(easy):
    needs("torchao")
    result = run_peer("torchao", *easy, hidden=HIDDEN, w_bits=4, a_bits=8, input_bits=8, **FAST)
    _check_common(result, "torchao")
    assert result.avg_weight_bits == 4.0 and result.avg_act_bits == 8.0
    assert result.bitops == sum(_macs(10, 2)) * 4 * 8


def test_torchao_group_scales_are_charged_per_group(easy):
    needs("torchao")
    per_channel = run_peer("torchao", *easy, hidden=(16,), w_bits=4, **FAST)
    grouped = run_peer("torchao", *easy, hidden=(16,), w_bits=4, group_size=2, **FAST)
    # layer 1: 10 inputs -> 5 groups per row (16 rows), layer 2: 16 inputs -> 8 groups per row (2 rows)
    assert (grouped.size_bytes - per_channel.size_bytes) * 8 == (16 * 5 - 16 + 2 * 8 - 2) * 32
    assert grouped.bitops == per_channel.bitops
    with pytest.raises(ConfigError, match="group_size"):
        run_peer("torchao", *easy, hidden=(16,), group_size=8, **FAST)
