"""ADQ's adaptive codebook weight quantizer (METHODS.md §2.2), on a fixed-point grid.

One codebook per layer. With ``b`` index bits the codebook has

* ``levels="symmetric"`` (default): ``2**b - 1`` levels ``{-c_K, ..., -c_1, 0, c_1, ..., c_K}``,
  ``K = 2**(b-1) - 1`` (ternary at 2 bits), one code of the ``2**b`` unused;
* ``levels="full"``: all ``2**b`` codes, ``2**(b-1)`` negative levels, zero and ``2**(b-1) - 1``
  positive levels (the extra level on the negative side, so that the signed index
  ``position - 2**(b-1)`` is a plain two's-complement b-bit number).

**Initialisation** (``init="quantile"``, METHODS §2.2(1)): the magnitudes are quantiles of the
layer's weights, ``c_k = (Q(W+, p_k) + Q(|W-|, p_k)) / 2`` with ``p_k = (k - 1/2)/K`` (one side's
quantiles per side for ``"full"``). Quantiles come from one sort (no ``torch.quantile`` size limit).
``init="uniform"`` (the ablation) puts ``c_k = k * 2*mean|w|/sqrt(Q_P)``, LSQ's initial grid.

**Assignment**: nearest level, found by ``torch.bucketize`` on the mid-points of the sorted levels
(ties go up, like round-half-up), so no ``[numel, levels]`` tensor is ever built. The forward pass
returns the assigned level with a straight-through gradient to the latent weight; by default the
codebook itself gets no gradient (METHODS §2.2).

**Learned levels (ours, ``level_grad=True``)**: the level magnitudes become parameters
(``pos_levels``, and ``neg_levels`` for ``"full"``) that the task loss trains, LSQ-style: a weight
assigned to level ``±c_j`` passes ``±dL/dw_q`` to ``c_j`` (times its row magnitude ``r_o`` with
``channel_scale``), summed over the layer and multiplied by LSQ's gradient scale
``1/sqrt(numel * Q)`` with ``Q = 2**(b-1) - 1``. The trainer's optimizer updates them (ADQ puts them
in its ``quantizers`` group: the trainer's lr, no weight decay); :meth:`CodebookWeightQuantizer.project_levels`
must follow every optimizer step (ADQ's ``after_step`` hook calls it) to keep the magnitudes sorted,
strictly increasing and positive. The EMA may run as well (after the projection): it then blends
the current, gradient-moved levels with the cell means, a pull towards the k-means centroids on top
of the gradient. A frozen codebook gets no level gradient. ``level_grad_mode="lsq"`` adds LSQ's
rounding term: LSQ's ``dw_q/ds = round(w/s) - w/s`` becomes ``dw_q/dc_k = sign(w) - w/c_k`` for a weight
within the outermost levels assigned to ``±c_k`` and ``-w/c_1`` (``c_1`` of its sign) for a weight
assigned to zero; beyond the outermost level it stays ``sign(w)`` (LSQ's clipped range). For a
ternary codebook this is exactly LSQ's step gradient with ``s = c``. The state-dict keys are the same as
without ``level_grad`` (parameters instead of buffers), so checkpoints load either way.

**Online adaptation** (:meth:`CodebookWeightQuantizer.ema_update`, METHODS §2.2(2), the VQ-VAE EMA
k-means step): per magnitude ``k`` (both signs pooled for ``"symmetric"``), ``N_k <- g N_k + (1-g) n_k``,
``M_k <- g M_k + (1-g) m_k``, ``c_k = M_k / N_k`` with ``n_k`` the number and ``m_k`` the summed
magnitude of the weights assigned to it. It runs every ``update_every`` calls, never inside
``forward`` (eval and export never change the codebook). Dead levels (``N_k < dead_count``) are
re-seeded from the current quantiles; the levels are kept sorted and strictly increasing. It does
nothing while :attr:`codebook_frozen` is set.

**Fixed point (ours)**: the levels used in the forward pass are snapped to ``C_k * s`` with one
dyadic layer scale ``s = snap_mantissa(max_k c_k / 2047)`` (16-bit mantissa) and integer codewords
``|C_k| <= 2047`` (:data:`CODEWORD_BITS` = 12 bits, signed). So ``integer_codes(w) = C[idx]`` and
``scale() = s`` follow the weight-quantizer contract of :class:`~mpqat.nn.QuantLinear` and the
integer graph stays exact. ``bits()`` is the *index* width ``b``: what each weight costs in storage.

**Per-channel scale (ours, ``channel_scale="absmean"``)**: one codebook per layer describes the
*shape* of the weight distribution, but after BatchNorm folding the output channels of a conv
can differ much in magnitude, and a shared ternary codebook then rounds whole small channels to zero. With ``"absmean"`` every output row ``o`` has a magnitude ``r_o`` (its
``mean|w|``, set at initialisation and followed by the same EMA as the levels), the codebook is
built, assigned and adapted on the normalised weights ``w / r_o``, and row ``o`` uses the levels
``C_k * S_o`` with the dyadic row scale ``S_o = snap_mantissa(r_o * s)``. The stored model is still
one b-bit index per weight and one integer codebook per layer, plus one scale per row (as for a
per-channel uniform quantizer; the N2UQ weight quantizer that ADQ replaces is per-channel too).
``"none"`` (the default) is the per-layer codebook of METHODS §2.2.

Example:
    >>> import torch
    >>> q = CodebookWeightQuantizer(out_rows=4, fan_in=8, bits=2)
    >>> w = torch.linspace(-1, 1, 32).reshape(4, 8)
    >>> q.initialize(w)
    >>> [round(v, 4) for v in q.levels().tolist()]      # quantile init: median of |w| on each side (16/31)
    [-0.5161, 0.0, 0.5161]
    >>> q(w).detach().abs().unique().numel()             # ternary weights {-c, 0, c}
    2
    >>> learned = CodebookWeightQuantizer(out_rows=4, fan_in=8, bits=2, level_grad=True)
    >>> learned.initialize(w)
    >>> learned(w).clamp(min=0).sum().backward()        # the levels get the loss's gradient, LSQ-style:
    >>> round(learned.pos_levels.grad[0].item() * (32 * 1) ** 0.5, 6)   # 12 weights at +c, scaled by 1/sqrt(32*1)
    12.0
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mpqat.errors import ConfigError
from mpqat.quant.functional import grad_scale, round_half_up, snap_mantissa

#: Signed width of the integer codewords ``C_k`` (``|C_k| <= 2**(CODEWORD_BITS-1) - 1 = 2047``).
CODEWORD_BITS = 12
CODEWORD_MAX = 2 ** (CODEWORD_BITS - 1) - 1
LEVEL_MODES = ("symmetric", "full")
INIT_MODES = ("quantile", "uniform")
CHANNEL_SCALES = ("none", "absmean")
STE_MODES = ("identity", "clipped")
LEVEL_GRAD_MODES = ("codeword", "lsq")
#: Supported index widths.
MIN_BITS, MAX_BITS = 2, 8


def check_codebook_bits(name: str, bits: int) -> None:
    """Raise :class:`ConfigError` unless ``bits`` is a supported codebook index width."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{name}={bits!r} is not supported: codebook index bits must be an integer in "
                          f"[{MIN_BITS}, {MAX_BITS}] (2 bits = ternary codebook)")


def side_sizes(bits: int, levels: str = "symmetric") -> tuple[int, int]:
    """``(negative levels, positive levels)`` of a ``bits``-bit codebook (zero not counted).

    Example:
        >>> side_sizes(3), side_sizes(3, "full")
        ((3, 3), (4, 3))
    """
    half = 2 ** (bits - 1)
    return (half - 1 if levels == "symmetric" else half), half - 1


def sorted_quantiles(sorted_values: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Quantiles of already sorted 1-D values with linear interpolation (``torch.quantile``'s default).

    Example:
        >>> sorted_quantiles(torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0])).tolist()
        [1.5, 3.0]
    """
    n = sorted_values.numel()
    pos = probs.to(torch.float64) * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo.to(torch.float64)
    v = sorted_values.to(torch.float64)
    return v[lo] + frac * (v[hi] - v[lo])


def _rank_probs(k: int) -> torch.Tensor:
    return (torch.arange(k, dtype=torch.float64) + 0.5) / k


def initial_magnitudes(weight: torch.Tensor, bits: int, levels: str = "symmetric",
                       init: str = "quantile") -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(negative, positive)`` level magnitudes (float64, ascending) of a codebook for ``weight``.

    ``init="quantile"``: quantiles ``(k - 1/2)/K`` of each sign's magnitudes (averaged over the two
    signs for ``"symmetric"``); a side without weights borrows the pooled magnitudes.
    ``init="uniform"``: ``k * 2*mean|w|/sqrt(2**(b-1) - 1)``.

    Example:
        >>> neg, pos = initial_magnitudes(torch.tensor([-3.0, -1.0, 0.0, 2.0, 4.0]), bits=2)
        >>> neg.tolist(), pos.tolist()       # (median(1, 3) + median(2, 4)) / 2
        ([2.5], [2.5])
    """
    k_neg, k_pos = side_sizes(bits, levels)
    w = weight.detach().reshape(-1).to(torch.float64)
    if init == "uniform":
        step = 2 * float(w.abs().mean()) / math.sqrt(2 ** (bits - 1) - 1)
        step = step if step > 0 else 1e-8
        return (torch.arange(1, k_neg + 1, dtype=torch.float64) * step,
                torch.arange(1, k_pos + 1, dtype=torch.float64) * step)
    if init != "quantile":
        raise ConfigError(f"init={init!r} is not supported: choose quantile or uniform")
    pooled = torch.sort(w.abs()[w != 0]).values
    if pooled.numel() == 0:
        pooled = torch.zeros(1, dtype=torch.float64)
    pos = torch.sort(w[w > 0]).values
    neg = torch.sort(-w[w < 0]).values
    pos = pos if pos.numel() else pooled
    neg = neg if neg.numel() else pooled
    if levels == "symmetric":
        p = _rank_probs(k_pos)
        mags = 0.5 * (sorted_quantiles(pos, p) + sorted_quantiles(neg, p))
        return mags.clone(), mags
    return sorted_quantiles(neg, _rank_probs(k_neg)), sorted_quantiles(pos, _rank_probs(k_pos))


def strictly_increasing(mags: torch.Tensor, rel_gap: float = 1e-6) -> torch.Tensor:
    """Ascending magnitudes, each at least ``gap`` above the previous one (and above 0).

    ``gap = rel_gap * max|c|`` (at least 1e-12). Sorted values keep their order; ties and zeros are
    pushed apart by the smallest amount that makes the sequence strictly increasing.

    Example:
        >>> strictly_increasing(torch.tensor([0.5, 0.0, 0.5]), rel_gap=0.1).tolist()
        [0.05, 0.5, 0.55]
    """
    c = torch.sort(mags.to(torch.float64)).values
    if c.numel() == 0:
        return c
    gap = max(rel_gap * float(c.abs().max()), 1e-12)
    ranks = torch.arange(1, c.numel() + 1, dtype=torch.float64)
    d = torch.cummax(c - ranks * gap, dim=0).values.clamp_min(0.0)
    return d + ranks * gap


def full_levels(neg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Sorted level vector ``[-neg descending..., 0, pos ascending...]``."""
    zero = torch.zeros(1, dtype=pos.dtype, device=pos.device)
    return torch.cat([-neg.flip(0), zero, pos])


def snap_levels(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-point codebook: integer codewords ``C`` (float64, ``|C| <= 2047``) and the dyadic scale ``s``.

    ``s = snap_mantissa(max|level| / 2047)``, ``C = clamp(round_half_up(level / s))``; the forward pass
    uses ``C * s`` (exact in float64).

    Example:
        >>> C, s = snap_levels(torch.tensor([-1.0, 0.0, 0.25, 1.0], dtype=torch.float64))
        >>> C.tolist(), bool(C[3] * s == 2047 * s)
        ([-2047.0, 0.0, 512.0, 2047.0], True)
    """
    top = levels.detach().to(torch.float64).abs().max().clamp_min(1e-30)
    s = snap_mantissa(top / CODEWORD_MAX)
    codes = torch.clamp(round_half_up(levels.detach().to(torch.float64) / s), -CODEWORD_MAX, CODEWORD_MAX)
    return codes, s


def assign(weight: torch.Tensor, codes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level ``codes[i] * s`` for every weight (ties to the upper level), float64 compare.

    ``torch.bucketize`` on the mid-points: memory ``O(numel + levels)``.

    Example:
        >>> assign(torch.tensor([-0.9, 0.2, 0.25, 0.6]), torch.tensor([-1.0, 0.0, 1.0]), torch.tensor(0.5)).tolist()
        [0, 1, 2, 2]
    """
    mids = (codes[:-1] + codes[1:]) * (s.to(torch.float64) / 2)  # integers times a dyadic: exact
    return torch.bucketize(weight.detach().to(torch.float64), mids, right=True)


def row_absmean(weight: torch.Tensor) -> torch.Tensor:
    """``mean|w|`` of every output row (first dimension), float64 ``[rows]``; an all-zero row gets 1.

    Example:
        >>> row_absmean(torch.tensor([[1.0, -3.0], [0.0, 0.0]])).tolist()
        [2.0, 1.0]
    """
    mean = weight.detach().reshape(weight.shape[0], -1).to(torch.float64).abs().mean(dim=1)
    return torch.where(mean > 0, mean, torch.ones_like(mean))


def row_scales(row_scale: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Dyadic per-row scales ``S_o = snap_mantissa(r_o * s)`` as ``[rows, 1]`` (float64)."""
    return snap_mantissa(row_scale.to(torch.float64).reshape(-1, 1) * s.to(torch.float64))


def assign_rows(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level ``codes[i] * scales[o]`` for every weight of row ``o`` (ties up).

    ``weight`` has its rows first (any trailing shape); ``scales`` is ``[rows, 1]``. Compares the
    row-normalised weights with the codewords' integer mid-points (float64), memory ``O(numel)``.

    Example:
        >>> assign_rows(torch.tensor([[0.2, 0.6], [2.0, 6.0]]), torch.tensor([-1.0, 0.0, 1.0]),
        ...             torch.tensor([[1.0], [10.0]])).tolist()
        [[1, 2], [1, 2]]
    """
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1) / scales
    mids = (codes[:-1] + codes[1:]) / 2
    return torch.bucketize(w, mids, right=True).reshape(weight.shape)


def codebook_fake_quant(weight: torch.Tensor, bits: int, levels: str = "symmetric",
                        init: str = "quantile", channel_scale: str = "none") -> torch.Tensor:
    """``weight`` quantized by a freshly initialised codebook at ``bits`` (for sensitivity analysis).

    ``channel_scale="absmean"``: the codebook of the row-normalised weights, each row at its own
    scale (see the module docstring).

    Example:
        >>> w = torch.tensor([[-1.0, -0.2, 0.1, 0.9]])
        >>> codebook_fake_quant(w, 2).abs().unique().numel()     # ternary: {0, c}
        2
    """
    if channel_scale == "none":
        neg, pos = initial_magnitudes(weight, bits, levels, init)
        table = full_levels(strictly_increasing(neg), strictly_increasing(pos))
        codes, s = snap_levels(table)
        idx = assign(weight, codes, s)
        return (codes[idx] * s).to(weight.dtype).reshape(weight.shape)
    if channel_scale not in CHANNEL_SCALES:
        raise ConfigError(f"channel_scale={channel_scale!r} is not supported: choose {' or '.join(CHANNEL_SCALES)}")
    rows = weight.shape[0]
    r = row_absmean(weight)
    normalised = weight.detach().to(torch.float64).reshape(rows, -1) / r.reshape(-1, 1)
    neg, pos = initial_magnitudes(normalised, bits, levels, init)
    codes, s = snap_levels(full_levels(strictly_increasing(neg), strictly_increasing(pos)))
    scales = row_scales(r, s)
    idx = assign_rows(weight, codes, scales)
    return (codes[idx].reshape(rows, -1) * scales).to(weight.dtype).reshape(weight.shape)


class CodebookWeightQuantizer(nn.Module):
    """Per-layer codebook weight quantizer with quantile init, EMA adaptation and a fixed-point grid.

    ``max_bits`` sizes the buffers, so that :meth:`set_bits` can change the width (up to it) without
    changing the ``state_dict`` shapes. ``dead_count``: a level whose EMA count falls below it is dead.
    ``channel_scale``: ``"none"`` (one scale per layer) or ``"absmean"`` (one per output row).
    ``ste``: ``"identity"`` (every latent weight gets its gradient) or ``"clipped"`` (none beyond
    half a gap outside the outermost levels, the range where LSQ's straight-through estimator stops).
    ``level_grad``: the level magnitudes are parameters trained by the task loss (see the module
    docstring); call :meth:`project_levels` after every optimizer step. ``level_grad_mode``:
    ``"codeword"`` (each level gets the summed gradient of its weights) or ``"lsq"`` (plus LSQ's
    rounding term).
    """

    def __init__(self, out_rows: int, fan_in: int, bits: int, levels: str = "symmetric", decay: float = 0.99,
                 update_every: int = 1, reseed: bool = True, init: str = "quantile", max_bits: int | None = None,
                 dead_count: float = 0.5, channel_scale: str = "none", ste: str = "identity",
                 level_grad: bool = False, level_grad_mode: str = "codeword") -> None:
        super().__init__()
        check_codebook_bits("bits", bits)
        max_bits = bits if max_bits is None else max_bits
        check_codebook_bits("max_bits", max_bits)
        if bits > max_bits:
            raise ConfigError(f"bits={bits} exceeds max_bits={max_bits}")
        if levels not in LEVEL_MODES:
            raise ConfigError(f"levels={levels!r} is not supported: choose symmetric or full")
        if init not in INIT_MODES:
            raise ConfigError(f"init={init!r} is not supported: choose quantile or uniform")
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay={decay!r} must be in [0, 1)")
        if channel_scale not in CHANNEL_SCALES:
            raise ConfigError(f"channel_scale={channel_scale!r} is not supported: choose {' or '.join(CHANNEL_SCALES)}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"update_every={update_every!r} must be an integer >= 1")
        if ste not in STE_MODES:
            raise ConfigError(f"ste={ste!r} is not supported: choose {' or '.join(STE_MODES)}")
        if not isinstance(level_grad, bool):
            raise ConfigError(f"level_grad={level_grad!r} must be true or false")
        if level_grad_mode not in LEVEL_GRAD_MODES:
            raise ConfigError(f"level_grad_mode={level_grad_mode!r} is not supported: choose {' or '.join(LEVEL_GRAD_MODES)}")
        self.ste = ste
        self.level_grad = level_grad
        self.level_grad_mode = level_grad_mode
        self.out_rows, self.fan_in = out_rows, fan_in
        self.level_mode, self.init_mode = levels, init
        self.decay, self.update_every, self.reseed, self.dead_count = float(decay), update_every, bool(reseed), dead_count
        self.max_bits = max_bits
        self.channel_scale = channel_scale
        # one scale per layer, or per row with channel_scale (mpqat.cost counts 32 bits per scale)
        self.per_neuron = channel_scale != "none"
        size = 2 ** (max_bits - 1)
        self.register_buffer("bit_widths", torch.full((1, 1), float(bits)))
        for side in ("pos", "neg"):
            if self._learned_side(side):  # same state-dict key as the buffer it replaces
                self.register_parameter(f"{side}_levels", nn.Parameter(torch.zeros(size, dtype=torch.float64)))
            else:
                self.register_buffer(f"{side}_levels", torch.zeros(size, dtype=torch.float64))
            self.register_buffer(f"{side}_count", torch.zeros(size, dtype=torch.float64))
            self.register_buffer(f"{side}_sum", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("init_levels", torch.zeros(2 * size, dtype=torch.float64))
        # r_o of channel_scale="absmean" (ones otherwise)
        self.register_buffer("row_scale", torch.ones(out_rows, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("reseeds", torch.zeros((), dtype=torch.int64))
        self.register_buffer("codebook_frozen", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))

    def _learned_side(self, side: str) -> bool:
        """True when ``{side}_levels`` is a parameter: ``pos`` with ``level_grad``, ``neg`` too for ``"full"``
        (a symmetric codebook's negative side mirrors the positive one)."""
        return self.level_grad and (side == "pos" or self.level_mode == "full")

    # ------------------------------------------------------------------ widths and levels

    @property
    def index_bits(self) -> int:
        """The index width ``b`` (an int)."""
        return int(self.bit_widths.flatten()[0])

    def sizes(self) -> tuple[int, int]:
        """``(negative, positive)`` level counts at the current width."""
        return side_sizes(self.index_bits, self.level_mode)

    def n_levels(self) -> int:
        """Number of levels, zero included."""
        k_neg, k_pos = self.sizes()
        return k_neg + k_pos + 1

    def index_offset(self) -> int:
        """Position of the zero level; ``index - offset`` is the signed b-bit index stored by the export."""
        return self.sizes()[0]

    def magnitudes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current ``(negative, positive)`` magnitudes (float64, ascending, unsnapped, no gradient)."""
        k_neg, k_pos = self.sizes()
        return self.neg_levels[:k_neg].detach(), self.pos_levels[:k_pos].detach()

    def levels(self) -> torch.Tensor:
        """The sorted float levels (unsnapped, float64), zero included."""
        return full_levels(*self.magnitudes())

    def _table(self) -> tuple[torch.Tensor, torch.Tensor]:
        return snap_levels(self.levels())

    def codebook_int(self) -> torch.Tensor:
        """Integer codewords ``C`` (int64, sorted), ``C[offset] == 0``."""
        return self._table()[0].to(torch.int64)

    def _scales(self, s: torch.Tensor) -> torch.Tensor:
        """The dyadic scale of every row given the codebook scale ``s``: ``[1, 1]`` or ``[rows, 1]``."""
        if self.channel_scale == "none":
            return s.reshape(1, 1)
        return row_scales(self.row_scale, s)

    def scale(self) -> torch.Tensor:
        """The dyadic layer scale ``s`` as ``[1, 1]``, or the row scales ``S_o`` as ``[rows, 1]``
        with ``channel_scale`` (float64, exact)."""
        return self._scales(self._table()[1])

    def normalised(self, weight: torch.Tensor) -> torch.Tensor:
        """The weights in the codebook's own units (float64, rows first): ``w`` itself, or ``w * s / S_o``
        with ``channel_scale`` (so that the nearest level of this value is the assigned one)."""
        w = weight.detach().to(torch.float64)
        if self.channel_scale == "none":
            return w
        codes, s = self._table()
        rows = w.shape[0]
        return (w.reshape(rows, -1) * (s / self._scales(s))).reshape(w.shape)

    def bits(self) -> torch.Tensor:
        """Index bits per layer, shape ``[1]`` (the storage cost of one weight)."""
        return self.bit_widths.reshape(-1)

    def expected_bits(self) -> torch.Tensor:
        """Same as :meth:`bits` (fixed width)."""
        return self.bits()

    def extra_metadata_bits(self) -> int:
        """Storage of the codebook itself: one :data:`CODEWORD_BITS`-bit codeword per level."""
        return self.n_levels() * CODEWORD_BITS

    # ------------------------------------------------------------------ quantization

    def _assign(self, weight: torch.Tensor, codes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.channel_scale == "none":
            return assign(weight, codes, s)
        return assign_rows(weight, codes, self._scales(s))

    def indices(self, weight: torch.Tensor) -> torch.Tensor:
        """Level index (0 .. n_levels-1) of every weight, same shape (nearest level, float64 compare).
        With ``channel_scale`` the weight's first dimension is its output row."""
        codes, s = self._table()
        return self._assign(weight, codes, s)

    def integer_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codewords ``C[idx]`` of the weights (float-valued, no gradient)."""
        codes, s = self._table()
        return codes[self._assign(weight, codes, s)].to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.initialize(weight)
        codes, s = self._table()
        idx = self._assign(weight, codes, s)
        if self.channel_scale == "none":
            w_q = (codes[idx] * s).to(weight.dtype)
        else:
            rows = weight.shape[0]
            w_q = (codes[idx].reshape(rows, -1) * self._scales(s)).to(weight.dtype).reshape(weight.shape)
        if self.ste == "clipped" and codes.numel() > 1:
            inside = self._in_range(weight, codes, s)
            out = weight * inside + (w_q - weight * inside).detach()
        else:
            out = weight + (w_q - weight).detach()
        if self.level_grad and torch.is_grad_enabled() and not bool(self.codebook_frozen):
            out = out + self._level_term(weight, idx)  # zero in value: only adds the levels' gradient
        return out

    def level_grad_scale(self) -> float:
        """LSQ's gradient scale of the levels, ``1/sqrt(numel * Q)`` with ``Q = 2**(b-1) - 1`` (``numel``:
        the weights sharing the codebook)."""
        q = max(2 ** (self.index_bits - 1) - 1, 1)
        return 1.0 / math.sqrt(self.out_rows * self.fan_in * q)

    def _level_term(self, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``v - v.detach()`` with ``v`` the assigned level of every weight (in weight units): zero, with
        ``d/dc_j = sum over the weights at +-c_j of +-r_o * dL/dw_q``, scaled by :meth:`level_grad_scale`."""
        k_neg, k_pos = self.sizes()
        pos = self.pos_levels[:k_pos]
        neg = self.neg_levels[:k_neg] if self.level_mode == "full" else pos
        table = grad_scale(full_levels(neg, pos), self.level_grad_scale())
        picked = table[idx]
        if self.level_grad_mode == "lsq":  # LSQ's -w/s term: -w/c of the weight's own level (c_1 of its sign at 0)
            w_n = self._row_normalised(weight.detach()).to(torch.float64)
            off = self.index_offset()
            own = torch.where(idx == off, torch.where(w_n >= 0, off + 1, off - 1), idx)
            outside = (w_n > table[-1].detach()) | (w_n < table[0].detach())
            own_level = table[own]
            extra = -w_n * (own_level / own_level.detach())
            picked = picked + torch.where(outside, torch.zeros_like(extra), extra)
        if self.channel_scale != "none":
            rows = weight.shape[0]
            picked = (picked.reshape(rows, -1) * self.row_scale.reshape(-1, 1)).reshape(weight.shape)
        return (picked - picked.detach()).to(weight.dtype)

    def _in_range(self, weight: torch.Tensor, codes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """1 where a weight lies within half a gap of the outermost levels (the clipped STE's mask), else 0."""
        lo = (codes[0] - (codes[1] - codes[0]) / 2).item()
        hi = (codes[-1] + (codes[-1] - codes[-2]) / 2).item()
        rows = weight.shape[0]
        u = (weight.detach().to(torch.float64).reshape(rows, -1) / self._scales(s)).reshape(weight.shape)
        return ((u >= lo) & (u <= hi)).to(weight.dtype)

    # ------------------------------------------------------------------ state changes

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Change the index width (up to ``max_bits``); the codebook must be initialised again."""
        check_codebook_bits("bits", bits)
        if bits > self.max_bits:
            raise ConfigError(f"bits={bits} exceeds this quantizer's max_bits={self.max_bits}")
        self.bit_widths.fill_(float(bits))
        self.initialized.fill_(False)

    @torch.no_grad()
    def set_magnitudes(self, neg: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Set the level magnitudes (sorted and made strictly increasing); EMA statistics restart from
        the counts of ``weight`` (or zero)."""
        k_neg, k_pos = self.sizes()
        neg, pos = torch.as_tensor(neg, dtype=torch.float64), torch.as_tensor(pos, dtype=torch.float64)
        if neg.shape != (k_neg,) or pos.shape != (k_pos,):
            raise ValueError(f"need {k_neg} negative and {k_pos} positive magnitudes, got {tuple(neg.shape)} and {tuple(pos.shape)}")
        if self.level_mode == "symmetric":
            pos = strictly_increasing(pos)
            neg = pos.clone()
        else:
            neg, pos = strictly_increasing(neg), strictly_increasing(pos)
        for name in ("levels", "count", "sum"):
            getattr(self, f"neg_{name}").zero_()
            getattr(self, f"pos_{name}").zero_()
        self.neg_levels[:k_neg] = neg
        self.pos_levels[:k_pos] = pos
        if weight is not None:
            for side, (n, m) in self._assignment_stats(weight).items():
                k = n.numel()
                getattr(self, f"{side}_count")[:k] = n
                getattr(self, f"{side}_sum")[:k] = n * getattr(self, f"{side}_levels")[:k]
        lv = self.levels()
        self.init_levels.zero_()
        self.init_levels[: lv.numel()] = lv
        self.initialized.fill_(True)

    def _row_normalised(self, weight: torch.Tensor) -> torch.Tensor:
        """``w / r_o`` (float64, rows first) with ``channel_scale``, else ``weight`` itself."""
        if self.channel_scale == "none":
            return weight
        w = weight.detach().to(torch.float64)
        return (w.reshape(w.shape[0], -1) / self.row_scale.reshape(-1, 1)).reshape(w.shape)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """(Re)initialise the codebook (and the row magnitudes) from ``weight`` (quantile or uniform
        init, as configured)."""
        if self.channel_scale != "none":
            self.row_scale.copy_(row_absmean(weight))
        neg, pos = initial_magnitudes(self._row_normalised(weight), self.index_bits, self.level_mode, self.init_mode)
        self.set_magnitudes(neg, pos, weight)
        self.steps.zero_()
        self.reseeds.zero_()

    def _assignment_stats(self, weight: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per side: ``(n_k, m_k)`` = number and summed magnitude of the weights assigned to magnitude k.

        ``"symmetric"`` pools both signs into the ``pos`` side.
        """
        rel = (self.indices(weight) - self.index_offset()).reshape(-1)
        w = self.normalised(weight).reshape(-1)
        k_neg, k_pos = self.sizes()
        mag = w.abs()

        def stats(ranks: torch.Tensor, values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
            n = torch.bincount(ranks, minlength=k + 1)[1 : k + 1].to(torch.float64)
            m = torch.zeros(k + 1, dtype=torch.float64).index_add_(0, ranks, values)[1 : k + 1]
            return n, m

        if self.level_mode == "symmetric":
            return {"pos": stats(rel.abs(), mag, k_pos)}
        pos, neg = rel > 0, rel < 0
        return {"pos": stats(rel[pos], mag[pos], k_pos), "neg": stats(-rel[neg], mag[neg], k_neg)}

    @torch.no_grad()
    def ema_update(self, weight: torch.Tensor) -> bool:
        """One EMA k-means step of the codebook towards ``weight`` (every ``update_every`` calls).

        Returns True when the codebook was updated. Does nothing before initialisation or while frozen.
        """
        if not bool(self.initialized) or bool(self.codebook_frozen):
            return False
        self.steps += 1
        if int(self.steps) % self.update_every:
            return False
        g = self.decay
        if self.channel_scale != "none":  # the row magnitudes follow the weights like the levels do
            self.row_scale.mul_(g).add_((1 - g) * row_absmean(weight))
        fresh: tuple[torch.Tensor, torch.Tensor] | None = None
        for side, (n, m) in self._assignment_stats(weight).items():
            k = n.numel()
            count, total, lv = (getattr(self, f"{side}_{x}")[:k] for x in ("count", "sum", "levels"))
            if self.level_grad:  # the gradient moved the levels since the last update: blend from there
                total.copy_(lv * count)
            count.mul_(g).add_((1 - g) * n)
            total.mul_(g).add_((1 - g) * m)
            alive = count > 1e-12
            c = torch.where(alive, total / count.clamp_min(1e-300), lv)
            dead = count < self.dead_count
            if self.reseed and bool(dead.any()):
                if fresh is None:
                    fresh = initial_magnitudes(self._row_normalised(weight), self.index_bits, self.level_mode, "quantile")
                q = fresh[1] if side == "pos" else fresh[0]
                c = torch.where(dead, q, c)
                count[dead] = 1.0
                self.reseeds += int(dead.sum())
            order = torch.argsort(c)
            c = strictly_increasing(c[order])
            count.copy_(count[order].clone())
            total.copy_(c * count)
            lv.copy_(c)
        if self.level_mode == "symmetric":
            k = self.sizes()[1]
            self.neg_levels[:k] = self.pos_levels[:k]
            self.neg_count[:k] = self.pos_count[:k]
            self.neg_sum[:k] = self.pos_sum[:k]
        return True

    @torch.no_grad()
    def project_levels(self) -> bool:
        """After an optimizer step on learned levels: sort the magnitudes and keep them strictly
        increasing and positive (as :func:`strictly_increasing`), mirror a symmetric codebook's negative
        side. Levels that already are valid are left untouched (bit for bit). Returns True when it changed
        something; does nothing without ``level_grad`` or before initialisation.

        Example:
            >>> q = CodebookWeightQuantizer(1, 4, 3, level_grad=True)
            >>> q.set_magnitudes(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]))
            >>> with torch.no_grad():
            ...     q.pos_levels[:3] = torch.tensor([2.5, 1.0, 3.0], dtype=torch.float64)   # an optimizer step
            >>> q.project_levels(), q.levels().tolist()
            (True, [-3.0, -2.5, -1.0, 0.0, 1.0, 2.5, 3.0])
        """
        if not self.level_grad or not bool(self.initialized):
            return False
        changed = False
        for side, k in zip(("neg", "pos"), self.sizes(), strict=True):
            if not self._learned_side(side) or k == 0:
                continue
            lv = getattr(self, f"{side}_levels")[:k]
            if bool((lv[0] > 0) & (lv[1:] > lv[:-1]).all()):
                continue
            order = torch.argsort(lv.detach())
            count, total = (getattr(self, f"{side}_{x}")[:k] for x in ("count", "sum"))
            count.copy_(count[order].clone())
            total.copy_(total[order].clone())
            lv.copy_(strictly_increasing(lv.detach()[order]))
            changed = True
        if self.level_mode == "symmetric":
            k = self.sizes()[1]
            self.neg_levels[:k] = self.pos_levels[:k]
            self.neg_count[:k] = self.pos_count[:k]
            self.neg_sum[:k] = self.pos_sum[:k]
        return changed

    @torch.no_grad()
    def freeze_codebook(self, frozen: bool = True) -> None:
        """Stop (or restart) the EMA adaptation."""
        self.codebook_frozen.fill_(bool(frozen))

    def drift(self) -> float:
        """Relative change of the level vector since initialisation, ``||L - L0|| / ||L0||``."""
        lv = self.levels()
        ref = self.init_levels[: lv.numel()]
        norm = float(ref.norm())
        return float((lv - ref).norm()) / norm if norm > 0 else 0.0

    def extra_repr(self) -> str:
        return (f"bits={self.index_bits}, levels={self.level_mode}, init={self.init_mode}, decay={self.decay}, "
                f"update_every={self.update_every}, reseed={self.reseed}, channel_scale={self.channel_scale}, ste={self.ste}"
                + (f", level_grad=True, level_grad_mode={self.level_grad_mode}" if self.level_grad else ""))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # checkpoints written before row_scale existed: per-layer codebooks, every row magnitude 1
        state_dict.setdefault(prefix + "row_scale", torch.ones_like(self.row_scale))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
