"""Radio modulation classification frames (RadioML-like), generated with NVIDIA Sionna PHY.

Every frame is ``frame_length`` complex baseband samples (default 128) of one digitally
modulated signal; the task is to name its modulation. Three difficulty tiers share the whole
transmitter and receiver chain and differ only in the propagation channel:

========  ===================================================================================
tier      channel (Sionna PHY 2.2, ``sionna-no-rt``)
========  ===================================================================================
awgn      none: additive white Gaussian noise only
rayleigh  flat Rayleigh block fading, one CN(0, 1) gain per frame (``RayleighBlockFading``)
tdla      3GPP TR 38.901 TDL-A (``tr38901.TDL``), RMS delay spread 100 ns (about 3 samples,
          0.8 symbol; taps up to 0.97 us = 30 samples), UE speed uniform in 0..30 m/s at
          3.5 GHz (maximum Doppler up to 350 Hz), sinc-sampled taps (``cir_to_time_channel``)
========  ===================================================================================

The chain, per frame (all tiers):

1. symbols: uniformly random points of the frame's constellation (Sionna ``Constellation``:
   ``"pam"`` for BPSK/4PAM/8PAM, ``"qam"`` for QPSK/16QAM/64QAM, ``"custom"`` unit-circle points
   for 8PSK/16PSK), unit average energy;
2. pulse shaping: Sionna ``Upsampling`` by ``samples_per_symbol`` (default 4) and a
   root-raised-cosine filter (``RootRaisedCosineFilter``, roll-off 0.35, span 8 symbols); the
   burst is scaled to unit average power over the frame's window;
3. channel (the tier), with unit average power gain; the fading tiers rotate every frame by a
   random phase (the phase of the channel gain), AWGN leaves it coherent;
4. optional receiver impairments, off by default: a uniformly random carrier phase
   (``random_phase=True``) and a carrier frequency offset uniform in +-``cfo_ppm`` of the
   carrier (1 ppm of 3.5 GHz = 3.5 kHz = 0.00011 cycles per sample at 30.72 MHz);
5. noise: complex AWGN (Sionna ``AWGN``) of power ``10**(-snr_db/10)`` per complex sample at
   the receiver input, i.e. ``snr_db`` is the average signal-to-noise ratio per sample
   (Es/N0 = snr_db + 10 log10(sps)); under fading it is the SNR averaged over the fading;
6. receiver: the matched root-raised-cosine filter, then a window of ``frame_length`` samples
   that starts at a uniformly random one of the ``samples_per_symbol`` sample phases (unknown
   symbol timing), then automatic gain control: the frame is scaled to unit RMS (so the level
   does not give the SNR away). Stored as I and Q rows (``features="iq"``, shape ``(2, L)``),
   amplitude and phase/pi (``"ap"``) or all four (``"iqap"``, shape ``(4, L)``).

SNRs run over ``snr_db = (start, stop, step)`` (default -10..20 dB in steps of 2: 16 values);
every (class, SNR) pair gets exactly ``frames_per_snr = (train, valid, test)`` frames
(default 200/50/50), so the classes and SNRs are balanced in every split, and every frame keeps
its SNR as a side label (``snr_train`` ... in :class:`RadioData`) for accuracy-vs-SNR curves.
Default size per tier: 8 classes x 16 SNRs x 300 = 38,400 frames, 39 MB of float32.

Determinism: every random draw comes from generators seeded from ``numpy.random.SeedSequence(
[seed, tier, split])`` (our torch generator for symbols and impairments, Sionna's CPU
generator for the channel and noise), the computation runs in float64 on one CPU thread with
a fixed chunk size, and :func:`save_radio` writes a zip with fixed timestamps: the same
config gives the same bytes. Train, valid and test have independent streams, so changing the
number of training frames leaves the test frames unchanged.

What is Sionna's and what is ours: constellations, upsampling, RRC filter, Rayleigh and TDL
channel models (path coefficients by sum of sinusoids), sinc tap sampling and AWGN are
Sionna's. The frame layout, tiers, impairments (phase, CFO, timing), power normalisation,
matched-filter receiver, AGC, splits and file format are ours. To keep TDL fast, its path
coefficients are computed every 16 samples and linearly interpolated in between (at <= 350 Hz
Doppler the channel turns by about 0.01 rad over a 4.2 us frame; the interpolated output differs
from Sionna's full-resolution channel by about 2e-8 relative, 1e-6 at 10x the Doppler).

Example::

    >>> from mpqat.data.radio import RadioConfig, generate_radio
    >>> data = generate_radio(RadioConfig(tier="awgn", frames_per_snr=(10, 2, 2)))
    >>> data.X["train"].shape, data.class_names[:3]
    ((1280, 2, 128), ['BPSK', 'QPSK', '8PSK'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mpqat.data.splits import SPLIT_NAMES, TabularSplits
from mpqat.errors import DatasetError

#: Install command printed when Sionna is missing (its own requirements would pull another torch).
SIONNA_INSTALL = "pip install --no-deps sionna-no-rt==2.2.0 importlib-resources==7.1.0"

#: name -> (Sionna constellation type, bits per symbol); "psk" is a Sionna "custom" constellation.
MODULATIONS: dict[str, tuple[str, int]] = {
    "BPSK": ("pam", 1),
    "QPSK": ("qam", 2),
    "8PSK": ("psk", 3),
    "16PSK": ("psk", 4),
    "4PAM": ("pam", 2),
    "8PAM": ("pam", 3),
    "16QAM": ("qam", 4),
    "64QAM": ("qam", 6),
}
DEFAULT_CLASSES: tuple[str, ...] = tuple(MODULATIONS)

#: tier -> one-line description (the channel).
TIERS: dict[str, str] = {
    "awgn": "AWGN only",
    "rayleigh": "flat Rayleigh block fading (one CN(0,1) gain per frame) + AWGN",
    "tdla": "3GPP TR 38.901 TDL-A, 100 ns RMS delay spread, 0..30 m/s at 3.5 GHz + AWGN",
}
FEATURES = ("iq", "ap", "iqap")
SPLITS = SPLIT_NAMES
_CHUNK = 512  # frames per batch; part of the algorithm (the random streams depend on it)
_TDL_STEP = 16  # TDL path coefficients are evaluated every this many samples, then interpolated


@dataclass(frozen=True)
class RadioConfig:
    """Everything that defines a generated radio dataset (the cache file records it).

    Example::

        >>> cfg = RadioConfig(tier="tdla", snr_db=(-4, 20, 4), frames_per_snr=(100, 20, 20))
        >>> cfg.snr_values().tolist()
        [-4.0, 0.0, 4.0, 8.0, 12.0, 16.0, 20.0]
    """

    tier: str = "awgn"
    classes: tuple[str, ...] = DEFAULT_CLASSES
    snr_db: tuple[float, float, float] = (-10.0, 20.0, 2.0)  # start, stop (inclusive), step
    frames_per_snr: tuple[int, int, int] = (200, 50, 50)  # per (class, SNR): train, valid, test
    frame_length: int = 128
    samples_per_symbol: int = 4
    rolloff: float = 0.35
    filter_span: int = 8  # RRC span in symbols
    sample_rate: float = 30.72e6
    carrier_frequency: float = 3.5e9
    random_phase: bool = False  # a uniformly random carrier phase per frame (unknown to the receiver)
    cfo_ppm: float = 0.0  # carrier frequency offset, uniform in +-cfo_ppm of the carrier
    delay_spread: float = 100e-9  # TDL-A RMS delay spread [s]
    max_speed: float = 30.0  # TDL: UE speed uniform in [0, max_speed] m/s
    features: str = "iq"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "snr_db", tuple(float(s) for s in self.snr_db))
        object.__setattr__(self, "frames_per_snr", tuple(int(n) for n in self.frames_per_snr))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`DatasetError` naming the bad field and what is allowed."""
        if self.tier not in TIERS:
            raise DatasetError(f"unknown radio tier '{self.tier}': use one of {', '.join(TIERS)}")
        unknown = [c for c in self.classes if c not in MODULATIONS]
        if unknown or len(set(self.classes)) < 2 or len(set(self.classes)) != len(self.classes):
            raise DatasetError(
                f"classes must be at least two distinct names among {', '.join(MODULATIONS)}, "
                f"got {list(self.classes)}"
            )
        if len(self.snr_db) != 3 or self.snr_db[2] <= 0 or self.snr_db[1] < self.snr_db[0]:
            raise DatasetError(
                f"snr_db must be (start, stop, step) with stop >= start and step > 0, got "
                f"{self.snr_db}: e.g. (-10, 20, 2)"
            )
        if len(self.frames_per_snr) != 3 or min(self.frames_per_snr) < 1:
            raise DatasetError(
                f"frames_per_snr must be three positive counts (train, valid, test), got "
                f"{self.frames_per_snr}"
            )
        checks = {
            "frame_length": self.frame_length >= 8,
            "samples_per_symbol": 1 <= self.samples_per_symbol <= 64,
            "rolloff": 0.0 <= self.rolloff <= 1.0,
            "filter_span": 1 <= self.filter_span <= 64,
            "sample_rate": self.sample_rate > 0,
            "carrier_frequency": self.carrier_frequency > 0,
            "random_phase": isinstance(self.random_phase, bool),
            "cfo_ppm": 0.0 <= self.cfo_ppm <= 1000.0,
            "delay_spread": 0.0 < self.delay_spread <= 10e-6,
            "max_speed": 0.0 <= self.max_speed <= 1000.0,
            "features": self.features in FEATURES,
            "seed": isinstance(self.seed, int) and 0 <= self.seed < 2**32,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise DatasetError(
                f"invalid radio setting(s) {', '.join(f'{b}={getattr(self, b)!r}' for b in bad)}: "
                "see RadioConfig in mpqat/data/radio.py for the allowed ranges"
            )

    def snr_values(self) -> np.ndarray:
        """The SNR grid in dB (float64), from start to stop inclusive."""
        start, stop, step = self.snr_db
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        return np.round(start + step * np.arange(count), 6)

    @property
    def n_channels(self) -> int:
        """Rows per frame: 2 for ``"iq"``/``"ap"``, 4 for ``"iqap"``."""
        return 4 if self.features == "iqap" else 2

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(channels, frame_length)``: how the flat feature vector unflattens."""
        return (self.n_channels, self.frame_length)

    def n_frames(self, split: str) -> int:
        """Frames in ``split``: classes x SNRs x frames per (class, SNR)."""
        per = self.frames_per_snr[SPLITS.index(split)]
        return len(self.classes) * len(self.snr_values()) * per

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RadioConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`DatasetError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise DatasetError(f"unknown radio setting(s) {unknown}: known are {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(eq=False)
class RadioData:
    """Generated frames: ``X[split]`` float32 ``[n, channels, L]``, ``y[split]`` int64 labels,
    ``snr[split]`` float32 SNR in dB of each frame (a side label, not a feature)."""

    config: RadioConfig
    X: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    snr: dict[str, np.ndarray]
    class_names: list[str] = field(default_factory=list)
    generation_seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        """JSON-ready sizes and class/SNR balance per split."""
        out: dict[str, Any] = {"config": self.config.to_dict(), "class_names": self.class_names}
        for split in SPLITS:
            out[split] = {
                "n_frames": int(len(self.y[split])),
                "class_counts": np.bincount(self.y[split], minlength=len(self.class_names)).tolist(),
                "snr_counts": {f"{s:g}": int(n) for s, n in zip(*np.unique(self.snr[split], return_counts=True))},
            }
        return out


# --------------------------------------------------------------------------------------------
# Sionna access


def import_sionna() -> Any:
    """Import Sionna PHY or raise :class:`DatasetError` naming the install command."""
    try:
        import sionna.phy as sionna_phy  # noqa: F401  (registers the subpackages)
        from sionna.phy import channel, config, mapping, signal
        from sionna.phy.channel import tr38901
    except ImportError as exc:
        raise DatasetError(
            f"the radio datasets are generated with NVIDIA Sionna, which is not installed ({exc}): "
            f"run '{SIONNA_INSTALL}' (--no-deps keeps your torch; or 'make setup')"
        ) from None
    return SimpleNamespace(channel=channel, config=config, mapping=mapping, signal=signal, tr38901=tr38901)


def constellation_points(name: str, sionna: Any | None = None) -> torch.Tensor:
    """Unit-energy points (complex128) of modulation ``name`` from a Sionna constellation.

    Example::

        >>> round(constellation_points("QPSK").abs().square().mean().item(), 12)
        1.0
    """
    if name not in MODULATIONS:
        raise DatasetError(f"unknown modulation '{name}': use one of {', '.join(MODULATIONS)}")
    sn = sionna or import_sionna()
    kind, bits = MODULATIONS[name]
    if kind == "psk":
        m = 2**bits
        pts = np.exp(1j * (2 * np.pi * np.arange(m) / m + np.pi / m))
        const = sn.mapping.Constellation("custom", bits, points=pts, normalize=True,
                                         precision="double", device="cpu")
    else:
        const = sn.mapping.Constellation(kind, bits, precision="double", device="cpu")
    return const().detach().to(torch.complex128)


# --------------------------------------------------------------------------------------------
# Frame synthesis


@dataclass
class Frames:
    """One batch of synthesised frames (complex128, ``[n, L]``).

    ``received`` is what is stored (after noise, matched filter and AGC); ``clean`` and
    ``noisy`` are the same window at the receiver input, before and after the noise
    (``noisy - clean`` is the noise that was added: tests measure its power).
    """

    received: torch.Tensor
    clean: torch.Tensor
    noisy: torch.Tensor


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """One torch thread (reductions then sum in a fixed order) for byte-identical output."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _sionna_seeded(sn: Any, seed: int) -> Iterator[None]:
    """Seed Sionna's CPU generator (used by its channels and AWGN); restore it afterwards."""
    gen = sn.config.torch_rng("cpu")
    state = gen.get_state()
    gen.manual_seed(int(seed))
    try:
        yield
    finally:
        gen.set_state(state)


class _Synthesiser:
    """The transmitter, channel and receiver chain of one config (see the module docstring)."""

    def __init__(self, config: RadioConfig, sionna: Any):
        self.cfg = config
        self.sn = sionna
        sps = config.samples_per_symbol
        points = [constellation_points(c, sionna) for c in config.classes]
        width = max(len(p) for p in points)
        self.table = torch.zeros(len(points), width, dtype=torch.complex128)
        for k, p in enumerate(points):
            self.table[k, : len(p)] = p
        self.sizes = torch.tensor([len(p) for p in points], dtype=torch.float64)
        self.upsample = sionna.signal.Upsampling(sps, precision="double", device="cpu")
        self.rrc = sionna.signal.RootRaisedCosineFilter(
            config.filter_span, sps, config.rolloff, precision="double", device="cpu"
        )
        self.awgn = sionna.channel.AWGN(precision="double", device="cpu")
        self.l_min, self.l_max = 0, 0
        if config.tier == "rayleigh":
            self.rayleigh = sionna.channel.RayleighBlockFading(1, 1, 1, 1, precision="double", device="cpu")
        if config.tier == "tdla":
            self.tdl = sionna.tr38901.TDL(
                "A", delay_spread=config.delay_spread, carrier_frequency=config.carrier_frequency,
                min_speed=0.0, max_speed=config.max_speed, precision="double", device="cpu",
            )
            self.l_min = -6  # Sionna's recommended smallest lag for sinc-sampled taps
            self.l_max = int(math.ceil(float(self.tdl.delays.max()) * config.sample_rate)) + 6
        k = self.rrc.length
        l_tot = self.l_max - self.l_min + 1
        self.n_symbols = int(math.ceil((2 * k + l_tot + sps + config.frame_length) / sps))
        # first matched-filter output whose filter and channel inputs are all steady
        self.start = 2 * (k - 1) + self.l_max

    def _tdl_coarse(self, n: int, length: int) -> torch.Tensor:
        """Discrete TDL-A taps ``[n, coarse, l_tot]`` at every ``_TDL_STEP``-th sample."""
        cfg, step = self.cfg, _TDL_STEP
        coarse = (length - 1) // step + 2
        a, tau = self.tdl(n, coarse, cfg.sample_rate / step)
        hc = self.sn.channel.cir_to_time_channel(cfg.sample_rate, a, tau, self.l_min, self.l_max)
        return hc.reshape(n, coarse, -1)

    def _channel(self, x: torch.Tensor) -> torch.Tensor:
        n, length = x.shape
        if self.cfg.tier == "awgn":
            return x
        if self.cfg.tier == "rayleigh":
            a, _ = self.rayleigh(n, 1)
            return a.reshape(n, 1).to(torch.complex128) * x
        # y[t] = sum_j h[t, j] x[t - l_min - j], with h[t, :] linearly interpolated between the
        # coarse taps (one tap at a time keeps the temporaries at [n, length]).
        hc = self._tdl_coarse(n, length)
        pos = torch.arange(length, dtype=torch.float64) / _TDL_STEP
        i0 = pos.floor().long()
        w = (pos - i0)[None, :]
        xp = torch.nn.functional.pad(x, (self.l_max, -self.l_min))
        y = torch.zeros_like(x)
        for j in range(self.l_max - self.l_min + 1):
            h = hc[:, i0, j] * (1 - w) + hc[:, i0 + 1, j] * w
            shift = self.l_max - self.l_min - j  # xp[t + shift] = x[t - l_min - j]
            y = y + h * xp[:, shift : shift + length]
        return y

    def __call__(self, labels: np.ndarray, snr_db: np.ndarray, gen: torch.Generator) -> Frames:
        """Synthesise one frame per (label, SNR) using ``gen`` and Sionna's seeded generator."""
        cfg, sps, n = self.cfg, self.cfg.samples_per_symbol, len(labels)
        cls = torch.as_tensor(labels, dtype=torch.long)
        u = torch.rand(n, self.n_symbols, generator=gen, dtype=torch.float64)
        size = self.sizes[cls][:, None]
        idx = torch.minimum(torch.floor(u * size), size - 1).long()
        symbols = self.table[cls[:, None], idx]
        offset = torch.randint(0, sps, (n,), generator=gen)  # symbol timing of the frame
        cols = self.start + offset[:, None] + torch.arange(cfg.frame_length)[None, :]
        cols_in = cols - (self.rrc.length - 1) // 2  # the same window before the matched filter
        tx = self.rrc(self.upsample(symbols), padding="full")
        # unit power over the frame's window (what the receiver sees, through a unit-gain channel)
        tx = tx / torch.gather(tx, 1, cols_in).abs().square().mean(-1, keepdim=True).sqrt()
        rx = self._channel(tx)
        phase = torch.rand(n, 1, generator=gen, dtype=torch.float64) * (2 * math.pi * cfg.random_phase)
        cfo_max = cfg.cfo_ppm * 1e-6 * cfg.carrier_frequency / cfg.sample_rate  # cycles/sample
        cfo = (torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2 - 1) * cfo_max
        t = torch.arange(rx.shape[1], dtype=torch.float64)[None, :]
        rx = rx * torch.polar(torch.ones_like(t * cfo), phase + 2 * math.pi * cfo * t)
        no = torch.as_tensor(10.0 ** (-np.asarray(snr_db, dtype=np.float64) / 10.0))[:, None]
        noisy_rx = self.awgn(rx, no)
        window = torch.gather(self.rrc(noisy_rx, padding="full"), 1, cols)  # matched filter
        received = window / window.abs().square().mean(-1, keepdim=True).sqrt()
        return Frames(received=received, clean=torch.gather(rx, 1, cols_in),
                      noisy=torch.gather(noisy_rx, 1, cols_in))


def _features(z: torch.Tensor, kind: str) -> np.ndarray:
    i, q = z.real, z.imag
    amp, ph = z.abs(), torch.angle(z) / math.pi
    rows = {"iq": (i, q), "ap": (amp, ph), "iqap": (i, q, amp, ph)}[kind]
    return torch.stack(rows, dim=1).to(torch.float32).numpy()


def _split_streams(config: RadioConfig, split: str) -> tuple[int, int, np.random.Generator]:
    tier_code = zlib.crc32(config.tier.encode())
    seq = np.random.SeedSequence([config.seed, tier_code, SPLITS.index(split)])
    torch_seed, sionna_seed, order_seed = (int(s) for s in seq.generate_state(3, dtype=np.uint32))
    return torch_seed, sionna_seed, np.random.default_rng(order_seed)


def synthesize(
    config: RadioConfig, labels: np.ndarray, snr_db: np.ndarray, seed: int = 0
) -> Frames:
    """Synthesise frames of classes ``labels`` (indices into ``config.classes``) at ``snr_db``.

    A lower-level entry point than :func:`generate_radio`, for tests and custom sets; one
    batch, seeded by ``seed``.

    Example::

        >>> f = synthesize(RadioConfig(), np.array([0, 1]), np.array([10.0, 10.0]), seed=3)
        >>> noise_power = (f.noisy - f.clean).abs().square().mean(-1)  # 10 dB below the unit signal
        >>> [round(v, 1) for v in noise_power.tolist()]
        [0.1, 0.1]
    """
    labels = np.asarray(labels)
    snr_db = np.asarray(snr_db, dtype=np.float64)
    if labels.shape != snr_db.shape or labels.ndim != 1:
        raise DatasetError("labels and snr_db must be 1-D arrays of the same length")
    if labels.size and (labels.min() < 0 or labels.max() >= len(config.classes)):
        raise DatasetError(f"labels must be class indices in 0..{len(config.classes) - 1}")
    sn = import_sionna()
    synth = _Synthesiser(config, sn)
    gen = torch.Generator().manual_seed(int(seed))
    with _single_thread(), _sionna_seeded(sn, seed + 1):
        return synth(labels, snr_db, gen)


def generate_radio(
    config: RadioConfig | None = None, progress: Callable[[str], None] | None = None
) -> RadioData:
    """Generate the train/valid/test frames of ``config`` (default: the ``awgn`` tier).

    ``progress`` receives one line per split. Deterministic: the same config gives the same
    arrays (and :func:`save_radio` the same bytes).

    Example::

        >>> data = generate_radio(RadioConfig(tier="rayleigh", frames_per_snr=(20, 5, 5)))
        >>> np.bincount(data.y["test"]).tolist()
        [80, 80, 80, 80, 80, 80, 80, 80]
    """
    cfg = config or RadioConfig()
    sn = import_sionna()
    start = time.perf_counter()
    synth = _Synthesiser(cfg, sn)
    snrs = cfg.snr_values()
    X: dict[str, np.ndarray] = {}
    y: dict[str, np.ndarray] = {}
    snr: dict[str, np.ndarray] = {}
    for split, per in zip(SPLITS, cfg.frames_per_snr):
        t0 = time.perf_counter()
        torch_seed, sionna_seed, order_rng = _split_streams(cfg, split)
        labels = np.repeat(np.arange(len(cfg.classes)), len(snrs) * per)
        snr_all = np.tile(np.repeat(snrs, per), len(cfg.classes))
        order = order_rng.permutation(len(labels))
        labels, snr_all = labels[order], snr_all[order]
        gen = torch.Generator().manual_seed(torch_seed)
        parts = []
        with _single_thread(), _sionna_seeded(sn, sionna_seed):
            for lo in range(0, len(labels), _CHUNK):
                frames = synth(labels[lo : lo + _CHUNK], snr_all[lo : lo + _CHUNK], gen)
                parts.append(_features(frames.received, cfg.features))
        X[split] = np.concatenate(parts)
        y[split] = labels.astype(np.int64)
        snr[split] = snr_all.astype(np.float32)
        if progress:
            progress(f"{cfg.tier} {split}: {len(labels)} frames in {time.perf_counter() - t0:.1f} s")
    return RadioData(cfg, X, y, snr, list(cfg.classes), time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Cache files: a plain .npz (numpy.load reads it), written with fixed zip timestamps


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)  # keeps 0-d arrays 0-d
    return buf.getvalue()


def save_radio(data: RadioData, path: str | Path) -> Path:
    """Write ``data`` as an ``.npz`` whose bytes depend only on its content.

    Arrays: ``X_<split>``, ``y_<split>``, ``snr_<split>``, ``class_names``, ``snr_values`` and
    ``config`` (the :class:`RadioConfig` as JSON text).

    Example::

        >>> import tempfile
        >>> save_radio(generate_radio(RadioConfig(frames_per_snr=(5, 2, 2))), Path(tempfile.mkdtemp()) / "rf.npz").name
        'rf.npz'
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        arrays[f"X_{split}"] = data.X[split]
        arrays[f"y_{split}"] = data.y[split]
        arrays[f"snr_{split}"] = data.snr[split]
    arrays["class_names"] = np.array(data.class_names, dtype=str)
    arrays["snr_values"] = data.config.snr_values().astype(np.float32)
    arrays["config"] = np.array(json.dumps(data.config.to_dict(), sort_keys=True))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, _npy_bytes(value))
    return path


def read_radio(path: str | Path, name: str | None = None) -> RadioData:
    """Read a file written by :func:`save_radio`; a damaged file raises :class:`DatasetError`."""
    path = Path(path)
    label = name or path.name
    hint = f"'mpqat data fetch {name} --force'" if name else "generate it again"
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        config = RadioConfig.from_dict(json.loads(str(arrays["config"].reshape(-1)[0])))
        data = RadioData(
            config,
            X={s: arrays[f"X_{s}"] for s in SPLITS},
            y={s: arrays[f"y_{s}"] for s in SPLITS},
            snr={s: arrays[f"snr_{s}"] for s in SPLITS},
            class_names=[str(c) for c in arrays["class_names"]],
        )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read the radio file '{path}' of {label} ({exc}): run {hint}") from None
    for split in SPLITS:
        n = len(data.y[split])
        if data.X[split].shape != (n, *config.input_shape) or data.snr[split].shape != (n,):
            raise DatasetError(f"the radio file '{path}' of {label} has inconsistent {split} arrays: run {hint}")
    return data


# --------------------------------------------------------------------------------------------
# Named datasets: rf-awgn, rf-rayleigh, rf-tdla (registered in registry.py), fetch and load

#: registry name -> the config it is generated with (all defaults but the tier).
RADIO_DATASETS: dict[str, RadioConfig] = {
    "rf-awgn": RadioConfig(tier="awgn"),
    "rf-rayleigh": RadioConfig(tier="rayleigh"),
    "rf-tdla": RadioConfig(tier="tdla"),
}
#: a name that fetches several datasets at once.
RADIO_GROUP = "rf-modulation"


def amplitude_phase_difference(frames: np.ndarray) -> np.ndarray:
    """Rotation-invariant features of I/Q frames ``[n, 2, L]`` (row 0 = I, row 1 = Q).

    Returns float32 ``[n, 2, L]``: row 0 = amplitude ``|z_t|``, row 1 = phase difference
    ``angle(z_t * conj(z_{t-1})) / pi`` wrapped to ``(-1, 1]`` (0 for the first sample). Multiplying
    a frame by ``exp(j*theta)`` leaves both rows unchanged; a constant frequency offset adds a
    constant to row 1. Computed in float64, vectorised, deterministic.

    Example::

        >>> z = np.exp(1j * np.pi / 2 * np.arange(4))           # 90 degrees per sample
        >>> amplitude_phase_difference(np.stack([z.real, z.imag])[None]).round(6).tolist()
        [[[1.0, 1.0, 1.0, 1.0], [0.0, 0.5, 0.5, 0.5]]]
    """
    x = np.asarray(frames, dtype=np.float64)
    if x.ndim != 3 or x.shape[1] != 2:
        raise DatasetError(f"expected I/Q frames of shape [n, 2, L], got {x.shape}")
    z = x[:, 0] + 1j * x[:, 1]
    out = np.zeros(x.shape, dtype=np.float64)
    out[:, 0] = np.abs(z)
    out[:, 1, 1:] = np.angle(z[:, 1:] * np.conj(z[:, :-1])) / np.pi
    out = out.astype(np.float32)
    out[:, 1] = np.where(out[:, 1] <= -1.0, out[:, 1] + 2.0, out[:, 1])  # -pi (or float32 rounding to it) -> pi
    return out


#: feature transform name (``DatasetInfo.transform`` in registry.py) -> (function from I/Q frames
#: ``[n, 2, L]`` to ``[n, C, L]`` float32, the prefixes of its rows' feature names).
FEATURE_TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], tuple[str, ...]]] = {
    "amp-dphase": (amplitude_phase_difference, ("A", "D")),
}


def resolve_radio(name: str) -> tuple[str, str, str | None]:
    """``(name, base, transform)`` of a named radio dataset: ``base`` is the generated dataset whose
    file it reads (itself for ``rf-awgn``, ...), ``transform`` the registry's name of its feature
    transform (a key of :data:`FEATURE_TRANSFORMS`) or None. An unknown name raises :class:`DatasetError` listing the radio datasets.

    Example::

        >>> resolve_radio("rf-tdla-ap")
        ('rf-tdla-ap', 'rf-tdla', 'amp-dphase')
    """
    from mpqat.data.registry import find_dataset, list_datasets

    info = find_dataset(name)
    base = (info.base or info.name) if info is not None and info.kind == "radio" else None
    if info is None or base not in RADIO_DATASETS:
        known = [d.name for d in list_datasets("radio")]
        raise DatasetError(f"unknown radio dataset '{name}': use one of {', '.join(known)}")
    return info.name, base, info.transform  # the transform itself is checked by radio_splits


def radio_cache_path(name: str) -> Path:
    """Where ``mpqat data fetch NAME`` keeps the frames of a named radio dataset."""
    from mpqat.data.paths import data_dir

    return data_dir() / f"{name}.npz"


def fetch_radio(name: str, force: bool = False, note: Callable[[str], None] | None = None) -> Path:
    """Generate named radio dataset ``name`` into the data directory once; return the file
    (for a derived dataset such as ``rf-awgn-ap``: its base's file, ``rf-awgn.npz``).

    A second call returns at once unless ``force``. Example::

        >>> fetch_radio("rf-awgn")  # doctest: +SKIP
        PosixPath('/root/.cache/mpqat/rf-awgn.npz')
    """
    from mpqat.data.paths import atomic_path

    say = note or (lambda _msg: None)
    name, base, _ = resolve_radio(name)  # a derived dataset (rf-awgn-ap) shares its base's file
    if base != name:
        say(f"{name}: computed from {base}'s frames when loading")
        name = base
    path = radio_cache_path(name)
    if path.is_file() and not force:
        say(f"{name}: already fetched ({path})")
        return path
    data = generate_radio(RADIO_DATASETS[name], progress=lambda msg: say(f"{name}: {msg}"))
    with atomic_path(path) as tmp:
        save_radio(data, tmp)
    say(f"{name}: generated in {data.generation_seconds:.1f} s -> {path}")
    return path


def _balanced_subset(
    labels: np.ndarray, snr_index: np.ndarray, n_keep: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted positions of ``n_keep`` random rows spread evenly over (class, SNR) pairs.

    Every pair gets ``n_keep // pairs`` rows; the remainder goes to pairs taken diagonal by
    diagonal (each diagonal holds every class once, at cycling SNRs), so the class counts differ
    by at most one and the SNR counts stay nearly equal too.
    """
    n_c, n_s = int(labels.max()) + 1, int(snr_index.max()) + 1
    groups = labels * n_s + snr_index
    perm = rng.permutation(len(groups))
    order = perm[np.argsort(groups[perm], kind="stable")]  # grouped, random inside each group
    keys, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
    cls_rank = rng.permutation(n_c)[keys // n_s]
    priority = np.lexsort((cls_rank, (keys % n_s + cls_rank) % n_s))
    quota = np.full(len(keys), n_keep // len(keys))
    quota[priority[: n_keep % len(keys)]] += 1
    quota = np.minimum(quota, counts)
    rank = np.arange(len(order)) - np.repeat(starts, counts)
    return np.sort(order[rank < np.repeat(quota, counts)])


def radio_splits(
    data: RadioData, name: str, seed: int = 0, max_rows: int | None = None, transform: str | None = None
) -> RadioSplits:
    """Turn :class:`RadioData` into :class:`RadioSplits` (flat float32 features, I then Q).

    The splits are the generated ones (``seed`` does not change them; it only seeds the
    ``max_rows`` subsample, which keeps every (class, SNR) pair as balanced as possible and the
    split proportions). No preprocessing: each frame is already scaled to unit RMS.
    ``transform`` (a key of :data:`FEATURE_TRANSFORMS`, for I/Q data) replaces the features of
    the kept rows; rows, labels and SNRs stay the same.
    """
    if transform is not None and transform not in FEATURE_TRANSFORMS:
        raise DatasetError(f"unknown feature transform '{transform}': use one of {', '.join(FEATURE_TRANSFORMS)}")
    if transform is not None and data.config.features != "iq":
        raise DatasetError(f"feature transform '{transform}' needs I/Q frames (features='iq'), "
                           f"got features='{data.config.features}'")
    cfg = data.config
    total = sum(len(data.y[s]) for s in SPLIT_NAMES)
    keep = {s: np.arange(len(data.y[s])) for s in SPLIT_NAMES}
    if max_rows is not None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 1:
            raise DatasetError(f"max_rows must be a positive integer, got {max_rows!r}")
        if max_rows < 3 * len(data.class_names):
            raise DatasetError(
                f"max_rows={max_rows} is too small for {len(data.class_names)} classes: "
                f"use at least {3 * len(data.class_names)}"
            )
        if max_rows < total:
            rng = np.random.default_rng(seed)
            snrs = cfg.snr_values().astype(np.float32)
            for s in SPLIT_NAMES:
                n_keep = max(len(data.class_names), int(round(max_rows * len(data.y[s]) / total)))
                keep[s] = _balanced_subset(data.y[s], np.searchsorted(snrs, data.snr[s]), n_keep, rng)
    frames = {s: data.X[s][keep[s]] for s in SPLIT_NAMES}
    rows = {"iq": ("I", "Q"), "ap": ("A", "P"), "iqap": ("I", "Q", "A", "P")}[cfg.features]
    if transform is not None:
        func, rows = FEATURE_TRANSFORMS[transform]
        frames = {s: func(x) for s, x in frames.items()}
    shape = frames["train"].shape[1:]
    X = {s: x.reshape(len(x), -1) for s, x in frames.items()}
    names = [f"{r}{t}" for r in rows for t in range(cfg.frame_length)]
    return RadioSplits(
        name=name,
        X_train=X["train"], y_train=data.y["train"][keep["train"]],
        X_valid=X["valid"], y_valid=data.y["valid"][keep["valid"]],
        X_test=X["test"], y_test=data.y["test"][keep["test"]],
        feature_names=names,
        class_names=list(data.class_names),
        indices=keep,
        info={
            "source": f"generated with Sionna PHY (tier {cfg.tier}: {TIERS[cfg.tier]})",
            "target": "modulation",
            "positive_class": None,
            "seed": seed,
            "split": [round(len(keep[s]) / sum(len(k) for k in keep.values()), 4) for s in SPLIT_NAMES],
            "max_rows": max_rows,
            "n_rows_source": int(total),
            "radio_config": cfg.to_dict(),
            "feature_transform": transform,
            "input_shape": list(shape),
        },
        input_shape=tuple(shape),
        snr_train=data.snr["train"][keep["train"]],
        snr_valid=data.snr["valid"][keep["valid"]],
        snr_test=data.snr["test"][keep["test"]],
    )


def load_radio(name: str, seed: int = 0, max_rows: int | None = None) -> RadioSplits:
    """The splits of a fetched named radio dataset (``rf-awgn``, ``rf-rayleigh``, ``rf-tdla``, or
    a derived one such as ``rf-awgn-ap``: its base's file, rows and SNRs, its own features).

    Raises :class:`DatasetError` naming the fetch command when it is not generated yet.

    Example::

        >>> ds = load_radio("rf-tdla")  # doctest: +SKIP
        >>> ds.X_train.shape, ds.input_shape, ds.snr_test[:3]  # doctest: +SKIP
        ((25600, 256), (2, 128), array([...], dtype=float32))
    """
    name, base, transform = resolve_radio(name)
    path = radio_cache_path(base)
    if not path.is_file():
        raise DatasetError(f"dataset '{name}' is not generated yet: run 'mpqat data fetch {name}'")
    data = read_radio(path, base)
    if data.config != RADIO_DATASETS[base]:
        raise DatasetError(
            f"the cached '{path}' was generated with other settings than this version of mpqat "
            f"uses: run 'mpqat data fetch {base} --force'"
        )
    return radio_splits(data, name, seed=seed, max_rows=max_rows, transform=transform)


@dataclass(eq=False)
class RadioSplits(TabularSplits):
    """:class:`~mpqat.data.splits.TabularSplits` plus the SNR (dB) of every row.

    ``snr_<split>`` is a side label, not a feature: use it to report accuracy per SNR
    (:func:`mpqat.radio_eval.accuracy_by_snr`). ``input_shape`` (inherited) is ``(channels, L)``:
    the flat features unflatten with ``X.reshape(-1, *input_shape)`` (row 0 = I, row 1 = Q).
    """

    snr_train: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32), repr=False)
    snr_valid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32), repr=False)
    snr_test: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32), repr=False)

    def snr(self, split: str) -> np.ndarray:
        """SNR in dB of each row of ``split``."""
        self.split(split)  # validates the name
        return getattr(self, f"snr_{split}")
