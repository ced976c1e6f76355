"""HGQ2 peer: a Keras 3 (torch backend) ``QDense`` MLP with per-weight and per-feature learned bit-widths.

Model: ``QDense(h, relu)`` for every hidden width, then ``QDense(n_classes)``; every ``QDense``
quantizes its input (HGQ2's default ``iq``) and its kernel and bias. Quantizers are HGQ2's
defaults, made explicit: weights ``kbi`` with ``SAT_SYM`` overflow, one bit-width per weight
(``homogeneous_axis=()``); activations ``kif`` with ``WRAP`` overflow, one bit-width per input
feature. Training is Keras' ``fit`` (Adam ``lr``, ``batch_size``, sparse cross-entropy on logits)
with HGQ2's EBOPs loss ``beta * EBOPs`` per layer. ``beta_schedule="ramp"`` (default) uses HGQ2's
``BetaScheduler(PieceWiseSchedule(...))`` to raise beta log-linearly from ``beta / 100`` at epoch
0 to ``beta`` at half the epochs; ``"constant"`` keeps ``beta`` throughout. Early stopping is
Keras' ``EarlyStopping(val_accuracy, patience, restore_best_weights=True)``. Then, as HGQ2's
deployment flow does, ``trace_minmax`` on the training split fixes the activations' integer bits
(and signs) that the data needs; test accuracy is measured after that, on the traced model.

Options: ``beta`` (default 1e-6), ``beta_schedule`` (``"ramp"``/``"constant"``), ``patience``,
``init_weight_frac_bits`` and ``init_act_frac_bits``: the initial fractional bits ``f0`` of the
weight and activation quantizers (default HGQ2's: 6 for both; weights start with HGQ2's 2 integer
bits, so ``b0 = 2 + f0`` plus the sign; activations' integer bits follow the data). HGQ2 trains
the bit-widths with the same optimizer and learning rate as the weights, so in few steps they move
little: starting lower is the knob that puts HGQ2 in its compressive regime within few epochs.

Bit-widths and cost (:mod:`mpqat.cost` definitions):

* HGQ2 counts a quantizer's bits without the sign bit (``bits``); the stored width is ``fbits``
  (sign included where the value can be negative: always for weights, per feature for
  activations after tracing). We use the stored width, and 0 where HGQ2's bits are 0 (pruned).
* avg weight bits: sum of per-weight widths / number of weights (pruned weights count as 0 bits);
  avg act bits: sum of per-feature widths / sum of in_features (pruned features count 0).
* BitOps = sum over every multiplication of ``b_w * b_a`` = ``sum_ij a_i * w_ij`` per layer.
  HGQ2's own EBOPs (``extra["hgq_ebops"]``, from ``trace_minmax``) uses the sign-less bits and
  adds a bias term (``mean bias bits * out_features``); ``extra["hgq_ebops_recomputed"]`` is that
  formula applied to the bit-widths we read, as a cross-check of the read-out.
* size = sum of per-weight widths + per output neuron a 32-bit scale and a 32-bit bias (HGQ2's
  learned bias widths are not used: every method is charged 32 bits per bias) + an 8-bit width
  code per output neuron when the layer's weight widths vary, + per input feature an 8-bit exponent
  (its fractional bits) and an 8-bit width code when they vary. **A width code per weight is NOT
  charged** (nor the index of pruned weights): a deployment with per-weight widths (hls4ml, da4ml)
  bakes each weight's width into the circuit rather than storing it, and charging 8 bits per
  weight would triple HGQ2's size for a convention no FPGA flow uses.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import numpy as np

from mpqat.bench.peers._common import (
    check_hidden,
    check_splits,
    cost_extra,
    cost_report,
    linear_layer_cost,
    median_step,
    reject_unknown,
)
from mpqat.errors import ConfigError

OPTIONS = {"beta", "beta_schedule", "patience", "init_weight_frac_bits", "init_act_frac_bits"}


def _select_torch_backend() -> str | None:
    """Point Keras at the torch backend before it is imported; a reason when it is too late."""
    keras = sys.modules.get("keras")
    if keras is None:
        os.environ["KERAS_BACKEND"] = "torch"
        return None
    backend = keras.backend.backend()
    if backend != "torch":
        return (f"keras was already imported with the '{backend}' backend; the HGQ2 adapter needs 'torch' "
                "(set KERAS_BACKEND=torch before importing keras)")
    return None


def unavailable_reason() -> str | None:
    """None when HGQ2 imports on Keras' torch backend, else why not."""
    reason = _select_torch_backend()
    if reason is not None:
        return reason
    try:
        import keras

        import hgq  # noqa: F401
        from hgq.layers import QDense  # noqa: F401
        from hgq.utils import trace_minmax  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unavailable
        return f"hgq2 is not importable ({type(exc).__name__}: {exc})"
    if keras.backend.backend() != "torch":
        return f"keras uses the '{keras.backend.backend()}' backend, not torch (set KERAS_BACKEND=torch)"
    return None


def build_mlp(n_features: int, n_classes: int, hidden: tuple[int, ...], *, beta0: float,
              init_weight_frac_bits: float | None = None, init_act_frac_bits: float | None = None):
    """The HGQ2 MLP described in the module docstring (built, not compiled)."""
    import keras
    from hgq.config import LayerConfigScope, QuantizerConfigScope
    from hgq.layers import QDense

    weight_kw = {} if init_weight_frac_bits is None else {"i0": 2.0, "f0": float(init_weight_frac_bits)}
    act_kw = {} if init_act_frac_bits is None else {"f0": float(init_act_frac_bits)}
    with (
        QuantizerConfigScope(place="all", default_q_type="kbi", overflow_mode="SAT_SYM"),
        QuantizerConfigScope(q_type="kbi", place="weight", **weight_kw),
        QuantizerConfigScope(place="datalane", default_q_type="kif", overflow_mode="WRAP", **act_kw),
        LayerConfigScope(enable_ebops=True, beta0=beta0),
    ):
        layers = [keras.Input((n_features,))]
        layers += [QDense(h, activation="relu", name=f"fc{i}") for i, h in enumerate(hidden)]
        layers.append(QDense(n_classes, name=f"fc{len(hidden)}"))
        return keras.Sequential(layers)


def read_bits(model) -> list[dict[str, Any]]:
    """Per ``QDense``: stored widths of every weight ``[out, in]`` and input feature ``[in]``, plus HGQ2's own bits."""
    from hgq.layers import QDense
    from keras import ops

    out = []
    for layer in model.layers:
        if not isinstance(layer, QDense):
            continue
        n_in, n_out = (int(s) for s in layer.kernel.shape)
        kshape = ops.shape(layer.kernel)
        w_bits = ops.convert_to_numpy(layer.kq.bits_(kshape)).astype(np.float64)  # [in, out], sign excluded
        w_fbits = ops.convert_to_numpy(layer.kq.fbits_(kshape)).astype(np.float64)
        a_bits = ops.convert_to_numpy(layer.iq.bits_((1, n_in))).astype(np.float64).reshape(-1)
        a_fbits = ops.convert_to_numpy(layer.iq.fbits_((1, n_in))).astype(np.float64).reshape(-1)
        bias_bits = None
        if layer.bias is not None:
            bias_bits = ops.convert_to_numpy(layer.bq.bits_(ops.shape(layer.bias))).astype(np.float64)
        out.append({
            "name": layer.name, "in_features": n_in, "out_features": n_out,
            "w_width": np.where(w_bits > 0, w_fbits, 0.0).T,        # [out, in], stored width, 0 = pruned
            "a_width": np.where(a_bits > 0, a_fbits, 0.0),          # [in]
            "w_bits_hgq": w_bits, "a_bits_hgq": a_bits, "bias_bits_hgq": bias_bits,
        })
    if not out:
        raise ConfigError("hgq2: the model has no QDense layer")
    return out


def hgq_ebops(layers: list[dict[str, Any]]) -> float:
    """HGQ2's EBOPs formula (``QDense._compute_ebops``) applied to bit-widths read by :func:`read_bits`."""
    total = 0.0
    for layer in layers:
        total += float((layer["a_bits_hgq"] @ layer["w_bits_hgq"]).sum())
        if layer["bias_bits_hgq"] is not None:
            total += float(layer["bias_bits_hgq"].mean()) * layer["out_features"]
    return total


def _predict_accuracy(model, X: np.ndarray, y: np.ndarray) -> float:
    logits = model.predict(X, batch_size=4096, verbose=0)
    return float((np.asarray(logits).argmax(1) == y).mean())


def run(
    X_train, y_train, X_valid, y_valid, X_test, y_test, *,
    hidden: tuple[int, ...], epochs: int, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
    **options: Any,
):
    """Train the HGQ2 MLP; see the module docstring for the options and the cost read-out."""
    reason = unavailable_reason()
    if reason is not None:
        raise ConfigError(f"hgq2 peer unavailable: {reason}")
    import hgq
    import keras
    from hgq.utils import trace_minmax
    from hgq.utils.sugar import BetaScheduler, FreeEBOPs, PieceWiseSchedule

    from mpqat.bench.peers import PeerResult

    reject_unknown(options, OPTIONS, "hgq2")
    patience = int(options.get("patience", 20))
    hidden = check_hidden(hidden, epochs, batch_size, lr, patience)
    data = check_splits(X_train, y_train, X_valid, y_valid, X_test, y_test)
    beta = float(options.get("beta", 1e-6))
    schedule = str(options.get("beta_schedule", "ramp"))
    if not (beta >= 0 and math.isfinite(beta)):
        raise ConfigError(f"hgq2: beta must be >= 0, got {beta}")
    if schedule not in ("ramp", "constant"):
        raise ConfigError(f"hgq2: beta_schedule must be 'ramp' or 'constant', got '{schedule}'")
    for key in ("init_weight_frac_bits", "init_act_frac_bits"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not -2 <= value <= 16):
            raise ConfigError(f"hgq2: {key} must be a number of fractional bits in [-2, 16], got {value!r}")
    if schedule == "ramp" and beta > 0:
        ramp_end = max(1, epochs // 2)
        beta_fn = PieceWiseSchedule([(0, beta / 100, "log"), (ramp_end, beta, "constant")])
    else:
        beta_fn = PieceWiseSchedule([(0, beta, "constant")])

    keras.utils.set_random_seed(seed)
    model = build_mlp(data.n_features, data.n_classes, hidden, beta0=beta_fn(0),
                      init_weight_frac_bits=options.get("init_weight_frac_bits"),
                      init_act_frac_bits=options.get("init_act_frac_bits"))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    n_train = len(data.X_train)

    class StepTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []
            self.sizes: list[int] = []
            self._t0 = 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._t0)
            self.sizes.append(max(1, min(batch_size, n_train - batch * batch_size)))

    timer = StepTimer()
    stopper = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=patience,
                                            restore_best_weights=True)
    t0 = time.perf_counter()
    fitted = model.fit(
        data.X_train, data.y_train, validation_data=(data.X_valid, data.y_valid), epochs=epochs,
        batch_size=batch_size, shuffle=True, verbose=0,
        callbacks=[BetaScheduler(beta_fn), FreeEBOPs(), timer, stopper],
    )
    train_seconds = time.perf_counter() - t0
    history_dict = fitted.history
    epochs_run = len(history_dict.get("loss", []))
    history = [{key: float(values[i]) for key, values in history_dict.items()} | {"epoch": i + 1}
               for i in range(epochs_run)]

    accuracy_before_trace = _predict_accuracy(model, data.X_test, data.y_test)
    ebops_trace = int(trace_minmax(model, data.X_train, batch_size=4096))
    layers = read_bits(model)
    costs = [
        linear_layer_cost(layer["name"], "hgq.QDense", layer["in_features"], layer["out_features"],
                          layer["w_width"], layer["a_width"], act_exponents=layer["in_features"])
        for layer in layers
    ]
    report = cost_report(costs)
    n_weights = sum(layer["w_width"].size for layer in layers)
    n_feats = sum(layer["a_width"].size for layer in layers)
    extra: dict[str, Any] = {
        "model": model,
        "library": f"hgq2 {hgq.__version__}, keras {keras.__version__} ({keras.backend.backend()} backend)",
        "options": {"beta": beta, "beta_schedule": schedule, "patience": patience,
                    "init_weight_frac_bits": options.get("init_weight_frac_bits"),
                    "init_act_frac_bits": options.get("init_act_frac_bits"), "hidden": list(hidden),
                    "batch_size": batch_size, "lr": lr, "seed": seed, "epochs_requested": epochs},
        "valid_accuracy": _predict_accuracy(model, data.X_valid, data.y_valid),
        "test_accuracy_before_trace": accuracy_before_trace,
        "best_epoch": int(stopper.best_epoch) + 1,
        "history": history,
        "hgq_ebops": ebops_trace,
        "hgq_ebops_recomputed": hgq_ebops(layers),
        "bitops_without_sign_bits": float(sum((l["a_bits_hgq"] @ l["w_bits_hgq"]).sum() for l in layers)),
        "pruned_weight_fraction": float(sum((l["w_width"] == 0).sum() for l in layers) / n_weights),
        "pruned_act_fraction": float(sum((l["a_width"] == 0).sum() for l in layers) / n_feats),
        "layers": [
            {"name": l["name"], "in_features": l["in_features"], "out_features": l["out_features"],
             "mean_w_bits": float(l["w_width"].mean()), "mean_a_bits": float(l["a_width"].mean()),
             "w_bits_histogram": _histogram(l["w_width"]), "a_bits_histogram": _histogram(l["a_width"])}
            for l in layers
        ],
        **cost_extra(report),
    }
    return PeerResult(
        peer="hgq2",
        test_accuracy=_predict_accuracy(model, data.X_test, data.y_test),
        avg_weight_bits=report.avg_weight_bits,
        avg_act_bits=report.avg_act_bits,
        bitops=report.bitops,
        size_bytes=report.size_bytes,
        train_seconds=train_seconds,
        step_seconds=median_step(timer.times, timer.sizes, batch_size),
        epochs=epochs_run,
        extra=extra,
    )


def _histogram(bits: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(bits, return_counts=True)
    return {f"{v:g}": int(c) for v, c in zip(values.tolist(), counts.tolist(), strict=True)}
