"""Fixtures for the TabPFN tests: a tiny randomly initialised TabPFN-shaped model and its checkpoint.

No test here downloads the 100 MB checkpoint; ``test_real_checkpoint.py`` (marked slow) uses it
when it is cached.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpqat.tabpfn.model import TabPFN, TabPFNConfig


@pytest.fixture()
def tiny_config() -> TabPFNConfig:
    return TabPFNConfig.tiny(n_features=8, emsize=32, nlayers=2, nhead=4)


@pytest.fixture()
def tiny_model(tiny_config: TabPFNConfig) -> TabPFN:
    torch.manual_seed(0)
    model = TabPFN(tiny_config)
    with torch.no_grad():  # the original init zeroes out_proj/linear2; give them values to test with
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture()
def toy_data() -> tuple[np.ndarray, np.ndarray]:
    """A small separable 2-class problem with 6 features (one of them constant)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6)).astype(np.float32)
    X[:, 5] = 3.0
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64)
    return X, y
