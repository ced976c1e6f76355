"""BatchNorm folding: merge a BatchNorm that follows a convolution into the convolution.

With the BN's running statistics (``mu``, ``var``), ``eps`` and affine parameters (``gamma``, ``beta``),
``sigma = sqrt(var + eps)`` and, per output channel,

    ``W' = gamma / sigma * W``,   ``b' = beta + gamma / sigma * (b - mu)``

(``b' = beta - gamma*mu/sigma`` for a conv without bias), so that ``conv'(x) == bn(conv(x))`` in eval
mode. The BN is replaced by ``nn.Identity`` and the conv always gets a bias. METHODS.md §0.3: the
folded weights are the ones that get quantized, so the integer model equals the trained one.

Which BN belongs to which conv: a model may declare the pairs with an attribute
``conv_bn_pairs`` (``[(conv_name, bn_name), ...]``, names as in ``named_modules``). Otherwise every
BN whose previous leaf module in definition order is a conv with as many output channels is folded
into it (the usual ``conv -> bn`` definition order in ``nn.Sequential`` and in ResNet blocks). BNs
that follow anything else (e.g. a linear layer) are left alone. The outcome depends on the model's
structure only, never on the parameter values.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).eval()
    >>> x = torch.randn(4, 1, 6, 6)
    >>> before = net(x)
    >>> fold_batchnorms(net)
    ['0']
    >>> type(net[1]).__name__, torch.allclose(net(x), before, atol=1e-6)
    ('Identity', True)
"""

from __future__ import annotations

import torch
from torch import nn

from mpqat.errors import ConfigError

_CONVS = (nn.Conv1d, nn.Conv2d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval-mode statistics) into ``conv`` in place; ``conv`` gets a bias if it had none.

    Example:
        >>> conv, bn = nn.Conv1d(2, 3, 3, bias=False), nn.BatchNorm1d(3).eval()
        >>> fold_conv_bn(conv, bn)
        >>> conv.bias.shape
        torch.Size([3])
    """
    if not isinstance(conv, _CONVS) or not isinstance(bn, _BNS):
        raise ConfigError(f"fold_conv_bn: expected a Conv1d/Conv2d and a BatchNorm, got {type(conv).__name__}, "
                          f"{type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise ConfigError(f"fold_conv_bn: the BatchNorm has {bn.num_features} features but the conv has "
                          f"{conv.out_channels} output channels")
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError("fold_conv_bn: the BatchNorm has no running statistics (track_running_stats=False); "
                          "it cannot be folded for integer inference")
    w = conv.weight.double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    new_w = w * factor.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = beta + factor * (bias - mean)
    conv.weight.copy_(new_w.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_b.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_b.to(conv.bias.dtype))


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` pairs that :func:`fold_batchnorms` folds (declared, or found by definition order)."""
    declared = getattr(model, "conv_bn_pairs", None)
    if declared is not None:
        return [(str(c), str(b)) for c, b in declared]
    pairs = []
    previous: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if len(list(module.children())) > 0:
            continue
        if (isinstance(module, _BNS) and previous is not None and isinstance(previous[1], _CONVS)
                and previous[1].out_channels == module.num_features):
            pairs.append((previous[0], name))
        previous = (name, module)
    return pairs


def fold_batchnorms(model: nn.Module) -> list[str]:
    """Fold every BN that follows a conv into it, in place; the BNs become ``nn.Identity``.

    Returns the names of the convs that absorbed a BN. See the module docstring for how pairs are found.
    """
    folded = []
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        fold_conv_bn(conv, bn)
        _set_submodule(model, bn_name, nn.Identity())
        folded.append(conv_name)
    return folded
