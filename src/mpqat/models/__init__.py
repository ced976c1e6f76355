"""Model zoo: builders by name, each returning a plain float ``nn.Module``."""

from mpqat.models.cnn import CNN1d, LeNet5, ResNet
from mpqat.models.mlp import MLP
from mpqat.models.registry import MODEL_NAMES, build_model, model_spec

__all__ = ["CNN1d", "LeNet5", "MLP", "MODEL_NAMES", "ResNet", "build_model", "model_spec"]
