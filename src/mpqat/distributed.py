"""Distributed data-parallel training (``torchrun``): process group, data sharding, state sync rules.

``mpqat train`` runs unchanged under ``torchrun --nproc-per-node N -m mpqat train ...`` (or with
``mpqat train --nproc N``, which launches that for you). What changes under N processes:

* **Batches**: ``--batch-size`` is the *global* batch. Every step, all ranks draw the same global
  batch from the same seeded shuffle and rank ``r`` takes rows ``r, r+N, r+2N, ...`` of it. The
  loss of each rank is scaled by ``N * local_rows / global_rows`` so that DDP's gradient average
  equals the gradient of the mean loss over the global batch: N processes compute the same update
  as one process with the same batch size (up to floating-point summation order).
* **Quantizer state that no gradient trains** is kept identical on every rank by declared
  reduction rules (:func:`register_sync_rule`), applied after every optimizer step:

  =========================================  =========  ==========================================
  state                                      rule       why
  =========================================  =========  ==========================================
  ``initialized`` flags                      ``max``    a quantizer is initialised once any rank did
  BN ``running_mean`` / ``running_var``      ``mean``   every rank saw a different shard
  BN ``num_batches_tracked``                 ``max``    the same count on every rank
  batch statistics of user quantizers        ``sum``    summed where computed, :func:`all_reduce_`
  EMA codebook statistics (ADQ)              broadcast  computed from the (identical) weights
  any other buffer                           ``broadcast`` from rank 0 (deterministic copies)
  =========================================  =========  ==========================================

  Data-initialised scales and clips (LSQ steps, activation steps, NMP clips) are initialised by a
  calibration forward on the *global* first batch on every rank before DDP starts
  (:func:`calibrate_quantizers`), exactly the batch a single process initialises them from; after
  that they, like the bit-width strengths, are parameters kept in sync by DDP's gradient average.
* **Seeds**: the model is built from ``--seed`` on every rank (and DDP broadcasts rank 0's
  parameters); the shuffle generator is seeded from ``(seed, epoch)`` as in a single process; the
  global RNG (dropout) of rank ``r`` is seeded with ``seed + 1000 * r``, so dropout masks differ per
  rank as in any data-parallel run.
* **Files and output**: only rank 0 writes checkpoints, metrics and history, and shows progress
  bars; the others wait at a barrier. Resume reads the same checkpoint on every rank.
* **Backends**: ``gloo`` on CPU (default), ``nccl`` when CUDA is available (``MPQAT_DIST_BACKEND``
  overrides).

Example:
    >>> ctx = context()            # not under torchrun: a single process
    >>> ctx.world_size, ctx.is_main
    (1, True)
    >>> shard_indices(list(range(10)), rank=1, world_size=4)
    [1, 5, 9]
"""

from __future__ import annotations

import fnmatch
import inspect
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mpqat.errors import ConfigError

RULES = ("mean", "sum", "max", "min", "broadcast")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of processes and the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and prints progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when training runs on more than one process."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; was this launched by torchrun?") from None


def context() -> DistContext:
    """The current process's :class:`DistContext`; initialises the process group under torchrun.

    Outside torchrun (no ``WORLD_SIZE`` in the environment, or 1) this is a single process and
    nothing is initialised.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; install a build with distributed support")
    if not dist.is_initialized():
        backend = os.environ.get("MPQAT_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ConfigError(f"MPQAT_DIST_BACKEND must be gloo or nccl, got {backend!r}")
        dist.init_process_group(backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=_env_int("LOCAL_RANK", 0), backend=dist.get_backend())


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, or ``(0, 1)`` in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialised process group."""
    return rank_and_world()[0] == 0


def _multi_process() -> bool:
    return rank_and_world()[1] > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _multi_process():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, rule: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over all ranks by ``rule`` (no-op in a single process); returns it.

    Quantizers call this on statistics of their input batch that must describe the global batch
    (counts, sums), before using them.
    """
    if rule not in RULES:
        raise ConfigError(f"unknown reduction rule {rule!r}; choose one of {', '.join(RULES)}")
    if not _multi_process():
        return tensor
    if rule == "broadcast":
        dist.broadcast(tensor, src=0)
        return tensor
    # gloo reduces neither bool nor (for a mean) integer tensors: reduce a float64 copy instead
    work = tensor if tensor.is_floating_point() else tensor.double()
    op = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[rule]
    dist.all_reduce(work, op=op)
    if rule == "mean":
        work = work / dist.get_world_size()
    if work is not tensor:
        tensor.copy_(work.to(tensor.dtype))
    return tensor


# -- declared reduction rules for buffers ------------------------------------------------------------

SyncRule = tuple[str, str]  # (glob on the buffer's qualified name, rule)
_RULES: list[SyncRule] = [
    ("*initialized", "max"),
    ("*.running_mean", "mean"),
    ("*.running_var", "mean"),
    ("*.num_batches_tracked", "max"),
]


def register_sync_rule(pattern: str, rule: str) -> None:
    """Declare how buffers whose qualified name matches the glob ``pattern`` are reduced over ranks.

    Later registrations take precedence. Buffers that match no rule are broadcast from rank 0.

    Example:
        >>> register_sync_rule("*.codebook_count", "sum")
        >>> rule_for("layers.0.weight_quant.codebook_count")
        'sum'
    """
    if rule not in RULES:
        raise ConfigError(f"unknown reduction rule {rule!r}; choose one of {', '.join(RULES)}")
    _RULES.insert(0, (pattern, rule))


def rule_for(name: str) -> str:
    """The reduction rule that applies to the buffer called ``name``."""
    for pattern, rule in _RULES:
        if fnmatch.fnmatchcase(name, pattern):
            return rule
    return "broadcast"


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Apply the declared rule to every buffer of ``model`` (no-op in a single process)."""
    if not _multi_process():
        return
    for name, buf in model.named_buffers():
        rule = rule_for(name)
        if rule == "sum":
            continue  # sums are taken where the statistic is computed (all_reduce_), never re-summed here
        all_reduce_(buf, rule)


@torch.no_grad()
def state_digest(model: nn.Module) -> torch.Tensor:
    """One float64 per parameter/buffer (sum of its entries): cheap fingerprint to compare ranks."""
    values = [t.detach().double().sum() for t in list(model.parameters()) + list(model.buffers())]
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)


def check_in_sync(model: nn.Module, tolerance: float = 0.0) -> float:
    """Largest difference of :func:`state_digest` between this rank and rank 0 (0.0 if identical).

    Raises :class:`ConfigError` when it exceeds ``tolerance``.
    """
    if not _multi_process():
        return 0.0
    local = state_digest(model)
    ref = local.clone()
    dist.broadcast(ref, src=0)
    diff = float((local - ref).abs().max()) if local.numel() else 0.0
    worst = torch.tensor([diff], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if float(worst) > tolerance:
        raise ConfigError(f"model state differs between ranks by {float(worst):.3g} (> {tolerance}); a quantizer "
                          "buffer has no sync rule: declare one with mpqat.distributed.register_sync_rule")
    return float(worst)


# -- data sharding and calibration --------------------------------------------------------------------

def shard_indices(indices: Sequence[int] | torch.Tensor, rank: int, world_size: int) -> Any:
    """Rows ``rank, rank + world_size, ...`` of ``indices`` (the global batch) for this rank."""
    return indices[rank::world_size]


def has_uninitialised_quantizers(model: nn.Module) -> bool:
    """True when some module still has ``initialized == False`` (its scales wait for data)."""
    return any(name.endswith("initialized") and not bool(buf.all()) for name, buf in model.named_buffers())


@torch.no_grad()
def calibrate_quantizers(model: nn.Module, batch: torch.Tensor) -> bool:
    """Initialise data-dependent quantizer scales from ``batch`` (a training-mode forward, no grad).

    Every rank calls this with the same *global* first batch, which is the batch a single process
    initialises its quantizers from; returns whether a forward was needed.
    """
    if not has_uninitialised_quantizers(model):
        return False
    was_training = model.training
    model.train()
    model(batch)
    model.train(was_training)
    return True


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` itself.

    Buffers are not broadcast on every forward (``broadcast_buffers=False``): they follow the
    declared rules of :func:`sync_buffers` instead.
    """
    if not ctx.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.local_rank] if ctx.backend == "nccl" else None
    # no buffer broadcast on every forward (newer PyTorch: forward_sync_buffers; older: broadcast_buffers)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=_has_frozen_parameters(model),
                                   **no_sync)


def _has_frozen_parameters(model: nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


# -- local launcher -----------------------------------------------------------------------------------

def strip_option(argv: Sequence[str], option: str, takes_value: bool = True) -> list[str]:
    """``argv`` without ``option`` (and its value): ``--nproc 2`` and ``--nproc=2`` forms."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = takes_value
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return out


def launch_local(nproc: int, argv: Sequence[str], runner: Callable[..., Any] = subprocess.call) -> int:
    """Run ``python -m mpqat <argv>`` on ``nproc`` local processes through torchrun; returns its exit code."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mpqat", *argv]
    return int(runner(cmd))
