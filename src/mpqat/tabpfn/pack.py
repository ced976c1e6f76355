"""Save a quantized TabPFN v1 as one bit-packed file, and load it back as a runnable model.

The file is a ``safetensors`` file (format tag ``mpqat-tabpfn-packed/1`` in its metadata). For
every quantized linear layer ``NAME`` (75 in TabPFN v1) it holds:

* ``NAME.codes``: the integer weight codes, bit-packed with :func:`mpqat.export.pack.pack_rows`
  (rows grouped by bit-width; 1-bit rows are +-1 signs) as ``uint8``;
* ``NAME.row_bits`` (``uint8 [out]``) and ``NAME.scale`` (``float32 [out]``): each row's bit-width
  and dyadic step ``m * 2**-e`` (16-bit mantissa, so float32 holds it exactly);
* weights + activations: ``NAME.act_bits`` (``uint8``), ``NAME.act_exp`` (``int8``, the input step is
  ``2**act_exp``) per input feature (or one per layer), and ``NAME.bias_int`` (``int32``), the bias
  in accumulator units ``scale_j * 2**min(act_exp)``;
* weights only: ``NAME.bias`` (``float32``), the float bias.

Everything that stays float (layer norms, the label embedding, the loss class weights) is stored as
``float.PARAM`` (``float32``). **This is not an integer-only transformer**: the attention scores,
the softmax, layer norm, GELU and the residual adds run in float (METHODS.md §1.8.4 keeps them at
high precision on purpose; an integer softmax/layer norm is out of scope here).
:class:`PackedTabPFN` marks them: its ``float_ops`` attribute lists them.

:func:`load_packed` rebuilds the model with :class:`PackedLinear` layers that compute, in float64
with the integer codes and power-of-two input steps, exactly what ``QuantLinear`` computes in eval
mode: the packed model's outputs are ``torch.equal`` to the quantized model's.

Example::

    >>> report = save_packed(quantized_tabpfn, "tabpfn-w4.safetensors")   # doctest: +SKIP
    >>> report["file_bytes"], report["checkpoint_bytes"]                    # doctest: +SKIP
    (13412345, 103350223)
    >>> model = load_packed("tabpfn-w4.safetensors")                        # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mpqat.errors import ExportError
from mpqat.export.pack import pack_rows, packed_rows_nbytes, unpack_rows
from mpqat.nn.linear import QuantLinear
from mpqat.quant.functional import round_half_up
from mpqat.tabpfn.fetch import SIZE as CHECKPOINT_BYTES
from mpqat.tabpfn.model import TabPFN, TabPFNConfig
from mpqat.tabpfn.quant import WeightOnlyLinear, quant_linears

FORMAT = "mpqat-tabpfn-packed/1"
FLOAT_OPS = ("layer_norm", "gelu", "attention_scores", "softmax", "residual_add", "label_embedding")


def _expand(t: torch.Tensor, n: int) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    return flat.expand(n) if flat.numel() == 1 else flat


@torch.no_grad()
def layer_arrays(layer: QuantLinear) -> dict[str, Any]:
    """The deployable numbers of one quantized linear layer (eval-mode values), as numpy arrays."""
    wq = layer.weight_quant
    row_bits = _expand(wq.bits(), layer.out_features).to(torch.int64)
    codes = wq.integer_codes(layer.weight.detach().double()).round().to(torch.int64)
    scale = _expand(wq.scale().double(), layer.out_features)
    if not torch.equal(scale.float().double(), scale):
        raise ExportError(f"a weight scale of {type(layer).__name__} is not exact in float32; the scales must be dyadic")
    out: dict[str, Any] = {"row_bits": row_bits.numpy(), "codes": codes.numpy(), "scale": scale.float().numpy()}
    if isinstance(layer, WeightOnlyLinear):
        out["kind"] = "w"
        if layer.bias is not None:
            out["bias"] = layer.bias.detach().float().numpy()
        return out
    aq = layer.act_quant
    out["kind"] = "wa"
    out["signed"] = bool(aq.signed)
    out["act_bits"] = aq.bits().detach().reshape(-1).to(torch.int64).numpy()
    out["act_exp"] = aq.exponents().reshape(-1).to(torch.int64).numpy()
    if layer.bias is not None:
        unit = layer.accumulator_step()
        out["bias_int"] = round_half_up(layer.bias.detach().double() / unit).to(torch.int64).numpy()
    return out


def _check_range(name: str, values: np.ndarray, dtype: type) -> np.ndarray:
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise ExportError(f"{name} has values outside the {np.dtype(dtype).name} range: cannot pack it")
    return values.astype(dtype)


def _float_params(model: nn.Module) -> dict[str, torch.Tensor]:
    inside = {n for n, _ in quant_linears(model)}
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        owner = name.rpartition(".")[0]
        if any(owner == q or owner.startswith(q + ".") for q in inside):
            continue
        out[name] = t.detach().float().contiguous()
    return out


def save_packed(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the quantized TabPFN ``model`` to ``path``; return the byte counts by part.

    The model must be quantized (:func:`~mpqat.tabpfn.quant.quantize_tabpfn`) and calibrated (at
    least one training-mode forward, e.g. :func:`~mpqat.tabpfn.finetune.finetune`).
    """
    from safetensors.torch import save_file

    layers = quant_linears(model)
    if not layers:
        raise ExportError("the model has no quantized linear layer: quantize it with quantize_tabpfn first")
    if not isinstance(getattr(model, "config", None), TabPFNConfig):
        raise ExportError("save_packed expects a (quantized) mpqat.tabpfn TabPFN model")
    tensors: dict[str, torch.Tensor] = {}
    meta_layers = []
    sizes = {"weights": 0, "scales": 0, "biases": 0, "act_metadata": 0, "row_bits": 0}
    for name, layer in layers:
        if not bool(layer.weight_quant.initialized) or not bool(getattr(layer.act_quant, "initialized", True)):
            raise ExportError(f"layer '{name}' is not calibrated: run a training-mode forward (or finetune) before packing")
        a = layer_arrays(layer)
        packed = pack_rows(a["codes"], a["row_bits"], signed=True)
        tensors[f"{name}.codes"] = torch.frombuffer(bytearray(packed), dtype=torch.uint8) if packed else torch.zeros(0, dtype=torch.uint8)
        tensors[f"{name}.row_bits"] = torch.from_numpy(_check_range(name, a["row_bits"], np.uint8))
        tensors[f"{name}.scale"] = torch.from_numpy(a["scale"])
        sizes["weights"] += len(packed)
        sizes["row_bits"] += a["row_bits"].size
        sizes["scales"] += 4 * a["scale"].size
        if a["kind"] == "w":
            if "bias" in a:
                tensors[f"{name}.bias"] = torch.from_numpy(a["bias"])
                sizes["biases"] += 4 * a["bias"].size
        else:
            tensors[f"{name}.act_bits"] = torch.from_numpy(_check_range(name, a["act_bits"], np.uint8))
            tensors[f"{name}.act_exp"] = torch.from_numpy(_check_range(name, a["act_exp"], np.int8))
            sizes["act_metadata"] += 2 * a["act_bits"].size
            if "bias_int" in a:
                tensors[f"{name}.bias_int"] = torch.from_numpy(_check_range(f"{name} bias", a["bias_int"], np.int32))
                sizes["biases"] += 4 * a["bias_int"].size
        meta_layers.append({"name": name, "kind": a["kind"], "in": layer.in_features, "out": layer.out_features,
                            "signed": a.get("signed", True), "bias": layer.bias is not None})
    floats = _float_params(model)
    for name, t in floats.items():
        tensors[f"float.{name}"] = t
    sizes["float_params"] = 4 * sum(t.numel() for t in floats.values())
    metadata = {"format": FORMAT, "config": json.dumps(model.config.to_dict()), "layers": json.dumps(meta_layers),
                "float_ops": json.dumps(FLOAT_OPS)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return {**sizes, "payload_bytes": sum(sizes.values()), "file_bytes": path.stat().st_size,
            "checkpoint_bytes": CHECKPOINT_BYTES, "n_layers": len(layers)}


class PackedLinear(nn.Module):
    """A linear layer rebuilt from the packed file: float64 compute with integer codes, dyadic
    scales and power-of-two input steps (exactly ``QuantLinear``'s eval path)."""

    def __init__(self, codes: np.ndarray, scale: np.ndarray, bias: torch.Tensor | None,
                 act: tuple[np.ndarray, np.ndarray, bool] | None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight_q", torch.from_numpy(codes).double() * torch.from_numpy(scale).double()[:, None])
        self.register_buffer("bias_q", bias)
        self.act = act is not None
        if act is not None:
            bits, exps, signed = act
            qmax = 2.0 ** (torch.from_numpy(bits).double() - 1) - 1 if signed else 2.0 ** torch.from_numpy(bits).double() - 1
            self.register_buffer("step", torch.exp2(torch.from_numpy(exps).double()))
            self.register_buffer("qmax", qmax)
            self.register_buffer("qmin", -qmax if signed else torch.zeros_like(qmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        if self.act:
            x64 = torch.clamp(round_half_up(x64 / self.step), self.qmin, self.qmax) * self.step
        return F.linear(x64, self.weight_q, self.bias_q)


class PackedTabPFN(TabPFN):
    """TabPFN v1 whose linear layers are :class:`PackedLinear`; ``float_ops`` lists what stays float."""

    float_ops: tuple[str, ...] = FLOAT_OPS


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def load_packed(path: str | os.PathLike[str]) -> PackedTabPFN:
    """Rebuild a runnable (eval-mode) model from a file written by :func:`save_packed`."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"packed TabPFN file '{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ExportError(f"'{path}' is not a packed TabPFN file (format {meta.get('format')!r}, expected {FORMAT!r})")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        config = TabPFNConfig(**json.loads(meta["config"]))
        layers = json.loads(meta["layers"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, TypeError) as exc:
        raise ExportError(f"cannot read packed TabPFN file '{path}' ({type(exc).__name__}: {exc}); write it again") from None
    model = PackedTabPFN(config)
    used = set()
    for spec in layers:
        name, n_out, n_in = spec["name"], int(spec["out"]), int(spec["in"])
        try:
            row_bits = tensors[f"{name}.row_bits"].numpy().astype(np.int64)
            codes = unpack_rows(tensors[f"{name}.codes"].numpy(), (n_out, n_in), row_bits, signed=True)
            scale = tensors[f"{name}.scale"].numpy().astype(np.float64)
            used.update({f"{name}.codes", f"{name}.row_bits", f"{name}.scale"})
            act, bias = None, None
            if spec["kind"] == "wa":
                bits = tensors[f"{name}.act_bits"].numpy().astype(np.int64)
                exps = tensors[f"{name}.act_exp"].numpy().astype(np.int64)
                act = (bits, exps, bool(spec["signed"]))
                used.update({f"{name}.act_bits", f"{name}.act_exp"})
                if spec["bias"]:
                    unit = torch.from_numpy(scale) * 2.0 ** int(exps.min())
                    bias = tensors[f"{name}.bias_int"].double() * unit.expand(n_out)
                    used.add(f"{name}.bias_int")
            elif spec["bias"]:
                bias = tensors[f"{name}.bias"].double()
                used.add(f"{name}.bias")
        except (KeyError, ValueError) as exc:
            raise ExportError(f"packed TabPFN file '{path}' is damaged at layer '{name}' ({exc}); write it again") from None
        _set_submodule(model, name, PackedLinear(codes, np.broadcast_to(scale, (n_out,)).copy(), bias, act))
    own = dict(model.named_parameters())
    own.update({k: v for k, v in model.named_buffers() if not any(k.startswith(s["name"] + ".") for s in layers)})
    with torch.no_grad():
        for name, target in own.items():
            key = f"float.{name}"
            if key not in tensors or tensors[key].shape != target.shape:
                raise ExportError(f"packed TabPFN file '{path}' lacks the float tensor '{name}' (or its shape differs)")
            target.copy_(tensors[key])
            used.add(key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ExportError(f"packed TabPFN file '{path}' has tensors this loader does not know: {', '.join(unused[:5])}")
    model.requires_grad_(False)
    return model.eval()


def packed_weight_bytes(row_bits: np.ndarray, in_features: int) -> int:
    """Bytes of one layer's packed codes (each bit-width group padded to a byte)."""
    return packed_rows_nbytes(row_bits, in_features)
