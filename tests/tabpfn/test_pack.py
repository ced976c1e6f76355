"""Packed export of a quantized TabPFN: exact round trip of every linear layer and of the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpqat.errors import ExportError
from mpqat.export.pack import unpack_rows
from mpqat.methods.nmp import NeuronBits
from mpqat.recipes import Uniform
from mpqat.tabpfn.finetune import FinetuneConfig, finetune
from mpqat.tabpfn.pack import FLOAT_OPS, PackedLinear, layer_arrays, load_packed, save_packed
from mpqat.tabpfn.quant import quant_linears, quantize_tabpfn


def _trained(tiny_model, toy_data, recipe, activations):
    X, y = toy_data
    q = quantize_tabpfn(tiny_model, recipe, activations=activations)
    finetune(q, recipe, (X[:90], y[:90]), (X[90:], y[90:]),
             FinetuneConfig(episodes=2, n_ctx=40, n_query=16, eval_every=0, eval_rows=10, lr=1e-3, progress=False))
    return q


@pytest.mark.parametrize("recipe, activations", [
    (NeuronBits(w_init_strength=0.35, strength_lr_mult=3000.0), True),
    (NeuronBits(w_init_strength=0.35, strength_lr_mult=3000.0), False),
    (Uniform(w_bits=3, a_bits=6, per_feature_act=True), True),
])
def test_round_trip_is_exact(tiny_model, toy_data, tmp_path, recipe, activations):
    q = _trained(tiny_model, toy_data, recipe, activations)
    path = tmp_path / "tiny.safetensors"
    report = save_packed(q, path)
    assert report["file_bytes"] == path.stat().st_size and report["n_layers"] == len(quant_linears(q))
    packed = load_packed(path)
    assert packed.float_ops == FLOAT_OPS and not packed.training
    gen = torch.Generator().manual_seed(1)
    # every linear layer: same float64 outputs from the unpacked codes as from the quantized layer
    for name, layer in quant_linears(q):
        x = torch.randn(7, layer.in_features, generator=gen) * 3
        rebuilt = packed.get_submodule(name)
        assert isinstance(rebuilt, PackedLinear)
        assert torch.equal(rebuilt(x), layer(x)), name
    # and the whole model
    x, y = torch.randn(2, 20, 8, generator=gen), torch.randint(0, 2, (2, 14), generator=gen).float()
    assert torch.equal(packed(x, y), q(x, y))


def test_codes_are_packed_with_their_row_bits(tiny_model, toy_data, tmp_path):
    q = _trained(tiny_model, toy_data, NeuronBits(w_init_strength=0.35, strength_lr_mult=3000.0), True)
    with torch.no_grad():  # force mixed widths in one layer: rows at 1, 2, 4 and 8 bits
        q.layers[0].linear1.weight_quant.strength[:4, 0] = torch.tensor([0.1, 0.3, 0.6, 0.9])
    a = layer_arrays(q.layers[0].linear1)
    assert set(a["row_bits"][:4].tolist()) == {1, 2, 4, 8}
    report = save_packed(q, tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "m.safetensors"))
    codes = unpack_rows(tensors["layers.0.linear1.codes"].numpy(), a["codes"].shape, a["row_bits"], signed=True)
    assert np.array_equal(codes, a["codes"])
    assert report["weights"] < sum(a2["codes"].size for a2 in (layer_arrays(m) for _, m in quant_linears(q)))


def test_pack_errors(tiny_model, toy_data, tmp_path):
    with pytest.raises(ExportError, match="no quantized linear"):
        save_packed(tiny_model, tmp_path / "x.safetensors")
    uncalibrated = quantize_tabpfn(tiny_model, Uniform(w_bits=4, a_bits=8))
    with pytest.raises(ExportError, match="not calibrated"):
        save_packed(uncalibrated, tmp_path / "x.safetensors")
    with pytest.raises(ExportError, match="does not exist"):
        load_packed(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(ExportError, match="not a packed TabPFN"):
        load_packed(tmp_path / "other.safetensors")
    q = _trained(tiny_model, toy_data, Uniform(w_bits=4, a_bits=8), True)
    save_packed(q, tmp_path / "ok.safetensors")
    tensors = {}
    from safetensors.torch import load_file, safe_open

    with safe_open(str(tmp_path / "ok.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(tmp_path / "ok.safetensors"))
    del tensors["layers.1.linear2.scale"]
    save_file(tensors, str(tmp_path / "damaged.safetensors"), metadata=meta)
    with pytest.raises(ExportError, match="damaged at layer 'layers.1.linear2'"):
        load_packed(tmp_path / "damaged.safetensors")
