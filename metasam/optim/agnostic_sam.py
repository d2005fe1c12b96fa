"""Agnostic-SAM / Agnostic-ASAM as a torch.optim wrapper, for supervised training (a training and a validation
batch per step)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from metasam.core import (
    ASAM_ETA,
    agnostic_perturbation,
    check_beta,
    check_nonnegative,
    cosine_similarity,
    global_norm,
    momentum_update,
)
from metasam.errors import ConfigError
from metasam.optim.base import Closure, SharpnessOptimizer
from metasam.optim.batchnorm import preserve_bn_stats


class AgnosticSAM(SharpnessOptimizer):
    """Agnostic-SAM (Nguyen et al. 2024), or Agnostic-ASAM with ``adaptive``.

    One step, with a training batch B_S and a validation batch B_V (drawn from the training set):
        g_S = ∇L_{B_S}(θ),  g_V = ∇L_{B_V}(θ)
        m ← β·m + (1 − β)·g_V           (m = g_V on the first step)
        ε = ρ1·unit(g_S) − ρ2·unit(m)    (adaptive: ρ1·T²g_S/‖Tg_S‖ − ρ2·T²m/‖Tm‖)
        g* = ∇L_{B_S}(θ + ε);  θ ← base_step(θ, g*)

    Args:
        rho1: ascent radius ρ1 (the SAM radius of the setting); rho2: descent radius ρ2 (≈ ρ1/2).
            ρ2 > ρ1 is allowed with a warning (the paper finds ρ1 > ρ2 works best).
        beta: momentum β ∈ [0, 1) of the validation gradient.
        val_batches, val_loss: for trainers that call only ``step(closure)`` (Lightning, Accelerate-style
            loops): each step draws the next batch of the iterable ``val_batches`` (a DataLoader over the
            training set, say; iterated again when it ends) and runs ``val_loss(batch)``, which returns the
            loss of B_V (no backward). A ``val_closure`` given to :meth:`step` takes precedence.
        grad_scaler: as for :class:`SAM`; both closures backpropagate ``scaler.scale(loss)`` (the validation
            loss of ``val_batches`` is scaled here), g_V is unscaled before it enters m, and an overflow in g_S,
            g_V or g* skips the step (m unchanged).
        Other arguments as for :class:`SAM`.

    ``step(closure, val_closure)`` returns the training loss at θ. ``last_stats`` holds
    ``grad_norm`` ‖g_S‖, ``val_grad_norm`` ‖g_V‖, ``cos_train_val`` cos(g_S, g_V) (both at θ, before
    the update), ``perturbed_grad_norm`` ‖g*‖ and ``val_loss``. ``state_dict`` includes m.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer],
        rho1: float = 0.05,
        rho2: float = 0.025,
        beta: float = 0.9,
        adaptive: bool = False,
        eta: float = ASAM_ETA,
        asam_scope: str = "all",
        model: nn.Module | None = None,
        val_batches: Iterable[Any] | None = None,
        val_loss: Callable[[Any], Tensor] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **base_kwargs: Any,
    ) -> None:
        if (val_batches is None) != (val_loss is None):
            raise ConfigError("val_batches= and val_loss= go together: the batches of B_V and the function that returns "
                              "a batch's loss; give both, or neither and pass val_closure to step()")
        for name, value in (("rho1", rho1), ("rho2", rho2)):
            check_nonnegative(value, name)
        check_beta(beta)
        if rho2 > rho1:
            warnings.warn(
                f"rho2={rho2} > rho1={rho1}: Agnostic-SAM's paper finds rho1 > rho2 works best "
                "(typically rho2 = rho1 / 2)",
                stacklevel=2,
            )
        super().__init__(params, base_optimizer, adaptive, eta, asam_scope, model, grad_scaler, base_kwargs)
        self.rho1 = rho1
        self.rho2 = rho2
        self.beta = beta
        self.momentum: dict[Tensor, Tensor] = {}
        self._pending_momentum: dict[Tensor, Tensor] = {}
        self.val_batches, self.val_loss = val_batches, val_loss
        self._val_iterator: Iterator[Any] | None = None

    def _next_val_closure(self) -> Closure:
        """A closure over the next batch of ``val_batches`` (iterated again from the start when it ends)."""
        if self.val_batches is None:
            raise ConfigError(
                "AgnosticSAM.step() needs val_closure (the validation batch): pass it to step(), or give "
                "val_batches= and val_loss= at construction for trainers that call step(closure) only"
            )
        try:
            batch = next(self._val_iterator) if self._val_iterator is not None else None
        except StopIteration:
            batch = None
        if batch is None:
            self._val_iterator = iter(self.val_batches)
            batch = next(self._val_iterator, None)
            if batch is None:
                raise ConfigError("val_batches= holds no batch: give an iterable of validation batches that is not empty")

        def closure() -> Tensor:
            loss = self.val_loss(batch)
            (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()
            return loss

        return closure

    def first_step(self, val_grads: Sequence[Tensor | None], zero_grad: bool = False) -> list[Tensor]:
        """Move to θ + ε from g_S in ``p.grad`` and g_V given; returns ε.

        ``val_grads`` holds one gradient (or None for none) per parameter of the optimizer, in
        ``param_groups`` order: the gradients of the validation batch at the same θ. None counts as a zero
        g_V for a parameter that has a training gradient (its m becomes β·m, or 0 on its first step). The
        new m is kept aside and becomes the optimizer's only when :meth:`second_step` completes the step, so
        a step refused for a non-finite gradient leaves m as it was.

        m is kept per parameter: the parameters that have a gradient now are updated (a parameter's
        first gradient starts its m at g_V); the others keep theirs.
        """
        self._check_explicit_form()
        return self._perturb(val_grads, zero_grad)

    @torch.no_grad()
    def _perturb(self, val_grads: Sequence[Tensor | None], zero_grad: bool) -> list[Tensor]:
        all_params = self._param_list()
        if len(val_grads) != len(all_params):
            raise ConfigError(
                f"val_grads has {len(val_grads)} entries but the optimizer has {len(all_params)} parameters"
            )
        val_of = dict(zip(all_params, val_grads))
        params, train_grads = self._params_and_grads()
        val = [val_of[p] if val_of[p] is not None else torch.zeros_like(p) for p in params]
        norm, val_norm = global_norm(train_grads), global_norm(val)
        self.last_stats = {
            "grad_norm": norm,
            "val_grad_norm": val_norm,
            "cos_train_val": cosine_similarity(train_grads, val),
        }
        self._check_finite(norm, "training")
        self._check_finite(val_norm, "validation")
        momentum = momentum_update([self.momentum.get(p) for p in params], val, self.beta)
        self._pending_momentum = dict(zip(params, momentum))
        perturbation = agnostic_perturbation(
            params, train_grads, momentum, self.rho1, self.rho2, self.adaptive, self.eta, self._scaled(params)
        )
        self._ascend(params, perturbation)
        if zero_grad:
            self.zero_grad()
        return perturbation

    @torch.no_grad()
    def _descend(self, zero_grad: bool) -> bool:
        """As the base's; once the base optimizer has stepped, the new m counts (a skipped step drops it)."""
        stepped = super()._descend(zero_grad)
        if stepped:
            self.momentum.update(self._pending_momentum)
        self._pending_momentum = {}
        return stepped

    def step(self, closure: Closure | None = None, val_closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One Agnostic-SAM step: ``closure`` on B_S, ``val_closure`` on B_V; returns L_{B_S}(θ)."""
        closure = self._require_closure(closure, "a closure (the training batch)")
        val_closure = torch.enable_grad()(val_closure if val_closure is not None else self._next_val_closure())
        self.zero_grad()
        loss = closure()
        params = self._param_list()
        train_grads = [p.grad for p in params]
        self.zero_grad()
        with preserve_bn_stats(self.model):
            val_loss = val_closure()
        val_grads = [p.grad for p in params]
        if self._skip_on_overflow(train_grads) or self._skip_on_overflow(val_grads):
            return loss
        self._unscale(train_grads)
        self._unscale(val_grads)
        for p, g in zip(params, train_grads):
            p.grad = g
        self._perturb(val_grads, zero_grad=True)
        if val_loss is not None:
            self.last_stats["val_loss"] = torch.as_tensor(val_loss).detach()
        with preserve_bn_stats(self.model):
            closure()
        self._descend(zero_grad=False)
        return loss

    def _sharpness_state(self) -> dict[str, Any]:
        params = self._param_list()
        return {
            "step_count": self.step_count,
            "momentum": {i: self.momentum[p].clone() for i, p in enumerate(params) if p in self.momentum},
        }

    def _load_sharpness_state(self, state: dict[str, Any]) -> None:
        super()._load_sharpness_state(state)
        params = self._param_list()
        self.momentum = {
            params[int(i)]: m.to(device=params[int(i)].device, dtype=params[int(i)].dtype)
            for i, m in state["momentum"].items()
        }
