"""Float32 arithmetic on CUDA: full IEEE float32 by default, TensorFloat-32 only when asked for.

PyTorch's own default computes float32 *convolutions* with TF32 tensor cores on Ampere and later GPUs
(cuDNN reads each input with a 10-bit mantissa, about 1e-3 relative error per product) and float32
matrix products in full precision. A second-order meta-gradient of a Conv4 is a difference of such
products, so under that default a GPU run's meta-gradients would be further from the float64 truth than
a CPU run's by orders of magnitude. metasam's commands therefore run float32 in full precision unless
``--tf32`` is given, and record the choice in the run's configuration.
"""

from __future__ import annotations

import torch

TF32_HELP = ("let CUDA convolutions and matrix products use TF32 tensor cores (10-bit mantissa: a rounding of up to "
             "about 5e-4 relative per operand; meant to be faster on Ampere and later, not measured here); default: "
             "full float32, as on the CPU")
"""The ``--tf32`` help of every command that trains."""


def use_tf32(enabled: bool) -> None:
    """Let cuDNN convolutions and cuBLAS matrix products on float32 tensors use TF32 (``enabled``) or not.

    Process-wide (``torch.backends.cudnn.allow_tf32`` and ``torch.backends.cuda.matmul.allow_tf32``);
    no effect on the CPU, nor on float64 or half-precision tensors.
    """
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
