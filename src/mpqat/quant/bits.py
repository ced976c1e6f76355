"""Learned bit-widths: a discrete bit-width per neuron (or per layer) from a continuous strength.

The NMP-QAT quantizers (METHODS.md §1; "scale when needed"). Every row of bits (an output neuron
for weights, an input feature for activations, or the whole tensor) has a *strength*
``s in [0, 1]`` and a sorted candidate set ``b_1 < ... < b_K`` with thresholds
``0 < t_1 < ... < t_{K-1} < 1``:

* **forward (hard)**: the row uses exactly ``b(s) = b_k`` for ``t_{k-1} <= s < t_k``;
* **backward (surrogate)**: the output is treated as the soft mixture
  ``sum_k pi_k(s) Q_k(x)`` with telescoping sigmoid weights ``g_k = sigmoid((s - t_k)/tau)``,
  ``pi_1 = 1 - g_1``, ``pi_k = g_{k-1} - g_k``, ``pi_K = g_{K-1}``, so
  ``dL/ds = sum_k dpi_k/ds <dL/dy, Q_k(x)>`` (the first-order change of the loss when the row moves
  toward another candidate), with straight-through rounding inside every ``Q_k``.

The candidates are evaluated together as one ``[K, ...]`` tensor (no Python loop over neurons or
candidates); each quantizer is one :class:`torch.autograd.Function` whose backward is written out.
On a small model the step time is set by the number of kernels, not by FLOPs, so everything that
depends only on the parameters (chosen candidates, mixing weights, snapped steps, what the chosen
index picks out of the per-candidate constants) is computed once per optimizer step and cached by
the parameters' version counters, comparisons write float masks directly (``eq(..., out=float)``)
and the chosen candidate is selected with one one-hot contraction. The values and gradients are
those of the straightforward implementation, bit for bit (``tests/quant/test_speed_regression.py``).

* :class:`NeuronBitsWeightQuantizer`: signed weights; one LSQ step per (candidate, neuron), the
  1-bit candidate starting from the row's absmean (XNOR scale). Its backward is the full surrogate:
  the weight and every candidate's step get the gradient of the mixture. For the strength, every
  candidate row is first rescaled to the chosen row's norm (the integer codes' *direction* is what
  more bits buy; the scales are learned anyway), because with unmatched scales the candidate with
  the larger norm wins whenever the loss wants larger logits, whatever the precision.
* :class:`NeuronBitsActQuantizer`: layer inputs, candidates {4, 8, 16} by default; one learned clip
  ``alpha`` per feature (log domain), initialised from the first training batch. The grids are
  nested powers of two: the lowest candidate's step is ``2**round(log2(alpha / Q_P(b_1)))`` and
  every extra bit halves it, so every eval step is ``2**k`` and all candidates clip at about
  ``alpha``. To keep the per-batch cost low, the input and the clip get the straight-through/LSQ
  gradient of the *chosen* candidate; the strength gets the mixture's gradient with every
  candidate clipped at the lowest candidate's range (it compares resolutions; otherwise values
  above the 4-bit clip ask for 8 bits when they only ask for a larger clip).
* The strengths are not updated by the trainer's optimizer but by :meth:`_LearnedBits.step_strength`
  (momentum over the gradient normalised per layer) so that, within a layer, a neuron's bits
  grow at a speed that reflects how strongly the loss asks for them.

Bit-widths (and strengths) have one broadcastable shape: ``[out, 1]`` per neuron or ``[1, 1]`` per
layer for weights, ``[features]`` or ``[1]`` for activations, so ``granularity: layer`` is the
same code. In eval mode (and for :func:`mpqat.freeze`) the quantizers expose exactly the interface
of :class:`~mpqat.quant.uniform.LSQWeightQuantizer` / :class:`~mpqat.quant.uniform.Pow2ActQuantizer`
at the hard choice (``scale()``, ``integer_codes``, ``bits()``, ``exponents()``, ``step()``), so
``QuantLinear``'s exact path, :mod:`mpqat.cost` and the integer export work unchanged, and
:meth:`frozen` returns those fixed quantizers with identical outputs.

Example:
    >>> import torch
    >>> q = NeuronBitsWeightQuantizer(out_features=3, in_features=4)
    >>> w = torch.randn(3, 4)
    >>> q.train()(w).shape, q.bits().tolist()          # every neuron starts at the lowest candidate
    (torch.Size([3, 4]), [1.0, 1.0, 1.0])
    >>> with torch.no_grad():
    ...     q.strength[0] = 0.6                          # t_2 = 0.5 <= s < t_3 = 0.75: 4 bits
    >>> q.bits().tolist()
    [4.0, 1.0, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn

from mpqat import kernels
from mpqat.quant.functional import (
    act_int_range,
    quantize_act_int,
    quantize_weight_int,
    snapped_value,
    weight_int_range,
)
from mpqat.quant.uniform import LSQWeightQuantizer, Pow2ActQuantizer

LN2 = math.log(2.0)


def check_candidates(candidates: Sequence[int], thresholds: Sequence[float], lo: int, hi: int, what: str) -> None:
    """Raise ``ValueError`` unless the candidates are increasing integers in ``[lo, hi]`` with one
    threshold fewer, strictly increasing inside ``(0, 1)``."""
    cands = list(candidates)
    if not cands or any(isinstance(b, bool) or not isinstance(b, int) or not lo <= b <= hi for b in cands):
        raise ValueError(f"{what} candidate bits {tuple(cands)} are not supported: use integers in [{lo}, {hi}]")
    if any(b >= c for b, c in zip(cands, cands[1:])):
        raise ValueError(f"{what} candidate bits {tuple(cands)} must be strictly increasing")
    ts = list(thresholds)
    if len(ts) != len(cands) - 1:
        raise ValueError(f"{len(cands)} {what} candidates need {len(cands) - 1} thresholds, got {len(ts)}")
    if any(not (0.0 < t < 1.0) for t in ts) or any(a >= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"{what} thresholds {tuple(ts)} must be strictly increasing and inside (0, 1)")


def _difference_matrix(k: int) -> torch.Tensor:
    """``[K, K-1]`` matrix with ``pi = e_1 + D g``: ``pi_1 = 1 - g_1``, ``pi_k = g_{k-1} - g_k``, ``pi_K = g_{K-1}``."""
    eye = torch.eye(k)
    return eye[:, :-1].roll(1, 0) * (torch.arange(k) > 0).unsqueeze(1) - eye[:, :-1]


def mixing_weights(strength: torch.Tensor, thresholds: torch.Tensor, tau: float,
                   difference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Telescoping sigmoid weights ``pi`` and their derivatives ``dpi/ds``, both ``[K, *strength.shape]``.

    ``g_k = sigmoid((s - t_k)/tau)``; ``pi = (1 - g_1, g_1 - g_2, ..., g_{K-1})`` sums to 1.
    ``difference``: :func:`_difference_matrix` of ``K``, if the caller keeps one.

    Example:
        >>> pi, dpi = mixing_weights(torch.tensor([0.5]), torch.tensor([0.25, 0.75]), tau=0.05)
        >>> [round(v, 4) for v in pi.flatten().tolist()], round(float(dpi.sum()), 6)
        ([0.0067, 0.9866, 0.0067], 0.0)
    """
    k = thresholds.numel() + 1
    shape = (k, *strength.shape)
    if k == 1:
        return torch.ones(shape, dtype=strength.dtype), torch.zeros(shape, dtype=strength.dtype)
    d = _difference_matrix(k) if difference is None else difference
    g = torch.sigmoid((strength.reshape(1, -1) - thresholds.reshape(-1, 1)).mul_(1.0 / tau))  # [K-1, n]
    pi = torch.mm(d, g)
    pi[0] += 1.0
    dpi = torch.mm(d, torch.addcmul(g, g, g, value=-1.0)).mul_(1.0 / tau)
    return pi.reshape(shape), dpi.reshape(shape)


def hard_index(strength: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the chosen candidate, ``#{k : s >= t_k}`` (int64, shape of ``strength``)."""
    if thresholds.numel() == 0:
        return torch.zeros(strength.shape, dtype=torch.int64, device=strength.device)
    return torch.bucketize(strength.detach(), thresholds, right=True)


def snapped(x: torch.Tensor) -> torch.Tensor:
    """The value of :func:`~mpqat.quant.functional.snap_mantissa` for positive normal float32 ``x``
    (see :func:`~mpqat.quant.functional.snapped_value`)."""
    return snapped_value(x)


def _stamp(*tensors: torch.Tensor | None) -> tuple:
    """Identity, storage and version counter of each tensor: a cache entry keyed by this (and holding
    the tensors, so that no identity is reused) is stale as soon as one is replaced or modified in place."""
    return tuple((id(t), t.data_ptr(), t._version) if t is not None else None for t in tensors)


def _without_grad(fn, *args):  # type: ignore[no-untyped-def]
    """``fn(*args)`` with gradients off (entering ``no_grad`` only when they are on: it costs a few us)."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return fn(*args)
    return fn(*args)


def step_strengths(quantizers: Sequence[_LearnedBits], lr: float, allow_shrink: bool,
                   betas: tuple[float, float] = (0.9, 0.999)) -> None:
    """:meth:`_LearnedBits.step_strength` of every quantizer, with one fused-kernel call for all of
    those it applies to (float32 CPU strengths with a gradient; see :mod:`mpqat.kernels`).

    Example:
        >>> q = NeuronBitsWeightQuantizer(out_features=2, in_features=3)
        >>> q.strength.grad = torch.full((2, 1), -1.0)     # both neurons ask for more bits
        >>> step_strengths([q], lr=0.05, allow_shrink=False)
        >>> q.strength.grad is None, [round(v, 3) for v in q.strength.flatten().tolist()]
        (True, [0.15, 0.15])
    """
    ext = kernels.extension_if_enabled()
    entries, rest = [], []
    for quant in quantizers:
        strength = quant.strength
        if strength is None or strength.grad is None:
            continue
        grad = strength.grad
        if ext is not None and strength.dtype is torch.float32 and grad.dtype is torch.float32 \
                and strength.device.type == "cpu":
            entries.append([strength, grad.contiguous(), *quant._consts().strength_state])
            strength.grad = None
        else:
            rest.append(quant)
    if entries:
        ext.step_strengths(entries, float(lr), float(betas[0]), float(betas[1]), bool(allow_shrink))
    for quant in rest:
        quant._step_strength_reference(lr, allow_shrink, betas)


class _LearnedBits(nn.Module):
    """Shared state of the learned-bit quantizers: candidates, thresholds, strengths, no-shrink floor.

    Everything that depends only on the parameters (chosen candidates, mixing weights, snapped
    steps) is computed once per optimizer step and cached, keyed by the parameters' version
    counters: an optimizer must update them in place with ordinary tensor ops, which bump the
    counters (``torch.optim`` does, except with ``fused=True``, after which
    :func:`mpqat.optim.make_optimizer`'s step hook bumps them)."""

    _CACHES = ("_cache", "_mix_cache", "_index_cache", "_index_consts_cache", "_consts_cache", "_tau_cache")

    def __init__(self, candidates: Sequence[int], thresholds: Sequence[float], rows: tuple[int, ...],
                 init_strength: float, tau: float) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.rows = rows
        self.register_buffer("candidates", torch.tensor([float(b) for b in candidates]))
        self.register_buffer("thresholds", torch.tensor([float(t) for t in thresholds]))
        # Lower edge of every bucket: [0, t_1, ..., t_{K-1}] (the no-shrink floor takes these values).
        self.register_buffer("edges", torch.cat([torch.zeros(1), self.thresholds]))
        self.register_buffer("difference", _difference_matrix(len(self.candidates)), persistent=False)
        if len(self.candidates) > 1:
            self.strength = nn.Parameter(torch.full(rows, float(init_strength)))
            self.register_buffer("strength_floor", torch.zeros(rows))
            # State of the strength update (:meth:`step_strength`): momentum, the running mean square
            # of the whole quantizer's strength gradient, and the number of updates.
            self.register_buffer("strength_momentum", torch.zeros(rows))
            self.register_buffer("strength_sq", torch.zeros(()))
            self.register_buffer("strength_updates", torch.zeros((), dtype=torch.int64))
        else:
            self.strength = None
        self.register_buffer("initialized", torch.tensor(False))
        self._clear_caches()

    # -- caches ------------------------------------------------------------------------------------
    # Each is a (key, value) pair in the instance __dict__ (plain attribute writes, not nn.Module's):
    # _cache: the tensors derived from the scale/clip parameter and the strength (see _derived);
    # _mix_cache: the mixing weights of the current strengths (_mixing); _index_cache: the chosen
    # candidates (hard_index); _index_consts_cache: tensors that depend only on those (_index_consts);
    # _consts_cache: references to the buffers and constants derived from them (_consts).

    def _clear_caches(self) -> None:
        for name in self._CACHES:
            self.__dict__[name] = None

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        for name in self._CACHES:
            state[name] = None  # copies and pickles recompute their derived tensors
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for name in self._CACHES:
            self.__dict__.setdefault(name, None)

    def _apply(self, *args, **kwargs):  # type: ignore[no-untyped-def]  # .to(), .double(), ...: new tensors
        result = super()._apply(*args, **kwargs)
        self._clear_caches()
        return result

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._clear_caches()

    def _consts(self) -> SimpleNamespace:
        """Buffers and constants derived from them (attribute access on a module is slow)."""
        consts = self.__dict__["_consts_cache"]
        if consts is None:
            with torch.no_grad():
                consts = self.__dict__["_consts_cache"] = self._build_consts()
        return consts

    def _build_consts(self) -> SimpleNamespace:
        k = len(self.candidates)
        e1 = torch.zeros(k, 1, dtype=self.candidates.dtype, device=self.candidates.device)
        e1[0] = 1.0
        # The state the fused strength update (mpqat.kernels) works on, in its argument order.
        strength_state = None
        if self.strength is not None:
            strength_state = (self.strength_momentum, self.strength_sq, self.strength_updates, self.strength_floor,
                              self.edges, self.thresholds)
        return SimpleNamespace(k=k, candidates=self.candidates, thresholds=self.thresholds, difference=self.difference,
                               thresholds_col=self.thresholds.reshape(-1, 1), e1=e1, strength_state=strength_state)

    def _inv_tau(self) -> torch.Tensor:
        """``1 / tau`` as a 0-d tensor (an op with a tensor operand dispatches faster than with a float)."""
        cache = self.__dict__["_tau_cache"]
        if cache is None or cache[0] != self.tau:
            cache = self.__dict__["_tau_cache"] = (self.tau, torch.tensor(1.0 / self.tau, device=self.candidates.device))
        return cache[1]

    def _strength(self) -> torch.Tensor:
        return self.strength if self.strength is not None else self.candidates.new_zeros(self.rows)

    def hard_index(self) -> torch.Tensor:
        """Chosen candidate per row of bits (int64). The returned tensor is shared: do not modify it."""
        strength = self.strength
        thresholds = self._consts().thresholds
        key = _stamp(strength, thresholds)
        cache = self.__dict__["_index_cache"]
        if cache is None or cache[0] != key:
            index = hard_index(self._strength(), thresholds)
            if cache is not None and torch.equal(index, cache[1]):
                index = cache[1]  # same choice: keep the tensor, so what depends on it stays cached
            cache = self.__dict__["_index_cache"] = (key, index, (strength, thresholds))
        return cache[1]

    def _index_consts(self) -> SimpleNamespace:
        """Tensors that depend only on the chosen candidates (see :meth:`_compute_index_consts`)."""
        index = self.hard_index()
        cache = self.__dict__["_index_consts_cache"]
        if cache is None or cache[0] is not index:
            with torch.no_grad():
                cache = self.__dict__["_index_consts_cache"] = (index, self._compute_index_consts(index))
        return cache[1]

    def _compute_index_consts(self, index: torch.Tensor) -> SimpleNamespace:
        raise NotImplementedError

    def hard_bits(self) -> torch.Tensor:
        """Chosen bit-width per row of bits, shape of the strength."""
        return self.candidates[self.hard_index()]

    def _mixing(self) -> SimpleNamespace:
        """``pi`` and ``dpi/ds`` (``[K, *strength.shape]``, no gradient) of the current strengths and
        temperature, cached while neither changes; ``g`` keeps the sigmoids for :meth:`expected_bits`.
        The values are those of :func:`mixing_weights`."""
        strength = self.strength
        key = (*_stamp(strength), self.tau)
        cache = self.__dict__["_mix_cache"]
        if cache is None or cache[0] != key:
            cache = self.__dict__["_mix_cache"] = (key, _without_grad(self._compute_mixing, strength.detach()), strength)
        return cache[1]

    def _compute_mixing(self, strength: torch.Tensor) -> SimpleNamespace:
        c = self._consts()
        inv_tau = self._inv_tau()
        g = torch.sigmoid(torch.sub(strength.view(1, -1), c.thresholds_col).mul_(inv_tau))  # [K-1, n]
        pi = torch.addmm(c.e1, c.difference, g)  # e_1 + D g: (1 - g_1, g_1 - g_2, ..., g_{K-1})
        dpi = torch.mm(c.difference, torch.addcmul(g, g, g, value=-1.0)).mul_(inv_tau)
        shape = (c.k, *strength.shape)
        return SimpleNamespace(pi=pi.view(shape), dpi=dpi.view(shape), g=g)

    def expected_bits(self) -> torch.Tensor:
        """Differentiable bits ``sum_k pi_k(s) b_k`` per row of bits (flattened)."""
        if self.strength is None:
            return self.candidates.reshape(1)
        return _ExpectedBits.apply(self.strength, self)

    def _derived(self, param: torch.Tensor) -> SimpleNamespace:
        """Per-step tensors derived from the scale/clip parameter and the strength, cached while
        neither changes (so ``QuantLinear``'s bias rounding reuses what the forward computed)."""
        strength = self.strength
        key = (*_stamp(param, strength), self.tau)
        cache = self.__dict__["_cache"]
        if cache is None or cache[0] != key:
            cache = self.__dict__["_cache"] = (key, _without_grad(self._compute_derived, param.detach()), (param, strength))
        return cache[1]

    def _compute_derived(self, param: torch.Tensor) -> SimpleNamespace:
        raise NotImplementedError

    @torch.no_grad()
    def step_strength(self, lr: float, allow_shrink: bool, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        """Update the strengths from their gradient, then :meth:`constrain` them; clears the gradient.

        Momentum on the gradient divided by the root of its running mean square over the *whole*
        quantizer (Adam with one second moment per layer instead of per neuron): the neurons of a
        layer move in proportion to how strongly the loss asks for bits, the most demanding ones by
        about ``lr`` per step. (Per-neuron Adam would move a weak but consistent demand as fast as
        a strong one.)"""
        step_strengths([self], lr, allow_shrink, betas)  # the fused kernel where it applies

    @torch.no_grad()
    def _step_strength_reference(self, lr: float, allow_shrink: bool, betas: tuple[float, float]) -> None:
        """:meth:`step_strength` in tensor operations (the kernels' reference, and their fallback)."""
        strength = self.strength
        if strength is None or strength.grad is None:
            return
        grad = strength.grad
        beta1, beta2 = betas
        t = int(self.strength_updates.add_(1))
        momentum, sq = self.strength_momentum, self.strength_sq
        momentum.lerp_(grad, 1.0 - beta1)
        sq.lerp_(torch.mul(grad, grad).mean(), 1.0 - beta2)  # grad * grad is what square() computes
        denom = torch.div(sq, 1.0 - beta2**t).sqrt_().add_(1e-12)
        strength.sub_(torch.div(momentum, denom), alpha=lr / (1.0 - beta1**t))
        strength.grad = None
        self._constrain(allow_shrink)

    @torch.no_grad()
    def constrain(self, allow_shrink: bool) -> None:
        """Keep ``s`` in ``[0, 1]``; without ``allow_shrink`` never let a row fall back below the
        lowest edge of the highest bucket it has reached."""
        self._constrain(allow_shrink)

    def _constrain(self, allow_shrink: bool) -> None:
        strength = self.strength
        if strength is None:
            return
        if allow_shrink:
            strength.clamp_(0.0, 1.0)
            return
        floor = self.strength_floor
        torch.maximum(strength.clamp_(max=1.0), floor, out=strength)
        torch.index_select(self.edges, 0, self.hard_index().view(-1), out=floor.view(-1))


class _ExpectedBits(torch.autograd.Function):
    """``sum_k pi_k(s) b_k`` from the cached mixing weights; the backward is the chain rule through
    the sigmoids written out (the same operations autograd would run, without building the graph)."""

    @staticmethod
    def forward(ctx, strength, quant):  # noqa: D102  (autograd API)
        mix = quant._mixing()
        ctx.mix, ctx.quant = mix, quant
        cands = quant.candidates.reshape((-1,) + (1,) * strength.dim())
        return (mix.pi * cands).sum(0).reshape(-1)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        mix, quant = ctx.mix, ctx.quant
        c = quant._consts()
        # d/dg_j of sum_k pi_k b_k is (b_{j+1} - b_j) grad; then the sigmoid's g (1 - g) / tau.
        weighted = grad.reshape(1, -1) * c.candidates.reshape(-1, 1)  # [K, n]
        g = mix.g
        g_g = torch.mm(c.difference.t(), weighted)  # [K-1, n]
        g_z = (g_g * (1.0 - g)).mul_(g).mul_(1.0 / quant.tau)
        return g_z.sum(0).reshape(quant.strength.shape), None


class _WeightSurrogate(torch.autograd.Function):
    """Hard per-row weight quantization forward, mixture-of-candidates backward.

    All candidates are quantized at once (``[K, out, in]``): the backward needs every candidate's
    codes and masks, and one kernel over ``K`` rows is cheaper than ``K`` kernels."""

    @staticmethod
    def forward(ctx, weight, step, strength, quant):  # noqa: D102  (autograd API)
        d = quant._derived(step)
        r = torch.mul(weight, d.inv_sc).add_(0.5).floor_()  # [K, out, in]
        code = torch.maximum(r, d.qmin)
        torch.minimum(code, d.qmax, out=code)
        if d.binary_first:  # sign(w) with sign(0) = +1, written as 2 [w >= 0] - 1
            torch.ge(weight, 0.0, out=code[0]).mul_(2.0).sub_(1.0)
        ctx.d = d
        ctx.save_for_backward(weight, r, code)
        # The chosen candidate times its step: sum_k code_k * [k = h] sc_h (one kernel, exact).
        return torch.linalg.vecdot(code, d.select, dim=0)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        weight, r, code = ctx.saved_tensors
        d = ctx.d
        # In-range masks of the straight-through estimators: round(u) unclipped, |u| <= 1 at 1 bit.
        mask = torch.eq(r, code, out=torch.empty_like(r))
        if d.binary_first:
            torch.le(torch.mul(weight, d.inv_sc[0]).abs_(), 1.0, out=mask[0])
        pi = d.pi
        grad_w = grad * (mask[0] if pi is None else torch.linalg.vecdot(mask, pi, dim=0))
        inner = (code * grad).sum(-1, keepdim=True)  # <G_j, code_k(W_j)>, [K, out, 1]
        # LSQ: d(code * sc)/d sc = code - u * mask, weighted by pi_k and the LSQ gradient scale.
        masked = mask.mul_(grad * weight).sum(-1, keepdim=True)
        g_step = (inner - masked * d.inv_sc) * d.step_grad_scale
        if pi is not None:
            g_step = g_step * pi
        if d.sc_rows == 1 and g_step.shape[1] != 1:
            g_step = g_step.sum(1, keepdim=True)
        g_strength = None
        if pi is not None and ctx.needs_input_grad[2]:
            # Scale-matched mixture: every candidate row rescaled to the chosen row's norm, so the
            # strength compares what the bits can express (the direction of the integer codes),
            # not the candidates' scales, which the steps learn anyway. (code * code: the pow
            # kernel behind square() is several times slower on CPU.)
            norm = (code * code).sum(-1, keepdim=True).sqrt_().clamp_min_(1e-12)  # ||code_k||, [K, out, 1]
            chosen = torch.linalg.vecdot(norm, d.select, dim=0)  # ||code_h|| sc_h, [out, 1]
            g_strength = torch.linalg.vecdot(d.dpi, inner.div_(norm), dim=0).mul_(chosen)
            if d.dpi.shape[1] == 1:
                g_strength = g_strength.sum(0, keepdim=True)
        return grad_w, g_step, g_strength, None


class NeuronBitsWeightQuantizer(_LearnedBits):
    """Signed weight quantizer with a learned bit-width per output neuron (or per layer).

    ``per_neuron_bits``: one strength per output neuron (``[out, 1]``) or one per layer (``[1, 1]``).
    ``per_neuron``: one LSQ step per (candidate, neuron) ``[K, out, 1]`` or per candidate ``[K, 1, 1]``.
    """

    def __init__(self, out_features: int, in_features: int, candidates: Sequence[int] = (1, 2, 4, 8),
                 thresholds: Sequence[float] = (0.25, 0.5, 0.75), init_strength: float = 0.10,
                 tau: float = 0.05, per_neuron_bits: bool = True, per_neuron: bool = True) -> None:
        check_candidates(candidates, thresholds, 1, 16, "weight")
        super().__init__(candidates, thresholds, (out_features if per_neuron_bits else 1, 1), init_strength, tau)
        self.out_features, self.in_features = out_features, in_features
        self.per_neuron = per_neuron
        k = len(self.candidates)
        self.step = nn.Parameter(torch.ones(k, out_features if per_neuron else 1, 1))
        qmax = weight_int_range(self.candidates).reshape(k, 1, 1)
        self.register_buffer("qmax", qmax)
        self.register_buffer("qmin", -qmax)
        n = in_features * (1 if per_neuron else out_features)
        self.register_buffer("grad_scale", 1.0 / torch.sqrt(n * qmax))
        self.binary_first = bool(self.candidates[0] <= 1)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """LSQ init ``2*mean|w|/sqrt(Q_P)`` per candidate; ``mean|w|`` (absmean, XNOR) at 1 bit."""
        dims = 1 if self.per_neuron else (0, 1)
        mean_abs = weight.abs().mean(dim=dims, keepdim=True).reshape(1, -1, 1).clamp_min(1e-8)
        lsq = 2 * mean_abs / torch.sqrt(self.qmax)
        self.step.copy_(torch.where(self.candidates.reshape(-1, 1, 1) <= 1, mean_abs, lsq))
        self.initialized.fill_(True)

    def _build_consts(self) -> SimpleNamespace:
        consts = super()._build_consts()
        consts.__dict__.update(qmin=self.qmin, qmax=self.qmax, grad_scale=self.grad_scale)
        # What the fused kernel (mpqat.kernels) reads: [thresholds | qmax | grad_scale] in one tensor, binary_first.
        packed = torch.cat([self.thresholds.reshape(-1), self.qmax.reshape(-1), self.grad_scale.reshape(-1)])
        consts.fused = (packed.float().contiguous(), self.binary_first)
        return consts

    def _fused_consts(self) -> tuple:
        """The constants :func:`mpqat.kernels.nmp.fused_nmp_linear` passes to the kernel (cached)."""
        return self._consts().fused

    def _compute_index_consts(self, index: torch.Tensor) -> SimpleNamespace:
        """One-hot ``[K, N, 1]`` of the chosen candidate per row (``N = max(step rows, strength rows)``)."""
        k, rows = len(self.candidates), max(self.step.shape[1], index.shape[0])
        onehot = torch.zeros(k, rows, 1, dtype=self.step.dtype, device=index.device)
        onehot.scatter_(0, index.expand(rows, 1).unsqueeze(0), 1.0)
        return SimpleNamespace(onehot=onehot)

    def _compute_derived(self, step: torch.Tensor) -> SimpleNamespace:
        """Per-step constants: snapped steps ``sc`` ``[K, S, 1]`` and inverses, the chosen step
        ``sc_h`` ``[N, 1]`` (``N = max(S, R)``) and ``select`` = one-hot x ``sc`` ``[K, N, 1]``, the
        mixing weights and their derivatives, the LSQ gradient scale with the sign of the step."""
        c = self._consts()
        sc = snapped_value(step.abs().clamp_min_(1e-12))
        select = self._index_consts().onehot * sc
        pi = dpi = None
        if self.strength is not None:
            mix = self._mixing()
            pi, dpi = mix.pi, mix.dpi
        return SimpleNamespace(inv_sc=torch.reciprocal(sc), sc_h=select.sum(0), select=select, pi=pi, dpi=dpi,
                               qmin=c.qmin, qmax=c.qmax, binary_first=self.binary_first, sc_rows=step.shape[1],
                               step_grad_scale=c.grad_scale * torch.sign(step))

    @property
    def bit_widths(self) -> torch.Tensor:
        """Hard bits per row of bits, ``[out, 1]`` or ``[1, 1]`` (the LSQ quantizer's buffer shape)."""
        return self.hard_bits()

    def scale(self) -> torch.Tensor:
        """Chosen candidate's dyadic step per row, ``[out, 1]`` (or ``[1, 1]``); no gradient."""
        return self._derived(self.step).sc_h

    def cached_scale(self) -> torch.Tensor:
        """Same as :meth:`scale` (cached once per optimizer step)."""
        return self._derived(self.step).sc_h

    def bits(self) -> torch.Tensor:
        """Hard bit-width per output neuron, shape ``[out]`` or ``[1]``."""
        return self.hard_bits().reshape(-1)

    def integer_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes at the chosen bits and scale (what the integer graph stores)."""
        return quantize_weight_int(weight, self.scale().to(weight.dtype), self.bit_widths.to(weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.integer_codes(weight) * self.scale().to(weight.dtype)
        if not self.initialized:
            self.initialize(weight)
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"expected a weight of shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(weight.shape)}")
        return _WeightSurrogate.apply(weight, self.step, self.strength, self)

    @torch.no_grad()
    def frozen(self) -> LSQWeightQuantizer:
        """A fixed :class:`LSQWeightQuantizer` with the chosen bits and scales (identical outputs)."""
        scale = self.scale()
        fixed = LSQWeightQuantizer(self.out_features, self.in_features, bits=1, per_neuron=scale.shape[0] > 1)
        fixed.bit_widths.copy_(self.bit_widths.expand_as(fixed.bit_widths))
        fixed.step.copy_(scale)
        fixed.initialized.fill_(True)
        return fixed

    def extra_repr(self) -> str:
        return (f"out_features={self.out_features}, in_features={self.in_features}, "
                f"candidates={self.candidates.int().tolist()}, tau={self.tau:g}")


class _ActSurrogate(torch.autograd.Function):
    """Hard per-feature activation quantization forward; STE/LSQ of the chosen candidate for the
    input and the clip, mixture-of-candidates gradient for the strength."""

    @staticmethod
    def forward(ctx, x, log2_clip, strength, quant):  # noqa: D102
        d = quant._derived(log2_clip)
        u = x * d.inv_step_h  # exact: the steps are powers of two
        r = torch.add(u, 0.5).floor_()
        code = torch.maximum(r, d.qmin_h) if d.signed else r.clamp_min(0.0)
        torch.minimum(code, d.qmax_h, out=code)
        ctx.d = d
        ctx.save_for_backward(x, u, r, code)
        return code * d.step_h

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, u, r, code = ctx.saved_tensors
        d = ctx.d
        grad_x = grad * torch.eq(r, code, out=torch.empty_like(r))  # the in-range mask
        # LSQ gradient of the chosen power-of-two step 2**round(log2 alpha - ...):
        # sum_batch G * (code - u * mask) * step * ln 2, times the gradient scale.
        g_clip = torch.addcmul(grad * code, grad_x, u, value=-1.0).sum(0).mul_(d.clip_grad_scale)
        if d.clip_numel == 1:
            g_clip = g_clip.sum().reshape(1)
        g_strength = None
        if d.dpi is not None and ctx.needs_input_grad[2]:
            # Every candidate on its nested grid, all clipped at the lowest candidate's range: the
            # strength gradient compares resolutions; the range is the clip's job.
            codes = torch.mul(x, d.inv_steps).add_(0.5).floor_()  # [K, B, C]
            if d.signed:
                torch.maximum(codes, d.common_qmin, out=codes)
            else:
                codes.clamp_(min=0.0)
            torch.minimum(codes, d.common_qmax, out=codes)
            inner = codes.mul_(grad).sum(1)  # <G_i, code_k(x_i)>, [K, C']
            g_strength = torch.linalg.vecdot(d.dpi_steps, inner, dim=0)
            if d.dpi.shape[1] == 1:
                g_strength = g_strength.sum().reshape(1)
        return grad_x, g_clip, g_strength, None


class NeuronBitsActQuantizer(_LearnedBits):
    """Activation (layer input) quantizer with a learned bit-width per feature (or per layer).

    ``per_feature_bits``: strengths ``[features]`` or ``[1]``; ``per_feature``: clips ``[features]``
    or ``[1]``. ``signed=False`` maps to ``[0, 2**b - 1]`` (and so applies the ReLU).
    The clip is initialised on the first training batch to the ``init_quantile`` of ``|x|``.
    """

    def __init__(self, features: int, signed: bool, candidates: Sequence[int] = (4, 8, 16),
                 thresholds: Sequence[float] = (1 / 3, 2 / 3), init_strength: float = 0.15, tau: float = 0.05,
                 per_feature_bits: bool = True, per_feature: bool = True, init_quantile: float = 0.999) -> None:
        check_candidates(candidates, thresholds, 2, 16, "activation")
        super().__init__(candidates, thresholds, (features if per_feature_bits else 1,), init_strength, tau)
        self.features, self.signed, self.per_feature = features, signed, per_feature
        self.init_quantile = float(init_quantile)
        self.log2_clip = nn.Parameter(torch.zeros(features if per_feature else 1))
        qmin, qmax = act_int_range(self.candidates, signed)
        self.register_buffer("qmin", qmin)
        self.register_buffer("qmax", qmax)
        self.register_buffer("log2_qmax", torch.log2(qmax))
        self.register_buffer("extra_bits", self.candidates - self.candidates[0])
        self.register_buffer("common_qmax", (qmax[0] * torch.exp2(self.extra_bits)).reshape(-1, 1, 1))
        n = features if not per_feature else 1
        self.register_buffer("grad_scale", 1.0 / torch.sqrt(n * qmax))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Clip ``alpha`` = the ``init_quantile`` of ``|x|`` per feature (dead features: the median)."""
        flat = x.detach().reshape(-1, self.features).abs().float()
        if self.per_feature:
            alpha = torch.quantile(flat, self.init_quantile, dim=0)
            alive = alpha > 0
            fill = alpha[alive].median() if bool(alive.any()) else torch.tensor(1.0)
            alpha = torch.where(alive, alpha, fill)
        else:
            alpha = torch.quantile(flat.reshape(-1), self.init_quantile).reshape(1)
        self.log2_clip.copy_(torch.log2(alpha.clamp_min(1e-6)))
        self.initialized.fill_(True)

    def _build_consts(self) -> SimpleNamespace:
        consts = super()._build_consts()
        consts.__dict__.update(
            log2_qmax0=self.log2_qmax[0], extra_col=self.extra_bits.unsqueeze(1), common_qmax=self.common_qmax,
            common_qmin=-self.common_qmax, half=torch.tensor(0.5, dtype=self.qmax.dtype, device=self.qmax.device),
            # what the chosen index picks, in one lookup: extra bits, qmin, qmax, grad_scale * ln 2
            table=torch.stack([self.extra_bits, self.qmin, self.qmax, self.grad_scale * LN2], dim=1),
        )
        # What the fused kernel (mpqat.kernels) reads: [thresholds | extra bits | qmin | qmax | common qmax |
        # grad_scale] in one tensor, then two scalars.
        packed = torch.cat([self.thresholds.reshape(-1), self.extra_bits.reshape(-1), self.qmin.reshape(-1),
                            self.qmax.reshape(-1), self.common_qmax.reshape(-1), self.grad_scale.reshape(-1)])
        consts.fused = (packed.float().contiguous(), float(self.log2_qmax[0]), bool(self.signed))
        return consts

    def _fused_consts(self) -> tuple:
        """The constants :func:`mpqat.kernels.nmp.fused_nmp_linear` passes to the kernel (cached)."""
        return self._consts().fused

    def _compute_index_consts(self, index: torch.Tensor) -> SimpleNamespace:
        picked = torch.index_select(self._consts().table, 0, index.view(-1))  # [R, 4]
        extra, qmin, qmax, gs_ln2 = picked.t().contiguous().unbind(0)
        return SimpleNamespace(extra=extra, qmin=qmin, qmax=qmax, gs_ln2=gs_ln2)

    def _compute_derived(self, log2_clip: torch.Tensor) -> SimpleNamespace:
        """Per-step constants: every candidate's step ``[K, 1, C]`` and its inverse, the chosen step,
        inverse step and code range per feature, the mixing-weight derivatives times the steps."""
        c = self._consts()
        ic = self._index_consts()
        # Nested grids: the lowest candidate's step is the power of two nearest alpha / Q_P(b_1); a
        # candidate with b more bits halves it (b - b_1) times, so every candidate clips at ~alpha.
        base = torch.sub(log2_clip, c.log2_qmax0).add_(c.half).floor_()  # round half up, [C']
        e_h = base - ic.extra  # [max(C', R)]
        step_h = torch.exp2(e_h)
        dpi = dpi_steps = inv_steps = None
        if self.strength is not None:
            exps = base - c.extra_col  # [K, C']
            dpi = self._mixing().dpi  # [K, R]
            dpi_steps = dpi * torch.exp2(exps)
            inv_steps = torch.exp2(exps.neg_()).unsqueeze_(1)
        return SimpleNamespace(
            inv_steps=inv_steps, step_h=step_h, inv_step_h=torch.exp2(-e_h), e_h=e_h, min_step=None,
            qmin_h=ic.qmin, qmax_h=ic.qmax, signed=self.signed, dpi=dpi, dpi_steps=dpi_steps,
            common_qmin=c.common_qmin, common_qmax=c.common_qmax, clip_numel=log2_clip.numel(),
            clip_grad_scale=step_h * ic.gs_ln2,
        )

    @property
    def bit_widths(self) -> torch.Tensor:
        """Hard bits, ``[features]`` when bits or clips are per feature, else ``[1]``."""
        bits = self.hard_bits()
        return bits.expand(self.features) if self.per_feature and bits.numel() == 1 else bits

    def exponents(self) -> torch.Tensor:
        """Integer exponents ``k`` of the chosen steps ``2**k`` (int64, shape of :attr:`bit_widths`)."""
        return self._derived(self.log2_clip).e_h.to(torch.int64)

    def step(self) -> torch.Tensor:
        """Chosen power-of-two step per feature (no gradient)."""
        return self._derived(self.log2_clip).step_h

    def cached_min_step(self) -> torch.Tensor:
        """The smallest chosen step ``2**min(k)`` (a 0-d tensor; cached once per optimizer step)."""
        d = self._derived(self.log2_clip)
        if d.min_step is None:
            d.min_step = torch.exp2(d.e_h.min())
        return d.min_step

    def bits(self) -> torch.Tensor:
        """Hard bit-width per feature, shape ``[features]`` or ``[1]``."""
        return self.bit_widths

    def integer_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer activation codes at the chosen bits and steps."""
        return quantize_act_int(x, self.step().to(x.dtype), self.bit_widths.to(x.device), self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.integer_codes(x) * self.step().to(x.dtype)
        if not self.initialized:
            self.initialize(x)
        if x.dim() != 2:  # the surrogate works on [rows, features]
            return _ActSurrogate.apply(x.reshape(-1, x.shape[-1]), self.log2_clip, self.strength, self).reshape(x.shape)
        return _ActSurrogate.apply(x, self.log2_clip, self.strength, self)

    @torch.no_grad()
    def frozen(self) -> Pow2ActQuantizer:
        """A fixed :class:`Pow2ActQuantizer` with the chosen bits and steps (identical outputs)."""
        bits = self.bit_widths
        fixed = Pow2ActQuantizer(self.features, bits=int(bits[0]), signed=self.signed, per_feature=bits.numel() > 1)
        fixed.bit_widths.copy_(bits)
        fixed.log2_step.copy_(self.exponents())
        fixed.initialized.fill_(True)
        return fixed

    def extra_repr(self) -> str:
        return (f"features={self.features}, signed={self.signed}, "
                f"candidates={self.candidates.int().tolist()}, tau={self.tau:g}")
