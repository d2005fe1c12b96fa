"""An independent reference for metasam's algorithms, written from the equations of docs/algorithms.md.

Plain ``torch.autograd`` on lists of float64 tensors; nothing here imports metasam, so a test that compares
metasam with these functions compares it with the equations, not with itself. Kept deliberately naive:
one loop per equation, no batching, no cleverness.

Notation: θ parameters, g a gradient, ‖·‖ the norm over all tensors together, unit(g) = g / (‖g‖ + 1e-12),
T = |θ| + η element-wise (ASAM; T = 1 on tensors the caller leaves unscaled, and for plain SAM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-12


def norm(tensors):
    return torch.sqrt(sum((t * t).sum() for t in tensors))


def ascent(params, grads, rho, adaptive=False, eta=0.0, scaled=None):
    """ρ · T² g / (‖T g‖ + 1e-12), with T = |θ| + η where ``scaled`` (default: every tensor) and 1 elsewhere;
    for SAM (adaptive False) T = 1 everywhere, which is ρ · g / (‖g‖ + 1e-12)."""
    scaled = [True] * len(params) if scaled is None else scaled
    t = [p.abs() + eta if adaptive and s else torch.ones_like(p) for p, s in zip(params, scaled)]
    n = norm([ti * g for ti, g in zip(t, grads)])
    return [rho * ti * ti * g / (n + EPS) for ti, g in zip(t, grads)]


def agnostic_eps(params, g_s, m, rho1, rho2, adaptive=False, eta=0.0, scaled=None):
    """ε = ρ1 T² g_S / ‖T g_S‖ − ρ2 T² m / ‖T m‖ (Agnostic-SAM: T = 1)."""
    up = ascent(params, g_s, rho1, adaptive, eta, scaled)
    down = ascent(params, m, rho2, adaptive, eta, scaled)
    return [a - b for a, b in zip(up, down)]


def momentum(m, g_v, beta):
    """m ← β m + (1 − β) g_V; m = g_V on the first step."""
    return list(g_v) if m is None else [beta * a + (1 - beta) * b for a, b in zip(m, g_v)]


def grad(loss_fn, at, create_graph):
    """∇ loss_fn at the tensors ``at`` (fresh leaves where they carry no graph)."""
    at = [a if a.requires_grad else a.detach().requires_grad_() for a in at]
    return list(torch.autograd.grad(loss_fn(at), at, create_graph=create_graph))


# -- a two-layer network with four parameter tensors ----------------------------------------------------
def mlp_logits(w, x):
    w1, b1, w2, b2 = w
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def ce(w, x, y):
    return F.cross_entropy(mlp_logits(w, x), y)


# -- the bilevel loops ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    """One level's rule: kind gd | sam | agnostic and its hyperparameters."""

    kind: str = "gd"
    rho: float = 0.0
    rho1: float = 0.0
    rho2: float = 0.0
    beta: float = 0.0
    adaptive: bool = False
    eta: float = 0.0
    detach: bool = False


def rule_direction(level, loss_fn, val_loss_fn, at, m, create_graph):
    """(d, new m) of ``level`` at ``at``: gd ∇L; sam ∇L(φ + ρ unit(∇L)); agnostic ∇L(φ + ε), ε from ∇L and m."""
    g = grad(loss_fn, at, create_graph)
    if level.kind == "gd":
        return g, m
    if level.kind == "sam":
        eps = ascent(at, g, level.rho, level.adaptive, level.eta)
    else:
        g_v = g if val_loss_fn is None else grad(val_loss_fn, at, create_graph)
        m = momentum(m, g_v, level.beta)
        eps = agnostic_eps(at, g, m, level.rho1, level.rho2, level.adaptive, level.eta)
    if level.detach:
        eps = [e.detach() for e in eps]
    return grad(loss_fn, [a + e for a, e in zip(at, eps)], create_graph), m


def adapt(theta, sx, sy, inner, steps, alpha, first_order, val_view=None, adapted=None):
    """φ_K: φ_0 = θ, φ_k = φ_{k−1} − α d_k over the tensors ``adapted`` (indices; default all), the others
    staying θ. First order: d_k is computed at a detached φ_{k−1} (and detached other tensors) without a graph,
    so dφ_K/dθ = I. ``alpha``: a number, or (Meta-SGD) one tensor per adapted tensor, multiplied elementwise."""
    idx = list(range(len(theta))) if adapted is None else list(adapted)
    alphas = list(alpha) if isinstance(alpha, (list, tuple)) else [alpha] * len(idx)
    fixed = [t.detach() for t in theta] if first_order else list(theta)

    def full(base, sub):
        out = list(base)
        for i, v in zip(idx, sub):
            out[i] = v
        return out

    val_loss = None
    if val_view is not None:
        vx, vy = val_view(sx, sy)
        val_loss = lambda w: ce(full(fixed, w), vx, vy)  # noqa: E731
    phi, m = [theta[i] for i in idx], None
    for _ in range(steps):
        at = [p.detach() for p in phi] if first_order else phi
        d, m = rule_direction(inner, lambda w: ce(full(fixed, w), sx, sy), val_loss, at, m, create_graph=not first_order)
        phi = [p - a * di for p, a, di in zip(phi, alphas, d)]
    return full(theta, phi)


def meta_loss(theta, batch, inner, steps, alpha, first_order, val_view=None, adapted=None):
    """L_meta(θ) = (1/T) Σ_τ L_q^τ(φ_K^τ(θ))."""
    sx, sy, qx, qy = batch
    losses = [ce(adapt(theta, sx[t], sy[t], inner, steps, alpha, first_order, val_view, adapted), qx[t], qy[t])
              for t in range(len(sx))]
    return sum(losses) / len(losses)


def outer_direction(theta, batch, val_batch, inner, outer, steps, alpha, first_order, m, val_view=None):
    """(the outer rule's direction at θ, new outer m): plain ∇L_meta; sam and agnostic as at the inner level,
    with L_v the meta-loss of ``val_batch``."""
    loss = lambda w: meta_loss(w, batch, inner, steps, alpha, first_order, val_view)  # noqa: E731
    val_loss = None if outer.kind != "agnostic" else (lambda w: meta_loss(w, val_batch, inner, steps, alpha, first_order, val_view))
    level = Level() if outer.kind == "plain" else outer
    leaves = [t.detach() for t in theta]
    d, m = rule_direction(level, loss, val_loss, leaves, m, create_graph=False)
    return [x.detach() for x in d], None if m is None else [x.detach() for x in m]


# -- supervised steps -----------------------------------------------------------------------------------
def sgd(theta, g, buf, lr, mu, wd):
    """torch.optim.SGD (dampening 0, not Nesterov): g ← g + wd θ; buf ← g first (a None entry), μ buf + g after;
    θ ← θ − lr buf."""
    g = [gi + wd * t for gi, t in zip(g, theta)]
    buf = [gi if b is None else mu * b + gi for b, gi in zip(buf, g)]
    return [t - lr * b for t, b in zip(theta, buf)], buf
