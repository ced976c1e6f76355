"""Every docstring example in the package runs and prints what it shows (``doctest``).

Examples that need a network download, a fetched dataset or a run directory on disk are marked
``# doctest: +SKIP`` where they are written; everything else is executed here.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mpqat

# Modules that import optional extras (peers, Ray) or that only exist for `python -m`.
OPTIONAL = ("mpqat.bench.peers.", "mpqat.__main__")


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(mpqat.__path__, "mpqat.")]
    return sorted(["mpqat", *(n for n in names if not n.startswith(OPTIONAL))])


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed (see above)"
