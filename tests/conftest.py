"""Shared fixtures: a small real dataset and a CLI runner."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def breast_cancer():
    """The scikit-learn breast-cancer dataset, split and preprocessed by mpqat.data."""
    from mpqat.data import load_dataset

    return load_dataset("breast-cancer", seed=0)
