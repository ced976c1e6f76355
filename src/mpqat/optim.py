"""The trainer's optimizer: Adam, AdamW or SGD over a method's parameter groups.

A method may mark a parameter group with ``"small_tensors": True`` (NMP-QAT's steps and clips,
LSQ's steps): groups of many small quantizer tensors, where the optimizer's cost is its
per-tensor Python overhead, not arithmetic. With Adam or AdamW the float32 CPU tensors of all
such groups are updated by one call of mpqat's C++ kernel (:mod:`mpqat.kernels`,
``adam_small_tensors``): a step pre-hook takes their gradients away from ``torch.optim`` and a
post-hook runs the same Adam update on ``torch.optim``'s own state (``exp_avg``, ``exp_avg_sq``,
``step``) and gives the gradients back. Without the extension (no compiler, or
``MPQAT_FUSED_KERNELS=0``), or for other tensors, such a group uses torch's fused kernel
(``fused=True``) where it can, with a post-hook that bumps the version counters that the
learned-bit quantizers' caches (:mod:`mpqat.quant.bits`) are keyed by, and the default update
otherwise. Either way the update is Adam's, equal to the default implementation up to float
rounding, and the optimizer's state dict is the default one's: a checkpoint resumes with or
without the kernels.

Every other group, and the plain weights in particular, is updated exactly as
``torch.optim.Adam(groups)`` would, so an FP32 model and the weights of a quantized one are
trained the same way.

Example:
    >>> import torch
    >>> w, s = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    >>> opt = make_optimizer([{"params": [w]}, {"params": [s], "small_tensors": True}], "adam", lr=0.1)
    >>> (w.sum() + s.sum()).backward(); before = s._version; opt.step()
    >>> s._version > before, [round(v, 3) for v in s.tolist()], s.grad is not None, sorted(opt.state[s])
    (True, [0.9, 0.9], True, ['exp_avg', 'exp_avg_sq', 'step'])
"""

from __future__ import annotations

from typing import Any

import torch

from mpqat import kernels
from mpqat.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SMALL_TENSORS = "small_tensors"
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FUSED_DEVICES = ("cpu", "cuda")


def make_optimizer(groups: list[dict[str, Any]], name: str, lr: float) -> torch.optim.Optimizer:
    """``name`` (adam, adamw or sgd) over the non-empty ``groups``; groups marked ``small_tensors``
    are updated by the small-tensor kernel or torch's fused one (see the module docstring)."""
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{name}': choose {', '.join(OPTIMIZERS)}")
    marked = [g for g in groups if g.get(SMALL_TENSORS)]
    on_cpu = any(p.is_cpu and p.dtype is torch.float32 for g in marked for p in g["params"])
    ext = kernels.extension_if_enabled() if on_cpu else None  # (builds it on first use)
    if ext is None:
        for group in marked:
            if _fusable(group["params"]):
                group["fused"] = True
    optimizer = (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(groups, lr=lr)
    if ext is not None:
        _SmallTensorAdam(ext).attach(optimizer)
    if any(g.get("fused") for g in optimizer.param_groups):
        optimizer.register_step_post_hook(_bump_fused_versions)
    return optimizer


class _SmallTensorAdam:
    """The step hooks that update the marked groups' float32 CPU tensors in one kernel call."""

    def __init__(self, ext: Any) -> None:
        self.ext = ext
        self._taken: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor]] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(self.take_gradients)
        optimizer.register_step_post_hook(self.update)

    def take_gradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Hide the gradients of the tensors this update handles, so that ``torch.optim`` skips them."""
        taken = self._taken = []
        for group in optimizer.param_groups:
            if not group.get(SMALL_TENSORS) or not _plain_adam(group):
                continue
            state = optimizer.state
            for p in group["params"]:
                grad = p.grad
                if grad is None or p.dtype is not torch.float32 or not p.is_cpu or grad.is_sparse \
                        or not p.is_contiguous():
                    continue
                if p in state and state[p] and state[p]["step"].dtype is not torch.float32:
                    continue  # a state the kernel does not keep (e.g. float64 steps): torch.optim's
                taken.append((group, p, grad))
                p.grad = None

    def update(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Adam on ``torch.optim``'s state for the hidden tensors (created as torch creates it), then
        give their gradients back."""
        taken, self._taken = self._taken, []
        if not taken:
            return
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        lrs, beta1s, beta2s, epss, decays, decoupled = [], [], [], [], [], []
        for group, p, grad in taken:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
            beta1, beta2 = group["betas"]
            lrs.append(float(group["lr"]))
            beta1s.append(float(beta1))
            beta2s.append(float(beta2))
            epss.append(float(group["eps"]))
            decays.append(float(group["weight_decay"]))
            decoupled.append(bool(group.get("decoupled_weight_decay", False)))  # AdamW's is True
        self.ext.adam_small_tensors(params, grads, exp_avgs, exp_avg_sqs, steps, lrs, beta1s, beta2s, epss, decays,
                                    decoupled)
        for _, p, grad in taken:
            p.grad = grad


def _plain_adam(group: dict[str, Any]) -> bool:
    """A group whose Adam is the textbook one the kernel implements (no amsgrad, maximize, capturable,
    differentiable or fused variant, float learning rate and betas)."""
    return not (group.get("amsgrad") or group.get("maximize") or group.get("capturable")
                or group.get("differentiable") or group.get("fused")
                or isinstance(group["lr"], torch.Tensor) or any(isinstance(b, torch.Tensor) for b in group["betas"]))


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
