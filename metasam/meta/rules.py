"""Update rules shared by both levels of the bilevel loop (docs/algorithms.md §3).

A rule turns a gradient function into an update direction d:

    gd / plain:  d = ∇L(φ)
    sam:         d = ∇L(φ + ε),  ε = sam_perturbation(φ, ∇L(φ), ρ)
    agnostic:    d = ∇L(φ + ε),  ε = agnostic_perturbation(φ, ∇L(φ), m, ρ1, ρ2),  m ← β m + (1 − β) ∇L_v(φ)

At the inner level L is a task's support loss, L_v the loss of its validation view, and the learner
steps φ ← φ − α d. At the outer level L is the meta-loss of a meta-batch, L_v the meta-loss of a
separate validation meta-batch, and d goes to the outer optimizer. The perturbations come from
:mod:`metasam.core`: the same functions as the torch.optim wrappers, written once.

Rules are frozen dataclasses (configuration only); the momentum m is state the caller threads through.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from torch import Tensor

from metasam.core import (
    ASAM_ETA,
    add,
    agnostic_perturbation,
    check_beta,
    check_nonnegative,
    cosine_similarity,
    global_norm,
    momentum_update,
    sam_perturbation,
)
from metasam.errors import ConfigError

GradFn = Callable[[Sequence[Tensor]], Sequence[Tensor]]
"""Maps parameter values (a list of tensors) to the gradient of a loss at them."""

Stats = dict[str, Tensor]


@dataclass(frozen=True)
class Rule:
    """Plain gradient: d = ∇L(φ). The inner rule of MAML (``gd``) and the outer rule ``plain``.

    Subclasses define :meth:`perturbation`; :meth:`direction` then returns ∇L(φ + ε).
    """

    name = "gd"
    ascent: ClassVar[str | None] = None  # the name of the setting that is the radius of the ascent, if any

    def direction(
        self, grad_fn: GradFn, params: Sequence[Tensor], state: Any = None, val_grad_fn: GradFn | None = None
    ) -> tuple[list[Tensor], Any, Stats]:
        """Return (d, new state, statistics) for parameter values ``params``."""
        grads = list(grad_fn(params))
        eps, state, stats = self.perturbation(params, grads, state, val_grad_fn)
        stats["grad_norm"] = global_norm(grads).detach()
        return (grads if eps is None else list(grad_fn(add(params, eps)))), state, stats

    def perturbation(
        self, params: Sequence[Tensor], grads: list[Tensor], state: Any, val_grad_fn: GradFn | None
    ) -> tuple[list[Tensor] | None, Any, Stats]:
        """(ε or None for no perturbation, new state, extra statistics) given g = ∇L(φ)."""
        return None, state, {}


ADAPTIVE_HELP = ("ASAM's form: each term ρ·unit(v) of the perturbation becomes ρ T²v/‖Tv‖, T = |φ| + η (|θ| + η at the "
                 "outer level)")
ETA_HELP = "η of ASAM's scale T = |φ| + η (|θ| + η at the outer level)"


def setting(default: Any, help: str) -> Any:
    """A rule hyperparameter: its default and the help text ``metasam train --help`` shows for its flags."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SAMRule(Rule):
    """d = ∇L(φ + ε), ε = ρ · unit(∇L(φ)) (adaptive: ρ T²g/‖Tg‖). Sharp-MAML's rule at either level.

    ``detach_perturbation``: ε is computed from detached values (the gradient, and for ASAM the scale
    T = |φ| + η), so a second-order meta-gradient flows through ∇L(φ + ε) but not through ε (a cheaper
    approximation; off by default, as in the Sharp-MAML reference code, which differentiates through
    the perturbation).
    """

    rho: float = setting(0.05, "ρ, the radius of the SAM perturbation")
    adaptive: bool = setting(False, ADAPTIVE_HELP)
    eta: float = setting(ASAM_ETA, ETA_HELP)
    detach_perturbation: bool = setting(False, "treat the perturbation as a constant (no gradient through it; cheaper)")
    name = "sam"
    ascent = "rho"

    def __post_init__(self) -> None:
        _check_settings(self)

    def perturbation(self, params, grads, state, val_grad_fn):
        if self.detach_perturbation:
            params, grads = _detached(params), _detached(grads)
        return sam_perturbation(params, grads, self.rho, self.adaptive, self.eta), state, {}


@dataclass(frozen=True)
class AgnosticRule(Rule):
    """d = ∇L(φ + ε), ε = ρ1 · unit(∇L(φ)) − ρ2 · unit(m), m ← β m + (1 − β) ∇L_v(φ).

    ``state`` is m (None before the first step). Without ``val_grad_fn`` the validation view is the
    training data itself, ∇L_v = ∇L (the seed paper duplicates the support set at the inner level):
    the first step then equals :class:`SAMRule` with radius ρ1 − ρ2 (in exact arithmetic: ρ1·u − ρ2·u and
    (ρ1 − ρ2)·u may differ by rounding), later steps differ through m.
    """

    rho1: float = setting(0.05, "ρ1, the radius of the ascent along the training gradient")
    rho2: float = setting(0.025, "ρ2, the radius of the step against the validation momentum")
    beta: float = setting(0.9, "β, the decay of the validation momentum m ← β m + (1 − β) ∇L_v")
    adaptive: bool = setting(False, ADAPTIVE_HELP)
    eta: float = setting(ASAM_ETA, ETA_HELP)
    detach_perturbation: bool = setting(False, "treat the perturbation as a constant (no gradient through it; cheaper)")
    name = "agnostic"
    ascent = "rho1"

    def __post_init__(self) -> None:
        _check_settings(self)
        check_beta(self.beta, f"{self.name} rule: beta")
        if self.rho2 > self.rho1:
            warnings.warn(
                f"agnostic rule: rho2={self.rho2} > rho1={self.rho1}; the paper finds rho1 > rho2 works best "
                "(typically rho2 = rho1 / 2)",
                stacklevel=3,
            )

    def perturbation(self, params, grads, state, val_grad_fn):
        val_grads = grads if val_grad_fn is None else list(val_grad_fn(params))
        momentum = momentum_update(state, val_grads, self.beta)
        at, g_s, m = params, grads, momentum
        if self.detach_perturbation:
            at, g_s, m = _detached(at), _detached(g_s), _detached(m)
        eps = agnostic_perturbation(at, g_s, m, self.rho1, self.rho2, self.adaptive, self.eta)
        stats = {
            "val_grad_norm": global_norm(val_grads).detach(),
            "cos_train_val": cosine_similarity(grads, val_grads).detach(),
        }
        return eps, momentum, stats


def _check_settings(rule: Rule) -> None:
    """Radii and η finite and ≥ 0, switches bools: the checks every rule's settings share."""
    for f in fields(rule):
        value = getattr(rule, f.name)
        if f.type in (bool, "bool"):
            if not isinstance(value, bool):
                raise ConfigError(f"{rule.name} rule: {f.name} must be True or False, got {value!r}")
        elif f.name != "beta":
            check_nonnegative(value, f"{rule.name} rule: {f.name}")


def _detached(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach() for t in tensors]


RULES: dict[str, type[Rule]] = {"gd": Rule, "plain": Rule, "sam": SAMRule, "agnostic": AgnosticRule}


def settings_of(kind: str) -> list[str]:
    """The hyperparameters of the rule named ``kind``, in their dataclass order (none for gd / plain)."""
    if kind not in RULES:
        raise ConfigError(f"unknown rule {kind!r}; choose one of {', '.join(RULES)}")
    return [f.name for f in fields(RULES[kind])]


def make_rule(kind: str, **params: Any) -> Rule:
    """The rule named ``kind`` (gd/plain, sam, agnostic) with its hyperparameters."""
    unknown = sorted(set(params) - set(settings_of(kind)))
    if unknown:
        raise ConfigError(f"the {kind} rule has no setting {', '.join(unknown)}; it takes "
                          f"{', '.join(settings_of(kind)) or 'nothing'}")
    return RULES[kind](**params)


def rule_spec(rule: Rule) -> dict[str, Any]:
    """A plain-data description of ``rule`` that :func:`rule_from_spec` turns back into it (for checkpoints):
    ``{"kind": name, "params": fields}`` for metasam's rule classes; ``{"class": "module.Name"}`` for others,
    which a checkpoint cannot rebuild."""
    if type(rule) is RULES.get(rule.name):
        return {"kind": rule.name, "params": asdict(rule)}
    return {"class": f"{type(rule).__module__}.{type(rule).__qualname__}"}


def rule_from_spec(spec: Rule | dict[str, Any], level: str) -> Rule:
    """``spec`` itself if it is a Rule, else the rule :func:`rule_spec` described; ``level`` (inner/outer)
    names the argument in errors."""
    if isinstance(spec, Rule):
        return spec
    if not isinstance(spec, dict) or ("kind" not in spec and "class" not in spec):
        raise ConfigError(f"{level}_rule must be a metasam.meta.Rule, got {spec!r}")
    if "class" in spec:
        raise ConfigError(
            f"this learner was trained with a custom {level} rule, {spec['class']}, which a checkpoint cannot "
            f"rebuild; pass {level}_rule=<an instance of it> to MetaLearner.load"
        )
    return make_rule(spec["kind"], **spec.get("params", {}))
