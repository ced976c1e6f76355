"""The CLI functions: export a finished run, run a graph on a dataset, inspect a file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mpqat.errors import ExportError
from mpqat.export.commands import export_run, inspect_graph, run_graph

runs = pytest.importorskip("mpqat.runs")
pytest.importorskip("mpqat.data")


@pytest.fixture(scope="module")
def npz_dataset(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 9)).astype(np.float32)
    y = ((X[:, 0] + 0.5 * X[:, 1] - X[:, 2] ** 2 / 3) > 0).astype(np.int64)
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    np.savez(path, X=X, y=y)
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, npz_dataset) -> str:
    from mpqat.recipes import Uniform
    from mpqat.train import TrainConfig

    out = tmp_path_factory.mktemp("run") / "uniform"
    runs.train_run(npz_dataset, Uniform(w_bits=4, a_bits=4), out, hidden=[64, 64],
                   config=TrainConfig(epochs=3, progress=False))
    return str(out)


def test_export_run_writes_and_checks_everything(tmp_path, run_dir) -> None:
    info = export_run(run_dir, tmp_path / "m.mpq", onnx_path=tmp_path / "m.onnx", c_dir=tmp_path / "c")
    assert info["bit_identical_rows"] == info["test_rows"] == 80
    assert info["file_bytes"] == (tmp_path / "m.mpq").stat().st_size
    assert info["file_bytes"] <= 1.05 * info["budget_bytes"]
    assert info["fp32_state_dict_bytes"] > 4 * info["file_bytes"]
    assert info.get("onnx_bit_identical_rows", 80) == 80 and info.get("onnx_max_abs_diff", 0.0) == 0.0
    assert sorted(p.rsplit("/", 1)[-1] for p in info["c_files"]) == ["model.c", "model.h"]
    json.dumps(info)  # plain data, printable with --json


def test_run_graph_metrics_match_the_run(tmp_path, run_dir, npz_dataset) -> None:
    export_run(run_dir, tmp_path / "m.mpq")
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    got = run_graph(tmp_path / "m.mpq", npz_dataset, seed=metrics["seed"])
    for key in ("test_accuracy", "test_f1", "test_auc"):
        assert got[key] == pytest.approx(metrics[key], abs=1e-12), key
    assert got["n_test"] == 80


def test_run_graph_refuses_wrong_dataset(tmp_path, run_dir) -> None:
    export_run(run_dir, tmp_path / "m.mpq")
    other = tmp_path / "other.npz"
    np.savez(other, X=np.zeros((50, 4), np.float32), y=np.arange(50) % 2)
    with pytest.raises(ExportError, match="takes 9 features"):
        run_graph(tmp_path / "m.mpq", str(other))


def test_inspect_graph_describes_the_file(tmp_path, run_dir) -> None:
    export_run(run_dir, tmp_path / "m.mpq")
    text = inspect_graph(tmp_path / "m.mpq")
    assert "9 -> 64 -> 64 -> 2" in text
    assert "weights [4b x64]" in text and "4b 100.0%" in text
    assert "bytes: header 24" in text and "x budget" in text


def test_export_run_on_a_missing_dir(tmp_path) -> None:
    from mpqat.errors import MpqatError

    with pytest.raises(MpqatError):
        export_run(tmp_path / "nothing", tmp_path / "m.mpq")
