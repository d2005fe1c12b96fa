"""Model definitions (depend on nothing else of metasam)."""

from metasam.models.supervised import DigitsCNN, resnet18_cifar

__all__ = ["DigitsCNN", "resnet18_cifar"]
