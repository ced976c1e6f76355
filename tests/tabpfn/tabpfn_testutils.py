"""Helpers for the TabPFN tests: the original checkpoint layout of a (tiny) model."""

from __future__ import annotations

from pathlib import Path

import torch

from mpqat.tabpfn.model import TabPFN


def original_state_dict(model: TabPFN, prefix: str = "module.") -> dict[str, torch.Tensor]:
    """``model``'s tensors under the names and layout of the original TabPFN v1 checkpoint
    (fused ``self_attn.in_proj_weight``, ``criterion.weight``, DDP ``module.`` prefix)."""
    sd = {}
    for i, layer in enumerate(model.layers):
        base = f"{prefix}transformer_encoder.layers.{i}."
        a = layer.attn
        sd[base + "self_attn.in_proj_weight"] = torch.cat([a.q.weight, a.k.weight, a.v.weight]).detach().clone()
        sd[base + "self_attn.in_proj_bias"] = torch.cat([a.q.bias, a.k.bias, a.v.bias]).detach().clone()
        sd[base + "self_attn.out_proj.weight"] = a.out.weight.detach().clone()
        sd[base + "self_attn.out_proj.bias"] = a.out.bias.detach().clone()
        for name in ("linear1", "linear2", "norm1", "norm2"):
            mod = getattr(layer, name)
            sd[base + f"{name}.weight"] = mod.weight.detach().clone()
            sd[base + f"{name}.bias"] = mod.bias.detach().clone()
    for name in ("encoder", "y_encoder", "decoder.0", "decoder.2"):
        mod = model.get_submodule(name)
        sd[f"{prefix}{name}.weight"] = mod.weight.detach().clone()
        sd[f"{prefix}{name}.bias"] = mod.bias.detach().clone()
    sd[f"{prefix}criterion.weight"] = model.loss_weight.detach().clone()
    return sd


def write_checkpoint(model: TabPFN, path: Path, nhead: int | None = None) -> Path:
    """Save ``model`` in the original ``(state_dict, None, config)`` tuple format."""
    config = {"emsize": model.config.emsize, "nhead": nhead or model.config.nhead, "nlayers": model.config.nlayers,
              "num_features": model.config.n_features, "prior_mlp_activations": "<class 'torch.nn.Tanh'>"}
    torch.save((original_state_dict(model), None, config), path)
    return path
