"""``QuantConv2d`` / ``QuantConv1d``: convolutions with the :class:`~mpqat.nn.QuantLinear` contract.

A quantized convolution is a :class:`~mpqat.nn.QuantLinear` whose weight is a kernel:

* the weight quantizer sees the kernel viewed as a 2-D matrix
  ``[out_channels, in_channels/groups * prod(kernel)]`` (one row per output channel, so per-neuron
  scales and bit-widths become per-output-channel ones) and its result is reshaped back;
* the activation quantizer is applied channels-last, ``act_quant(x.movedim(1, -1)).movedim(-1, 1)``,
  with ``features = in_channels`` (per-tensor or per-input-channel steps and bit-widths);
* ``in_features`` / ``out_features`` are the input / output channel counts, ``fan_in`` the row
  length of the 2-D weight view, so every consumer of quantized layers (cost terms, freeze, NMP,
  HAWQ) that uses ``isinstance(m, QuantLinear)`` treats convolutions the same way.

Two forward paths, as in ``QuantLinear``: training mode fake-quantizes in float32 with
straight-through gradients and rounds the bias to the accumulator grid; eval mode is the exact path,
float64 with integer codes times dyadic/power-of-two steps, so every product and every sum is exact.
Zero padding is exact too: code 0 is the value 0 for signed and unsigned quantizers.

MACs need the spatial size of the output. The layer keeps the spatial size of its input in the
buffer ``input_size`` (int64, one entry per spatial dim; zeros = unknown). It is copied from the float
conv's ``input_size`` attribute when present (set by :func:`record_input_sizes`, which the CNN models
of :mod:`mpqat.models.cnn` and :func:`mpqat.quantize` call) and updated on every forward pass.

Example:
    >>> import torch
    >>> from mpqat.quant import LSQWeightQuantizer, Pow2ActQuantizer
    >>> conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    >>> q = QuantConv2d(conv, LSQWeightQuantizer(4, 27, bits=4), Pow2ActQuantizer(3, bits=8, signed=True))
    >>> _ = q.train()(torch.randn(2, 3, 8, 8))        # initialises the quantizers, records 8x8
    >>> q.eval()(torch.randn(1, 3, 8, 8)).dtype, q.macs() == 8 * 8 * 4 * 27
    (torch.float64, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mpqat.errors import ConfigError
from mpqat.nn.linear import QuantLinear
from mpqat.quant.functional import round_ste


def conv_output_size(
    input_size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
    padding: Sequence[int] | str, dilation: Sequence[int],
) -> tuple[int, ...]:
    """Spatial output size of a convolution (PyTorch's formula; ``padding`` may be ``'same'``/``'valid'``).

    Example:
        >>> conv_output_size((28, 28), (5, 5), (1, 1), (0, 0), (1, 1))
        (24, 24)
    """
    if padding == "same":
        return tuple(int(n) for n in input_size)
    pads = (0,) * len(input_size) if padding == "valid" else tuple(padding)
    return tuple(
        (int(n) + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(input_size, kernel_size, stride, pads, dilation, strict=True)
    )


class _QuantConvNd(QuantLinear):
    """Shared implementation of :class:`QuantConv1d` and :class:`QuantConv2d`."""

    _nd = 0
    _conv_type: type = nn.Module

    def __init__(self, conv: nn.Module, weight_quant: nn.Module, act_quant: nn.Module) -> None:
        nn.Module.__init__(self)
        if not isinstance(conv, self._conv_type):
            raise ConfigError(f"{type(self).__name__} wraps an {self._conv_type.__name__}, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ConfigError(
                f"{type(self).__name__}: padding_mode={conv.padding_mode!r} is not supported; "
                "only zero padding is exact on the integer grid (use padding_mode='zeros')"
            )
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.in_features = conv.in_channels
        self.out_features = conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.fan_in = conv.in_channels // conv.groups * math.prod(self.kernel_size)
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.weight_quant = weight_quant
        self.act_quant = act_quant
        known = getattr(conv, "input_size", None) or (0,) * self._nd
        self.register_buffer("input_size", torch.tensor(list(known), dtype=torch.int64))

    # -- sizes -------------------------------------------------------------------------------------

    def output_size(self) -> tuple[int, ...]:
        """Spatial output size for the recorded input size (raises if no input was seen yet)."""
        size = tuple(int(n) for n in self.input_size.tolist())
        if not all(n > 0 for n in size):
            raise ValueError(
                f"{type(self).__name__}: the input's spatial size is unknown; run one forward pass first "
                "(or build the float model with mpqat.nn.conv.record_input_sizes)"
            )
        return conv_output_size(size, self.kernel_size, self.stride, self.padding, self.dilation)

    def macs(self) -> int:
        """Multiply-accumulates per sample: ``prod(output spatial size) * out_channels * fan_in``."""
        return math.prod(self.output_size()) * self.out_channels * self.fan_in

    def _record(self, x: torch.Tensor) -> None:
        size = tuple(x.shape[2:])
        if tuple(self.input_size.tolist()) != size:
            with torch.no_grad():
                self.input_size.copy_(torch.tensor(size, dtype=torch.int64))

    # -- forward -----------------------------------------------------------------------------------

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self._nd + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects input [batch, {self.in_channels}, {'x'.join(['*'] * self._nd)}], "
                f"got {tuple(x.shape)}"
            )

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized input (training path): the activation quantizer applied channels-last."""
        return self.act_quant(x.movedim(1, -1)).movedim(-1, 1)

    def quantized_weight(self) -> torch.Tensor:
        """Fake-quantized kernel (training path): the weight quantizer on the 2-D view, reshaped back."""
        return self.weight_quant(self.weight.reshape(self.out_channels, -1)).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        self._record(x)
        if not self.training:
            return self._exact_forward(x)
        x_q = self.quantized_input(x)
        w_q = self.quantized_weight()
        bias = self.bias
        if bias is not None:
            unit = self.accumulator_step().to(bias.dtype)
            bias = round_ste(bias / unit) * unit
        return self._conv(x_q, w_q, bias)

    @torch.no_grad()
    def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.act_quant.integer_codes(x.double().movedim(1, -1))
        step = self.act_quant.step().detach().double()
        w64 = self.weight.detach().double().reshape(self.out_channels, -1)
        w_codes = self.weight_quant.integer_codes(w64)
        acc = self._integer_accumulators(codes, step, w_codes.reshape(self.weight.shape))
        if acc is None:  # slow but exact: float64 products of the quantized values
            x_q = (codes * step).movedim(-1, 1).contiguous()
            w_q = w_codes * self.weight_quant.scale().detach().double()
            return self._conv(x_q, w_q.reshape(self.weight.shape), self.quantized_bias())
        view = (1, -1) + (1,) * self._nd
        unit = self.accumulator_step().reshape(view)
        bias = self.quantized_bias()
        return acc * unit if bias is None else torch.addcmul(bias.reshape(view), acc, unit)

    #: float32 represents every integer of magnitude up to 2**24 exactly
    _FLOAT32_EXACT_BITS = 24

    def _integer_accumulators(self, codes: torch.Tensor, step: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor | None:
        """Integer accumulators ``sum x_int * w_int`` (float64, exact), from float32 convolutions, or None.

        ``x_int = code * step / 2**k_min`` are the input codes aligned to the smallest step. When the
        bound ``fan_in * max|x_int| * max|w_piece|`` stays below ``2**24``, every partial sum of a
        float32 convolution is an integer that float32 holds exactly, whatever the summation order,
        so the result equals the float64 path bit for bit. The weight codes are split into signed
        digits small enough for that bound (usually one piece); None (use the float64 path) when the
        inputs alone are too large or the steps are not powers of two apart.
        """
        k_min = int(self.act_quant.exponents().min())
        factor = step * 2.0 ** (-k_min)
        if not bool(torch.all(factor == torch.floor(factor))):
            return None
        if codes.numel() == 0:
            return None
        x_int = codes if bool(torch.all(factor == 1)) else codes * factor
        low, high = torch.aminmax(x_int)
        x_max = max(abs(float(low)), abs(float(high)))
        x_int = x_int.movedim(-1, 1)
        limit = 2.0**self._FLOAT32_EXACT_BITS
        room = limit / max(self.fan_in * max(x_max, 1.0), 1.0)  # largest |weight piece| allowed
        if room < 2.0:
            return None
        piece_bits = int(math.floor(math.log2(room)))  # every piece has |piece| < 2**piece_bits <= room
        x32 = x_int.float()
        acc = None
        rest, shift = w_codes, 0
        while True:
            if float(rest.abs().max()) < 2.0**piece_bits:
                piece, rest_next = rest, None
            else:
                high = torch.floor(rest / 2.0**piece_bits)
                piece, rest_next = rest - high * 2.0**piece_bits, high
            part = self._conv(x32, piece.float(), None).double()
            acc = part if acc is None else acc.add_(part, alpha=2.0**shift)
            if rest_next is None or not bool(rest_next.any()):
                return acc
            rest, shift = rest_next, shift + piece_bits

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution with the latent float weights and bias (no quantization)."""
        return self._conv(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}"
        )


class QuantConv2d(_QuantConvNd):
    """2-D convolution (``[n, C, H, W]``) with a weight quantizer and an input activation quantizer.

    Example:
        >>> import torch
        >>> from mpqat.quant import LSQWeightQuantizer, Pow2ActQuantizer
        >>> q = QuantConv2d(torch.nn.Conv2d(1, 2, 3), LSQWeightQuantizer(2, 9, 4), Pow2ActQuantizer(1, 8, True))
        >>> q.train()(torch.randn(4, 1, 5, 5)).shape
        torch.Size([4, 2, 3, 3])
    """

    _nd = 2
    _conv_type = nn.Conv2d

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class QuantConv1d(_QuantConvNd):
    """1-D convolution (``[n, C, L]``) with a weight quantizer and an input activation quantizer.

    Example:
        >>> import torch
        >>> from mpqat.quant import LSQWeightQuantizer, Pow2ActQuantizer
        >>> q = QuantConv1d(torch.nn.Conv1d(2, 4, 5), LSQWeightQuantizer(4, 10, 4), Pow2ActQuantizer(2, 8, True))
        >>> q.train()(torch.randn(3, 2, 16)).shape
        torch.Size([3, 4, 12])
    """

    _nd = 1
    _conv_type = nn.Conv1d

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv1d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d)
QUANT_CONV_TYPES: tuple[type, ...] = (QuantConv1d, QuantConv2d)


@torch.no_grad()
def record_input_sizes(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Run one zero sample of shape ``input_shape`` (without the batch dim) through ``model`` and store
    each (float or quantized) convolution's input spatial size (``conv.input_size``), for MAC counts.

    The model's train/eval mode is kept; BN statistics are not touched (the probe runs in eval mode).
    ``input_shape`` is what the model's forward takes per sample (e.g. ``(784,)`` for a model that
    starts with ``nn.Unflatten``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(2, 2, 3))
        >>> record_input_sizes(net, (1, 10, 10))
        >>> net[1].input_size
        (8, 8)
    """
    convs = [m for m in model.modules() if isinstance(m, CONV_TYPES + QUANT_CONV_TYPES)]
    if not convs:
        return
    seen: dict[nn.Module, tuple[int, ...]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod, tuple(args[0].shape[2:])))
             for m in convs]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        device = param.device if param is not None else None
        model(torch.zeros(1, *input_shape, dtype=dtype, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for m in convs:
        if m in seen:
            if isinstance(m, _QuantConvNd):
                m.input_size.copy_(torch.tensor(seen[m], dtype=torch.int64))
            else:
                m.input_size = seen[m]
