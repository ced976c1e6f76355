"""``mpqat train --model tabpfn-v1`` and ``mpqat data fetch tabpfn-v1`` with a tiny checkpoint in the cache."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
import torch
from click.testing import CliRunner
from tabpfn_testutils import write_checkpoint

from mpqat.cli import cli
from mpqat.tabpfn import fetch as F
from mpqat.tabpfn.model import TabPFN, TabPFNConfig
from mpqat.tabpfn.pack import load_packed
from mpqat.tabpfn.run import RECIPE_DEFAULTS, tabpfn_recipe_overrides


@pytest.fixture()
def tiny_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MPQAT_DATA", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = TabPFN(TabPFNConfig(n_features=100, emsize=16, nhead=2, nhid=32, nlayers=1, n_out=10))
    F.checkpoint_path().parent.mkdir(parents=True)
    write_checkpoint(model, F.checkpoint_path())
    return tmp_path


def test_fp32_with_zero_epochs_evaluates_the_pretrained_model(tiny_cache):
    out = tiny_cache / "fp32"
    res = CliRunner().invoke(cli, ["train", "--model", "tabpfn-v1", "--dataset", "breast-cancer", "--method", "fp32",
                                   "--epochs", "0", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "tabpfn-v1 fp32 (float): test accuracy" in res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["episodes"] == 0 and m["avg_weight_bits"] == 32.0 and m["n_context"] == 341
    assert not (out / "model.safetensors").exists() and (out / "run.json").exists()


def test_nmp_weights_only_run_writes_a_packed_model(tiny_cache):
    out = tiny_cache / "nmp"
    args = ["train", "--model", "tabpfn-v1", "--dataset", "breast-cancer", "--method", "nmp", "--epochs", "2",
            "--weights-only", "--out", str(out), "--quiet", "--set", "strength_lr_mult=10"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["activations"] == "weights-only" and m["avg_act_bits"] == 32.0
    assert m["recipe"]["w_init_strength"] == RECIPE_DEFAULTS["nmp"]["w_init_strength"]  # TabPFN default
    assert m["recipe"]["strength_lr_mult"] == 10  # the user's value wins
    assert 1.0 <= m["avg_weight_bits"] <= 8.0 and m["packed_file_bytes"] > 0
    assert len(json.loads((out / "history.json").read_text())) >= 2
    assert load_packed(out / "model.safetensors").config.emsize == 16
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "already holds a run" in str(again.exception or again.output)


def test_errors(tiny_cache, monkeypatch):
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--model", "tabpfn-v1", "--dataset", "breast-cancer", "--out",
                              str(tiny_cache / "r"), "--resume"])
    assert res.exit_code != 0
    monkeypatch.setenv("MPQAT_DATA", str(tiny_cache / "empty"))
    res = runner.invoke(cli, ["train", "--model", "tabpfn-v1", "--dataset", "breast-cancer", "--method", "fp32",
                              "--epochs", "0", "--out", str(tiny_cache / "r2")])
    assert res.exit_code != 0 and "mpqat data fetch tabpfn-v1" in str(res.exception)


def test_data_fetch_tabpfn_checks_the_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("MPQAT_DATA", str(tmp_path / "cache"))
    payload = b"x" * 1000  # not the real checkpoint: the pinned sha256 must reject it
    archive = tmp_path / F.ARCHIVE_NAME
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo(f"tabpfn-0.1/{F.MEMBER}")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    res = CliRunner().invoke(cli, ["data", "fetch", "tabpfn-v1", "--archive", str(archive)])
    assert res.exit_code != 0 and hashlib.sha256(payload).hexdigest() in str(res.exception)
    assert not F.checkpoint_path().exists()
    res = CliRunner().invoke(cli, ["data", "fetch", "adult", "--archive", str(archive)])
    assert res.exit_code != 0 and "applies to 'mpqat data fetch tabpfn-v1' only" in str(res.exception)


def test_recipe_overrides_keep_user_values():
    assert tabpfn_recipe_overrides("nmp", {"w_init_strength": 0.1})["w_init_strength"] == 0.1
    assert tabpfn_recipe_overrides("fp32", {}) == {}
