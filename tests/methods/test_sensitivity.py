"""Sensitivity: Hutchinson traces against the exact Hessian, quantization error, loss increase."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from mpqat.methods.sensitivity import (
    TraceEstimate,
    hessian_omega,
    hutchinson_traces,
    loss_sensitivity,
    quant_error,
    uniform_fake_quant,
)


def _tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    return model, X, y


def _exact_trace(model, name, X, y):
    """Tr of the Hessian of the mean cross-entropy w.r.t. parameter ``name`` (torch.autograd.functional.hessian)."""
    params = dict(model.named_parameters())
    shape = params[name].shape

    def loss_of(flat):
        values = {**params, name: flat.reshape(shape)}
        return F.cross_entropy(functional_call(model, values, (X,)), y)

    hessian = torch.autograd.functional.hessian(loss_of, params[name].detach().flatten())
    return float(torch.diagonal(hessian).sum())


def test_hutchinson_matches_the_exact_hessian_trace():
    model, X, y = _tiny_problem()
    weights = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    est = hutchinson_traces(model, weights, X, y, max_samples=1024, tol=0.0, block=128,
                            generator=torch.Generator().manual_seed(1))
    for name in weights:
        exact = _exact_trace(model, name, X, y)
        e = est[name]
        assert e.samples == 1024
        assert abs(e.trace - exact) <= 4 * e.stderr, (name, e, exact)   # within 4 standard errors
        assert abs(e.trace - exact) <= 0.15 * abs(exact), (name, e, exact)
        assert e.stderr <= 0.1 * abs(exact)
        assert math.isclose(e.per_param, e.trace / weights[name].numel())


def test_batching_gives_the_mean_over_the_whole_calibration_set():
    model, X, y = _tiny_problem(1)
    weights = {"w": model[2].weight}
    one = hutchinson_traces(model, weights, X, y, max_samples=16, batch_size=40, generator=torch.Generator().manual_seed(3))
    many = hutchinson_traces(model, weights, X, y, max_samples=16, batch_size=7, generator=torch.Generator().manual_seed(3))
    assert math.isclose(one["w"].trace, many["w"].trace, rel_tol=1e-9)


def test_tolerance_stops_early_and_leaves_the_model_as_it_was():
    model, X, y = _tiny_problem(2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = hutchinson_traces(model, {"w": model[0].weight}, X, y, max_samples=400, min_samples=16, tol=0.5,
                            generator=torch.Generator().manual_seed(0))
    assert 16 <= est["w"].samples < 400
    assert est["w"].stderr <= 0.5 * abs(est["w"].trace)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_uniform_quantizer_error_falls_with_bits_and_is_pluggable():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    errors = [quant_error(w, b) for b in (2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    q = uniform_fake_quant(w, 3)
    steps = 2 * w.abs().mean(1, keepdim=True) / math.sqrt(3)
    assert torch.allclose(q / steps, torch.round(q / steps), atol=1e-4)      # on the grid
    assert (q / steps).abs().max() <= 3 + 1e-4                              # within [-Q_P, Q_P]
    assert quant_error(w, 2, quantize=lambda t, b: t) == 0.0                 # a perfect "quantizer"


def test_hessian_omega_is_trace_per_parameter_times_error():
    w = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    est = {"a": TraceEstimate(trace=40.0, stderr=0.0, numel=20, samples=1)}
    table = hessian_omega(est, {"a": w}, (2, 4), error_fn=lambda t, b: float(b))
    assert table.tolist() == [[4.0, 8.0]]


def test_loss_sensitivity_quantizes_one_layer_at_a_time_and_restores_it():
    model, X, y = _tiny_problem(3)
    weights = {"0": model[0].weight, "2": model[2].weight}
    before = {k: v.clone() for k, v in weights.items()}
    table = loss_sensitivity(model, weights, X, y, (1, 2, 16), clip_negative=False)
    assert table.shape == (2, 3)
    assert all(torch.equal(before[k], w) for k, w in weights.items())
    assert (np.abs(table[:, 2]) < np.abs(table[:, 0])).all()
    with torch.no_grad():
        base = float(F.cross_entropy(model(X), y))
        model[2].weight.copy_(uniform_fake_quant(before["2"], 2))
        direct = float(F.cross_entropy(model(X), y)) - base
        model[2].weight.copy_(before["2"])
    assert table[1, 1] == pytest.approx(direct, rel=1e-9)
    assert np.allclose(loss_sensitivity(model, weights, X, y, (2,), quantize=lambda t, b: t), 0.0)
    assert (loss_sensitivity(model, weights, X, y, (1, 2, 16)) == np.maximum(table, 0)).all()


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_sample_counts_are_refused(bad):
    model, X, y = _tiny_problem()
    with pytest.raises(ValueError):
        hutchinson_traces(model, {"w": model[0].weight}, X, y, max_samples=bad)
