"""Where mpqat keeps its data, and how cache files are written safely.

The data directory is ``$MPQAT_DATA`` when that variable is set, otherwise the platform's user
cache directory (``$XDG_CACHE_HOME/mpqat`` or ``~/.cache/mpqat`` on Linux,
``~/Library/Caches/mpqat`` on macOS, ``%LOCALAPPDATA%\\mpqat\\Cache`` on Windows). Every cache
file is written to a temporary file in the same folder first and then moved into place with
:func:`os.replace`, so an interrupted fetch never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

from mpqat.errors import DatasetError

ENV_VAR = "MPQAT_DATA"


def _platform_cache_dir() -> Path:
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "mpqat"
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(base) / "mpqat" / "Cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else home / ".cache") / "mpqat"


def data_dir() -> Path:
    """Return the folder that holds fetched datasets, creating it if needed.

    Example::

        >>> import os
        >>> saved = os.environ.get("MPQAT_DATA")
        >>> os.environ["MPQAT_DATA"] = "/tmp/mpqat-data"
        >>> data_dir()
        PosixPath('/tmp/mpqat-data')
        >>> _ = os.environ.pop("MPQAT_DATA") if saved is None else os.environ.update(MPQAT_DATA=saved)
    """
    env = os.environ.get(ENV_VAR, "").strip()
    path = Path(env).expanduser() if env else _platform_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cannot create the data directory '{path}' ({exc.strerror or exc}): "
            f"set {ENV_VAR} to a writable folder"
        ) from None
    return path


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; move it onto ``final`` only if the block succeeds.

    Example::

        >>> with atomic_path(data_dir() / "x.parquet") as tmp:  # doctest: +SKIP
        ...     frame.to_parquet(tmp)
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 honours the umask (mkstemp would make the file private, 0o600).
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
