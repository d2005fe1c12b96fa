"""The bilevel learner: MAML, Sharp-MAML and Agnostic-SAM as one loop over an inner and an outer rule.

Parameters are a dict (name → tensor) and the model runs through ``torch.func.functional_call``; the
inner loop differentiates the support loss with a graph kept (``torch.autograd.grad(create_graph=True)``
on the loop path, ``torch.func.grad`` under vmap), so a second-order meta-gradient is the plain gradient
of the post-adaptation query loss (docs/algorithms.md §3):

    φ_0 = θ;  φ_k = φ_{k−1} − α · d_k  (d_k from the inner rule on the support loss L_s)
    L_meta(θ) = (1/T) Σ_τ L_q^τ(φ_K^τ(θ));  the outer rule turns ∇L_meta into the outer optimizer's input.

A ``reducer`` (:mod:`metasam.meta.distributed`) shares each meta-batch between processes: every
meta-gradient and metric over tasks is a sum over this process's tasks divided by the task count, both
summed over the processes, so the outer rules see the meta-gradient of the whole meta-batch.

Two paths over the tasks of a meta-batch: ``loop`` (one task at a time: least memory, fastest on CPU)
and ``vmap`` (all tasks at once). They compute the same meta-gradient for models whose operations
have exact batching rules; the vmap path refuses torch.nn BatchNorm layers, whose batched backward
is wrong in second order (use :class:`metasam.models.BatchNorm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metasam.checkpoint import load_checkpoint, state_dict_mismatch
from metasam.core import cosine_similarity
from metasam.data.episodes import TaskBatch
from metasam.errors import CheckpointError, ConfigError, NonFiniteError
from metasam.meta.distributed import Reducer
from metasam.meta.presets import PRESETS, RULE_PARAMS
from metasam.meta.rules import GradFn, Rule, make_rule, rule_from_spec, rule_spec
from metasam.models import MODELS
from metasam.models.conv4 import primitive_batchnorm

ValView = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]
"""(model output, target) → a scalar loss, differentiable in the output."""
AdaptSelection = Sequence[str] | Callable[[str, Tensor], bool] | nn.Module
TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def as_task_batch(batch: Sequence[Tensor]) -> TaskBatch:
    """Accept a TaskBatch, any named tuple with those fields, or a plain 4-tuple in that order."""
    if len(batch) != 4:
        raise ConfigError(f"a task batch has 4 tensors (support_x, support_y, query_x, query_y), got {len(batch)}")
    batch = TaskBatch(*batch)
    if batch.support_x.dim() >= 1 and batch.support_x.shape[0] == 0:
        raise ConfigError(
            "the task batch holds no tasks; when processes share a meta-batch (a reducer), each needs at least "
            "one of its tasks: use a meta-batch of at least as many tasks as processes"
        )
    if batch.support_x.dim() < 2 or batch.support_y.dim() < 2:
        raise ConfigError(
            "task batch tensors need a leading task dimension: support_x [T, N*K, ...], support_y [T, N*K]; "
            f"got {tuple(batch.support_x.shape)} and {tuple(batch.support_y.shape)} (wrap one task with x.unsqueeze(0))"
        )
    return batch


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 1.96 · sd / √n) with the sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, 1.96 * sd / math.sqrt(n)


def check_hparams(
    algo: str, inner_lr: float, inner_steps: int, test_inner_steps: int | None = None, outer_lr: float = 1e-3,
    test_rule: str = "same", path: str = "auto", **rule_params: Any,
) -> tuple[Rule, Rule]:
    """Check :class:`MetaLearner`'s hyperparameters without a model or data; return the preset's
    (inner, outer) rules built from ``rule_params``.

    Raises :class:`ConfigError` naming the first bad argument (α and the outer learning rate must be
    finite and > 0, step counts ints ≥ 1, radii finite and ≥ 0, ``rule_params`` those the preset's rules
    take); warns where ρ2 > ρ1. ``metasam train`` calls it before it loads any data.
    """
    if algo not in PRESETS:
        raise ConfigError(f"unknown algo {algo!r}; choose one of {', '.join(PRESETS)}")
    for name, value in (("inner_lr", inner_lr), ("outer_lr", outer_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    for name, value in (("inner_steps", inner_steps), ("test_inner_steps", test_inner_steps)):
        if not (value is None and name == "test_inner_steps") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    if test_rule not in ("same", "gd"):
        raise ConfigError(f"test_rule must be 'same' or 'gd', got {test_rule!r}")
    if path not in ("auto", "loop", "vmap"):
        raise ConfigError(f"path must be 'auto', 'loop' or 'vmap', got {path!r}")
    preset = PRESETS[algo]
    accepted = {f"{lvl}_{p}" for lvl, kind in (("inner", preset.inner), ("outer", preset.outer)) for p in RULE_PARAMS[kind]}
    unused = set(rule_params) - accepted
    if unused:
        raise ConfigError(
            f"{algo} does not use {sorted(unused)}: its inner rule is {preset.inner!r} "
            f"(takes {list(RULE_PARAMS[preset.inner]) or 'nothing'}), its outer rule {preset.outer!r} "
            f"(takes {list(RULE_PARAMS[preset.outer]) or 'nothing'}); prefix each with inner_ or outer_"
        )

    def rule(kind: str, level: str) -> Rule:
        prefix = f"{level}_"
        return make_rule(kind, **{k[len(prefix):]: v for k, v in rule_params.items() if k.startswith(prefix)})

    return rule(preset.inner, "inner"), rule(preset.outer, "outer")


GradMaker = Callable[[Callable[[Sequence[Tensor]], Tensor]], GradFn]
"""Turns a loss function of parameter values into its gradient function."""


def autograd_grad(create_graph: bool) -> GradMaker:
    """``torch.func.grad``'s contract (values → ∇ loss at values) with ``torch.autograd.grad``: values that
    do not require grad become leaves; ``create_graph`` keeps the gradient differentiable (second order).
    Works under ``torch.no_grad`` too, like ``torch.func.grad``."""

    def make(loss_fn: Callable[[Sequence[Tensor]], Tensor]) -> GradFn:
        def grad_fn(values: Sequence[Tensor]) -> list[Tensor]:
            with torch.enable_grad():
                values = [v if v.requires_grad else v.detach().requires_grad_() for v in values]
                return list(torch.autograd.grad(loss_fn(values), values, create_graph=create_graph,
                                                allow_unused=True, materialize_grads=True))

        return grad_fn

    return make


def _has_torch_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, TORCH_BATCHNORMS) for m in model.modules())


def check_running_stats(model: nn.Module) -> None:
    """Refuse torch BatchNorm layers that keep running statistics: adaptation runs on copies of the buffers
    and never updates them, so after ``model.eval()`` they would normalise with stale values."""
    layers = [n for n, m in model.named_modules() if isinstance(m, TORCH_BATCHNORMS) and m.track_running_stats]
    if layers:
        raise ConfigError(
            f"BatchNorm layer(s) {layers[:3]} keep running statistics (track_running_stats=True), which meta-learning "
            "never updates, so model.eval() would normalise with their initial values: build them with "
            "track_running_stats=False (batch statistics, MAML's choice) or use metasam.models.BatchNorm, or pass "
            "allow_running_stats=True if they hold statistics you trust (a pretrained, frozen body)"
        )


def adapted_names(model: nn.Module, names: Sequence[str], adapt: AdaptSelection | None) -> list[str]:
    """The names of the parameters that adapt in the inner loop: all of ``names`` for None; those listed; those
    for which ``adapt(name, parameter)`` is true; or those of a submodule of ``model``."""
    if adapt is None:
        return list(names)
    params = dict(model.named_parameters())
    if isinstance(adapt, nn.Module):
        owned = {id(p) for p in adapt.parameters()}
        chosen = [n for n in names if id(params[n]) in owned]
    elif callable(adapt):
        chosen = [n for n in names if adapt(n, params[n])]
    else:
        unknown = sorted(set(adapt) - set(names))
        if isinstance(adapt, str) or unknown:
            raise ConfigError(f"adapt= names {unknown or adapt!r} that are not trainable parameters of the model; "
                              f"choose among {list(names)[:6]}{' ...' if len(names) > 6 else ''}")
        chosen = [n for n in names if n in set(adapt)]
    if not chosen:
        raise ConfigError("adapt= selects no parameter: the inner loop would adapt nothing; select at least one")
    return chosen


def custom_spec(value: Any) -> dict[str, str]:
    """How a checkpoint records a callable it cannot store: its qualified name, for the error on load."""
    return {"custom": f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}"}


def refuse_custom_spec(value: Any, name: str) -> Any:
    """``value`` itself, unless it is the record :func:`custom_spec` left in a checkpoint: then say to pass it again."""
    if isinstance(value, dict) and set(value) == {"custom"}:
        raise ConfigError(f"this learner was trained with a custom {name}, {value['custom']}, which a checkpoint cannot "
                          f"rebuild; pass {name}=<it> to MetaLearner.load")
    return value


def outer_optimizer_class(value: type[torch.optim.Optimizer] | str) -> type[torch.optim.Optimizer]:
    """A torch.optim class, given as the class or by its name ("Adam", "SGD", "AdamW", ...)."""
    cls = getattr(torch.optim, value, None) if isinstance(value, str) else value
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"outer_optimizer must be a torch.optim.Optimizer class or the name of one, got {value!r}")
    return cls


def _sum_over_tasks(task_terms: Callable[[int], list[Tensor]], tasks: int) -> list[Tensor]:
    """Σ_{t<tasks} task_terms(t), tensor by tensor, accumulated in task order."""
    total = task_terms(0)
    for t in range(1, tasks):
        total = [a + b for a, b in zip(total, task_terms(t))]
    return total


class MetaLearner:
    """Meta-learn an initialisation θ of ``model`` with a preset (see ``PRESETS``) or custom rules.

    Args:
        model: any ``nn.Module``; its trainable parameters are θ. torch BatchNorm layers must use batch
            statistics (``track_running_stats=False``) unless ``allow_running_stats``.
        algo: maml, fomaml, sharp-maml-low, sharp-maml-up, sharp-maml-both, agnostic-sam,
            agnostic-sam-up, agnostic-sam-both.
        inner_lr: α. inner_steps: K at meta-training; test_inner_steps: K at meta-test (default K).
        first_order: detach inner gradients (default: the preset's; True only for fomaml).
        outer_lr: the outer optimizer's learning rate.
        outer_optimizer: a ``torch.optim`` class or its name (default Adam); ``outer_kwargs`` its other
            arguments (weight_decay, betas, momentum, ...); ``outer_scheduler``: a function of the outer
            optimizer returning a learning-rate scheduler, stepped after every meta-step and saved in
            :meth:`state_dict` (pass it to :meth:`load` again).
        loss_fn: (model output, target) → scalar loss of a task's batch, for the inner and the outer loop
            (default: cross-entropy). ``accuracy``: report query accuracy (argmax of the output against
            integer targets); default: only with the default loss.
        adapt: the parameters that adapt in the inner loop (the others are meta-learned only, ANIL-style):
            a list of names, a predicate ``(name, parameter) → bool`` or a submodule; default: all.
        inner_rule / outer_rule: a :class:`~metasam.meta.rules.Rule` replacing the preset's (or the
            plain-data spec :func:`~metasam.meta.rules.rule_spec` gives, as checkpoints store it).
            metasam's rules are saved with the checkpoint and :meth:`load` rebuilds them; a rule class
            of your own must be passed to :meth:`load` again.
        test_rule: "same" (the meta-training inner rule, the seed paper's and Sharp-MAML's choice) or "gd".
        val_view: the agnostic inner rule's validation view of the support set, (x, y) → (x', y');
            None duplicates the support set (the seed paper). Never the query set.
        path: "loop", "vmap" or "auto" (loop on CPU; vmap on CUDA when the model allows it — not yet
            measured on a GPU, so pass "loop" or "vmap" to choose by your own measurement).
        reducer: shares meta-batches and evaluation tasks between processes (data parallel, see
            :mod:`metasam.meta.distributed`): each process passes its own tasks and gets
            ∇L_meta = Σ_r Σ_{τ∈S_r} ∇L_q^τ / Σ_r |S_r| of the whole meta-batch. None: one process.
        **rule_params: hyperparameters of the rules prefixed by level: inner_rho, inner_rho1,
            inner_rho2, inner_beta, inner_adaptive, inner_eta, inner_detach_perturbation, and the
            same with ``outer_``.
    """

    def __init__(
        self,
        model: nn.Module,
        algo: str = "maml",
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        test_inner_steps: int | None = None,
        first_order: bool | None = None,
        outer_lr: float = 1e-3,
        outer_optimizer: type[torch.optim.Optimizer] | str = torch.optim.Adam,
        outer_kwargs: dict[str, Any] | None = None,
        outer_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        loss_fn: LossFn | None = None,
        accuracy: bool | None = None,
        adapt: AdaptSelection | None = None,
        allow_running_stats: bool = False,
        inner_rule: Rule | dict[str, Any] | None = None,
        outer_rule: Rule | dict[str, Any] | None = None,
        test_rule: str = "same",
        val_view: ValView | None = None,
        path: str = "auto",
        reducer: Reducer | None = None,
        **rule_params: Any,
    ) -> None:
        preset_inner, preset_outer = check_hparams(
            algo, inner_lr, inner_steps, test_inner_steps, outer_lr, test_rule, path, **rule_params
        )
        preset = PRESETS[algo]
        optimizer_class = outer_optimizer_class(outer_optimizer)
        if "lr" in (outer_kwargs or {}):
            raise ConfigError("outer_kwargs holds 'lr': give the outer learning rate as outer_lr= (it is checked and saved there)")
        self.loss_fn = refuse_custom_spec(loss_fn, "loss_fn") or nn.functional.cross_entropy
        self.accuracy = loss_fn is None if accuracy is None else accuracy
        outer_scheduler = refuse_custom_spec(outer_scheduler, "outer_scheduler")
        if not allow_running_stats:
            check_running_stats(model)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.names = list(self.params)
        adapted = adapted_names(model, self.names, adapt)
        self.adapted = [i for i, n in enumerate(self.names) if n in set(adapted)]
        self.hparams = {
            "algo": algo, "inner_lr": inner_lr, "inner_steps": inner_steps, "test_inner_steps": test_inner_steps,
            "first_order": first_order, "outer_lr": outer_lr, "test_rule": test_rule,
            "outer_optimizer": optimizer_class.__name__ if getattr(torch.optim, optimizer_class.__name__, None) is optimizer_class
            else custom_spec(optimizer_class),
            "outer_kwargs": dict(outer_kwargs or {}), "accuracy": self.accuracy, "allow_running_stats": allow_running_stats,
            "adapt": None if adapt is None else adapted, **rule_params,
        }
        for name, value in (("loss_fn", loss_fn), ("outer_scheduler", outer_scheduler)):
            if value is not None:  # load() cannot rebuild a function: the checkpoint says so, and asks for it
                self.hparams[name] = custom_spec(value)
        self.model = model
        self.algo = algo
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.test_inner_steps = test_inner_steps or inner_steps
        self.first_order = preset.first_order if first_order is None else first_order
        self.test_rule = test_rule
        self.val_view = val_view
        self.reducer = reducer
        self.inner_rule = preset_inner if inner_rule is None else rule_from_spec(inner_rule, "inner")
        self.outer_rule = preset_outer if outer_rule is None else rule_from_spec(outer_rule, "outer")
        for level, rule in (("inner", inner_rule), ("outer", outer_rule)):
            if rule is not None:  # saved with the checkpoint, so that load() rebuilds the same rules
                self.hparams[f"{level}_rule"] = rule_spec(getattr(self, f"{level}_rule"))
        self.outer_optimizer = optimizer_class(list(self.params.values()), lr=outer_lr, **(outer_kwargs or {}))
        self.outer_scheduler = None if outer_scheduler is None else outer_scheduler(self.outer_optimizer)
        self.outer_momentum: list[Tensor] | None = None
        self._outputs: int | None = None  # the model's output size, measured by _checked
        self.iteration = 0
        device = next(iter(self.params.values())).device
        if path == "auto":
            path = "vmap" if device.type == "cuda" and not _has_torch_batchnorm(model) else "loop"
        if path == "vmap" and _has_torch_batchnorm(model):
            raise ConfigError(
                "path='vmap' with torch.nn BatchNorm layers gives a wrong second-order meta-gradient (PyTorch's "
                "batching rule for the batch-norm backward); use metasam.models.BatchNorm in the model or path='loop'"
            )
        self.path = path

    # -- functional model ---------------------------------------------------------------------
    def _loss(self, values: Sequence[Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(self._logits(values, x), y)

    def _logits(self, values: Sequence[Tensor], x: Tensor) -> Tensor:
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}  # adaptation never writes the model's buffers
        return functional_call(self.model, ({**dict(zip(self.names, values)), **buffers}), (x,))

    def _adapt_values(
        self, theta: Sequence[Tensor], sx: Tensor, sy: Tensor, steps: int, rule: Rule, first_order: bool,
        grad_of: GradMaker = grad, visit: Callable[[list[Tensor], list[Tensor]], None] | None = None,
    ) -> list[Tensor]:
        """φ_K from φ_0 = θ by K steps φ ← φ − α·d of ``rule`` on the support loss, over the adapted parameters
        (the others stay θ; first order sees them detached). ``grad_of`` turns a loss function into its gradient
        function: ``torch.func.grad`` (composes with vmap, jvp) or :func:`autograd_grad` (the loop path).
        ``visit(φ_{k−1}, φ_k)`` (all parameters) is called after each step."""
        fixed = [t.detach() for t in theta] if first_order else list(theta)
        grad_s = grad_of(lambda v: self._loss(self._with_adapted(fixed, v), sx, sy))
        grad_v = None
        if self.val_view is not None and rule.name == "agnostic":
            vx, vy = self.val_view(sx, sy)
            grad_v = grad_of(lambda v: self._loss(self._with_adapted(fixed, v), vx, vy))
        phi, state = [theta[i] for i in self.adapted], None
        for _ in range(steps):
            base = [p.detach() for p in phi] if first_order else phi
            d, state, _ = rule.direction(grad_s, base, state, grad_v)
            previous, phi = phi, [p - self.inner_lr * g for p, g in zip(phi, d)]
            if visit is not None:
                visit(self._with_adapted(fixed, previous), self._with_adapted(fixed, phi))
        return self._with_adapted(theta, phi)

    def _checked(self, batch: Sequence[Tensor]) -> Sequence[Tensor]:
        """``batch`` (a task or a task batch), once its labels are known to fit the model's outputs: with the
        default cross-entropy, a model of C outputs cannot learn labels ≥ C (a 5-way Conv4 on 20-way tasks)."""
        if self.loss_fn is not nn.functional.cross_entropy:
            return batch
        if self._outputs is None:  # one forward of one support set at θ, once
            with torch.no_grad():
                x = batch[0] if batch[1].dim() == 1 else batch[0][0]
                self._outputs = self._logits([self.params[n] for n in self.names], x).shape[-1]
        labels = max(int(batch[1].max()), int(batch[3].max())) + 1
        if labels > self._outputs:
            raise ConfigError(f"the tasks have labels up to {labels - 1} ({labels} ways) but the model gives {self._outputs} "
                              f"outputs per example: build it for {labels} ways (e.g. Conv4(ways={labels}))")
        return batch

    def _with_adapted(self, values: Sequence[Tensor], adapted: Sequence[Tensor]) -> list[Tensor]:
        """``values`` with the adapted parameters' entries replaced by ``adapted`` (in ``self.adapted`` order)."""
        if len(adapted) == len(values):
            return list(adapted)
        merged = list(values)
        for i, v in zip(self.adapted, adapted):
            merged[i] = v
        return merged

    def _task_loss(self, theta, sx, sy, qx, qy, grad_of: GradMaker = grad):
        phi = self._adapt_values(theta, sx, sy, self.inner_steps, self.inner_rule, self.first_order, grad_of)
        output = self._logits(phi, qx)
        loss = self.loss_fn(output, qy)
        return loss, (loss.detach(), self._accuracy(output, qy))

    def _accuracy(self, output: Tensor, y: Tensor) -> Tensor:
        """Mean of argmax(output) == y, or NaN where the learner reports no accuracy (a regression loss)."""
        if not self.accuracy:
            return output.new_full((), float("nan")).detach()
        return (output.argmax(-1) == y).float().mean().detach()

    def _task_grad(self, theta: Sequence[Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        """(∇_θ L_q(φ_K(θ)), (query loss, query accuracy)) of one task with torch.autograd: the loop path.
        The same graph ``torch.func.grad(_task_loss)`` builds, without its wrapper dispatch on every
        operation, which cost about a fifth of a Conv4 step on CPU (benchmarks/throughput.py)."""
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in theta]
            loss, aux = self._task_loss(leaves, sx, sy, qx, qy, autograd_grad(create_graph=not self.first_order))
            return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True), aux

    def _meta_grad(self, theta: Sequence[Tensor], batch: TaskBatch) -> tuple[list[Tensor], Tensor, Tensor]:
        """∇_θ L_meta and the mean post-adaptation query loss and accuracy of ``batch`` (of the whole
        meta-batch when a reducer shares it: see :meth:`_task_mean`)."""
        theta = tuple(theta)
        tasks = batch.support_x.shape[0]
        if self.path == "vmap":
            def loss_sum(th):
                losses, aux = vmap(self._task_loss, in_dims=(None, 0, 0, 0, 0))(th, *batch)
                return losses.sum(), aux

            with primitive_batchnorm():
                grads, (losses, accs) = grad(loss_sum, has_aux=True)(theta)
            sums = [*grads, losses.sum(), accs.sum()]
        else:
            def task_terms(t: int) -> list[Tensor]:
                g, (loss, acc) = self._task_grad(theta, batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t])
                return [*g, loss, acc]

            sums = _sum_over_tasks(task_terms, tasks)
        *grads, loss, acc = self._task_mean(sums, tasks)
        return grads, loss, acc

    def _task_mean(self, sums: list[Tensor], tasks: int) -> list[Tensor]:
        """(1/T) Σ_τ x_τ from sums over this process's ``tasks`` tasks: T = ``tasks`` for one process; with
        a reducer, one all-reduce of (sums, count) gives Σ_r Σ_{τ∈S_r} x_τ / Σ_r |S_r| on every process."""
        if self.reducer is None:
            return [s / tasks for s in sums]
        *sums, count = self.reducer.sum([*sums, sums[0].new_tensor(float(tasks))])
        return [s / count for s in sums]

    # -- public API -----------------------------------------------------------------------------
    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None, params: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Fast weights φ_K for one task (support_x [N·K, ...]); usable with ``functional_call`` or
        :meth:`predict`. Uses the test-time rule and step count; differentiable w.r.t. θ unless the
        learner is first order."""
        theta = [(params or self.params)[n] for n in self.names]
        return dict(zip(self.names, self._adapt_for_test(theta, support_x, support_y, steps, self.first_order)))

    def _adapt_for_test(self, theta, sx, sy, steps: int | None, first_order: bool) -> list[Tensor]:
        rule = self.inner_rule if self.test_rule == "same" else make_rule("gd")
        return self._adapt_values(theta, sx, sy, steps or self.test_inner_steps, rule, first_order,
                                  autograd_grad(create_graph=not first_order))

    def predict(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Logits of ``x`` under fast weights ``params`` (BatchNorm: statistics of the batch ``x``)."""
        return self._logits([params[n] for n in self.names], x)

    def meta_gradient(self, batch: Sequence[Tensor], val_batch: Sequence[Tensor] | None = None) -> dict[str, Tensor]:
        """The direction the outer rule feeds to the outer optimizer, keyed like ``named_parameters``.

        For the plain outer rule this is ∇L_meta(θ). No step is taken; the outer rule's momentum
        (agnostic outer) is not advanced either. With a ``reducer``, ``batch`` (and ``val_batch``) hold
        this process's tasks and the direction is that of the whole meta-batch, the same on every process.
        """
        batch = self._checked(as_task_batch(batch))
        direction, _, _ = self._outer_direction(batch, val_batch)
        return {n: g.detach() for n, g in zip(self.names, direction)}

    def _outer_direction(self, batch: TaskBatch, val_batch: Sequence[Tensor] | None):
        theta = [self.params[n].detach() for n in self.names]
        metrics: dict[str, Tensor] = {}

        def meta_grad(values):
            grads, loss, acc = self._meta_grad(values, batch)
            metrics.setdefault("query_loss", loss)  # the first call is at θ
            if self.accuracy:
                metrics.setdefault("query_acc", acc)
            return grads

        val_fn = None
        if self.outer_rule.name == "agnostic":
            if val_batch is None:
                raise ConfigError(
                    f"{self.algo}'s agnostic outer rule needs a validation meta-batch (val_batch=) of tasks drawn "
                    "from the meta-training classes, separate from the training meta-batch"
                )
            vb = as_task_batch(val_batch)
            val_fn = lambda values: self._meta_grad(values, vb)[0]  # noqa: E731
        direction, state, stats = self.outer_rule.direction(meta_grad, theta, self.outer_momentum, val_fn)
        return direction, state, {**metrics, **{f"outer_{k}": v for k, v in stats.items()}}

    def meta_step(
        self, batch: Sequence[Tensor], val_batch: Sequence[Tensor] | None = None, pre_adaptation: bool = False,
        alignment: bool = False,
    ) -> dict[str, float]:
        """One outer step on ``batch``; returns metrics (query loss / accuracy after adaptation and,
        with ``pre_adaptation=True``, before it; meta-gradient norm; cos(g_S, g_V) where the agnostic outer
        rule runs). The "before" metrics cost an extra forward pass over every query set (about a fifth of
        a second-order MAML step), so they are off unless asked for.

        ``alignment=True`` adds the gradient alignment before and after the update, on the same batches:
        ``outer_cos_before`` / ``outer_cos_after`` (:meth:`outer_alignment` at θ and at the new θ, on
        ``batch`` and ``val_batch``, which it then needs whatever the outer rule) and ``inner_cos_before``
        / ``inner_cos_after`` (:meth:`inner_alignment`). It costs four more meta-gradients and the inner
        diagnostic's passes: a diagnostic to take every few steps, not at every one."""
        batch = self._checked(as_task_batch(batch))
        aligned = {}
        if alignment:
            if val_batch is None:
                raise ConfigError("meta_step(alignment=True) needs val_batch=, the validation meta-batch g_V is taken on")
            inner = self.inner_alignment(batch)
            aligned = {"outer_cos_before": self.outer_alignment(batch, val_batch),
                       "inner_cos_before": inner[0], "inner_cos_after": inner[1]}
        direction, state, metrics = self._outer_direction(batch, val_batch)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in direction]))
        if not (torch.isfinite(norm) and torch.isfinite(metrics["query_loss"])):
            raise self._nonfinite_error(metrics["query_loss"], direction)
        before = {}
        if pre_adaptation:
            with torch.no_grad():
                before = self._pre_adaptation(batch)
        for n, g in zip(self.names, direction):
            self.params[n].grad = g.detach()
        self.outer_optimizer.step()
        self.outer_optimizer.zero_grad(set_to_none=True)
        if self.outer_scheduler is not None:
            self.outer_scheduler.step()
        self.outer_momentum = None if state is None else [m.detach() for m in state]
        self.iteration += 1
        out = {k: float(v) for k, v in metrics.items()}
        out.update(before)
        out["meta_grad_norm"] = float(norm)
        if alignment:
            out.update(aligned, outer_cos_after=self.outer_alignment(batch, val_batch))
        return out

    def outer_alignment(self, batch: Sequence[Tensor], val_batch: Sequence[Tensor]) -> float:
        """cos(∇L_meta(θ; batch), ∇L_meta(θ; val_batch)) at the current θ: the seed paper's alignment of
        training and validation gradients (its §5.1), at the outer level. Costs two meta-gradients."""
        theta = [self.params[n].detach() for n in self.names]
        g_s, g_v = (self._meta_grad(theta, as_task_batch(b))[0] for b in (batch, val_batch))
        return float(cosine_similarity(g_s, g_v))

    def inner_alignment(self, batch: Sequence[Tensor]) -> tuple[float, float]:
        """The same alignment at the inner level, before and after each inner step: the means over the tasks
        of ``batch`` and the steps k = 1..K of cos(∇L_s(φ_{k−1}), ∇L_q(φ_{k−1})) and cos(∇L_s(φ_k), ∇L_q(φ_k)),
        φ_k from the inner rule (first order: the same fast weights). g_V is the query set's gradient (its
        labels are known while meta-training): the inner rule's own validation view duplicates the support
        set, where the cosine is 1 by construction."""
        theta = [self.params[n].detach() for n in self.names]
        grad_of = autograd_grad(create_graph=False)
        before, after = [], []
        for sx, sy, qx, qy in zip(*as_task_batch(batch)):
            grad_s, grad_q = grad_of(lambda v: self._loss(v, sx, sy)), grad_of(lambda v: self._loss(v, qx, qy))

            def visit(previous: list[Tensor], phi: list[Tensor]) -> None:
                before.append(cosine_similarity(grad_s(previous), grad_q(previous)))
                after.append(cosine_similarity(grad_s(phi), grad_q(phi)))

            with torch.no_grad():
                self._adapt_values(theta, sx, sy, self.inner_steps, self.inner_rule, True, grad_of, visit)
        mean_before, mean_after = self._task_mean([sum(before), sum(after)], len(before))
        return float(mean_before), float(mean_after)

    def _nonfinite_error(self, query_loss: Tensor, direction: Sequence[Tensor]) -> NonFiniteError:
        """Name the first non-finite tensor of the step (the query loss, else a parameter's meta-gradient)
        and the settings that tame it."""
        it = self.iteration + 1  # the number metrics.jsonl gives this step
        if not torch.isfinite(query_loss):
            tensor, bad = "query loss", query_loss
        else:
            tensor, bad = next((f"meta-gradient of {n}", g) for n, g in zip(self.names, direction) if not torch.isfinite(g).all())
        value = "NaN" if torch.isnan(bad).any() else "Inf"
        radii = [f"--{lvl}-{attr} (now {getattr(rule, attr)})" for lvl, rule in (("inner", self.inner_rule), ("outer", self.outer_rule))
                 for attr in ("rho", "rho1") if hasattr(rule, attr)]
        return NonFiniteError(
            f"iteration {it}: the {tensor} is {value}; θ, the outer optimizer and its momentum keep their values of "
            f"iteration {it - 1}. Try a smaller --inner-lr (now {self.inner_lr})"
            f"{''.join(', ' + r for r in radii)} or --outer-lr (now {self.outer_optimizer.param_groups[0]['lr']})",
            iteration=it, tensor=tensor,
        )

    def _pre_adaptation(self, batch: TaskBatch) -> dict[str, float]:
        theta = [self.params[n].detach() for n in self.names]

        def task_terms(t: int) -> list[Tensor]:
            output = self._logits(theta, batch.query_x[t])
            return [self.loss_fn(output, batch.query_y[t]), self._accuracy(output, batch.query_y[t])]

        loss, acc = self._task_mean(_sum_over_tasks(task_terms, batch.query_x.shape[0]), batch.query_x.shape[0])
        return {"query_loss_before": float(loss), **({"query_acc_before": float(acc)} if self.accuracy else {})}

    def task_accuracies(self, tasks, steps: int | None = None, progress: bool = False) -> list[float]:
        """Query accuracy of each task of ``tasks`` (an iterable of tasks or task batches) after
        adaptation with the test rule and steps, in order (for paired comparisons of methods).

        With a reducer, each process evaluates items i ≡ rank (mod W) and every process returns the
        gathered list, in the original order: the same numbers as one process."""
        if not self.accuracy:
            raise ConfigError("this learner reports no accuracy (a loss_fn of your own): use task_losses(), or "
                              "pass accuracy=True if argmax(output) == target is meaningful")
        return self._per_task(tasks, steps, progress, lambda output, y: float(self._accuracy(output, y)))

    def task_losses(self, tasks, steps: int | None = None, progress: bool = False) -> list[float]:
        """The query loss (``loss_fn``) of each task after adaptation, as :meth:`task_accuracies`."""
        return self._per_task(tasks, steps, progress, lambda output, y: float(self.loss_fn(output, y)))

    def _per_task(self, tasks, steps: int | None, progress: bool, measure: Callable[[Tensor, Tensor], float]) -> list[float]:
        from tqdm.auto import tqdm

        if isinstance(tasks, TaskBatch):  # one batch of tasks, not an iterable of them
            tasks = [tasks]
        theta = [self.params[n].detach() for n in self.names]
        per_item: list[list[float]] = []
        mine = tasks if self.reducer is None else self.reducer.share(tasks)
        for task in tqdm(mine, desc="evaluate", disable=not progress, leave=False):
            sx, sy, qx, qy = self._checked(task)
            if sy.dim() == 1:
                sx, sy, qx, qy = sx.unsqueeze(0), sy.unsqueeze(0), qx.unsqueeze(0), qy.unsqueeze(0)
            item = []
            for t in range(sx.shape[0]):
                # first order gives the same fast weights; no meta-gradient is needed here
                with torch.no_grad():
                    phi = self._adapt_for_test(theta, sx[t], sy[t], steps, first_order=True)
                    item.append(measure(self._logits(phi, qx[t]), qy[t]))
            per_item.append(item)
        if self.reducer is not None:
            per_item = self.reducer.gather(per_item)
        values = [value for item in per_item for value in item]
        if not values:
            raise ConfigError("evaluate() got no tasks")
        return values

    def evaluate(self, tasks, steps: int | None = None, progress: bool = False) -> tuple[float, float]:
        """Mean query accuracy over ``tasks`` after adaptation and its 95 % confidence half-width
        1.96·sd/√n (see :meth:`task_accuracies`); for a learner without accuracy, the mean query loss."""
        per_task = self.task_accuracies if self.accuracy else self.task_losses
        return mean_ci95(per_task(tasks, steps, progress))

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Weights, outer optimizer (and scheduler), the agnostic outer momentum and the iteration: enough to
        resume exactly."""
        return {
            "model": self.model.state_dict(),
            "outer_optimizer": self.outer_optimizer.state_dict(),
            "outer_scheduler": None if self.outer_scheduler is None else self.outer_scheduler.state_dict(),
            "outer_momentum": self.outer_momentum,
            "iteration": self.iteration,
        }

    @classmethod
    def load(cls, run_dir_or_checkpoint: str | Path, which: str = "best", **overrides: Any) -> "MetaLearner":
        """Rebuild a learner (model, preset, hyperparameters, weights) from what ``metasam train`` wrote.

        ``run_dir_or_checkpoint``: a run folder (its ``best.pt``, or ``last.pt`` with ``which="last"``)
        or a checkpoint file. ``overrides`` replace saved constructor arguments (e.g. ``path="vmap"``).
        The file is read with ``weights_only=True``: loading it never runs code from it.
        """
        path = Path(run_dir_or_checkpoint)
        if path.is_dir():
            path = path / f"{which}.pt"
        return cls.from_checkpoint(load_checkpoint(path), path, **overrides)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], source: str | Path = "the checkpoint", **overrides: Any) -> MetaLearner:
        """:meth:`load` for a checkpoint already read by :func:`metasam.checkpoint.load_checkpoint`;
        ``source`` names it in errors."""
        try:
            model_name, model_kwargs = ckpt["model"]["name"], ckpt["model"]["kwargs"]
            learner = cls(MODELS[model_name](**model_kwargs), **{**ckpt["hparams"], **overrides})
            state = ckpt["learner"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{source} is not a metasam meta-learning checkpoint (missing {exc})") from exc
        learner.load_state_dict(state, source)
        return learner

    def load_state_dict(self, state: dict[str, Any], source: str | Path = "the checkpoint") -> None:
        """Restore :meth:`state_dict`'s output. Raises :class:`CheckpointError` naming what does not fit
        (missing or unexpected tensors, shapes) and leaves the learner unchanged in that case."""
        keys = ("model", "outer_optimizer", "outer_momentum", "iteration")
        missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
        if missing:
            raise CheckpointError(f"{source} holds no learner state (missing {missing})")
        mismatch = state_dict_mismatch(state["model"], self.model.state_dict())
        if mismatch:
            raise CheckpointError(f"{source} was written for another model: {mismatch}")
        scheduler = state.get("outer_scheduler")
        if (scheduler is None) != (self.outer_scheduler is None):
            raise CheckpointError(
                f"{source} was written {'with' if scheduler is not None else 'without'} an outer learning-rate scheduler "
                f"and this learner has {'none' if self.outer_scheduler is None else 'one'}: pass the same outer_scheduler= "
                "as the run that wrote it"
            )
        momentum = state["outer_momentum"]
        if momentum is not None and [tuple(m.shape) for m in momentum] != [tuple(self.params[n].shape) for n in self.names]:
            raise CheckpointError(f"{source}: its outer momentum does not match this model's parameters")
        try:
            self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{source}: its outer optimizer state does not fit this learner ({exc}); was it written by another "
                "outer optimizer or model?"
            ) from exc
        self.model.load_state_dict(state["model"])
        if scheduler is not None:
            self.outer_scheduler.load_state_dict(scheduler)
        self.outer_momentum = momentum
        self.iteration = int(state["iteration"])
