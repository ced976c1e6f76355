"""Model zoo: builders by name, each returning a plain float ``nn.Module``."""

from mpqat.models.mlp import MLP
from mpqat.models.registry import MODEL_NAMES, build_model, model_spec

__all__ = ["MLP", "MODEL_NAMES", "build_model", "model_spec"]
