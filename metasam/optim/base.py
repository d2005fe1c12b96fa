"""The mechanics :class:`~metasam.optim.SAM` and :class:`~metasam.optim.AgnosticSAM` share: the base optimizer,
the move to θ + ε and back, finite checks, state. The perturbations themselves come from :mod:`metasam.core`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from metasam.core import (
    asam_scaled,
    check_nonnegative,
    global_norm,
)
from metasam.errors import ConfigError, NonFiniteError

Closure = Callable[[], Tensor]

ASAM_SCOPES = ("all", "weights")
"""Which tensors ASAM's T = |θ| + η scales: "all" (the ASAM paper's T) or "weights" (the ASAM authors'
code: tensors whose parameter name contains "weight"; biases keep T = 1)."""


class SharpnessOptimizer(Optimizer):
    """Shared mechanics of the wrappers: the base optimizer, moving to θ + ε and back, state, checks.

    ``param_groups`` and ``state`` are the base optimizer's own objects, so learning-rate schedulers,
    ``zero_grad`` and inspection of momentum buffers work on the wrapper as on the base.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer],
        adaptive: bool,
        eta: float,
        asam_scope: str,
        model: nn.Module | None,
        grad_scaler: torch.amp.GradScaler | None,
        base_kwargs: dict[str, Any],
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise ConfigError(
                f"base_optimizer must be a torch.optim.Optimizer class such as torch.optim.SGD, got "
                f"{base_optimizer!r}; pass the class, not an instance, and its arguments as keywords"
            )
        check_nonnegative(eta, "eta", "(ASAM's T = |θ| + η)")
        if asam_scope not in ASAM_SCOPES:
            raise ConfigError(f"asam_scope must be one of {', '.join(ASAM_SCOPES)}, got {asam_scope!r}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise ConfigError(f"grad_scaler must be a torch.amp.GradScaler (float16 loss scaling), got "
                              f"{type(grad_scaler).__name__}")
        super().__init__(params, {})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults
        self.state = self.base_optimizer.state
        self.adaptive = adaptive
        self.eta = eta
        self.asam_scope = asam_scope
        self._scaled_of = self._asam_scaled_of(model) if adaptive and asam_scope == "weights" else None
        self.model = model
        # a disabled scaler (GradScaler(enabled=False), the usual enabled=use_amp) scales nothing and records no
        # overflow: it is no scaler, and a NaN stays an error
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.step_count = 0
        self.skipped_steps = 0
        self.last_stats: dict[str, Tensor] = {}
        self._origin: list[tuple[Tensor, Tensor]] | None = None

    def _asam_scaled_of(self, model: nn.Module | None) -> dict[Tensor, bool]:
        """Parameter → whether ASAM scales it, from the parameter names of ``model`` (asam_scope="weights")."""
        if model is None:
            raise ConfigError('asam_scope="weights" tells weights from biases by parameter name: pass model=')
        name_of = {p: n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(self._param_list()) if p not in name_of]
        if missing:
            raise ConfigError(
                f'asam_scope="weights": parameters {missing} of the optimizer are not parameters of model=; '
                "pass the model that owns them"
            )
        return dict(zip(name_of, asam_scaled(list(name_of.values()))))

    def _scaled(self, params: Sequence[Tensor]) -> list[bool] | None:
        """``scaled=`` of the core perturbations for ``params``: None (every tensor) unless asam_scope="weights"."""
        return None if self._scaled_of is None else [self._scaled_of[p] for p in params]

    # -- parameters and gradients -------------------------------------------------------------
    def _params_and_grads(self) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters that received a gradient in the last backward pass, and those gradients."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            raise ConfigError(
                "no parameter has a gradient: the closure must call loss.backward() (and return the loss)"
            )
        return params, [p.grad for p in params]

    def _check_finite(self, norm: Tensor, what: str) -> None:
        if not torch.isfinite(norm):
            raise NonFiniteError(
                f"step {self.step_count}: the {what} gradient is not finite (norm {norm.item()}); "
                "parameters were left at their values before this step. Lower the learning rate or "
                "the radius (rho / rho1), or check the loss and the data for NaN/Inf"
            )

    # -- float16 loss scaling (grad_scaler) ----------------------------------------------------
    def _skip_on_overflow(self, grads: Sequence[Tensor | None]) -> bool:
        """With ``grad_scaler``: whether ``grads`` (one per parameter, of a scaled loss) hold an Inf or NaN, an
        overflow of the loss scale. If so the step is skipped, as GradScaler skips it: the gradients go to
        ``scaler.unscale_``, which records the overflow so that ``scaler.update()`` lowers the scale, and are
        cleared; the parameters, the base optimizer's state and Agnostic-SAM's m do not change."""
        if self.grad_scaler is None or _all_finite(grads):
            return False
        for p, g in zip(self._param_list(), grads):
            p.grad = g
        self.grad_scaler.unscale_(self)
        self.zero_grad()
        self.skipped_steps += 1
        self.last_stats = {}
        return True

    @torch.no_grad()
    def _unscale(self, grads: Sequence[Tensor | None]) -> None:
        """g ← g / s in place, s the scale of ``grad_scaler`` (nothing without one): the gradients of one pass
        before the scaler's own ``unscale_``, which a step may call once, on g*."""
        if self.grad_scaler is not None:
            inverse = 1.0 / self.grad_scaler.get_scale()
            for g in grads:
                if g is not None:
                    g.mul_(inverse)

    def _check_explicit_form(self) -> None:
        if self.grad_scaler is not None:
            raise ConfigError(f"grad_scaler= works with {type(self).__name__}.step(closure); in the explicit form "
                              "(first_step/second_step) leave it out and unscale the gradients yourself")

    # -- the two halves of a step -------------------------------------------------------------
    def _ascend(self, params: Sequence[Tensor], perturbation: Sequence[Tensor]) -> None:
        """θ ← θ + ε, remembering θ exactly (θ + ε − ε is not θ in floating point)."""
        with torch.no_grad():
            self._origin = [(p, p.detach().clone()) for p in params]
            for p, e in zip(params, perturbation):
                p.add_(e)

    def second_step(self, zero_grad: bool = False) -> None:
        """Return to θ and take the base optimizer's step with the gradient g* found at θ + ε."""
        self._check_explicit_form()
        self._descend(zero_grad)

    @torch.no_grad()
    def _descend(self, zero_grad: bool) -> bool:
        """:meth:`second_step`; returns whether the base optimizer stepped (with ``grad_scaler``, not when g*
        overflowed: θ stays)."""
        if self._origin is None:
            raise ConfigError("second_step() called before first_step(): call first_step() after the first backward")
        for p, origin in self._origin:
            p.copy_(origin)
        self._origin = None
        params, grads = self._params_and_grads()
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self)  # g* ← g*/s; the scaler records whether g* overflowed
            if not _all_finite(grads):
                self.skipped_steps += 1
                self.last_stats = {}
                self.zero_grad()
                return False
        perturbed_norm = global_norm(grads)
        self.last_stats["perturbed_grad_norm"] = perturbed_norm
        self._check_finite(perturbed_norm, "perturbed (θ + ε)")
        self.base_optimizer.step()
        self.step_count += 1
        if zero_grad:
            self.zero_grad()
        return True

    def _require_closure(self, closure: Closure | None, name: str) -> Closure:
        if closure is None:
            scaler = ("; with grad_scaler=, call opt.step(closure) then scaler.update(), not scaler.step(opt)"
                      if self.grad_scaler is not None else "")
            raise ConfigError(
                f"{type(self).__name__}.step() needs {name}: a function that runs the forward pass and "
                "loss.backward() on its batch and returns the loss (the optimizer zeroes gradients and "
                f"calls it once per pass){scaler}"
            )
        return torch.enable_grad()(closure)

    # -- state ----------------------------------------------------------------------------------
    def _param_list(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and this wrapper's own (step count, Agnostic-SAM's m)."""
        return {"base": self.base_optimizer.state_dict(), "sharpness": self._sharpness_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: the base optimizer's state and this wrapper's own."""
        if set(state_dict) != {"base", "sharpness"}:
            raise ConfigError(
                f"not a {type(self).__name__} state dict (keys {sorted(state_dict)}); it must come from "
                f"{type(self).__name__}.state_dict()"
            )
        self.base_optimizer.load_state_dict(state_dict["base"])
        # the base replaced its param_groups and state objects: share the new ones again
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._load_sharpness_state(state_dict["sharpness"])

    def _sharpness_state(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def _load_sharpness_state(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])


def _all_finite(grads: Sequence[Tensor | None]) -> bool:
    """Whether every element of every gradient given (None: no gradient) is finite; one check per tensor, as
    GradScaler's own, rather than of the norm, which overflows before its elements do."""
    present = [g for g in grads if g is not None]
    return not present or bool(torch.stack([torch.isfinite(g).all() for g in present]).all())
