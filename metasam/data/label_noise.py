"""Symmetric label noise for the supervised experiments (training labels only)."""

from __future__ import annotations

import torch
from torch import Tensor

from metasam.errors import ConfigError


def symmetric_label_noise(labels: Tensor, rate: float, num_classes: int, seed: int) -> Tensor:
    """Flip exactly round(rate · n) labels, chosen uniformly without replacement, each to a class drawn
    uniformly from the num_classes − 1 *other* classes; returns a new tensor, ``labels`` is untouched.

    With rate r the expected fraction of wrong labels is exactly r (the "symmetric" noise of the
    label-noise literature in its flip-to-a-different-class form). Deterministic in ``seed``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"label noise rate must lie in [0, 1], got {rate}")
    if num_classes < 2:
        raise ConfigError(f"label noise needs at least 2 classes, got {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    n = labels.numel()
    flip = torch.randperm(n, generator=gen)[: round(rate * n)]
    offsets = torch.randint(1, num_classes, (flip.numel(),), generator=gen)
    noisy = labels.clone()
    noisy[flip] = (labels[flip] + offsets) % num_classes
    return noisy
