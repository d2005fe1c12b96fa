"""Model definitions (depend on nothing else of metasam)."""

from metasam.models.conv4 import BatchNorm, Conv4
from metasam.models.supervised import DigitsCNN, resnet18_cifar

__all__ = ["BatchNorm", "Conv4", "DigitsCNN", "resnet18_cifar"]
