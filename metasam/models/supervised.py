"""Classifiers for the supervised (label-noise) experiments."""

from __future__ import annotations

from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN with BatchNorm for scikit-learn's 8×8 digits: [N, 1, 8, 8] → [N, num_classes].

    conv3×3(32) → BN → ReLU → conv3×3(64) → BN → ReLU → maxpool 2 → linear(1024 → 128) → BN → ReLU → linear.
    BatchNorm is there on purpose: it is where SAM implementations go wrong.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """ResNet-18 with the usual CIFAR stem (3×3 stride-1 first convolution, no max-pool) for 32×32 images."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
