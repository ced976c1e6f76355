"""Training-time algorithms, each a small set of hooks for the one trainer (:mod:`mpqat.train`)."""

from mpqat.methods.base import MethodHooks, hooks_for, register_hooks
from mpqat.methods import nmp  # noqa: F401
from mpqat.methods import hawq  # noqa: F401
from mpqat.methods import adq  # noqa: F401
from mpqat.methods import smpq  # noqa: F401

__all__ = ["MethodHooks", "hooks_for", "register_hooks"]
