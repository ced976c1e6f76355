"""Episodic QAT fine-tuning runs a few steps for every variant and keeps the best state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpqat.errors import ConfigError, DatasetError
from mpqat.methods.nmp import NeuronBits
from mpqat.recipes import FP32, Uniform
from mpqat.tabpfn.finetune import EpisodeSampler, FinetuneConfig, episode_loss, finetune
from mpqat.tabpfn.quant import quantize_tabpfn


def _cfg(**kw):
    base = dict(episodes=3, n_ctx=40, n_query=16, eval_every=2, eval_rows=20, lr=1e-3, progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def test_episode_sampler_shapes_and_labels(toy_data):
    X, y = toy_data
    s = EpisodeSampler(X, y, n_ctx=40, n_query=16, n_classes=2, n_features=8, seed=0)
    x, y_ctx, y_q = s.sample()
    assert x.shape == (1, 56, 8) and y_ctx.shape == (1, 40) and y_q.shape == (1, 16)
    assert set(y_ctx.unique().tolist()) <= {0.0, 1.0} and y_q.dtype == torch.int64
    small = EpisodeSampler(X[:20], y[:20], n_ctx=512, n_query=128, n_classes=2, n_features=8)
    assert small.n_ctx + small.n_query <= 20 and small.n_query == 5
    with pytest.raises(DatasetError):
        EpisodeSampler(X[:3], y[:3], 2, 1, 2)


@pytest.mark.parametrize("recipe, activations", [
    (NeuronBits(w_init_strength=0.35, strength_lr_mult=300.0), True),
    (NeuronBits(w_init_strength=0.35, strength_lr_mult=300.0), False),
    (Uniform(w_bits=4, a_bits=8), True),
])
def test_finetune_steps_change_the_model(tiny_model, toy_data, recipe, activations):
    X, y = toy_data
    q = quantize_tabpfn(tiny_model, recipe, activations=activations)
    before = q.layers[0].linear1.weight.detach().clone()
    res = finetune(q, recipe, (X[:90], y[:90]), (X[90:], y[90:]), _cfg())
    assert [h["episode"] for h in res.history] == [0, 2, 3]
    assert all(np.isfinite(h["train_loss"]) for h in res.history[1:])
    assert res.best_episode in (0, 2, 3) and 0.0 <= res.best_valid_accuracy <= 1.0
    assert not q.training
    if res.best_episode > 0:
        assert not torch.equal(before, q.layers[0].linear1.weight)
    assert res.history[0]["avg_weight_bits"] < 32
    if isinstance(recipe, NeuronBits):
        assert "nmp" in res.final_metrics


def test_finetune_fp32_and_zero_episodes(tiny_model, toy_data):
    X, y = toy_data
    res = finetune(quantize_tabpfn(tiny_model, FP32()), FP32(), (X[:90], y[:90]), (X[90:], y[90:]), _cfg(episodes=2))
    assert len(res.history) == 2 and res.history[0]["avg_weight_bits"] == 32.0
    res0 = finetune(quantize_tabpfn(tiny_model, Uniform()), Uniform(), (X[:90], y[:90]), (X[90:], y[90:]), _cfg(episodes=0))
    assert len(res0.history) == 1 and res0.seconds_per_episode == 0.0


def test_episode_loss_uses_the_checkpoint_class_weights(tiny_model, toy_data):
    X, y = toy_data
    x, y_ctx, y_q = EpisodeSampler(X, y, 40, 16, 2, 8).sample()
    loss = episode_loss(tiny_model, x, y_ctx, y_q, 2)
    tiny_model.loss_weight[1] = 0.0
    weighted = episode_loss(tiny_model, x, y_ctx, y_q, 2)
    assert torch.isfinite(loss) and not torch.isclose(loss, weighted)


def test_finetune_config_is_validated():
    with pytest.raises(ConfigError):
        FinetuneConfig(n_ctx=2000)
    with pytest.raises(ConfigError):
        FinetuneConfig(episodes=-1)
    with pytest.raises(ConfigError):
        FinetuneConfig(lr=0.0)
