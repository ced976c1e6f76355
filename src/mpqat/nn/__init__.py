"""Quantized layers: a float layer plus a weight quantizer and an input activation quantizer."""

from mpqat.nn.linear import QuantLinear

__all__ = ["QuantLinear"]
