"""Batch normalisation with batch statistics, written so that it stays exact under ``torch.func.vmap``."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BatchNorm(nn.Module):
    """y = γ · (x − mean_B(x)) / sqrt(var_B(x) + ε) + β over all dimensions but the channel (dim 1).

    Batch statistics always (MAML's transductive choice, at meta-training and meta-test), biased variance,
    no running statistics and no buffers for adaptation to write; γ and β are meta-learned. Input [N, C] or
    [N, C, ...].

    Written from mean, biased variance, rsqrt and an affine map (β + (x − μ) · γ/√(σ² + ε), the scale formed
    per channel before it meets the activations) rather than with torch's fused kernel
    (``F.batch_norm(training=True)``, what ``nn.BatchNorm2d(track_running_stats=False)`` runs). Both give
    the same value and derivatives, but under ``torch.func.vmap`` PyTorch's batching rule for the fused
    kernel's backward gives a wrong second-order meta-gradient (finite differences agree with a per-task loop;
    tests/meta/test_meta_gradients.py::test_fused_batchnorm_and_metasams_agree_in_value_and_second_order_gradient_and_metasams_is_exact_under_vmap);
    these primitive operations batch exactly. What this costs outside vmap is in
    docs/performance.md.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        centred = x - x.mean(dim=dims, keepdim=True)
        var = (centred * centred).mean(dim=dims, keepdim=True)
        scale = self.weight.view(shape) * torch.rsqrt(var + self.eps)  # γ / √(σ² + ε), per channel
        return torch.addcmul(self.bias.view(shape), centred, scale)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
