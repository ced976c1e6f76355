"""The integer inference graph: export, bit-packed ``.mpq`` files, integer-only engine, ONNX and C.

Example:
    >>> import torch
    >>> from mpqat import quantize, Uniform
    >>> from mpqat.models import MLP
    >>> model = quantize(MLP(4, 2, hidden=(8,)), Uniform(w_bits=4, a_bits=4))
    >>> _ = model.train()(torch.randn(32, 4))
    >>> graph = export(model, torch.randn(8, 4))
    >>> x = torch.randn(5, 4)
    >>> bool((graph.run(x.numpy()) == model.eval()(x).numpy()).all())
    True
"""

from mpqat.export.convert import export, register_converter
from mpqat.export import codebook as _codebook  # noqa: F401  (registers the ADQ codebook / threshold nodes)
from mpqat.export import threshold as _threshold  # noqa: F401
from mpqat.export import conv as _conv  # noqa: F401  (registers the conv / pooling / flatten nodes and converters)
from mpqat.export.engine import EngineInputError, register_kernel
from mpqat.export.ir import (
    DequantizeOutput,
    IntegerGraph,
    IntegerLinear,
    Node,
    QuantizeInput,
    Requantize,
    register_node,
)

__all__ = [
    "DequantizeOutput",
    "EngineInputError",
    "IntegerGraph",
    "IntegerLinear",
    "Node",
    "QuantizeInput",
    "Requantize",
    "export",
    "register_converter",
    "register_kernel",
    "register_node",
]
