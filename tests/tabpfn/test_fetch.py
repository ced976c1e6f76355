"""Fetching the TabPFN v1 checkpoint: sha256 check, atomic cache, clear errors (no network)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from mpqat.errors import CheckpointError
from mpqat.tabpfn import fetch as F

PAYLOAD = b"tiny fake checkpoint bytes" * 100


def _archive(path: Path, payload: bytes = PAYLOAD, member: str = F.MEMBER) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in ((f"tabpfn-0.1/{member}", payload), ("tabpfn-0.1/setup.py", b"print('never run')")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MPQAT_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_extract_from_a_local_archive(cache, tmp_path):
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    archive = _archive(tmp_path / F.ARCHIVE_NAME)
    path = F.fetch_checkpoint(archive=archive, expected_sha256=sha, progress=False)
    assert path == F.checkpoint_path() and path.read_bytes() == PAYLOAD
    assert path.parent == cache / "tabpfn-v1" and F.cached_checkpoint() == path
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    # idempotent: a second call does nothing, even with a bad archive
    assert F.fetch_checkpoint(archive=tmp_path / "nothing.tar.gz", progress=False) == path


def test_sha_mismatch_leaves_nothing(cache, tmp_path):
    archive = _archive(tmp_path / F.ARCHIVE_NAME)
    with pytest.raises(CheckpointError, match="sha256"):
        F.fetch_checkpoint(archive=archive, progress=False)  # the real hash: the fake payload fails it
    assert not F.checkpoint_path().exists()
    assert not list((cache / "tabpfn-v1").glob("*"))
    with pytest.raises(CheckpointError, match="mpqat data fetch tabpfn-v1"):
        F.cached_checkpoint()


def test_bad_archives(cache, tmp_path):
    wrong = _archive(tmp_path / "wrong.tar.gz", member="tabpfn/other.cpkt")
    with pytest.raises(CheckpointError, match="has no"):
        F.fetch_checkpoint(archive=wrong, progress=False)
    truncated = tmp_path / "trunc.tar.gz"
    truncated.write_bytes(_archive(tmp_path / "full.tar.gz").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        F.fetch_checkpoint(archive=truncated, progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        F.fetch_checkpoint(archive=tmp_path / "absent.tar.gz", progress=False)


def test_download_uses_a_throwaway_venv_with_pinned_hatchling(cache, tmp_path):
    calls: list[list[str]] = []
    sha = hashlib.sha256(PAYLOAD).hexdigest()

    def runner(argv):
        calls.append(argv)
        if "download" in argv:
            dest = Path(argv[argv.index("-d") + 1])
            dest.mkdir(parents=True, exist_ok=True)
            _archive(dest / F.ARCHIVE_NAME)
        return 0, ""

    path = F.fetch_checkpoint(runner=runner, expected_sha256=sha, progress=False)
    assert path.read_bytes() == PAYLOAD
    venv_cmd, install, download = calls
    assert venv_cmd[1:3] == ["-m", "venv"]
    venv_python = install[0]
    assert venv_python.startswith(venv_cmd[3]) and download[0] == venv_python
    assert install[-1] == "hatchling==1.18.0"
    assert download[-1] == "tabpfn==0.1"
    for flag in ("--no-deps", "--no-build-isolation", "--no-binary"):
        assert flag in download
    assert not Path(venv_cmd[3]).exists()  # the scratch folder is gone


def test_download_failures_name_the_command(cache, capsys):
    def failing(argv):
        return (1, "ERROR: Could not find a version that satisfies the requirement tabpfn==0.1") if "download" in argv else (0, "")

    with pytest.raises(CheckpointError, match=r"pip download .*tabpfn==0.1.*Could not find"):
        F.fetch_checkpoint(runner=failing)
    assert "failed" in capsys.readouterr().err

    def nothing(argv):
        return 0, ""

    with pytest.raises(CheckpointError, match="instead of tabpfn-0.1.tar.gz"):
        F.fetch_checkpoint(runner=nothing, progress=False)
    assert not F.checkpoint_path().exists()


def test_verify_detects_a_corrupt_cache(cache, tmp_path):
    F.checkpoint_path().parent.mkdir(parents=True, exist_ok=True)
    F.checkpoint_path().write_bytes(b"corrupt")
    assert F.cached_checkpoint() == F.checkpoint_path()
    with pytest.raises(CheckpointError, match="--force"):
        F.cached_checkpoint(verify=True)
