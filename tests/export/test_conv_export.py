"""Chain CNNs (LeNet-5, the 1-D radio CNN) export bit for bit: engine, .mpq, ONNX, C; refusals are clear."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mpqat import Uniform, quantize
from mpqat.errors import ExportError
from mpqat.export import (
    DequantizeOutput,
    IntegerGraph,
    IntegerLinear,
    QuantizeInput,
    Requantize,
    export,
)
from mpqat.export.conv import (
    CodebookConv,
    Flatten,
    GlobalAvgPool,
    IntegerConv,
    Unflatten,
    window_table,
)
from mpqat.export.fileformat import HEADER, ZDICT_V1, decode_graph, encode_graph
from mpqat.models import CNN1d, LeNet5, ResNet
from mpqat.nn.linear import QuantLinear

GCC = shutil.which("gcc")
LENET_SHAPE = (2, 20, 20)  # two channels (per-channel input steps), a 2x2x16 map before the flatten
CNN1D_SHAPE = (2, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add overhead (a lot of it on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(d: int, n: int, seed: int) -> np.ndarray:
    """Float32 rows: normal values at several scales, channel 0 eight times larger, many rounding ties."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.choice([0.5, 2.0, 20.0], size=(n, 1))
    x[:, : d // 2] *= 8
    ties = rng.integers(-40, 40, size=(n, d)) / 8.0 + 1 / 16.0
    return np.where(rng.random((n, d)) < 0.2, ties, x).astype(np.float32)


def _lenet() -> nn.Module:
    return LeNet5(10, LENET_SHAPE)


def _cnn1d() -> nn.Module:
    return CNN1d(5, CNN1D_SHAPE, channels=(4, 8), hidden=16)


def _geometry2d() -> nn.Module:
    """Stride, padding, dilation, 'same' padding, a padded max pool and a 4x3x3 map before the flatten."""
    return nn.Sequential(nn.Unflatten(1, (2, 13, 13)), nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), nn.ReLU(),
                         nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(3, 4, (3, 1), padding="same"), nn.ReLU(),
                         nn.Flatten(), nn.Linear(36, 5))


def _geometry1d() -> nn.Module:
    """Conv1d with stride/padding/dilation, an overlapping padded pool, a 1x1 conv, ReLU -> global average."""
    return nn.Sequential(nn.Unflatten(1, (3, 18)), nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=3), nn.ReLU(),
                         nn.MaxPool1d(3, stride=1, padding=1), nn.Conv1d(4, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def _train(model: nn.Module, d: int, steps: int = 4, hooks=None) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(hooks.param_groups(model, 1e-2, 0.0) if hooks else model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        loss = model(torch.from_numpy(_data(d, 32, step))).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hooks:
            hooks.after_step(model)
    return model.eval()


def _uniform(net: nn.Module, d: int, **recipe) -> nn.Module:
    torch.manual_seed(0)
    return _train(quantize(net, Uniform(**recipe)), d)


def _nmp(net: nn.Module, d: int, **recipe) -> nn.Module:
    nmp = pytest.importorskip("mpqat.methods.nmp")
    torch.manual_seed(0)
    model = quantize(net, nmp.NeuronBits(**recipe))
    for layer in model.modules():  # random strengths: mixed widths per output channel / input channel
        if isinstance(layer, QuantLinear):
            for q in (layer.weight_quant, layer.act_quant):
                if getattr(q, "strength", None) is not None:
                    with torch.no_grad():
                        q.strength.copy_(torch.rand_like(q.strength))
    return _train(model, d)


def _adq(net: nn.Module, d: int, **fields) -> nn.Module:
    adq = pytest.importorskip("mpqat.methods.adq")
    recipe = adq.ADQ(**{"w_bits": 3, "a_bits": 3, "decay": 0.8, "fp_epochs": 0, **fields})
    torch.manual_seed(0)
    return _train(quantize(net, recipe), d, steps=6, hooks=adq.ADQHooks(recipe))


def _logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).double().numpy()


def _check_engine(model: nn.Module, d: int) -> IntegerGraph:
    x = _data(d, 96, seed=7)
    graph = export(model, torch.from_numpy(x[:16]))
    expected = _logits(model, x)
    assert expected.std(axis=0).min() > 0  # the logits really depend on the input
    for backend in ("int64", "float", "auto"):
        for rows in (1, 5, 96):
            assert np.array_equal(graph.run(x[:rows], backend=backend), expected[:rows]), (backend, rows)
    return graph


LENET_OPS = ["quantize_input", "unflatten", "integer_conv", "max_pool", "requantize", "integer_conv", "max_pool",
             "flatten", "requantize", "integer_linear", "requantize", "integer_linear", "requantize", "integer_linear",
             "dequantize_output"]
CNN1D_OPS = ["quantize_input", "unflatten", "integer_conv", "max_pool", "requantize", "integer_conv", "max_pool",
             "global_avg_pool", "flatten", "requantize", "integer_linear", "requantize", "integer_linear",
             "dequantize_output"]
UNIFORM = {"w4a4": {"w_bits": 4, "a_bits": 4}, "w2a8": {"w_bits": 2, "a_bits": 8, "per_neuron_scale": True},
           # per-channel steps at every input (the first conv's, the convs', and per feature after the flatten)
           "w4a6-per-feature-act": {"w_bits": 4, "a_bits": 6, "per_feature_act": True}}


@pytest.mark.parametrize("recipe", ["w4a4", "w2a8"])
def test_lenet5_uniform_is_bit_exact(recipe) -> None:
    d = int(np.prod(LENET_SHAPE))
    graph = _check_engine(_uniform(_lenet(), d, **UNIFORM[recipe]), d)
    assert [n.op for n in graph.nodes] == LENET_OPS
    assert graph.input_dim == d and graph.output_dim == 10
    assert graph.infos[3].spatial == (16, 16) and graph.infos[7].spatial == (2, 2) and graph.infos[8].size == 64
    assert {layer.accumulator for layer in graph.layers} == {"int32"}


@pytest.mark.parametrize("recipe", list(UNIFORM))
def test_cnn1d_uniform_is_bit_exact(recipe) -> None:
    d = int(np.prod(CNN1D_SHAPE))
    graph = _check_engine(_uniform(_cnn1d(), d, **UNIFORM[recipe]), d)
    assert [n.op for n in graph.nodes] == CNN1D_OPS
    pool = graph.nodes[7]
    assert isinstance(pool, GlobalAvgPool) and pool.relu  # the ReLU goes before the mean
    assert graph.infos[7].spatial == (8,) and graph.infos[8].spatial == (1,)
    assert np.array_equal(graph.infos[8].acc_exp, graph.infos[7].acc_exp - 3)  # the division by 8 is a shift
    if "per_feature_act" in UNIFORM[recipe]:  # per-channel steps on the input and on every conv's input
        assert len(set(graph.nodes[0].exponent.tolist())) == 2 and len(set(graph.nodes[4].exponent.tolist())) > 1


@pytest.mark.parametrize("make", [_geometry2d, _geometry1d])
def test_stride_padding_dilation_and_padded_pools(make) -> None:
    net = make()
    d = int(np.prod(net[0].unflattened_size))
    _check_engine(_uniform(net, d, w_bits=3, a_bits=6, per_feature_act=True), d)


@pytest.mark.parametrize("recipe", [{"per_feature_clip": False}, {"a_candidates": (4, 8), "a_thresholds": (0.5,)}])
@pytest.mark.parametrize("make", [_lenet, _cnn1d])
def test_nmp_learned_bits_are_bit_exact(make, recipe) -> None:
    net = make()
    d = int(np.prod(net.input_shape))
    graph = _check_engine(_nmp(net, d, **recipe), d)
    conv = graph.nodes[2]
    assert isinstance(conv, IntegerConv) and len(np.unique(graph.nodes[5].weight_bits)) >= 2  # per-channel widths
    assert len(set().union(*(layer.weight_bits for layer in graph.layers))) >= 3


@pytest.mark.parametrize("fields", [{}, {"act": "uniform", "w_bits": 2}, {"channel_scale": "absmean"}])
@pytest.mark.parametrize("make", [_lenet, _cnn1d])
def test_adq_codebooks_and_thresholds_are_bit_exact(make, fields) -> None:
    net = make()
    d = int(np.prod(net.input_shape))
    graph = _check_engine(_adq(net, d, **fields), d)
    ops = [n.op for n in graph.nodes]
    assert ops.count("codebook_conv") == 2 and isinstance(graph.nodes[2], CodebookConv)
    assert ("threshold_requantize" in ops) == (fields.get("act", "n2uq") == "n2uq")
    bits = fields.get("w_bits", 3)
    assert graph.weight_bits_total() == bits * sum(int(np.prod(n.index.shape)) for n in graph.linear_layers())


# ------------------------------------------------------------------------------------------ file


def _rewrite_manifest(data: bytes, edit) -> bytes:
    """Decode the manifest, apply ``edit`` to it, and re-encode with a valid checksum (a well-formed lie)."""
    magic, version, flags, m_len, b_len = HEADER.unpack_from(data)
    unpacker = zlib.decompressobj(15, ZDICT_V1)
    manifest = json.loads(unpacker.decompress(data[HEADER.size : HEADER.size + m_len]) + unpacker.flush())
    edit(manifest)
    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, ZDICT_V1)
    text = packer.compress(json.dumps(manifest).encode()) + packer.flush()
    body = HEADER.pack(magic, version, flags, len(text), b_len) + text + data[HEADER.size + m_len : -32]
    return body + hashlib.sha256(body).digest()


@pytest.fixture(scope="module")
def adq_lenet() -> tuple[nn.Module, IntegerGraph]:
    model = _adq(_lenet(), int(np.prod(LENET_SHAPE)))
    return model, export(model, torch.from_numpy(_data(800, 8, 1)))


@pytest.fixture(scope="module")
def uniform_cnn1d() -> tuple[nn.Module, IntegerGraph]:
    model = _uniform(_cnn1d(), 64, w_bits=4, a_bits=4, per_feature_act=True)
    return model, export(model, torch.from_numpy(_data(64, 8, 1)))


@pytest.mark.parametrize("which", ["adq_lenet", "uniform_cnn1d"])
def test_mpq_round_trip(tmp_path, request, which) -> None:
    model, graph = request.getfixturevalue(which)
    path = tmp_path / "m.mpq"
    graph.save(path)
    loaded = IntegerGraph.load(path)
    assert [n.op for n in loaded.nodes] == [n.op for n in graph.nodes]
    for a, b in zip(graph.nodes, loaded.nodes, strict=True):
        for name, arr in a.arrays().items():
            assert np.array_equal(arr, b.arrays()[name]), (a.op, name)
    assert encode_graph(loaded)[0] == path.read_bytes()  # deterministic
    x = _data(graph.input_dim, 50, 3)
    assert np.array_equal(loaded.run(x), _logits(model, x))


def test_corrupt_truncated_and_inconsistent_files_are_refused(adq_lenet) -> None:
    data = encode_graph(adq_lenet[1])[0]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with pytest.raises(ExportError, match="checksum mismatch"):
        decode_graph(bytes(flipped))
    with pytest.raises(ExportError, match="truncated"):
        decode_graph(data[:-100])

    def bad_pool(manifest):  # a pool whose padding exceeds half its kernel
        node = next(n for n in manifest["nodes"] if n["op"] == "max_pool")
        node["padding"] = {"const": 3, "shape": [2]}

    def bad_conv(manifest):  # a kernel that does not match the weight's columns
        node = next(n for n in manifest["nodes"] if n["op"] == "codebook_conv")
        node["kernel"] = {"const": 4, "shape": [2]}

    def bad_unflatten(manifest):  # more channels than the input rows hold
        next(n for n in manifest["nodes"] if n["op"] == "unflatten")["channels"] = 3

    for edit, fragment in [(bad_pool, "at most half the kernel"), (bad_conv, "input channels x 16 kernel taps"),
                           (bad_unflatten, "do not unflatten to 3 x")]:
        with pytest.raises(ExportError, match=f"not a valid .mpq file.*{fragment}"):
            decode_graph(_rewrite_manifest(data, edit))


# ------------------------------------------------------------------------------------------ overflow bound


def _hand_conv_graph(rng: np.random.Generator, nd: int, channels: int, out: int, kernel: int, stride: int,
                     padding: int, dilation: int, size: int) -> IntegerGraph:
    spatial = (size,) * nd
    exponent = rng.integers(0, 4, size=channels)  # per-channel steps; K = 0 below, so shifts 0..3
    bits = rng.choice([2, 4, 8, 16], size=channels)
    w_bits = rng.choice([0, 1, 2, 4, 8], size=out)
    taps = kernel**nd
    weight = np.zeros((out, channels * taps), dtype=np.int64)
    for j, b in enumerate(w_bits):
        if b == 1:
            weight[j] = rng.choice([-1, 1], size=weight.shape[1])
        elif b >= 2:
            q = 2 ** (b - 1) - 1
            weight[j] = rng.integers(-q, q + 1, size=weight.shape[1])
    positions = size**nd
    return IntegerGraph([
        QuantizeInput(exponent=np.repeat(exponent, positions), bits=np.repeat(bits, positions), signed=True),
        Unflatten(shape=np.array(spatial), channels=channels),
        IntegerConv(weight=weight, weight_bits=w_bits, bias=rng.integers(-1000, 1000, size=out),
                    mult=np.ones(out, np.int64), scale_exp=np.zeros(out, np.int64), acc_exponent=0,
                    kernel=np.full(nd, kernel), stride=np.full(nd, stride), padding=np.full(nd, padding),
                    dilation=np.full(nd, dilation)),
        Flatten(),
        DequantizeOutput(),
    ])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), nd=st.sampled_from([1, 2]), channels=st.integers(1, 3), out=st.integers(1, 3),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2))
def test_conv_overflow_bound_is_hard_and_attained(seed, nd, channels, out, kernel, stride, padding, dilation) -> None:
    rng = np.random.default_rng(seed)
    span = dilation * (kernel - 1) + 1
    size = span + stride + 1
    graph = _hand_conv_graph(rng, nd, channels, out, kernel, stride, padding, dilation, size)
    conv, info_in, info_out = graph.nodes[2], graph.infos[2], graph.infos[3]
    bound = info_out.bound
    assert graph.layers[0].acc_bound == bound.max()
    amax = info_in.hi  # signed codes: |lo| == hi
    step = np.ldexp(1.0, info_in.exponent)
    positions = int(np.prod(info_out.spatial))

    def acc(codes_map: np.ndarray) -> np.ndarray:  # codes [n, *spatial, C] -> accumulators [n, P_out, out]
        x = np.moveaxis(codes_map * step, -1, 1).reshape(len(codes_map), -1)
        return graph.run(x.astype(np.float64), backend="int64").reshape(len(codes_map), out, positions)

    random_codes = rng.integers(-amax, amax + 1, size=(20, *info_in.spatial, channels))
    assert np.all(np.abs(acc(random_codes)) <= bound[None, :, None])
    # the worst case at an interior output position: every tap at full scale with the weight's sign
    o = -(-padding // stride)
    start = o * stride - padding
    w = conv.weight.reshape(out, channels, *(kernel,) * nd)
    for j in range(out):
        sign = 1 if conv.bias[j] >= 0 else -1
        codes = np.zeros((1, *info_in.spatial, channels), dtype=np.int64)
        window = tuple(slice(start, start + span, dilation) for _ in range(nd))
        codes[(0, *window)] = np.moveaxis(sign * np.sign(w[j]), 0, -1) * amax
        got = acc(codes)[0, j, np.ravel_multi_index((o,) * nd, info_out.spatial)]
        assert abs(got) == bound[j]


def test_too_wide_conv_is_refused_with_advice() -> None:
    rng = np.random.default_rng(0)
    nodes = _hand_conv_graph(rng, 2, 3, 2, 3, 1, 1, 1, 6).nodes
    conv = nodes[2]
    conv.weight = np.full((2, 27), 2**15 - 1)
    conv.weight_bits = np.full(2, 16)
    conv.mult = np.full(2, 2**16 - 1)
    nodes[0].bits = np.full(nodes[0].bits.shape, 16)
    with pytest.raises(ExportError, match=r"worst-case accumulator.*>= 2\^53"):
        IntegerGraph(nodes)


def test_window_table_matches_the_engine() -> None:
    rng = np.random.default_rng(1)
    graph = _hand_conv_graph(rng, 2, 2, 3, 3, 2, 1, 2, 9)
    conv, inp = graph.nodes[2], graph.infos[2]
    g = conv.geometry()
    n_pos, n_ch = int(np.prod(inp.spatial)), inp.size
    table = window_table(inp.spatial, n_ch, g["kernel"], g["stride"], g["padding"], g["dilation"], n_pos * n_ch)
    codes = rng.integers(-3, 4, size=(4, *inp.spatial, n_ch))
    padded = np.concatenate([codes.reshape(4, -1), np.zeros((4, 1), np.int64)], axis=1)
    w_eff = conv.weight * (np.int64(1) << conv.input_shifts(inp))[None, :]
    want = padded[:, table.reshape(len(table), -1)] @ w_eff.T + conv.bias
    x = np.moveaxis(codes * np.ldexp(1.0, inp.exponent), -1, 1).reshape(4, -1)
    got = graph.run(x, backend="int64").reshape(4, 3, -1).transpose(0, 2, 1)
    assert np.array_equal(got, want)


# ------------------------------------------------------------------------------------------ refusals


def test_resnet_is_refused_with_the_reason() -> None:
    model = _uniform(ResNet(4, (1, 16, 16), depth=8, width=0.25), 256, w_bits=4, a_bits=4)
    with pytest.raises(ExportError, match="residual adds.*not in the IR"):
        export(model, torch.randn(2, 256))


def test_average_pool_over_a_non_power_of_two_is_refused() -> None:
    model = _uniform(CNN1d(3, (2, 24), channels=(4, 8), hidden=8), 48, w_bits=4, a_bits=4)  # 24 -> 12 -> 6
    with pytest.raises(ExportError, match="over 6 positions.*divides exactly only by powers of two"):
        export(model, torch.randn(2, 48))
    maps = [QuantizeInput(np.zeros(6, np.int64), np.full(6, 8)), Unflatten(shape=np.array([6]), channels=1),
            IntegerConv(weight=np.ones((1, 1)), weight_bits=np.array([2]), bias=np.zeros(1), mult=np.ones(1),
                        scale_exp=np.zeros(1), kernel=np.array([1]), stride=np.array([1]), padding=np.array([0]),
                        dilation=np.array([1])),
            GlobalAvgPool(), Flatten(), DequantizeOutput()]
    with pytest.raises(ExportError, match="over 6 positions"):
        IntegerGraph(maps)
    linear = IntegerLinear(weight=np.ones((1, 1)), weight_bits=np.array([2]), bias=np.zeros(1), mult=np.ones(1),
                           scale_exp=np.zeros(1))
    with pytest.raises(ExportError, match="gets a feature map 6x1; flatten it first"):  # a map into a linear layer
        IntegerGraph(maps[:3] + [Requantize(exponent=np.zeros(1), bits=np.full(1, 8)), linear, DequantizeOutput()])


@pytest.mark.parametrize(("net", "d", "fragment"), [
    (nn.Sequential(nn.Unflatten(1, (2, 8, 8)), nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(144, 2)), 128,
     "groups=2"),
    (nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 2, 3), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True), nn.Flatten(),
                   nn.Linear(6, 2)), 8, "ceil_mode"),
    (nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4),
                   nn.Linear(4, 2)), 8, "BatchNorm that was not folded"),
])
def test_unsupported_layers_are_refused(net, d, fragment) -> None:
    model = _uniform(net, d, w_bits=4, a_bits=4)
    with pytest.raises(ExportError, match=fragment):
        export(model, torch.randn(2, d))


def test_conv_without_unflatten_and_float_convs_are_refused() -> None:
    model = _uniform(_cnn1d(), 64, w_bits=4, a_bits=4)
    with pytest.raises(ExportError, match="needs a .2, \\*. feature map but gets flat rows"):
        export(nn.Sequential(*list(model)[1:]), torch.randn(2, 64))
    with pytest.raises(ExportError, match=r"linear layer on a feature map \(8, 8\); put nn.Flatten"):
        export(nn.Sequential(*[m for m in model if not isinstance(m, nn.AdaptiveAvgPool1d | nn.Flatten)]),
               torch.randn(2, 64))
    with pytest.raises(ExportError, match="float nn.Conv1d"):
        export(nn.Sequential(nn.Unflatten(1, (2, 32)), nn.Conv1d(2, 2, 3)), torch.randn(2, 64))


# ------------------------------------------------------------------------------------------ ONNX and C


ONNX_C_CASES = {
    "lenet-w2a8": lambda: _uniform(_lenet(), 800, w_bits=2, a_bits=8),
    "cnn1d-per-feature-act": lambda: _uniform(_cnn1d(), 64, w_bits=4, a_bits=6, per_feature_act=True),
    "geometry2d": lambda: _uniform(_geometry2d(), 338, w_bits=4, a_bits=4, per_feature_act=True),
    "geometry1d": lambda: _uniform(_geometry1d(), 54, w_bits=4, a_bits=8),
    "cnn1d-adq": lambda: _adq(_cnn1d(), 64),
}


@pytest.mark.parametrize("case", list(ONNX_C_CASES))
def test_onnx_is_bit_identical(tmp_path, case) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = ONNX_C_CASES[case]()
    d = int(np.prod(model[0].unflattened_size))
    x = _data(d, 60, 11)
    graph = export(model, torch.from_numpy(x[:8]))
    sess = ort.InferenceSession(str(graph.to_onnx(tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"x": x})[0], _logits(model, x))
    assert np.array_equal(sess.run(None, {"x": x[:1]})[0], graph.run(x[:1]))


@pytest.mark.skipif(GCC is None, reason="gcc is not installed")
@pytest.mark.parametrize("case", list(ONNX_C_CASES))
def test_c_is_bit_identical(tmp_path, case) -> None:
    model = ONNX_C_CASES[case]()
    d = int(np.prod(model[0].unflattened_size))
    x = _data(d, 40, 12)
    graph = export(model, torch.from_numpy(x[:8]))
    graph.to_c(tmp_path, harness=True)
    exe = tmp_path / "model_main"
    result = subprocess.run([GCC, "-std=c99", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-pedantic", "-o", str(exe),
                             str(tmp_path / "main.c"), str(tmp_path / "model.c")], check=False, capture_output=True, text=True)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    x.tofile(tmp_path / "in.f32")
    subprocess.run([str(exe), str(tmp_path / "in.f32"), str(len(x)), str(tmp_path / "out.f64"), str(tmp_path / "acc.i64")],
                   check=True)
    logits = np.fromfile(tmp_path / "out.f64", dtype=np.float64).reshape(len(x), -1)
    assert np.array_equal(logits.view(np.int64), _logits(model, x).view(np.int64))


# ------------------------------------------------------------------------------------------ CLI functions


def test_export_and_run_a_cnn1d_radio_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    radio = pytest.importorskip("mpqat.data.radio")
    from mpqat.export.commands import export_run, inspect_graph, run_graph
    from mpqat.recipes import recipe_from_dict
    from mpqat.runs import train_run
    from mpqat.train import TrainConfig

    monkeypatch.setenv("MPQAT_DATA", str(tmp_path / "cache"))
    tiny = radio.RadioConfig(snr_db=(0.0, 10.0, 10.0), frames_per_snr=(6, 2, 3), frame_length=32)
    monkeypatch.setitem(radio.RADIO_DATASETS, "rf-awgn", tiny)
    radio.fetch_radio("rf-awgn")
    metrics = train_run("rf-awgn", recipe_from_dict({"method": "uniform", "w_bits": 4, "a_bits": 4}), tmp_path / "run",
                        model="cnn1d", config=TrainConfig(epochs=1, progress=False), force=True)
    info = export_run(tmp_path / "run", tmp_path / "m.mpq", onnx_path=tmp_path / "m.onnx")
    assert info["bit_identical_rows"] == info["test_rows"] > 0
    assert info.get("onnx_bit_identical_rows", info["test_rows"]) == info["test_rows"]
    assert info["file_bytes"] <= 1.05 * info["budget_bytes"] and info["fp32_state_dict_bytes"] > 4 * info["file_bytes"]
    got = run_graph(tmp_path / "m.mpq", "rf-awgn", seed=metrics["seed"])
    assert got["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-12)
    text = inspect_graph(tmp_path / "m.mpq")
    assert "integer_conv -> max_pool" in text and "global_avg_pool -> flatten" in text
    assert struct.unpack_from("<H", (tmp_path / "m.mpq").read_bytes(), 8)[0] == 1  # still format version 1


def test_unfused_requantize_float_kernel_equals_int64() -> None:
    """A requantize after a pooling node runs unfused in the float pipeline: same bits, every shift."""
    from mpqat.export import engine
    from mpqat.export.ir import TensorInfo

    rng = np.random.default_rng(5)
    channels = 64
    mult = rng.integers(1, 2**16, size=channels)
    acc_exp = rng.integers(-40, 10, size=channels)
    exponent = acc_exp + rng.integers(-25, 60, size=channels)  # shifts from saturating left shifts to >= 53
    node = Requantize(exponent=exponent, bits=rng.choice([2, 4, 8, 16], size=channels), signed=True, relu=False)
    inp = TensorInfo("acc", channels, mult=mult, acc_exp=acc_exp, bound=np.full(channels, 2.0**51 / mult))
    out = node.propagate(inp, "test")
    shifts = node.shifts(inp)
    assert shifts.min() <= -20 and shifts.max() >= 53
    limit = (2**52 - 1) // mult
    acc = np.concatenate([rng.integers(-limit, limit + 1, size=(200, channels)),
                          rng.integers(-64, 65, size=(200, channels)), -limit[None, :], limit[None, :]])
    acc = acc.reshape(-1, 2, channels)  # a 2-position feature map: the kernels broadcast per channel
    want = engine._KERNELS[Requantize](node, inp, out, "int64")(acc)
    got = engine._KERNELS[Requantize](node, inp, out, "float")(acc.astype(np.float64))
    assert got.dtype == np.float64 and np.array_equal(got, want)


def test_feature_map_graphs_run_in_row_blocks(uniform_cnn1d, monkeypatch) -> None:
    from mpqat.export import engine

    model, graph = uniform_cnn1d
    x = _data(64, 37, 4)
    expected = _logits(model, x)
    monkeypatch.setattr(engine, "MAP_BLOCK_ELEMENTS", 200)  # a few rows per block
    for backend in ("int64", "float"):
        assert np.array_equal(graph.run(x, backend=backend), expected)
