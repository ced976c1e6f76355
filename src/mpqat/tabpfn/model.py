"""The TabPFN v1 architecture (Hollmann et al., ICLR 2023), written for quantization.

A TabPFN predicts the labels of *query* rows from labelled *context* rows in one forward pass
(in-context learning; no gradient step). Our implementation of the architecture of the
``tabpfn==0.1`` checkpoint, written from its state dict and the published description:

* ``encoder``: ``nn.Linear(n_features=100, emsize)`` on every row's (padded) feature vector;
* ``y_encoder``: :class:`LabelEmbedding`, ``y * w + b`` with ``w, b in R^emsize`` (the label is a
  float class index); added to the context rows only;
* ``layers``: ``nlayers`` post-norm transformer layers (:class:`EncoderLayer`): multi-head
  attention, ``x = norm1(x + attn(x))``, ``x = norm2(x + linear2(gelu(linear1(x))))``;
* the **train/test attention pattern**: every row (context or query) attends to the *context*
  rows only. Context rows see each other; a query row sees the context but neither itself nor
  other queries, so queries are predicted independently of each other;
* ``decoder``: ``Linear(emsize, nhid) -> GELU -> Linear(nhid, n_out=10)`` on the query rows.

Differences from the original code, all equivalent in value:

* Attention uses four ``nn.Linear`` modules ``q``, ``k``, ``v``, ``out`` instead of
  ``nn.MultiheadAttention``'s fused ``in_proj_weight``; :func:`load_state_dict_strict` splits the
  fused tensor into them. Every projection is then an ``nn.Linear`` that
  :func:`mpqat.quantize` can swap for a ``QuantLinear``. Softmax, the attention scores
  ``q k^T / sqrt(d)`` and layer norms stay in float.
* The label encoder is not an ``nn.Linear`` (it is a 1-input affine map, i.e. an embedding of the
  class index), so ``quantize`` leaves it in float (1 KB of 103 MB).
* Tensors are batch-first: ``x`` is ``[batch, rows, features]``.
* The checkpoint's training-loss class weights (``criterion.weight``, all ones) are kept as the
  buffer ``loss_weight``; :mod:`mpqat.tabpfn.finetune` uses them in its loss.

Quantized linear outputs come back in float64 in eval mode (``QuantLinear``'s exact path); every
linear output is cast back to the activations' dtype, so layer norm, GELU and softmax run in float32.

Example:
    >>> import torch
    >>> net = TabPFN(TabPFNConfig.tiny())
    >>> x, y = torch.randn(2, 12, 8), torch.randint(0, 2, (2, 10)).float()
    >>> net(x, y).shape                      # 10 context rows, 2 query rows, n_out logits
    torch.Size([2, 2, 10])
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mpqat.errors import CheckpointError


@dataclass(frozen=True)
class TabPFNConfig:
    """Sizes of a TabPFN v1 model. :meth:`v1` is the published checkpoint's."""

    n_features: int = 100
    emsize: int = 512
    nhead: int = 4
    nhid: int = 1024
    nlayers: int = 12
    n_out: int = 10
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("n_features", "emsize", "nhead", "nhid", "nlayers", "n_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"TabPFN config {name}={value!r} must be a positive integer")
        if self.emsize % self.nhead:
            raise CheckpointError(f"TabPFN config: emsize {self.emsize} is not divisible by nhead {self.nhead}")

    @classmethod
    def v1(cls) -> TabPFNConfig:
        """The ``prior_diff_real_checkpoint_n_0_epoch_42`` model: 25.8 M parameters."""
        return cls()

    @classmethod
    def tiny(cls, n_features: int = 8, emsize: int = 32, nlayers: int = 2, nhead: int = 4) -> TabPFNConfig:
        """A small random model with the same structure, for tests."""
        return cls(n_features=n_features, emsize=emsize, nhead=nhead, nhid=2 * emsize, nlayers=nlayers, n_out=10)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a (possibly quantized) linear layer to ``[..., in]`` and return ``[..., out]`` in ``x``'s dtype.

    The rows are flattened to ``[rows, in]`` first: mpqat's quantizers see ``[batch, features]``."""
    lead = x.shape[:-1]
    return layer(x.reshape(-1, x.shape[-1])).to(x.dtype).reshape(*lead, -1)


class LabelEmbedding(nn.Module):
    """``y -> y * weight[:, 0] + bias``: the float class index embedded in ``emsize`` dims.

    Same parameters as ``nn.Linear(1, emsize)`` (``weight [emsize, 1]``, ``bias [emsize]``), but not
    an ``nn.Linear``, so :func:`mpqat.quantize` keeps it in float.
    """

    def __init__(self, emsize: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(emsize, 1))
        self.bias = nn.Parameter(torch.empty(emsize))
        nn.init.uniform_(self.weight, -1.0, 1.0)
        nn.init.uniform_(self.bias, -1.0, 1.0)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y.unsqueeze(-1) * self.weight[:, 0] + self.bias


class Attention(nn.Module):
    """Multi-head attention with separate ``q``/``k``/``v``/``out`` projections.

    ``forward(x, n_ctx)``: every row of ``x`` ``[B, N, E]`` attends to the first ``n_ctx`` rows.
    The scores and the softmax are float (``F.scaled_dot_product_attention``).
    """

    def __init__(self, emsize: int, nhead: int) -> None:
        super().__init__()
        self.nhead = nhead
        self.q = nn.Linear(emsize, emsize)
        self.k = nn.Linear(emsize, emsize)
        self.v = nn.Linear(emsize, emsize)
        self.out = nn.Linear(emsize, emsize)

    def forward(self, x: torch.Tensor, n_ctx: int) -> torch.Tensor:
        b, n, e = x.shape
        h, d = self.nhead, e // self.nhead
        ctx = x[:, :n_ctx]
        q = _linear(self.q, x).view(b, n, h, d).transpose(1, 2)
        k = _linear(self.k, ctx).view(b, n_ctx, h, d).transpose(1, 2)
        v = _linear(self.v, ctx).view(b, n_ctx, h, d).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, d]; no mask: keys are the context only
        return _linear(self.out, att.transpose(1, 2).reshape(b, n, e))


class EncoderLayer(nn.Module):
    """Post-norm transformer layer of TabPFN v1 (GELU feed-forward, no dropout at inference)."""

    def __init__(self, emsize: int, nhead: int, nhid: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.attn = Attention(emsize, nhead)
        self.norm1 = nn.LayerNorm(emsize, eps=eps)
        self.linear1 = nn.Linear(emsize, nhid)
        self.act = nn.GELU()
        self.linear2 = nn.Linear(nhid, emsize)
        self.norm2 = nn.LayerNorm(emsize, eps=eps)

    def forward(self, x: torch.Tensor, n_ctx: int) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, n_ctx))
        return self.norm2(x + _linear(self.linear2, self.act(_linear(self.linear1, x))))


class TabPFN(nn.Module):
    """TabPFN v1: ``forward(x, y_ctx)`` -> logits of the query rows.

    ``x``: ``[B, N, n_features]``, the context rows first, then the query rows;
    ``y_ctx``: ``[B, n_ctx]`` float class indices of the context rows (``n_ctx < N``).
    Returns ``[B, N - n_ctx, n_out]`` logits (use the first ``n_classes`` of them).
    """

    #: For :func:`mpqat.quantize`: no linear layer's input is non-negative (layer norms, attention,
    #: GELU feed it), so every input quantizer is signed.
    unsigned_input_layers: tuple[str, ...] = ()

    def __init__(self, config: TabPFNConfig | None = None) -> None:
        super().__init__()
        self.config = config or TabPFNConfig.v1()
        c = self.config
        self.encoder = nn.Linear(c.n_features, c.emsize)
        self.y_encoder = LabelEmbedding(c.emsize)
        self.layers = nn.ModuleList(EncoderLayer(c.emsize, c.nhead, c.nhid, c.layer_norm_eps) for _ in range(c.nlayers))
        self.decoder = nn.Sequential(nn.Linear(c.emsize, c.nhid), nn.GELU(), nn.Linear(c.nhid, c.n_out))
        self.register_buffer("loss_weight", torch.ones(c.n_out))

    def forward(self, x: torch.Tensor, y_ctx: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or y_ctx.dim() != 2 or y_ctx.shape[0] != x.shape[0]:
            raise ValueError(f"TabPFN expects x [B, N, F] and y_ctx [B, n_ctx], got {tuple(x.shape)} and {tuple(y_ctx.shape)}")
        n_ctx = y_ctx.shape[1]
        if not 0 < n_ctx < x.shape[1]:
            raise ValueError(f"TabPFN needs at least one context and one query row: {n_ctx} context rows of {x.shape[1]}")
        if x.shape[2] != self.config.n_features:
            raise ValueError(f"TabPFN expects {self.config.n_features} (padded) features, got {x.shape[2]}")
        x = torch.nan_to_num(x.float(), nan=0.0)
        h = _linear(self.encoder, x)
        h = torch.cat([h[:, :n_ctx] + self.y_encoder(y_ctx.float()), h[:, n_ctx:]], dim=1)
        for layer in self.layers:
            h = layer(h, n_ctx)
        q = h[:, n_ctx:]
        return _linear(self.decoder[2], self.decoder[1](_linear(self.decoder[0], q)))


# ---------------------------------------------------------------------------------------------
# Checkpoint loading


_LAYER_KEY = re.compile(r"^transformer_encoder\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "self_attn.out_proj.weight": "attn.out.weight",
    "self_attn.out_proj.bias": "attn.out.bias",
    "linear1.weight": "linear1.weight",
    "linear1.bias": "linear1.bias",
    "linear2.weight": "linear2.weight",
    "linear2.bias": "linear2.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
}
_TOP_MAP = {
    "encoder.weight": "encoder.weight",
    "encoder.bias": "encoder.bias",
    "y_encoder.weight": "y_encoder.weight",
    "y_encoder.bias": "y_encoder.bias",
    "decoder.0.weight": "decoder.0.weight",
    "decoder.0.bias": "decoder.0.bias",
    "decoder.2.weight": "decoder.2.weight",
    "decoder.2.bias": "decoder.2.bias",
    "criterion.weight": "loss_weight",
}


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):  # saved from DistributedDataParallel
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def map_checkpoint(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> our parameter/buffer names (fused ``in_proj`` split into q, k, v).

    Raises :class:`CheckpointError` for a key it does not know or a value that is not a tensor.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in _strip_prefix(state).items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint entry '{key}' is a {type(value).__name__}, not a tensor")
        m = _LAYER_KEY.match(key)
        if m:
            i, rest = m.group(1), m.group(2)
            if rest in ("self_attn.in_proj_weight", "self_attn.in_proj_bias"):
                if value.shape[0] % 3:
                    raise CheckpointError(f"checkpoint '{key}' has {value.shape[0]} rows, not a multiple of 3 (q, k, v)")
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"layers.{i}.attn.{name}.{kind}"] = part
            elif rest in _LAYER_MAP:
                out[f"layers.{i}.{_LAYER_MAP[rest]}"] = value
            else:
                unknown.append(key)
        elif key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"the checkpoint has {len(unknown)} tensor(s) that TabPFN v1 does not use: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}; it is not a TabPFN v1 checkpoint"
        )
    return out


def config_from_state_dict(state: Mapping[str, Any], nhead: int = 4) -> TabPFNConfig:
    """Infer the sizes from the tensors' shapes (``nhead`` cannot be seen in them)."""
    sd = _strip_prefix(state)
    try:
        emsize, n_features = sd["encoder.weight"].shape
        nhid = sd["transformer_encoder.layers.0.linear1.weight"].shape[0]
        n_out = sd["decoder.2.weight"].shape[0]
    except (KeyError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"not a TabPFN v1 state dict (cannot read the sizes: {exc})") from None
    layers = {int(m.group(1)) for k in sd if (m := _LAYER_KEY.match(k))}
    if layers != set(range(len(layers))):
        raise CheckpointError(f"the checkpoint's layer indices {sorted(layers)} are not 0..{len(layers) - 1}")
    return TabPFNConfig(n_features=int(n_features), emsize=int(emsize), nhead=int(nhead), nhid=int(nhid),
                        nlayers=len(layers), n_out=int(n_out))


def load_state_dict_strict(model: TabPFN, state: Mapping[str, Any]) -> None:
    """Load a TabPFN v1 checkpoint state dict into ``model``: every checkpoint tensor is used
    exactly once, every parameter and buffer of ``model`` is filled, and every shape must match.

    Raises :class:`CheckpointError` naming the first offending tensors otherwise.
    """
    mapped = map_checkpoint(state)
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    missing = sorted(set(own) - set(mapped))
    extra = sorted(set(mapped) - set(own))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"{len(extra)} tensor(s) the model does not have: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise CheckpointError(f"checkpoint does not match the TabPFN model ({'; '.join(parts)})")
    bad = [f"{k} {tuple(mapped[k].shape)} != {tuple(own[k].shape)}" for k in own if mapped[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"checkpoint tensor shapes do not match the model: {'; '.join(bad[:5])}")
    with torch.no_grad():
        for key, target in own.items():
            target.copy_(mapped[key].to(target.dtype))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a TabPFN v1 ``.cpkt`` file: ``(state_dict, config dict)``.

    ``torch.load(..., weights_only=True)``: the file is a tuple ``(state_dict, None, config)`` whose
    config holds only plain Python values (numbers, strings, lists, dicts; the original code's
    functions were saved as their ``repr`` strings), so the restricted unpickler accepts it and no
    code from the file can run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"TabPFN checkpoint '{path}' does not exist: run 'mpqat data fetch tabpfn-v1'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(
            f"cannot read TabPFN checkpoint '{path}' safely ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): "
            "the file is damaged or not a TabPFN v1 checkpoint; run 'mpqat data fetch tabpfn-v1 --force'"
        ) from None
    if isinstance(obj, tuple) and len(obj) == 3 and isinstance(obj[0], Mapping):
        state, config = obj[0], obj[2] if isinstance(obj[2], dict) else {}
    elif isinstance(obj, Mapping):
        state, config = obj, {}
    else:
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a TabPFN (state_dict, optimizer, config) tuple")
    return dict(state), dict(config)


def load_tabpfn(path: str | Path | None = None) -> TabPFN:
    """Build TabPFN v1 from its checkpoint (default: the cached one) and load it strictly.

    Example::

        >>> net = load_tabpfn()                   # doctest: +SKIP
        >>> sum(p.numel() for p in net.parameters())  # doctest: +SKIP
        25821706
    """
    if path is None:
        from mpqat.tabpfn.fetch import cached_checkpoint

        path = cached_checkpoint()
    state, config = read_checkpoint(path)
    nhead = config.get("nhead", 4)
    if not isinstance(nhead, int):
        raise CheckpointError(f"checkpoint config nhead={nhead!r} is not an integer")
    model = TabPFN(config_from_state_dict(state, nhead=nhead))
    load_state_dict_strict(model, state)
    return model.eval()


def n_parameters(model: nn.Module) -> int:
    """Number of parameters (the label embedding and layer norms included)."""
    return sum(p.numel() for p in model.parameters())

