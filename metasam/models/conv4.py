"""Conv4, the standard few-shot backbone, with a batch norm that stays exact under ``vmap``.

Why not plain ``nn.BatchNorm2d(track_running_stats=False)``: under ``torch.func.vmap`` PyTorch's
batching rule for the batch-norm backward gives a second-order meta-gradient that is off by 0.3–0.5 %
(finite differences agree with a per-task loop). :class:`BatchNorm` therefore runs PyTorch's fused
kernel normally (fast, and exact without vmap) and, inside :func:`primitive_batchnorm` (which the
learner's vmap path enters), the same normalisation written from mean, biased variance, rsqrt and an
affine map, which batches exactly. Either way it has no buffers for adaptation to write: it always
uses the statistics of the batch it sees (MAML's transductive choice, at meta-training and meta-test).

On the CPU and for grayscale input (Omniglot), Conv4 computes its first block with :func:`first_block`,
the same function re-associated so that no full-resolution tensor is normalised, re-laid-out or reduced
(a second-order meta-training step runs about 1.3× faster; docs/performance.md). Elsewhere it runs the
layers in order: under vmap, on CUDA (never measured), and for RGB input, where the 27×27 patch
covariance over MiniImageNet's 84×84 positions cost as much as it saved (measured at parity).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_state = threading.local()


@contextmanager
def primitive_batchnorm() -> Iterator[None]:
    """Within the block, :class:`BatchNorm` layers use primitive operations (exact under vmap)."""
    previous = getattr(_state, "primitive", False)
    _state.primitive = True
    try:
        yield
    finally:
        _state.primitive = previous


class BatchNorm(nn.Module):
    """y = γ · (x − mean_B(x)) / sqrt(var_B(x) + ε) + β over all dimensions but the channel (dim 1).

    Batch statistics always, biased variance, no running statistics; γ and β are meta-learned.
    Works for [N, C] and [N, C, H, W] inputs. The fused kernel and the primitive form (inside
    :func:`primitive_batchnorm`) agree to float rounding.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if not getattr(_state, "primitive", False):
            return nn.functional.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def first_block(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """relu(maxpool₂ₓ₂(BN_γ,β(z))), z = conv₃ₓ₃(x; W, b) with padding 1: Conv4's first block, arranged for a CPU.

    x [N, C, H, W] → [N, C_out, ⌊H/2⌋, ⌊W/2⌋] (contiguous NCHW). Three exact identities:

    * z is linear in the 3×3 input patches p (C·9 values, zero padding included): z_c = w_c·p + b_c.
      Its batch mean and biased variance are therefore μ_c = w_c·m + b_c and σ²_c = w_cᵀ Σ w_c, with m and
      Σ the mean and covariance of the patches over the N·H·W positions, computed in float64. No pass
      over the [N, C_out, H, W] activations computes statistics.
    * BN(z) = a_c (s_c z − s_c μ_c) + β_c with s_c = sign γ_c (+1 at 0) and a_c = γ_c s_c / √(σ²_c + ε) ≥ 0.
      A non-negative affine map is monotone, so maxpool(BN(z)) = a (maxpool(s z) − s μ) + β: the
      pooling runs on s z (the conv with weights s W and bias s b; s = ±1 is exact), and the
      normalisation runs on the pooled quarter of the elements.
    * The conv is one matrix product, patches [N·H·W, C·9] × (s W)ᵀ, whose output rows are positions:
      channels-last memory, where torch's CPU max-pool is an order of magnitude faster than on NCHW.

    Value, gradient and second-order gradient (every operation is differentiable, x included) are those
    of the layers in order; at tied maxima both route the gradient to the first element of the window.
    They differ by rounding: σ² comes from float64 patch moments rather than a float32 reduction, and two
    float32 values that BN's rounding would make equal stay ordered here, so the gradient follows the
    exact maximum. At γ_c = 0 exactly, where the block is not differentiable in γ_c, the gradient in γ_c
    is the right derivative (the layers in order give the tied window's first element).
    """
    n, channels, height, width = x.shape
    out = weight.shape[0]
    sign = torch.where(gamma >= 0, 1.0, -1.0).to(x.dtype)
    w = (weight * sign.view(-1, 1, 1, 1)).reshape(out, -1)
    b = bias * sign
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(n * height * width, channels * 9)
    z = torch.addmm(b, patches, w.t().contiguous())  # contiguous so that the backward is patchesᵀ·dz (fast)
    z = z.view(n, height, width, out).permute(0, 3, 1, 2)  # [N, C_out, H, W] in channels-last memory
    p64, w64 = patches.double(), w.double()
    m = p64.mean(0)
    centred = p64 - m
    sigma = centred.t() @ centred / p64.shape[0]
    mean = (w64 @ m + b.double()).to(x.dtype)
    var = ((w64 @ sigma) * w64).sum(1)
    scale = gamma * sign * torch.rsqrt(var + eps).to(x.dtype)
    pooled = nn.functional.max_pool2d(z, 2)
    y = scale.view(1, -1, 1, 1) * (pooled - mean.view(1, -1, 1, 1)) + beta.view(1, -1, 1, 1)
    return torch.relu(y).contiguous()  # NCHW again: the next block's BatchNorm is precise in NCHW


class Conv4(nn.Module):
    """4 × [conv 3×3 (hidden filters), BatchNorm, ReLU, max-pool 2×2] + linear head (Finn et al. 2017).

    Omniglot: ``Conv4(ways, in_channels=1, hidden=64, image_size=28)``;
    MiniImageNet: ``Conv4(ways, in_channels=3, hidden=32, image_size=84)``.
    Input [N, in_channels, image_size, image_size] → logits [N, ways].

    Each block applies the max-pool before the ReLU: ReLU is monotone, so maxpool(relu(x)) =
    relu(maxpool(x)) exactly, and the gradients agree too (a window whose maximum is ≤ 0 passes no
    gradient either way; otherwise both pick the same element). The ReLU and its backward then touch a
    quarter of the elements. On the CPU, for grayscale input, the first block is :func:`first_block`,
    the same function with its batch norm moved after the pooling (docs/performance.md). The parameter
    names are those of the textbook order, so checkpoints and weights carry over.
    """

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(4):
            layers += [nn.Conv2d(channels, hidden, 3, padding=1), BatchNorm(hidden), nn.MaxPool2d(2), nn.ReLU()]
            channels, size = hidden, size // 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for four 2×2 poolings (need >= 16)")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(hidden * size * size, ways)
        self.config = {"ways": ways, "in_channels": in_channels, "hidden": hidden, "image_size": image_size}

    def forward(self, x: Tensor) -> Tensor:
        if self._runs_first_block(x):
            conv, bn = self.features[0], self.features[1]
            h = first_block(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.eps)
            return self.head(self.features[4:](h))
        return self.head(self.features(x))

    def _runs_first_block(self, x: Tensor) -> bool:
        """:func:`first_block` for grayscale [N, 1, H, W] input on the CPU, outside the vmap path, and only
        while no forward hook watches the first block's layers (it does not call them)."""
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in self.features[:4])
        return (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] == 1 and not hooked
                and not getattr(_state, "primitive", False))
