"""A configurable multi-layer perceptron for tabular data.

Example:
    >>> import torch
    >>> MLP(10, 2, hidden=(32, 32))(torch.randn(4, 10)).shape
    torch.Size([4, 2])
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLP(nn.Sequential):
    """``Linear -> ReLU -> (Dropout) -> ... -> Linear`` with the given hidden widths."""

    def __init__(self, in_features: int, n_classes: int, hidden: Sequence[int] = (128, 128), dropout: float = 0.0):
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, n_classes))
        super().__init__(*layers)
        self.in_features = in_features
        self.n_classes = n_classes
        self.hidden = tuple(hidden)
