"""Distributed data-parallel training: unit tests of the helpers, and 2-process gloo runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mpqat import distributed
from mpqat.errors import ConfigError

WORKER = Path(__file__).with_name("distributed_worker.py")


def test_single_process_context_is_inactive(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distributed.context()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.active) == (0, 1, True, False)


def test_bad_world_size_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="torchrun"):
        distributed.context()


def test_shards_cover_the_global_batch_once():
    batch = torch.arange(10)
    parts = [distributed.shard_indices(batch, r, 3) for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert parts[1].tolist() == [1, 4, 7]


def test_sync_rules_and_registration():
    assert distributed.rule_for("0.act_quant.initialized") == "max"
    assert distributed.rule_for("features.1.running_var") == "mean"
    assert distributed.rule_for("0.weight_quant.bit_widths") == "broadcast"
    distributed.register_sync_rule("*.test_only_counts", "sum")
    assert distributed.rule_for("layer.test_only_counts") == "sum"
    with pytest.raises(ConfigError, match="reduction rule"):
        distributed.register_sync_rule("*.x", "median")


def test_helpers_are_no_ops_in_one_process():
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_(t, "sum") is t and t.tolist() == [1.0, 2.0]
    assert distributed.check_in_sync(torch.nn.Linear(2, 2)) == 0.0
    with pytest.raises(ConfigError):
        distributed.all_reduce_(t, "median")


def test_strip_option_and_launcher_command():
    argv = ["train", "--nproc", "2", "--dataset", "x", "--nproc=3", "--out", "d"]
    assert distributed.strip_option(argv, "--nproc") == ["train", "--dataset", "x", "--out", "d"]
    seen = []
    assert distributed.launch_local(2, ["train"], runner=lambda cmd: seen.append(cmd) or 0) == 0
    assert seen[0][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert seen[0][-3:] == ["-m", "mpqat", "train"]
    with pytest.raises(ConfigError):
        distributed.launch_local(0, [])


def test_calibration_initialises_quantizers_once():
    from mpqat import quantize
    from mpqat.models import MLP
    from mpqat.recipes import Uniform

    model = quantize(MLP(4, 2, hidden=(8,)), Uniform(w_bits=4, a_bits=4))
    assert distributed.has_uninitialised_quantizers(model)
    assert distributed.calibrate_quantizers(model, torch.randn(32, 4))
    assert not distributed.has_uninitialised_quantizers(model)
    assert not distributed.calibrate_quantizers(model, torch.randn(32, 4))


def _run(out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(WORKER), str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _states(out: Path, nproc: int) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / f"state_rank{r}.pt", weights_only=True) for r in range(nproc)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run, one 2-process run, and a 2-process run killed after epoch 2 then resumed."""
    root = tmp_path_factory.mktemp("ddp")
    single, double, killed = root / "single", root / "double", root / "killed"
    for d in (single, double, killed):
        d.mkdir()
    assert _run(single, 1).returncode == 0
    proc = _run(double, 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dead = _run(killed, 2, "--die-after", "2")
    assert dead.returncode != 0 and (killed / "checkpoint.pt").exists() and not (killed / "result.json").exists()
    resumed = _run(killed, 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return single, double, killed


def test_quantizer_state_is_identical_on_both_ranks(runs):
    _, double, _ = runs
    rank0, rank1 = _states(double, 2)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any("strength" in name for name in rank0)  # the NMP bit strengths are among them
    assert json.loads((double / "result.json").read_text())["rank_divergence"] == 0.0


def test_two_processes_match_one_with_the_same_global_batch(runs):
    single, double, _ = runs
    one = json.loads((single / "result.json").read_text())["history"]
    two = json.loads((double / "result.json").read_text())["history"]
    assert len(one) == len(two)
    for a, b in zip(one, two, strict=True):
        # same updates up to floating-point summation order (stated tolerance: 1e-3 relative)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-3)


def test_killed_distributed_run_resumes_to_the_same_result(runs):
    _, double, killed = runs
    uninterrupted = json.loads((double / "result.json").read_text())
    resumed = json.loads((killed / "result.json").read_text())
    assert [r["valid_loss"] for r in resumed["history"]] == pytest.approx(
        [r["valid_loss"] for r in uninterrupted["history"]], rel=1e-9)
    for a, b in zip(_states(double, 2), _states(killed, 2), strict=True):
        for name in a:
            assert torch.allclose(a[name].double(), b[name].double(), rtol=1e-6, atol=1e-9), name


SHAPLEY_WORKER = Path(__file__).with_name("shapley_worker.py")


def test_shapley_permutations_are_split_over_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    subprocess.run([sys.executable, str(SHAPLEY_WORKER), str(one)], env=env, check=True, timeout=120)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(SHAPLEY_WORKER), str(two)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone = np.load(one / "shapley_rank0.npz")
    for rank in (0, 1):
        split = np.load(two / f"shapley_rank{rank}.npz")
        np.testing.assert_array_equal(split["marginals"], alone["marginals"])  # same estimate, every rank
        np.testing.assert_array_equal(split["counts"], alone["counts"])
        np.testing.assert_array_equal(split["draw"], alone["draw"])  # random streams stayed in step
