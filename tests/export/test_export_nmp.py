"""NMP-QAT models (learned per-neuron bits) export bit for bit, before and after freeze()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_testutils import sample_inputs

from mpqat.export import export
from mpqat.models import MLP
from mpqat.nn.linear import QuantLinear
from mpqat.quantize import quantize

nmp = pytest.importorskip("mpqat.methods.nmp")
freeze_mod = pytest.importorskip("mpqat.freeze")


def _nmp_model(seed: int, **recipe) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = quantize(MLP(12, 3, hidden=(32, 32)), nmp.NeuronBits(**recipe)).train()
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            for q in (layer.weight_quant, layer.act_quant):
                if getattr(q, "strength", None) is not None:  # random strengths: mixed bit-widths
                    with torch.no_grad():
                        q.strength.copy_(torch.rand_like(q.strength))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        loss = model(torch.randn(64, 12) * 2).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("recipe", [{}, {"per_feature_clip": True}])
def test_nmp_models_export_exactly(recipe) -> None:
    model = _nmp_model(0, **recipe)
    x = sample_inputs(1000, 12)
    for candidate in (model, freeze_mod.freeze(model)):
        graph = export(candidate, torch.from_numpy(x[:32]))
        expected = candidate(torch.from_numpy(x)).double().numpy()
        assert np.array_equal(graph.run(x, backend="int64"), expected)
        assert np.array_equal(graph.run(x), expected)
    widths = set().union(*(layer.weight_bits for layer in graph.layers))
    assert len(widths) >= 3  # really mixed
    assert {4, 8, 16} <= set(graph.layers[1].act_bits)
