"""Loss functions of a meta-learned initialisation θ, for the Hessian and the landscape."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from metasam.analysis.hessian import LossFn
from metasam.errors import ConfigError
from metasam.meta import MetaLearner


def meta_loss_fn(learner: MetaLearner, tasks: Iterable, kind: str = "query") -> LossFn:
    """loss_fn(θ) for a meta-learned initialisation, averaged over ``tasks`` (Task or TaskBatch items).

    kind="query": the post-adaptation query loss (1/n) Σ_τ L_q^τ(φ_K^τ(θ)), adapted with the learner's
    meta-training inner rule and steps, differentiated through the adaptation (the meta-objective);
    kind="support": the plain support loss (1/n) Σ_τ L_s^τ(θ) at θ itself.
    """
    if kind not in ("query", "support"):
        raise ConfigError(f"kind must be 'query' or 'support', got {kind!r}")
    episodes = []
    for task in tasks:
        sx, sy, qx, qy = task
        if sy.dim() == 1:
            episodes.append((sx, sy, qx, qy))
        else:
            episodes.extend(zip(sx, sy, qx, qy))
    if not episodes:
        raise ConfigError("meta_loss_fn got no tasks")

    def loss_fn(params: dict[str, Tensor]) -> Tensor:
        theta = [params[n] for n in learner.names]
        total = 0.0
        for sx, sy, qx, qy in episodes:
            if kind == "support":
                total = total + learner._loss(theta, sx, sy)
            else:
                phi = learner._adapt_values(theta, sx, sy, learner.inner_steps, learner.inner_rule, learner.first_order)
                total = total + learner._loss(phi, qx, qy)
        return total / len(episodes)

    return loss_fn
