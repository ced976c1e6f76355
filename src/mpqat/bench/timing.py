"""Training step time and peak memory, measured the same way for every method.

* :func:`measure_step_seconds`: the **median** wall time of one training step (forward, loss with
  the method's extra loss, backward, optimizer step, the method's ``after_step``) on a batch of
  ``batch_size`` rows, after ``warmup`` untimed steps, on a copy of the model (the model passed in
  is not changed).
* Peak memory is the process's **peak resident set size** (RSS): on Linux the kernel's
  ``VmHWM`` high-water mark from ``/proc/self/status``, which :func:`reset_peak_rss` resets by
  writing ``5`` to ``/proc/self/clear_refs``, so a pool worker that runs many jobs still gets the
  peak of each run. Where that is not possible the fallback is ``resource.getrusage(RUSAGE_SELF)
  .ru_maxrss`` (the peak over the process's whole life, never reset). ``tracemalloc`` is *not*
  used: it sees only Python's allocator, not the memory of torch tensors.

Example:
    >>> import numpy as np, torch
    >>> X = np.random.default_rng(0).normal(size=(64, 8)).astype("float32"); y = (X[:, 0] > 0).astype("int64")
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> measure_step_seconds(model, X, y, batch_size=32, repeats=5) > 0
    True
"""

from __future__ import annotations

import copy
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mpqat.optim import make_optimizer

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def measure_step_seconds(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    hooks: Any = None,
    batch_size: int = 256,
    repeats: int = 50,
    warmup: int = 5,
    lr: float = 1e-3,
    seed: int = 0,
    threads: int | None = None,
) -> float:
    """Median seconds of one training step of ``model`` (a deep copy) on ``batch_size``-row batches.

    ``hooks`` is the method's :class:`mpqat.methods.MethodHooks` (its parameter groups, extra
    loss and ``after_step`` are part of the step, as in :func:`mpqat.train.fit`); ``None`` gives a
    plain Adam step. Batches are drawn at random (with replacement when ``X`` has fewer rows than
    ``batch_size``), so every timed step sees a full batch. ``threads``: torch intra-op threads
    while timing (restored afterwards); None keeps the process's setting.

    Example:
        >>> import numpy as np, torch
        >>> X = np.zeros((10, 3), dtype="float32"); y = np.zeros(10, dtype="int64")
        >>> measure_step_seconds(torch.nn.Linear(3, 2), X, y, batch_size=4, repeats=3, warmup=1) > 0
        True
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("measure_step_seconds: repeats >= 1, warmup >= 0 and batch_size >= 1 are required")
    if len(X) == 0:
        raise ValueError("measure_step_seconds: X has no rows")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _timed_steps(copy.deepcopy(model), X, y, hooks, batch_size, repeats, warmup, lr, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _timed_steps(model: nn.Module, X: np.ndarray, y: np.ndarray, hooks: Any, batch_size: int, repeats: int,
                 warmup: int, lr: float, seed: int) -> float:
    model.train()
    if hooks is not None:
        groups = [g for g in hooks.param_groups(model, lr, 0.0) if g["params"]]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = make_optimizer(groups, "adam", lr)  # the trainer's Adam (mpqat.train)
    X_t = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    y_t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    generator = torch.Generator().manual_seed(seed)
    n = len(X_t)
    batches = [torch.randint(0, n, (batch_size,), generator=generator) if n < batch_size
               else torch.randperm(n, generator=generator)[:batch_size] for _ in range(min(8, warmup + repeats))]
    if hooks is not None:
        hooks.on_epoch_start(model, 0, 1)
    times: list[float] = []
    for i in range(warmup + repeats):
        idx = batches[i % len(batches)]
        xb, yb = X_t[idx], y_t[idx]
        t0 = time.perf_counter()
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        if hooks is not None:
            extra = hooks.extra_loss(model, 0, i)
            if extra is not None:
                loss = loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hooks is not None:
            hooks.after_step(model)
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    return float(statistics.median(times))


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux); False where it cannot be reset."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def current_rss_bytes() -> int | None:
    """Resident set size of this process now, in bytes (None where unknown)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def peak_rss_bytes() -> tuple[int, str]:
    """``(bytes, source)``: the peak RSS since the last :func:`reset_peak_rss` (``"VmHWM"``) or, as a
    fallback, since the process started (``"ru_maxrss"``)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024, "VmHWM"
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024), "ru_maxrss"


def torch_threads() -> int:
    """Intra-op threads torch uses in this process."""
    return int(torch.get_num_threads())


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
