"""Loss functions of a meta-learned initialisation θ, for the Hessian and the landscape."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from torch import Tensor
from torch.func import grad

from metasam.analysis.hessian import LossFn
from metasam.errors import ConfigError
from metasam.meta import MetaLearner
from metasam.meta.functional import forward, learned_lr_key, task_loss


def meta_loss_fn(learner: MetaLearner, tasks: Iterable, loss: str = "query") -> LossFn:
    """loss_fn(θ) for a meta-learned initialisation, averaged over ``tasks`` (Task or TaskBatch items).

    loss="query": the post-adaptation query loss (1/n) Σ_τ L_q^τ(φ_K^τ(θ)), adapted with the learner's
    meta-training inner rule and steps, differentiated through the adaptation (the meta-objective). The
    adaptation is second order for every learner: a first-order learner (fomaml) trains on an approximation of
    this function's gradient, but the function is the same, and its Hessian needs dφ_K/dθ in full;
    loss="support": the plain support loss (1/n) Σ_τ L_s^τ(θ) at θ itself. A learner's learned inner step
    sizes (``learn_inner_lr``) are constants here: the landscape and the Hessian are θ's.
    """
    if loss not in ("query", "support"):
        raise ConfigError(f"loss must be 'query' or 'support', got {loss!r}")
    episodes = []
    for task in tasks:
        sx, sy, qx, qy = task
        if sy.dim() == 1:
            episodes.append((sx, sy, qx, qy))
        else:
            episodes.extend(zip(sx, sy, qx, qy))
    if not episodes:
        raise ConfigError("meta_loss_fn got no tasks")
    inner = replace(learner.inner, first_order=False)
    lrs = {learned_lr_key(n): a.detach() for n, a in learner.inner_lrs.items()}

    def loss_fn(params: dict[str, Tensor]) -> Tensor:
        theta = {**{n: params[n] for n in learner.names}, **lrs}  # a function of θ alone: α is held fixed
        total = 0.0
        for sx, sy, qx, qy in episodes:
            if loss == "support":
                total = total + learner.loss_fn(forward(learner.model, theta, sx), sy)
            else:  # torch.func.grad inside, so that the Hessian's jvp composes with the adaptation
                total = total + task_loss(learner.model, theta, (sx, sy, qx, qy), inner, grad)[0]
        return total / len(episodes)

    return loss_fn
