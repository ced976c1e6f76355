"""Per-layer sensitivity to weight quantization (HAWQ-V2 style), shared by HAWQ and ADQ.

Two measures, both per layer ``l`` and candidate bit-width ``b`` (METHODS.md §2.2(3), §5.6):

* **Hessian**: ``Omega_l(b) = Tr(H_l)/n_l * ||Q_b(W_l) - W_l||^2``, where ``H_l`` is the block of
  the Hessian of the mean loss (over a calibration set) w.r.t. layer ``l``'s weight and ``n_l`` its
  number of weights. ``Tr(H_l)`` is estimated with Hutchinson's estimator ``E[v^T H_l v]`` over
  Rademacher vectors ``v``; ``H_l v`` comes from double backprop. Samples are drawn in blocks until
  every layer's standard error is below ``tol`` times its estimate (or ``max_samples`` is reached).
* **Loss**: ``Omega_l(b) = L(W with only W_l replaced by Q_b(W_l)) - L(W)`` on held-out data,
  cheaper and label-noise free, but blind to interactions between layers.

The quantizer ``Q_b`` is pluggable: any ``quantize(weight, bits) -> fake-quantized weight``
(:data:`QuantizeFn`) or ``quant_error(weight, bits) -> float`` (:data:`QuantErrorFn`). The default
is :func:`uniform_fake_quant`, the symmetric per-neuron uniform quantizer at LSQ's initial step,
i.e. what :class:`~mpqat.quant.LSQWeightQuantizer` starts fine-tuning from. ADQ passes its codebook
quantizer instead.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> X, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    >>> params = {"0": model[0].weight, "2": model[2].weight}
    >>> est = hutchinson_traces(model, params, X, y, max_samples=64, generator=torch.Generator().manual_seed(0))
    >>> sorted(est), est["2"].samples <= 64
    (['0', '2'], True)
    >>> hessian_omega(est, params, candidates=(2, 4)).shape
    (2, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mpqat.quant.functional import round_half_up, weight_int_range

#: ``quantize(weight, bits) -> fake-quantized weight`` (same shape, float).
QuantizeFn = Callable[[torch.Tensor, int], torch.Tensor]
#: ``quant_error(weight, bits) -> ||Q_b(W) - W||^2``.
QuantErrorFn = Callable[[torch.Tensor, int], float]
#: ``loss_fn(logits, targets) -> mean loss`` (a scalar tensor).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Quantization error (the pluggable part)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def uniform_fake_quant(weight: torch.Tensor, bits: int, per_neuron: bool = True) -> torch.Tensor:
    """Symmetric uniform quantization at LSQ's initial step ``2*mean|w|/sqrt(Q_P)`` (per output row).

    Uses the project's restricted range ``[-Q_P, Q_P]``, ``Q_P = 2**(b-1) - 1``, round half up, and
    at 1 bit ``mean|w| * sign(w)``, exactly as :class:`~mpqat.quant.LSQWeightQuantizer` initialises.

    Example:
        >>> w = torch.tensor([[0.1, -0.4, 0.25, 0.0]])
        >>> uniform_fake_quant(w, 2)   # ternary, step 2*mean|w| = 0.375
        tensor([[ 0.0000, -0.3750,  0.3750,  0.0000]])
    """
    w = weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.detach().reshape(1, -1)
    mean_abs = w.abs().mean(dim=1 if per_neuron else (0, 1), keepdim=True).clamp_min(1e-12)
    if bits <= 1:
        q = torch.where(w >= 0, mean_abs, -mean_abs)
    else:
        qmax = float(weight_int_range(torch.tensor(float(bits))))
        step = 2 * mean_abs / math.sqrt(qmax)
        q = torch.clamp(round_half_up(w / step), -qmax, qmax) * step
    return q.reshape(weight.shape)


def quant_error(weight: torch.Tensor, bits: int, quantize: QuantizeFn = uniform_fake_quant) -> float:
    """Squared quantization error ``||Q_b(W) - W||^2`` of ``weight`` under ``quantize`` at ``bits``.

    Example:
        >>> quant_error(torch.tensor([[0.1, -0.4, 0.25, 0.0]]), 2)  # doctest: +ELLIPSIS
        0.02625...
    """
    w = weight.detach()
    return float(((quantize(w, bits) - w).double() ** 2).sum())


# --------------------------------------------------------------------------------------------------
# Hutchinson estimate of per-layer Hessian traces
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of ``Tr(H_l)`` for one layer, with its standard error over the samples."""

    trace: float
    stderr: float
    numel: int
    samples: int

    @property
    def per_param(self) -> float:
        """``Tr(H_l) / n_l``, HAWQ-V2's average Hessian eigenvalue."""
        return self.trace / self.numel

    @property
    def per_param_stderr(self) -> float:
        """Standard error of :attr:`per_param`."""
        return self.stderr / self.numel


def _batches(X: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    n = len(X)
    return [(X[i : i + batch_size], y[i : i + batch_size], min(batch_size, n - i) / n) for i in range(0, n, batch_size)]


def _rademacher(shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    bits = torch.randint(0, 2, shape, generator=generator)
    return (2 * bits - 1).to(dtype)


def _hvp_quadratic_forms(grad: torch.Tensor, param: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """``v_j^T H v_j`` for each row ``v_j`` of ``vs`` (shape ``[k, *param.shape]``), ``H = d grad / d param``."""
    try:
        hv = torch.autograd.grad(grad, param, grad_outputs=vs, retain_graph=True, is_grads_batched=True)[0]
    except RuntimeError:  # an op without a batching rule: one vector at a time
        hv = torch.stack([torch.autograd.grad(grad, param, grad_outputs=v, retain_graph=True)[0] for v in vs])
    return (hv * vs).reshape(len(vs), -1).sum(dim=1)


def _hutchinson_block(
    model: nn.Module, params: list[torch.Tensor], batches: list, loss_fn: LossFn, k: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``[k, n_layers]`` quadratic forms ``v^T H_l v`` of the calibration-mean loss for ``k`` fresh ``v``."""
    vs = [_rademacher((k, *p.shape), generator, p.dtype) for p in params]
    out = torch.zeros(k, len(params), dtype=torch.float64)
    for xb, yb, weight in batches:
        loss = loss_fn(model(xb), yb) * weight
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for i, (g, p) in enumerate(zip(grads, params, strict=True)):
            out[:, i] += _hvp_quadratic_forms(g, p, vs[i]).detach().double()
    return out


def _converged(samples: torch.Tensor, tol: float) -> bool:
    m = samples.shape[0]
    if m < 2:
        return False
    mean = samples.mean(0).abs()
    se = samples.std(0) / math.sqrt(m)
    return bool(((se <= tol * mean) | (se <= 1e-12)).all())


def hutchinson_traces(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = F.cross_entropy,
    max_samples: int = 200,
    min_samples: int = 16,
    tol: float = 0.02,
    batch_size: int = 1024,
    block: int = 8,
    generator: torch.Generator | None = None,
) -> dict[str, TraceEstimate]:
    """Hutchinson estimates of ``Tr(H_l)`` for every named weight in ``params``.

    ``H_l`` is the Hessian of ``mean_i loss_fn(model(X_i), y_i)`` w.r.t. ``params[l]`` (all other
    parameters fixed), the mean taken over the whole calibration set ``(X, y)`` processed in
    ``batch_size`` rows. Rademacher vectors are drawn ``block`` at a time (one HVP per layer per
    vector, batched through ``is_grads_batched``); sampling stops once ``min_samples`` were drawn and
    every layer's standard error is at most ``tol`` times its |estimate|, or at ``max_samples``.
    The model is put in eval mode (no dropout) and restored afterwards.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> est = hutchinson_traces(lin, {"w": lin.weight}, torch.randn(8, 2), torch.randint(0, 2, (8,)))
        >>> est["w"].numel
        4
    """
    if max_samples < 1 or block < 1:
        raise ValueError("max_samples and block must be >= 1")
    names, tensors = list(params), list(params.values())
    batches = _batches(X, y, batch_size)
    was_training = model.training
    model.eval()
    try:
        rows: list[torch.Tensor] = []
        drawn = 0
        while drawn < max_samples:
            k = min(block, max_samples - drawn)
            rows.append(_hutchinson_block(model, tensors, batches, loss_fn, k, generator))
            drawn += k
            if drawn >= min_samples and _converged(torch.cat(rows), tol):
                break
    finally:
        model.train(was_training)
    samples = torch.cat(rows)
    m = samples.shape[0]
    se = samples.std(0) / math.sqrt(m) if m > 1 else torch.full((len(names),), float("inf"))
    mean = samples.mean(0)
    return {
        name: TraceEstimate(float(mean[i]), float(se[i]), tensors[i].numel(), m)
        for i, name in enumerate(names)
    }


def hessian_omega(
    traces: Mapping[str, TraceEstimate],
    weights: Mapping[str, torch.Tensor],
    candidates: Sequence[int],
    error_fn: QuantErrorFn = quant_error,
) -> np.ndarray:
    """``Omega[l, c] = Tr(H_l)/n_l * ||Q_c(W_l) - W_l||^2``, rows in the order of ``weights``.

    Example:
        >>> w = {"a": torch.ones(2, 2)}
        >>> hessian_omega({"a": TraceEstimate(8.0, 0.0, 4, 1)}, w, (2, 8)).round(3).tolist()
        [[8.0, 0.034]]
    """
    table = np.zeros((len(weights), len(candidates)))
    for i, (name, w) in enumerate(weights.items()):
        for j, b in enumerate(candidates):
            table[i, j] = traces[name].per_param * error_fn(w, int(b))
    return table


# --------------------------------------------------------------------------------------------------
# Loss-increase sensitivity
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def mean_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = F.cross_entropy,
              batch_size: int = 4096) -> float:
    """Mean of ``loss_fn`` over ``(X, y)``, model in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        total = sum(float(loss_fn(model(xb), yb)) * w for xb, yb, w in _batches(X, y, batch_size))
    finally:
        model.train(was_training)
    return total


@torch.no_grad()
def loss_sensitivity(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    X: torch.Tensor,
    y: torch.Tensor,
    candidates: Sequence[int],
    quantize: QuantizeFn = uniform_fake_quant,
    loss_fn: LossFn = F.cross_entropy,
    batch_size: int = 4096,
    clip_negative: bool = True,
) -> np.ndarray:
    """``Omega[l, c]``: increase of the mean loss on ``(X, y)`` when only ``weights[l]`` is quantized to ``c`` bits.

    Each weight tensor is overwritten in place with its quantized value for the measurement and
    restored exactly afterwards. A decrease (quantization noise that happens to help on a small
    held-out set) is measurement noise for a trained model: ``clip_negative`` sets it to 0.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> X, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
        >>> table = loss_sensitivity(lin, {"w": lin.weight}, X, y, (2, 16))
        >>> table.shape, bool(abs(table[0, 1]) < 1e-3)
        ((1, 2), True)
    """
    base = mean_loss(model, X, y, loss_fn, batch_size)
    table = np.zeros((len(weights), len(candidates)))
    for i, w in enumerate(weights.values()):
        original = w.detach().clone()
        try:
            for j, b in enumerate(candidates):
                w.copy_(quantize(original, int(b)))
                table[i, j] = mean_loss(model, X, y, loss_fn, batch_size) - base
        finally:
            w.copy_(original)
    return np.maximum(table, 0.0) if clip_negative else table
