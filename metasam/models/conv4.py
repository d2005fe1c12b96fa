"""Conv4, the standard few-shot backbone, with a batch norm that stays exact under ``vmap``.

Why not plain ``nn.BatchNorm2d(track_running_stats=False)``: under ``torch.func.vmap`` PyTorch's
batching rule for the batch-norm backward gives a second-order meta-gradient that is off by 0.3–0.5 %
(finite differences agree with a per-task loop). :class:`BatchNorm` therefore runs PyTorch's fused
kernel normally (fast, and exact without vmap) and, inside :func:`primitive_batchnorm` (which the
learner's vmap path enters), the same normalisation written from mean, biased variance, rsqrt and an
affine map, which batches exactly. Either way it has no buffers for adaptation to write: it always
uses the statistics of the batch it sees (MAML's transductive choice, at meta-training and meta-test).

On the CPU, Conv4 computes each block with the batch norm moved after the max-pool, in channels-last
memory (:func:`conv_block`; the grayscale first block as :func:`first_block`, with its statistics from
patch moments): the same function and derivatives, so that no full-resolution tensor is normalised or
pooled in NCHW (a second-order meta-training step runs about 1.4× faster than the layers in order;
docs/performance.md). Under vmap, on CUDA (never measured there), while a hook watches its layers and
once a layer is swapped for another, it runs the layers in order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch._C._functorch import TransformType  # private: whether a vmap transform is active
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.nn.modules import module as _module

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


def _sign(gamma: Tensor, dtype: torch.dtype) -> Tensor:
    """s = sign γ, +1 at γ = 0."""
    return torch.where(gamma >= 0, 1.0, -1.0).to(dtype)


def _pool_then_normalise(z: Tensor, mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor, sign: Tensor,
                         eps: float) -> Tensor:
    """relu(a · (maxpool₂ₓ₂(z) − μ) + β), a = γ s / √(σ² + ε) ≥ 0, which equals relu(maxpool₂ₓ₂(BN_γ,β(s z))).

    z is a sign-folded convolution output s·conv (s = sign γ per channel), μ (in z's dtype) and σ² (any
    float dtype) its batch mean and biased variance per channel. BN(s z) = a (z − μ) + β is a non-negative
    affine map of z, so it commutes with the max-pool: the normalisation runs on the pooled quarter.
    """
    scale = gamma * sign * torch.rsqrt(var + eps).to(z.dtype)
    pooled = nn.functional.max_pool2d(z, 2)
    return torch.relu(scale.view(1, -1, 1, 1) * (pooled - mean.view(1, -1, 1, 1)) + beta.view(1, -1, 1, 1))


def first_block(x: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """relu(maxpool₂ₓ₂(BN_γ,β(z))), z = conv₃ₓ₃(x; W, b) with padding 1: Conv4's grayscale first block on a CPU.

    x [N, C, H, W] → [N, C_out, ⌊H/2⌋, ⌊W/2⌋] in channels-last memory. :func:`conv_block` with two more
    exact identities, which pay when C is 1:

    * z is linear in the 3×3 input patches p (C·9 values, zero padding included): z_c = w_c·p + b_c.
      Its batch mean and biased variance are therefore μ_c = w_c·m + b_c and σ²_c = w_cᵀ Σ w_c, with m and
      Σ the mean and covariance of the patches over the N·H·W positions, computed in float64. No pass
      over the [N, C_out, H, W] activations computes statistics.
    * The conv is one matrix product, patches [N·H·W, C·9] × (s W)ᵀ, whose output rows are positions:
      channels-last memory, as the pooling wants it.

    Value, gradient and second-order gradient are those of the layers in order, as for :func:`conv_block`.
    """
    n, channels, height, width = x.shape
    out = weight.shape[0]
    sign = _sign(gamma, x.dtype)
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
    return _pool_then_normalise(z, mean, var, gamma, beta, sign, eps)


def conv_block(h: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor, eps: float = 1e-5) -> Tensor:
    """relu(maxpool₂ₓ₂(BN_γ,β(conv₃ₓ₃(h; W, b)))) with padding 1: a Conv4 block arranged for a CPU.

    h [N, C, H, W] → [N, C_out, ⌊H/2⌋, ⌊W/2⌋], both in channels-last memory (h is converted if it is not).
    With s = sign γ (+1 at 0) folded into the convolution (exact: s = ±1),
    z = conv(h; s W, s b), and BN_γ,β(conv) = a (z − μ) + β with a = γ s / √(σ² + ε) ≥ 0, a monotone map
    that commutes with the max-pool (:func:`_pool_then_normalise`). Hence:

    * the batch norm runs after the pooling, on a quarter of the elements, and the pooling decides on the
      convolution's output itself, not on a rounded normalisation of it;
    * μ and σ² are reduced over the [N·H·W, C] rows of channels-last z with float64 accumulation, in two
      passes: μ₃₂ (μ rounded to z's dtype), then σ² = Σ (z − μ₃₂)² / (N·H·W), which exceeds the biased
      variance by (μ − μ₃₂)², relatively about 1e-14. torch's fused channels-last batch norm accumulates
      in float32, and its rounding flips near-tied maxima of the pooling (docs/performance.md);
    * channels-last memory is where torch's CPU max-pool and batch norm are fast (NCHW max-pool: 6 ms
      against 0.3 ms on a 5-way query set's second block).

    Value, gradient and second-order gradient (every operation is differentiable, h included) are those
    of the layers in order; at tied maxima both route the gradient to the first element of the window.
    They differ by rounding: σ² is accumulated in float64, and two float32 values that the batch norm's
    rounding would make equal stay ordered here, so the gradient follows the exact maximum. At γ_c = 0
    exactly, where the block is not differentiable in γ_c, the gradient in γ_c is the right derivative
    (the layers in order give the tied window's first element).
    """
    sign = _sign(gamma, h.dtype)
    h = h.contiguous(memory_format=torch.channels_last)
    z = nn.functional.conv2d(h, weight * sign.view(-1, 1, 1, 1), bias * sign, padding=1)
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # a view when z is channels-last
    mean = (rows.sum(0, dtype=torch.float64) / rows.shape[0]).to(z.dtype)
    var = ((rows - mean) ** 2).sum(0, dtype=torch.float64) / rows.shape[0]
    return _pool_then_normalise(z, mean, var, gamma, beta, sign, eps)


class Conv4(nn.Module):
    """4 × [conv 3×3 (hidden filters), BatchNorm, ReLU, max-pool 2×2] + linear head (Finn et al. 2017).

    Omniglot: ``Conv4(ways, in_channels=1, hidden=64, image_size=28)``;
    MiniImageNet: ``Conv4(ways, in_channels=3, hidden=32, image_size=84)``.
    Input [N, in_channels, image_size, image_size] → logits [N, ways].

    Each block applies the max-pool before the ReLU: ReLU is monotone, so maxpool(relu(x)) =
    relu(maxpool(x)) exactly, and the gradients agree too (a window whose maximum is ≤ 0 passes no
    gradient either way; otherwise both pick the same element). The ReLU and its backward then touch a
    quarter of the elements. On the CPU the blocks are :func:`first_block` (grayscale input) and
    :func:`conv_block`, the same functions with the batch norm moved after the pooling, in channels-last
    memory (docs/performance.md). The parameter names are those of the textbook order, so checkpoints
    and weights carry over.
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
        if not self._runs_blocks(x):
            return self.head(self.features(x))
        h = x
        for i in range(0, 16, 4):
            conv, bn = self.features[i], self.features[i + 1]
            block = first_block if i == 0 and x.shape[1] == 1 else conv_block
            h = block(h, conv.weight, conv.bias, bn.weight, bn.bias, bn.eps)
        return self.head(h.flatten(1))

    def _runs_blocks(self, x: Tensor) -> bool:
        """The blocks as :func:`first_block` and :func:`conv_block` only for [N, C, H, W] input on the CPU,
        outside vmap (the learner's vmap path, and any ``torch.func.vmap``: channels-last memory cannot
        be asked for under vmap), while no hook watches ``features`` or its layers (the blocks do not
        call them), and while the layers are those ``__init__`` built (one swapped for another module
        runs in order, as written)."""
        in_vmap = getattr(_state, "primitive", False) or any(
            i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())
        return x.device.type == "cpu" and x.dim() == 4 and not in_vmap and not self._hooked() and self._as_built()

    def _hooked(self) -> bool:
        hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        return any(getattr(_module, "_global" + h) for h in hooks) or any(
            getattr(layer, h) for layer in (self.features, *self.features) for h in hooks)

    def _as_built(self) -> bool:
        if len(self.features) != 17 or type(self.features[16]) is not nn.Flatten:
            return False
        for i in range(0, 16, 4):
            conv, bn, pool, relu = self.features[i : i + 4]
            if (type(conv), type(bn), type(pool), type(relu)) != (nn.Conv2d, BatchNorm, nn.MaxPool2d, nn.ReLU):
                return False
            conv_as_built = ((3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros", True)
            if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode,
                    conv.bias is not None) != conv_as_built:
                return False
            if (pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode) != (2, 2, 0, 1, False):
                return False
        return True
