"""Conv4, the standard few-shot backbone (Finn et al. 2017), its layers run in order as written."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from metasam.models.batchnorm import BatchNorm

MIN_IMAGE_SIZE = 16
"""The smallest input four 2×2 poolings leave a pixel of."""


class Conv4(nn.Module):
    """4 × [conv 3×3 (``hidden`` filters, padding 1), norm, ReLU, max-pool 2×2] + flatten + linear head.

    Omniglot: ``Conv4(ways, in_channels=1, hidden=64, image_size=28)``;
    MiniImageNet: ``Conv4(ways, in_channels=3, hidden=32, image_size=84)``.
    Input [N, in_channels, image_size, image_size] → logits [N, ways].

    ``norm(channels)`` builds each block's normalisation; the default, :class:`BatchNorm`, uses batch
    statistics, keeps no buffers and is exact under ``torch.func.vmap``. The same network as written with
    torch's layers is ``Conv4(ways, norm=lambda c: nn.BatchNorm2d(c, track_running_stats=False))``.

    The layers run in order on every device, under ``vmap``, with hooks and with layers swapped for others.
    :class:`~metasam.models.CPUConv4` computes the same function faster on a CPU with the same parameter
    names, so weights and checkpoints carry over between the two (``load_state_dict``).
    """

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 norm: Callable[[int], nn.Module] = BatchNorm) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            layers += [nn.Conv2d(channels, hidden, 3, padding=1), norm(hidden), nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = hidden, size // 2
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size {image_size} is too small for four 2×2 poolings (need >= {MIN_IMAGE_SIZE})")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(hidden * size * size, ways)
        self.config = {"ways": ways, "in_channels": in_channels, "hidden": hidden, "image_size": image_size}

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
