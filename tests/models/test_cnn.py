"""CNN models: shapes, quantize() swaps every conv/linear, sign metadata, costs, and runs end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mpqat import runs
from mpqat.cost import model_cost
from mpqat.data.splits import TabularSplits
from mpqat.errors import ConfigError, ExportError
from mpqat.export.convert import export
from mpqat.methods.hawq import HessianILP
from mpqat.methods.nmp import NeuronBits
from mpqat.models import CNN1d, LeNet5, ResNet, build_model, model_spec
from mpqat.nn import QuantConv1d, QuantConv2d, QuantLinear
from mpqat.quantize import quantizable_layers, quantize
from mpqat.recipes import FP32, Uniform
from mpqat.train import TrainConfig

torch.set_num_threads(1)

FLOAT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _n_float_layers(model: nn.Module) -> int:
    return sum(isinstance(m, FLOAT_TYPES) for m in model.modules())


@pytest.mark.parametrize("builder,n_in", [
    (lambda: LeNet5(10, (1, 28, 28)), 784),
    (lambda: ResNet(10, (1, 28, 28), depth=8), 784),
    (lambda: ResNet(10, (3, 16, 16), depth=20, width=0.5, shortcut="B"), 768),
    (lambda: CNN1d(8, (2, 64)), 128),
])
@pytest.mark.parametrize("recipe", [Uniform(w_bits=4, a_bits=4), NeuronBits(), HessianILP()])
def test_quantize_swaps_every_conv_and_linear(builder, n_in: int, recipe) -> None:
    torch.manual_seed(0)
    model = builder()
    n_layers = _n_float_layers(model)
    q = quantize(model, recipe)
    assert _n_float_layers(q) == 0
    quant = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == n_layers
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in q.modules())
    x = torch.randn(6, n_in)
    assert q.train()(x).shape == (6, model.n_classes)
    assert torch.isfinite(q.eval()(x)).all()


def test_layer_kinds_and_unsigned_inputs() -> None:
    lenet = quantizable_layers(LeNet5(10))
    assert [(name, type(layer).__name__, after) for name, layer, after in lenet] == [
        ("1", "Conv2d", False), ("4", "Conv2d", True), ("8", "Linear", True), ("10", "Linear", True), ("12", "Linear", True)]
    resnet = quantizable_layers(ResNet(10, (1, 28, 28), depth=8, shortcut="B"))
    assert resnet[0][0] == "conv" and not resnet[0][2]
    assert all(after for _, _, after in resnet[1:]) and resnet[-1][0] == "fc"
    assert [after for _, _, after in quantizable_layers(CNN1d(4, (2, 32)))] == [False, True, True, True, True, True]
    q = quantize(ResNet(10, (1, 28, 28), depth=8), Uniform())
    assert isinstance(q.conv, QuantConv2d) and q.conv.act_quant.signed
    assert not q.layers[0].conv1.act_quant.signed and not q.fc.act_quant.signed
    assert isinstance(quantize(CNN1d(4, (2, 32)), Uniform())[1], QuantConv1d)


def test_resnet_macs_are_hand_counted() -> None:
    net = ResNet(10, (1, 28, 28), depth=8)
    stem = 28 * 28 * 16 * 9
    stage1 = 2 * 28 * 28 * 16 * 16 * 9
    stage2 = 14 * 14 * 32 * 16 * 9 + 14 * 14 * 32 * 32 * 9
    stage3 = 7 * 7 * 64 * 32 * 9 + 7 * 7 * 64 * 64 * 9
    macs = stem + stage1 + stage2 + stage3 + 64 * 10
    assert sum(layer.macs for layer in model_cost(net).layers) == macs
    q = quantize(net, Uniform(w_bits=4, a_bits=4, input_bits=4, last_layer_w_bits=4))
    cost = model_cost(q)
    assert sum(layer.macs for layer in cost.layers) == macs and cost.bitops == macs * 16
    assert cost.avg_weight_bits == 4.0
    assert sum(layer.params for layer in cost.layers) == sum(
        m.weight.numel() for m in q.modules() if isinstance(m, QuantLinear))


def test_model_spec_needs_a_fitting_input_shape() -> None:
    with pytest.raises(ConfigError, match="dataset is tabular"):
        model_spec("resnet8", 30, 2)
    with pytest.raises(ConfigError, match="does not fit"):
        model_spec("lenet5", 784, 10, input_shape=(2, 392))
    with pytest.raises(ConfigError, match="does not fit"):
        model_spec("cnn1d", 784, 10, input_shape=(1, 28, 28))
    spec = model_spec("resnet20", 784, 10, input_shape=(1, 28, 28), width=0.5)
    assert json.loads(json.dumps(spec)) == spec
    net = build_model(spec)
    assert net.depth == 20 and net.fc.in_features == 32
    assert model_spec("mlp", 30, 2) == {"name": "mlp", "in_features": 30, "n_classes": 2, "hidden": [128, 128],
                                        "dropout": 0.0}
    with pytest.raises(ConfigError, match="6n \\+ 2"):
        ResNet(10, (1, 28, 28), depth=10)
    with pytest.raises(ConfigError, match="at least 16x16"):
        LeNet5(10, (1, 8, 8))


def test_export_of_a_resnet_is_a_clear_error_and_lenet_exports() -> None:
    q = quantize(ResNet(10, (1, 16, 16), depth=8, width=0.25), Uniform())
    q.train()(torch.randn(4, 256))
    with pytest.raises(ExportError, match="residual adds"):
        export(q.eval(), torch.randn(2, 256))
    lenet = quantize(LeNet5(10), Uniform())
    lenet.train()(torch.randn(4, 784))
    x = torch.randn(3, 784)
    assert np.array_equal(export(lenet.eval(), x).run(x.numpy()), lenet(x).double().detach().numpy())


# -- end to end: train_run with float pretraining, resume, load_run -----------------------------------


def _synthetic_images(seed: int = 0) -> TabularSplits:
    """Three classes of 12x12 images: a bright bar at the top, middle or bottom, plus noise."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        X = rng.normal(0, 0.5, (n, 1, 12, 12)).astype(np.float32)
        for i, c in enumerate(y):
            X[i, 0, 4 * c: 4 * c + 3, :] += 2.0
        return X.reshape(n, -1), y.astype(np.int64)

    (Xt, yt), (Xv, yv), (Xs, ys) = make(240), make(60), make(60)
    return TabularSplits("synthetic-images", Xt, yt, Xv, yv, Xs, ys, [f"p{i}" for i in range(144)],
                         ["top", "middle", "bottom"], input_shape=(1, 12, 12))


@pytest.fixture()
def images(monkeypatch: pytest.MonkeyPatch) -> TabularSplits:
    splits = _synthetic_images()
    monkeypatch.setattr(runs, "_load_splits", lambda *args, **kwargs: splits)
    return splits


def _train(out: Path, **kwargs) -> dict:
    config = TrainConfig(epochs=2, pretrain_epochs=2, batch_size=32, lr=3e-3, progress=False, patience=5)
    return runs.train_run("synthetic-images", Uniform(w_bits=4, a_bits=4), out, model="resnet8", config=config,
                          force=True, **kwargs)


def test_train_run_with_pretraining_then_load_and_eval(images: TabularSplits, tmp_path: Path) -> None:
    metrics = _train(tmp_path / "run")
    assert metrics["pretrain_epochs"] == 2 and 0 <= metrics["pretrain_valid_accuracy"] <= 1
    assert metrics["epochs"] == 2 and metrics["hidden"] is None
    assert metrics["fp32_bitops"] > metrics["bitops"] > 0
    pre = torch.load(tmp_path / "run" / "pretrain.pt", weights_only=False)
    assert pre["finished"] and any("bn" in k and "running_mean" in k for k in pre["model"])  # float model, BN in
    run = runs.load_run(tmp_path / "run")
    assert isinstance(run.model.conv, QuantConv2d)
    logits = run.model(torch.from_numpy(images.X_test))
    accuracy = float((logits.argmax(1).numpy() == images.y_test).mean())
    assert accuracy == metrics["test_accuracy"]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["model_spec"]["input_shape"] == [1, 12, 12] and info["train"]["pretrain_epochs"] == 2


def test_resume_during_and_after_pretraining_gives_the_same_run(
    images: TabularSplits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _train(tmp_path / "ref")
    ref_state = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)["model"]

    # 1. interrupted after the first pretraining epoch
    real_fit = runs.fit

    class Interrupt(Exception):
        pass

    def crash_after_one_pretrain_epoch(*args, **kwargs):
        if kwargs["checkpoint_path"].name == runs.PRETRAIN_FILE:
            def stop(state):
                raise Interrupt
            kwargs["on_checkpoint"] = stop
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(runs, "fit", crash_after_one_pretrain_epoch)
    with pytest.raises(Interrupt):
        _train(tmp_path / "run")
    state = torch.load(tmp_path / "run" / runs.PRETRAIN_FILE, weights_only=False)
    assert not state["finished"] and state["epoch"] == 1
    monkeypatch.setattr(runs, "fit", real_fit)
    resumed = runs.train_run("synthetic-images", Uniform(w_bits=4, a_bits=4), tmp_path / "run", model="resnet8",
                             config=TrainConfig(epochs=2, pretrain_epochs=2, batch_size=32, lr=3e-3, progress=False,
                                                patience=5), resume=True)
    # 2. after pretraining, before QAT finished: pretraining is not repeated
    calls = []
    monkeypatch.setattr(runs, "fit", lambda *a, **k: calls.append(k["checkpoint_path"].name) or real_fit(*a, **k))
    for name in ("checkpoint.pt", "metrics.json", "history.json"):
        (tmp_path / "ref" / name).unlink()
    again = runs.train_run("synthetic-images", Uniform(w_bits=4, a_bits=4), tmp_path / "ref", model="resnet8",
                           config=TrainConfig(epochs=2, pretrain_epochs=2, batch_size=32, lr=3e-3, progress=False,
                                              patience=5), resume=True)
    assert calls == ["checkpoint.pt"]
    for other in (resumed, again):
        for key in ("test_accuracy", "valid_accuracy", "pretrain_valid_accuracy", "bitops", "best_epoch"):
            assert other[key] == reference[key], key
    for path in (tmp_path / "run", tmp_path / "ref"):
        state = torch.load(path / "checkpoint.pt", weights_only=False)["model"]
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def test_fp32_cnn_run_and_bad_pretrain_setting(images: TabularSplits, tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, batch_size=64, progress=False)
    metrics = runs.train_run("synthetic-images", FP32(), tmp_path / "fp", model="resnet8", config=config,
                             force=True)
    assert math.isclose(metrics["avg_weight_bits"], 32.0)
    assert runs.load_run(tmp_path / "fp").model.bn.running_var.shape == (16,)  # FP32 keeps its BatchNorms
    with pytest.raises(ConfigError, match="pretrain_epochs"):
        TrainConfig(pretrain_epochs=-1)


def test_predict_logits_uses_the_models_eval_batch_size() -> None:
    from mpqat.train import predict_logits

    net = LeNet5(10)
    sizes: list[int] = []
    net.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    logits = predict_logits(net, np.zeros((600, 784), dtype=np.float32))
    assert logits.shape == (600, 10) and sizes == [256, 256, 88]


def test_cnn1d_spec_accepts_one_hidden_width() -> None:
    spec = model_spec("cnn1d", 256, 8, input_shape=(2, 128), hidden=[32])
    assert build_model(spec)[-1].in_features == 32
    with pytest.raises(ConfigError, match="one hidden fc layer"):
        build_model(model_spec("cnn1d", 256, 8, input_shape=(2, 128), hidden=[32, 32]))
