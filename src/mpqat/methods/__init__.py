"""Training-time algorithms, each a small set of hooks for the one trainer (:mod:`mpqat.train`)."""

from mpqat.methods.base import MethodHooks, hooks_for, register_hooks

__all__ = ["MethodHooks", "hooks_for", "register_hooks"]
