"""2-D loss landscapes along filter-normalised random directions (Li et al., NeurIPS 2018), and plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from metasam.analysis.hessian import LossFn
from metasam.atomic_write import replace_atomically
from metasam.errors import ConfigError


def filter_normalized_direction(params: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """A Gaussian direction d with ‖d_{i,j}‖ = ‖θ_{i,j}‖ for every filter j (slice along dim 0) of every
    weight tensor θ_i of two or more dimensions; one-dimensional tensors (biases, BatchNorm's γ and β)
    get d = 0, as in Li et al.'s ``ignore='biasbn'`` setting."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in params.items():
        p = p.detach()
        if p.dim() <= 1:
            out[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
        d_norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (p.dim() - 1)))
        p_norm = p.flatten(1).norm(dim=1).view(-1, *([1] * (p.dim() - 1)))
        out[name] = d * p_norm / (d_norm + 1e-10)
    return out


@torch.no_grad()
def loss_landscape(
    loss_fn: LossFn, params: dict[str, Tensor], steps: int = 21, span: float = 1.0, seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alphas [steps], betas [steps], losses [steps, steps]) with
    losses[i, j] = L(θ + alphas[i]·d1 + betas[j]·d2), alphas = betas = linspace(−span, span, steps),
    d1, d2 filter-normalised directions seeded by ``seed`` and ``seed + 1``."""
    if steps < 2 or not 0 < span < math.inf:
        raise ConfigError(f"need steps >= 2 and a finite span > 0, got steps={steps}, span={span}")
    theta = {n: p.detach() for n, p in params.items()}
    d1, d2 = filter_normalized_direction(theta, seed), filter_normalized_direction(theta, seed + 1)
    alphas = np.linspace(-span, span, steps)
    losses = np.empty((steps, steps))
    bar = tqdm(total=steps * steps, desc="landscape", disable=not progress, leave=False)
    for i, a in enumerate(alphas):
        for j, b in enumerate(alphas):
            point = {n: theta[n] + float(a) * d1[n] + float(b) * d2[n] for n in theta}
            losses[i, j] = float(loss_fn(point))
            bar.update(1)
    bar.close()
    return alphas, alphas.copy(), losses


def landscape_paths(out_prefix: str | Path) -> tuple[Path, Path]:
    """The two PNGs :func:`plot_landscape` writes for ``out_prefix``: ``<prefix>_contour.png``, ``<prefix>_surface.png``."""
    prefix = Path(out_prefix)
    return prefix.with_name(prefix.name + "_contour.png"), prefix.with_name(prefix.name + "_surface.png")


def plot_landscape(
    alphas: np.ndarray, betas: np.ndarray, losses: np.ndarray, out_prefix: str | Path, title: str = "",
    size: tuple[int, int] = (640, 480), dpi: int = 100,
) -> tuple[Path, Path]:
    """Write ``<prefix>_contour.png`` and ``<prefix>_surface.png`` of ``size`` pixels, each atomically;
    returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = landscape_paths(out_prefix)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    a, b = np.meshgrid(alphas, betas, indexing="ij")
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    contour = ax.contour(a, b, losses, levels=20, cmap="viridis")
    ax.clabel(contour, inline=True, fontsize=7)
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_title(title)
    replace_atomically(paths[0], lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
    fig = plt.figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(a, b, losses, cmap="viridis", linewidth=0)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("loss")
    ax.set_title(title)
    replace_atomically(paths[1], lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
    return paths
