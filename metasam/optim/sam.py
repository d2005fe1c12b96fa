"""torch.optim wrappers: SAM / ASAM and Agnostic-SAM / Agnostic-ASAM for supervised training.

Both wrap any ``torch.optim`` optimizer (the *base*), which takes the actual step with the gradient
found at the perturbed point. The perturbations come from :mod:`metasam.core`; this module only
moves parameters there and back, runs the closures, and keeps the state.

Typical use::

    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=model)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)          # runs the closure twice: at θ and at θ + ε
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from metasam.core import (
    ASAM_ETA,
    check_nonnegative,
    global_norm,
    sam_perturbation,
)
from metasam.optim.base import Closure, SharpnessOptimizer
from metasam.optim.batchnorm import preserve_bn_stats


class SAM(SharpnessOptimizer):
    """Sharpness-Aware Minimization (Foret et al. 2021), or ASAM (Kwon et al. 2021) with ``adaptive``.

    One step:  g = ∇L_S(θ);  ε = ρ·g/‖g‖  (ASAM: ρ·T²g/‖Tg‖, T = |θ| + η);
    g* = ∇L_S(θ + ε);  θ ← base_step(θ, g*).

    Args:
        params: parameters or parameter groups, as for any torch.optim optimizer.
        base_optimizer: the torch.optim class that takes the step (SGD, AdamW, ...).
        rho: radius ρ ≥ 0 (SAM ≈ 0.05; ASAM ≈ 0.5 to 2).
        adaptive: ASAM's scale-invariant perturbation.
        eta: η of T = |θ| + η (ASAM paper 0.01).
        asam_scope: which tensors T scales: "all" (default, the ASAM paper's T) or "weights" (the
            ASAM authors' code: parameters whose name contains "weight"; biases keep T = 1; needs
            ``model``).
        model: the module whose BatchNorm running statistics the perturbed pass must not change;
            give it whenever the model has BatchNorm.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 autocast, whose ``scale(loss)`` the closure
            backpropagates: each pass's gradient is unscaled before use, and a step whose g or g* overflows
            is skipped as GradScaler skips one (``skipped_steps`` counts them); call ``scaler.update()``
            after each ``step`` (not ``scaler.step``). Only with ``step(closure)``.
        **base_kwargs: arguments of ``base_optimizer`` (lr, momentum, weight_decay, ...).

    ``step(closure)`` runs the closure at θ and again at θ + ε and returns the loss at θ.
    ``last_stats`` holds ``grad_norm`` ‖g‖ and ``perturbed_grad_norm`` ‖g*‖ of the last step (empty after a
    skipped one).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = ASAM_ETA,
        asam_scope: str = "all",
        model: nn.Module | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonnegative(rho, "rho")
        super().__init__(params, base_optimizer, adaptive, eta, asam_scope, model, grad_scaler, base_kwargs)
        self.rho = rho

    def first_step(self, zero_grad: bool = False) -> list[Tensor]:
        """Move to θ + ε using the gradients now in ``p.grad``; returns ε (one tensor per such p)."""
        self._check_explicit_form()
        return self._perturb(zero_grad)

    @torch.no_grad()
    def _perturb(self, zero_grad: bool) -> list[Tensor]:
        params, grads = self._params_and_grads()
        norm = global_norm(grads)
        self.last_stats = {"grad_norm": norm}
        self._check_finite(norm, "training")
        perturbation = sam_perturbation(params, grads, self.rho, self.adaptive, self.eta, self._scaled(params))
        self._ascend(params, perturbation)
        if zero_grad:
            self.zero_grad()
        return perturbation

    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One SAM step; ``closure`` runs forward and backward and returns the loss."""
        closure = self._require_closure(closure, "a closure")
        self.zero_grad()
        loss = closure()
        grads = [p.grad for p in self._param_list()]
        if self._skip_on_overflow(grads):
            return loss
        self._unscale(grads)
        self._perturb(zero_grad=True)
        with preserve_bn_stats(self.model):
            closure()
        self._descend(zero_grad=False)
        return loss


