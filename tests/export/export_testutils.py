"""Helpers for the export tests: small trained quantized MLPs and random integer graphs."""

from __future__ import annotations

import numpy as np
import torch

from mpqat import quantize
from mpqat.errors import ExportError
from mpqat.export.ir import DequantizeOutput, IntegerGraph, IntegerLinear, QuantizeInput, Requantize
from mpqat.models import MLP
from mpqat.nn.linear import QuantLinear
from mpqat.recipes import Uniform


def trained_model(
    w_bits: int = 4,
    a_bits: int = 4,
    *,
    per_feature_act: bool = False,
    per_neuron_scale: bool = True,
    in_features: int = 12,
    n_classes: int = 3,
    hidden: tuple[int, ...] = (32, 32),
    mixed: bool = False,
    dropout: float = 0.0,
    steps: int = 5,
    seed: int = 0,
) -> torch.nn.Module:
    """A quantized MLP after a few Adam steps on random data (so scales initialise), in eval mode.

    ``mixed=True`` emulates NMP-QAT layers: each layer's weight rows get a random mix of 1/2/4/8 bits
    and every hidden layer's input features a random mix of 4/8/16 bits (use with per-feature steps).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    recipe = Uniform(w_bits=w_bits, a_bits=a_bits, per_feature_act=per_feature_act, per_neuron_scale=per_neuron_scale)
    model = quantize(MLP(in_features, n_classes, hidden=hidden, dropout=dropout), recipe)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if mixed:
        for index, layer in enumerate(layers):
            wb = layer.weight_quant.bit_widths
            choice = torch.tensor([1.0, 2.0, 4.0, 8.0])[torch.randint(0, 4, (wb.numel(),), generator=gen)]
            wb.copy_(choice.reshape(wb.shape))
            ab = layer.act_quant.bit_widths
            if index > 0 and ab.numel() > 1:
                ab.copy_(torch.tensor([4.0, 8.0, 16.0])[torch.randint(0, 3, (ab.numel(),), generator=gen)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x = torch.randn(64, in_features, generator=gen) * 2
        y = torch.randint(0, n_classes, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def model_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).double().numpy()


def sample_inputs(n: int, d: int, seed: int = 1) -> np.ndarray:
    """Float32 rows mixing normal values, large values (to saturate) and exact rounding ties."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.choice([0.5, 2.0, 50.0], size=(n, 1))
    ties = rng.integers(-40, 40, size=(n, d)) / 8.0 + 1 / 16.0  # many values on half-steps
    x = np.where(rng.random((n, d)) < 0.2, ties, x)
    return x.astype(np.float32)


def random_graph(seed: int, n_in: int = 6, widths: tuple[int, ...] = (7, 5, 3)) -> IntegerGraph:
    """A random valid integer graph: mixed widths (0..16 bits), dead columns, negative and large shifts."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        nodes: list = []
        exponent = rng.integers(-6, 3, size=n_in)
        bits = rng.choice([4, 8, 16], size=n_in)
        nodes.append(QuantizeInput(exponent=exponent, bits=bits, signed=True, relu=bool(rng.random() < 0.2)))
        size = n_in
        for index, out in enumerate(widths):
            w_bits = rng.choice([0, 1, 2, 3, 4, 8, 16], size=out)
            weight = np.zeros((out, size), dtype=np.int64)
            for j, b in enumerate(w_bits):
                if b == 1:
                    weight[j] = rng.choice([-1, 1], size=size)
                elif b >= 2:
                    q = 2 ** (b - 1) - 1
                    weight[j] = rng.integers(-q, q + 1, size=size)
            if size > 1:
                weight[:, rng.integers(0, size)] *= (w_bits == 1) | (w_bits == 0)  # a mostly dead column
            k_acc = int(exponent.min()) - int(rng.integers(0, 2))
            mult = rng.integers(1, 2 ** int(rng.integers(1, 17)), size=out) | 1
            scale_exp = rng.integers(5, 40, size=out)
            bias = rng.integers(-(2**12), 2**12, size=out)
            nodes.append(IntegerLinear(weight=weight, weight_bits=w_bits, bias=bias, mult=mult, scale_exp=scale_exp,
                                       acc_exponent=k_acc, name=f"fc{index}"))
            if index < len(widths) - 1:
                # choose next exponents around acc_exp so that shifts are small, negative or large
                # s_j = k'_j - (K - e_j) = e_j - E + small: negative, moderate or beyond 53
                offset = int(rng.choice([-20, -10, 10, 30, 50]))
                exponent = k_acc - offset + rng.integers(0, 4, size=out)
                bits = rng.choice([4, 8, 16], size=out)
                signed = bool(rng.random() < 0.3)
                nodes.append(Requantize(exponent=exponent, bits=bits, signed=signed, relu=bool(rng.random() < 0.7)))
            size = out
        nodes.append(DequantizeOutput())
        try:
            return IntegerGraph(nodes)
        except ExportError:
            continue
    raise AssertionError("could not draw a valid random graph")


def random_graph_inputs(graph: IntegerGraph, n: int, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.ldexp(1.0, graph.nodes[0].exponent) * rng.choice([1, 30, 3000], size=(n, 1))
    return (rng.normal(size=(n, graph.input_dim)) * scale).astype(np.float32)
