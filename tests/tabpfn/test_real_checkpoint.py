"""The real TabPFN v1 checkpoint (slow; skipped unless 'mpqat data fetch tabpfn-v1' has cached it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpqat.errors import CheckpointError
from mpqat.tabpfn.fetch import SHA256, cached_checkpoint, sha256_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint():
    try:
        return cached_checkpoint()
    except CheckpointError:
        pytest.skip("the TabPFN v1 checkpoint is not cached: run 'mpqat data fetch tabpfn-v1'")


def test_checkpoint_loads_strictly_and_reproduces_breast_cancer(checkpoint, breast_cancer):
    from mpqat.recipes import Uniform
    from mpqat.tabpfn.finetune import FinetuneConfig, finetune
    from mpqat.tabpfn.incontext import InContextClassifier
    from mpqat.tabpfn.model import load_tabpfn, n_parameters, read_checkpoint
    from mpqat.tabpfn.pack import load_packed, save_packed
    from mpqat.tabpfn.quant import quantize_tabpfn

    assert sha256_file(checkpoint) == SHA256
    state, config = read_checkpoint(checkpoint)
    assert len(state) == 153 and config["emsize"] == 512
    net = load_tabpfn(checkpoint)
    assert n_parameters(net) == 25_821_706  # + the 10 loss class weights (a buffer) = 25,821,716 tensors' values
    ds = breast_cancer
    acc = InContextClassifier(net, n_ensemble=4).fit(ds.X_train, ds.y_train).score(ds.X_test, ds.y_test)
    assert acc >= 0.95  # 0.965 on seed 0 (0.970 mean over seeds 0-4)
    # W8A8 post-training quantization (calibration only) keeps it; the packed file reproduces it
    q = quantize_tabpfn(net, Uniform(w_bits=8, a_bits=8, per_feature_act=True))
    finetune(q, Uniform(w_bits=8, a_bits=8), (ds.X_train, ds.y_train), (ds.X_valid, ds.y_valid),
             FinetuneConfig(episodes=0, progress=False))
    clf = InContextClassifier(q, n_ensemble=1).fit(ds.X_train, ds.y_train)
    assert clf.score(ds.X_test, ds.y_test) >= 0.94
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        report = save_packed(q, Path(tmp) / "w8a8.safetensors")
        assert report["file_bytes"] < 0.3 * report["checkpoint_bytes"]
        packed = load_packed(Path(tmp) / "w8a8.safetensors")
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 40, 100)).astype(np.float32))
    y = torch.from_numpy((np.arange(30) % 2).astype(np.float32))[None]
    assert torch.equal(packed(x, y), q(x, y))
