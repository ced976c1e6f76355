"""TabPFN v1 architecture: shapes, the train/test attention pattern, the strict checkpoint loader."""

from __future__ import annotations

import pickle

import pytest
import torch

from mpqat.errors import CheckpointError
from mpqat.tabpfn.model import (
    TabPFN,
    TabPFNConfig,
    config_from_state_dict,
    load_state_dict_strict,
    load_tabpfn,
    map_checkpoint,
    read_checkpoint,
)

from tabpfn_testutils import original_state_dict, write_checkpoint


def _inputs(cfg: TabPFNConfig, n_ctx: int = 10, n_query: int = 4, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_ctx + n_query, cfg.n_features, generator=g)
    y = torch.randint(0, 3, (batch, n_ctx), generator=g).float()
    return x, y


def test_forward_shapes_and_config(tiny_model, tiny_config):
    x, y = _inputs(tiny_config)
    out = tiny_model(x, y)
    assert out.shape == (2, 4, tiny_config.n_out)
    assert torch.isfinite(out).all()
    v1 = TabPFNConfig.v1()
    assert (v1.emsize, v1.nhead, v1.nhid, v1.nlayers, v1.n_features, v1.n_out) == (512, 4, 1024, 12, 100, 10)


def test_query_rows_only_see_the_context(tiny_model, tiny_config):
    x, y = _inputs(tiny_config)
    base = tiny_model(x, y)
    changed = x.clone()
    changed[:, 11] += 5.0  # the second query row
    out = tiny_model(changed, y)
    others = [0, 2, 3]
    assert torch.equal(out[:, others], base[:, others])
    assert not torch.allclose(out[:, 1], base[:, 1])
    # a context row or label change reaches every query
    ctx_changed = x.clone()
    ctx_changed[:, 3] += 5.0
    assert not torch.allclose(tiny_model(ctx_changed, y), base)
    y2 = y.clone()
    y2[:, 0] = (y2[:, 0] + 1) % 3
    assert not torch.allclose(tiny_model(x, y2), base)


def test_query_order_and_count_do_not_matter(tiny_model, tiny_config):
    x, y = _inputs(tiny_config, n_query=4)
    full = tiny_model(x, y)
    perm = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 12, 11, 10])
    assert torch.allclose(tiny_model(x[:, perm], y), full.flip(1), atol=1e-6)
    assert torch.allclose(tiny_model(x[:, :11], y), full[:, :1], atol=1e-6)


def test_forward_rejects_bad_inputs(tiny_model, tiny_config):
    x, y = _inputs(tiny_config)
    with pytest.raises(ValueError, match="context and one query"):
        tiny_model(x[:, :10], y)
    with pytest.raises(ValueError, match="padded"):
        tiny_model(x[..., :5], y)


def test_strict_loader_round_trip(tiny_model, tiny_config):
    sd = original_state_dict(tiny_model)
    assert len(sd) == 12 * tiny_config.nlayers + 9
    fresh = TabPFN(tiny_config)
    load_state_dict_strict(fresh, sd)
    x, y = _inputs(tiny_config)
    assert torch.equal(fresh.eval()(x, y), tiny_model(x, y))
    # without the DDP prefix too
    fresh2 = TabPFN(tiny_config)
    load_state_dict_strict(fresh2, original_state_dict(tiny_model, prefix=""))
    assert torch.equal(fresh2.layers[1].attn.k.weight, tiny_model.layers[1].attn.k.weight)


def test_in_proj_is_split_into_q_k_v(tiny_model):
    sd = original_state_dict(tiny_model)
    fused = sd["module.transformer_encoder.layers.0.self_attn.in_proj_weight"]
    mapped = map_checkpoint(sd)
    e = fused.shape[1]
    assert torch.equal(mapped["layers.0.attn.q.weight"], fused[:e])
    assert torch.equal(mapped["layers.0.attn.k.weight"], fused[e : 2 * e])
    assert torch.equal(mapped["layers.0.attn.v.weight"], fused[2 * e :])


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing 1 tensor"),
    ("extra", "does not use"),
    ("shape", "shapes do not match"),
    ("not_tensor", "not a tensor"),
    ("extra_layer", "the model does not have"),
])
def test_strict_loader_rejects_damaged_state(tiny_model, tiny_config, damage, message):
    sd = original_state_dict(tiny_model)
    if damage == "missing":
        del sd["module.transformer_encoder.layers.1.norm2.bias"]
    elif damage == "extra":
        sd["module.pos_encoder.weight"] = torch.zeros(3)
    elif damage == "shape":
        sd["module.decoder.2.weight"] = torch.zeros(10, 7)
    elif damage == "not_tensor":
        sd["module.encoder.bias"] = [0.0]
    elif damage == "extra_layer":
        for k, v in list(sd.items()):
            if ".layers.1." in k:
                sd[k.replace(".layers.1.", ".layers.2.")] = v
    with pytest.raises(CheckpointError, match=message):
        load_state_dict_strict(TabPFN(tiny_config), sd)


def test_config_is_inferred_from_shapes(tiny_model, tiny_config):
    cfg = config_from_state_dict(original_state_dict(tiny_model), nhead=tiny_config.nhead)
    assert cfg == tiny_config
    sd = original_state_dict(tiny_model)
    del sd["module.encoder.weight"]
    with pytest.raises(CheckpointError, match="not a TabPFN v1 state dict"):
        config_from_state_dict(sd)


def test_load_tabpfn_from_file_with_weights_only(tiny_model, tmp_path):
    path = write_checkpoint(tiny_model, tmp_path / "tiny.cpkt")
    state, config = read_checkpoint(path)
    assert config["nhead"] == tiny_model.config.nhead and len(state) == 33
    loaded = load_tabpfn(path)
    assert not loaded.training and loaded.config == tiny_model.config
    x, y = _inputs(tiny_model.config)
    assert torch.equal(loaded(x, y), tiny_model(x, y))


class _NotAllowed:
    def __reduce__(self):  # would run code under a plain unpickler
        return (print, ("this must never run",))


def test_read_checkpoint_refuses_unsafe_or_broken_files(tmp_path, capsys):
    evil = tmp_path / "evil.cpkt"
    with open(evil, "wb") as fh:
        pickle.dump((_NotAllowed(), None, {}), fh, protocol=2)
    with pytest.raises(CheckpointError, match="safely"):
        read_checkpoint(evil)
    assert "must never run" not in capsys.readouterr().out
    broken = tmp_path / "broken.cpkt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint(broken)
    wrong = tmp_path / "wrong.cpkt"
    torch.save([1, 2, 3], wrong)
    with pytest.raises(CheckpointError, match="not a TabPFN"):
        read_checkpoint(wrong)
    with pytest.raises(CheckpointError, match="mpqat data fetch tabpfn-v1"):
        read_checkpoint(tmp_path / "absent.cpkt")


def test_label_embedding_is_not_a_linear(tiny_model):
    assert not isinstance(tiny_model.y_encoder, torch.nn.Linear)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_model.modules())
    assert n_linear == 1 + 6 * tiny_model.config.nlayers + 2
