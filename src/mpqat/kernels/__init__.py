"""Fused CPU kernels for NMP-QAT's training step, compiled on first use, with the Python path as fallback.

On a small MLP the step time of the reference implementation (:mod:`mpqat.quant.bits`) is set by the
number of tensor operations it launches, not by arithmetic. ``nmp_cpu.cpp`` (a PyTorch C++
extension) does one :class:`~mpqat.nn.QuantLinear` layer with learned bits in one autograd node:
the forward quantizes input, weight and bias and runs the matrix product; the backward runs the
surrogate gradients of both quantizers in single passes. It also does the strength update of
:meth:`~mpqat.quant.bits._LearnedBits.step_strength` of all quantizers in one call, and the
regularizer's expected-bits cost with its gradient for all strengths in one call
(:mod:`mpqat.kernels.nmp_cost`).

* **Same model**: the forward values are the reference's bit for bit; the gradients agree with the
  reference to float rounding (they are summed in another order), which ``tests/kernels`` checks.
* **When it is used**: a ``QuantLinear`` (not a convolution) in training mode whose two quantizers
  are :class:`~mpqat.quant.bits.NeuronBitsWeightQuantizer` and
  :class:`~mpqat.quant.bits.NeuronBitsActQuantizer`, already initialised, on float32 CPU tensors with a
  2-D input, outside ``torch.func`` transforms. Everything else takes the reference path.
* **Build**: with ``torch.utils.cpp_extension`` and the system C++ compiler, once per machine (about
  30 s; cached under ``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``). Without a
  compiler, or if the build fails, a warning says so once and training takes the reference path.
* ``MPQAT_FUSED_KERNELS=0`` turns the kernels off (the reference path, e.g. to reproduce a run made
  before they existed bit for bit).

Example:
    >>> import torch
    >>> from mpqat.kernels import fused_kernels_enabled
    >>> isinstance(fused_kernels_enabled(), bool)
    True
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("nmp_cpu.cpp")
ENV_SWITCH = "MPQAT_FUSED_KERNELS"
# -ffp-contract=off: no fused multiply-add, so every forward value is the reference's float operations
# in the reference's order; -march=native: the AVX2 row kernels where the CPU has them (a scalar
# version of each otherwise).
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off"]

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "module": None}


def fused_kernels_enabled() -> bool:
    """False when ``MPQAT_FUSED_KERNELS`` is set to ``0``/``false``/``no``/``off``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def load_extension() -> ModuleType | None:
    """The compiled extension (built on the first call), or None where it cannot be built.

    A failed build warns once and is not retried in this process.
    """
    if _state["loaded"]:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if _state["loaded"]:
            return _state["module"]  # type: ignore[return-value]
        _state["module"] = _build()
        _state["loaded"] = True
    return _state["module"]  # type: ignore[return-value]


def _cpu_tag() -> str:
    """A short hash of this CPU's instruction-set flags: the build uses -march=native, so a cache
    shared between machines (an NFS home) must not hand one CPU's build to another."""
    flags = platform.machine() + platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _put_ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH; the ``ninja`` wheel (a dependency) puts it
    in the environment's bin folder, which is not on PATH when the venv's python is run directly."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build() -> ModuleType | None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        warnings.warn("mpqat: no C++ compiler found, so NMP-QAT trains on the (slower) Python path; "
                      "install g++ for the fused CPU kernels", RuntimeWarning, stacklevel=3)
        return None
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    name = f"mpqat_nmp_cpu_{_cpu_tag()}"
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not (build_dir / f"{name}.so").exists():  # say why the first NMP-QAT step pauses
            print("mpqat: compiling the fused NMP-QAT CPU kernels (once per machine, about 30 s)...",
                  file=sys.stderr, flush=True)
        return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False)
    except Exception as exc:  # noqa: BLE001  a compiler error, a read-only cache, ...: fall back, say why once
        warnings.warn(f"mpqat: building the fused NMP-QAT CPU kernels failed ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}); training takes the "
                      f"Python path. Set {ENV_SWITCH}=0 to skip the build.", RuntimeWarning, stacklevel=3)
        return None


def extension_if_enabled() -> ModuleType | None:
    """The extension when the kernels are switched on and built, else None (builds it on first use)."""
    return load_extension() if fused_kernels_enabled() else None


def available() -> bool:
    """True when the fused kernels are switched on and built (this builds them if needed)."""
    return fused_kernels_enabled() and load_extension() is not None


__all__ = ["CFLAGS", "ENV_SWITCH", "SOURCE", "available", "extension_if_enabled", "fused_kernels_enabled", "load_extension"]
