"""Model definitions (depend on nothing else of metasam but its exceptions)."""

from metasam.models.batchnorm import BatchNorm
from metasam.models.conv4 import Conv4
from metasam.models.cpu_conv4 import CPUConv4
from metasam.models.resnet12 import ResNet12
from metasam.models.supervised import DigitsCNN, resnet18_cifar

MODELS = {"Conv4": Conv4, "CPUConv4": CPUConv4, "ResNet12": ResNet12}
"""Few-shot backbones by name, for rebuilding a model from a checkpoint."""

__all__ = ["BatchNorm", "Conv4", "CPUConv4", "DigitsCNN", "MODELS", "ResNet12", "resnet18_cifar"]
