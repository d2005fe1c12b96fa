"""ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019), the larger few-shot backbone, for GPU users.

Four residual blocks of widths (64, 160, 320, 640); each block is 3 × [conv 3×3, BatchNorm,
LeakyReLU(0.1)] with a 1×1-conv + BatchNorm shortcut, followed by a 2×2 max-pool; then global average
pooling and a linear head. BatchNorm is :class:`metasam.models.BatchNorm` (batch statistics, exact
under vmap, no buffers), as in Conv4.
"""

from __future__ import annotations

from torch import Tensor, nn

from metasam.models.batchnorm import BatchNorm


class _Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(3):
            layers += [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False), BatchNorm(out_channels)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
            channels = out_channels
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), BatchNorm(out_channels))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """Input [N, in_channels, H, W] (H, W ≥ 16) → logits [N, ways]."""

    def __init__(self, ways: int, in_channels: int = 3, widths: tuple[int, ...] = (64, 160, 320, 640)) -> None:
        super().__init__()
        blocks, channels = [], in_channels
        for width in widths:
            blocks.append(_Block(channels, width))
            channels = width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, ways)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
