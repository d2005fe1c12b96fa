"""Top Hessian eigenvalues of a loss, by Hessian-vector products and Lanczos (scipy's eigsh).

A loss is given as ``loss_fn(params) -> scalar`` over a dict of tensors (the parameters by name), so
the same code serves a supervised model, a batch or a loader, and a meta-learned initialisation (the
post-adaptation query loss over a TaskSet, or the plain support loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from tqdm.auto import tqdm

from metasam.errors import ConfigError

LossFn = Callable[[dict[str, Tensor]], Tensor]


def hessian_vector_product(loss_fn: LossFn, params: dict[str, Tensor], vector: dict[str, Tensor]) -> dict[str, Tensor]:
    """H v = d/dt ∇L(θ + t v) at t = 0 (forward-over-reverse: ``jvp`` of ``grad``)."""
    return jvp(grad(loss_fn), (params,), (vector,))[1]


def hessian_eigenvalues(
    loss_fn: LossFn, params: dict[str, Tensor], k: int = 5, tol: float = 1e-4, maxiter: int | None = None, seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """The k largest (algebraic) eigenvalues of ∇²L(θ), descending, as a float64 tensor [k].

    Lanczos (``scipy.sparse.linalg.eigsh``, which='LA') on a ``LinearOperator`` whose matvec is
    :func:`hessian_vector_product`; the start vector is seeded, so results repeat. Each HVP costs about
    two gradient evaluations of ``loss_fn``.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    names = list(params)
    theta = {n: params[n].detach() for n in names}
    shapes = [theta[n].shape for n in names]
    sizes = [theta[n].numel() for n in names]
    dim = sum(sizes)
    if not 1 <= k < dim:
        raise ConfigError(f"k must lie in [1, {dim - 1}] for {dim} parameters, got {k}")
    ref = theta[names[0]]
    bar = tqdm(desc="Hessian-vector products", unit="hvp", disable=not progress, leave=False)

    def matvec(v: np.ndarray) -> np.ndarray:
        bar.update(1)
        flat = torch.as_tensor(np.ascontiguousarray(v).ravel(), dtype=ref.dtype, device=ref.device)
        parts = torch.split(flat, sizes)
        vector = {n: p.view(s) for n, p, s in zip(names, parts, shapes)}
        hv = hessian_vector_product(loss_fn, theta, vector)
        return torch.cat([hv[n].reshape(-1) for n in names]).detach().cpu().double().numpy()

    op = LinearOperator((dim, dim), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(dim)
    try:
        values = eigsh(op, k=k, which="LA", tol=tol, maxiter=maxiter, v0=v0, return_eigenvectors=False)
    finally:
        bar.close()
    return torch.from_numpy(np.sort(values)[::-1].copy())


def model_loss_fn(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor],
    criterion: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> LossFn:
    """loss_fn(θ) = mean over ``batches`` (one (x, y) pair or an iterable such as a DataLoader) of
    criterion(model_θ(x), y). BatchNorm runs in the model's current mode (call ``model.eval()`` first for
    running statistics); buffers are passed as copies, so the model is never written."""
    batches = [batches] if isinstance(batches, tuple) else list(batches)
    buffers = dict(model.named_buffers())

    def loss_fn(params: dict[str, Tensor]) -> Tensor:
        total = 0.0
        for x, y in batches:
            copies = {n: b.clone() for n, b in buffers.items()}
            total = total + criterion(functional_call(model, {**params, **copies}, (x,)), y)
        return total / len(batches)

    return loss_fn
