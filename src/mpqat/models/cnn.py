"""Convolutional models for image and I/Q data: LeNet-5, CIFAR-style ResNets, a small 1-D CNN.

Every model takes FLAT rows ``[n, prod(input_shape)]`` (the data pipeline is tabular arrays) and
starts with ``nn.Unflatten`` back to ``input_shape`` (``(C, H, W)`` for the 2-D models, ``(C, L)``
for :class:`CNN1d`). Each records its convolutions' input sizes at construction
(:func:`mpqat.nn.conv.record_input_sizes`), so MACs and BitOps are known before any training.

* :class:`LeNet5`: ``conv5x5(6)-relu-maxpool-conv5x5(16)-relu-maxpool-fc120-relu-fc84-relu-fc``
  (LeCun et al. 1998, with ReLU and max pooling, no padding: 28x28 -> 4x4x16 = 256 features).
* :class:`ResNet` (``resnet8``, ``resnet20``): He et al. 2016's CIFAR ResNet: a 3x3 stem conv, three
  stages of ``n`` BasicBlocks (``6n + 2`` layers) with 16/32/64 channels (times ``width``), stride 2
  at the start of stages 2 and 3, global average pooling and one linear layer; BN after every conv.
  Shortcuts that change the shape are option A (the paper's CIFAR choice: subsample by 2 and pad
  the channels with zeros; no parameters) or option B (1x1 conv + BN).
* :class:`CNN1d`: ``[conv1d-bn-relu-maxpool] * k``, global average pooling, ``fc-relu-fc`` for I/Q frames.

Quantization metadata (read by :func:`mpqat.quantize`): ``conv_bn_pairs`` says which BN folds into
which conv, and ``unsigned_input_layers`` which layers see non-negative (post-ReLU) inputs. In a
ResNet every layer but the stem conv reads a ReLU output (the block inputs and the pooled features
are ReLU outputs); definition order is not execution order there, hence the declaration.

Example:
    >>> import torch
    >>> net = ResNet(n_classes=10, input_shape=(1, 28, 28), depth=8)
    >>> net(torch.randn(2, 784)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mpqat.errors import ConfigError
from mpqat.nn.conv import record_input_sizes

_QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: rows per batch in :func:`mpqat.train.predict_logits`: the exact eval path computes in float64 on
#: whole activation maps; small batches keep them below the allocator's mmap threshold (4096 rows of
#: a 16x28x28 map are 400 MB per tensor, and page faults then cost 4x the compute)
EVAL_BATCH_SIZE = 256


def _check_shape(name: str, input_shape: Sequence[int], ndim: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != ndim or min(shape) < 1:
        what = "(channels, height, width)" if ndim == 3 else "(channels, length)"
        raise ConfigError(f"{name} needs input_shape {what}, got {tuple(input_shape)}")
    return shape


def _pairs_by_order(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` names where a BN directly follows a conv in definition order (execution order here)."""
    pairs, previous = [], None
    for name, module in model.named_modules():
        if len(list(module.children())) > 0:
            continue
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and previous is not None:
            if isinstance(previous[1], nn.Conv1d | nn.Conv2d):
                pairs.append((previous[0], name))
        previous = (name, module)
    return pairs


class LeNet5(nn.Sequential):
    """LeNet-5 for small grey-scale images (e.g. 28x28x1).

    Example:
        >>> import torch
        >>> LeNet5(10, (1, 28, 28))(torch.randn(3, 784)).shape
        torch.Size([3, 10])
    """

    eval_batch_size = EVAL_BATCH_SIZE

    def __init__(self, n_classes: int, input_shape: Sequence[int] = (1, 28, 28)) -> None:
        shape = _check_shape("lenet5", input_shape, 3)
        c, h, w = shape
        if min(h, w) < 16:
            raise ConfigError(f"lenet5 needs images of at least 16x16 pixels, got {h}x{w}")
        flat_h, flat_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        super().__init__(
            nn.Unflatten(1, shape),
            nn.Conv2d(c, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * flat_h * flat_w, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, n_classes),
        )
        self.input_shape = shape
        self.n_classes = n_classes
        record_input_sizes(self, (math.prod(shape),))


class _ShortcutA(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet of depth ``6n + 2`` (8, 14, 20, 32, ...) for flat image rows.

    Example:
        >>> import torch
        >>> net = ResNet(10, (1, 28, 28), depth=20, width=0.5)
        >>> sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()), net(torch.randn(2, 784)).shape
        (19, torch.Size([2, 10]))
    """

    eval_batch_size = EVAL_BATCH_SIZE

    def __init__(self, n_classes: int, input_shape: Sequence[int] = (3, 32, 32), depth: int = 20,
                 width: float = 1.0, shortcut: str = "A") -> None:
        super().__init__()
        shape = _check_shape(f"resnet{depth}", input_shape, 3)
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ConfigError(f"ResNet shortcut must be 'A' (zero-pad) or 'B' (1x1 conv), got {shortcut!r}")
        if not width > 0:
            raise ConfigError(f"ResNet width must be positive, got {width}")
        channels = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        n = (depth - 2) // 6
        self.input_shape = shape
        self.n_classes = n_classes
        self.depth, self.width, self.shortcut = depth, width, shortcut
        self.unflatten = nn.Unflatten(1, shape)
        self.conv = nn.Conv2d(shape[0], channels[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        in_ch = channels[0]
        for stage, out_ch in enumerate(channels):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride, shortcut))
                in_ch = out_ch
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, n_classes)
        record_input_sizes(self, (math.prod(shape),))

    @property
    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """Which BN folds into which conv (every conv here is followed by its BN)."""
        return _pairs_by_order(self)

    @property
    def unsigned_input_layers(self) -> frozenset[str]:
        """Every linear/conv layer except the stem conv reads a ReLU output."""
        return frozenset(n for n, m in self.named_modules() if isinstance(m, _QUANTIZABLE) and n != "conv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(self.unflatten(x))))
        x = self.layers(x)
        return self.fc(self.flatten(self.pool(x)))


class CNN1d(nn.Sequential):
    """1-D CNN for I/Q frames ``(channels, length)``: conv-bn-relu-maxpool blocks, average pool, MLP head.

    Example:
        >>> import torch
        >>> CNN1d(8, (2, 128))(torch.randn(4, 256)).shape
        torch.Size([4, 8])
    """

    eval_batch_size = EVAL_BATCH_SIZE

    def __init__(self, n_classes: int, input_shape: Sequence[int] = (2, 128),
                 channels: Sequence[int] = (32, 32, 64, 64), kernel_size: int = 5, hidden: int = 64) -> None:
        shape = _check_shape("cnn1d", input_shape, 2)
        if not channels or min(channels) < 1 or kernel_size < 1 or kernel_size % 2 == 0 or hidden < 1:
            raise ConfigError(
                f"cnn1d needs positive channels, an odd kernel_size and hidden >= 1, got channels={list(channels)}, "
                f"kernel_size={kernel_size}, hidden={hidden}"
            )
        if shape[1] < 2 ** len(channels):
            raise ConfigError(f"cnn1d with {len(channels)} pooling blocks needs length >= {2 ** len(channels)}, "
                              f"got {shape[1]}")
        layers: list[nn.Module] = [nn.Unflatten(1, shape)]
        in_ch = shape[0]
        for out_ch in channels:
            layers += [nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
                       nn.BatchNorm1d(out_ch), nn.ReLU(), nn.MaxPool1d(2)]
            in_ch = out_ch
        layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(in_ch, hidden), nn.ReLU(),
                   nn.Linear(hidden, n_classes)]
        super().__init__(*layers)
        self.input_shape = shape
        self.n_classes = n_classes
        record_input_sizes(self, (math.prod(shape),))
