"""Quantizer primitives: straight-through functions and the modules that hold their parameters."""

from mpqat.quant.codebook import CodebookWeightQuantizer
from mpqat.quant.functional import grad_scale, round_half_up, round_ste, snap_mantissa
from mpqat.quant.n2uq import ThresholdActQuantizer
from mpqat.quant.uniform import LSQWeightQuantizer, Pow2ActQuantizer

__all__ = [
    "CodebookWeightQuantizer",
    "LSQWeightQuantizer",
    "Pow2ActQuantizer",
    "ThresholdActQuantizer",
    "grad_scale",
    "round_half_up",
    "round_ste",
    "snap_mantissa",
]
