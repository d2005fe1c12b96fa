"""Gradient alignment: the cosine of a training and a validation gradient (the seed paper's §5.1 diagnostic).

Agnostic-SAM's ε descends along the validation direction, so to first order its step raises ⟨g_S, g_V⟩;
the paper plots cos(g_S, g_V) before and after each update to show it. These functions measure it for any
model and optimizer without disturbing training. The bilevel learner has its own, for both levels:
:meth:`metasam.meta.MetaLearner.outer_alignment` and :meth:`~metasam.meta.MetaLearner.inner_alignment`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from metasam.core import cosine_similarity
from metasam.optim import preserve_bn_stats


def gradient_cosine(model: nn.Module, train_loss: Callable[[], Tensor], val_loss: Callable[[], Tensor]) -> float:
    """cos(g_S, g_V) = ⟨g_S, g_V⟩ / (‖g_S‖ ‖g_V‖ + 1e-12) at the model's current parameters θ, with
    g_S = ∇L_{B_S}(θ) and g_V = ∇L_{B_V}(θ) over the trainable parameters (norms over all of them together).

    ``train_loss`` / ``val_loss`` run the forward pass on B_S / B_V and return the loss (no backward).
    Leaves ``p.grad`` and BatchNorm running statistics as they were: a diagnostic, not a training pass.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with preserve_bn_stats(model), torch.enable_grad():
        g_s, g_v = (torch.autograd.grad(loss(), params, allow_unused=True, materialize_grads=True) for loss in (train_loss, val_loss))
    return float(cosine_similarity(g_s, g_v))
