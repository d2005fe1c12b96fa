"""CPUConv4: Conv4's function arranged for a CPU, each block with its batch norm after the max-pool.

:func:`first_block` (grayscale input) and :func:`conv_block` compute a Conv4 block, relu(maxpool(BN(conv))),
in channels-last memory with the batch norm moved after the pooling: the same function and derivatives
as the layers in order, so that no full-resolution tensor is normalised or pooled in NCHW memory
(docs/performance.md). :class:`CPUConv4` chains them with Conv4's parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metasam.errors import ConfigError
from metasam.models.batchnorm import BatchNorm
from metasam.models.conv4 import Conv4


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
    * channels-last memory is where torch's CPU max-pool is fast (docs/performance.md).

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


class _Parameters(nn.Module):
    """A layer's weight and bias, without its forward: :class:`CPUConv4` computes its blocks from them."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias

    def extra_repr(self) -> str:
        return f"weight {tuple(self.weight.shape)}, bias {tuple(self.bias.shape)}"


class CPUConv4(nn.Module):
    """:class:`~metasam.models.Conv4`'s function on a CPU, block by block as :func:`first_block` (grayscale
    input) and :func:`conv_block`: same constructor arguments, parameter names, state_dict keys and
    initialisation (under the same seed) as ``Conv4`` with its default :class:`~metasam.models.BatchNorm`,
    so weights and checkpoints carry over between the two.

    Each block applies the ReLU after the max-pool, which equals Conv4's order exactly (ReLU is monotone,
    so relu(maxpool(x)) = maxpool(relu(x)), gradients included).

    Input [N, in_channels, image_size, image_size] on the CPU → logits [N, ways]. Anywhere else it refuses
    with a :class:`~metasam.errors.ConfigError` that names ``Conv4`` as the fix: input on another device,
    input that is not [N, C, H, W], and under ``torch.func.vmap`` (the blocks start from a channels-last copy
    of the input, which vmap cannot make; per-example batching is what Conv4 is for). One case needs no
    copy and runs, computing the same function: grayscale input (already channels-last) under
    ``vmap(grad(f))`` with f differentiated in the input, where torch can answer for the batched tensor.

    It has no layers to hook or swap: ``features.<i>`` (the indices of Conv4's convolutions and batch norms)
    hold parameters only, and the blocks are computed from them. A module hook registered on one of them
    never fires, and replacing one changes nothing but the parameters; for hooks, another normalisation
    or other layers, use ``Conv4``. The head is an ``nn.Linear`` and runs as a layer.
    """

    def __init__(self, ways: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
        layout = Conv4(ways, in_channels, hidden, image_size)  # Conv4's parameters, initialised as Conv4 does
        self.features = nn.ModuleDict({
            name: _Parameters(layer) for name, layer in layout.features.named_children()
            if isinstance(layer, (nn.Conv2d, BatchNorm))})
        self.head = layout.head
        self.eps = 1e-5
        self.config = layout.config

    def forward(self, x: Tensor) -> Tensor:
        h = self._channels_last(x)
        layers = list(self.features.values())
        for i in range(0, len(layers), 2):
            conv, bn = layers[i], layers[i + 1]
            block = first_block if i == 0 and x.shape[1] == 1 else conv_block
            h = block(h, conv.weight, conv.bias, bn.weight, bn.bias, self.eps)
        return self.head(h.flatten(1))

    @staticmethod
    def _channels_last(x: Tensor) -> Tensor:
        """x in channels-last memory, where the blocks start; refuses, naming Conv4, where they cannot run."""
        if x.device.type != "cpu":
            raise ConfigError(f"CPUConv4 runs on the CPU only (input on {x.device}); use metasam.models.Conv4 there, "
                              "the same function with the same parameters")
        if x.dim() != 4:
            raise ConfigError(f"CPUConv4 takes images [N, C, H, W] (got shape {list(x.shape)}); use "
                              "metasam.models.Conv4 for other input, the same function with the same parameters")
        try:
            return x.contiguous(memory_format=torch.channels_last)
        except RuntimeError as exc:  # torch's "NYI: ... inside of vmap ..." for a batched tensor
            if "vmap" not in str(exc):
                raise
            raise ConfigError("CPUConv4 cannot run under torch.func.vmap (its blocks need channels-last memory); "
                              "use metasam.models.Conv4, the same function with the same parameters") from None
