"""Model definitions (depend on nothing else of metasam)."""

from metasam.models.conv4 import BatchNorm, Conv4
from metasam.models.resnet12 import ResNet12
from metasam.models.supervised import DigitsCNN, resnet18_cifar

MODELS = {"Conv4": Conv4, "ResNet12": ResNet12}
"""Few-shot backbones by name, for rebuilding a model from a checkpoint."""

__all__ = ["BatchNorm", "Conv4", "DigitsCNN", "MODELS", "ResNet12", "resnet18_cifar"]
