"""Peer libraries behind one interface, run on our splits, our MLP and our epochs, costed by :mod:`mpqat.cost`.

Peers (all optional; ``available_peers()`` says which can run here and how to install the rest):

* ``brevitas``: Brevitas ``QuantLinear``/``QuantReLU``/``QuantIdentity`` MLP, fixed W/A bits
  (``w_bits``, ``a_bits``, ``input_bits``) or one learned bit-width per quantizer
  (``learned_bits=True``: Brevitas' ``BitWidthParameter``, min 2 bits, ``bit_penalty``).
  :func:`brevitas_onnx_size` exports the trained model as QCDQ ONNX and returns the file size.
* ``hgq2``: HGQ2 (Keras 3 on the torch backend) ``QDense`` MLP with per-weight and per-feature
  learned bit-widths and its EBOPs penalty (``beta``, ramped by its ``BetaScheduler``).
* ``torchao``: torchao's QAT ``prepare`` (``IntxFakeQuantizeConfig``: per-channel symmetric
  weights, per-token dynamic activations) at fixed W/A bits.

Every peer trains ``Linear -> ReLU -> ... -> Linear`` with the given hidden widths on the given
splits (Adam, ``lr``, ``batch_size``, ``epochs``; early stopping on validation accuracy with
``patience`` epochs, default 20, restoring the best epoch), reads the bit-widths back from its
trained parameters and reports accuracy and cost with mpqat's one cost definition.

Example::

    >>> from mpqat.bench.peers import available_peers, run_peer
    >>> available_peers()                                   # doctest: +SKIP
    {'brevitas': None, 'hgq2': None, 'torchao': None}
    >>> r = run_peer("brevitas", Xtr, ytr, Xva, yva, Xte, yte, hidden=(64, 64), epochs=30,
    ...              w_bits=4, a_bits=4)                    # doctest: +SKIP
    >>> r.test_accuracy, r.avg_weight_bits, r.bitops        # doctest: +SKIP

Install (with the CPU torch already in the environment, nothing here pulls another torch)::

    pip install brevitas onnxoptimizer hgq2 "keras>=3"
    pip install --no-deps torchao
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mpqat.errors import ConfigError

__all__ = ["PEERS", "PeerResult", "available_peers", "brevitas_onnx_size", "run_peer"]

#: peer name -> (adapter module, install hint)
PEERS: dict[str, tuple[str, str]] = {
    "brevitas": ("mpqat.bench.peers.brevitas", "pip install brevitas onnxoptimizer"),
    "hgq2": ("mpqat.bench.peers.hgq2", 'pip install hgq2 "keras>=3"'),
    "torchao": ("mpqat.bench.peers.torchao", "pip install --no-deps torchao"),
}


@dataclass
class PeerResult:
    """One peer run. Bits, BitOps and size use :mod:`mpqat.cost`'s definitions.

    ``step_seconds`` is the median wall time of one training step (forward, backward, update) on
    a full batch of ``batch_size`` rows. ``epochs`` is the number of epochs actually run (early
    stopping may end a run before the requested count). ``extra`` holds peer-specific details; its
    ``"model"`` entry is the trained model object and is left out by :meth:`to_dict`.
    """

    peer: str
    test_accuracy: float
    avg_weight_bits: float
    avg_act_bits: float
    bitops: float
    size_bytes: float
    train_seconds: float
    step_seconds: float
    epochs: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the trained model and anything else not JSON-able dropped)."""
        out = asdict(self) | {"extra": {}}
        for key, value in self.extra.items():
            if key == "model":
                continue
            try:
                json.dumps(value, allow_nan=True)
            except (TypeError, ValueError):
                continue
            out["extra"][key] = value
        return out


@functools.cache
def _availability(name: str) -> str | None:
    module_name, hint = PEERS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # the adapter itself imports nothing optional at module level
        return f"{name} adapter cannot be imported ({exc}); install with: {hint}"
    reason = module.unavailable_reason()
    return None if reason is None else f"{reason}; install with: {hint}"


def available_peers() -> dict[str, str | None]:
    """Peer name -> ``None`` when it can run here, else why not and the command that installs it."""
    return {name: _availability(name) for name in PEERS}


def run_peer(
    name: str,
    X_train,
    y_train,
    X_valid,
    y_valid,
    X_test,
    y_test,
    *,
    hidden: tuple[int, ...],
    epochs: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    **options: Any,
) -> PeerResult:
    """Train peer ``name`` on the given splits and return its accuracy and cost.

    Features are float32 ``[n, d]``, labels int64 class indices. ``options`` are peer-specific
    (see each adapter's ``run``); ``patience`` (default 20) is shared. Raises
    :class:`~mpqat.errors.ConfigError` for an unknown peer, an unavailable one (with the install
    command) or a bad option.
    """
    if name not in PEERS:
        raise ConfigError(f"unknown peer '{name}': choose one of {', '.join(PEERS)}")
    reason = _availability(name)
    if reason is not None:
        raise ConfigError(f"peer '{name}' is not available: {reason}")
    module = importlib.import_module(PEERS[name][0])
    result = module.run(
        X_train, y_train, X_valid, y_valid, X_test, y_test,
        hidden=tuple(hidden), epochs=int(epochs), batch_size=int(batch_size), lr=float(lr), seed=int(seed),
        **options,
    )
    for key in ("test_accuracy", "avg_weight_bits", "avg_act_bits", "bitops", "size_bytes"):
        if not math.isfinite(getattr(result, key)):
            raise ConfigError(f"peer '{name}' produced a non-finite {key}; lower lr or check the data")
    return result


def brevitas_onnx_size(model_or_result: Any, path: str | Path) -> int:
    """Export a trained Brevitas model (or the ``PeerResult`` of a Brevitas run) as QCDQ ONNX; file size in bytes."""
    from mpqat.bench.peers.brevitas import brevitas_onnx_size as export

    return export(model_or_result, path)
