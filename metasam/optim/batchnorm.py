"""Keep BatchNorm running statistics out of SAM's extra forward passes.

A SAM step runs the model forward twice (at θ and at θ + ε), Agnostic-SAM three times. Only the first
pass, on the training batch at θ, may update the running mean and variance; otherwise the statistics
move twice per step and are partly computed at perturbed weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def preserve_bn_stats(model: nn.Module | None) -> Iterator[None]:
    """Within the block, forward passes of ``model`` leave every BatchNorm buffer as it was.

    The buffers (running_mean, running_var, num_batches_tracked) of all torch BatchNorm modules are
    copied on entry and written back on exit, so the block is exact for any momentum, including
    ``momentum=None`` (cumulative averaging), where the popular momentum-zero trick is not.
    ``model=None`` is a no-op, for callers that have no module to protect.
    """
    saved = []
    if model is not None:
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d,
                                   nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)) and module.track_running_stats:
                saved.append((module, {name: buf.detach().clone() for name, buf in module.named_buffers(recurse=False) if buf is not None}))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in saved:
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)
