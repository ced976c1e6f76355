"""Quantized layers: a float layer plus a weight quantizer and an input activation quantizer."""

from mpqat.nn.conv import QuantConv1d, QuantConv2d
from mpqat.nn.linear import QuantLinear

__all__ = ["QuantConv1d", "QuantConv2d", "QuantLinear"]
