"""The sharpness optimizer core: the perturbations of SAM, ASAM, Agnostic-SAM and Agnostic-ASAM.

These are the only place in metasam where the perturbation equations are written. The torch.optim
wrappers (:mod:`metasam.optim`) and both levels of the bilevel trainer (:mod:`metasam.meta`) call them.

Every function is pure: it takes sequences of tensors (one per parameter, in a fixed order), writes
nothing in place and keeps no state. Each returns new tensors, except :func:`momentum_update`, which
returns the given g_V tensors themselves where m starts (m = g_V). Built from differentiable torch
operations, so a second-order meta-gradient can flow through a perturbation when the caller wants it to.

Notation (docs/algorithms.md §1): θ the parameters, g a gradient, ‖·‖ the global L2 norm over all
parameters together, unit(g) = g / (‖g‖ + 1e-12), T = |θ| + η element-wise (ASAM's scale operator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from metasam.errors import ConfigError

EPS = 1e-12
"""The constant of unit(g) = g / (‖g‖ + EPS); it makes the perturbation of a zero gradient zero."""
ASAM_ETA = 0.01
"""η of ASAM's scale T = |θ| + η (the ASAM paper's value): the default of every ASAM setting in metasam."""


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """‖x‖ = sqrt(Σ_i ‖x_i‖²): the L2 norm of all tensors together, as a 0-d tensor."""
    if len(tensors) == 0:
        raise ConfigError("global_norm got no tensors: pass at least one parameter or gradient")
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """⟨a, b⟩ = Σ_i Σ_j a_ij b_ij over all tensors together, as a 0-d tensor."""
    _check_same_length(a, b, "a", "b")
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def cosine_similarity(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """cos(a, b) = ⟨a, b⟩ / (‖a‖ ‖b‖ + 1e-12): the alignment statistic of docs/algorithms.md §4."""
    return dot(a, b) / (global_norm(a) * global_norm(b) + EPS)


def sam_perturbation(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float,
    adaptive: bool = False,
    eta: float = ASAM_ETA,
    scaled: Sequence[bool] | None = None,
) -> list[Tensor]:
    """The ascent perturbation ε of SAM (Foret et al. 2021) or ASAM (Kwon et al. 2021).

    SAM:   ε = ρ · g / (‖g‖ + 1e-12)
    ASAM:  ε = ρ · T² g / (‖T g‖ + 1e-12),   T_i = |θ_i| + η on a scaled tensor i, T_i = 1 on the others

    The norms run over all tensors together, never tensor by tensor.

    Args:
        params: θ, one tensor per parameter (used by ASAM only; its values, never modified).
        grads: g = ∇L(θ), shaped like ``params``.
        rho: the radius ρ ≥ 0 (ASAM's is typically about 10× SAM's).
        adaptive: ASAM's scale-invariant form instead of SAM's.
        eta: η ≥ 0 of T (0.01 in the ASAM paper, 0 in the davda54/sam port).
        scaled: ASAM only: one flag per tensor, whether T = |θ| + η scales it. None (the default)
            scales every tensor, as the ASAM paper writes T; the ASAM authors' code scales only the
            weight tensors and leaves the biases at T = 1 (see :func:`asam_scaled`).

    Returns:
        ε as a new list of tensors shaped like ``grads``; ‖ε‖ = ρ for SAM, ‖T⁻¹ε‖ = ρ for ASAM, for a
        nonzero gradient (up to the 1e-12 of unit); ε = 0 for a zero gradient.
    """
    check_nonnegative(rho, "rho")
    _check_same_length(params, grads, "params", "grads")
    check_nonnegative(eta, "eta", "(ASAM's T = |θ| + η)")
    if adaptive:
        if scaled is not None and len(scaled) != len(params):
            raise ConfigError(f"scaled has {len(scaled)} flags for {len(params)} tensors: pass one flag per parameter")
        scales = [p.abs() + eta if scaled is None or s else torch.ones_like(p) for p, s in zip(params, scaled or params)]
        scaled = [t * g for t, g in zip(scales, grads)]  # T g
        coef = rho / (global_norm(scaled) + EPS)
        return [coef * t * tg for t, tg in zip(scales, scaled)]  # ρ T (T g) / ‖T g‖
    coef = rho / (global_norm(grads) + EPS)
    return [coef * g for g in grads]


def asam_scaled(names: Sequence[str]) -> list[bool]:
    """The ASAM authors' choice of scaled tensors: those whose parameter name contains "weight"
    (convolution, linear and normalisation weights); biases keep T = 1. For ``scaled=`` of
    :func:`sam_perturbation`, given the parameter names in the same order as the tensors."""
    return ["weight" in name for name in names]


def agnostic_perturbation(
    params: Sequence[Tensor],
    train_grads: Sequence[Tensor],
    val_grads: Sequence[Tensor],
    rho1: float,
    rho2: float,
    adaptive: bool = False,
    eta: float = ASAM_ETA,
    scaled: Sequence[bool] | None = None,
) -> list[Tensor]:
    """The perturbation ε of Agnostic-SAM (Nguyen et al. 2024) or Agnostic-ASAM.

    Agnostic-SAM:   ε = ρ1 · unit(g_S) − ρ2 · unit(m)
    Agnostic-ASAM:  ε = ρ1 · T² g_S / ‖T g_S‖ − ρ2 · T² m / ‖T m‖,   T = |θ| + η

    It ascends along the training gradient g_S and descends along the validation direction m, so
    that L_S(θ + ε) ≈ L_S(θ) + ρ1‖g_S‖ − ρ2⟨g_S, unit(m)⟩ rewards sharpness-aware descent and the
    alignment of training and validation gradients. Each term is a :func:`sam_perturbation`.

    Args:
        params: θ (read by the adaptive form only).
        train_grads: g_S = ∇L_{B_S}(θ).
        val_grads: m, the validation direction: ∇L_{B_V}(θ) or its β-momentum (see
            :func:`momentum_update`).
        rho1: ascent radius ρ1 ≥ 0.
        rho2: descent radius ρ2 ≥ 0; the paper keeps ρ2 < ρ1 (typically ρ1 / 2). ρ2 = 0 gives SAM.
        adaptive, eta, scaled: as in :func:`sam_perturbation`.
    """
    check_nonnegative(rho2, "rho2")
    ascent = sam_perturbation(params, train_grads, rho1, adaptive, eta, scaled)
    descent = sam_perturbation(params, val_grads, rho2, adaptive, eta, scaled)
    return [a - d for a, d in zip(ascent, descent)]


def momentum_update(
    momentum: Sequence[Tensor | None] | None, grads: Sequence[Tensor], beta: float
) -> list[Tensor]:
    """Agnostic-SAM's validation momentum: m ← β·m + (1 − β)·g_V, and m = g_V on the first step.

    Args:
        momentum: the previous m, or None on the first step; a None entry starts that tensor's m
            (a parameter that has its first gradient now) at its g_V.
        grads: g_V, the newest validation gradient.
        beta: β in [0, 1); β = 0 makes m = g_V.
    """
    check_beta(beta)
    if momentum is None:
        return list(grads)
    _check_same_length(momentum, grads, "momentum", "grads")
    return [g if m is None else beta * m + (1.0 - beta) * g for m, g in zip(momentum, grads)]


def check_beta(beta: float, name: str = "beta") -> None:
    """Raise :class:`ConfigError` unless β, the validation momentum of Agnostic-SAM, lies in [0, 1); ``name``
    is how the message names it."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ConfigError(f"{name} must lie in [0, 1) (m <- beta*m + (1-beta)*g_V), got {beta!r}")


def add(a: Sequence[Tensor], b: Sequence[Tensor], alpha: float = 1.0) -> list[Tensor]:
    """a + α·b tensor by tensor (used to form θ + ε and φ − α·d without in-place writes)."""
    _check_same_length(a, b, "a", "b")
    return [x + alpha * y for x, y in zip(a, b)]


def check_nonnegative(value: float, name: str, meaning: str = "") -> None:
    """Raise :class:`ConfigError` unless ``value`` (a radius ρ, ρ1, ρ2 or η) is a finite number ≥ 0.

    NaN fails ``value >= 0``; an infinite radius would turn every perturbed point into Inf/NaN.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite number >= 0{' ' + meaning if meaning else ''}, got {value!r}")


def _check_same_length(a: Sequence[Tensor], b: Sequence[Tensor], name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ConfigError(
            f"{name_a} has {len(a)} tensors but {name_b} has {len(b)}: pass one tensor per parameter, "
            "in the same order"
        )
