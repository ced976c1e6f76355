"""User-facing errors.

Every error that a user can cause (bad input, missing data, corrupt files, impossible budgets)
is raised as a subclass of :class:`MpqatError`. The CLI prints its message on one line and exits
with status 2; the message always says what is wrong and what to do about it.
"""

from __future__ import annotations


class MpqatError(Exception):
    """Base class for errors caused by user input; the CLI shows the message without a traceback."""


class ConfigError(MpqatError):
    """A recipe, option or bit-width that is malformed or out of range."""


class DatasetError(MpqatError):
    """A dataset that is unknown, not fetched yet, malformed or not encodable."""


class CheckpointError(MpqatError):
    """A checkpoint or run directory that is corrupt, truncated or from a different recipe."""


class ExportError(MpqatError):
    """A model that cannot be exported, or an exported file that is corrupt or unsupported."""
