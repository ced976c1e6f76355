"""The trainer's optimizer: Adam, AdamW or SGD over a method's parameter groups.

A method may mark a parameter group with ``"small_tensors": True`` (NMP-QAT's steps and clips,
LSQ's steps): groups of many small quantizer tensors, where the optimizer's cost is its
per-tensor Python overhead, not arithmetic. With Adam or AdamW such a group is updated by torch's
fused kernel (``fused=True``, one C++ call for the whole group; the same update as the default
implementation up to float rounding). Every other group, and the plain weights in particular, is
updated exactly as ``torch.optim.Adam(groups)`` would, so an FP32 model and the weights of a
quantized one are trained the same way.

The fused kernel does not bump the parameters' version counters, which the learned-bit quantizers
(:mod:`mpqat.quant.bits`) use to know when their cached derived tensors are stale; a step post-hook
bumps them after every step. The flag is a group setting and travels with the optimizer's state
dict: a run resumed from a checkpoint written before this existed keeps the update it started with.

Example:
    >>> import torch
    >>> w, s = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    >>> opt = make_optimizer([{"params": [w]}, {"params": [s], "small_tensors": True}], "adam", lr=0.1)
    >>> [bool(g.get("fused")) for g in opt.param_groups]
    [False, True]
    >>> (w.sum() + s.sum()).backward(); before = s._version; opt.step()
    >>> s._version > before, [round(v, 3) for v in s.tolist()]
    (True, [0.9, 0.9])
"""

from __future__ import annotations

from typing import Any

import torch

from mpqat.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SMALL_TENSORS = "small_tensors"
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FUSED_DEVICES = ("cpu", "cuda")


def make_optimizer(groups: list[dict[str, Any]], name: str, lr: float) -> torch.optim.Optimizer:
    """``name`` (adam, adamw or sgd) over the non-empty ``groups``; groups marked ``small_tensors``
    use the fused Adam/AdamW kernel where their tensors allow it (see the module docstring)."""
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{name}': choose {', '.join(OPTIMIZERS)}")
    for group in groups:
        if group.get(SMALL_TENSORS) and _fusable(group["params"]):
            group["fused"] = True
    optimizer = (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(groups, lr=lr)
    if any(g.get("fused") for g in optimizer.param_groups):
        optimizer.register_step_post_hook(_bump_fused_versions)
    return optimizer


def _fusable(params: list[torch.Tensor]) -> bool:
    """One device type and dtype that torch's fused Adam supports, for every tensor of the group."""
    devices = {p.device.type for p in params}
    return (len(devices) == 1 and devices <= set(_FUSED_DEVICES) and len({p.dtype for p in params}) == 1
            and params[0].dtype in _FUSED_DTYPES and not any(p.is_sparse for p in params))


def _bump_fused_versions(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """What an ordinary in-place update does and the fused kernel does not: bump the version counters."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            torch.autograd.graph.increment_version(group["params"])


__all__ = ["OPTIMIZERS", "SMALL_TENSORS", "make_optimizer"]
