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

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from metasam.core import (
    agnostic_perturbation,
    asam_scaled,
    check_beta,
    check_nonnegative,
    cosine_similarity,
    global_norm,
    momentum_update,
    sam_perturbation,
)
from metasam.errors import ConfigError, NonFiniteError
from metasam.optim.batchnorm import preserve_bn_stats

Closure = Callable[[], Tensor]

ASAM_SCOPES = ("all", "weights")
"""Which tensors ASAM's T = |θ| + η scales: "all" (the ASAM paper's T) or "weights" (the ASAM authors'
code: tensors whose parameter name contains "weight"; biases keep T = 1)."""


class _SharpnessOptimizer(Optimizer):
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
        self.step_count = 0
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

    # -- the two halves of a step -------------------------------------------------------------
    def _ascend(self, params: Sequence[Tensor], perturbation: Sequence[Tensor]) -> None:
        """θ ← θ + ε, remembering θ exactly (θ + ε − ε is not θ in floating point)."""
        with torch.no_grad():
            self._origin = [(p, p.detach().clone()) for p in params]
            for p, e in zip(params, perturbation):
                p.add_(e)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to θ and take the base optimizer's step with the gradient g* found at θ + ε."""
        if self._origin is None:
            raise ConfigError("second_step() called before first_step(): call first_step() after the first backward")
        for p, origin in self._origin:
            p.copy_(origin)
        self._origin = None
        params, grads = self._params_and_grads()
        perturbed_norm = global_norm(grads)
        self.last_stats["perturbed_grad_norm"] = perturbed_norm
        self._check_finite(perturbed_norm, "perturbed (θ + ε)")
        self.base_optimizer.step()
        self.step_count += 1
        if zero_grad:
            self.zero_grad()

    def _require_closure(self, closure: Closure | None, name: str) -> Closure:
        if closure is None:
            raise ConfigError(
                f"{type(self).__name__}.step() needs {name}: a function that runs the forward pass and "
                "loss.backward() on its batch and returns the loss (the optimizer zeroes gradients and "
                "calls it once per pass)"
            )
        return torch.enable_grad()(closure)

    # -- state ----------------------------------------------------------------------------------
    def _param_list(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and this wrapper's own (step count, Agnostic-SAM's m)."""
        return {"base": self.base_optimizer.state_dict(), "sharpness": self._sharpness_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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


class SAM(_SharpnessOptimizer):
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
        **base_kwargs: arguments of ``base_optimizer`` (lr, momentum, weight_decay, ...).

    ``step(closure)`` runs the closure at θ and again at θ + ε and returns the loss at θ.
    ``last_stats`` holds ``grad_norm`` ‖g‖ and ``perturbed_grad_norm`` ‖g*‖ of the last step.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        asam_scope: str = "all",
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_nonnegative(rho, "rho")
        super().__init__(params, base_optimizer, adaptive, eta, asam_scope, model, base_kwargs)
        self.rho = rho

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> list[Tensor]:
        """Move to θ + ε using the gradients now in ``p.grad``; returns ε (one tensor per such p)."""
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
        self.first_step(zero_grad=True)
        with preserve_bn_stats(self.model):
            closure()
        self.second_step()
        return loss


class AgnosticSAM(_SharpnessOptimizer):
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
        eta: float = 0.0,
        asam_scope: str = "all",
        model: nn.Module | None = None,
        val_batches: Iterable[Any] | None = None,
        val_loss: Callable[[Any], Tensor] | None = None,
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
        super().__init__(params, base_optimizer, adaptive, eta, asam_scope, model, base_kwargs)
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
            loss.backward()
            return loss

        return closure

    @torch.no_grad()
    def first_step(self, val_grads: Sequence[Tensor | None], zero_grad: bool = False) -> list[Tensor]:
        """Move to θ + ε from g_S in ``p.grad`` and g_V given; returns ε.

        ``val_grads`` holds one gradient (or None for none) per parameter of the optimizer, in
        ``param_groups`` order: the gradients of the validation batch at the same θ. The new m is
        kept aside and becomes the optimizer's only when :meth:`second_step` completes the step, so a
        step refused for a non-finite gradient leaves m as it was.

        m is kept per parameter: the parameters that have a gradient now are updated (a parameter's
        first gradient starts its m at g_V); the others keep theirs.
        """
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
    def second_step(self, zero_grad: bool = False) -> None:
        """As :meth:`SAM.second_step`; once the base optimizer has stepped, the new m counts."""
        super().second_step(zero_grad)
        self.momentum.update(self._pending_momentum)
        self._pending_momentum = {}

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
        for p, g in zip(params, train_grads):
            p.grad = g
        self.first_step(val_grads, zero_grad=True)
        if val_loss is not None:
            self.last_stats["val_loss"] = torch.as_tensor(val_loss).detach()
        with preserve_bn_stats(self.model):
            closure()
        self.second_step()
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
